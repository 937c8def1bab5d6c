//! The typed control client: one method per [`CtlOp`](crate::CtlOp), each filling in the schema
//! version and reading the reply type its operation answers with. The CLI, the testbed and the
//! benchmarks talk to the network through it (the gateway and the live monitor will too), so no
//! client builds a subject or a request envelope by hand.

use crate::bus::{Bus, RequestError};
use crate::wire::{
    self, AccountRef, AccountView, Ack, AssignJob, CancelJob, CreateAccount, Deposit, JobList,
    JobRef, JobReport, JobView, LedgerReport, ListJobs, ListModules, ListNodes, ListPlugins,
    ModuleList, NodeList, NodeRef, NodeView, PluginList, RegisterNode, ResolveModule,
    ResolvedModule, Statement, StatementRequest, StopJob, SubmitJob, SubmitJobReply, VerifyLedger,
    WIRE_VERSION,
};

/// A connected, typed client of one namespace. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    bus: Bus,
}

impl Client {
    pub fn new(bus: Bus) -> Self {
        Self { bus }
    }

    /// The connection underneath (subscriptions, JetStream).
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    // ----- jobs -----

    /// `job.submit`: accepts the job and holds its `max_cost` in escrow.
    pub async fn submit(&self, request: &SubmitJob) -> Result<SubmitJobReply, RequestError> {
        self.bus.call(request).await
    }

    pub async fn job_get(&self, job_id: &str) -> Result<JobView, RequestError> {
        self.bus
            .call(&JobRef {
                v: WIRE_VERSION,
                job_id: job_id.to_owned(),
            })
            .await
    }

    /// `job.list`: newest first, filtered by account and state, at most `limit` (default 50).
    /// The reply's `next` continues with [`Client::job_list_after`].
    pub async fn job_list(
        &self,
        account: Option<&str>,
        state: Option<wire::JobState>,
        limit: Option<u32>,
    ) -> Result<JobList, RequestError> {
        self.job_list_after(account, state, limit, None).await
    }

    /// `job.list` from a cursor (the previous page's `next`).
    pub async fn job_list_after(
        &self,
        account: Option<&str>,
        state: Option<wire::JobState>,
        limit: Option<u32>,
        after: Option<&str>,
    ) -> Result<JobList, RequestError> {
        self.bus
            .call(&ListJobs {
                v: WIRE_VERSION,
                account: account.map(str::to_owned),
                state,
                limit,
                after: after.map(str::to_owned),
            })
            .await
    }

    pub async fn job_cancel(&self, job_id: &str) -> Result<JobView, RequestError> {
        self.bus
            .call(&CancelJob {
                v: WIRE_VERSION,
                job_id: job_id.to_owned(),
            })
            .await
    }

    /// `job.report` (agents): progress or the result of one attempt.
    pub async fn job_report(&self, report: &JobReport) -> Result<Ack, RequestError> {
        self.bus.call(report).await
    }

    // ----- accounts and the ledger -----

    pub async fn account_create(&self, account: &str) -> Result<AccountView, RequestError> {
        self.bus
            .call(&CreateAccount {
                v: WIRE_VERSION,
                account: account.to_owned(),
            })
            .await
    }

    /// `account.deposit`: a retried deposit with the same `idempotency_key` changes nothing.
    pub async fn account_deposit(
        &self,
        account: &str,
        amount_micros: i64,
        idempotency_key: Option<&str>,
    ) -> Result<AccountView, RequestError> {
        self.bus
            .call(&Deposit {
                v: WIRE_VERSION,
                account: account.to_owned(),
                amount_micros,
                idempotency_key: idempotency_key.map(str::to_owned),
            })
            .await
    }

    /// `account.withdraw` (operator): a payout to `external`, once per `idempotency_key`.
    pub async fn account_withdraw(
        &self,
        account: &str,
        amount_micros: i64,
        idempotency_key: &str,
    ) -> Result<AccountView, RequestError> {
        self.bus
            .call(&wire::Withdraw {
                v: WIRE_VERSION,
                account: account.to_owned(),
                amount_micros,
                idempotency_key: idempotency_key.to_owned(),
            })
            .await
    }

    pub async fn account_balance(&self, account: &str) -> Result<AccountView, RequestError> {
        self.bus
            .call(&AccountRef {
                v: WIRE_VERSION,
                account: account.to_owned(),
            })
            .await
    }

    /// `account.statement`: postings newest first (default 100, at most 10 000).
    pub async fn account_statement(
        &self,
        account: &str,
        limit: Option<u32>,
    ) -> Result<Statement, RequestError> {
        self.bus
            .call(&StatementRequest {
                v: WIRE_VERSION,
                account: account.to_owned(),
                limit,
            })
            .await
    }

    pub async fn ledger_verify(&self) -> Result<LedgerReport, RequestError> {
        self.bus.call(&VerifyLedger { v: WIRE_VERSION }).await
    }

    /// `network.stats`: the whole network's figures (`None`, operator) or one account's.
    pub async fn network_stats(
        &self,
        account: Option<&str>,
    ) -> Result<wire::NetworkStatsView, RequestError> {
        self.bus
            .call(&wire::StatsRequest {
                v: WIRE_VERSION,
                account: account.map(str::to_owned),
            })
            .await
    }

    /// `receipt.get`: the orchestrator-signed receipt of an ended job (verify it with
    /// [`SignedReceipt::verify`](crate::wire::SignedReceipt::verify)).
    pub async fn receipt_get(&self, job_id: &str) -> Result<wire::SignedReceipt, RequestError> {
        self.bus
            .call(&wire::GetReceipt {
                v: WIRE_VERSION,
                job_id: job_id.to_owned(),
            })
            .await
    }

    // ----- nodes -----

    /// `node.register` (agents).
    pub async fn node_register(&self, registration: &RegisterNode) -> Result<Ack, RequestError> {
        self.bus.call(registration).await
    }

    /// Every node, page after page of `node.list` (the reply's `next` is `None`).
    pub async fn node_list(&self) -> Result<NodeList, RequestError> {
        let mut all = NodeList {
            nodes: Vec::new(),
            next: None,
        };
        let mut after = None;
        loop {
            let page = self.node_page(after.take(), None).await?;
            all.nodes.extend(page.nodes);
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(all),
            }
        }
    }

    /// One page of `node.list`: up to `limit` nodes (default 200) after the node id `after`.
    pub async fn node_page(
        &self,
        after: Option<String>,
        limit: Option<u32>,
    ) -> Result<NodeList, RequestError> {
        self.bus
            .call(&ListNodes {
                v: WIRE_VERSION,
                limit,
                after,
            })
            .await
    }

    pub async fn node_info(&self, node_id: &str) -> Result<NodeView, RequestError> {
        self.bus
            .call(&NodeRef {
                v: WIRE_VERSION,
                node_id: node_id.to_owned(),
            })
            .await
    }

    /// `key.create` (the account's user, or the operator): a new gateway API key; the reply's
    /// `key` is the only time it is shown. `request.v` is set here.
    pub async fn key_create(
        &self,
        mut request: wire::CreateKey,
    ) -> Result<wire::CreatedKey, RequestError> {
        request.v = WIRE_VERSION;
        self.bus.call(&request).await
    }

    /// `key.list`: the account's keys, newest first (never the keys themselves).
    pub async fn key_list(&self, account: &str) -> Result<wire::KeyList, RequestError> {
        self.bus
            .call(&wire::ListKeys {
                v: WIRE_VERSION,
                account: account.to_owned(),
            })
            .await
    }

    /// `key.authenticate` (a gateway): the view of the key a client presented, if it works.
    pub async fn key_authenticate(&self, key: &str) -> Result<wire::KeyView, RequestError> {
        self.bus
            .call(&wire::AuthenticateKey {
                v: WIRE_VERSION,
                key_sha256: crate::blobs::sha256_hex(key.as_bytes()),
            })
            .await
    }

    /// `model.list`: the models online nodes serve now, with their prices.
    pub async fn model_list(&self) -> Result<wire::ModelList, RequestError> {
        self.bus.call(&wire::ListModels { v: WIRE_VERSION }).await
    }

    /// `job.witness` (a gateway): what it delivered of an AI job's attempt.
    pub async fn job_witness(
        &self,
        job_id: &str,
        node_id: &str,
        attempt: u32,
        input_units: Option<u64>,
        output_units: u64,
    ) -> Result<wire::Ack, RequestError> {
        self.bus
            .call(&wire::WitnessUsage {
                v: WIRE_VERSION,
                job_id: job_id.into(),
                node_id: node_id.into(),
                attempt,
                input_units,
                output_units,
            })
            .await
    }

    /// `key.revoke`: the key stops working at once (idempotent).
    pub async fn key_revoke(&self, key_id: &str) -> Result<wire::KeyView, RequestError> {
        self.bus
            .call(&wire::RevokeKey {
                v: WIRE_VERSION,
                key_id: key_id.to_owned(),
            })
            .await
    }

    /// `node.enroll` (operator): fixes the node's id and provider account.
    pub async fn node_enroll(
        &self,
        node_id: &str,
        provider_account: &str,
        public_key: Option<&str>,
    ) -> Result<wire::Enrolment, RequestError> {
        self.bus
            .call(&wire::EnrollNode {
                v: WIRE_VERSION,
                node_id: node_id.to_owned(),
                provider_account: provider_account.to_owned(),
                public_key: public_key.map(str::to_owned),
            })
            .await
    }

    /// `node.remove` (operator): the node's registrations are refused from then on.
    pub async fn node_remove(&self, node_id: &str) -> Result<wire::Enrolment, RequestError> {
        self.bus
            .call(&wire::RemoveNode {
                v: WIRE_VERSION,
                node_id: node_id.to_owned(),
            })
            .await
    }

    // ----- modules -----

    pub async fn module_resolve(&self, uri: &str) -> Result<ResolvedModule, RequestError> {
        self.bus
            .call(&ResolveModule {
                v: WIRE_VERSION,
                uri: uri.to_owned(),
            })
            .await
    }

    /// What each step of `flow` would cost on the nodes online now.
    pub async fn flow_estimate(
        &self,
        flow: crate::wire::FlowSpec,
    ) -> Result<crate::wire::FlowEstimate, RequestError> {
        self.bus
            .call(&crate::wire::EstimateFlow {
                v: WIRE_VERSION,
                flow,
            })
            .await
    }

    /// Starts `flow` paid from `account`: its `max_cost_micros` held in one escrow. With
    /// `flow_id`, sending it again starts it once.
    pub async fn flow_run(
        &self,
        flow_id: Option<&str>,
        account: &str,
        flow: crate::wire::FlowSpec,
    ) -> Result<crate::wire::FlowView, RequestError> {
        self.bus
            .call(&crate::wire::RunFlow {
                v: WIRE_VERSION,
                flow_id: flow_id.map(str::to_owned),
                account: account.to_owned(),
                flow,
            })
            .await
    }

    pub async fn flow_get(&self, flow_id: &str) -> Result<crate::wire::FlowView, RequestError> {
        self.bus
            .call(&crate::wire::FlowRef {
                v: WIRE_VERSION,
                flow_id: flow_id.to_owned(),
            })
            .await
    }

    /// The caller's flows, newest first (an operator: `account`'s, or all with `None`).
    pub async fn flow_list(
        &self,
        account: Option<&str>,
        limit: Option<u32>,
    ) -> Result<crate::wire::FlowList, RequestError> {
        self.bus
            .call(&crate::wire::ListFlows {
                v: WIRE_VERSION,
                account: account.map(str::to_owned),
                limit,
            })
            .await
    }

    /// Stops a flow: its running steps are cancelled, the rest never start, and what its
    /// escrow has left goes back once they have stopped.
    pub async fn flow_cancel(&self, flow_id: &str) -> Result<crate::wire::FlowView, RequestError> {
        self.bus
            .call(&crate::wire::CancelFlow {
                v: WIRE_VERSION,
                flow_id: flow_id.to_owned(),
            })
            .await
    }

    pub async fn module_list(&self) -> Result<ModuleList, RequestError> {
        self.bus.call(&ListModules { v: WIRE_VERSION }).await
    }

    // ----- one node's agent -----

    /// `job.assign.<node>` (the orchestrator).
    pub async fn job_assign(&self, node_id: &str, assign: &AssignJob) -> Result<Ack, RequestError> {
        self.bus.call_node(node_id, assign).await
    }

    /// `job.stop.<node>` (the orchestrator).
    pub async fn job_stop(
        &self,
        node_id: &str,
        job_id: &str,
        attempt: u32,
    ) -> Result<Ack, RequestError> {
        self.bus
            .call_node(
                node_id,
                &StopJob {
                    v: WIRE_VERSION,
                    job_id: job_id.to_owned(),
                    attempt,
                },
            )
            .await
    }

    /// `node.plugins.<node>`: what that agent has loaded and refused, live.
    pub async fn node_plugins(&self, node_id: &str) -> Result<PluginList, RequestError> {
        self.bus
            .call_node(node_id, &ListPlugins { v: WIRE_VERSION })
            .await
    }
}
