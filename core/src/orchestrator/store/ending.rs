//! How a job ends and what it is charged: the one place that decides it. Pure functions of what
//! the node reported and what the orchestrator had asked (a cancel, a total timeout), tested by a
//! table of every case; the store only applies their answer (state, settle or refund, reason,
//! how the attempt counts for the node's record).
//!
//! Column values they read and write are enums with `as_str` / `parse`: [`StopReason`]
//! (`jobs.stop_reason`) and [`AttemptOutcome`] (`attempts.outcome`).

use rhizos_broker::wire::{ExitKind, JobState};

/// Why a running job is being stopped (`jobs.stop_reason`, set with `cancel_requested`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The user cancelled it while it ran.
    User,
    /// Its total timeout passed while it ran.
    TotalTimeout,
}

impl StopReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::TotalTimeout => "total_timeout",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Self::User, Self::TotalTimeout]
            .into_iter()
            .find(|r| r.as_str() == text)
    }
}

/// How an attempt ended on its node (`attempts.outcome`): the node's record is built from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Succeeded,
    /// The workload's own failure (exit code, trap, its limits, an invalid module): not the
    /// node's fault, so it does not lower the node's reputation.
    JobFailed,
    /// Lost, restarted without it, or did not take the assignment: the node's fault.
    NodeFailed,
    Cancelled,
}

impl AttemptOutcome {
    pub const ALL: [Self; 4] = [
        Self::Succeeded,
        Self::JobFailed,
        Self::NodeFailed,
        Self::Cancelled,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::JobFailed => "job_failed",
            Self::NodeFailed => "node_failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == text)
    }

    /// The letter it adds to the node's recent window (`node_stats.recent`): only successes and
    /// the node's own failures count for reputation.
    pub const fn reputation_letter(self) -> &'static str {
        match self {
            Self::Succeeded => "s",
            Self::NodeFailed => "f",
            Self::JobFailed | Self::Cancelled => "",
        }
    }
}

/// What the orchestrator had asked of a job when its node reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopRequest {
    pub cancel_requested: bool,
    pub stop_reason: Option<StopReason>,
}

/// How a job ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    pub state: JobState,
    /// Settle the measured cost (provider paid, fee taken, rest refunded); otherwise refund all.
    pub charge: bool,
    pub reason: Option<String>,
    pub attempt: AttemptOutcome,
}

/// The ending of a job whose current attempt finished on its node with `kind` / `exit_code`.
pub fn finished(
    kind: ExitKind,
    exit_code: Option<i32>,
    message: Option<&str>,
    stop: StopRequest,
) -> Ending {
    let timed_out = stop.stop_reason == Some(StopReason::TotalTimeout);
    let (state, charge, reason) = match (kind, exit_code) {
        (ExitKind::Exited, Some(0)) => (JobState::Succeeded, true, None),
        (ExitKind::Exited, code) => (
            JobState::Failed,
            false,
            Some(format!("exited with code {}", code.unwrap_or(-1))),
        ),
        // The orchestrator asked a running job to stop: the provider is paid for the time used.
        (ExitKind::Cancelled, _) if stop.cancel_requested && timed_out => (
            JobState::TimedOut,
            true,
            Some("stopped at the job's total timeout".to_owned()),
        ),
        (ExitKind::Cancelled, _) if stop.cancel_requested => (
            JobState::Cancelled,
            true,
            Some("cancelled by the user while running".to_owned()),
        ),
        (kind, _) => (
            JobState::Failed,
            false,
            Some(
                message
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("execution ended: {kind:?}")),
            ),
        ),
    };
    let attempt = match state {
        JobState::Succeeded => AttemptOutcome::Succeeded,
        JobState::Cancelled => AttemptOutcome::Cancelled,
        _ => AttemptOutcome::JobFailed,
    };
    Ending {
        state,
        charge,
        reason,
        attempt,
    }
}

/// What happens to a job whose current attempt was lost with its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LostAttempt {
    /// Back to pending for another node, the hold intact.
    Requeue { reason: String },
    /// Ended with a full refund.
    End { state: JobState, reason: String },
}

/// `reason` says how the attempt was lost; `retries_used` of `max_retries` were spent before it.
pub fn lost(reason: &str, retries_used: u32, max_retries: u32, stop: StopRequest) -> LostAttempt {
    if retries_used < max_retries && !stop.cancel_requested {
        return LostAttempt::Requeue {
            reason: format!(
                "{reason}; requeued (retry {} of {max_retries})",
                retries_used + 1
            ),
        };
    }
    let (state, reason) = match (stop.cancel_requested, stop.stop_reason) {
        (true, Some(StopReason::TotalTimeout)) => (
            JobState::TimedOut,
            format!("{reason}; the job had reached its total timeout"),
        ),
        (true, _) => (
            JobState::Cancelled,
            format!("{reason}; the job was being cancelled"),
        ),
        (false, _) => (
            JobState::Failed,
            format!("{reason}; no retries left ({max_retries} allowed)"),
        ),
    };
    LostAttempt::End { state, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUNNING: StopRequest = StopRequest {
        cancel_requested: false,
        stop_reason: None,
    };
    const CANCELLED: StopRequest = StopRequest {
        cancel_requested: true,
        stop_reason: Some(StopReason::User),
    };
    const TIMED_OUT: StopRequest = StopRequest {
        cancel_requested: true,
        stop_reason: Some(StopReason::TotalTimeout),
    };
    /// A row from before stop reasons were recorded.
    const CANCELLED_UNKNOWN: StopRequest = StopRequest {
        cancel_requested: true,
        stop_reason: None,
    };

    /// (kind, exit code, message, stop request) → (state, charge, reason, attempt outcome).
    type Case = (
        ExitKind,
        Option<i32>,
        Option<&'static str>,
        StopRequest,
        JobState,
        bool,
        Option<&'static str>,
        AttemptOutcome,
    );

    /// Every (outcome, cancel requested, stop reason) case and its (end state, charge, reason,
    /// attempt outcome). The README's money table says the same in words.
    #[test]
    fn how_a_finished_job_ends_and_what_it_is_charged() {
        use AttemptOutcome::{Cancelled as AC, JobFailed as AF, Succeeded as AS};
        use JobState::{Cancelled, Failed, Succeeded, TimedOut};
        let user = Some("cancelled by the user while running");
        let total = Some("stopped at the job's total timeout");
        #[rustfmt::skip]
        let table: &[Case] = &[
            // exit 0 succeeds and pays, whatever was asked meanwhile
            (ExitKind::Exited, Some(0), None, RUNNING, Succeeded, true, None, AS),
            (ExitKind::Exited, Some(0), None, CANCELLED, Succeeded, true, None, AS),
            (ExitKind::Exited, Some(0), None, TIMED_OUT, Succeeded, true, None, AS),
            (ExitKind::Exited, Some(0), None, CANCELLED_UNKNOWN, Succeeded, true, None, AS),
            // a non-zero exit fails, refunded
            (ExitKind::Exited, Some(3), None, RUNNING, Failed, false, Some("exited with code 3"), AF),
            (ExitKind::Exited, Some(3), None, CANCELLED, Failed, false, Some("exited with code 3"), AF),
            (ExitKind::Exited, Some(3), None, TIMED_OUT, Failed, false, Some("exited with code 3"), AF),
            (ExitKind::Exited, Some(3), None, CANCELLED_UNKNOWN, Failed, false, Some("exited with code 3"), AF),
            (ExitKind::Exited, None, None, RUNNING, Failed, false, Some("exited with code -1"), AF),
            // stopped on the orchestrator's request: pays for the time used
            (ExitKind::Cancelled, None, None, RUNNING, Failed, false, Some("execution ended: Cancelled"), AF),
            (ExitKind::Cancelled, None, None, CANCELLED, Cancelled, true, user, AC),
            (ExitKind::Cancelled, None, None, TIMED_OUT, TimedOut, true, total, AF),
            (ExitKind::Cancelled, None, None, CANCELLED_UNKNOWN, Cancelled, true, user, AC),
            // the workload's own limits and crashes: failed, refunded, the backend's message
            (ExitKind::TimedOut, None, Some("wall-clock deadline of 500 ms exceeded"), RUNNING, Failed, false, Some("wall-clock deadline of 500 ms exceeded"), AF),
            (ExitKind::TimedOut, None, None, CANCELLED, Failed, false, Some("execution ended: TimedOut"), AF),
            (ExitKind::TimedOut, None, None, TIMED_OUT, Failed, false, Some("execution ended: TimedOut"), AF),
            (ExitKind::MemoryExceeded, None, Some("memory limit exceeded"), RUNNING, Failed, false, Some("memory limit exceeded"), AF),
            (ExitKind::MemoryExceeded, None, None, CANCELLED, Failed, false, Some("execution ended: MemoryExceeded"), AF),
            (ExitKind::MemoryExceeded, None, None, TIMED_OUT, Failed, false, Some("execution ended: MemoryExceeded"), AF),
            (ExitKind::Crashed, None, Some("trap"), RUNNING, Failed, false, Some("trap"), AF),
            (ExitKind::Crashed, None, None, CANCELLED, Failed, false, Some("execution ended: Crashed"), AF),
            (ExitKind::Crashed, None, None, TIMED_OUT, Failed, false, Some("execution ended: Crashed"), AF),
            (ExitKind::Rejected, None, Some("invalid module"), RUNNING, Failed, false, Some("invalid module"), AF),
            (ExitKind::Rejected, None, None, CANCELLED, Failed, false, Some("execution ended: Rejected"), AF),
            (ExitKind::Rejected, None, None, TIMED_OUT, Failed, false, Some("execution ended: Rejected"), AF),
            (ExitKind::FuelExhausted, None, Some("fuel limit of 10 units exhausted"), RUNNING, Failed, false, Some("fuel limit of 10 units exhausted"), AF),
            (ExitKind::FuelExhausted, None, None, CANCELLED, Failed, false, Some("execution ended: FuelExhausted"), AF),
            (ExitKind::FuelExhausted, None, None, TIMED_OUT, Failed, false, Some("execution ended: FuelExhausted"), AF),
        ];
        for &(kind, code, message, stop, state, charge, reason, attempt) in table {
            let ending = finished(kind, code, message, stop);
            assert_eq!(
                ending,
                Ending {
                    state,
                    charge,
                    reason: reason.map(str::to_owned),
                    attempt
                },
                "{kind:?} {code:?} {stop:?}"
            );
        }
    }

    #[test]
    fn a_lost_attempt_is_requeued_while_retries_remain_unless_the_job_was_being_stopped() {
        use JobState::{Cancelled, Failed, TimedOut};
        let requeue = |text: &str| LostAttempt::Requeue {
            reason: text.to_owned(),
        };
        let end = |state, text: &str| LostAttempt::End {
            state,
            reason: text.to_owned(),
        };
        #[rustfmt::skip]
        let table = [
            (0, 2, RUNNING, requeue("lost; requeued (retry 1 of 2)")),
            (1, 2, RUNNING, requeue("lost; requeued (retry 2 of 2)")),
            (2, 2, RUNNING, end(Failed, "lost; no retries left (2 allowed)")),
            (0, 0, RUNNING, end(Failed, "lost; no retries left (0 allowed)")),
            (0, 2, CANCELLED, end(Cancelled, "lost; the job was being cancelled")),
            (0, 2, CANCELLED_UNKNOWN, end(Cancelled, "lost; the job was being cancelled")),
            (0, 2, TIMED_OUT, end(TimedOut, "lost; the job had reached its total timeout")),
            (2, 2, TIMED_OUT, end(TimedOut, "lost; the job had reached its total timeout")),
        ];
        for (used, max, stop, expected) in table {
            assert_eq!(
                lost("lost", used, max, stop),
                expected,
                "{used}/{max} {stop:?}"
            );
        }
    }

    #[test]
    fn column_values_parse_back() {
        for outcome in AttemptOutcome::ALL {
            assert_eq!(AttemptOutcome::parse(outcome.as_str()), Some(outcome));
        }
        for reason in [StopReason::User, StopReason::TotalTimeout] {
            assert_eq!(StopReason::parse(reason.as_str()), Some(reason));
        }
        assert_eq!(AttemptOutcome::parse("nope"), None);
        assert_eq!(StopReason::parse(""), None);
    }
}
