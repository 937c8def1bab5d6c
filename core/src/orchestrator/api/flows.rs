//! `flow.*` requests: flows checked, their modules resolved and their steps priced on the nodes
//! online now (issue 19: running flows comes next).

use super::super::{Orchestrator, modules, validate};
use rhizos_broker::wire::{
    ErrorCode, EstimateFlow, FlowEstimate, StepEstimate, WireError, Workload,
};

impl Orchestrator {
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
