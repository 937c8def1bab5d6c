//! The AI gateway's own requests: `model.list` (what live nodes serve now, from the registry)
//! and `job.witness` (what the gateway delivered of an attempt, which bounds its bill).

use super::super::Orchestrator;
use super::super::store::ending::Witnessed;
use super::super::validate::token;
use rhizos_broker::validate_token;
use rhizos_broker::wire::{Ack, ListModels, ModelList, WireError, WitnessUsage};

impl Orchestrator {
    pub(in crate::orchestrator) async fn model_list(
        &self,
        _request: ListModels,
    ) -> Result<ModelList, WireError> {
        Ok(ModelList {
            models: self.registry().models(),
        })
    }

    pub(in crate::orchestrator) async fn job_witness(
        &self,
        request: WitnessUsage,
    ) -> Result<Ack, WireError> {
        token(validate_token("job id", &request.job_id))?;
        token(validate_token("node id", &request.node_id))?;
        let witnessed = Witnessed {
            input_units: request.input_units,
            output_units: request.output_units,
        };
        let (job_id, node_id, attempt) = (request.job_id, request.node_id, request.attempt);
        let recorded = self
            .db(move |store| store.witness(&job_id, &node_id, attempt, witnessed))
            .await?;
        Ok(Ack {
            accepted: recorded,
            note: (!recorded).then(|| {
                "not recorded: the job is not metered, the attempt is not its current one on that node, it has ended, or it was witnessed already".to_owned()
            }),
        })
    }
}
