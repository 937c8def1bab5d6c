//! One execution on this node: take what the workload needs (its artifact by reference, whole
//! GPUs), start it on the plugin of its backend, report it running, forward its log lines while
//! it runs, wait for it on the blocking pool, turn the plugin's outcome into the wire's, and
//! report that until the orchestrator acknowledges it.

use super::{Agent, Inner, Running};
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RStr, RString, RVec, Tuple2};
use rhizos_broker::RequestError;
use rhizos_broker::wire::{
    self, Ack, AssignJob, ErrorCode, ExecutionOutcome, ExitKind, JobReport, LogBatch, LogEntry,
    LogStream, ReportPhase, WIRE_VERSION, WireError, Workload,
};
use rhizos_plugin_api::{EventSink, EventSink_TO, ExecLimits, ExecRequest};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;
use tokio::sync::mpsc;

/// An exit kind as its wire name (`exited`, `timed_out`, …), for metrics labels.
fn exit_kind_label(kind: ExitKind) -> &'static str {
    match kind {
        ExitKind::Exited => "exited",
        ExitKind::TimedOut => "timed_out",
        ExitKind::MemoryExceeded => "memory_exceeded",
        ExitKind::Crashed => "crashed",
        ExitKind::Rejected => "rejected",
        ExitKind::FuelExhausted => "fuel_exhausted",
        ExitKind::Cancelled => "cancelled",
        ExitKind::NodeError => "node_error",
    }
}

impl Agent {
    /// Runs one attempt to its end and reports it.
    pub(super) async fn execute(self, assign: AssignJob) {
        let key = (assign.job_id.clone(), assign.attempt);
        let metrics = self.inner.metrics.clone();
        let backend = assign.spec.workload.backend().to_owned();
        metrics
            .plugin_calls
            .with_label_values(&[backend.as_str(), "start"])
            .inc();
        metrics.running.inc();
        let (mut outcome, offload, chunks) = self.run_plugin(&assign).await;
        metrics.running.dec();
        metrics
            .executions
            .with_label_values(&[backend.as_str(), exit_kind_label(outcome.kind)])
            .inc();
        metrics.chunks.inc_by(chunks.unwrap_or(0));
        if let Some(chunks) = chunks {
            self.end_stream(&assign, &outcome, chunks).await;
        }
        self.store_blobs(&assign.account, &mut outcome, offload)
            .await;
        let cut = fit_outcome(&mut outcome, REPORT_BUDGET_BYTES);
        if !cut.is_empty() {
            tracing::warn!(job_id = %assign.job_id, attempt = assign.attempt, cut = ?cut, "result cut to fit one message");
        }
        tracing::info!(job_id = %assign.job_id, attempt = assign.attempt, kind = ?outcome.kind, exit_code = ?outcome.exit_code, elapsed_ms = outcome.elapsed_ms, "execution ended");
        // Cancelled by this agent's own shutdown, not by the orchestrator: the job is handed
        // back to run elsewhere instead of ending.
        let stopped_by_orchestrator = self
            .executions()
            .get(&key)
            .and_then(Option::as_ref)
            .is_some_and(|running| running.stop_requested.load(Ordering::Relaxed));
        let phase = if outcome.kind == ExitKind::Cancelled
            && self.inner.shutting_down.load(Ordering::Relaxed)
            && !stopped_by_orchestrator
        {
            ReportPhase::HandedBack {
                reason: "the agent is shutting down".into(),
            }
        } else {
            ReportPhase::Finished { outcome }
        };
        let report = JobReport {
            v: WIRE_VERSION,
            node_id: self.inner.node_id.clone(),
            job_id: assign.job_id,
            attempt: assign.attempt,
            phase,
            signature: None,
        };
        self.send_report(report).await;
        // Only now: until the orchestrator has the result, heartbeats keep listing the attempt,
        // so it is never mistaken for one the node lost.
        self.executions().remove(&key);
    }

    /// Stores what does not travel in the report in the blob stream — output files the report
    /// leaves out, and the whole of a stream longer than its tail — and names it in the outcome.
    /// What cannot be stored is said at the end of stderr (the result still ends the job).
    async fn store_blobs(&self, account: &str, outcome: &mut ExecutionOutcome, offload: Offload) {
        let node_id = &self.inner.node_id;
        let mut failed = Vec::new();
        let Offload {
            files,
            stdout,
            stderr,
            dropped,
        } = offload;
        for (what, spool) in [("stdout", stdout), ("stderr", stderr)] {
            let Some(spool) = spool else { continue };
            let content = match tokio::task::spawn_blocking(move || spool.read_back()).await {
                Ok(Ok(content)) => content,
                Ok(Err(e)) => {
                    failed.push(format!("{what} ({e})"));
                    continue;
                }
                Err(e) => {
                    failed.push(format!("{what} ({e})"));
                    continue;
                }
            };
            match self.inner.bus.put_blob(account, node_id, &content).await {
                Ok(blob) => {
                    if what == "stdout" {
                        outcome.blobs.stdout = Some(blob);
                    } else {
                        outcome.blobs.stderr = Some(blob);
                    }
                }
                Err(e) => failed.push(format!("the whole {what} ({e})")),
            }
        }
        for (name, content) in files {
            match self.inner.bus.put_blob(account, node_id, &content).await {
                Ok(blob) => {
                    outcome.blobs.files.insert(name, blob);
                }
                Err(e) => failed.push(format!("output file {name} ({e})")),
            }
        }
        if !failed.is_empty() {
            tracing::warn!(account, failed = ?failed, "result parts not stored out of band");
            outcome.stderr.push_str(&format!(
                "[rhizos] not stored out of band, so not returned: {}\n",
                failed.join(", ")
            ));
        }
        if !dropped.is_empty() {
            outcome.stderr.push_str(&format!(
                "[rhizos] output files past this node's max_output_blob_bytes ({} MiB) dropped: {}\n",
                self.inner.settings.max_output_blob_bytes >> 20,
                dropped.join(", ")
            ));
        }
    }

    /// Prepares, starts and supervises one execution; every way it can end is an outcome, with
    /// what of it goes out of band.
    /// (An AI job's: also how many chunks of its response went out on its stream.)
    async fn run_plugin(&self, assign: &AssignJob) -> (ExecutionOutcome, Offload, Option<u64>) {
        let streams = matches!(assign.spec.workload, Workload::Inference { .. });
        let outcome = |o: ExecutionOutcome| (o, Offload::default(), streams.then_some(0));
        // Held until the execution ends.
        let (request, _gpus) = match self.prepare(assign).await {
            Ok(prepared) => prepared,
            Err(message) => return outcome(node_error(message)),
        };
        let (sender, receiver) = mpsc::channel(LOG_BUFFER_LINES);
        let sink = Arc::new(SinkState::new(&self.inner.settings));
        // An AI response: its chunks go out on the job's stream as they come.
        let (chunk_sender, chunk_forwarder) = if streams {
            let (sender, receiver) = mpsc::unbounded_channel();
            let forwarder = tokio::spawn(self.clone().forward_chunks(
                assign.job_id.clone(),
                assign.attempt,
                receiver,
            ));
            (Some(ChunkBudget::new(sender, assign)), Some(forwarder))
        } else {
            (None, None)
        };
        let execution = match self
            .start(
                assign,
                request,
                sender.clone(),
                sink.clone(),
                chunk_sender.clone(),
            )
            .await
        {
            Ok(execution) => execution,
            Err(message) => return outcome(node_error(message)),
        };
        self.executions().insert(
            (assign.job_id.clone(), assign.attempt),
            Some(execution.clone()),
        );
        let running = JobReport {
            v: WIRE_VERSION,
            node_id: self.inner.node_id.clone(),
            job_id: assign.job_id.clone(),
            attempt: assign.attempt,
            phase: ReportPhase::Running,
            signature: None,
        };
        let reporter = tokio::spawn({
            let this = self.clone();
            async move { this.send_report(running).await }
        });
        let forwarder = tokio::spawn(self.clone().forward_logs(
            assign.account.clone(),
            assign.job_id.clone(),
            assign.attempt,
            receiver,
        ));
        let waited = tokio::task::spawn_blocking(move || execution.execution.wait()).await;
        // Every line reached the sink before `wait` returned; this marker follows them.
        let _ = sender.send(SinkMessage::Done).await;
        let _ = forwarder.await;
        let mut chunks = None;
        if let (Some(budget), Some(forwarder)) = (chunk_sender, chunk_forwarder) {
            budget.close();
            chunks = Some(forwarder.await.unwrap_or(0));
        }
        let ((stdout, stdout_whole), (stderr, stderr_whole)) = sink.tails();
        let _ = reporter.await;
        let (outcome, mut offload) = match waited {
            Ok(outcome) => wire_outcome(
                outcome,
                stdout,
                stderr,
                self.inner.settings.max_output_blob_bytes,
            ),
            Err(e) => (
                ExecutionOutcome {
                    kind: ExitKind::Crashed,
                    exit_code: None,
                    message: Some(format!("waiting for the execution failed: {e}")),
                    elapsed_ms: 0,
                    fuel_consumed: None,
                    output_files: Default::default(),
                    stdout,
                    stderr,
                    blobs: Default::default(),
                    usage: None,
                },
                Offload::default(),
            ),
        };
        offload.stdout = stdout_whole;
        offload.stderr = stderr_whole;
        (outcome, offload, chunks)
    }

    /// Publishes an AI response's chunks on the job's stream, in order, numbered; returns how
    /// many went out.
    async fn forward_chunks(
        self,
        job_id: String,
        attempt: u32,
        mut receiver: mpsc::UnboundedReceiver<ChunkMessage>,
    ) -> u64 {
        let Ok(subject) = self
            .inner
            .bus
            .subjects
            .ai_stream(&job_id, &self.inner.node_id)
        else {
            return 0;
        };
        let mut seq = 0u64;
        while let Some(ChunkMessage::Data(data)) = receiver.recv().await {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(wire::AI_ATTEMPT_HEADER, attempt.to_string().as_str());
            headers.insert(wire::AI_SEQ_HEADER, seq.to_string().as_str());
            if let Err(e) = self
                .inner
                .bus
                .client
                .publish_with_headers(subject.clone(), headers, data)
                .await
            {
                tracing::debug!(error = %e, "response chunk not published");
            }
            seq += 1;
        }
        seq
    }

    /// Ends an AI response on its stream and waits (at most `witness_timeout_ms`) for the
    /// gateway's answer: it sends its witness of what it delivered first, and the bill is
    /// bounded by that witness, so the report follows it.
    async fn end_stream(&self, assign: &AssignJob, outcome: &ExecutionOutcome, chunks: u64) {
        let bus = &self.inner.bus;
        let Ok(subject) = bus.subjects.ai_stream(&assign.job_id, &self.inner.node_id) else {
            return;
        };
        let end = wire::StreamEnd {
            v: WIRE_VERSION,
            attempt: assign.attempt,
            chunks,
            kind: outcome.kind,
            message: outcome.message.clone(),
            usage: outcome.usage,
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(wire::AI_ATTEMPT_HEADER, assign.attempt.to_string().as_str());
        let timeout = Duration::from_millis(self.inner.settings.witness_timeout_ms);
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(wire::encode(&end))
            .timeout(Some(timeout));
        if let Err(e) = bus.client.send_request(subject, request).await {
            tracing::warn!(job_id = %assign.job_id, attempt = assign.attempt, error = %e, "the gateway did not answer the end of the response; reporting without its witness");
        }
    }

    /// What the execution needs before it starts: the artifact's bytes when they come by
    /// reference (fetched, or from the cache), then the GPUs it asks for, then the plugin's
    /// request. An error is why the attempt is rejected.
    async fn prepare(&self, assign: &AssignJob) -> Result<(ExecRequest, GpuLease<'_>), String> {
        let fetched = match &assign.spec.artifact_url {
            Some(url) => {
                let (store, url, digest) = (
                    self.inner.artifacts.clone(),
                    url.clone(),
                    assign.spec.artifact_sha256.clone().unwrap_or_default(),
                );
                let started = std::time::Instant::now();
                match tokio::task::spawn_blocking(move || store.get(&url, &digest)).await {
                    Ok(Ok((bytes, origin))) => {
                        tracing::info!(job_id = %assign.job_id, bytes = bytes.len(), ?origin, ms = started.elapsed().as_millis() as u64, "artifact ready");
                        Some(bytes)
                    }
                    Ok(Err(message)) => return Err(message),
                    Err(e) => return Err(format!("fetching the artifact failed: {e}")),
                }
            }
            None => None,
        };
        // A flow step's inputs out of band: under this node's own token, digest checked.
        let mut inputs = Vec::with_capacity(assign.spec.input_blobs.len());
        for (name, input) in &assign.spec.input_blobs {
            if !wire::valid_file_path(name) || input.size > rhizos_broker::blobs::MAX_COPY_BYTES {
                return Err(format!(
                    "input blob {name:?}: not a plain relative path, or more than {} bytes",
                    rhizos_broker::blobs::MAX_COPY_BYTES
                ));
            }
            let blob = wire::BlobRef {
                sha256: input.sha256.clone(),
                size: input.size,
            };
            let mut bytes = Vec::with_capacity(usize::try_from(input.size).unwrap_or(0));
            self.inner
                .bus
                .get_blob(
                    &assign.account,
                    &self.inner.node_id,
                    &format!("input {name}"),
                    &blob,
                    &mut bytes,
                )
                .await
                .map_err(|e| format!("cannot read the job's input {name}: {e}"))?;
            inputs.push((name.clone(), bytes));
        }
        let gpus = GpuLease::take(&self.inner, assign.spec.gpus)?;
        let request =
            exec_request(assign, &gpus.devices, fetched, inputs).map_err(|e| e.message)?;
        Ok((request, gpus))
    }

    /// Starts the execution on the plugin of its backend (on the blocking pool: a plugin call).
    async fn start(
        &self,
        assign: &AssignJob,
        request: ExecRequest,
        sender: mpsc::Sender<SinkMessage>,
        state: Arc<SinkState>,
        chunks: Option<ChunkBudget>,
    ) -> Result<Arc<Running>, String> {
        let sink = EventSink_TO::from_value(
            ChannelSink {
                sender,
                state,
                chunks,
            },
            TD_Opaque,
        );
        let backend_name = assign.spec.workload.backend();
        // Held until the execution ends: a plugin replaced or removed meanwhile stays alive for it.
        let plugin = self.plugin_for(&assign.spec.workload);
        let Some(plugin) = plugin else {
            return Err(format!(
                "no {backend_name} backend on this node any more (its plugin was removed)"
            ));
        };
        let starter = plugin.clone();
        let started =
            tokio::task::spawn_blocking(move || match starter.backend.start(request, sink) {
                RResult::ROk(execution) => Ok(execution),
                RResult::RErr(message) => Err(message.into_string()),
            })
            .await;
        match started {
            Ok(Ok(execution)) => Ok(Arc::new(Running {
                execution,
                _plugin: plugin,
                stop_requested: std::sync::atomic::AtomicBool::new(false),
            })),
            Ok(Err(message)) => Err(message),
            Err(e) => Err(format!("backend start failed: {e}")),
        }
    }

    /// Publishes the lines on the job's log subject, in order: each message carries the lines
    /// that came within [`LOG_LINGER`] of its first (at most [`LOG_BATCH_LINES`] lines, about
    /// [`LOG_BATCH_BYTES`]), so a flood travels in few messages and a quiet job's lines go out
    /// as they come.
    async fn forward_logs(
        self,
        account: String,
        job_id: String,
        attempt: u32,
        mut receiver: mpsc::Receiver<SinkMessage>,
    ) {
        let Ok(subject) = self
            .inner
            .bus
            .subjects
            .job_log(&account, &job_id, &self.inner.node_id)
        else {
            return;
        };
        let mut done = false;
        while !done {
            let Some(SinkMessage::Line(first)) = receiver.recv().await else {
                return;
            };
            let mut bytes = first.line.len();
            let mut lines = vec![first];
            // Lines that follow within the linger join this message.
            let close_at = tokio::time::Instant::now() + LOG_LINGER;
            while lines.len() < LOG_BATCH_LINES && bytes < LOG_BATCH_BYTES {
                let next = match receiver.try_recv() {
                    Ok(message) => Some(message),
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        match tokio::time::timeout_at(close_at, receiver.recv()).await {
                            Ok(message) => message,
                            Err(_) => break,
                        }
                    }
                };
                match next {
                    Some(SinkMessage::Line(entry)) => {
                        bytes += entry.line.len();
                        lines.push(entry);
                    }
                    Some(SinkMessage::Done) | None => {
                        done = true;
                        break;
                    }
                }
            }
            self.inner.metrics.log_lines.inc_by(lines.len() as u64);
            let batch = LogBatch {
                v: WIRE_VERSION,
                job_id: job_id.clone(),
                attempt,
                lines,
            };
            if let Err(e) = self
                .inner
                .bus
                .client
                .publish(subject.clone(), wire::encode(&batch))
                .await
            {
                tracing::debug!(error = %e, "log lines not published");
            }
        }
    }

    /// Sends a report until the orchestrator answers (it may be restarting).
    async fn send_report(&self, mut report: JobReport) {
        // A result is signed with the node's key (its enrolment names the key the orchestrator
        // requires; the signature travels on into the job's receipt).
        if let (ReportPhase::Finished { .. }, Some(key)) = (&report.phase, &self.inner.bus.signer)
            && let Err(e) = report.sign(key)
        {
            tracing::error!(job_id = %report.job_id, error = %e, "cannot sign the report");
        }
        let mut delay = Duration::from_millis(100);
        let mut shrunk = false;
        loop {
            match self.inner.bus.call(&report).await {
                Ok(Ack { accepted: true, .. }) => return,
                Ok(Ack { note, .. }) => {
                    tracing::warn!(job_id = %report.job_id, attempt = report.attempt, note = ?note, "report not accepted");
                    return;
                }
                Err(RequestError::Remote(e)) if e.code == ErrorCode::TooLarge && !shrunk => {
                    // The orchestrator takes less than this agent's budget: cut the result to a
                    // small one (it still ends the job, with its reason) and send that.
                    shrunk = true;
                    if let ReportPhase::Finished { outcome } = &mut report.phase {
                        let cut = fit_outcome(outcome, SMALL_REPORT_BYTES);
                        tracing::warn!(job_id = %report.job_id, cut = ?cut, "result refused as too large; sending it cut down");
                    }
                    report.signature = None;
                    if let (ReportPhase::Finished { .. }, Some(key)) =
                        (&report.phase, &self.inner.bus.signer)
                        && let Err(e) = report.sign(key)
                    {
                        tracing::error!(job_id = %report.job_id, error = %e, "cannot sign the report");
                    }
                }
                Err(RequestError::Remote(e)) if !e.code.is_retryable() => {
                    tracing::error!(job_id = %report.job_id, error = %e, "report refused");
                    return;
                }
                Err(e) => {
                    tracing::warn!(job_id = %report.job_id, error = %e, "report not delivered; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Most bytes a result report may take encoded: under the orchestrator's default request limit
/// (900 KiB) and NATS's 1 MiB payload, with room for the signature.
pub(crate) const REPORT_BUDGET_BYTES: usize = 768 * 1024;
/// What a result refused as too large is cut to before it is sent again.
const SMALL_REPORT_BYTES: usize = 32 * 1024;

/// Cuts a result until its JSON encoding fits `budget` bytes — output files first, largest
/// first, then the longer of the two tails halved (its end kept) — and says what was cut at the
/// end of stderr. Returns what was cut (empty when it fitted). Control bytes in the output
/// encode to 6 bytes each, so the budget is measured after encoding, not on the raw tails.
pub(crate) fn fit_outcome(outcome: &mut ExecutionOutcome, budget: usize) -> Vec<String> {
    let size =
        |outcome: &ExecutionOutcome| serde_json::to_vec(outcome).map_or(usize::MAX, |b| b.len());
    let mut cut = Vec::new();
    // Room for the note itself.
    let budget = budget.saturating_sub(1024);
    while size(outcome) > budget {
        if let Some(largest) = outcome
            .output_files
            .iter()
            .max_by_key(|(_, content)| content.len())
            .map(|(name, _)| name.clone())
        {
            outcome.output_files.remove(&largest);
            cut.push(format!("output file {largest}"));
            continue;
        }
        let longer = if outcome.stdout.len() >= outcome.stderr.len() {
            &mut outcome.stdout
        } else {
            &mut outcome.stderr
        };
        if longer.is_empty() {
            break;
        }
        let mut start = longer.len() / 2;
        while !longer.is_char_boundary(start) {
            start += 1;
        }
        longer.drain(..start.max(1).min(longer.len()));
        cut.push("the start of an output tail".to_owned());
    }
    if !cut.is_empty() {
        cut.dedup();
        outcome.stderr.push_str(&format!(
            "[rhizos] the result was cut to fit one message ({budget} bytes): dropped {}\n",
            cut.join(", ")
        ));
    }
    cut
}

/// An attempt this node could not start (the artifact did not arrive or match its digest, the
/// GPUs are taken, the backend refused to start it): why. Not the workload's failure, so it is
/// not charged and the job may run elsewhere.
fn node_error(message: String) -> ExecutionOutcome {
    ExecutionOutcome {
        kind: ExitKind::NodeError,
        exit_code: None,
        message: Some(message),
        elapsed_ms: 0,
        fuel_consumed: None,
        output_files: Default::default(),
        stdout: String::new(),
        stderr: String::new(),
        blobs: Default::default(),
        usage: None,
    }
}

/// What of a result goes out of band: output files too large for the report, the whole of a
/// stream longer than its tail, and the files past the node's blob budget (dropped, named).
#[derive(Default)]
struct Offload {
    files: Vec<(String, Vec<u8>)>,
    stdout: Option<Spool>,
    stderr: Option<Spool>,
    dropped: Vec<String>,
}

/// Largest output file that travels in the report itself.
const INLINE_FILE_BYTES: usize = 64 * 1024;
/// Most bytes of output files that travel in the report (smallest first); the rest go out of
/// band.
const INLINE_FILES_BYTES: usize = 256 * 1024;

/// The plugin's outcome as the wire reports it, with the tails of the streamed output; the
/// output files that do not travel inline (past [`INLINE_FILE_BYTES`] each or
/// [`INLINE_FILES_BYTES`] in all) are returned for the blob stream, up to `blob_budget` bytes.
fn wire_outcome(
    outcome: rhizos_plugin_api::ExecOutcome,
    stdout: String,
    stderr: String,
    blob_budget: u64,
) -> (ExecutionOutcome, Offload) {
    use rhizos_plugin_api::ExitKind as Plugin;
    let mut files: Vec<(String, Vec<u8>)> = outcome
        .output_files
        .into_iter()
        .map(|Tuple2(name, content)| (name.into_string(), content.into_vec()))
        .collect();
    files.sort_by_key(|(_, content)| content.len());
    let mut offload = Offload::default();
    let (mut inline, mut inline_bytes, mut blob_bytes) =
        (std::collections::BTreeMap::new(), 0usize, 0u64);
    for (name, content) in files {
        if content.len() <= INLINE_FILE_BYTES && inline_bytes + content.len() <= INLINE_FILES_BYTES
        {
            inline_bytes += content.len();
            inline.insert(name, wire::b64_encode(&content));
        } else if blob_bytes + content.len() as u64 <= blob_budget {
            blob_bytes += content.len() as u64;
            offload.files.push((name, content));
        } else {
            offload.dropped.push(name);
        }
    }
    let outcome = ExecutionOutcome {
        kind: match outcome.kind {
            Plugin::Exited => ExitKind::Exited,
            Plugin::TimedOut => ExitKind::TimedOut,
            Plugin::MemoryExceeded => ExitKind::MemoryExceeded,
            Plugin::Crashed => ExitKind::Crashed,
            Plugin::Cancelled => ExitKind::Cancelled,
            Plugin::Rejected => ExitKind::Rejected,
            Plugin::FuelExhausted => ExitKind::FuelExhausted,
            Plugin::BackendFailed => ExitKind::NodeError,
        },
        exit_code: (outcome.kind == Plugin::Exited).then_some(outcome.exit_code),
        message: (!outcome.message.is_empty()).then(|| outcome.message.into_string()),
        elapsed_ms: outcome.elapsed_ms,
        fuel_consumed: (outcome.fuel_consumed > 0).then_some(outcome.fuel_consumed),
        output_files: inline,
        stdout,
        stderr,
        blobs: Default::default(),
        usage: outcome.usage.into_option().map(|m| wire::Metered {
            input_units: m.input_units,
            output_units: m.output_units,
        }),
    };
    (outcome, offload)
}

/// The plugin's request for `assign`, on the GPUs `gpu_devices`, with the workload's bytes
/// `fetched` by reference or else as the job carries them ([`inline_workload`]).
fn exec_request(
    assign: &AssignJob,
    gpu_devices: &[String],
    fetched: Option<Vec<u8>>,
    blobs: Vec<(String, Vec<u8>)>,
) -> Result<ExecRequest, WireError> {
    let workload = match fetched {
        // By reference (`artifact_url`): `ArtifactStore::get` checked the digest.
        Some(bytes) => bytes,
        None => inline_workload(assign)?,
    };
    let stdin = match &assign.spec.stdin_b64 {
        Some(text) => wire::b64_decode("stdin_b64", text)?,
        None => Vec::new(),
    };
    let mut input_files = RVec::new();
    for (name, content) in &assign.spec.input_files {
        if !wire::valid_file_path(name) {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!("input file name {name:?} is not a plain relative path"),
            ));
        }
        let content = wire::b64_decode("input_files", content)?;
        input_files.push(Tuple2(RString::from(name.as_str()), RVec::from(content)));
    }
    for (name, content) in blobs {
        input_files.push(Tuple2(RString::from(name), RVec::from(content)));
    }
    Ok(ExecRequest {
        input_files,
        execution_id: RString::from(format!("{}-{}", assign.job_id, assign.attempt)),
        workload: RVec::from(workload),
        args: assign
            .spec
            .args
            .iter()
            .map(|a| RString::from(a.as_str()))
            .collect(),
        env: assign
            .spec
            .env
            .iter()
            .map(|(k, v)| Tuple2(RString::from(k.as_str()), RString::from(v.as_str())))
            .collect(),
        stdin: RVec::from(stdin),
        limits: ExecLimits {
            wall_timeout_ms: assign.spec.timeout_ms,
            memory_limit_bytes: assign.spec.memory_mib.saturating_mul(1024 * 1024),
            fuel_limit: assign.spec.fuel_limit.unwrap_or(0),
            cpu_cores: assign.spec.cpu_cores,
            vram_limit_bytes: assign.spec.min_vram_mib.saturating_mul(1024 * 1024),
            disk_limit_bytes: assign.spec.disk_mib.saturating_mul(1024 * 1024),
        },
        gpu_devices: gpu_devices
            .iter()
            .map(|d| RString::from(d.as_str()))
            .collect(),
    })
}

/// The workload's bytes as the job carries them: a WASM module, CUDA program or plugin payload
/// decoded, any other workload as its JSON; a module's artifact checked against its digest.
fn inline_workload(assign: &AssignJob) -> Result<Vec<u8>, WireError> {
    let workload = match &assign.spec.workload {
        Workload::Wasm { module_b64 } => wire::b64_decode("workload.module_b64", module_b64)?,
        Workload::Cuda { program_b64 } => wire::b64_decode("workload.program_b64", program_b64)?,
        Workload::Custom { payload_b64, .. } => {
            wire::b64_decode("workload.payload_b64", payload_b64)?
        }
        // The validated request, as the gateway wrote it.
        Workload::Inference { request, .. } => request.as_bytes().to_vec(),
        Workload::Module { uri } => {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!("{uri} reached the node unresolved"),
            ));
        }
        other => {
            let mut value = serde_json::to_value(other).map_err(|e| {
                WireError::new(
                    ErrorCode::Internal,
                    format!("cannot encode the workload: {e}"),
                )
            })?;
            // A container image from a module: the docker plugin checks the local image's id.
            if let (Some(digest), Some(object)) =
                (&assign.spec.artifact_sha256, value.as_object_mut())
            {
                object.insert("image_id".into(), format!("sha256:{digest}").into());
            }
            serde_json::to_vec(&value).map_err(|e| {
                WireError::new(
                    ErrorCode::Internal,
                    format!("cannot encode the workload: {e}"),
                )
            })?
        }
    };
    // A module's artifact must be the one its registry entry names, byte for byte.
    if let Some(expected) = &assign.spec.artifact_sha256
        && !matches!(assign.spec.workload, Workload::Docker { .. })
    {
        let actual = crate::sha256_hex(&workload);
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!(
                    "artifact digest mismatch: the workload's sha256 is {actual}, the job requires {expected}; refusing to run it"
                ),
            ));
        }
    }
    Ok(workload)
}

/// GPUs held by one execution, given back when it is dropped.
struct GpuLease<'a> {
    inner: &'a Inner,
    indices: Vec<usize>,
    /// What the backend is told: the UUID when the driver gave one, else the index.
    devices: Vec<String>,
}

impl<'a> GpuLease<'a> {
    fn take(inner: &'a Inner, count: u32) -> Result<Self, String> {
        let mut busy = inner
            .gpus_busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let free: Vec<usize> = (0..inner.hardware.gpus.len())
            .filter(|i| !busy.get(*i).copied().unwrap_or(true))
            .take(count as usize)
            .collect();
        if free.len() < count as usize {
            return Err(format!(
                "the job needs {count} GPU(s); this node has {} free of {}",
                free.len(),
                inner.hardware.gpus.len()
            ));
        }
        for &i in &free {
            busy[i] = true;
        }
        let devices = free
            .iter()
            .map(|&i| {
                inner.hardware.gpus[i]
                    .uuid
                    .clone()
                    .unwrap_or_else(|| i.to_string())
            })
            .collect();
        Ok(Self {
            inner,
            indices: free,
            devices,
        })
    }
}

impl Drop for GpuLease<'_> {
    fn drop(&mut self) {
        let mut busy = self
            .inner
            .gpus_busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for &i in &self.indices {
            busy[i] = false;
        }
    }
}

/// Lines buffered between the plugin's sink and the publisher; past it lines are not streamed
/// (counted in the sequence numbers, kept in the tails) rather than held in memory.
const LOG_BUFFER_LINES: usize = 8_192;
/// Most lines in one log message.
const LOG_BATCH_LINES: usize = 512;
/// A log message is closed once its lines reach this many bytes.
const LOG_BATCH_BYTES: usize = 64 * 1024;
/// How long a log message waits for more lines after its first: a flood fills messages, a
/// quiet job's line goes out this much later at most.
const LOG_LINGER: Duration = Duration::from_millis(5);

enum SinkMessage {
    Line(LogEntry),
    Done,
}

/// The host side of the plugin's log sink: every line is numbered and kept in the result's
/// tails; lines within the execution's log budget go into a bounded channel to the publisher.
struct ChannelSink {
    sender: mpsc::Sender<SinkMessage>,
    state: Arc<SinkState>,
    /// An AI job's response stream; `None` for other workloads (their chunks are dropped).
    chunks: Option<ChunkBudget>,
}

enum ChunkMessage {
    Data(bytes::Bytes),
    Done,
}

/// The chunks one AI response may send: a chunk per output unit and a few more, each at most
/// [`MAX_CHUNK_BYTES`], [`MAX_RESPONSE_BYTES`] in all; past that the plugin's chunks are
/// dropped (what the gateway did not receive is not billed).
#[derive(Clone)]
struct ChunkBudget {
    sender: mpsc::UnboundedSender<ChunkMessage>,
    left: Arc<std::sync::Mutex<(u64, u64)>>,
}

/// Largest single chunk (an embeddings reply is one chunk).
const MAX_CHUNK_BYTES: usize = 768 * 1024;
/// Most bytes one AI response streams.
const MAX_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;

impl ChunkBudget {
    fn new(sender: mpsc::UnboundedSender<ChunkMessage>, assign: &AssignJob) -> Self {
        let units = match &assign.spec.workload {
            Workload::Inference {
                max_output_units, ..
            } => *max_output_units,
            _ => 0,
        };
        Self {
            sender,
            left: Arc::new(std::sync::Mutex::new((
                units.saturating_add(64),
                MAX_RESPONSE_BYTES,
            ))),
        }
    }

    fn send(&self, data: &[u8]) {
        let mut left = self.left.lock().unwrap_or_else(PoisonError::into_inner);
        if data.len() > MAX_CHUNK_BYTES || left.0 == 0 || left.1 < data.len() as u64 {
            return;
        }
        left.0 -= 1;
        left.1 -= data.len() as u64;
        let _ = self
            .sender
            .send(ChunkMessage::Data(bytes::Bytes::copy_from_slice(data)));
    }

    /// No more chunks: the forwarder publishes what is queued and ends.
    fn close(&self) {
        self.left.lock().unwrap_or_else(PoisonError::into_inner).0 = 0;
        let _ = self.sender.send(ChunkMessage::Done);
    }
}

/// What one execution's output has cost so far. Plugins may call the sink from several
/// threads (a container's stdout and stderr), so it sits behind a mutex.
struct SinkState {
    budget: LogBudget,
    inner: std::sync::Mutex<SinkCounts>,
}

#[derive(Debug, Clone, Copy)]
struct LogBudget {
    lines: u64,
    bytes: u64,
    line_bytes: usize,
}

struct SinkCounts {
    next_seq: u64,
    streamed_lines: u64,
    streamed_bytes: u64,
    /// The budget notice went out; nothing more is streamed.
    spent: bool,
    stdout: Tail,
    stderr: Tail,
}

impl SinkState {
    fn new(settings: &rhizos_broker::config::AgentSettings) -> Self {
        Self {
            budget: LogBudget {
                lines: settings.max_log_lines,
                bytes: settings.max_log_bytes,
                line_bytes: settings.max_line_bytes.max(16),
            },
            inner: std::sync::Mutex::new(SinkCounts {
                next_seq: 0,
                streamed_lines: 0,
                streamed_bytes: 0,
                spent: false,
                stdout: Tail::new(settings.max_output_bytes, settings.max_stored_log_bytes),
                stderr: Tail::new(settings.max_output_bytes, settings.max_stored_log_bytes),
            }),
        }
    }

    /// Records one line; returns what to stream, if anything.
    fn record(&self, stream: LogStream, line: &str) -> Option<LogEntry> {
        let mut counts = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let line = cut(line, self.budget.line_bytes);
        match stream {
            LogStream::Stdout => counts.stdout.push(&line),
            LogStream::Stderr => counts.stderr.push(&line),
        }
        let seq = counts.next_seq;
        counts.next_seq += 1;
        if counts.spent {
            return None;
        }
        let bytes = line.len() as u64 + 1;
        if counts.streamed_lines >= self.budget.lines
            || counts.streamed_bytes.saturating_add(bytes) > self.budget.bytes
        {
            counts.spent = true;
            return Some(LogEntry {
                seq,
                stream: LogStream::Stderr,
                line: format!(
                    "[rhizos] this job's live log budget ({} lines, {} bytes) is spent: later lines are not streamed; the result keeps the last {} bytes of each stream",
                    self.budget.lines, self.budget.bytes, counts.stdout.max_bytes
                ),
                ts_ms: crate::now_ms(),
            });
        }
        counts.streamed_lines += 1;
        counts.streamed_bytes += bytes;
        Some(LogEntry {
            seq,
            stream,
            line: line.into_owned(),
            ts_ms: crate::now_ms(),
        })
    }

    /// The tails of stdout and stderr for the result, each with the whole stream when it
    /// outgrew its tail.
    fn tails(&self) -> ((String, Option<Spool>), (String, Option<Spool>)) {
        let mut counts = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let stdout = std::mem::replace(&mut counts.stdout, Tail::new(0, 0));
        let stderr = std::mem::replace(&mut counts.stderr, Tail::new(0, 0));
        (stdout.into_parts(), stderr.into_parts())
    }
}

/// `line` cut to at most `max` bytes at a character boundary, marked with `…` when cut.
fn cut(line: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if line.len() <= max {
        return std::borrow::Cow::Borrowed(line);
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}…", &line[..end]))
}

impl EventSink for ChannelSink {
    fn log(&self, stream: rhizos_plugin_api::LogStream, line: RStr<'_>) {
        let stream = match stream {
            rhizos_plugin_api::LogStream::Stdout => LogStream::Stdout,
            rhizos_plugin_api::LogStream::Stderr => LogStream::Stderr,
        };
        if let Some(entry) = self.state.record(stream, line.as_str()) {
            // Full: the publisher is behind; the line stays in the tails and its sequence
            // number shows the gap to watchers.
            let _ = self.sender.try_send(SinkMessage::Line(entry));
        }
    }

    fn chunk(&self, data: abi_stable::std_types::RSlice<'_, u8>) {
        if let Some(chunks) = &self.chunks {
            chunks.send(data.as_slice());
        }
    }
}

/// The last `max_bytes` of a stream of lines, and the whole stream (up to `spool_bytes`) in a
/// [`Spool`] once it outgrows them.
struct Tail {
    lines: VecDeque<String>,
    bytes: usize,
    max_bytes: usize,
    spool_bytes: u64,
    spool: Option<Spool>,
    /// The spool could not be created (no temporary space): tails only.
    spool_failed: bool,
}

impl Tail {
    fn new(max_bytes: usize, spool_bytes: u64) -> Self {
        Self {
            lines: VecDeque::new(),
            bytes: 0,
            max_bytes,
            spool_bytes,
            spool: None,
            spool_failed: false,
        }
    }

    fn push(&mut self, line: &str) {
        if self.spool.is_none()
            && !self.spool_failed
            && self.spool_bytes > 0
            && self.bytes + line.len() + 1 > self.max_bytes
        {
            // The tail is about to lose its first line: from now on the whole stream is kept.
            match Spool::create(self.spool_bytes) {
                Ok(mut spool) => {
                    for old in &self.lines {
                        spool.write_line(old);
                    }
                    self.spool = Some(spool);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot keep a whole output stream; only its tail is returned");
                    self.spool_failed = true;
                }
            }
        }
        if let Some(spool) = &mut self.spool {
            spool.write_line(line);
        }
        self.bytes += line.len() + 1;
        self.lines.push_back(line.to_owned());
        while self.bytes > self.max_bytes {
            match self.lines.pop_front() {
                Some(old) => self.bytes -= old.len() + 1,
                None => break,
            }
        }
    }

    /// The tail as text, and the whole stream when it outgrew the tail.
    fn into_parts(self) -> (String, Option<Spool>) {
        let mut text = String::with_capacity(self.bytes);
        for line in self.lines {
            text.push_str(&line);
            text.push('\n');
        }
        (text, self.spool)
    }
}

/// One output stream from its start, in an unnamed temporary file (gone when dropped), up to
/// `max_bytes`; lines past it are left out (the tail still has the end).
struct Spool {
    file: std::io::BufWriter<std::fs::File>,
    written: u64,
    max_bytes: u64,
    error: Option<std::io::Error>,
}

impl Spool {
    fn create(max_bytes: u64) -> std::io::Result<Self> {
        Ok(Self {
            file: std::io::BufWriter::with_capacity(64 * 1024, tempfile::tempfile()?),
            written: 0,
            max_bytes,
            error: None,
        })
    }

    fn write_line(&mut self, line: &str) {
        use std::io::Write;
        let bytes = line.len() as u64 + 1;
        if self.error.is_some() || self.written + bytes > self.max_bytes {
            return;
        }
        match self
            .file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.write_all(b"\n"))
        {
            Ok(()) => self.written += bytes,
            Err(e) => self.error = Some(e),
        }
    }

    /// Everything written (blocking file I/O).
    fn read_back(self) -> std::io::Result<Vec<u8>> {
        use std::io::{Read, Seek};
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut file = self.file.into_inner().map_err(|e| e.into_error())?;
        file.rewind()?;
        let mut content = Vec::with_capacity(usize::try_from(self.written).unwrap_or(0));
        file.read_to_end(&mut content)?;
        Ok(content)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_longer_than_its_tail_is_kept_whole_up_to_its_cap() {
        // Within the tail: nothing spooled.
        let mut short = Tail::new(100, 1_000);
        short.push("one");
        short.push("two");
        let (text, spool) = short.into_parts();
        assert_eq!(text, "one\ntwo\n");
        assert!(spool.is_none());
        // Past it: the tail keeps the end, the spool everything from the start.
        let mut long = Tail::new(20, 1_000);
        let lines: Vec<String> = (0..50).map(|i| format!("line {i}")).collect();
        for line in &lines {
            long.push(line);
        }
        let (text, spool) = long.into_parts();
        assert!(text.len() <= 20 && text.ends_with("line 49\n"), "{text:?}");
        let whole = String::from_utf8(spool.unwrap().read_back().unwrap()).unwrap();
        assert_eq!(
            whole,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>()
        );
        // The cap bounds the spool: whole lines from the start, nothing past it.
        let mut capped = Tail::new(20, 30);
        for line in &lines {
            capped.push(line);
        }
        let whole = capped.into_parts().1.unwrap().read_back().unwrap();
        assert_eq!(whole, b"line 0\nline 1\nline 2\nline 3\n");
        // A cap of 0 keeps tails only.
        let mut off = Tail::new(20, 0);
        for line in &lines {
            off.push(line);
        }
        assert!(off.into_parts().1.is_none());
    }

    #[test]
    fn a_result_is_cut_to_fit_one_message_files_first_then_tails() {
        let big = |n: usize| wire::b64_encode(&vec![7u8; n]);
        let mut outcome = ExecutionOutcome {
            kind: ExitKind::Exited,
            exit_code: Some(0),
            message: None,
            elapsed_ms: 1,
            fuel_consumed: None,
            output_files: [
                ("small.txt".to_owned(), big(1_000)),
                ("huge.bin".to_owned(), big(600_000)),
                ("mid.bin".to_owned(), big(300_000)),
            ]
            .into(),
            // Control bytes: each encodes to six bytes of JSON.
            stdout: "\u{1}".repeat(64 * 1024),
            stderr: "ok\n".into(),
            blobs: Default::default(),
            usage: None,
        };
        let cut = fit_outcome(&mut outcome, REPORT_BUDGET_BYTES);
        let encoded = serde_json::to_vec(&outcome).unwrap().len();
        assert!(encoded <= REPORT_BUDGET_BYTES, "{encoded}");
        assert_eq!(cut[0], "output file huge.bin", "largest first: {cut:?}");
        assert!(outcome.output_files.contains_key("small.txt"), "{cut:?}");
        assert!(
            outcome
                .stderr
                .starts_with("ok\n[rhizos] the result was cut")
        );
        // A result that fits is left alone.
        let mut small = outcome.clone();
        small.stderr = "fine\n".into();
        let before = small.clone();
        assert!(fit_outcome(&mut small, REPORT_BUDGET_BYTES).is_empty());
        assert_eq!(small, before);
        // Even a budget below the bare outcome ends (with everything cut that can be).
        let mut tiny = outcome.clone();
        fit_outcome(&mut tiny, 10);
        assert!(tiny.output_files.is_empty());
    }
}
