//! A network on a 3-server NATS cluster with every stream and the lease replicated three
//! times: the server the orchestrator is connected to is killed mid-run (`kill -9`), and the
//! network carries on — every job settles once, the money adds up — and how long submits
//! stalled is printed.

use crate::common::*;
use crate::restart::{balance_of, funded_account, request, wait_for, wait_for_a_node, wasm_agent};
use rhizos_broker::server::NatsCluster;
use rhizos_broker::wire::{JobState, LedgerReport, SubmitJobReply, VerifyLedger, WIRE_VERSION};
use rhizos_broker::{Bus, Settings};
use rhizos_core::Orchestrator;
use rhizos_testbed::cluster::{uuid_like, wasm_spec};
use std::time::{Duration, Instant};

#[tokio::test]
async fn losing_one_of_three_nats_servers_loses_no_job_and_no_money() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsCluster::start(3, "rhizos", dir.path()).unwrap();
    let first = nats.url().split(',').next().unwrap().to_owned();
    let probe = async_nats::connect(first).await.unwrap();
    NatsCluster::wait_jetstream(&probe, Duration::from_secs(60))
        .await
        .unwrap();
    let mut settings = Settings::default();
    settings.nats.url = nats.url();
    settings.nats.namespace = format!("c{}", &uuid_like()[..12]);
    settings.nats.replicas = 3;
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

/// `rhizos up --cluster 3` the way an operator tries it: three servers, authentication on, a
/// user's job runs; one server killed with `kill -9`, a new user is still admitted (the others
/// re-read the credentials) and runs a job too; Ctrl-C stops everything.
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
    for (user, lost) in [("alice", false), ("bob", true)] {
        if lost {
            let pid = std::fs::read_to_string(
                data_dir
                    .join("nats/rhizos-1")
                    .join(rhizos_broker::server::PID_FILE),
            )
            .unwrap();
            let (ok, text) = run(std::process::Command::new("kill").args(["-9", pid.trim()]));
            assert!(ok, "{text}");
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
