//! A network on a 3-server NATS cluster with every stream and the lease replicated three
//! times: the server the orchestrator is connected to is killed mid-run (`kill -9`), and the
//! network carries on — every job settles once, the money adds up — and how long submits
//! stalled is printed.

use crate::common::*;
use crate::restart::{
    balance_of, funded_account, log_of, log_says, request, start_a_flow_through_a_crash,
    start_orchestrator_with, the_flow_through_a_crash_ends_exact, wait_for, wait_for_a_node,
    wasm_agent,
};
use rhizos_broker::server::NatsCluster;
use rhizos_broker::wire::{
    AccountView, Deposit, JobState, LedgerReport, SubmitJobReply, VerifyLedger, WIRE_VERSION,
};
use rhizos_broker::{Bus, Settings};
use rhizos_core::Orchestrator;
use rhizos_testbed::cluster::{uuid_like, wasm_spec};
use std::time::{Duration, Instant};

/// A 3-server cluster in `dir` with JetStream ready, and settings naming all three, keeping
/// everything on three, in a random namespace starting with `prefix`.
async fn cluster_of_three(dir: &std::path::Path, prefix: &str) -> (NatsCluster, Settings) {
    let nats = NatsCluster::start(3, "rhizos", dir).unwrap();
    nats.ready_client().await.unwrap();
    let mut settings = Settings::default();
    settings.nats.url = nats.url();
    settings.nats.namespace = format!("{prefix}{}", &uuid_like()[..12]);
    settings.nats.replicas = 3;
    (nats, settings)
}

/// Data dirs `<dir>/a` and `<dir>/b` for two orchestrators, made.
fn two_data_dirs(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (a, b) = (dir.join("a"), dir.join("b"));
    for d in [&a, &b] {
        std::fs::create_dir_all(d).unwrap();
    }
    (a, b)
}

/// Waits (at most 30 s) until the ledger files of the orchestrators on data dirs `a` and `b`
/// hold the same rows; returns the position both applied. `what` names the moment in the
/// failure, which shows both orchestrators' logs.
async fn files_equal(a: &std::path::Path, b: &std::path::Path, what: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (a_rows, b_rows) = (
            rhizos_testbed::ledger_rows(&a.join("ledger.db")).unwrap(),
            rhizos_testbed::ledger_rows(&b.join("ledger.db")).unwrap(),
        );
        if a_rows == b_rows {
            return a_rows.0;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the files never matched (applied {} vs {})\nA:\n{}\nB:\n{}",
            a_rows.0,
            b_rows.0,
            log_of(a),
            log_of(b)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn losing_one_of_three_nats_servers_loses_no_job_and_no_money() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nats, mut settings) = cluster_of_three(dir.path(), "c").await;
    settings.orchestrator.data_dir = dir.path().join("orchestrator");
    settings.orchestrator.open_registration = true;
    settings.orchestrator.lease_ttl_ms = 3_000;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    // The server the orchestrator's connection lands on is the one that dies.
    let orchestrator_bus = Bus::connect(&settings.nats).await.unwrap();
    let doomed = nats
        .index_of_port(orchestrator_bus.client.server_info().port)
        .unwrap();
    let orchestrator = Orchestrator::open(orchestrator_bus, settings.orchestrator.clone())
        .await
        .unwrap();
    let orchestrator_task = tokio::spawn(orchestrator.run(until_stopped(stopped.clone())));
    let agent = wasm_agent(&settings, dir.path(), "steady", 4).await;
    let agent_task = tokio::spawn(agent.run(until_stopped(stopped.clone())));

    let bus = Bus::connect(&settings.nats).await.unwrap();
    wait_for_a_node(&bus).await;
    let deposited = 50_000_000;
    funded_account(&bus, "ada", deposited, "cluster-1").await;

    // Jobs flow; a third of the way in, one server dies. Every submit is retried with its job
    // id until answered (an idempotent retry), and the longest wait is the failover's cost.
    let module = demo();
    let jobs = 30;
    let mut slowest = Duration::ZERO;
    for index in 0..jobs {
        if index == jobs / 3 {
            nats.kill(doomed);
        }
        let submit = submit_request(
            "ada",
            &format!("c-{index}"),
            wasm_spec(&module, &["count", "1"], 20_000),
            500_000,
        );
        let started = Instant::now();
        let _: SubmitJobReply = request(&bus, &submit).await;
        slowest = slowest.max(started.elapsed());
    }
    let mut spent = 0;
    for index in 0..jobs {
        let job = wait_for(&bus, &format!("c-{index}"), |j| j.state.is_terminal()).await;
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
        spent += job.cost_micros.unwrap();
    }
    eprintln!(
        "cluster: one of 3 nats-servers killed mid-run; the slowest submit took {slowest:?} (the failover)"
    );
    let report: LedgerReport = request(&bus, &VerifyLedger { v: WIRE_VERSION }).await;
    assert!(report.ok, "{:?}", report.problems);
    assert_eq!(balance_of(&bus, "ada").await, deposited - spent);

    // The server comes back and catches up; the network never needed it.
    nats.restart(doomed).unwrap();
    let _ = stop.send(true);
    agent_task.await.unwrap().unwrap();
    orchestrator_task.await.unwrap().unwrap();
}

/// `rhizos up --cluster 3` the way an operator tries it: three servers and two orchestrators,
/// authentication on, a user's job runs; one server killed with `kill -9`, a new user is still
/// admitted (the others re-read the credentials) and runs a job too; then the active
/// orchestrator is killed with `kill -9`: the standby takes over, a third user is admitted and
/// runs a job, and the killed one is started again; Ctrl-C stops everything.
#[tokio::test]
async fn rhizos_up_cluster_3_rides_through_a_server_lost() {
    let dir = tempfile::tempdir().unwrap();
    let port = rhizos_broker::server::free_port().unwrap();
    let url = format!("nats://127.0.0.1:{port}");
    let namespace = format!("uc{}", &uuid_like()[..10]);
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
    let mut up = cli(&["up", "--cluster", "3", "--no-gateway", "--data-dir"])
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
    let deadline = Instant::now() + Duration::from_secs(90);
    while !up_log().contains("RhizOS is up") {
        assert!(
            up.try_wait().unwrap().is_none(),
            "rhizos up exited:\n{}",
            up_log()
        );
        assert!(Instant::now() < deadline, "not up:\n{}", up_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up_log().contains("✓ nats cluster"), "{}", up_log());
    let module = rhizos_testbed::guests::demo_wasm().unwrap();
    let job = |account: &str| {
        let mut command = cli(&[
            "job",
            "submit",
            "--account",
            account,
            "--max-cost",
            "0.5",
            "--timeout-secs",
            "10",
            "--wait",
        ]);
        command.arg("--wasm").arg(&module);
        command
    };
    let orchestrator_log = |i: usize| {
        std::fs::read_to_string(data_dir.join(format!("orchestrator-{i}.log"))).unwrap_or_default()
    };
    let mut killed_orchestrator = None;
    for (user, lost) in [
        ("alice", None),
        ("bob", Some("a nats-server")),
        ("carol", Some("the active orchestrator")),
    ] {
        match lost {
            Some("a nats-server") => {
                let pid = std::fs::read_to_string(
                    data_dir
                        .join("nats/rhizos-1")
                        .join(rhizos_broker::server::PID_FILE),
                )
                .unwrap();
                let (ok, text) = run(std::process::Command::new("kill").args(["-9", pid.trim()]));
                assert!(ok, "{text}");
            }
            Some(_) => {
                // The operator's view: who holds the lease, and the replicated ledger.
                // The lease is being re-elected after the server lost: asked until it answers.
                let deadline = Instant::now() + Duration::from_secs(30);
                let status: serde_json::Value = loop {
                    let (ok, text) = run(&mut cli(&["--json", "ledger", "status"]));
                    let status = serde_json::from_str::<serde_json::Value>(text.trim()).ok();
                    match status {
                        Some(status)
                            if ok
                                && status["active"]["holder"].is_object()
                                && status["replicated_ledger"]["latest_snapshot"].is_object() =>
                        {
                            break status;
                        }
                        _ => {
                            assert!(Instant::now() < deadline, "ledger status: {text}");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                };
                let holder = &status["active"]["holder"];
                let active = holder["data_dir"].as_str().unwrap().chars().last().unwrap();
                let active = active.to_digit(10).unwrap() as usize;
                assert!(
                    status["replicated_ledger"]["records"].as_u64().unwrap() > 1,
                    "{status}"
                );
                assert_eq!(status["replicated_ledger"]["copies"], 3, "{status}");
                assert_eq!(
                    status["replicated_ledger"]["latest_snapshot"]["position"], 1,
                    "the stream starts with its first snapshot: {status}"
                );
                let pid = holder["pid"].to_string();
                let (ok, text) = run(std::process::Command::new("kill").args(["-9", &pid]));
                assert!(ok, "{text}");
                killed_orchestrator = Some(active);
            }
            None => {}
        }
        let (ok, text) = run(&mut cli(&["user", "add", user]));
        assert!(ok, "{text}");
        let (ok, text) = run(&mut cli(&["account", "deposit", user, "1"]));
        assert!(ok, "{text}");
        let (ok, text) = run(&mut job(user));
        assert!(
            ok && text.contains("Hello from RhizOS") && text.contains("succeeded"),
            "{user}: {text}\n{}",
            up_log()
        );
    }
    let killed = killed_orchestrator.unwrap();
    let other = 3 - killed;
    let (ok, text) = run(&mut cli(&["ledger", "status"]));
    assert!(
        ok && text.contains("orchestrator: active")
            && text.contains(&format!("orchestrators/{other}")),
        "the standby is the active one now: {text}"
    );
    assert!(
        orchestrator_log(other).contains("writing the replicated ledger"),
        "the standby took over:\n{}\n--- the killed one:\n{}\n--- up:\n{}",
        orchestrator_log(other),
        orchestrator_log(killed),
        up_log()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !up_log().contains(&format!("orchestrator {killed} started again")) {
        assert!(
            Instant::now() < deadline,
            "the killed orchestrator was not restarted:\n{}",
            up_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

/// Two orchestrators, each on its own data dir, share one replicated ledger on a 3-server
/// cluster. The active is `kill -9`ed mid-run: the standby takes over with every committed
/// movement, jobs keep settling exactly, and the killed one, started again, follows as a
/// standby until both files hold the same ledger row for row. Then a flow is started and the
/// new active killed mid-step: the first one takes over and ends the flow, money exact.
#[tokio::test]
async fn killing_the_active_orchestrator_loses_no_committed_job_or_money() {
    let dir = tempfile::tempdir().unwrap();
    let (_nats, settings) = cluster_of_three(dir.path(), "r").await;
    let env = [
        ("RHIZOS_NATS__REPLICAS", "3"),
        ("RHIZOS_ORCHESTRATOR__REPLICATED_LEDGER", "true"),
        ("RHIZOS_ORCHESTRATOR__LEASE_TTL_MS", "2000"),
    ];
    let (a_dir, b_dir) = two_data_dirs(dir.path());
    let mut a = start_orchestrator_with(&settings, &a_dir, &env);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let agent = wasm_agent(&settings, dir.path(), "steady", 4).await;
    let agent_task = tokio::spawn(agent.run(async move {
        let mut stopped = stopped;
        let _ = stopped.wait_for(|s| *s).await;
    }));
    let bus = Bus::connect(&settings.nats).await.unwrap();
    wait_for_a_node(&bus).await;
    let deposited = 50_000_000;
    funded_account(&bus, "ada", deposited, "replicated-1").await;
    // The second orchestrator, on its own (empty) data dir: it joins from the snapshot.
    let mut b = start_orchestrator_with(&settings, &b_dir, &env);

    let module = demo();
    let submit = |index: usize| {
        submit_request(
            "ada",
            &format!("r-{index}"),
            wasm_spec(&module, &["count", "1"], 20_000),
            500_000,
        )
    };
    let jobs = 30;
    let mut slowest = Duration::ZERO;
    for index in 0..jobs {
        if index == jobs / 3 {
            a.kill().unwrap();
        }
        let started = Instant::now();
        let _: SubmitJobReply = request(&bus, &submit(index)).await;
        slowest = slowest.max(started.elapsed());
    }
    let mut spent = 0;
    for index in 0..jobs {
        let job = wait_for(&bus, &format!("r-{index}"), |j| j.state.is_terminal()).await;
        assert_eq!(
            job.state,
            JobState::Succeeded,
            "{job:?}\n{}",
            log_of(&b_dir)
        );
        spent += job.cost_micros.unwrap();
    }
    eprintln!(
        "replicated ledger: the active orchestrator killed mid-run; the slowest submit took {slowest:?} (the failover)"
    );
    let b_log = log_of(&b_dir);
    assert!(
        b_log.contains("restored from the replicated ledger's latest snapshot"),
        "the second orchestrator joined from the snapshot:\n{b_log}"
    );
    let took_over = b_log
        .lines()
        .find(|line| line.contains("writing the replicated ledger"))
        .unwrap_or_else(|| panic!("the standby took over:\n{b_log}"));
    eprintln!("replicated ledger: {took_over}");
    let report: LedgerReport = request(&bus, &VerifyLedger { v: WIRE_VERSION }).await;
    assert!(report.ok, "{:?}", report.problems);
    assert_eq!(
        balance_of(&bus, "ada").await,
        deposited - spent,
        "the deposit made before the failover is there, and every job paid once"
    );

    // The killed one comes back on its file: a standby that catches up and follows.
    let mut a = start_orchestrator_with(&settings, &a_dir, &env);
    let mut last_jobs = 0;
    for index in jobs..jobs + 5 {
        let _: SubmitJobReply = request(&bus, &submit(index)).await;
        let job = wait_for(&bus, &format!("r-{index}"), |j| j.state.is_terminal()).await;
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
        last_jobs += wait_for(&bus, &format!("r-{index}"), |j| j.cost_micros.is_some())
            .await
            .cost_micros
            .unwrap();
    }
    let applied = files_equal(&a_dir, &b_dir, "the killed one started again").await;
    assert!(applied > 1, "records were applied");

    // A flow goes on through a failover too (its escrow and steps are in the replicated
    // ledger): the active (now B) is killed while the flow's first step runs; A takes over,
    // reads that step's end, starts the next and ends the flow, its money exact.
    funded_account(&bus, "flo", 2_000_000, "replicated-flow").await;
    let client = start_a_flow_through_a_crash(&bus, "flo", "over-1").await;
    b.kill().unwrap();
    the_flow_through_a_crash_ends_exact(&bus, &client, "flo", 2_000_000, "over-1").await;
    assert_eq!(
        log_of(&a_dir)
            .matches("writing the replicated ledger")
            .count(),
        2,
        "A was the writer first and took over again for the flow:\n{}",
        log_of(&a_dir)
    );
    assert_eq!(
        balance_of(&bus, "ada").await,
        deposited - spent - last_jobs,
        "the other account untouched"
    );
    let mut b = start_orchestrator_with(&settings, &b_dir, &env);
    let applied = files_equal(&a_dir, &b_dir, "after the flow's failover").await;
    assert!(applied > 1, "records were applied");
    let _ = stop.send(true);
    agent_task.await.unwrap().unwrap();
    assert!(a.interrupt(), "{}", log_of(&a_dir));
    assert!(b.interrupt(), "{}", log_of(&b_dir));
}

/// The snapshot a new member of the replicated ledger restores is the one its record names, as
/// it was taken: two fresh ledgers starting the stream at once, one wins and the other is told;
/// and an orchestrator that later believes the stream empty (a replica answering for a
/// leaderless stream with its own stale state) and offers its whole file as the first snapshot
/// is refused without changing what the first record names — before, it replaced that object
/// with its file (jobs and money in it), and a member joining later started from it and
/// refused the next record (the chaos run's seed 39).
#[tokio::test]
async fn a_late_first_snapshot_never_replaces_the_one_new_members_restore() {
    use rhizos_core::orchestrator::replica::LedgerLog;
    use rhizos_core::orchestrator::store::Store;
    let dir = tempfile::tempdir().unwrap();
    let nats = rhizos_broker::server::NatsServer::start(rhizos_broker::server::LaunchOptions {
        data_dir: Some(dir.path().join("nats")),
        ..Default::default()
    })
    .unwrap();
    let mut settings = Settings::default();
    settings.nats.url = nats.url();
    settings.nats.namespace = format!("g{}", &uuid_like()[..12]);
    let bus = Bus::connect(&settings.nats).await.unwrap();
    let log = LedgerLog::open(&bus).await.unwrap();
    assert_eq!(log.last().await.unwrap(), 0);

    // Two new ledgers start the stream at once: exactly one becomes its first record.
    let (a_path, b_path) = (dir.path().join("a.db"), dir.path().join("b.db"));
    let (a, b) = (
        Store::open(&a_path, 500).unwrap(),
        Store::open(&b_path, 500).unwrap(),
    );
    let (a_id, b_id) = (a.instance().to_owned(), b.instance().to_owned());
    drop((a, b));
    let (a_start, b_start) = tokio::join!(
        log.snapshot(&a_path, &a_id, 0),
        log.snapshot(&b_path, &b_id, 0)
    );
    assert!(
        a_start.is_ok() != b_start.is_ok(),
        "one start wins: {a_start:?} {b_start:?}"
    );
    let (winner_path, winner) = if a_start.is_ok() {
        (&a_path, a_id)
    } else {
        (&b_path, b_id)
    };
    let first = log.latest_snapshot().await.unwrap().unwrap();
    assert_eq!(
        (first.position, first.ledger.as_str()),
        (1, winner.as_str())
    );

    // The winner's file moves on (money deposited: what a projection holds later) and is
    // offered again as the stream's first snapshot.
    {
        let mut store = Store::open(winner_path, 500).unwrap();
        store.create_account("ada").unwrap();
        store.deposit("ada", 7_000_000, None).unwrap();
    }
    let late = log.snapshot(winner_path, &winner, 0).await;
    assert!(
        late.is_err(),
        "a first snapshot of a non-empty stream is refused: {late:?}"
    );
    assert_eq!(log.last().await.unwrap(), 1, "nothing was appended");
    let latest = log.latest_snapshot().await.unwrap().unwrap();
    assert_eq!(latest, first, "the stream still names the first snapshot");

    // A new member restores exactly the ledger the first record was taken of: no account yet.
    let joined = dir.path().join("joined.db");
    log.restore(&latest, &joined).await.unwrap();
    let store = Store::open(&joined, 500).unwrap();
    assert_eq!(store.instance(), winner);
    assert!(
        store.account("ada").is_err(),
        "the restored snapshot is the one taken at the start, not the late file"
    );
}

/// With `ledger_snapshot_every`, the active orchestrator stores snapshots as the ledger grows
/// and trims the stream to what the two latest need: a new member restores the latest and
/// replays only what follows it; a member stopped while the stream was trimmed past its file
/// restores the latest snapshot when started again (its old file set aside), and one frozen
/// while running past the trim takes the latest snapshot's rows when it thaws; every file ends
/// equal to the writer's, row for row, and the money is exact.
#[tokio::test]
async fn snapshots_bound_the_replicated_ledger_and_members_join_from_the_latest() {
    use rhizos_core::orchestrator::replica::LedgerLog;
    let dir = tempfile::tempdir().unwrap();
    let nats = rhizos_broker::server::NatsServer::start(rhizos_broker::server::LaunchOptions {
        data_dir: Some(dir.path().join("nats")),
        ..Default::default()
    })
    .unwrap();
    let mut settings = Settings::default();
    settings.nats.url = nats.url();
    settings.nats.namespace = format!("s{}", &uuid_like()[..12]);
    let env = [
        ("RHIZOS_ORCHESTRATOR__REPLICATED_LEDGER", "true"),
        ("RHIZOS_ORCHESTRATOR__LEDGER_SNAPSHOT_EVERY", "20"),
        ("RHIZOS_ORCHESTRATOR__LEASE_TTL_MS", "2000"),
    ];
    let (a_dir, b_dir) = two_data_dirs(dir.path());
    let mut a = start_orchestrator_with(&settings, &a_dir, &env);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let agent = wasm_agent(&settings, dir.path(), "steady", 4).await;
    let agent_task = tokio::spawn(agent.run(async move {
        let mut stopped = stopped;
        let _ = stopped.wait_for(|s| *s).await;
    }));
    let bus = Bus::connect(&settings.nats).await.unwrap();
    wait_for_a_node(&bus).await;
    let ledger = LedgerLog::open(&bus).await.unwrap();
    let deposited = 50_000_000;
    funded_account(&bus, "ada", deposited, "snapshots-1").await;

    let module = demo();
    let mut spent = 0;
    let mut next = 0;
    let mut run_jobs = async |count: usize| {
        let first = next;
        next += count;
        for index in first..next {
            let submit = submit_request(
                "ada",
                &format!("s-{index}"),
                wasm_spec(&module, &["count", "1"], 20_000),
                500_000,
            );
            let _: SubmitJobReply = request(&bus, &submit).await;
        }
        let mut cost = 0;
        for index in first..next {
            let job = wait_for(&bus, &format!("s-{index}"), |j| j.state.is_terminal()).await;
            assert_eq!(job.state, JobState::Succeeded, "{job:?}");
            cost += job.cost_micros.unwrap();
        }
        cost
    };
    // Whether a snapshot covers `past` and the stream was trimmed past it.
    let trimmed_past = async |past: u64| {
        let (first, _) = ledger.state().await.unwrap();
        let latest = ledger.latest_snapshot().await.unwrap().unwrap();
        (first > past && latest.covers >= past).then_some(latest)
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    // Snapshots are taken (checked every 5 s) as jobs flow, and the stream trimmed.
    let latest = loop {
        spent += run_jobs(5).await;
        if let Some(latest) = trimmed_past(1).await {
            break latest;
        }
        assert!(
            Instant::now() < deadline,
            "no snapshot trimmed the stream\n{}",
            log_of(&a_dir)
        );
    };
    assert!(
        latest.covers > 1 && latest.position > latest.covers,
        "{latest:?}"
    );
    // (Logged once the trim is done: a moment after the test can see it.)
    log_says(&a_dir, "ledger snapshot stored").await;

    // A new member restores the latest snapshot, not the first, and follows.
    let mut b = start_orchestrator_with(&settings, &b_dir, &env);
    spent += run_jobs(5).await;
    let b_applied = files_equal(&a_dir, &b_dir, "a new member").await;
    let joined = log_of(&b_dir);
    let restored = joined
        .lines()
        .find(|line| line.contains("restored from the replicated ledger's latest snapshot"))
        .unwrap_or_else(|| panic!("the new member restored a snapshot:\n{joined}"));
    // (The log is coloured: the escapes go before reading a field.)
    let mut plain = String::new();
    let mut escape = false;
    for c in restored.chars() {
        match (escape, c) {
            (false, '\x1b') => escape = true,
            (true, 'm') => escape = false,
            (false, c) => plain.push(c),
            (true, _) => {}
        }
    }
    let covers: u64 = plain
        .split("covers=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{restored}"));
    assert!(
        covers > 1,
        "it restored a later snapshot than the first: {restored}"
    );

    // Stopped while the stream is trimmed past its file: started again, it restores.
    assert!(b.interrupt(), "{}", log_of(&b_dir));
    while trimmed_past(u64::try_from(b_applied).unwrap() + 1)
        .await
        .is_none()
    {
        spent += run_jobs(5).await;
        assert!(
            Instant::now() < deadline,
            "the stream was not trimmed past the stopped member's file\n{}",
            log_of(&a_dir)
        );
    }
    let mut b = start_orchestrator_with(&settings, &b_dir, &env);
    spent += run_jobs(3).await;
    files_equal(&a_dir, &b_dir, "a member behind the trimmed stream").await;
    assert!(
        log_of(&b_dir).contains("older than what the replicated ledger keeps"),
        "{}",
        log_of(&b_dir)
    );
    // (Named by where it stopped: at least where it was last seen equal — the writer's sweeps
    // may have written more before it was stopped.)
    assert!(
        std::fs::read_dir(&b_dir).unwrap().any(|entry| entry
            .unwrap()
            .file_name()
            .to_string_lossy()
            .strip_prefix("ledger.db.behind-")
            .and_then(|n| n.parse::<i64>().ok())
            .is_some_and(|n| n >= b_applied)),
        "the old file was set aside"
    );

    // Frozen while running (SIGSTOP: its follow stalls, as on a machine that hangs) until
    // the stream is trimmed past it, then thawed: its rows are replaced by the latest
    // snapshot's and it follows on, without a restart.
    let b_applied = files_equal(&a_dir, &b_dir, "a member restored on start").await;
    b.signal("STOP");
    // Past what its consumer may already hold in its socket (pulls of 200 records, the next
    // asked for when half are left: up to 300 outstanding).
    let read_ahead =
        3 * u64::try_from(rhizos_core::orchestrator::replica::FOLLOW_BATCH).unwrap() / 2;
    while trimmed_past(u64::try_from(b_applied).unwrap() + read_ahead + 10)
        .await
        .is_none()
    {
        spent += run_jobs(5).await;
        assert!(
            Instant::now() < deadline,
            "the stream was not trimmed past the frozen member's file\n{}",
            log_of(&a_dir)
        );
    }
    b.signal("CONT");
    spent += run_jobs(3).await;
    files_equal(
        &a_dir,
        &b_dir,
        "a running member the stream was trimmed past",
    )
    .await;
    assert!(
        log_of(&b_dir).contains("rows were replaced by the latest snapshot"),
        "{}",
        log_of(&b_dir)
    );

    let report: LedgerReport = request(&bus, &VerifyLedger { v: WIRE_VERSION }).await;
    assert!(report.ok, "{:?}", report.problems);
    assert_eq!(balance_of(&bus, "ada").await, deposited - spent);
    let _ = stop.send(true);
    agent_task.await.unwrap().unwrap();
    assert!(b.interrupt(), "{}", log_of(&b_dir));
    assert!(a.interrupt(), "{}", log_of(&a_dir));
}

/// The old writer of chaos seed 28: it appends its batch in two parts as a real writer does
/// (each with the expected last sequence), but holds between them — as when it lost its lease
/// mid-append — until the test lets it go on.
struct HeldBetweenParts {
    jetstream: async_nats::jetstream::Context,
    subject: String,
    ledger: String,
    last: u64,
    runtime: tokio::runtime::Handle,
    first_part_stored: std::sync::mpsc::Sender<u64>,
    go_on: std::sync::mpsc::Receiver<()>,
}

impl rhizos_core::orchestrator::store::Journal for HeldBetweenParts {
    fn append(&mut self, changeset: Vec<u8>) -> Result<u64, String> {
        use rhizos_core::orchestrator::replica::{LEDGER_HEADER, PART_HEADER, SCHEMA_HEADER};
        let half = changeset.len() / 2;
        for (part, bytes) in [&changeset[..half], &changeset[half..]]
            .into_iter()
            .enumerate()
        {
            if part == 1 {
                self.first_part_stored.send(self.last).unwrap();
                self.go_on.recv().unwrap();
            }
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(LEDGER_HEADER, self.ledger.as_str());
            let schema = rhizos_core::orchestrator::store::schema::SCHEMA_VERSION.to_string();
            headers.insert(SCHEMA_HEADER, schema.as_str());
            headers.insert(PART_HEADER, format!("{}/2", part + 1).as_str());
            let publish = async_nats::jetstream::message::PublishMessage::build()
                .headers(headers)
                .payload(bytes::Bytes::copy_from_slice(bytes))
                .expected_last_sequence(self.last);
            let ack = self.runtime.block_on(async {
                self.jetstream
                    .send_publish(self.subject.clone(), publish)
                    .await
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())
            })?;
            self.last = ack.sequence;
        }
        Ok(self.last)
    }

    fn append_snapshot(&mut self, _object: &str, _covers: u64) -> Result<u64, String> {
        Err("this writer takes no snapshot".into())
    }

    fn stop(&mut self, _why: String) {}
}

/// How a batch cut short at the stream's end by a writer that lost its lease mid-append ends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum CutShort {
    /// Its writer appends the rest (and commits) before the new writer appends anything.
    CompletedFirst,
    /// The new writer appends first.
    FencedOff,
}

/// Chaos seed 28, made deterministic: a writer loses its lease while its batch is in the
/// stream in part only; a new orchestrator takes over and becomes the writer with those parts
/// at the stream's end. Either the old writer completes its batch first — the new writer's
/// first append is then refused, it follows again and applies the whole batch, and its
/// request is served after — or the new writer appends first, fencing the parts off: the old
/// writer's next part is refused and it commits nothing. Either way every file (the old
/// writer's, started again as a standby) ends equal to the new writer's, row for row, and the
/// money is exact. (Before the fix the new writer skipped the parts as abandoned, applied
/// nothing of the batch its predecessor then committed, and the files disagreed.)
#[tokio::test]
async fn a_batch_cut_short_by_a_lost_lease_is_applied_whole_or_fenced_off_never_half() {
    let dir = tempfile::tempdir().unwrap();
    let nats = rhizos_broker::server::NatsServer::start(rhizos_broker::server::LaunchOptions {
        data_dir: Some(dir.path().join("nats")),
        ..Default::default()
    })
    .unwrap();
    for case in [CutShort::CompletedFirst, CutShort::FencedOff] {
        cut_short(&nats, &dir.path().join(format!("{case:?}")), case).await;
    }
}

async fn cut_short(
    nats: &rhizos_broker::server::NatsServer,
    dir: &std::path::Path,
    case: CutShort,
) {
    use rhizos_core::orchestrator::replica::LedgerLog;
    use rhizos_core::orchestrator::store::{CommitError, Store};
    let mut settings = Settings::default();
    settings.nats.url = nats.url();
    settings.nats.namespace = format!("c{}", &uuid_like()[..12]);
    let env = [
        ("RHIZOS_ORCHESTRATOR__REPLICATED_LEDGER", "true"),
        ("RHIZOS_ORCHESTRATOR__LEASE_TTL_MS", "2000"),
    ];
    let (a_dir, b_dir) = two_data_dirs(dir);
    let bus = Bus::connect(&settings.nats).await.unwrap();
    let deposited = 10_000_000;
    let mut a = start_orchestrator_with(&settings, &a_dir, &env);
    funded_account(&bus, "ada", deposited, "cut-1").await;
    assert!(a.interrupt(), "{}", log_of(&a_dir));
    let ledger = LedgerLog::open(&bus).await.unwrap();
    let last = ledger.last().await.unwrap();

    // The old writer, on A's file: a deposit whose batch it appends in two parts, holding
    // after the first.
    let (first_part_stored, stored) = std::sync::mpsc::channel();
    let (go_on, held) = std::sync::mpsc::channel();
    let writer = {
        let (jetstream, subject) = (bus.jetstream.clone(), bus.subjects.ledger_changes());
        let (path, runtime) = (a_dir.join("ledger.db"), tokio::runtime::Handle::current());
        tokio::task::spawn_blocking(move || {
            let mut store = Store::open(&path, 500).unwrap();
            assert_eq!(
                store.applied().unwrap(),
                last,
                "A's file is the stream's ledger"
            );
            let journal = HeldBetweenParts {
                jetstream,
                subject,
                ledger: store.instance().to_owned(),
                last,
                runtime,
                first_part_stored,
                go_on: held,
            };
            store.set_journal(Some(Box::new(journal))).unwrap();
            let (deposit, commit) =
                store.group_commit(|store| store.deposit("ada", 1_000_000, Some("late")));
            deposit.unwrap();
            commit
        })
    };
    let stored = tokio::task::spawn_blocking(move || stored.recv().unwrap())
        .await
        .unwrap();
    assert_eq!(stored, last + 1, "part 1 of 2 is the stream's last record");

    // A new orchestrator joins and takes over with that part at the stream's end.
    let mut b = start_orchestrator_with(&settings, &b_dir, &env);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !log_of(&b_dir).contains("writing the replicated ledger") {
        assert!(
            Instant::now() < deadline,
            "B never took over\n{}",
            log_of(&b_dir)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let b_deposit = Deposit {
        v: WIRE_VERSION,
        account: "ada".into(),
        amount_micros: 2_000_000,
        idempotency_key: Some("after".into()),
    };
    let late_in = match case {
        CutShort::CompletedFirst => {
            go_on.send(()).unwrap();
            let commit = writer.await.unwrap();
            assert_eq!(
                commit,
                Ok(()),
                "the old writer's batch is in the stream whole"
            );
            assert_eq!(ledger.last().await.unwrap(), last + 2);
            // B's first append expects the stream's end as it found it: refused, B follows
            // again, applies the whole batch, and serves the deposit (sent again by the bus).
            let _: AccountView = request(&bus, &b_deposit).await;
            true
        }
        CutShort::FencedOff => {
            let _: AccountView = request(&bus, &b_deposit).await;
            assert_eq!(
                ledger.last().await.unwrap(),
                last + 2,
                "B appended after part 1"
            );
            go_on.send(()).unwrap();
            let commit = writer.await.unwrap();
            assert!(
                matches!(commit, Err(CommitError::NotWriting(ref e)) if e.contains("not replicated")),
                "the old writer's part 2 is refused and it commits nothing: {commit:?}"
            );
            false
        }
    };
    let late = if late_in { 1_000_000 } else { 0 };
    assert_eq!(
        balance_of(&bus, "ada").await,
        deposited + late + 2_000_000,
        "{case:?}: the late deposit is in the ledger exactly when its writer committed it"
    );
    let report: LedgerReport = request(&bus, &VerifyLedger { v: WIRE_VERSION }).await;
    assert!(report.ok, "{:?}", report.problems);

    // The old writer's file, started again as a standby, follows B's ledger to the same rows.
    let mut a = start_orchestrator_with(&settings, &a_dir, &env);
    files_equal(&a_dir, &b_dir, &format!("{case:?}")).await;
    if case == CutShort::CompletedFirst {
        assert!(
            log_of(&b_dir).contains("stopped writing the replicated ledger"),
            "B's first append was refused and it caught up: {}",
            log_of(&b_dir)
        );
    }
    eprintln!(
        "{case:?}: part 1 of 2 at record {}; B took over with it at the stream's end; both files equal at record {}",
        last + 1,
        rhizos_testbed::ledger_rows(&b_dir.join("ledger.db"))
            .unwrap()
            .0
    );
    assert!(a.interrupt(), "{}", log_of(&a_dir));
    assert!(b.interrupt(), "{}", log_of(&b_dir));
}
