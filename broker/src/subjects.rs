//! Subject builders for the v1 scheme: `rhizos.<kind>.v1.<ns>.<noun>.<verb>[.<id>]`.
//!
//! `kind` is `ctl` (request/reply), `evt` (events, captured by the JetStream stream) or `out`
//! (high-volume streams such as job logs). Every variable token is validated: ids match
//! `[a-z0-9_-]{1,64}`, so user strings can never add tokens or wildcards to a subject.

use crate::ops::{CtlOp, Server};
use std::fmt;

/// Why a string cannot be used as a subject token (an id or a namespace).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: use 1 to 64 characters from a-z, 0-9, '_' and '-'")]
pub struct TokenError {
    pub what: &'static str,
    pub value: String,
}

/// Checks that `value` is a valid id token (`[a-z0-9_-]{1,64}`).
pub fn validate_token(what: &'static str, value: &str) -> Result<(), TokenError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(TokenError {
            what,
            value: value.to_owned(),
        })
    }
}

/// The `<kind>` token of escrow events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscrowEventKind {
    Held,
    Settled,
    Refunded,
}

impl EscrowEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Held => "held",
            Self::Settled => "settled",
            Self::Refunded => "refunded",
        }
    }
}

/// Subject builder bound to one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    ns: String,
}

impl fmt::Display for Subjects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "namespace {}", self.ns)
    }
}

/// Queue group every orchestrator instance joins for `ctl` requests.
pub const ORCHESTRATOR_QUEUE: &str = "orchestrator";

impl Subjects {
    pub fn new(namespace: &str) -> Result<Self, TokenError> {
        validate_token("namespace", namespace)?;
        Ok(Self {
            ns: namespace.to_owned(),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.ns
    }

    fn ctl(&self, rest: &str) -> String {
        format!("rhizos.ctl.v1.{}.{rest}", self.ns)
    }

    fn evt(&self, rest: &str) -> String {
        format!("rhizos.evt.v1.{}.{rest}", self.ns)
    }

    fn out(&self, rest: &str) -> String {
        format!("rhizos.out.v1.{}.{rest}", self.ns)
    }

    // --- ctl: request/reply, one subject per operation of [`CtlOp`] ---

    /// The subject of an orchestrator-served operation: `rhizos.ctl.v1.<ns>.<noun>.<verb>`.
    pub fn op(&self, op: CtlOp) -> String {
        debug_assert_eq!(
            op.server(),
            Server::Orchestrator,
            "{op} is served by agents"
        );
        self.ctl(op.as_str())
    }

    /// The subject of an operation served by one node's agent:
    /// `rhizos.ctl.v1.<ns>.<noun>.<verb>.<node_id>`.
    pub fn node_op(&self, op: CtlOp, node_id: &str) -> Result<String, TokenError> {
        debug_assert_eq!(
            op.server(),
            Server::Agent,
            "{op} is served by the orchestrator"
        );
        validate_token("node id", node_id)?;
        Ok(self.ctl(&format!("{}.{node_id}", op.as_str())))
    }

    pub fn job_submit(&self) -> String {
        self.op(CtlOp::JobSubmit)
    }
    pub fn job_get(&self) -> String {
        self.op(CtlOp::JobGet)
    }
    pub fn module_resolve(&self) -> String {
        self.op(CtlOp::ModuleResolve)
    }
    pub fn module_list(&self) -> String {
        self.op(CtlOp::ModuleList)
    }
    pub fn job_list(&self) -> String {
        self.op(CtlOp::JobList)
    }
    pub fn job_cancel(&self) -> String {
        self.op(CtlOp::JobCancel)
    }
    pub fn job_report(&self) -> String {
        self.op(CtlOp::JobReport)
    }
    pub fn account_create(&self) -> String {
        self.op(CtlOp::AccountCreate)
    }
    pub fn account_deposit(&self) -> String {
        self.op(CtlOp::AccountDeposit)
    }
    pub fn account_balance(&self) -> String {
        self.op(CtlOp::AccountBalance)
    }
    pub fn node_register(&self) -> String {
        self.op(CtlOp::NodeRegister)
    }
    pub fn node_list(&self) -> String {
        self.op(CtlOp::NodeList)
    }
    pub fn node_info(&self) -> String {
        self.op(CtlOp::NodeInfo)
    }
    pub fn account_statement(&self) -> String {
        self.op(CtlOp::AccountStatement)
    }
    pub fn ledger_verify(&self) -> String {
        self.op(CtlOp::LedgerVerify)
    }
    /// Wildcard over every orchestrator-served `ctl` subject: `rhizos.ctl.v1.<ns>.*.*`.
    pub fn orchestrator_wildcard(&self) -> String {
        self.ctl("*.*")
    }
    pub fn job_assign(&self, node_id: &str) -> Result<String, TokenError> {
        self.node_op(CtlOp::JobAssign, node_id)
    }
    pub fn job_stop(&self, node_id: &str) -> Result<String, TokenError> {
        self.node_op(CtlOp::JobStop, node_id)
    }
    pub fn node_plugins(&self, node_id: &str) -> Result<String, TokenError> {
        self.node_op(CtlOp::NodePlugins, node_id)
    }

    // --- evt: captured by the JetStream stream ---

    pub fn node_heartbeat(&self, node_id: &str) -> Result<String, TokenError> {
        validate_token("node id", node_id)?;
        Ok(self.evt(&format!("node.heartbeat.{node_id}")))
    }
    pub fn node_heartbeat_wildcard(&self) -> String {
        self.evt("node.heartbeat.*")
    }
    /// `rhizos.evt.v1.<ns>.job.<state>.<job_id>`
    pub fn job_event(&self, state: &str, job_id: &str) -> Result<String, TokenError> {
        validate_token("job state", state)?;
        validate_token("job id", job_id)?;
        Ok(self.evt(&format!("job.{state}.{job_id}")))
    }
    /// `rhizos.evt.v1.<ns>.escrow.<held|settled|refunded>.<job_id>`
    pub fn escrow_event(&self, kind: EscrowEventKind, job_id: &str) -> Result<String, TokenError> {
        validate_token("job id", job_id)?;
        Ok(self.evt(&format!("escrow.{}.{job_id}", kind.as_str())))
    }
    /// Every event of the namespace: `rhizos.evt.v1.<ns>.>`.
    pub fn events_wildcard(&self) -> String {
        self.evt(">")
    }
    /// Events of one job (state changes and escrow), for `--wait` style watchers.
    pub fn job_events_of(&self, job_id: &str) -> Result<Vec<String>, TokenError> {
        validate_token("job id", job_id)?;
        Ok(vec![
            self.evt(&format!("job.*.{job_id}")),
            self.evt(&format!("escrow.*.{job_id}")),
        ])
    }

    /// Name of the JetStream stream holding this namespace's events.
    pub fn event_stream(&self) -> String {
        format!("RHIZOS_EVT_{}", self.ns.to_ascii_uppercase())
    }

    // --- out: high-volume, not persisted ---

    /// Log lines of a job while it runs.
    pub fn job_log(&self, job_id: &str) -> Result<String, TokenError> {
        validate_token("job id", job_id)?;
        Ok(self.out(&format!("job.log.{job_id}")))
    }

    /// The last token of a subject (the id in `...<verb>.<id>`).
    pub fn last_token(subject: &str) -> &str {
        subject.rsplit('.').next().unwrap_or(subject)
    }

    /// The orchestrator-served operation a `ctl` subject of this namespace names, if any.
    pub fn orchestrator_op(&self, subject: &str) -> Option<CtlOp> {
        CtlOp::parse(self.ctl_operation(subject)?).filter(|op| op.server() == Server::Orchestrator)
    }

    /// The `<noun>.<verb>` part of a `ctl` subject of this namespace, if it is one.
    pub fn ctl_operation<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix("rhizos.ctl.v1.")?
            .strip_prefix(self.ns.as_str())?
            .strip_prefix('.')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_reject_wildcards_dots_and_uppercase() {
        for bad in ["", "a.b", "*", ">", "A", "a b", &"x".repeat(65)] {
            assert!(
                validate_token("id", bad).is_err(),
                "{bad:?} must be refused"
            );
        }
        for good in ["a", "job_1-x", &"x".repeat(64)] {
            assert!(
                validate_token("id", good).is_ok(),
                "{good:?} must be accepted"
            );
        }
    }

    #[test]
    fn subjects_follow_the_v1_scheme() {
        let s = Subjects::new("dev").unwrap();
        assert_eq!(s.job_submit(), "rhizos.ctl.v1.dev.job.submit");
        assert_eq!(
            s.job_assign("n1").unwrap(),
            "rhizos.ctl.v1.dev.job.assign.n1"
        );
        assert_eq!(
            s.node_heartbeat("n1").unwrap(),
            "rhizos.evt.v1.dev.node.heartbeat.n1"
        );
        assert_eq!(
            s.job_event("running", "j1").unwrap(),
            "rhizos.evt.v1.dev.job.running.j1"
        );
        assert_eq!(
            s.escrow_event(EscrowEventKind::Settled, "j1").unwrap(),
            "rhizos.evt.v1.dev.escrow.settled.j1"
        );
        assert_eq!(s.job_log("j1").unwrap(), "rhizos.out.v1.dev.job.log.j1");
        assert_eq!(s.events_wildcard(), "rhizos.evt.v1.dev.>");
        assert_eq!(s.event_stream(), "RHIZOS_EVT_DEV");
        assert_eq!(
            s.ctl_operation("rhizos.ctl.v1.dev.job.get"),
            Some("job.get")
        );
        assert_eq!(s.ctl_operation("rhizos.ctl.v1.other.job.get"), None);
        assert!(s.job_assign("bad.id").is_err());
    }
}
