//! Identity and permissions with authentication on (a real `nats-server` that lets in only the
//! cluster's nkeys): a hostile user and a hostile node try everything they must not do. Each
//! attempt is refused — by the server (a permission violation: the message never reaches anyone)
//! or by the orchestrator (an error reply) — and afterwards the ledger verifies and every
//! balance is exact to the micro.

use crate::common::*;
use rhizos_broker::wire::{
    self, ErrorCode, ExecutionOutcome, ExitKind, JobReport, JobState, ReportPhase, WIRE_VERSION,
};
use rhizos_broker::{Bus, Caller, Client, Credentials, CtlOp};
use rhizos_testbed::cluster::{credentials_path, wasm_spec};
use rhizos_testbed::{Cluster, ClusterOptions};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const USD: i64 = 1_000_000;

/// A connection as `caller` that records the server's errors (permission violations).
pub(crate) async fn connect_as(
    cluster: &Cluster,
    caller: &Caller,
) -> (Bus, Arc<Mutex<Vec<String>>>) {
    let settings = cluster.settings_as(caller).unwrap();
    let creds = Credentials::load(settings.credentials.as_ref().unwrap()).unwrap();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = errors.clone();
    let client = async_nats::ConnectOptions::new()
        .nkey(creds.seed.clone())
        .custom_inbox_prefix(caller.inbox_prefix())
        .request_timeout(Some(Duration::from_millis(1_500)))
        .event_callback(move |event| {
            let seen = seen.clone();
            async move { seen.lock().unwrap().push(event.to_string()) }
        })
        .connect(settings.url.as_str())
        .await
        .unwrap();
    let bus = Bus {
        jetstream: async_nats::jetstream::new(client.clone()),
        client,
        subjects: cluster.bus.subjects.clone(),
        request_timeout: Duration::from_millis(1_500),
        failover_wait: Duration::ZERO,
        identity: Some(caller.clone()),
        signer: None,
        event_limits: cluster.bus.event_limits,
        blob_limits: cluster.bus.blob_limits,
        replicas: cluster.bus.replicas,
    };
    (bus, errors)
}

/// Waits until the server reported a permission violation naming `subject`.
pub(crate) async fn violation(errors: &Arc<Mutex<Vec<String>>>, subject: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if errors
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.contains("Permissions Violation") && e.contains(subject))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no permission violation for {subject}: {:?}",
            errors.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Takes `caller` out of the server's users, reloads it, and waits until `bus` (connected as
/// `caller`) is cut off.
async fn revoke(cluster: &Cluster, caller: &Caller, bus: &Bus) {
    let auth = cluster.auth.as_ref().unwrap();
    auth.remove(&cluster.bus.subjects, caller).unwrap();
    cluster.nats.reload().unwrap();
    let cut = tokio::time::timeout(Duration::from_secs(5), async {
        while bus.client.connection_state() == async_nats::connection::State::Connected {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        cut.is_ok(),
        "{caller} was revoked and its connection stays open"
    );
}

fn refused(result: Result<impl std::fmt::Debug, rhizos_broker::RequestError>, code: ErrorCode) {
    match result {
        Err(e) => assert_eq!(e.remote().map(|r| r.code), Some(code), "{e}"),
        Ok(reply) => panic!("expected {code:?}, got {reply:?}"),
    }
}

pub(crate) async fn secure_cluster(agents: usize) -> Cluster {
    Cluster::start(ClusterOptions {
        agents,
        secure: true,
        ..ClusterOptions::default()
    })
    .await
    .expect("secure cluster starts")
}

#[tokio::test]
async fn a_hostile_user_can_neither_move_money_nor_touch_another_accounts_jobs() {
    let cluster = secure_cluster(1).await;
    let operator = cluster.client();
    cluster.funded_account("alice", 2 * USD).await.unwrap();
    cluster.funded_account("mallory", USD).await.unwrap();
    let alice = cluster.client_as(&Caller::user("alice")).await.unwrap();
    let (mallory_bus, errors) = connect_as(&cluster, &Caller::user("mallory")).await;
    let mallory = Client::new(mallory_bus.clone());

    // Alice's job runs (she watches her own events: allowed).
    let mut alice_events = alice
        .bus()
        .client
        .subscribe(alice.bus().subjects.account_events("alice").unwrap())
        .await
        .unwrap();
    let request = submit_request(
        "alice",
        "alice-1",
        wasm_spec(&demo(), &["count", "2"], 30_000),
        USD,
    );
    alice.submit(&request).await.unwrap();

    // Error replies from the orchestrator (the server lets mallory publish as mallory).
    refused(
        mallory
            .account_deposit("mallory", 100 * USD, Some("mint"))
            .await,
        ErrorCode::Forbidden,
    );
    refused(
        mallory.account_withdraw("mallory", USD, "w1").await,
        ErrorCode::Forbidden,
    );
    refused(
        mallory.account_create("mallory2").await,
        ErrorCode::Forbidden,
    );
    let charged_to_alice = submit_request(
        "alice",
        "m-1",
        wasm_spec(&demo(), &["count", "1"], 30_000),
        USD,
    );
    refused(
        mallory.submit(&charged_to_alice).await,
        ErrorCode::Forbidden,
    );
    refused(mallory.job_get("alice-1").await, ErrorCode::NotFound);
    refused(mallory.job_cancel("alice-1").await, ErrorCode::NotFound);
    refused(
        mallory.job_list(Some("alice"), None, None).await,
        ErrorCode::Forbidden,
    );
    assert!(
        mallory
            .job_list(None, None, None)
            .await
            .unwrap()
            .jobs
            .is_empty(),
        "mallory sees only her own jobs"
    );
    refused(mallory.account_balance("alice").await, ErrorCode::Forbidden);
    refused(
        mallory.account_statement("alice", None).await,
        ErrorCode::Forbidden,
    );
    refused(mallory.ledger_verify().await, ErrorCode::Forbidden);
    refused(
        mallory.node_enroll("evil", "mallory", None).await,
        ErrorCode::Forbidden,
    );
    let registration = wire::RegisterNode {
        node_id: "mallory".into(),
        ..cluster.agents[0].registration()
    };
    refused(mallory_bus.call(&registration).await, ErrorCode::Forbidden);

    let job = cluster
        .wait_for_end("alice-1", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    refused(mallory.receipt_get("alice-1").await, ErrorCode::NotFound);
    // Alice's receipt carries node-0's signature over its result, under its enrolled key.
    let receipt = alice.receipt_get("alice-1").await.unwrap();
    let body = receipt
        .verify(Some(&cluster.orchestrator.public_key()))
        .unwrap();
    let node_creds = credentials_path(cluster.auth.as_ref().unwrap(), &Caller::node("node-0"));
    let node_key = Credentials::load(&node_creds)
        .unwrap()
        .public_key()
        .unwrap();
    assert_eq!(body.node_key.as_deref(), Some(node_key.as_str()));
    assert!(
        body.node_report
            .as_deref()
            .is_some_and(|r| r.contains("alice-1")),
        "{body:?}"
    );
    assert!(
        alice_events.next_timeout().await,
        "alice sees her own job's events"
    );

    // Refused by the server: acting as alice, reading her events and logs, the event stream,
    // JetStream's API, commanding an agent.
    let as_alice = mallory_bus
        .subjects
        .op(CtlOp::AccountDeposit, &Caller::user("alice"))
        .unwrap();
    assert!(
        mallory_bus
            .request::<_, wire::AccountView>(as_alice.clone(), &serde_json::json!({}))
            .await
            .is_err()
    );
    violation(&errors, &as_alice).await;
    let mut snoop = mallory_bus
        .client
        .subscribe(mallory_bus.subjects.account_events("alice").unwrap())
        .await
        .unwrap();
    violation(&errors, "rhizos.evt").await;
    let logs_of_alice = mallory_bus
        .subjects
        .job_logs_of(Some("alice"), "alice-2")
        .unwrap();
    let mut snoop_logs = mallory_bus.client.subscribe(logs_of_alice).await.unwrap();
    violation(&errors, "rhizos.out").await;
    let stream_name = mallory_bus.subjects.event_stream();
    assert!(
        mallory_bus
            .jetstream
            .get_stream(&stream_name)
            .await
            .is_err()
    );
    assert!(
        mallory_bus
            .jetstream
            .delete_stream(&stream_name)
            .await
            .is_err()
    );
    // Purging (JetStream's API request, as a client library sends it) is refused too.
    let purge = format!("$JS.API.STREAM.PURGE.{stream_name}");
    assert!(
        mallory_bus
            .request::<_, serde_json::Value>(purge.clone(), &serde_json::json!({}))
            .await
            .is_err()
    );
    violation(&errors, &purge).await;
    let assign = mallory_bus.subjects.job_assign("node-0").unwrap();
    mallory_bus
        .client
        .publish(assign.clone(), wire::encode(&serde_json::json!({"v": 1})))
        .await
        .unwrap();
    violation(&errors, &assign).await;

    // A second job of alice's: mallory's subscriptions get none of it.
    let second = submit_request(
        "alice",
        "alice-2",
        wasm_spec(&demo(), &["count", "2"], 30_000),
        USD,
    );
    alice.submit(&second).await.unwrap();
    let second = cluster
        .wait_for_end("alice-2", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(second.state, JobState::Succeeded);
    assert!(!snoop.next_timeout().await, "mallory read alice's events");
    assert!(
        !snoop_logs.next_timeout().await,
        "mallory read alice's logs"
    );
    // The stream is intact (nothing purged), and nothing ran but alice's two jobs.
    let mut stream = cluster
        .bus
        .jetstream
        .get_stream(&stream_name)
        .await
        .unwrap();
    assert!(
        stream.info().await.unwrap().state.messages > 0,
        "the event stream was purged"
    );
    assert_eq!(
        operator
            .job_list(None, None, None)
            .await
            .unwrap()
            .jobs
            .len(),
        2
    );

    // Revoked: her connection is closed and a new one refused, without a restart.
    let mallory_creds = credentials_path(cluster.auth.as_ref().unwrap(), &Caller::user("mallory"));
    revoke(&cluster, &Caller::user("mallory"), &mallory_bus).await;
    let mut settings = cluster.settings.nats.clone();
    settings.credentials = Some(mallory_creds);
    assert!(
        Bus::connect(&settings).await.is_err(),
        "revoked credentials connect"
    );
    settings.credentials = None;
    assert!(
        Bus::connect(&settings).await.is_err(),
        "no credentials connect"
    );

    let report = operator.ledger_verify().await.unwrap();
    assert!(report.ok, "{:?}", report.problems);
    let balances = balances(&cluster);
    assert_eq!(balances["mallory"], USD);
    assert_eq!(
        balances["alice"],
        2 * USD - job.cost_micros.unwrap() - second.cost_micros.unwrap()
    );
}

#[tokio::test]
async fn a_hostile_node_cannot_act_as_another_node_or_redirect_its_earnings() {
    let cluster = secure_cluster(2).await;
    cluster.funded_account("alice", 2 * USD).await.unwrap();
    let alice = cluster.client_as(&Caller::user("alice")).await.unwrap();

    // A job of alice's runs on node B; node A is the other one, and hostile.
    let spec = wasm_spec(&demo(), &["count", "3", "300"], 30_000);
    alice
        .submit(&submit_request("alice", "on-b", spec, USD))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let b = loop {
        let job = alice.job_get("on-b").await.unwrap();
        if job.state == JobState::Running {
            break job.node_id.unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "never ran: {job:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (a_index, b_index) = if b == "node-0" { (1, 0) } else { (0, 1) };
    let a = format!("node-{a_index}");
    let (node_a, errors) = connect_as(&cluster, &Caller::node(&a)).await;
    let registration = cluster.agents[a_index].registration();

    // Register as node B, or as itself paid into another account: error replies.
    let as_b = wire::RegisterNode {
        node_id: b.clone(),
        ..registration.clone()
    };
    refused(node_a.call(&as_b).await, ErrorCode::Forbidden);
    let redirected = wire::RegisterNode {
        provider_account: "mallory".into(),
        ..registration.clone()
    };
    refused(node_a.call(&redirected).await, ErrorCode::Forbidden);
    refused(
        Client::new(node_a.clone()).job_list(None, None, None).await,
        ErrorCode::Forbidden,
    );

    // Node A reports the end of B's job, in B's name.
    let forged = JobReport {
        v: WIRE_VERSION,
        node_id: b.clone(),
        job_id: "on-b".into(),
        attempt: 1,
        phase: ReportPhase::Finished {
            outcome: ExecutionOutcome {
                fuel_consumed: None,
                output_files: Default::default(),
                kind: ExitKind::Exited,
                exit_code: Some(0),
                message: None,
                elapsed_ms: 29_000,
                stdout: "forged".into(),
                stderr: String::new(),
                blobs: Default::default(),
                usage: None,
            },
        },
        signature: None,
    };
    refused(node_a.call(&forged).await, ErrorCode::Forbidden);
    // In its own name, its results must carry its enrolled key's signature.
    let unsigned = JobReport {
        node_id: a.clone(),
        ..forged.clone()
    };
    let error = node_a.call(&unsigned).await.unwrap_err();
    assert!(error.to_string().contains("must be signed"), "{error}");
    let mut wrong_key = unsigned.clone();
    wrong_key.sign(&nkeys::KeyPair::new_user()).unwrap();
    let error = node_a.call(&wrong_key).await.unwrap_err();
    assert!(error.to_string().contains("must be signed"), "{error}");
    let mut tampered = wrong_key.clone();
    if let Some(signature) = &mut tampered.signature {
        signature.key = unsigned.node_id.clone();
    }
    refused(node_a.call(&tampered).await, ErrorCode::Forbidden);

    // Refused by the server: B's subjects.
    let b_report = node_a
        .subjects
        .op(CtlOp::JobReport, &Caller::node(&b))
        .unwrap();
    assert!(
        node_a
            .request::<_, wire::Ack>(b_report.clone(), &forged)
            .await
            .is_err()
    );
    violation(&errors, &b_report).await;
    let b_assign = node_a.subjects.job_assign(&b).unwrap();
    let mut stolen = node_a.client.subscribe(b_assign.clone()).await.unwrap();
    violation(&errors, &b_assign).await;
    let b_heartbeat = node_a.subjects.node_heartbeat(&b).unwrap();
    node_a
        .client
        .publish(
            b_heartbeat.clone(),
            wire::encode(&serde_json::json!({"v": 1})),
        )
        .await
        .unwrap();
    violation(&errors, &b_heartbeat).await;

    let job = cluster
        .wait_for_end("on-b", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert_eq!(job.node_id.as_deref(), Some(b.as_str()));
    assert_ne!(job.stdout.as_deref(), Some("forged"));
    assert!(
        job.elapsed_ms.unwrap() < 29_000,
        "the forged usage was billed: {job:?}"
    );
    assert!(
        !stolen.next_timeout().await,
        "node A received B's assignment"
    );

    let report = cluster.client().ledger_verify().await.unwrap();
    assert!(report.ok, "{:?}", report.problems);
    let balances = balances(&cluster);
    assert_eq!(
        balances[&format!("provider-{b_index}")],
        job.provider_micros.unwrap()
    );
    assert_eq!(
        balances
            .get(&format!("provider-{a_index}"))
            .copied()
            .unwrap_or(0),
        0
    );
    assert_eq!(balances.get("mallory").copied(), None);
    assert_eq!(balances["alice"], 2 * USD - job.cost_micros.unwrap());

    // Removed by the operator: the orchestrator refuses its registrations (even while the
    // server still lets it in), and once the server forgets its key it is cut off.
    let operator = cluster.client();
    operator.node_remove(&a).await.unwrap();
    let error = node_a.call(&registration).await.unwrap_err();
    assert_eq!(
        error.remote().map(|r| r.code),
        Some(ErrorCode::Forbidden),
        "{error}"
    );
    assert!(error.to_string().contains("removed"), "{error}");
    revoke(&cluster, &Caller::node(&a), &node_a).await;
}

/// An account's balance, through the real CLI (`--json`).
fn balance_of(
    run: &impl Fn(&mut std::process::Command) -> (bool, String),
    cli: &impl Fn(&[&str]) -> std::process::Command,
    account: &str,
) -> i64 {
    let (ok, text) = run(&mut cli(&["--json", "account", "balance", account]));
    assert!(ok, "{text}");
    let view: wire::AccountView = serde_json::from_str(text.trim()).unwrap();
    view.balance_micros
}

/// Whether a message arrives within a second.
trait NextTimeout {
    async fn next_timeout(&mut self) -> bool;
}

impl NextTimeout for async_nats::Subscriber {
    async fn next_timeout(&mut self) -> bool {
        use futures::StreamExt as _;
        matches!(
            tokio::time::timeout(Duration::from_secs(1), self.next()).await,
            Ok(Some(_))
        )
    }
}

/// `rhizos up` with authentication on, driven by the real CLI the way its README says: the CLI
/// finds the local credentials, `user add` makes a user who can run a job, that user cannot mint
/// money, `node enroll` writes a node's credentials, `user remove` revokes at once.
#[tokio::test]
async fn rhizos_up_is_secure_by_default_and_its_cli_issues_and_revokes_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let port = rhizos_broker::server::free_port().unwrap();
    let url = format!("nats://127.0.0.1:{port}");
    let namespace = format!("up{}", &rhizos_testbed::cluster::uuid_like()[..10]);
    let data_dir = dir.path().join("network");
    let home = dir.path().join("home");
    let rhizos = RhizosCli {
        url: url.clone(),
        namespace: namespace.clone(),
        home,
    };
    let cli = |args: &[&str]| rhizos.command(args);
    let plugin_dir = wasm_plugin_dir(dir.path());
    let log = std::fs::File::create(dir.path().join("up.log")).unwrap();
    let mut up = cli(&["up", "--data-dir"])
        .arg(&data_dir)
        .arg("--plugin-dir")
        .arg(&plugin_dir)
        .args(["--metrics", "127.0.0.1:0"])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let up_log = || std::fs::read_to_string(dir.path().join("up.log")).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !up_log().contains("RhizOS is up") {
        assert!(
            up.try_wait().unwrap().is_none(),
            "rhizos up exited:\n{}",
            up_log()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "not up:\n{}",
            up_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(up_log().contains("authentication on"), "{}", up_log());

    // The daemons' metrics, where `up` says they are.
    let log_now = up_log();
    let metrics_url = log_now
        .lines()
        .find_map(|line| line.strip_prefix("✓ metrics "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no metrics line:\n{log_now}"))
        .to_owned();
    let metrics = ureq::get(&metrics_url)
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    for series in [
        "rhizos_nodes{status=\"live\"} 1",
        "# TYPE rhizos_heartbeats_total counter",
        "# TYPE rhizos_ledger_commit_seconds histogram",
        "# TYPE rhizos_agent_running gauge",
        "# TYPE rhizos_gateway_submit_seconds histogram",
    ] {
        assert!(metrics.contains(series), "{series} not in:\n{metrics}");
    }

    // An anonymous client is refused by the server.
    let mut anonymous = rhizos_broker::config::NatsSettings {
        url: url.clone(),
        namespace: namespace.clone(),
        ..Default::default()
    };
    assert!(
        Bus::connect(&anonymous).await.is_err(),
        "anonymous connection let in"
    );

    let (ok, text) = run(&mut cli(&["user", "add", "alice"]));
    assert!(ok, "{text}");
    let (ok, text) = run(&mut cli(&["account", "deposit", "alice", "1"]));
    assert!(ok, "{text}");
    let module = rhizos_testbed::guests::demo_wasm().unwrap();
    // `rhizos job submit --wait` of the demo module as alice, with `args` before `--wasm`.
    let submit = |timeout_secs: &str, args: &[&str]| {
        let mut command = cli(&[
            "job",
            "submit",
            "--account",
            "alice",
            "--max-cost",
            "0.5",
            "--timeout-secs",
            timeout_secs,
            "--wait",
        ]);
        command.args(args).arg("--wasm").arg(&module);
        command
    };
    let (ok, text) = run(&mut submit("5", &[]));
    assert!(ok, "{text}");
    assert!(
        text.contains("Hello from RhizOS") && text.contains("succeeded"),
        "{text}"
    );
    // Large results come back through the blob stream: a 1 MiB file saved by --output-dir, the
    // whole of a 20 000-line stdout (its tail alone is 64 KiB) by `job output`.
    let outputs = dir.path().join("outputs");
    let (ok, text) = run(&mut submit(
        "20",
        &[
            "--arg",
            "fill",
            "--arg",
            "1",
            "--output-dir",
            outputs.to_str().unwrap(),
        ],
    ));
    assert!(ok, "{text}");
    assert_eq!(
        std::fs::metadata(outputs.join("fill.bin")).unwrap().len(),
        1 << 20,
        "{text}"
    );
    let (ok, text) = run(&mut submit(
        "20",
        &["--job-id", "big-log", "--arg", "count", "--arg", "20000"],
    ));
    assert!(ok, "{text}");
    let whole = cli(&["job", "output", "big-log", "stdout"])
        .output()
        .unwrap();
    assert!(
        whole.status.success(),
        "{}",
        String::from_utf8_lossy(&whole.stderr)
    );
    let whole = String::from_utf8(whole.stdout).unwrap();
    assert_eq!(whole.lines().count(), 20_000);
    assert!(whole.starts_with("line 1\n") && whole.ends_with("line 20000\n"));
    let (ok, text) = run(&mut cli(&["job", "output", "big-log", "nope.txt"]));
    assert!(!ok && text.contains("no output"), "{text}");
    // An API key for the gateway: printed once, listed by id only, revoked.
    let created = cli(&[
        "key",
        "create",
        "--account",
        "alice",
        "--name",
        "ci",
        "--rpm",
        "30",
    ])
    .output()
    .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let key = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    let key_id = rhizos_broker::wire::key_id_of(&key)
        .unwrap_or_else(|| panic!("not a key: {key:?}"))
        .to_owned();
    let (ok, text) = run(&mut cli(&["key", "list", "--account", "alice"]));
    assert!(
        ok && text.contains(&key_id) && text.contains("30 req/min"),
        "{text}"
    );
    assert!(!text.contains(&key), "{text}");
    let (ok, text) = run(&mut cli(&[
        "key",
        "create",
        "--account",
        "alice",
        "--routes",
        "admin",
    ]));
    assert!(!ok && text.contains("not a route"), "{text}");
    let (ok, text) = run(&mut cli(&["key", "revoke", &key_id, "--account", "alice"]));
    assert!(ok && text.contains("revoked"), "{text}");

    // A payout by the operator happens once, however often it is retried.
    let before = balance_of(&run, &cli, "alice");
    for _ in 0..2 {
        let (ok, text) = run(&mut cli(&[
            "account",
            "withdraw",
            "alice",
            "0.25",
            "--idempotency-key",
            "payout-1",
        ]));
        assert!(ok, "{text}");
    }
    assert_eq!(balance_of(&run, &cli, "alice"), before - 250_000);

    // Mallory, with her own credentials (written for another machine), cannot mint money.
    let mallory_file = dir.path().join("mallory.creds");
    let (ok, text) = run(cli(&["user", "add", "mallory", "--out"]).arg(&mallory_file));
    assert!(ok, "{text}");
    let (ok, text) =
        run(cli(&["account", "deposit", "mallory", "100", "--credentials"]).arg(&mallory_file));
    assert!(!ok && text.contains("may not"), "{text}");
    let (ok, text) =
        run(cli(&["--json", "account", "balance", "mallory", "--credentials"]).arg(&mallory_file));
    assert!(ok && text.contains(r#""balance_micros":0"#), "{text}");

    // A node enrolled for another machine gets credentials the server lets in.
    let node_file = dir.path().join("gpu-1.creds");
    let (ok, text) = run(cli(&[
        "node",
        "enroll",
        "gpu-1",
        "--provider-account",
        "acme",
        "--out",
    ])
    .arg(&node_file));
    assert!(ok, "{text}");
    anonymous.credentials = Some(node_file);
    let node = Bus::connect(&anonymous)
        .await
        .expect("an enrolled node connects");
    assert_eq!(node.identity, Some(Caller::node("gpu-1")));

    // While alice watches a job, that node injects lines into the job's log subject (its
    // permissions let it publish there, under its own node id): her CLI shows none of them.
    let subject = node.subjects.job_log("alice", "watched", "gpu-1").unwrap();
    let injector = tokio::spawn(async move {
        for seq in 0..200u64 {
            let line = wire::LogBatch {
                v: WIRE_VERSION,
                job_id: "watched".into(),
                attempt: 1,
                lines: vec![wire::LogEntry {
                    seq,
                    stream: wire::LogStream::Stdout,
                    line: "INJECTED".into(),
                    ts_ms: 0,
                }],
            };
            let _ = node
                .client
                .publish(subject.clone(), wire::encode(&line))
                .await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let mut watched = cli(&[
        "job",
        "submit",
        "--account",
        "alice",
        "--job-id",
        "watched",
        "--max-cost",
        "0.5",
        "--timeout-secs",
        "5",
        "--wait",
        "--wasm",
    ]);
    watched.arg(&module);
    let output = tokio::process::Command::from(watched)
        .output()
        .await
        .unwrap();
    injector.abort();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("Hello from RhizOS"), "{text}");
    assert!(
        !text.contains("INJECTED"),
        "a foreign node's lines were shown:\n{text}"
    );

    // Revoked: refused from now on, without a restart.
    let (ok, text) = run(&mut cli(&["user", "remove", "mallory"]));
    assert!(ok, "{text}");
    anonymous.credentials = Some(mallory_file.clone());
    assert!(
        Bus::connect(&anonymous).await.is_err(),
        "revoked credentials let in"
    );
    let (ok, text) =
        run(cli(&["account", "balance", "mallory", "--credentials"]).arg(&mallory_file));
    assert!(!ok, "{text}");

    let (ok, text) = run(&mut cli(&["ledger", "verify"]));
    assert!(ok, "{text}");
    let _ = std::process::Command::new("kill")
        .args(["-INT", &up.id().to_string()])
        .status();
    let stopped = up.wait().unwrap();
    assert!(
        stopped.success(),
        "rhizos up did not stop cleanly:\n{}",
        up_log()
    );
}
