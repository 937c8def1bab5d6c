//! Helpers shared by the end-to-end tests.

use rhizos_broker::wire::{JobSpec, SubmitJob, WIRE_VERSION};
use rhizos_testbed::{Cluster, ClusterOptions};
use std::collections::HashMap;

pub async fn cluster() -> Cluster {
    Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster starts")
}

pub fn demo() -> Vec<u8> {
    std::fs::read(rhizos_testbed::guests::demo_wasm().expect("demo guest builds"))
        .expect("demo guest readable")
}

pub fn submit_request(
    account: &str,
    job_id: &str,
    spec: JobSpec,
    max_cost_micros: i64,
) -> SubmitJob {
    SubmitJob {
        v: WIRE_VERSION,
        job_id: Some(job_id.into()),
        account: account.into(),
        spec,
        max_cost_micros,
        api_key_sha256: None,
    }
}

/// Every account balance, read straight from the ledger file.
pub fn balances(cluster: &Cluster) -> HashMap<String, i64> {
    let conn = rusqlite::Connection::open(cluster.ledger_path()).expect("ledger opens");
    let mut statement = conn
        .prepare("SELECT id, balance_micros FROM accounts")
        .expect("query");
    statement
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("rows")
        .map(|r| r.expect("row"))
        .collect()
}

/// Ledger transactions recorded for a job, by kind.
pub fn ledger_kinds(cluster: &Cluster, job_id: &str) -> Vec<String> {
    let conn = rusqlite::Connection::open(cluster.ledger_path()).expect("ledger opens");
    let mut statement = conn
        .prepare("SELECT kind FROM ledger_tx WHERE job_id = ?1 ORDER BY id")
        .expect("query");
    statement
        .query_map([job_id], |r| r.get(0))
        .expect("rows")
        .map(|r| r.expect("row"))
        .collect()
}

pub async fn assert_ledger_consistent(cluster: &Cluster) {
    let report = cluster
        .orchestrator
        .verify_ledger()
        .await
        .expect("verify runs");
    assert!(report.ok, "ledger invariants broken: {:?}", report.problems);
    assert_eq!(report.postings_sum_micros, 0);
}

/// Submits `spec` as `job_id` for `account` and waits (up to 60 s) until it has ended.
pub async fn run_to_end(
    cluster: &Cluster,
    account: &str,
    job_id: &str,
    spec: JobSpec,
    max_cost_micros: i64,
) -> rhizos_broker::wire::JobView {
    cluster
        .submit(&submit_request(account, job_id, spec, max_cost_micros))
        .await
        .unwrap();
    cluster
        .wait_for_end(job_id, std::time::Duration::from_secs(60))
        .await
        .unwrap()
}

/// Subscribes to `job_id`'s log lines as `account`'s watcher would, before the job is submitted
/// (the subscription is in place when this returns).
pub async fn follow_logs(cluster: &Cluster, account: &str, job_id: &str) -> async_nats::Subscriber {
    let subject = cluster
        .bus
        .subjects
        .job_logs_of(Some(account), job_id)
        .unwrap();
    let logs = cluster.bus.client.subscribe(subject).await.unwrap();
    cluster.bus.client.flush().await.unwrap();
    logs
}

/// The registration of a node the test speaks for (no agent behind it): 4 cores, wasm only,
/// heartbeats promised every 300 ms.
pub fn hand_rolled_registration(
    node_id: &str,
    provider: &str,
) -> rhizos_broker::wire::RegisterNode {
    rhizos_broker::wire::RegisterNode {
        v: WIRE_VERSION,
        node_id: node_id.into(),
        provider_account: provider.into(),
        backends: vec!["wasm".into()],
        pricing: rhizos_testbed::ClusterOptions::default().pricing,
        cpu_cores: 4,
        memory_mib: 4096,
        max_concurrent: 4,
        heartbeat_interval_ms: 300,
        plugins: vec![],
        running: vec![],
        gpus: vec![],
        disk_mib: 10_000,
        hardware: None,
        artifact_sources: vec![],
        models: vec![],
    }
}

/// A resolver dir holding the `http` resolver plugin (as `http.so`).
pub fn http_resolver_dir() -> tempfile::TempDir {
    let resolvers = tempfile::tempdir().unwrap();
    std::fs::copy(
        rhizos_testbed::plugin_file("rhizos_plugin_resolver_http").unwrap(),
        resolvers.path().join("http.so"),
    )
    .unwrap();
    resolvers
}

/// `<dir>/plugins` holding the built WASM backend plugin: an agent's plugin dir.
pub fn wasm_plugin_dir(dir: &std::path::Path) -> std::path::PathBuf {
    let plugin_dir = dir.join("plugins");
    std::fs::create_dir_all(&plugin_dir).unwrap();
    std::fs::copy(
        rhizos_testbed::plugin_file("rhizos_plugin_wasm").unwrap(),
        plugin_dir.join("librhizos_plugin_wasm.so"),
    )
    .unwrap();
    plugin_dir
}

/// The real `rhizos` CLI against one network, the way a user runs it: its URL and namespace in
/// the environment, its own config home (where `rhizos up` records the network).
pub struct RhizosCli {
    pub url: String,
    pub namespace: String,
    pub home: std::path::PathBuf,
}

impl RhizosCli {
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(rhizos_testbed::build_dir().join("rhizos"));
        command
            .args(args)
            .env("RHIZOS_NATS_URL", &self.url)
            .env("RHIZOS_NAMESPACE", &self.namespace)
            .env("XDG_CONFIG_HOME", &self.home)
            .env("RHIZOS_PRICING__CPU_HOUR_CENTS", "3600");
        command
    }
}

/// Runs `command` to its end: whether it succeeded, and its stdout and stderr together.
pub fn run(command: &mut std::process::Command) -> (bool, String) {
    let output = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// The events the namespace's event stream holds on `subjects` (an ordered consumer from the
/// start), read until none more comes for `quiet`.
pub async fn stored_events(
    bus: &rhizos_broker::Bus,
    subjects: Vec<String>,
    quiet: std::time::Duration,
) -> Vec<rhizos_broker::wire::Event> {
    use futures::StreamExt as _;
    let stream = bus.ensure_event_stream().await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subjects: subjects,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut events = Vec::new();
    while let Ok(Some(Ok(message))) = tokio::time::timeout(quiet, messages.next()).await {
        events.push(serde_json::from_slice(&message.payload).unwrap());
    }
    events
}
