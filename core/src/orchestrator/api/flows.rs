//! `flow.*` requests: flows checked, their modules resolved and their steps priced on the nodes
//! online now (`flow.estimate`); started with their budget held in one escrow (`flow.run`),
//! looked at, listed and cancelled. What moves a flow on is `Store::advance_flow`, run by
//! [`Orchestrator::flows_loop`] and after each request that changes one.

use super::super::{Orchestrator, modules, validate};
use super::own_account;
use rhizos_broker::subjects::validate_token;
use rhizos_broker::wire::{
    CancelFlow, ErrorCode, EstimateFlow, FlowEstimate, FlowList, FlowRef, FlowSpec, FlowView,
    ListFlows, RunFlow, StepEstimate, WireError, Workload,
};
use rhizos_broker::{Caller, Role};
use std::time::Duration;

/// Longest flow id a client may choose (a step's job id is `<flow id>-<step>-<run>`, at most
/// 64 characters).
const MAX_FLOW_ID: usize = 40;

/// How often open flows are looked at (a step starts at most this long after its inputs
/// are ready).
const FLOW_TICK: Duration = Duration::from_millis(200);

/// Largest output stored out of band that a flow's condition reads (the orchestrator holds it
/// in memory to evaluate the JSON pointer).
pub const MAX_CONDITION_BYTES: u64 = 1 << 20;

impl Orchestrator {
    /// `flow` with every step's module resolved and the spec materialized, each step checked
    /// as a submit would be (errors name the step and field).
    async fn resolve_flow(&self, flow: &FlowSpec) -> Result<FlowSpec, WireError> {
        let mut resolved = flow.clone();
        for (index, step) in resolved.steps.iter_mut().enumerate() {
            let in_step = |e: WireError| {
                WireError::new(
                    e.code,
                    format!("step {:?}, steps[{index}].spec: {}", step.name, e.message),
                )
            };
            if let Workload::Module { uri } = &step.spec.workload {
                let module = self.resolve_module(uri).await.map_err(in_step)?;
                step.spec = modules::materialize(&module.manifest, &step.spec).map_err(in_step)?;
            }
            validate::validate_spec(&step.spec).map_err(in_step)?;
        }
        Ok(resolved)
    }

    pub(in crate::orchestrator) async fn flow_run(
        &self,
        caller: Caller,
        request: RunFlow,
    ) -> Result<FlowView, WireError> {
        own_account(&caller, &request.account)?;
        let flow_id = match request.flow_id.clone() {
            Some(id) => id,
            None => format!("flow-{}", &uuid::Uuid::now_v7().simple().to_string()[..20]),
        };
        if validate_token("flow id", &flow_id).is_err() || flow_id.len() > MAX_FLOW_ID {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!("flow_id: {flow_id:?} is not a flow id ([a-z0-9_-], 1 to {MAX_FLOW_ID})"),
            ));
        }
        request
            .flow
            .plan()
            .map_err(|e| WireError::new(ErrorCode::BadRequest, e.to_string()))?;
        let flow = self.resolve_flow(&request.flow).await?;
        // Refuse at once a step no known node could ever run.
        for (index, step) in flow.steps.iter().enumerate() {
            let cap = step.max_cost_micros.unwrap_or(flow.max_cost_micros);
            self.registry().feasibility(&step.spec, cap).map_err(|e| {
                WireError::new(
                    e.code,
                    format!("step {:?}, steps[{index}]: {}", step.name, e.message),
                )
            })?;
        }
        let (id, account) = (flow_id.clone(), request.account.clone());
        let (view, created) = self
            .db(move |store| store.start_flow(&id, &account, &flow))
            .await?;
        if created {
            tracing::info!(flow_id = %view.flow_id, account = %view.account, steps = view.steps.len(), max_cost_micros = view.max_cost_micros, "flow started");
        }
        self.advance_flow(&flow_id).await;
        self.db(move |store| store.flow(&flow_id)).await
    }

    pub(in crate::orchestrator) async fn flow_get(
        &self,
        caller: Caller,
        request: FlowRef,
    ) -> Result<FlowView, WireError> {
        let flow = self.own_flow(&caller, request.flow_id).await?;
        Ok(flow)
    }

    pub(in crate::orchestrator) async fn flow_list(
        &self,
        caller: Caller,
        mut request: ListFlows,
    ) -> Result<FlowList, WireError> {
        if let Some(account) = &request.account {
            own_account(&caller, account)?;
        }
        if caller.role == Role::User {
            request.account = Some(caller.name);
        }
        let limit = request.limit.unwrap_or(50).clamp(1, 500);
        let flows = self
            .read(move |store| store.list_flows(request.account.as_deref(), limit))
            .await?;
        Ok(FlowList { flows })
    }

    pub(in crate::orchestrator) async fn flow_cancel(
        &self,
        caller: Caller,
        request: CancelFlow,
    ) -> Result<FlowView, WireError> {
        let flow = self.own_flow(&caller, request.flow_id).await?;
        let id = flow.flow_id.clone();
        self.db(move |store| store.cancel_flow(&id)).await?;
        self.advance_flow(&flow.flow_id).await;
        let id = flow.flow_id;
        self.db(move |store| store.flow(&id)).await
    }

    /// The flow `flow_id` if `caller` may see it (a user its own: another's is not found).
    async fn own_flow(&self, caller: &Caller, flow_id: String) -> Result<FlowView, WireError> {
        if validate_token("flow id", &flow_id).is_err() {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!("flow_id: {flow_id:?} is not a flow id"),
            ));
        }
        let not_found = || {
            WireError::new(
                ErrorCode::NotFound,
                format!("no flow {flow_id} in account {}", caller.name),
            )
        };
        let id = flow_id.clone();
        let flow = self.db(move |store| store.flow(&id)).await.map_err(|e| {
            if e.code == ErrorCode::NotFound {
                not_found()
            } else {
                e
            }
        })?;
        if super::acts_for(caller, &flow.account) {
            Ok(flow)
        } else {
            Err(not_found())
        }
    }

    /// Moves one flow on (`Store::advance_flow`) and does what that asks: stop cancelled steps'
    /// executions on their nodes, dispatch submitted steps, publish events.
    pub(in crate::orchestrator) async fn advance_flow(&self, flow_id: &str) -> Option<u64> {
        let documents = self.condition_documents(flow_id).await;
        let id = flow_id.to_owned();
        let advance = match self
            .db(move |store| store.advance_flow_reading(&id, crate::now_ms(), &documents))
            .await
        {
            Ok(advance) => advance,
            Err(e) => {
                tracing::warn!(flow_id, error = %e.message, "the flow could not move on; trying again");
                return None;
            }
        };
        self.inner.outbox_wake.notify_one();
        if !advance.submitted.is_empty() {
            tracing::info!(flow_id, jobs = ?advance.submitted, "flow steps submitted");
            self.inner.dispatch_wake.notify_one();
        }
        for (node, job_id, attempt) in &advance.stops {
            self.send_stop(node, job_id, *attempt).await;
        }
        if let Some(state) = advance.ended {
            tracing::info!(flow_id, state = state.as_str(), "flow ended");
        }
        advance.wake_at_ms
    }

    /// The JSON documents the flow's conditions must read from outputs stored out of band
    /// (`Store::condition_blobs`), fetched from the blob stream (digest checked), at most
    /// [`MAX_CONDITION_BYTES`] each; a file too large, unreadable or not JSON is noted why.
    async fn condition_documents(
        &self,
        flow_id: &str,
    ) -> crate::orchestrator::store::flows::ConditionDocuments {
        let id = flow_id.to_owned();
        let blobs = match self.read(move |store| store.condition_blobs(&id)).await {
            Ok(blobs) => blobs,
            Err(e) => {
                tracing::warn!(flow_id, error = %e.message, "cannot list the outputs the flow's conditions read");
                return Default::default();
            }
        };
        let mut documents = crate::orchestrator::store::flows::ConditionDocuments::new();
        for wanted in blobs {
            let path = format!("/output/{}", wanted.file);
            let document = if wanted.blob.size > MAX_CONDITION_BYTES {
                Err(format!(
                    "{path} is {} bytes; a condition reads at most {MAX_CONDITION_BYTES}",
                    wanted.blob.size
                ))
            } else {
                let blob = rhizos_broker::wire::BlobRef {
                    sha256: wanted.blob.sha256.clone(),
                    size: wanted.blob.size,
                };
                let mut bytes = Vec::new();
                match self
                    .inner
                    .bus
                    .get_blob(
                        &wanted.account,
                        &wanted.blob.from_node,
                        &path,
                        &blob,
                        &mut bytes,
                    )
                    .await
                {
                    Ok(()) => serde_json::from_slice(&bytes)
                        .map_err(|e| format!("{path} is not JSON: {e}")),
                    Err(e) => Err(format!("{path} could not be read: {e}")),
                }
            };
            documents.insert((wanted.job_id, wanted.file), document);
        }
        documents
    }

    /// While active: every [`FLOW_TICK`], the open flows with something to do (a step's job
    /// that ended, a backoff or the flow's deadline that passed: `Store::flows_due`) are moved
    /// on. Flows are in the database, so after a restart or a failover the new active goes on
    /// with them.
    pub(in crate::orchestrator) async fn flows_loop(self) {
        loop {
            tokio::time::sleep(FLOW_TICK).await;
            let now = crate::now_ms();
            let open = match self.read(move |store| store.flows_due(now)).await {
                Ok(open) => open,
                Err(e) => {
                    tracing::warn!(error = %e.message, "cannot list open flows");
                    continue;
                }
            };
            for flow_id in open {
                self.advance_flow(&flow_id).await;
            }
        }
    }

    pub(in crate::orchestrator) async fn flow_estimate(
        &self,
        request: EstimateFlow,
    ) -> Result<FlowEstimate, WireError> {
        let flow = request.flow;
        let plan = flow
            .plan()
            .map_err(|e| WireError::new(ErrorCode::BadRequest, e.to_string()))?;
        let mut steps = Vec::with_capacity(flow.steps.len());
        for (index, step) in flow.steps.iter().enumerate() {
            let in_step = |e: WireError| {
                WireError::new(
                    e.code,
                    format!("step {:?}, steps[{index}].spec: {}", step.name, e.message),
                )
            };
            let mut spec = step.spec.clone();
            let module = match &spec.workload {
                Workload::Module { uri } => Some(uri.clone()),
                _ => None,
            };
            if let Some(uri) = &module {
                let resolved = self.resolve_module(uri).await.map_err(in_step)?;
                spec = modules::materialize(&resolved.manifest, &spec).map_err(in_step)?;
            }
            validate::validate_spec(&spec).map_err(in_step)?;
            let cap = step.max_cost_micros.unwrap_or(flow.max_cost_micros);
            let range = self.registry().estimate_range(&spec, cap);
            let problem = match range {
                Some(_) => None,
                None => Some(self.registry().feasibility(&spec, cap).err().map_or_else(
                    || "no live node has room for it within its cost cap".to_owned(),
                    |e| e.message,
                )),
            };
            let (nodes, cheapest_micros, dearest_micros) = range.unwrap_or((0, 0, 0));
            steps.push(StepEstimate {
                step: step.name.clone(),
                backend: spec.workload.backend().to_owned(),
                module,
                nodes,
                cheapest_micros,
                dearest_micros,
                runs: step.retries.saturating_add(1),
                problem,
            });
        }
        let cheapest_micros = steps
            .iter()
            .fold(0i64, |sum, s| sum.saturating_add(s.cheapest_micros));
        let worst_case_micros = steps.iter().fold(0i64, |sum, s| {
            sum.saturating_add(s.dearest_micros.saturating_mul(i64::from(s.runs)))
        });
        let fits =
            worst_case_micros <= flow.max_cost_micros && steps.iter().all(|s| s.problem.is_none());
        Ok(FlowEstimate {
            flow: flow.name.clone(),
            stages: plan.stages,
            steps,
            cheapest_micros,
            worst_case_micros,
            max_cost_micros: flow.max_cost_micros,
            fits,
        })
    }
}
