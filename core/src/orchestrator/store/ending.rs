//! How a job ends and what it is charged: the one place that decides it. Pure functions of what
//! the node reported and what the orchestrator had asked (a cancel, a total timeout), tested by a
//! table of every case; the store only applies their answer (state, settle or refund, reason,
//! how the attempt counts for the node's record).
//!
//! Column values they read and write are enums with `as_str` / `parse`: [`StopReason`]
//! (`jobs.stop_reason`) and [`AttemptOutcome`] (`attempts.outcome`).

use rhizos_broker::config::FailedWorkloadCharge;
use rhizos_broker::wire::Metered;
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
    /// Lost, restarted without it, did not take the assignment, or its backend failed: the
    /// node's fault.
    NodeFailed,
    Cancelled,
    /// The agent shut down gracefully and gave the attempt back unfinished.
    HandedBack,
    /// It served a metered request but claimed more units than the network measured, beyond
    /// [`overclaimed`]'s tolerance: paid what was measured, and counted against the node.
    Overbilled,
}

impl AttemptOutcome {
    pub const ALL: [Self; 6] = [
        Self::Succeeded,
        Self::JobFailed,
        Self::NodeFailed,
        Self::Cancelled,
        Self::HandedBack,
        Self::Overbilled,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::JobFailed => "job_failed",
            Self::NodeFailed => "node_failed",
            Self::Cancelled => "cancelled",
            Self::HandedBack => "handed_back",
            Self::Overbilled => "overbilled",
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
            Self::NodeFailed | Self::Overbilled => "f",
            Self::JobFailed | Self::Cancelled | Self::HandedBack => "",
        }
    }
}

/// How many times a job may be handed back by shutting-down agents without spending a retry;
/// past it a hand-back counts like a lost attempt (a node cannot hold a job forever by taking
/// it and handing it back).
pub const FREE_HAND_BACKS: u32 = 3;

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

/// What a finished report means for the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The job ends now, as [`Ending`] says.
    End(Ending),
    /// The node failed, not the workload: the attempt is lost like one on a lost node
    /// ([`lost`]: requeued while retries remain, else ended and refunded), nothing charged.
    NodeFault { reason: String },
}

/// The verdict on a job whose current attempt finished on its node with `kind` / `exit_code`.
/// `policy` says what the workload's own failures are charged (`[orchestrator]
/// failed_workload_charge`).
pub fn finished(
    kind: ExitKind,
    exit_code: Option<i32>,
    message: Option<&str>,
    stop: StopRequest,
    policy: FailedWorkloadCharge,
) -> Verdict {
    let timed_out = stop.stop_reason == Some(StopReason::TotalTimeout);
    let charge_failure = policy == FailedWorkloadCharge::TimeUsed;
    let backend_message = || {
        message
            .map(str::to_owned)
            .unwrap_or_else(|| format!("execution ended: {kind:?}"))
    };
    let (state, charge, reason) = match (kind, exit_code) {
        (ExitKind::Exited, Some(0)) => (JobState::Succeeded, true, None),
        (ExitKind::Exited, code) => (
            JobState::Failed,
            charge_failure,
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
        // Stopped though nobody asked (an agent going away, an operator's hand): the node's doing.
        (ExitKind::Cancelled, _) => {
            return Verdict::NodeFault {
                reason: "the node stopped the execution without being asked".to_owned(),
            };
        }
        (ExitKind::NodeError, _) => {
            return Verdict::NodeFault {
                reason: format!("the node could not run it: {}", backend_message()),
            };
        }
        // The workload's own limits, crashes and invalid modules.
        (
            ExitKind::TimedOut
            | ExitKind::MemoryExceeded
            | ExitKind::Crashed
            | ExitKind::Rejected
            | ExitKind::FuelExhausted,
            _,
        ) => (JobState::Failed, charge_failure, Some(backend_message())),
    };
    let attempt = match state {
        JobState::Succeeded => AttemptOutcome::Succeeded,
        JobState::Cancelled => AttemptOutcome::Cancelled,
        _ => AttemptOutcome::JobFailed,
    };
    Verdict::End(Ending {
        state,
        charge,
        reason,
        attempt,
    })
}

/// A metered (AI) attempt whose node failed after the gateway witnessed it delivering part of
/// the answer (`delivered_units` > 0): the requester already holds that part and cannot be given
/// a second answer by another node, so the job is not requeued. It ends `failed`, charged what
/// was delivered ([`billed_units`] bounds it by the witness), and the failure still counts
/// against the node. Any other verdict stands.
pub fn after_delivery(verdict: Verdict, delivered_units: u64) -> Verdict {
    match verdict {
        Verdict::NodeFault { reason } if delivered_units > 0 => Verdict::End(Ending {
            state: JobState::Failed,
            charge: true,
            reason: Some(format!(
                "{reason}, after delivering {delivered_units} units of the answer (paid for them)"
            )),
            attempt: AttemptOutcome::NodeFailed,
        }),
        verdict => verdict,
    }
}

/// Run time and fuel of one attempt: as a node reported them, or as billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub elapsed_ms: u64,
    pub fuel: Option<u64>,
    /// A metered job's units ([`billed_units`] bounds them separately).
    pub units: Option<Metered>,
}

/// What the orchestrator itself knows of an attempt, which bounds what its node can bill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageBounds {
    /// The job's `timeout_ms`: no execution may run longer.
    pub timeout_ms: u64,
    /// Time from recording the assignment to the report, on the orchestrator's clock (the node
    /// acknowledges the assignment one round trip after it is recorded and cannot start before).
    pub since_assignment_ms: u64,
    /// `[orchestrator] timing_slack_ms`: tolerance for the node's clock and the report's trip.
    pub slack_ms: u64,
    /// The fuel limit the orchestrator sent with the assignment, if any.
    pub fuel_limit: Option<u64>,
}

/// What is billed for an attempt: the node's report, never more than the network measured —
/// elapsed ≤ min(reported, `timeout_ms`, time since the assignment + slack), fuel ≤ the limit
/// sent.
pub fn billed_usage(reported: Usage, bounds: &UsageBounds) -> Usage {
    let window = bounds.since_assignment_ms.saturating_add(bounds.slack_ms);
    Usage {
        units: reported.units,
        elapsed_ms: reported.elapsed_ms.min(bounds.timeout_ms).min(window),
        fuel: match (reported.fuel, bounds.fuel_limit) {
            (Some(fuel), Some(limit)) => Some(fuel.min(limit)),
            (fuel, _) => fuel,
        },
    }
}

/// What the gateway witnessed delivering of an attempt ([`rhizos_broker::wire::WitnessUsage`]):
/// input units where it counted them itself, output units delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Witnessed {
    pub input_units: Option<u64>,
    pub output_units: u64,
}

/// What is billed of a metered (AI) attempt: the units its node reported, never more than
/// the job's `max_input_units` / `max_output_units` (what the hold was made for), nor than the
/// gateway witnessed delivering — and nothing at all without a witness (the requester was
/// served nothing the network saw). A node that reported nothing bills nothing.
pub fn billed_units(
    reported: Option<Metered>,
    max: (u64, u64),
    witness: Option<Witnessed>,
) -> Metered {
    let (Some(reported), Some(witness)) = (reported, witness) else {
        return Metered::default();
    };
    Metered {
        input_units: reported
            .input_units
            .min(max.0)
            .min(witness.input_units.unwrap_or(u64::MAX)),
        output_units: reported.output_units.min(max.1).min(witness.output_units),
    }
}

/// Whether a node's report of a metered attempt claimed more than was billed beyond the
/// tolerance of honest miscounting (a chunk holding two tokens, a template's tokens): more than
/// 10% and 2 units over, on input or output.
pub fn overclaimed(reported: Option<Metered>, billed: Metered) -> bool {
    let over =
        |claimed: u64, measured: u64| claimed > measured.saturating_add((measured / 10).max(2));
    reported.is_some_and(|r| {
        over(r.input_units, billed.input_units) || over(r.output_units, billed.output_units)
    })
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

    /// (kind, exit code, message, stop request) → (state, charge with `time_used`, reason,
    /// attempt outcome); `None` for the state: a node fault with that reason.
    type Case = (
        ExitKind,
        Option<i32>,
        Option<&'static str>,
        StopRequest,
        Option<JobState>,
        bool,
        Option<&'static str>,
        AttemptOutcome,
    );

    /// Every (outcome, cancel requested, stop reason) case and its (end state, charge, reason,
    /// attempt outcome), under both `failed_workload_charge` policies: with `none`, exactly the
    /// workload's own failures flip from charged to refunded. The README's policy table says
    /// the same in words.
    #[test]
    fn how_a_finished_job_ends_and_what_it_is_charged() {
        use AttemptOutcome::{Cancelled as AC, JobFailed as AF, NodeFailed as NF, Succeeded as AS};
        use JobState::{Cancelled, Failed, Succeeded, TimedOut};
        let user = Some("cancelled by the user while running");
        let total = Some("stopped at the job's total timeout");
        let unasked = Some("the node stopped the execution without being asked");
        let (s, f, c, t) = (
            Some(Succeeded),
            Some(Failed),
            Some(Cancelled),
            Some(TimedOut),
        );
        #[rustfmt::skip]
        let table: &[Case] = &[
            // exit 0 succeeds and pays, whatever was asked meanwhile
            (ExitKind::Exited, Some(0), None, RUNNING, s, true, None, AS),
            (ExitKind::Exited, Some(0), None, CANCELLED, s, true, None, AS),
            (ExitKind::Exited, Some(0), None, TIMED_OUT, s, true, None, AS),
            (ExitKind::Exited, Some(0), None, CANCELLED_UNKNOWN, s, true, None, AS),
            // a non-zero exit fails, paying the time used (the workload's own failure)
            (ExitKind::Exited, Some(3), None, RUNNING, f, true, Some("exited with code 3"), AF),
            (ExitKind::Exited, Some(3), None, CANCELLED, f, true, Some("exited with code 3"), AF),
            (ExitKind::Exited, Some(3), None, TIMED_OUT, f, true, Some("exited with code 3"), AF),
            (ExitKind::Exited, Some(3), None, CANCELLED_UNKNOWN, f, true, Some("exited with code 3"), AF),
            (ExitKind::Exited, None, None, RUNNING, f, true, Some("exited with code -1"), AF),
            // stopped on the orchestrator's request: pays for the time used
            (ExitKind::Cancelled, None, None, CANCELLED, c, true, user, AC),
            (ExitKind::Cancelled, None, None, TIMED_OUT, t, true, total, AF),
            (ExitKind::Cancelled, None, None, CANCELLED_UNKNOWN, c, true, user, AC),
            // stopped unasked: the node's doing, requeued or refunded
            (ExitKind::Cancelled, None, None, RUNNING, None, false, unasked, NF),
            // the workload's own limits and crashes: failed, paying the time used
            (ExitKind::TimedOut, None, Some("wall-clock deadline of 500 ms exceeded"), RUNNING, f, true, Some("wall-clock deadline of 500 ms exceeded"), AF),
            (ExitKind::TimedOut, None, None, CANCELLED, f, true, Some("execution ended: TimedOut"), AF),
            (ExitKind::TimedOut, None, None, TIMED_OUT, f, true, Some("execution ended: TimedOut"), AF),
            (ExitKind::MemoryExceeded, None, Some("memory limit exceeded"), RUNNING, f, true, Some("memory limit exceeded"), AF),
            (ExitKind::MemoryExceeded, None, None, CANCELLED, f, true, Some("execution ended: MemoryExceeded"), AF),
            (ExitKind::MemoryExceeded, None, None, TIMED_OUT, f, true, Some("execution ended: MemoryExceeded"), AF),
            (ExitKind::Crashed, None, Some("trap"), RUNNING, f, true, Some("trap"), AF),
            (ExitKind::Crashed, None, None, CANCELLED, f, true, Some("execution ended: Crashed"), AF),
            (ExitKind::Crashed, None, None, TIMED_OUT, f, true, Some("execution ended: Crashed"), AF),
            (ExitKind::Rejected, None, Some("invalid module"), RUNNING, f, true, Some("invalid module"), AF),
            (ExitKind::Rejected, None, None, CANCELLED, f, true, Some("execution ended: Rejected"), AF),
            (ExitKind::Rejected, None, None, TIMED_OUT, f, true, Some("execution ended: Rejected"), AF),
            (ExitKind::FuelExhausted, None, Some("fuel limit of 10 units exhausted"), RUNNING, f, true, Some("fuel limit of 10 units exhausted"), AF),
            (ExitKind::FuelExhausted, None, None, CANCELLED, f, true, Some("execution ended: FuelExhausted"), AF),
            (ExitKind::FuelExhausted, None, None, TIMED_OUT, f, true, Some("execution ended: FuelExhausted"), AF),
            // the node's own failures (engine, plugin, artifact, GPUs): never charged
            (ExitKind::NodeError, None, Some("artifact digest mismatch"), RUNNING, None, false, Some("the node could not run it: artifact digest mismatch"), NF),
            (ExitKind::NodeError, None, Some("lost track of the container"), CANCELLED, None, false, Some("the node could not run it: lost track of the container"), NF),
            (ExitKind::NodeError, None, None, TIMED_OUT, None, false, Some("the node could not run it: execution ended: NodeError"), NF),
        ];
        for policy in [FailedWorkloadCharge::TimeUsed, FailedWorkloadCharge::None] {
            for &(kind, code, message, stop, state, charge, reason, attempt) in table {
                let verdict = finished(kind, code, message, stop, policy);
                let expected = match state {
                    Some(state) => {
                        // Under `none`, the workload's own failures are refunded.
                        let charge = charge
                            && !(policy == FailedWorkloadCharge::None
                                && attempt == AF
                                && state == Failed);
                        Verdict::End(Ending {
                            state,
                            charge,
                            reason: reason.map(str::to_owned),
                            attempt,
                        })
                    }
                    None => Verdict::NodeFault {
                        reason: reason.unwrap_or_default().to_owned(),
                    },
                };
                assert_eq!(verdict, expected, "{kind:?} {code:?} {stop:?} {policy:?}");
            }
        }
        // Spot checks of the flip, spelled out.
        let refunded =
            |kind, code| match finished(kind, code, None, RUNNING, FailedWorkloadCharge::None) {
                Verdict::End(ending) => !ending.charge,
                Verdict::NodeFault { .. } => true,
            };
        assert!(refunded(ExitKind::Exited, Some(1)));
        assert!(refunded(ExitKind::Crashed, None));
        assert!(!refunded(ExitKind::Exited, Some(0)));
    }

    #[test]
    fn a_node_failing_after_delivering_part_of_an_answer_is_paid_that_part_and_not_replaced() {
        let fault = || Verdict::NodeFault {
            reason: "the node could not run it: model server gone".to_owned(),
        };
        // Nothing delivered: requeued for another node, as before.
        assert_eq!(after_delivery(fault(), 0), fault());
        // Part delivered: the job ends failed, charged, counted against the node.
        assert_eq!(
            after_delivery(fault(), 7),
            Verdict::End(Ending {
                state: JobState::Failed,
                charge: true,
                reason: Some(
                    "the node could not run it: model server gone, after delivering 7 units of the answer (paid for them)"
                        .to_owned()
                ),
                attempt: AttemptOutcome::NodeFailed,
            })
        );
        // A verdict that is not the node's fault is not changed by delivery.
        let ended = finished(
            ExitKind::Exited,
            Some(0),
            None,
            RUNNING,
            FailedWorkloadCharge::TimeUsed,
        );
        assert_eq!(after_delivery(ended.clone(), 7), ended);
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
    fn billed_usage_is_the_report_bounded_by_what_the_orchestrator_measured() {
        let bounds = UsageBounds {
            timeout_ms: 10_000,
            since_assignment_ms: 3_000,
            slack_ms: 500,
            fuel_limit: Some(1_000),
        };
        let usage = |elapsed_ms, fuel| Usage {
            elapsed_ms,
            fuel,
            units: None,
        };
        #[rustfmt::skip]
        let table = [
            // an honest report is billed as reported
            (usage(2_000, Some(400)), usage(2_000, Some(400))),
            // within the slack of the assignment window
            (usage(3_400, None), usage(3_400, None)),
            // a node claiming more than the time since the assignment: the window + slack
            (usage(9_000, None), usage(3_500, None)),
            (usage(u64::MAX, Some(u64::MAX)), usage(3_500, Some(1_000))),
            // fuel beyond the limit sent
            (usage(10, Some(5_000)), usage(10, Some(1_000))),
        ];
        for (reported, billed) in table {
            assert_eq!(billed_usage(reported, &bounds), billed, "{reported:?}");
        }
        // the job's own timeout bounds a long window
        let long = UsageBounds {
            since_assignment_ms: 60_000,
            ..bounds
        };
        assert_eq!(
            billed_usage(usage(50_000, None), &long),
            usage(10_000, None)
        );
        // no fuel limit sent (fuel is free on that node): the report stands
        let free = UsageBounds {
            fuel_limit: None,
            ..bounds
        };
        assert_eq!(billed_usage(usage(1, Some(77)), &free), usage(1, Some(77)));
        // a window near u64::MAX does not overflow
        let huge = UsageBounds {
            since_assignment_ms: u64::MAX,
            slack_ms: u64::MAX,
            ..bounds
        };
        assert_eq!(
            billed_usage(usage(20_000, None), &huge),
            usage(10_000, None)
        );
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

    #[test]
    fn metered_units_are_bounded_by_the_hold_and_the_witness() {
        let m = |input_units, output_units| Metered {
            input_units,
            output_units,
        };
        let seen = |input_units, output_units| Witnessed {
            input_units,
            output_units,
        };
        let max = (100, 50);
        for (reported, witness, billed) in [
            // Honest: reported = delivered, within the hold.
            (Some(m(20, 10)), Some(seen(None, 10)), m(20, 10)),
            // The node claims more output than the gateway delivered, and than max_tokens.
            (Some(m(20, 500)), Some(seen(None, 12)), m(20, 12)),
            (Some(m(20, 500)), Some(seen(None, 900)), m(20, 50)),
            // It claims a prompt longer than the hold was made for, or than the gateway counted.
            (Some(m(5_000, 1)), Some(seen(None, 1)), m(100, 1)),
            (Some(m(80, 0)), Some(seen(Some(30), 0)), m(30, 0)),
            // It under-reports: billed as reported.
            (Some(m(3, 2)), Some(seen(None, 10)), m(3, 2)),
            // No witness (the gateway never confirmed delivery), or no report: nothing.
            (Some(m(20, 10)), None, m(0, 0)),
            (None, Some(seen(None, 10)), m(0, 0)),
        ] {
            assert_eq!(
                billed_units(reported, max, witness),
                billed,
                "{reported:?} {witness:?}"
            );
        }
    }

    #[test]
    fn a_claim_beyond_the_tolerance_counts_against_the_node() {
        let m = |input_units, output_units| Metered {
            input_units,
            output_units,
        };
        assert!(!overclaimed(Some(m(37, 24)), m(37, 24)));
        assert!(
            !overclaimed(Some(m(37, 26)), m(37, 24)),
            "two units over is miscounting"
        );
        assert!(
            !overclaimed(Some(m(110, 100)), m(100, 100)),
            "10% over is miscounting"
        );
        assert!(overclaimed(Some(m(37, 27)), m(37, 24)));
        assert!(overclaimed(Some(m(999_999, 3)), m(44, 3)));
        assert!(!overclaimed(None, m(0, 0)));
        assert_eq!(AttemptOutcome::Overbilled.reputation_letter(), "f");
    }
}
