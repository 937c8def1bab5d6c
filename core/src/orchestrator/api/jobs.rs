//! `job.*` requests: submit (validate, resolve a module, hold, and place at once when nobody is
//! queued ahead), get, list, cancel, and the agents' reports.

use super::super::Orchestrator;
use super::super::modules;
use super::super::store::{JobCursor, JobRecord, ReportEffect, SignedReport, StoreError};
use super::super::validate::{party_account, token, validate_submit};
use super::{forbidden, own_account};
use rhizos_broker::validate_token;
use rhizos_broker::wire::{
    self, Ack, BlobRef, CancelJob, ErrorCode, ExecutionOutcome, JobList, JobRef, JobReport,
    JobState, ListJobs, ReportPhase, SubmitJob, SubmitJobReply, WireError, Workload,
};
use rhizos_broker::{Caller, Role};

impl Orchestrator {
    pub(in crate::orchestrator) async fn submit(
        &self,
        caller: Caller,
        mut request: SubmitJob,
    ) -> Result<SubmitJobReply, WireError> {
        // Charged to the caller's own account only (the subject says who calls, not the payload),
        // or — a gateway — to the account of the API key its client presented.
        party_account("account", &request.account)?;
        match (&caller.role, &request.api_key_sha256) {
            (Role::Gateway, Some(digest)) => {
                if !rhizos_broker::blobs::is_sha256_hex(digest) {
                    return Err(WireError::new(
                        ErrorCode::BadRequest,
                        "api_key_sha256: the SHA-256 of the key, 64 lowercase hex digits",
                    ));
                }
            }
            (Role::Gateway, None) => {
                return Err(forbidden(format!(
                    "{caller} submits only with its client's API key (api_key_sha256)"
                )));
            }
            // A key's account, revocation and expiry are checked in the hold's own transaction
            // (`Store::submit_with_key`): no read before it on the way to the first token.
            (_, _) => own_account(&caller, &request.account)?,
        }
        // Inference is the gateway's (it witnesses what it delivers, which bounds the bill);
        // the gateway submits nothing else.
        let inference = matches!(request.spec.workload, Workload::Inference { .. });
        if inference != (caller.role == Role::Gateway) {
            return Err(forbidden(if inference {
                format!(
                    "{caller} may not submit inference jobs: send AI requests through the gateway (rhizosd gateway)"
                )
            } else {
                format!("{caller} submits inference jobs only")
            }));
        }
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
        let (account, spec, id, max_cost, key) = (
            request.account.clone(),
            request.spec.clone(),
            job_id.clone(),
            request.max_cost_micros,
            request.api_key_sha256.clone(),
        );
        let this = self.clone();
        let (mut job, created, placed) = self
            .db(move |store| {
                let (job, created) =
                    store.submit_with_key(&id, &account, &spec, max_cost, key.as_deref())?;
                // Fast path: with nobody queued ahead, place the job in the same operation (and
                // commit) that accepted it, instead of waiting for a dispatch pass.
                let placed = if created && !store.pending_other_than(&id)? {
                    this.place(store, &id, &spec, max_cost, false)
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
        let assigned = placed
            .as_ref()
            .map(|(node_id, attempt, _)| (node_id.clone(), *attempt));
        match placed {
            Some((node_id, attempt, fuel_limit)) => {
                job.state = JobState::Assigned;
                let this = self.clone();
                let (id, account, mut spec) =
                    (job.job_id.clone(), job.account.clone(), request.spec);
                spec.fuel_limit = fuel_limit;
                tokio::spawn(async move {
                    this.send_assignment(id, account, attempt, spec, node_id)
                        .await
                });
            }
            None => self.inner.dispatch_wake.notify_one(),
        }
        Ok(SubmitJobReply {
            job_id: job.job_id,
            state: job.state,
            node_id: assigned.as_ref().map(|(node, _)| node.clone()),
            attempt: assigned.map(|(_, attempt)| attempt),
        })
    }

    pub(in crate::orchestrator) async fn get_job(
        &self,
        caller: Caller,
        request: JobRef,
    ) -> Result<wire::JobView, WireError> {
        token(validate_token("job id", &request.job_id))?;
        let job = self.db(move |store| store.get_job(&request.job_id)).await?;
        own_job(&caller, &job)?;
        Ok(job_view(job))
    }

    pub(in crate::orchestrator) async fn list_jobs(
        &self,
        caller: Caller,
        mut request: ListJobs,
    ) -> Result<JobList, WireError> {
        if let Some(account) = &request.account {
            token(validate_token("account", account))?;
            own_account(&caller, account)?;
        }
        if caller.role == Role::User {
            // A user lists its own jobs, whether it names its account or not.
            request.account = Some(caller.name);
        }
        let limit = request.limit.unwrap_or(50);
        let after = match request.after.as_deref() {
            Some(text) => Some(JobCursor::parse(text).ok_or_else(|| {
                WireError::new(
                    ErrorCode::BadRequest,
                    "after: not a cursor job.list returned (pass the previous page's `next`)",
                )
            })?),
            None => None,
        };
        let (jobs, next) = self
            .read(move |store| {
                store.list_jobs(
                    request.account.as_deref(),
                    request.state,
                    limit,
                    after.as_ref(),
                )
            })
            .await?;
        Ok(JobList {
            jobs: jobs.into_iter().map(job_view).collect(),
            next: next.map(|cursor| cursor.encode()),
        })
    }

    pub(in crate::orchestrator) async fn cancel_job(
        &self,
        caller: Caller,
        request: CancelJob,
    ) -> Result<wire::JobView, WireError> {
        token(validate_token("job id", &request.job_id))?;
        let effect = self
            .db(move |store| {
                let job = store.get_job(&request.job_id)?;
                own_job(&caller, &job)?;
                store.cancel(&request.job_id).map_err(WireError::from)
            })
            .await?;
        self.inner.outbox_wake.notify_one();
        if let Some((node_id, attempt)) = effect.stop {
            self.send_stop(&node_id, &effect.job.job_id, attempt).await;
        }
        Ok(job_view(effect.job))
    }

    pub(in crate::orchestrator) async fn report(
        &self,
        caller: Caller,
        report: JobReport,
    ) -> Result<Ack, WireError> {
        token(validate_token("job id", &report.job_id))?;
        token(validate_token("node id", &report.node_id))?;
        if caller.name != report.node_id {
            return Err(forbidden(format!(
                "{caller} may not report for node {}: a node reports only its own executions",
                report.node_id
            )));
        }
        let max_output = self.inner.settings.max_output_bytes;
        // A signature must verify under the key it names (checked here, off the ledger thread);
        // whether that key is the node's enrolled one is checked with the enrolment below.
        let signed = match &report.phase {
            ReportPhase::Finished { .. } => report
                .verify_signature()
                .map_err(|e| forbidden(format!("the report's signature is invalid: {e}")))?
                .map(|(bytes, signature)| SignedReport {
                    report: String::from_utf8_lossy(&bytes).into_owned(),
                    signature: signature.clone(),
                }),
            ReportPhase::Running | ReportPhase::HandedBack { .. } => None,
        };
        let JobReport {
            node_id,
            job_id,
            attempt,
            mut phase,
            ..
        } = report;
        if let ReportPhase::Finished { outcome } = &mut phase
            && !outcome.blobs.is_empty()
        {
            self.keep_stored_blobs(&job_id, &node_id, outcome).await;
        }
        let (log_job, log_node) = (job_id.clone(), node_id.clone());
        // Capacity comes free on a result or a hand-back (and a handed-back job waits again).
        let finished = !matches!(phase, ReportPhase::Running);
        let arrived = std::time::Instant::now();
        let settles = matches!(phase, ReportPhase::Finished { .. });
        let (effect, since_submit_ms) = self
            .db(move |store| match &phase {
                ReportPhase::Running => store
                    .mark_running_timed(&job_id, &node_id, attempt)
                    .map_err(WireError::from),
                ReportPhase::Finished { outcome } => {
                    let enrolled = store.enrolment(&node_id)?.and_then(|e| e.public_key);
                    if let Some(key) = &enrolled
                        && signed.as_ref().is_none_or(|s| &s.signature.key != key)
                    {
                        return Err(forbidden(format!(
                            "node {node_id} is enrolled with key {key}: its results must be signed with it"
                        )));
                    }
                    store
                        .finish_signed(&job_id, &node_id, attempt, outcome, max_output, signed.as_ref())
                        .map(|effect| (effect, None))
                        .map_err(WireError::from)
                }
                ReportPhase::HandedBack { reason } => {
                    // The node's words go into the job's reason: bounded.
                    let reason: String = reason.chars().take(256).collect();
                    store
                        .hand_back(&job_id, &node_id, attempt, &reason)
                        .map(|effect| (effect, None))
                        .map_err(WireError::from)
                }
            })
            .await?;
        if matches!(effect, ReportEffect::Applied) {
            let metrics = &self.inner.metrics;
            match since_submit_ms {
                Some(ms) => metrics
                    .submit_to_running_seconds
                    .observe(ms as f64 / 1000.0),
                None if settles => metrics
                    .settle_seconds
                    .observe(arrived.elapsed().as_secs_f64()),
                None => {}
            }
        }
        self.inner.outbox_wake.notify_one();
        if finished {
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

impl Orchestrator {
    /// Keeps of a result's out-of-band parts only those well formed and really in the blob
    /// stream, under the job's account and the reporting node (a node may claim blobs it never
    /// stored); what is dropped is said at the end of the result's stderr.
    async fn keep_stored_blobs(&self, job_id: &str, node_id: &str, outcome: &mut ExecutionOutcome) {
        let id = job_id.to_owned();
        let Ok(job) = self.read(move |store| store.get_job(&id)).await else {
            // Not this orchestrator's job: the store answers the report as stale.
            return;
        };
        let blobs = std::mem::take(&mut outcome.blobs);
        // Each part with where it goes back (a file may well be named `stdout`).
        enum Part {
            Stdout,
            Stderr,
            File(String),
        }
        let parts: Vec<(Part, BlobRef)> = blobs
            .stdout
            .iter()
            .map(|b| (Part::Stdout, b.clone()))
            .chain(blobs.stderr.iter().map(|b| (Part::Stderr, b.clone())))
            .chain(
                blobs
                    .files
                    .iter()
                    .map(|(name, b)| (Part::File(name.clone()), b.clone())),
            )
            .take(MAX_BLOB_FILES + 2)
            .collect();
        let well_formed = |part: &Part, blob: &BlobRef| {
            blob.size > 0
                && blob.size <= MAX_BLOB_BYTES
                && rhizos_broker::blobs::is_sha256_hex(&blob.sha256)
                && match part {
                    Part::File(name) => wire::valid_file_path(name),
                    Part::Stdout | Part::Stderr => true,
                }
        };
        let (stream, subjects, account) =
            (&self.inner.blobs, &self.inner.bus.subjects, &job.account);
        let checked = futures::future::join_all(parts.iter().map(|(part, blob)| async move {
            well_formed(part, blob)
                && rhizos_broker::blobs::is_stored(stream, subjects, account, node_id, blob)
                    .await
                    .unwrap_or_else(|e| {
                        tracing::warn!(%job_id, %node_id, blob = %blob.sha256, error = %e, "cannot check a result blob");
                        false
                    })
        }))
        .await;
        let mut kept = wire::OutputBlobs::default();
        let mut dropped = Vec::new();
        for ((part, blob), stored) in parts.into_iter().zip(checked) {
            match (part, stored) {
                (Part::Stdout, true) => kept.stdout = Some(blob),
                (Part::Stderr, true) => kept.stderr = Some(blob),
                (Part::File(name), true) => {
                    kept.files.insert(name, blob);
                }
                (Part::Stdout, false) => dropped.push("stdout".to_owned()),
                (Part::Stderr, false) => dropped.push("stderr".to_owned()),
                (Part::File(name), false) => dropped.push(name),
            }
        }
        let listed = blobs.files.len()
            + usize::from(blobs.stdout.is_some())
            + usize::from(blobs.stderr.is_some());
        if listed > MAX_BLOB_FILES + 2 {
            dropped.push(format!("{} more", listed - MAX_BLOB_FILES - 2));
        }
        if !dropped.is_empty() {
            tracing::warn!(%job_id, %node_id, dropped = ?dropped, "result names blobs that are not stored");
            outcome.stderr.push_str(&format!(
                "[rhizos] the node reported output stored out of band that is not in the blob stream (not returned): {}\n",
                dropped.join(", ")
            ));
        }
        outcome.blobs = kept;
    }
}

/// Most out-of-band output files one result may name.
const MAX_BLOB_FILES: usize = 1_024;
/// Largest blob a result may name.
const MAX_BLOB_BYTES: u64 = 1 << 40;

/// A user sees and acts on only its own account's jobs; the operator on all. A job of another
/// account is reported as not found, so its id's existence is not disclosed either.
/// A job is its account's (and the operator's); a gateway's when it charged it to an API key.
pub(in crate::orchestrator) fn own_job(caller: &Caller, job: &JobRecord) -> Result<(), WireError> {
    let (job_id, account) = (&job.job_id, &job.account);
    if super::acts_for(caller, account) || (caller.role == Role::Gateway && job.key_id.is_some()) {
        Ok(())
    } else {
        Err(WireError::new(
            ErrorCode::NotFound,
            format!("no job {job_id} in account {}", caller.name),
        ))
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
        blobs,
        created_ms,
        updated_ms,
        key_id: _,
        reported_usage,
        billed_usage,
        pruned_ms,
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
        blobs,
        created_ms,
        updated_ms,
        reported_usage,
        billed_usage,
        pruned_ms,
    }
}
