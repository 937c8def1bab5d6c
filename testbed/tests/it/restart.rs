//! `kill -9` of the orchestrator: pending and running jobs go on after a restart, nothing is
//! settled twice, and the event history has every event exactly once. One orchestrator serves a
//! bus at a time (the lease): a second waits as a standby, takes over only on the same ledger,
//! and an orchestrator whose lease is taken stops serving at once.

use crate::common::*;
use rhizos_broker::server::{LaunchOptions, NatsServer};
use rhizos_broker::wire::{
    AccountRef, AccountView, CreateAccount, Deposit, EventBody, JobRef, JobState, JobView,
    LedgerReport, ListNodes, NodeList, VerifyLedger, WIRE_VERSION,
};
use rhizos_broker::{Bus, Settings};
use rhizos_core::Agent;
use rhizos_testbed::cluster::{uuid_like, wasm_spec};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `rhizosd` child; killed when dropped, so a failing test leaves no daemon behind.
pub(crate) struct Daemon(Child);

impl Daemon {
    /// SIGINT (a clean stop) and reap; true when it exited successfully.
    pub(crate) fn interrupt(&mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        self.0.wait().is_ok_and(|status| status.success())
    }

    /// Sends `signal` (`STOP`, `CONT`, …) without waiting for anything.
    pub(crate) fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.0.id().to_string()])
            .status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal}");
    }

    /// `kill -9` and reap.
    pub(crate) fn kill(&mut self) -> std::io::Result<()> {
        self.0.kill()?;
        self.0.wait().map(|_| ())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_orchestrator(settings: &Settings, data_dir: &std::path::Path) -> Daemon {
    start_orchestrator_with(settings, data_dir, &[])
}

/// `rhizosd orchestrator` with extra environment (`RHIZOS_ORCHESTRATOR__…` settings).
pub(crate) fn start_orchestrator_with(
    settings: &Settings,
    data_dir: &std::path::Path,
    env: &[(&str, &str)],
) -> Daemon {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data_dir.join("orchestrator.log"))
        .unwrap();
    Command::new(rhizos_testbed::build_dir().join("rhizosd"))
        .args([
            "--nats-url",
            &settings.nats.url,
            "--namespace",
            &settings.nats.namespace,
            "orchestrator",
            "--data-dir",
        ])
        .arg(data_dir)
        .env("RUST_LOG", "info")
        .env("RHIZOS_ORCHESTRATOR__OPEN_REGISTRATION", "true")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map(Daemon)
        .expect("rhizosd is built (cargo build --workspace)")
}

/// Retries a request while the orchestrator is (re)starting.
pub(crate) async fn request<R: rhizos_broker::Request>(bus: &Bus, body: &R) -> R::Reply {
    let subject = R::OP;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match bus.call(body).await {
            Ok(reply) => return reply,
            Err(e) if e.remote().is_none() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{subject}: {e}"),
        }
    }
}

pub(crate) async fn wait_for(bus: &Bus, job_id: &str, done: impl Fn(&JobView) -> bool) -> JobView {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job: JobView = request(
            bus,
            &JobRef {
                v: WIRE_VERSION,
                job_id: job_id.into(),
            },
        )
        .await;
        if done(&job) {
            return job;
        }
        assert!(Instant::now() < deadline, "{job_id} stuck: {job:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fresh nats-server keeping its store in `<dir>/nats`, and settings naming it, in a random
/// namespace starting with `prefix`.
fn nats_in(dir: &std::path::Path, prefix: &str) -> (NatsServer, Settings) {
    let nats = NatsServer::start(LaunchOptions {
        port: None,
        data_dir: Some(dir.join("nats")),
        authorization: None,
        listen: None,
    })
    .unwrap();
    let mut settings = Settings::default();
    settings.nats.url = nats.url();
    settings.nats.namespace = format!("{prefix}{}", &uuid_like()[..12]);
    (nats, settings)
}

/// A real agent `node_id` with the WASM backend (plugins in `<dir>/plugins`), heartbeating
/// every second, running at most `slots` executions at once.
pub(crate) async fn wasm_agent(
    settings: &Settings,
    dir: &std::path::Path,
    node_id: &str,
    slots: u32,
) -> Agent {
    let mut agent_settings = settings.agent.clone();
    agent_settings.node_id = Some(node_id.into());
    agent_settings.plugin_dir = wasm_plugin_dir(dir);
    agent_settings.heartbeat_interval_ms = 1_000;
    agent_settings.max_concurrent = slots;
    Agent::new(
        Bus::connect(&settings.nats).await.unwrap(),
        agent_settings,
        rhizos_testbed::ClusterOptions::default().pricing,
    )
    .unwrap()
}

/// Waits (at most 30 s) until a node has registered.
pub(crate) async fn wait_for_a_node(bus: &Bus) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list: NodeList = request(
            bus,
            &ListNodes {
                v: WIRE_VERSION,
                ..ListNodes::default()
            },
        )
        .await;
        if !list.nodes.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "the agent never registered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates `account` and deposits `micros` into it (once, under `key`).
pub(crate) async fn funded_account(bus: &Bus, account: &str, micros: i64, key: &str) {
    let _: AccountView = request(
        bus,
        &CreateAccount {
            v: WIRE_VERSION,
            account: account.into(),
        },
    )
    .await;
    let _: AccountView = request(
        bus,
        &Deposit {
            v: WIRE_VERSION,
            account: account.into(),
            amount_micros: micros,
            idempotency_key: Some(key.into()),
        },
    )
    .await;
}

/// `account`'s balance.
pub(crate) async fn balance_of(bus: &Bus, account: &str) -> i64 {
    let view: AccountView = request(
        bus,
        &AccountRef {
            v: WIRE_VERSION,
            account: account.into(),
        },
    )
    .await;
    view.balance_micros
}

/// One `rhizosd orchestrator` process (on `<dir>/orchestrator`) on a fresh nats-server, in a
/// namespace starting with `prefix`, and one real WASM agent `node_id` running at most `slots`
/// executions, registered; `account` funded with `micros`.
struct OneOrchestrator {
    dir: tempfile::TempDir,
    _nats: NatsServer,
    settings: Settings,
    bus: Bus,
    orchestrator: Daemon,
    stop_agent: tokio::sync::watch::Sender<bool>,
    agent: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl OneOrchestrator {
    async fn start(prefix: &str, node_id: &str, slots: u32, account: &str, micros: i64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (nats, settings) = nats_in(dir.path(), prefix);
        std::fs::create_dir_all(dir.path().join("orchestrator")).unwrap();
        let orchestrator = start_orchestrator(&settings, &dir.path().join("orchestrator"));
        let agent = wasm_agent(&settings, dir.path(), node_id, slots).await;
        let (stop_agent, stopped) = tokio::sync::watch::channel(false);
        let agent = tokio::spawn(agent.run(async move {
            let mut stopped = stopped;
            let _ = stopped.wait_for(|s| *s).await;
        }));
        let bus = Bus::connect(&settings.nats).await.unwrap();
        wait_for_a_node(&bus).await;
        funded_account(&bus, account, micros, "d1").await;
        Self {
            dir,
            _nats: nats,
            settings,
            bus,
            orchestrator,
            stop_agent,
            agent,
        }
    }

    /// `kill -9` of the orchestrator, and a new one on its data dir two seconds later.
    async fn kill_9_and_restart_the_orchestrator(&mut self) {
        self.orchestrator.kill().unwrap();
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        self.orchestrator =
            start_orchestrator(&self.settings, &self.dir.path().join("orchestrator"));
    }

    /// Stops the agent (cleanly) and returns the orchestrator.
    async fn stop_agent(self) -> Daemon {
        let _ = self.stop_agent.send(true);
        self.agent.await.unwrap().unwrap();
        self.orchestrator
    }
}

/// A flow goes on across a `kill -9` of the orchestrator: its first step runs through the
/// crash, and the restarted orchestrator (the flow's state is in its ledger) reads that step's
/// end, starts the next, and ends the flow with its money exact.
#[tokio::test]
async fn kill_9_of_the_orchestrator_mid_flow_resumes_the_flow() {
    let mut network = OneOrchestrator::start("f", "flowing", 2, "flo", 2_000_000).await;
    let bus = network.bus.clone();
    let client = start_a_flow_through_a_crash(&bus, "flo", "crash-1").await;
    network.kill_9_and_restart_the_orchestrator().await;
    the_flow_through_a_crash_ends_exact(&bus, &client, "flo", 2_000_000, "crash-1").await;
    let mut orchestrator = network.stop_agent().await;
    assert!(orchestrator.interrupt(), "the orchestrator stops cleanly");
}

/// Starts flow `flow_id` of `account` (funded): a 1.5 s WASM step, then a short one after it,
/// within $0.90; returns once the first step runs, with a client asking as the operator.
pub(crate) async fn start_a_flow_through_a_crash(
    bus: &Bus,
    account: &str,
    flow_id: &str,
) -> rhizos_broker::Client {
    use rhizos_broker::wire::{FlowEdge, FlowSpec, FlowStep};
    let module = demo();
    let step = |name: &str, args: &[&str]| FlowStep::new(name, wasm_spec(&module, args, 20_000));
    let flow = FlowSpec {
        name: "through-a-crash".into(),
        max_cost_micros: 900_000,
        timeout_ms: None,
        steps: vec![
            step("long", &["count", "15", "100"]),
            step("after", &["count", "2"]),
        ],
        edges: vec![FlowEdge {
            from: "long".into(),
            to: "after".into(),
            when: None,
        }],
    };
    let client = rhizos_broker::Client::new(bus.clone());
    client.flow_run(Some(flow_id), account, flow).await.unwrap();
    wait_for(bus, &format!("{flow_id}-0-1"), |j| {
        j.state == JobState::Running
    })
    .await;
    client
}

/// The flow of [`start_a_flow_through_a_crash`] ends (at most 60 s) with both steps run once
/// (the first's output whole), its cost their jobs' costs, the rest of its hold refunded, the
/// account charged exactly that, and the ledger verified.
pub(crate) async fn the_flow_through_a_crash_ends_exact(
    bus: &Bus,
    client: &rhizos_broker::Client,
    account: &str,
    deposited: i64,
    flow_id: &str,
) {
    use rhizos_broker::wire::{FlowState, StepState};
    let deadline = Instant::now() + Duration::from_secs(60);
    let flow = loop {
        if let Ok(flow) = client.flow_get(flow_id).await
            && flow.state.is_terminal()
        {
            break flow;
        }
        assert!(
            Instant::now() < deadline,
            "the flow did not end after the crash"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(flow.state, FlowState::Succeeded, "{flow:#?}");
    let steps: Vec<_> = flow.steps.iter().map(|s| (s.state, s.runs)).collect();
    assert_eq!(
        steps,
        [(StepState::Succeeded, 1), (StepState::Succeeded, 1)]
    );
    let long = wait_for(bus, &format!("{flow_id}-0-1"), |j| j.cost_micros.is_some()).await;
    assert_eq!(long.stdout.as_deref().map(|s| s.lines().count()), Some(15));
    let after = wait_for(bus, &format!("{flow_id}-1-1"), |j| j.cost_micros.is_some()).await;
    let spent = long.cost_micros.unwrap() + after.cost_micros.unwrap();
    assert_eq!(flow.cost_micros, Some(spent));
    assert_eq!(flow.refund_micros, Some(900_000 - spent));
    assert_eq!(balance_of(bus, account).await, deposited - spent);
    let report: LedgerReport = request(bus, &VerifyLedger { v: WIRE_VERSION }).await;
    assert!(report.ok, "{:?}", report.problems);
}

#[tokio::test]
async fn kill_9_of_the_orchestrator_loses_no_job_no_money_and_no_event() {
    // One slot: the second job has to wait, pending, through the crash.
    let mut network = OneOrchestrator::start("r", "survivor", 1, "kim", 2_000_000).await;
    let bus = network.bus.clone();
    let module = demo();
    for (job_id, args) in [
        ("first", ["count", "15", "100"]),
        ("second", ["count", "2", "0"]),
    ] {
        let submit = submit_request("kim", job_id, wasm_spec(&module, &args, 20_000), 500_000);
        let _: rhizos_broker::wire::SubmitJobReply = request(&bus, &submit).await;
    }
    wait_for(&bus, "first", |j| j.state == JobState::Running).await;
    assert_eq!(
        wait_for(&bus, "second", |_| true).await.state,
        JobState::Pending
    );

    // kill -9 while one job runs and one waits; restart after the running one has finished.
    network.kill_9_and_restart_the_orchestrator().await;

    let first = wait_for(&bus, "first", |j| {
        j.state.is_terminal() && j.cost_micros.is_some()
    })
    .await;
    let second = wait_for(&bus, "second", |j| {
        j.state.is_terminal() && j.cost_micros.is_some()
    })
    .await;
    assert_eq!(
        (first.state, first.attempt),
        (JobState::Succeeded, 1),
        "{first:?}"
    );
    assert_eq!(first.stdout.as_deref().map(|s| s.lines().count()), Some(15));
    assert_eq!(
        (second.state, second.attempt),
        (JobState::Succeeded, 1),
        "{second:?}"
    );

    let report: LedgerReport = request(&bus, &VerifyLedger { v: WIRE_VERSION }).await;
    assert!(report.ok, "{:?}", report.problems);
    assert_eq!(report.jobs_checked, 2);
    assert_eq!(
        balance_of(&bus, "kim").await,
        2_000_000 - first.cost_micros.unwrap() - second.cost_micros.unwrap()
    );

    // Every event once, in order, across the crash.
    for job in [&first, &second] {
        let events = stored_events(
            &bus,
            bus.subjects.job_events_of(None, &job.job_id).unwrap(),
            Duration::from_millis(1_000),
        )
        .await;
        let mut history = Vec::new();
        for event in events {
            history.push(match event.body {
                EventBody::Job { state, .. } => state.as_str().to_owned(),
                EventBody::Escrow { kind, .. } => format!("{kind:?}").to_lowercase(),
                EventBody::Flow { state, .. } => format!("flow {state}"),
            });
        }
        assert_eq!(
            history,
            [
                "pending",
                "held",
                "assigned",
                "running",
                "succeeded",
                "settled"
            ],
            "{}",
            job.job_id
        );
    }

    network.stop_agent().await.kill().unwrap();
}

/// Waits (at most 30 s) for the daemon to exit on its own.
async fn exit_of(daemon: &mut Daemon) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = daemon.0.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the daemon is still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the orchestrator on `data_dir` logged so far.
pub(crate) fn log_of(data_dir: &std::path::Path) -> String {
    std::fs::read_to_string(data_dir.join("orchestrator.log")).unwrap_or_default()
}

/// Waits until `data_dir`'s log says `what`.
pub(crate) async fn log_says(data_dir: &std::path::Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !log_of(data_dir).contains(what) {
        assert!(
            Instant::now() < deadline,
            "{} never said {what:?}:\n{}",
            data_dir.display(),
            log_of(data_dir)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn one_orchestrator_serves_a_bus_and_only_its_own_ledger_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let (_nats, settings) = nats_in(dir.path(), "l");
    let (main_dir, other_dir) = (dir.path().join("main"), dir.path().join("other"));
    for d in [&main_dir, &other_dir] {
        std::fs::create_dir_all(d).unwrap();
    }
    let long = [("RHIZOS_ORCHESTRATOR__LEASE_TTL_MS", "30000")];
    let short = [("RHIZOS_ORCHESTRATOR__LEASE_TTL_MS", "1000")];
    let bus = Bus::connect(&settings.nats).await.unwrap();
    let balance = AccountRef {
        v: WIRE_VERSION,
        account: "kim".into(),
    };

    // The first is active and holds kim's money.
    let mut active = start_orchestrator_with(&settings, &main_dir, &long);
    funded_account(&bus, "kim", 1_234_567, "lease-1").await;

    // A second, on another ledger, waits as a standby: every request is the first's (kim's
    // balance is in its ledger only; a second server in the queue group would answer half of
    // them "no account").
    let _standby = start_orchestrator_with(&settings, &other_dir, &long);
    log_says(&other_dir, "standby: another orchestrator is active").await;
    for _ in 0..20 {
        let view: AccountView = bus.call(&balance).await.unwrap();
        assert_eq!(view.balance_micros, 1_234_567);
    }

    // A third on the first's data dir is refused at once.
    let mut twin = start_orchestrator_with(&settings, &main_dir, &long);
    assert!(!exit_of(&mut twin).await.success());
    assert!(
        log_of(&main_dir).contains("is using the data dir"),
        "{}",
        log_of(&main_dir)
    );

    // kill -9, and a restart on the same data dir takes over at once — long before the 30 s
    // lease would lapse — with the money where it was.
    active.kill().unwrap();
    let restarted = Instant::now();
    let mut active = start_orchestrator_with(&settings, &main_dir, &short);
    let view: AccountView = request(&bus, &balance).await;
    assert_eq!(view.balance_micros, 1_234_567);
    assert!(
        restarted.elapsed() < Duration::from_secs(15),
        "took {:?}",
        restarted.elapsed()
    );

    // Gone for good (its 1 s lease lapses): the standby on another ledger does not take over.
    active.kill().unwrap();
    log_says(&other_dir, "it wrote another ledger than this one").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    match bus.call(&balance).await {
        Err(e) => assert!(e.remote().is_none(), "served by someone: {e}"),
        Ok(view) => panic!("the standby served a request: {view:?}"),
    }

    // Back on its own ledger, then someone else writes the lease: it stops serving at once and
    // waits as a standby (the unreadable holder never lapses).
    let mut active = start_orchestrator_with(&settings, &main_dir, &short);
    let view: AccountView = request(&bus, &balance).await;
    assert_eq!(view.balance_micros, 1_234_567);
    let kv = bus
        .jetstream
        .get_key_value(rhizos_core::orchestrator::lease::bucket_name(
            &settings.nats.namespace,
        ))
        .await
        .unwrap();
    kv.put(rhizos_core::orchestrator::lease::KEY, "someone else".into())
        .await
        .unwrap();
    log_says(&main_dir, "another orchestrator took the lease").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    match bus.call(&balance).await {
        Err(e) => assert!(e.remote().is_none(), "served by someone: {e}"),
        Ok(view) => panic!("served after losing the lease: {view:?}"),
    }
    assert!(
        active.0.try_wait().unwrap().is_none(),
        "it should wait, not exit"
    );
}

/// Ctrl-C while a daemon is still starting (connected, loading its plugins) stops it cleanly:
/// it listens for signals from its first moment. Before, the signal came before anyone
/// listened: the process died of it, or ran on as if it had never come.
#[tokio::test]
async fn ctrl_c_while_a_daemon_starts_stops_it_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (_nats, settings) = nats_in(dir.path(), "sig");
    let plugins = wasm_plugin_dir(dir.path());
    let mut agent = Command::new(rhizos_testbed::build_dir().join("rhizosd"))
        .args([
            "--nats-url",
            &settings.nats.url,
            "--namespace",
            &settings.nats.namespace,
            "agent",
            "--node-id",
            "early",
            "--plugin-dir",
        ])
        .arg(&plugins)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rhizosd is built (cargo build --workspace)");
    // Connected by now, its plugins still loading.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = Command::new("kill")
        .args(["-INT", &agent.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = agent.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = agent.kill();
            panic!("the agent ran on after Ctrl-C during its start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut log = String::new();
    std::io::Read::read_to_string(&mut agent.stderr.take().unwrap(), &mut log).unwrap();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("shutting down"), "{log}");
}
