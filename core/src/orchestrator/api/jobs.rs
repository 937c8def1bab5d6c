//! `job.*` requests: submit (validate, resolve a module, hold, and place at once when nobody is
//! queued ahead), get, list, cancel, and the agents' reports.

use super::super::Orchestrator;
use super::super::modules;
use super::super::store::{JobRecord, ReportEffect, StoreError};
use super::super::validate::{token, validate_submit};
use rhizos_broker::validate_token;
use rhizos_broker::wire::{
    self, Ack, CancelJob, JobList, JobRef, JobReport, JobState, ListJobs, ReportPhase, SubmitJob,
    SubmitJobReply, WireError, Workload,
};

impl Orchestrator {
    pub(in crate::orchestrator) async fn submit(
        &self,
        mut request: SubmitJob,
    ) -> Result<SubmitJobReply, WireError> {
        if let Workload::Module { uri } = &request.spec.workload {
            let resolved = self.resolve_module(uri).await?;
            request.spec = modules::materialize(&resolved.manifest, &request.spec)?;
        }
        let job_id = match request.job_id.clone() {
            Some(id) => id,
            None => format!("job-{}", uuid::Uuid::now_v7().simple()),
        };
        validate_submit(&request, &job_id)?;
        // Refuse at once what no known node could ever run.
        self.registry()
            .feasibility(&request.spec, request.max_cost_micros)?;
        let (account, spec, id, max_cost) = (
            request.account.clone(),
            request.spec.clone(),
            job_id.clone(),
            request.max_cost_micros,
        );
        let this = self.clone();
        let (mut job, created, placed) = self
            .db(move |store| {
                let (job, created) = store.submit(&id, &account, &spec, max_cost)?;
                // Fast path: with nobody queued ahead, place the job in the same operation (and
                // commit) that accepted it, instead of waiting for a dispatch pass.
                let placed = if created && !store.pending_other_than(&id)? {
                    this.place(store, &id, &spec, max_cost)
                } else {
                    None
                };
                Ok::<_, StoreError>((job, created, placed))
            })
            .await?;
        if created {
            tracing::info!(job_id = %job.job_id, account = %job.account, max_cost_micros = job.max_cost_micros, "job accepted");
        }
        self.inner.outbox_wake.notify_one();
        match placed {
            Some((node_id, attempt, fuel_limit)) => {
                job.state = JobState::Assigned;
                let this = self.clone();
                let (id, mut spec) = (job.job_id.clone(), request.spec);
                spec.fuel_limit = fuel_limit;
                tokio::spawn(async move { this.send_assignment(id, attempt, spec, node_id).await });
            }
            None => self.inner.dispatch_wake.notify_one(),
        }
        Ok(SubmitJobReply {
            job_id: job.job_id,
            state: job.state,
        })
    }

    pub(in crate::orchestrator) async fn get_job(
        &self,
        request: JobRef,
    ) -> Result<wire::JobView, WireError> {
        token(validate_token("job id", &request.job_id))?;
        let job = self.db(move |store| store.get_job(&request.job_id)).await?;
        Ok(job_view(job))
    }

    pub(in crate::orchestrator) async fn list_jobs(
        &self,
        request: ListJobs,
    ) -> Result<JobList, WireError> {
        if let Some(account) = &request.account {
            token(validate_token("account", account))?;
        }
        let limit = request.limit.unwrap_or(50);
        let jobs = self
            .db(move |store| store.list_jobs(request.account.as_deref(), request.state, limit))
            .await?;
        Ok(JobList {
            jobs: jobs.into_iter().map(job_view).collect(),
        })
    }

    pub(in crate::orchestrator) async fn cancel_job(
        &self,
        request: CancelJob,
    ) -> Result<wire::JobView, WireError> {
        token(validate_token("job id", &request.job_id))?;
        let effect = self.db(move |store| store.cancel(&request.job_id)).await?;
        self.inner.outbox_wake.notify_one();
        if let Some((node_id, attempt)) = effect.stop {
            self.send_stop(&node_id, &effect.job.job_id, attempt).await;
        }
        Ok(job_view(effect.job))
    }

    pub(in crate::orchestrator) async fn report(
        &self,
        report: JobReport,
    ) -> Result<Ack, WireError> {
        token(validate_token("job id", &report.job_id))?;
        token(validate_token("node id", &report.node_id))?;
        let max_output = self.inner.settings.max_output_bytes;
        let JobReport {
            node_id,
            job_id,
            attempt,
            phase,
            ..
        } = report;
        let (log_job, log_node) = (job_id.clone(), node_id.clone());
        let finished = matches!(phase, ReportPhase::Finished { .. });
        let effect = self
            .db(move |store| match &phase {
                ReportPhase::Running => store.mark_running(&job_id, &node_id, attempt),
                ReportPhase::Finished { outcome } => {
                    store.finish(&job_id, &node_id, attempt, outcome, max_output)
                }
            })
            .await?;
        self.inner.outbox_wake.notify_one();
        if finished {
            // Capacity came free: waiting jobs may fit now.
            self.inner.dispatch_wake.notify_one();
        }
        Ok(match effect {
            ReportEffect::Applied => Ack {
                accepted: true,
                note: None,
            },
            ReportEffect::Duplicate => Ack {
                accepted: true,
                note: Some("already recorded".into()),
            },
            ReportEffect::Stale(why) => {
                tracing::warn!(job_id = %log_job, node_id = %log_node, attempt, "{why}");
                Ack {
                    accepted: false,
                    note: Some(why),
                }
            }
        })
    }
}

/// A job as the wire shows it.
fn job_view(job: JobRecord) -> wire::JobView {
    let JobRecord {
        job_id,
        account,
        backend,
        state,
        attempt,
        node_id,
        max_cost_micros,
        cost_micros,
        provider_micros,
        fee_micros,
        refund_micros,
        exit_code,
        stdout,
        stderr,
        reason,
        elapsed_ms,
        fuel_consumed,
        output_files,
        created_ms,
        updated_ms,
    } = job;
    wire::JobView {
        job_id,
        account,
        backend,
        state,
        attempt,
        node_id,
        max_cost_micros,
        cost_micros,
        provider_micros,
        fee_micros,
        refund_micros,
        exit_code,
        stdout,
        stderr,
        reason,
        elapsed_ms,
        fuel_consumed,
        output_files,
        created_ms,
        updated_ms,
    }
}
