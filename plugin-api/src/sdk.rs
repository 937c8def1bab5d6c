//! Helpers that keep a plugin short and safe: panic containment at the FFI boundary, splitting
//! raw output into log lines, and a completion slot for [`crate::Execution::wait`].

use crate::{EventSinkBox, ExecOutcome, ExitKind, LogStream};
use abi_stable::std_types::{RErr, RResult, RString};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Condvar, Mutex, PoisonError};

/// Runs `body`, turning a panic into `Err` instead of letting it unwind across `extern "C"`
/// (which would abort the whole agent).
pub fn catch_panic<T>(
    what: &str,
    body: impl FnOnce() -> RResult<T, RString>,
) -> RResult<T, RString> {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(result) => result,
        Err(payload) => RErr(RString::from(format!(
            "plugin panicked in {what}: {}",
            panic_message(&payload)
        ))),
    }
}

/// The text of a panic payload, when it has one.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Longest line handed to the sink; longer lines are split (a workload printing megabytes
/// without a newline must not hold them all in memory).
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Cuts a byte stream into lines and gives each complete line to the sink.
pub struct LineSplitter {
    stream: LogStream,
    pending: Vec<u8>,
}

impl LineSplitter {
    pub fn new(stream: LogStream) -> Self {
        Self {
            stream,
            pending: Vec::new(),
        }
    }

    /// Feeds bytes; emits every line they complete.
    pub fn push(&mut self, sink: &EventSinkBox, mut bytes: &[u8]) {
        while let Some(pos) = bytes.iter().position(|&b| b == b'\n') {
            self.pending.extend_from_slice(&bytes[..pos]);
            self.emit(sink);
            bytes = &bytes[pos + 1..];
        }
        self.pending.extend_from_slice(bytes);
        while self.pending.len() >= MAX_LINE_BYTES {
            let rest = self.pending.split_off(MAX_LINE_BYTES);
            self.emit(sink);
            self.pending = rest;
        }
    }

    /// Emits a last line that had no newline.
    pub fn finish(&mut self, sink: &EventSinkBox) {
        if !self.pending.is_empty() {
            self.emit(sink);
        }
    }

    fn emit(&mut self, sink: &EventSinkBox) {
        let mut line = String::from_utf8_lossy(&self.pending).into_owned();
        if line.ends_with('\r') {
            line.pop();
        }
        sink.log(self.stream, line.as_str().into());
        self.pending.clear();
    }
}

/// A one-shot slot an execution thread fills and [`crate::Execution::wait`] blocks on.
#[derive(Default)]
pub struct OutcomeSlot {
    outcome: Mutex<Option<ExecOutcome>>,
    ready: Condvar,
}

impl OutcomeSlot {
    pub fn set(&self, outcome: ExecOutcome) {
        let mut slot = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(outcome);
        }
        self.ready.notify_all();
    }

    pub fn wait(&self) -> ExecOutcome {
        let mut slot = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(outcome) = slot.as_ref() {
                return outcome.clone();
            }
            slot = self
                .ready
                .wait(slot)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl ExecOutcome {
    pub fn exited(exit_code: i32, elapsed_ms: u64) -> Self {
        Self {
            kind: ExitKind::Exited,
            exit_code,
            message: RString::new(),
            elapsed_ms,
        }
    }

    pub fn abnormal(kind: ExitKind, message: impl Into<String>, elapsed_ms: u64) -> Self {
        Self {
            kind,
            exit_code: -1,
            message: RString::from(message.into()),
            elapsed_ms,
        }
    }
}
