//! Subject builders for the v1 scheme: `rhizos.<kind>.v1.<ns>[.<role>.<name>].<noun>.<verb>[.<id>]`.
//!
//! `kind` is `ctl` (request/reply), `evt` (events, captured by the JetStream stream) or `out`
//! (high-volume streams such as job logs). Every variable token is validated: ids match
//! `[a-z0-9_-]{1,64}`, so user strings can never add tokens or wildcards to a subject.

use crate::identity::{Caller, Role};
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

    /// The subject on which `caller` asks the orchestrator for `op`:
    /// `rhizos.ctl.v1.<ns>.<role>.<name>.<noun>.<verb>`. With authentication on, the server lets
    /// each party publish only its own `<role>.<name>`, so the orchestrator learns the caller
    /// from the subject, never from the payload.
    pub fn op(&self, op: CtlOp, caller: &Caller) -> Result<String, TokenError> {
        debug_assert_eq!(
            op.server(),
            Server::Orchestrator,
            "{op} is served by agents"
        );
        validate_token(caller.role.as_str(), &caller.name)?;
        Ok(self.ctl(&format!(
            "{}.{}.{}",
            caller.role.token(),
            caller.name,
            op.as_str()
        )))
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

    /// Wildcard over every orchestrator-served `ctl` subject: `rhizos.ctl.v1.<ns>.*.*.*.*`.
    pub fn orchestrator_wildcard(&self) -> String {
        self.ctl("*.*.*.*")
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
    pub fn node_reregister(&self, node_id: &str) -> Result<String, TokenError> {
        self.node_op(CtlOp::NodeReregister, node_id)
    }

    // --- evt: captured by the JetStream stream ---

    pub fn node_heartbeat(&self, node_id: &str) -> Result<String, TokenError> {
        validate_token("node id", node_id)?;
        Ok(self.out(&format!("node.heartbeat.{node_id}")))
    }
    pub fn node_heartbeat_wildcard(&self) -> String {
        self.out("node.heartbeat.*")
    }
    /// `rhizos.evt.v1.<ns>.u.<account>.job.<state>.<job_id>`: under the paying account, which
    /// (with the operator) is the only one allowed to subscribe.
    pub fn job_event(
        &self,
        account: &str,
        state: &str,
        job_id: &str,
    ) -> Result<String, TokenError> {
        validate_token("account", account)?;
        validate_token("job state", state)?;
        validate_token("job id", job_id)?;
        Ok(self.evt(&format!("u.{account}.job.{state}.{job_id}")))
    }
    /// `rhizos.evt.v1.<ns>.u.<account>.escrow.<held|settled|refunded>.<job_id>`
    pub fn escrow_event(
        &self,
        account: &str,
        kind: EscrowEventKind,
        job_id: &str,
    ) -> Result<String, TokenError> {
        validate_token("account", account)?;
        validate_token("job id", job_id)?;
        Ok(self.evt(&format!("u.{account}.escrow.{}.{job_id}", kind.as_str())))
    }
    /// `rhizos.evt.v1.<ns>.u.<account>.flow.<state>.<flow_id>`: a flow or one of its steps
    /// changed state.
    pub fn flow_event(
        &self,
        account: &str,
        state: &str,
        flow_id: &str,
    ) -> Result<String, TokenError> {
        validate_token("account", account)?;
        validate_token("flow state", state)?;
        validate_token("flow id", flow_id)?;
        Ok(self.evt(&format!("u.{account}.flow.{state}.{flow_id}")))
    }
    /// Every event of one flow: `rhizos.evt.v1.<ns>.u.<account>.flow.*.<flow_id>`.
    pub fn flow_events_of(&self, account: &str, flow_id: &str) -> Result<String, TokenError> {
        validate_token("account", account)?;
        validate_token("flow id", flow_id)?;
        Ok(self.evt(&format!("u.{account}.flow.*.{flow_id}")))
    }
    /// Every event of the namespace: `rhizos.evt.v1.<ns>.>`.
    pub fn events_wildcard(&self) -> String {
        self.evt(">")
    }
    /// Every event of one account's jobs: `rhizos.evt.v1.<ns>.u.<account>.>`.
    pub fn account_events(&self, account: &str) -> Result<String, TokenError> {
        validate_token("account", account)?;
        Ok(self.evt(&format!("u.{account}.>")))
    }
    /// Events of one job (state changes and escrow), for `--wait` style watchers. `account`
    /// None watches it under any account (the operator's view).
    pub fn job_events_of(
        &self,
        account: Option<&str>,
        job_id: &str,
    ) -> Result<Vec<String>, TokenError> {
        validate_token("job id", job_id)?;
        let account = match account {
            Some(account) => {
                validate_token("account", account)?;
                account
            }
            None => "*",
        };
        Ok(vec![
            self.evt(&format!("u.{account}.job.*.{job_id}")),
            self.evt(&format!("u.{account}.escrow.*.{job_id}")),
        ])
    }

    /// Name of the JetStream stream holding this namespace's events.
    pub fn event_stream(&self) -> String {
        format!("RHIZOS_EVT_{}", self.ns.to_ascii_uppercase())
    }

    // --- ledger: the replicated ledger's log (ADR 0010), written by the active orchestrator ---

    /// Name of the JetStream stream holding this namespace's replicated ledger.
    pub fn ledger_stream(&self) -> String {
        format!("RHIZOS_LEDGER_{}", self.ns.to_ascii_uppercase())
    }

    /// Every subject of the ledger stream: `rhizos.ledger.v1.<ns>.>`.
    pub fn ledger_wildcard(&self) -> String {
        format!("rhizos.ledger.v1.{}.>", self.ns)
    }

    /// Where each committed batch's changes are appended: `rhizos.ledger.v1.<ns>.changes`.
    pub fn ledger_changes(&self) -> String {
        format!("rhizos.ledger.v1.{}.changes", self.ns)
    }

    /// Where a snapshot of the whole ledger is announced: `rhizos.ledger.v1.<ns>.snapshot`.
    pub fn ledger_snapshot(&self) -> String {
        format!("rhizos.ledger.v1.{}.snapshot", self.ns)
    }

    /// The object store bucket holding the ledger's snapshots.
    pub fn ledger_snapshots_bucket(&self) -> String {
        format!("rhizos-ledger-{}", self.ns)
    }

    // --- blob: out-of-band result bytes, in the blob stream ---

    /// Name of the JetStream stream holding this namespace's result blobs.
    pub fn blob_stream(&self) -> String {
        format!("RHIZOS_BLOB_{}", self.ns.to_ascii_uppercase())
    }

    /// Every blob subject of the namespace (the blob stream's subjects).
    pub fn blobs_wildcard(&self) -> String {
        format!("rhizos.blob.v1.{}.>", self.ns)
    }

    /// Chunk `index` of the blob `sha256` that `node_id` stored for `account`:
    /// `rhizos.blob.v1.<ns>.u.<account>.n.<node>.<sha256>.<index>`. Only that node may publish
    /// there (its token is in the subject) and only the account (and the operator) read it.
    pub fn blob_chunk(
        &self,
        account: &str,
        node_id: &str,
        sha256: &str,
        index: u64,
    ) -> Result<String, TokenError> {
        Ok(format!(
            "{}.{index}",
            self.blob_chunks(account, node_id, sha256)?
        ))
    }

    /// Every chunk subject of one blob (`….<sha256>.*`).
    pub fn blob_chunks(
        &self,
        account: &str,
        node_id: &str,
        sha256: &str,
    ) -> Result<String, TokenError> {
        validate_token("account", account)?;
        validate_token("node id", node_id)?;
        validate_token("blob digest", sha256)?;
        Ok(format!(
            "rhizos.blob.v1.{}.u.{account}.n.{node_id}.{sha256}",
            self.ns
        ))
    }

    // --- out: high-volume, not persisted ---

    /// Log lines of a job while it runs on `node_id`:
    /// `rhizos.out.v1.<ns>.u.<account>.job.log.<job_id>.<node_id>`. Only that node may publish
    /// there and only the account (and the operator) subscribe.
    pub fn job_log(
        &self,
        account: &str,
        job_id: &str,
        node_id: &str,
    ) -> Result<String, TokenError> {
        validate_token("account", account)?;
        validate_token("job id", job_id)?;
        validate_token("node id", node_id)?;
        Ok(self.out(&format!("u.{account}.job.log.{job_id}.{node_id}")))
    }

    /// Log lines of a job from whichever node runs it (a watcher keeps only the lines of the
    /// node the job is assigned to: the node is the last token).
    pub fn job_logs_of(&self, account: Option<&str>, job_id: &str) -> Result<String, TokenError> {
        validate_token("job id", job_id)?;
        let account = match account {
            Some(account) => {
                validate_token("account", account)?;
                account
            }
            None => "*",
        };
        Ok(self.out(&format!("u.{account}.job.log.{job_id}.*")))
    }

    /// The response of an AI job's attempt on `node_id`, streamed to the gateway that submitted
    /// it: `rhizos.out.v1.<ns>.ai.<job_id>.<node_id>` (chunks as messages; the end of the
    /// stream a request the gateway answers once it has sent its witness). Only that node may
    /// publish there, only gateways subscribe.
    pub fn ai_stream(&self, job_id: &str, node_id: &str) -> Result<String, TokenError> {
        validate_token("job id", job_id)?;
        validate_token("node id", node_id)?;
        Ok(self.out(&format!("ai.{job_id}.{node_id}")))
    }

    /// An AI job's response from whichever node serves it (the gateway keeps only the chunks
    /// of the node the job is assigned to: the node is the last token).
    pub fn ai_streams_of(&self, job_id: &str) -> Result<String, TokenError> {
        validate_token("job id", job_id)?;
        Ok(self.out(&format!("ai.{job_id}.*")))
    }

    /// The last token of a subject (the id in `...<verb>.<id>`).
    pub fn last_token(subject: &str) -> &str {
        subject.rsplit('.').next().unwrap_or(subject)
    }

    /// The caller and the orchestrator-served operation a `ctl` subject of this namespace
    /// names (`…<role>.<name>.<noun>.<verb>`). `Err` carries the `<noun>.<verb>` text of a
    /// subject with a valid caller but an operation that is not served here.
    pub fn orchestrator_call(&self, subject: &str) -> Option<Result<(Caller, CtlOp), String>> {
        let rest = self.ctl_operation(subject)?;
        let mut tokens = rest.splitn(3, '.');
        let role = Role::from_token(tokens.next()?)?;
        let caller = Caller::new(role, tokens.next()?).ok()?;
        let operation = tokens.next()?;
        Some(
            CtlOp::parse(operation)
                .filter(|op| op.server() == Server::Orchestrator)
                .map(|op| (caller, op))
                .ok_or_else(|| operation.to_owned()),
        )
    }

    /// What follows `rhizos.ctl.v1.<ns>.` in a `ctl` subject of this namespace, if it is one.
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
        assert_eq!(
            s.op(CtlOp::JobSubmit, &Caller::user("alice")).unwrap(),
            "rhizos.ctl.v1.dev.u.alice.job.submit"
        );
        assert!(s.op(CtlOp::JobSubmit, &Caller::user("a.b")).is_err());
        assert_eq!(
            s.orchestrator_call("rhizos.ctl.v1.dev.n.n1.job.report"),
            Some(Ok((Caller::node("n1"), CtlOp::JobReport)))
        );
        assert_eq!(
            s.orchestrator_call("rhizos.ctl.v1.dev.o.ops.job.nope"),
            Some(Err("job.nope".to_owned()))
        );
        assert_eq!(s.orchestrator_call("rhizos.ctl.v1.dev.x.ops.job.get"), None);
        assert_eq!(s.orchestrator_call("rhizos.ctl.v1.dev.job.get"), None);
        assert_eq!(
            s.job_assign("n1").unwrap(),
            "rhizos.ctl.v1.dev.job.assign.n1"
        );
        assert_eq!(
            s.node_heartbeat("n1").unwrap(),
            "rhizos.out.v1.dev.node.heartbeat.n1"
        );
        assert_eq!(
            s.job_event("alice", "running", "j1").unwrap(),
            "rhizos.evt.v1.dev.u.alice.job.running.j1"
        );
        assert_eq!(
            s.escrow_event("alice", EscrowEventKind::Settled, "j1")
                .unwrap(),
            "rhizos.evt.v1.dev.u.alice.escrow.settled.j1"
        );
        assert_eq!(
            s.job_log("alice", "j1", "n1").unwrap(),
            "rhizos.out.v1.dev.u.alice.job.log.j1.n1"
        );
        assert_eq!(s.events_wildcard(), "rhizos.evt.v1.dev.>");
        assert_eq!(s.event_stream(), "RHIZOS_EVT_DEV");
        assert_eq!(
            s.ctl_operation("rhizos.ctl.v1.dev.job.get"),
            Some("job.get")
        );
        assert_eq!(
            s.job_events_of(None, "j1").unwrap()[0],
            "rhizos.evt.v1.dev.u.*.job.*.j1"
        );
        assert_eq!(s.ctl_operation("rhizos.ctl.v1.other.job.get"), None);
        assert!(s.job_assign("bad.id").is_err());
    }
}
