//! The one table of control operations: every request/reply subject of the v1 scheme, who serves
//! it, and — through [`Request`] — which message goes there and which reply comes back.
//!
//! [`CtlOp`] is the only list of request subjects. Subject builders ([`crate::Subjects`]), the
//! orchestrator's dispatch (an exhaustive `match` on [`CtlOp`]), the typed [`crate::Client`] and
//! the README's subject table (checked by a test) all follow it, so a new operation does not
//! compile until every one of them handles it.

use crate::identity::{Caller, Role};
use crate::wire;
use serde::{Serialize, de::DeserializeOwned};

/// Who answers an operation's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// The orchestrator (queue group `orchestrator`): `rhizos.ctl.v1.<ns>.<noun>.<verb>`.
    Orchestrator,
    /// One node's agent: `rhizos.ctl.v1.<ns>.<noun>.<verb>.<node_id>`.
    Agent,
}

/// A request/reply operation: the `<noun>.<verb>` of a `ctl` subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CtlOp {
    JobSubmit,
    JobGet,
    JobList,
    JobCancel,
    /// Agents report progress and results of their executions.
    JobReport,
    AccountCreate,
    AccountDeposit,
    /// A payout: money out of an account to `external` (operator).
    AccountWithdraw,
    AccountBalance,
    AccountStatement,
    /// A new API key of the AI gateway for an account (shown once; only its hash is kept).
    KeyCreate,
    /// An account's API keys (never the keys themselves).
    KeyList,
    /// Revoke an API key: it stops working at once.
    KeyRevoke,
    /// The gateway checks a client's API key, by its SHA-256.
    KeyAuthenticate,
    /// The gateway's witness of what it delivered of an AI job's attempt.
    JobWitness,
    /// The models online nodes serve now, with their prices.
    ModelList,
    NodeRegister,
    NodeList,
    NodeInfo,
    /// The operator fixes a node's id and provider account (and its nkey in the server's users).
    NodeEnroll,
    /// The operator revokes a node: its registrations are refused from then on.
    NodeRemove,
    LedgerVerify,
    /// Network (or one account's) figures in one reply: nodes, jobs by state, money, AI usage.
    NetworkStats,
    /// Resolve a `chain://` module through the orchestrator's resolver chain.
    ModuleResolve,
    /// Every module the orchestrator's resolvers can enumerate.
    ModuleList,
    /// What each step of a flow would cost on the nodes online now.
    FlowEstimate,
    /// Start a flow: its budget held in one escrow, its steps run as their inputs are ready.
    FlowRun,
    FlowGet,
    FlowList,
    FlowCancel,
    /// The signed receipt of an ended job.
    ReceiptGet,
    /// Orchestrator → agent: run this job attempt.
    JobAssign,
    /// Orchestrator → agent: stop this job attempt.
    JobStop,
    /// Anyone → agent: the plugins the node has loaded and refused, live.
    NodePlugins,
    /// Orchestrator → agent: register again (the orchestrator holds no registration of it).
    NodeReregister,
}

impl CtlOp {
    /// Every operation, in the order of the README's subject table.
    pub const ALL: [CtlOp; 35] = [
        Self::JobSubmit,
        Self::JobGet,
        Self::ModuleResolve,
        Self::ModuleList,
        Self::FlowEstimate,
        Self::FlowRun,
        Self::FlowGet,
        Self::FlowList,
        Self::FlowCancel,
        Self::JobList,
        Self::JobCancel,
        Self::AccountCreate,
        Self::AccountBalance,
        Self::AccountDeposit,
        Self::AccountWithdraw,
        Self::AccountStatement,
        Self::KeyCreate,
        Self::KeyList,
        Self::KeyRevoke,
        Self::KeyAuthenticate,
        Self::ModelList,
        Self::JobWitness,
        Self::NodeList,
        Self::NodeInfo,
        Self::NodeEnroll,
        Self::NodeRemove,
        Self::LedgerVerify,
        Self::NetworkStats,
        Self::ReceiptGet,
        Self::NodeRegister,
        Self::JobReport,
        Self::JobAssign,
        Self::JobStop,
        Self::NodePlugins,
        Self::NodeReregister,
    ];

    /// The `<noun>.<verb>` subject tokens.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::JobSubmit => "job.submit",
            Self::JobGet => "job.get",
            Self::JobList => "job.list",
            Self::JobCancel => "job.cancel",
            Self::JobReport => "job.report",
            Self::AccountCreate => "account.create",
            Self::AccountDeposit => "account.deposit",
            Self::AccountWithdraw => "account.withdraw",
            Self::AccountBalance => "account.balance",
            Self::AccountStatement => "account.statement",
            Self::KeyCreate => "key.create",
            Self::KeyList => "key.list",
            Self::KeyRevoke => "key.revoke",
            Self::KeyAuthenticate => "key.authenticate",
            Self::JobWitness => "job.witness",
            Self::ModelList => "model.list",
            Self::NodeRegister => "node.register",
            Self::NodeList => "node.list",
            Self::NodeInfo => "node.info",
            Self::NodeEnroll => "node.enroll",
            Self::NodeRemove => "node.remove",
            Self::LedgerVerify => "ledger.verify",
            Self::NetworkStats => "network.stats",
            Self::ModuleResolve => "module.resolve",
            Self::ModuleList => "module.list",
            Self::FlowEstimate => "flow.estimate",
            Self::FlowRun => "flow.run",
            Self::FlowGet => "flow.get",
            Self::FlowList => "flow.list",
            Self::FlowCancel => "flow.cancel",
            Self::ReceiptGet => "receipt.get",
            Self::JobAssign => "job.assign",
            Self::JobStop => "job.stop",
            Self::NodePlugins => "node.plugins",
            Self::NodeReregister => "node.reregister",
        }
    }

    /// The operation whose [`CtlOp::as_str`] is `text`.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|op| op.as_str() == text)
    }

    pub const fn server(self) -> Server {
        match self {
            Self::JobAssign | Self::JobStop | Self::NodePlugins | Self::NodeReregister => {
                Server::Agent
            }
            _ => Server::Orchestrator,
        }
    }

    /// The roles that may call the operation. `nats-server` enforces it (each party may publish
    /// only subjects with its own identity token, and only these operations'), and the
    /// orchestrator checks it again for every request.
    pub const fn callers(self) -> &'static [Role] {
        use Role::{Gateway, Node, Operator, Orchestrator, User};
        match self {
            Self::JobSubmit => &[User, Gateway],
            // A gateway: only the jobs it charged to an API key.
            Self::JobGet | Self::JobCancel | Self::ReceiptGet => &[User, Gateway, Operator],
            Self::JobList
            | Self::AccountBalance
            | Self::AccountStatement
            | Self::NodeList
            | Self::NodeInfo
            | Self::ModuleResolve
            | Self::ModuleList
            | Self::FlowEstimate
            | Self::FlowRun
            | Self::FlowGet
            | Self::FlowList
            | Self::FlowCancel
            | Self::KeyCreate
            | Self::KeyList
            | Self::KeyRevoke
            | Self::NetworkStats => &[User, Operator],
            Self::JobReport | Self::NodeRegister => &[Node],
            Self::AccountCreate
            | Self::AccountDeposit
            | Self::AccountWithdraw
            | Self::NodeEnroll
            | Self::NodeRemove
            | Self::LedgerVerify => &[Operator],
            Self::JobAssign | Self::JobStop | Self::NodeReregister => &[Orchestrator],
            Self::KeyAuthenticate | Self::JobWitness => &[Gateway, Operator],
            Self::ModelList => &[User, Gateway, Operator],
            Self::NodePlugins => &[User, Operator, Orchestrator],
        }
    }

    pub fn allows(self, role: Role) -> bool {
        self.callers().contains(&role)
    }
}

impl std::fmt::Display for CtlOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request message: the operation it is sent to and the reply it gets. Sending through
/// [`crate::Bus::call`] (or the [`crate::Client`]) ties the three together, so a request cannot go
/// to another subject or be read back as another reply.
pub trait Request: Serialize + DeserializeOwned + Send + Sync {
    const OP: CtlOp;
    type Reply: Serialize + DeserializeOwned + Send;

    /// The identity a client without credentials puts in the subject: the party the request
    /// speaks for (the account of a submit, the node of a report), else the operator. Only a
    /// server without authentication lets such a claim through; with authentication every
    /// client has its own identity from its credentials and the server refuses any other.
    fn claim(&self) -> Caller {
        Caller::operator("operator")
    }

    /// Whether sending this request again cannot do twice what it does once — a read, or a
    /// write that carries its own id or idempotency key. [`crate::Bus::call`] resends such a
    /// request when the orchestrator answers [`crate::wire::ErrorCode::Unavailable`] (a
    /// failover), as it resends any request nobody received.
    fn resendable(&self) -> bool {
        false
    }
}

macro_rules! requests {
    ($($request:ty => $op:ident -> $reply:ty
        $(, claims |$r:ident| $claim:expr)?
        $(, resendable |$s:ident| $resendable:expr)?;)*) => {
        $(impl Request for $request {
            const OP: CtlOp = CtlOp::$op;
            type Reply = $reply;
            $(fn claim(&self) -> Caller {
                let $r = self;
                $claim
            })?
            $(fn resendable(&self) -> bool {
                let $s = self;
                $resendable
            })?
        })*
    };
}

requests! {
    // An inference job is a gateway's (it submits for its clients' keys); anything else the
    // account's own.
    wire::SubmitJob => JobSubmit -> wire::SubmitJobReply, claims |r| match r.spec.workload {
        wire::Workload::Inference { .. } => Caller::gateway("gateway"),
        _ => Caller::user(&r.account),
    }, resendable |r| r.job_id.is_some();
    wire::JobRef => JobGet -> wire::JobView, resendable |_r| true;
    wire::ListJobs => JobList -> wire::JobList,
        claims |r| r.account.as_deref().map_or_else(|| Caller::operator("operator"), Caller::user),
        resendable |_r| true;
    wire::CancelJob => JobCancel -> wire::JobView;
    wire::JobReport => JobReport -> wire::Ack, claims |r| Caller::node(&r.node_id);
    wire::CreateAccount => AccountCreate -> wire::AccountView;
    wire::Deposit => AccountDeposit -> wire::AccountView,
        resendable |r| r.idempotency_key.is_some();
    wire::Withdraw => AccountWithdraw -> wire::AccountView, resendable |_r| true;
    wire::AccountRef => AccountBalance -> wire::AccountView, claims |r| Caller::user(&r.account),
        resendable |_r| true;
    wire::StatementRequest => AccountStatement -> wire::Statement,
        claims |r| Caller::user(&r.account), resendable |_r| true;
    wire::CreateKey => KeyCreate -> wire::CreatedKey, claims |r| Caller::user(&r.account);
    wire::ListKeys => KeyList -> wire::KeyList, claims |r| Caller::user(&r.account),
        resendable |_r| true;
    wire::RevokeKey => KeyRevoke -> wire::KeyView;
    wire::AuthenticateKey => KeyAuthenticate -> wire::KeyView, resendable |_r| true;
    wire::WitnessUsage => JobWitness -> wire::Ack;
    wire::ListModels => ModelList -> wire::ModelList, resendable |_r| true;
    // A registration replaces the node's previous one: sending it twice is sending it once.
    wire::RegisterNode => NodeRegister -> wire::Ack, claims |r| Caller::node(&r.node_id),
        resendable |_r| true;
    wire::ListNodes => NodeList -> wire::NodeList, resendable |_r| true;
    wire::NodeRef => NodeInfo -> wire::NodeView, resendable |_r| true;
    wire::EnrollNode => NodeEnroll -> wire::Enrolment;
    wire::RemoveNode => NodeRemove -> wire::Enrolment;
    wire::VerifyLedger => LedgerVerify -> wire::LedgerReport, resendable |_r| true;
    wire::StatsRequest => NetworkStats -> wire::NetworkStatsView, claims |r| match &r.account {
        Some(account) => Caller::user(account),
        None => Caller::operator("operator"),
    }, resendable |_r| true;
    wire::ResolveModule => ModuleResolve -> wire::ResolvedModule, resendable |_r| true;
    wire::ListModules => ModuleList -> wire::ModuleList, resendable |_r| true;
    wire::EstimateFlow => FlowEstimate -> wire::FlowEstimate, resendable |_r| true;
    wire::RunFlow => FlowRun -> wire::FlowView, claims |r| Caller::user(&r.account),
        resendable |r| r.flow_id.is_some();
    wire::FlowRef => FlowGet -> wire::FlowView, resendable |_r| true;
    wire::ListFlows => FlowList -> wire::FlowList,
        claims |r| r.account.as_deref().map_or_else(|| Caller::operator("operator"), Caller::user),
        resendable |_r| true;
    wire::CancelFlow => FlowCancel -> wire::FlowView, resendable |_r| true;
    wire::GetReceipt => ReceiptGet -> wire::SignedReceipt, resendable |_r| true;
    wire::AssignJob => JobAssign -> wire::Ack;
    wire::StopJob => JobStop -> wire::Ack;
    wire::ListPlugins => NodePlugins -> wire::PluginList;
    wire::RegisterAgain => NodeReregister -> wire::Ack;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_parses_back_and_is_listed_once() {
        let mut seen = std::collections::HashSet::new();
        for op in CtlOp::ALL {
            assert_eq!(CtlOp::parse(op.as_str()), Some(op));
            assert!(seen.insert(op.as_str()), "{op} listed twice");
            let tokens: Vec<&str> = op.as_str().split('.').collect();
            assert_eq!(tokens.len(), 2, "{op} is not <noun>.<verb>");
        }
        assert_eq!(CtlOp::parse("job.nope"), None);
        assert_eq!(CtlOp::parse("job.submit.x"), None);
    }

    /// Every operation has its own request type (`node.list` was once decoded as the
    /// `ledger.verify` request), and no request type serves two operations.
    #[test]
    fn each_operation_has_its_own_request_type() {
        let ops = [
            <wire::SubmitJob as Request>::OP,
            <wire::JobRef as Request>::OP,
            <wire::ListJobs as Request>::OP,
            <wire::CancelJob as Request>::OP,
            <wire::JobReport as Request>::OP,
            <wire::CreateAccount as Request>::OP,
            <wire::Deposit as Request>::OP,
            <wire::Withdraw as Request>::OP,
            <wire::AccountRef as Request>::OP,
            <wire::StatementRequest as Request>::OP,
            <wire::CreateKey as Request>::OP,
            <wire::ListKeys as Request>::OP,
            <wire::RevokeKey as Request>::OP,
            <wire::AuthenticateKey as Request>::OP,
            <wire::WitnessUsage as Request>::OP,
            <wire::ListModels as Request>::OP,
            <wire::RegisterNode as Request>::OP,
            <wire::ListNodes as Request>::OP,
            <wire::NodeRef as Request>::OP,
            <wire::EnrollNode as Request>::OP,
            <wire::RemoveNode as Request>::OP,
            <wire::VerifyLedger as Request>::OP,
            <wire::StatsRequest as Request>::OP,
            <wire::ResolveModule as Request>::OP,
            <wire::ListModules as Request>::OP,
            <wire::EstimateFlow as Request>::OP,
            <wire::RunFlow as Request>::OP,
            <wire::FlowRef as Request>::OP,
            <wire::ListFlows as Request>::OP,
            <wire::CancelFlow as Request>::OP,
            <wire::GetReceipt as Request>::OP,
            <wire::AssignJob as Request>::OP,
            <wire::StopJob as Request>::OP,
            <wire::ListPlugins as Request>::OP,
            <wire::RegisterAgain as Request>::OP,
        ];
        for op in CtlOp::ALL {
            assert_eq!(
                ops.iter().filter(|o| **o == op).count(),
                1,
                "{op} must have exactly one request type"
            );
        }
        assert_eq!(<wire::ListNodes as Request>::OP, CtlOp::NodeList);
        assert_eq!(<wire::VerifyLedger as Request>::OP, CtlOp::LedgerVerify);
    }

    /// The README's subject table is the public API: every operation has its own row there.
    #[test]
    fn every_operation_is_in_the_readme_subject_table() {
        let readme = include_str!("../../README.md");
        let table: Vec<&str> = readme
            .lines()
            .skip_while(|line| !line.starts_with("## Subjects"))
            .take_while(|line| !line.starts_with("## Configuration"))
            .filter(|line| line.starts_with("| `rhizos.ctl.v1."))
            .collect();
        for op in CtlOp::ALL {
            let subject = match op.server() {
                Server::Orchestrator => format!("`rhizos.ctl.v1.<ns>.<role>.<name>.{op}`"),
                Server::Agent => format!("`rhizos.ctl.v1.<ns>.{op}.<node_id>`"),
            };
            assert!(
                table
                    .iter()
                    .any(|row| row.starts_with(&format!("| {subject} |"))),
                "the README subject table has no row for {subject}"
            );
        }
        assert_eq!(
            table.len(),
            CtlOp::ALL.len(),
            "the README lists ctl subjects that are not operations: {table:#?}"
        );
    }
}
