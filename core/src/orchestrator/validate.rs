//! Submit validation: every field of a `job.submit` is checked here before anything is stored, so
//! a bad request gets a `bad_request` (or `too_large`) reply naming the field and nothing is held.
//! The common fields first, then one function per workload kind. Every limit is in [`limits`].

use rhizos_broker::validate_token;
use rhizos_broker::wire::{self, ErrorCode, JobSpec, SubmitJob, WireError, Workload};

/// What a submit may ask for. Requests past these are refused before anything is stored.
pub mod limits {
    use rhizos_broker::wire::MICROS_PER_USD;

    /// Largest WASM module, CUDA program or plugin payload accepted inline in a submit.
    pub const MAX_INLINE_MODULE_BYTES: usize = 512 * 1024;
    /// Longest execution deadline a job may ask for.
    pub const MAX_TIMEOUT_MS: u64 = 24 * 3_600_000;
    /// Largest `max_cost` accepted, and largest single deposit: $1,000,000.
    pub const MAX_COST_MICROS: i64 = 1_000_000 * MICROS_PER_USD;
    /// Most retries a job may ask for.
    pub const MAX_RETRIES: u32 = 10;
    /// Longest queue or total timeout a job may ask for: 30 days.
    pub const MAX_JOB_LIFETIME_MS: u64 = 30 * 24 * 3_600_000;
    /// Largest memory limit: 1 TiB.
    pub const MAX_MEMORY_MIB: u64 = 1024 * 1024;
    pub const MAX_CPU_CORES: u32 = 1024;
    pub const MAX_GPUS: u32 = 64;
    pub const MAX_GPU_APIS: usize = 16;
    pub const MAX_ARGS: usize = 1024;
    pub const MAX_ARG_BYTES: usize = 4096;
    pub const MAX_ENV_VARS: usize = 1024;
    pub const MAX_INPUT_FILES: usize = 256;

    /// What a node may register with (and heartbeat): every figure it states is range-checked
    /// so no formula over them can overflow and no list costs unbounded work.
    pub const MIN_HEARTBEAT_INTERVAL_MS: u64 = 100;
    pub const MAX_HEARTBEAT_INTERVAL_MS: u64 = 5 * 60_000;
    /// Most executions one node may run at once (and list as running).
    pub const MAX_NODE_CONCURRENCY: u32 = 1024;
    /// Highest hourly price per core, GiB or GPU: $1,000,000 per hour.
    pub const MAX_PRICE_CENTS_PER_HOUR: u64 = 100_000_000;
    /// Highest fuel price: $1,000,000 per million units.
    pub const MAX_FUEL_PRICE_MICROS: u64 = 1_000_000 * MICROS_PER_USD as u64;
    pub const MAX_NODE_CPU_CORES: u32 = 16_384;
    /// 64 TiB.
    pub const MAX_NODE_MEMORY_MIB: u64 = 64 * 1024 * 1024;
    pub const MAX_NODE_GPUS: usize = 64;
    pub const MAX_NODE_LIST: usize = 256;
    /// Most nodes enrolled for one provider account.
    pub const MAX_NODES_PER_PROVIDER: u32 = 10_000;
}

use limits::*;
use rhizos_broker::wire::RegisterNode;

pub(super) fn token(result: Result<(), rhizos_broker::TokenError>) -> Result<(), WireError> {
    result.map_err(|e| WireError::new(ErrorCode::BadRequest, e.to_string()))
}

/// A user or provider account name: a token, and none of the ledger's own accounts.
pub(super) fn party_account(what: &'static str, account: &str) -> Result<(), WireError> {
    token(validate_token(what, account))?;
    if crate::ledger::is_reserved(account) {
        return Err(bad(format!(
            "{what} {account:?} is reserved for the ledger (external, platform:*, escrow:*): choose another name"
        )));
    }
    Ok(())
}

pub(super) fn bad(message: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::BadRequest, message)
}

fn too_large(what: &str, bytes: usize) -> WireError {
    WireError::new(
        ErrorCode::TooLarge,
        format!("{what} is {bytes} bytes, the inline limit is {MAX_INLINE_MODULE_BYTES}"),
    )
}

/// Checks every field of a submit before anything is stored.
pub fn validate_submit(request: &SubmitJob, job_id: &str) -> Result<(), WireError> {
    party_account("account", &request.account)?;
    token(validate_token("job id", job_id))?;
    if request.max_cost_micros <= 0 || request.max_cost_micros > MAX_COST_MICROS {
        return Err(bad(format!(
            "max_cost_micros must be between 1 and {MAX_COST_MICROS}, got {}",
            request.max_cost_micros
        )));
    }
    validate_spec(&request.spec)
}

/// Checks every field of a job spec (a submit's, a flow step's) whose module, if any, was
/// resolved.
pub fn validate_spec(spec: &JobSpec) -> Result<(), WireError> {
    if !spec.input_blobs.is_empty() {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            "input_blobs: set by flows only (a step's output passed to the next); send your own files as input_files",
        ));
    }
    validate_resources(spec)?;
    validate_process(spec)?;
    if let Some(url) = &spec.artifact_url {
        return validate_by_reference(spec, url);
    }
    match &spec.workload {
        Workload::Wasm { module_b64 } => validate_wasm(module_b64),
        Workload::Docker {
            image,
            entrypoint,
            workdir,
            network: _,
        } => validate_docker(image, entrypoint.as_deref(), workdir.as_deref()),
        Workload::Cuda { program_b64 } => validate_cuda(spec, program_b64),
        Workload::Module { uri } => Err(bad(format!(
            "{uri} was not resolved (module workloads are resolved at submit)"
        ))),
        Workload::Custom { name, payload_b64 } => validate_custom(name, payload_b64),
        Workload::Inference {
            service,
            model,
            via,
            request,
            max_input_units,
            max_output_units,
        } => {
            if spec.gpus > 0 || !spec.input_files.is_empty() || spec.stdin_b64.is_some() {
                return Err(bad(
                    "an inference job takes no GPUs, input files or stdin of its own (the node's backend has them)",
                ));
            }
            validate_inference(
                service,
                model,
                via,
                request,
                *max_input_units,
                *max_output_units,
            )
        }
    }
}

/// Most units one inference job may hold for (a million tokens in and out).
pub const MAX_INFERENCE_UNITS: u64 = 1_000_000;
/// Most models one node may offer.
pub const MAX_NODE_MODELS: usize = 256;

fn validate_inference(
    service: &str,
    model: &str,
    via: &str,
    request: &str,
    max_input_units: u64,
    max_output_units: u64,
) -> Result<(), WireError> {
    use rhizos_plugin_api::ai;
    let Some(parsed_service) = ai::Service::parse(service) else {
        return Err(bad(format!(
            "workload.service {service:?} is not one of chat, embeddings, speech, scrape"
        )));
    };
    if !ai::is_model_name(model) {
        return Err(bad(format!(
            "workload.model {model:?} is not a model name (1-64 of [a-z0-9._:-])"
        )));
    }
    if !via.is_empty() {
        token(validate_token("workload.via", via))?;
    }
    if request.len() > MAX_INLINE_MODULE_BYTES {
        return Err(too_large("workload request", request.len()));
    }
    let parsed: ai::AiRequest = serde_json::from_str(request)
        .map_err(|e| bad(format!("workload.request is not a valid AI request: {e}")))?;
    if parsed.service != parsed_service || parsed.model != model {
        return Err(bad(
            "workload.request names another service or model than the workload",
        ));
    }
    for (name, units) in [
        ("max_input_units", max_input_units),
        ("max_output_units", max_output_units),
    ] {
        if units > MAX_INFERENCE_UNITS {
            return Err(bad(format!(
                "workload.{name} {units} is above {MAX_INFERENCE_UNITS}"
            )));
        }
    }
    if max_input_units == 0 {
        return Err(bad("workload.max_input_units must be at least 1"));
    }
    Ok(())
}

/// Time, memory, cores, GPUs and retries.
fn validate_resources(spec: &JobSpec) -> Result<(), WireError> {
    if spec.timeout_ms == 0 || spec.timeout_ms > MAX_TIMEOUT_MS {
        return Err(bad(format!(
            "timeout_ms must be between 1 and {MAX_TIMEOUT_MS}, got {}",
            spec.timeout_ms
        )));
    }
    if spec.memory_mib == 0 || spec.memory_mib > MAX_MEMORY_MIB {
        return Err(bad(format!(
            "memory_mib must be between 1 and {MAX_MEMORY_MIB}, got {}",
            spec.memory_mib
        )));
    }
    for (name, value) in [
        ("queue_timeout_ms", spec.queue_timeout_ms),
        ("total_timeout_ms", spec.total_timeout_ms),
    ] {
        if let Some(ms) = value
            && (ms == 0 || ms > MAX_JOB_LIFETIME_MS)
        {
            return Err(bad(format!(
                "{name} must be between 1 and {MAX_JOB_LIFETIME_MS}, got {ms}"
            )));
        }
    }
    if spec.gpus > MAX_GPUS || spec.gpu_apis.len() > MAX_GPU_APIS {
        return Err(bad(format!(
            "at most {MAX_GPUS} GPUs and {MAX_GPU_APIS} GPU APIs per job"
        )));
    }
    for api in &spec.gpu_apis {
        token(validate_token("GPU API", api))?;
    }
    if spec.max_retries > MAX_RETRIES {
        return Err(bad(format!(
            "max_retries must be at most {MAX_RETRIES}, got {}",
            spec.max_retries
        )));
    }
    // An inference job runs on the node's model server, which has its own concurrency: it
    // takes no cores of the node's (the node's max_concurrent bounds how many run at once).
    let min_cores = u32::from(!matches!(spec.workload, Workload::Inference { .. }));
    if spec.cpu_cores < min_cores || spec.cpu_cores > MAX_CPU_CORES {
        return Err(bad(format!(
            "cpu_cores must be between {min_cores} and {MAX_CPU_CORES}, got {}",
            spec.cpu_cores
        )));
    }
    Ok(())
}

/// Arguments, environment, stdin and input files.
fn validate_process(spec: &JobSpec) -> Result<(), WireError> {
    if spec.args.len() > MAX_ARGS || spec.args.iter().any(|a| a.len() > MAX_ARG_BYTES) {
        return Err(bad(format!(
            "at most {MAX_ARGS} args of at most {MAX_ARG_BYTES} bytes each"
        )));
    }
    if spec.env.len() > MAX_ENV_VARS
        || spec
            .env
            .keys()
            .any(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
    {
        return Err(bad(format!(
            "env: at most {MAX_ENV_VARS} variables; names must be non-empty without '=' or NUL"
        )));
    }
    if let Some(stdin) = &spec.stdin_b64 {
        wire::b64_decode("stdin_b64", stdin)?;
    }
    if spec.input_files.len() > MAX_INPUT_FILES {
        return Err(bad(format!("input_files: at most {MAX_INPUT_FILES} files")));
    }
    for (name, content) in &spec.input_files {
        if !wire::valid_file_path(name) {
            return Err(bad(format!(
                "input_files: {name:?} is not a plain relative path (no leading '/', no '.' or '..' segments, at most 255 bytes)"
            )));
        }
        wire::b64_decode(&format!("input_files[{name}]"), content)?;
    }
    Ok(())
}

fn validate_wasm(module_b64: &str) -> Result<(), WireError> {
    let module = wire::b64_decode("workload.module_b64", module_b64)?;
    if module.is_empty() {
        return Err(bad("workload.module_b64 is empty"));
    }
    if module.len() > MAX_INLINE_MODULE_BYTES {
        return Err(too_large("WASM module", module.len()));
    }
    let is_binary = module.starts_with(b"\0asm");
    let is_text = std::str::from_utf8(&module).is_ok_and(|t| t.trim_start().starts_with('('));
    if !is_binary && !is_text {
        return Err(bad(
            "workload.module_b64 is neither a WASM binary (\\0asm) nor WAT text",
        ));
    }
    Ok(())
}

fn validate_docker(
    image: &str,
    entrypoint: Option<&[String]>,
    workdir: Option<&str>,
) -> Result<(), WireError> {
    if !wire::valid_image_ref(image) {
        return Err(bad(format!(
            "workload.image {image:?} is not a Docker image reference ([host[:port]/]name[:tag][@sha256:…], lowercase name)"
        )));
    }
    if entrypoint.is_some_and(<[String]>::is_empty) {
        return Err(bad(
            "workload.entrypoint is empty: leave it out to keep the image's",
        ));
    }
    if let Some(dir) = workdir
        && !dir.starts_with('/')
    {
        return Err(bad(format!(
            "workload.workdir {dir:?} must be an absolute path"
        )));
    }
    Ok(())
}

fn validate_cuda(spec: &JobSpec, program_b64: &str) -> Result<(), WireError> {
    let program = wire::b64_decode("workload.program_b64", program_b64)?;
    if !program.starts_with(b"\x7fELF") {
        return Err(bad(
            "workload.program_b64 is not a Linux executable (ELF): build it for x86-64 Linux",
        ));
    }
    if program.len() > MAX_INLINE_MODULE_BYTES {
        return Err(too_large("CUDA program", program.len()));
    }
    if spec.gpus == 0 {
        return Err(bad("a cuda job needs at least one GPU: set gpus"));
    }
    Ok(())
}

fn validate_custom(name: &str, payload_b64: &str) -> Result<(), WireError> {
    token(validate_token("workload.name", name))?;
    if matches!(name, "wasm" | "docker" | "cuda" | "custom") {
        return Err(bad(format!(
            "workload.name {name:?} is a built-in backend: use its own workload form"
        )));
    }
    let payload = wire::b64_decode("workload.payload_b64", payload_b64)?;
    if payload.len() > MAX_INLINE_MODULE_BYTES {
        return Err(too_large("workload payload", payload.len()));
    }
    Ok(())
}

/// A workload whose bytes the node fetches from `url`: the form of the URL, a digest to check
/// them against, and an empty bytes field.
fn validate_by_reference(spec: &JobSpec, url: &str) -> Result<(), WireError> {
    wire::validate_artifact_url(url).map_err(bad)?;
    if !spec
        .artifact_sha256
        .as_deref()
        .is_some_and(|d| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(bad(
            "artifact_url needs artifact_sha256 (64 hex digits): a node runs only the bytes with that digest",
        ));
    }
    let (field, bytes) = match &spec.workload {
        Workload::Wasm { module_b64 } => ("module_b64", module_b64),
        Workload::Cuda { program_b64 } => {
            if spec.gpus == 0 {
                return Err(bad("a cuda job needs at least one GPU: set gpus"));
            }
            ("program_b64", program_b64)
        }
        Workload::Custom { name, payload_b64 } => {
            token(validate_token("workload.name", name))?;
            ("payload_b64", payload_b64)
        }
        _ => {
            return Err(bad(
                "artifact_url gives the bytes of a wasm, cuda or plugin-backend workload; a docker job names its image",
            ));
        }
    };
    if !bytes.is_empty() {
        return Err(bad(format!(
            "workload.{field} must be empty when artifact_url gives the bytes"
        )));
    }
    Ok(())
}

/// A registration's stated figures within [`limits`]: the heartbeat interval, capacity, prices
/// and list lengths (a node near `u64::MAX` would overflow the loss detector's and the cost
/// formula's arithmetic, or cost the orchestrator work per entry).
pub fn validate_registration(registration: &RegisterNode) -> Result<(), WireError> {
    let interval = registration.heartbeat_interval_ms;
    if !(MIN_HEARTBEAT_INTERVAL_MS..=MAX_HEARTBEAT_INTERVAL_MS).contains(&interval) {
        return Err(bad(format!(
            "heartbeat_interval_ms {interval} is outside {MIN_HEARTBEAT_INTERVAL_MS}..={MAX_HEARTBEAT_INTERVAL_MS}"
        )));
    }
    if !(1..=MAX_NODE_CONCURRENCY).contains(&registration.max_concurrent) {
        return Err(bad(format!(
            "max_concurrent {} is outside 1..={MAX_NODE_CONCURRENCY}",
            registration.max_concurrent
        )));
    }
    if registration.running.len() > registration.max_concurrent as usize {
        return Err(bad(format!(
            "the registration lists {} running executions, more than its max_concurrent {}",
            registration.running.len(),
            registration.max_concurrent
        )));
    }
    let pricing = &registration.pricing;
    for (name, price) in [
        ("pricing.cpu_hour_cents", pricing.cpu_hour_cents),
        ("pricing.memory_gb_hour_cents", pricing.memory_gb_hour_cents),
        ("pricing.gpu_hour_cents", pricing.gpu_hour_cents),
    ] {
        if price > MAX_PRICE_CENTS_PER_HOUR {
            return Err(bad(format!(
                "{name} {price} is above the most a node may ask ({MAX_PRICE_CENTS_PER_HOUR} cents per hour)"
            )));
        }
    }
    if pricing.fuel_million_micros > MAX_FUEL_PRICE_MICROS {
        return Err(bad(format!(
            "pricing.fuel_million_micros {} is above {MAX_FUEL_PRICE_MICROS}",
            pricing.fuel_million_micros
        )));
    }
    for (name, price) in [
        ("pricing.input_million_micros", pricing.input_million_micros),
        (
            "pricing.output_million_micros",
            pricing.output_million_micros,
        ),
    ] {
        if price > MAX_FUEL_PRICE_MICROS {
            return Err(bad(format!(
                "{name} {price} is above {MAX_FUEL_PRICE_MICROS}"
            )));
        }
    }
    if registration.models.len() > MAX_NODE_MODELS {
        return Err(bad(format!(
            "{} models listed; at most {MAX_NODE_MODELS}",
            registration.models.len()
        )));
    }
    for offer in &registration.models {
        if rhizos_plugin_api::ai::Service::parse(&offer.service).is_none()
            || !rhizos_plugin_api::ai::is_model_name(&offer.name)
            || validate_token("model backend", &offer.backend).is_err()
            || !registration.backends.contains(&offer.backend)
        {
            return Err(bad(format!(
                "model offer {:?} ({} via {}) is not a valid model, service and offered backend",
                offer.name, offer.service, offer.backend
            )));
        }
        if offer.input_million_micros > MAX_FUEL_PRICE_MICROS
            || offer.output_million_micros > MAX_FUEL_PRICE_MICROS
        {
            return Err(bad(format!(
                "model {} is priced above {MAX_FUEL_PRICE_MICROS} micro-USD per million units",
                offer.name
            )));
        }
    }
    if registration.cpu_cores > MAX_NODE_CPU_CORES || registration.memory_mib > MAX_NODE_MEMORY_MIB
    {
        return Err(bad(format!(
            "cpu_cores {} / memory_mib {} are above {MAX_NODE_CPU_CORES} / {MAX_NODE_MEMORY_MIB}",
            registration.cpu_cores, registration.memory_mib
        )));
    }
    if registration.gpus.len() > MAX_NODE_GPUS {
        return Err(bad(format!(
            "{} GPUs listed; at most {MAX_NODE_GPUS}",
            registration.gpus.len()
        )));
    }
    for (name, len) in [
        ("backends", registration.backends.len()),
        ("plugins", registration.plugins.len()),
        ("artifact_sources", registration.artifact_sources.len()),
    ] {
        if len > MAX_NODE_LIST {
            return Err(bad(format!("{len} {name} listed; at most {MAX_NODE_LIST}")));
        }
    }
    for backend in &registration.backends {
        token(validate_token("backend", backend))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rhizos_broker::wire::WIRE_VERSION;

    fn by_reference(workload: Workload, sha256: Option<&str>, url: &str) -> SubmitJob {
        let mut spec = JobSpec::new(workload, 1_000, 64);
        spec.artifact_url = Some(url.to_owned());
        spec.artifact_sha256 = sha256.map(str::to_owned);
        SubmitJob {
            v: WIRE_VERSION,
            job_id: None,
            account: "a".into(),
            spec,
            max_cost_micros: 1_000,
            api_key_sha256: None,
        }
    }

    fn wasm(bytes: &str) -> Workload {
        Workload::Wasm {
            module_b64: bytes.into(),
        }
    }

    #[test]
    fn a_workload_by_reference_needs_a_digest_an_http_url_and_no_inline_bytes() {
        let digest = "ab".repeat(32);
        let check = |request: SubmitJob| validate_submit(&request, "j").map_err(|e| e.message);
        assert_eq!(
            check(by_reference(
                wasm(""),
                Some(&digest),
                "https://r.example/a.wasm"
            )),
            Ok(())
        );
        let cases = [
            (
                by_reference(wasm(""), None, "https://r.example/a.wasm"),
                "artifact_url needs artifact_sha256",
            ),
            (
                by_reference(wasm(""), Some("abc"), "https://r.example/a.wasm"),
                "artifact_url needs artifact_sha256",
            ),
            (
                by_reference(wasm(""), Some(&digest), "file:///etc/passwd"),
                "must start with http:// or https://",
            ),
            (
                by_reference(wasm(""), Some(&digest), "https://r.example/a b"),
                "without whitespace",
            ),
            (
                by_reference(wasm("AGFzbQ=="), Some(&digest), "https://r.example/a.wasm"),
                "workload.module_b64 must be empty",
            ),
            (
                by_reference(
                    Workload::Docker {
                        image: "alpine".into(),
                        entrypoint: None,
                        workdir: None,
                        network: false,
                    },
                    Some(&digest),
                    "https://r.example/a",
                ),
                "a docker job names its image",
            ),
            (
                by_reference(
                    Workload::Cuda {
                        program_b64: String::new(),
                    },
                    Some(&digest),
                    "https://r.example/a",
                ),
                "needs at least one GPU",
            ),
        ];
        for (request, expected) in cases {
            let err = check(request).unwrap_err();
            assert!(err.contains(expected), "{err} (expected {expected:?})");
        }
    }

    #[test]
    fn the_ledgers_own_accounts_cannot_be_taken_by_users_or_providers() {
        for reserved in ["external", "platform:fees", "escrow:j1"] {
            let err = party_account("account", reserved).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "{reserved}");
        }
        let err = party_account("provider account", "external").unwrap_err();
        assert!(
            err.message.contains("reserved for the ledger"),
            "{}",
            err.message
        );
        assert!(party_account("account", "externals").is_ok());
        assert!(party_account("account", "alice").is_ok());
        let mut submit = by_reference(wasm(""), Some(&"ab".repeat(32)), "https://r.example/a");
        submit.account = "external".into();
        assert!(
            validate_submit(&submit, "j")
                .unwrap_err()
                .message
                .contains("reserved")
        );
    }

    #[test]
    fn registrations_are_range_checked_so_nothing_overflows() {
        let good = RegisterNode {
            v: WIRE_VERSION,
            node_id: "n".into(),
            provider_account: "p".into(),
            backends: vec!["wasm".into()],
            pricing: rhizos_broker::wire::Pricing {
                gpu_hour_cents: 90,
                cpu_hour_cents: 4,
                memory_gb_hour_cents: 1,
                fuel_million_micros: 10,
                input_million_micros: 0,
                output_million_micros: 0,
            },
            cpu_cores: 8,
            memory_mib: 16_384,
            max_concurrent: 2,
            heartbeat_interval_ms: 5_000,
            plugins: vec![],
            running: vec![],
            gpus: vec![],
            disk_mib: 0,
            hardware: None,
            artifact_sources: vec![],
            models: vec![],
        };
        assert!(validate_registration(&good).is_ok());
        let running = |n: usize| {
            (0..n)
                .map(|i| rhizos_broker::wire::ExecutionRef {
                    job_id: format!("j{i}"),
                    attempt: 1,
                })
                .collect()
        };
        #[allow(clippy::type_complexity)]
        let cases: Vec<(Box<dyn Fn(&mut RegisterNode)>, &str)> = vec![
            (
                Box::new(|r| r.heartbeat_interval_ms = u64::MAX),
                "heartbeat_interval_ms 18446744073709551615 is outside",
            ),
            (
                Box::new(|r| r.heartbeat_interval_ms = 0),
                "heartbeat_interval_ms 0 is outside",
            ),
            (
                Box::new(|r| r.max_concurrent = 0),
                "max_concurrent 0 is outside",
            ),
            (
                Box::new(|r| r.max_concurrent = u32::MAX),
                "max_concurrent 4294967295 is outside",
            ),
            (
                Box::new(move |r| r.running = running(3)),
                "lists 3 running executions, more than its max_concurrent 2",
            ),
            (
                Box::new(|r| r.pricing.cpu_hour_cents = u64::MAX),
                "pricing.cpu_hour_cents",
            ),
            (
                Box::new(|r| r.pricing.gpu_hour_cents = MAX_PRICE_CENTS_PER_HOUR + 1),
                "pricing.gpu_hour_cents",
            ),
            (
                Box::new(|r| r.pricing.fuel_million_micros = u64::MAX),
                "pricing.fuel_million_micros",
            ),
            (Box::new(|r| r.memory_mib = u64::MAX), "memory_mib"),
            (
                Box::new(|r| r.backends = vec!["x".into(); MAX_NODE_LIST + 1]),
                "backends listed",
            ),
            (
                Box::new(|r| r.backends = vec!["Not A Token".into()]),
                "backend",
            ),
        ];
        for (change, expected) in cases {
            let mut registration = good.clone();
            change(&mut registration);
            let error = validate_registration(&registration).unwrap_err();
            assert_eq!(error.code, ErrorCode::BadRequest);
            assert!(
                error.message.contains(expected),
                "{} / {expected}",
                error.message
            );
        }
        // At the limits, the cost of a whole day on the largest node still fits an i64.
        let top = rhizos_broker::wire::Pricing {
            gpu_hour_cents: MAX_PRICE_CENTS_PER_HOUR,
            cpu_hour_cents: MAX_PRICE_CENTS_PER_HOUR,
            memory_gb_hour_cents: MAX_PRICE_CENTS_PER_HOUR,
            fuel_million_micros: MAX_FUEL_PRICE_MICROS,
            input_million_micros: 0,
            output_million_micros: 0,
        };
        let day = crate::ledger::cost_micros(
            MAX_TIMEOUT_MS,
            MAX_CPU_CORES,
            MAX_MEMORY_MIB,
            MAX_GPUS,
            &top,
        );
        assert!(day < i64::MAX, "{day}");
    }
}
