//! Test doubles for what cannot run here, each following the real API exactly.
//!
//! [`NvmlDouble`]: a stand-in NVIDIA driver library (`libnvidia-ml.so.1`, built from
//! `testbed/doubles/nvml/nvml_double.c`) implementing the NVML C API calls RhizOS makes, with GPUs
//! the test declares. It is what lets the CUDA backend's GPU path (detection, allocation,
//! `CUDA_VISIBLE_DEVICES`, VRAM enforcement, telemetry) run on a machine without a GPU. It is a
//! double: nothing here touches a real GPU.

use std::path::{Path, PathBuf};

/// One GPU of the double.
#[derive(Debug, Clone)]
pub struct DoubleGpu {
    pub name: &'static str,
    pub uuid: &'static str,
    pub vram_mib: u64,
    pub compute_capability: &'static str,
}

/// A private copy of the NVML double with its own GPUs (the library reads `gpus` beside itself).
pub struct NvmlDouble {
    dir: tempfile::TempDir,
}

impl NvmlDouble {
    pub fn new(gpus: &[DoubleGpu]) -> anyhow::Result<Self> {
        let source = crate::guests::workspace_root().join("testbed/doubles/nvml/nvml_double.c");
        let built =
            crate::images::compile_c(&source, &["-shared", "-fPIC", "-Wall"], "libnvidia-ml.so.1")?;
        let dir = tempfile::Builder::new().prefix("rhizos-nvml-").tempdir()?;
        std::fs::copy(&built, dir.path().join("libnvidia-ml.so.1"))?;
        let lines: String = gpus
            .iter()
            .map(|g| {
                format!(
                    "{}|{}|{}|{}\n",
                    g.name, g.uuid, g.vram_mib, g.compute_capability
                )
            })
            .collect();
        std::fs::write(dir.path().join("gpus"), lines)?;
        std::fs::create_dir_all(dir.path().join("procs"))?;
        // Programs run under uids of their own (the cuda plugin's isolation) "allocate VRAM" by
        // writing procs/<pid>, as the real driver would record it for any process.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(
            dir.path().join("procs"),
            std::fs::Permissions::from_mode(0o1777),
        )?;
        Ok(Self { dir })
    }

    /// The library to hand to `[agent] nvml_library` and `[agent.plugins.cuda] nvml_library`.
    pub fn library(&self) -> PathBuf {
        self.dir.path().join("libnvidia-ml.so.1")
    }

    /// The double's directory: a workload that "allocates VRAM" writes `procs/<pid>` here
    /// (pass it to the job as `RHIZOS_NVML_DOUBLE_DIR`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// SUBSTRATE NODE DOUBLE — not a Substrate node. A JSON-RPC 2.0 server over HTTP answering the
/// two calls the `substrate` resolver makes, as the Substrate RPC spec defines them:
/// `chain_getFinalizedHead` (the finalized block's hash) and `state_getStorage(key, at)` (the
/// SCALE-encoded value under `key` at block `at`, or `null`), with JSON-RPC errors for unknown
/// methods, bad params and unknown blocks. Its storage holds what a test puts in it, SCALE
/// encoded as the chain would (`Vec<ModuleVersion { version, manifest }>` under
/// `twox128(pallet) ++ twox128(item) ++ blake2_128_concat(SCALE(id))`).
pub struct SubstrateDouble {
    pub url: String,
    state: std::sync::Arc<std::sync::Mutex<SubstrateState>>,
    _server: crate::registry_server::HttpServer,
}

#[derive(Default)]
struct SubstrateState {
    head: String,
    storage: std::collections::HashMap<Vec<u8>, Vec<u8>>,
    delay: Option<std::time::Duration>,
    calls: Vec<String>,
}

/// One version of a module, as the double stores it.
#[derive(parity_scale_codec::Encode)]
struct ModuleVersion {
    version: Vec<u8>,
    manifest: Vec<u8>,
}

impl SubstrateDouble {
    pub fn start() -> std::io::Result<Self> {
        let state = std::sync::Arc::new(std::sync::Mutex::new(SubstrateState {
            head: format!("0x{}", "ab".repeat(32)),
            ..Default::default()
        }));
        let shared = state.clone();
        let server = crate::registry_server::HttpServer::start(
            None,
            std::sync::Arc::new(move |request: crate::registry_server::Request| {
                let delay = shared
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .delay;
                if let Some(delay) = delay {
                    std::thread::sleep(delay);
                }
                crate::registry_server::Response {
                    status: 200,
                    headers: "Content-Type: application/json\r\n".into(),
                    body: answer_rpc(&request.body, &shared).to_string().into_bytes(),
                }
            }),
        )?;
        Ok(Self {
            url: server.url.clone(),
            state,
            _server: server,
        })
    }

    /// Stores module `id`'s versions (version, manifest JSON) in `pallet::item`.
    pub fn put_module(&self, pallet: &str, item: &str, id: &str, versions: &[(&str, &str)]) {
        use parity_scale_codec::Encode as _;
        let value: Vec<ModuleVersion> = versions
            .iter()
            .map(|(v, m)| ModuleVersion {
                version: v.as_bytes().to_vec(),
                manifest: m.as_bytes().to_vec(),
            })
            .collect();
        self.put_raw(pallet, item, id, value.encode());
    }

    /// Stores arbitrary bytes under module `id`'s key (for malformed-value tests).
    pub fn put_raw(&self, pallet: &str, item: &str, id: &str, value: Vec<u8>) {
        let key = module_key(pallet, item, id);
        self.lock().storage.insert(key, value);
    }

    /// Every answer is delayed this long (for timeout tests).
    pub fn set_delay(&self, delay: Option<std::time::Duration>) {
        self.lock().delay = delay;
    }

    /// The methods called so far.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SubstrateState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn twox128(data: &[u8]) -> Vec<u8> {
    [0u64, 1]
        .iter()
        .flat_map(|seed| twox_hash::XxHash64::oneshot(*seed, data).to_le_bytes())
        .collect()
}

/// `twox128(pallet) ++ twox128(item) ++ blake2_128(SCALE(id)) ++ SCALE(id)`.
fn module_key(pallet: &str, item: &str, id: &str) -> Vec<u8> {
    use blake2::Digest as _;
    use parity_scale_codec::Encode as _;
    let encoded = id.as_bytes().to_vec().encode();
    let mut key = twox128(pallet.as_bytes());
    key.extend(twox128(item.as_bytes()));
    key.extend(blake2::Blake2b::<blake2::digest::consts::U16>::digest(
        &encoded,
    ));
    key.extend(encoded);
    key
}

fn answer_rpc(body: &[u8], state: &std::sync::Mutex<SubstrateState>) -> serde_json::Value {
    let error = |id: serde_json::Value, code: i64, message: &str| serde_json::json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}});
    let Ok(request) = serde_json::from_slice::<serde_json::Value>(body) else {
        return error(serde_json::Value::Null, -32700, "Parse error");
    };
    let id = request["id"].clone();
    let method = request["method"].as_str().unwrap_or_default().to_owned();
    let mut state = state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    state.calls.push(method.clone());
    let result = match method.as_str() {
        "chain_getFinalizedHead" => serde_json::Value::String(state.head.clone()),
        "state_getKeysPaged" => {
            // [prefix, count, startKey?, at?]: keys with the prefix after startKey, in order.
            let params = request["params"].as_array().cloned().unwrap_or_default();
            let hex = |bytes: &[u8]| {
                format!(
                    "0x{}",
                    bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
                )
            };
            let (Some(prefix), Some(count)) = (
                params.first().and_then(|p| p.as_str()),
                params.get(1).and_then(serde_json::Value::as_u64),
            ) else {
                return error(
                    id,
                    -32602,
                    "Invalid params: expected [prefix, count, startKey?, at?]",
                );
            };
            if let Some(at) = params.get(3).and_then(|a| a.as_str())
                && at != state.head
            {
                return error(id, 4003, "Client error: UnknownBlock");
            }
            let start = params
                .get(2)
                .and_then(|s| s.as_str())
                .unwrap_or("")
                .to_owned();
            let mut keys: Vec<String> = state
                .storage
                .keys()
                .map(|k| hex(k))
                .filter(|k| k.starts_with(prefix) && *k > start)
                .collect();
            keys.sort();
            keys.truncate(count as usize);
            serde_json::Value::from(keys)
        }
        "state_getStorage" => {
            let params = request["params"].as_array().cloned().unwrap_or_default();
            let Some(key) = params.first().and_then(|k| k.as_str()) else {
                return error(id, -32602, "Invalid params: expected [key, at?]");
            };
            if let Some(at) = params.get(1).and_then(|a| a.as_str())
                && at != state.head
            {
                return error(
                    id,
                    4003,
                    &format!("Client error: UnknownBlock: State already discarded for {at}"),
                );
            }
            let digits = key.strip_prefix("0x").unwrap_or(key);
            let Some(key) = (0..digits.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(digits.get(i..i + 2)?, 16).ok())
                .collect::<Option<Vec<u8>>>()
            else {
                return error(id, -32602, "Invalid params: key is not hex");
            };
            match state.storage.get(&key) {
                Some(value) => serde_json::Value::String(format!(
                    "0x{}",
                    value.iter().map(|b| format!("{b:02x}")).collect::<String>()
                )),
                None => serde_json::Value::Null,
            }
        }
        _ => return error(id, -32601, "Method not found"),
    };
    serde_json::json!({"jsonrpc": "2.0", "id": id, "result": result})
}
