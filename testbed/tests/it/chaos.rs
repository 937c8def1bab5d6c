//! Node loss: the job moves to another node with its escrow intact and is settled exactly once.

use crate::common::*;
use rhizos_broker::wire::{
    Ack, ExecutionOutcome, ExitKind, JobReport, JobState, NodeList, ReportPhase, WIRE_VERSION,
};
use rhizos_testbed::cluster::wasm_spec;
use rhizos_testbed::{Cluster, ClusterOptions};
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_lost_node_s_job_is_requeued_runs_elsewhere_and_is_settled_once() {
    let options = ClusterOptions {
        agents: 2,
        heartbeat_interval_ms: 200,
        // 2 s of silence: quick to detect, yet no false loss when CI runs tests side by side
        // (containers of the Docker tests included) on two cores.
        missed_heartbeats: 10,
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start(options).await.unwrap();
    cluster.funded_account("ivy", 1_000_000).await.unwrap();
    let spec = wasm_spec(&demo(), &["count", "8", "100"], 20_000);
    cluster
        .submit(&submit_request("ivy", "moved", spec, 500_000))
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let job = cluster.job("moved").await.unwrap();
        if job.state == JobState::Running {
            break job;
        }
        assert!(Instant::now() < deadline, "never ran: {job:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let lost_node = first.node_id.clone().unwrap();
    let lost_index: usize = lost_node.trim_start_matches("node-").parse().unwrap();
    cluster.kill_agent(lost_index);

    let job = cluster
        .wait_for_end("moved", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert_eq!(job.attempt, 2);
    let survivor = job.node_id.clone().unwrap();
    assert_ne!(survivor, lost_node);
    assert_eq!(
        job.stdout.as_deref(),
        Some("line 1\nline 2\nline 3\nline 4\nline 5\nline 6\nline 7\nline 8\n")
    );
    assert_eq!(
        ledger_kinds(&cluster, "moved"),
        ["hold", "settle"],
        "held once, settled once"
    );

    // The lost node's late result (its execution ran on, unobserved) is not paid.
    let before = balances(&cluster);
    let late = JobReport {
        v: WIRE_VERSION,
        node_id: lost_node.clone(),
        job_id: "moved".into(),
        attempt: 1,
        phase: ReportPhase::Finished {
            outcome: ExecutionOutcome {
                fuel_consumed: None,
                output_files: Default::default(),
                kind: ExitKind::Exited,
                exit_code: Some(0),
                message: None,
                elapsed_ms: 900,
                stdout: String::new(),
                stderr: String::new(),
                blobs: Default::default(),
                usage: None,
            },
        },
        signature: None,
    };
    let ack: Ack = cluster.client().job_report(&late).await.unwrap();
    assert!(!ack.accepted, "{ack:?}");
    assert_eq!(balances(&cluster), before);

    let cost = job.cost_micros.unwrap();
    let balances = balances(&cluster);
    assert_eq!(balances["ivy"], 1_000_000 - cost);
    let survivor_account = format!("provider-{}", survivor.trim_start_matches("node-"));
    assert_eq!(balances[&survivor_account], job.provider_micros.unwrap());
    let lost_account = format!("provider-{lost_index}");
    assert_eq!(balances.get(&lost_account).copied().unwrap_or(0), 0);
    // The provider record: the lost attempt counts against the lost node only.
    let list: NodeList = cluster.client().node_list().await.unwrap();
    let view = |id: &str| list.nodes.iter().find(|n| n.node_id == id).unwrap().clone();
    let (lost, kept) = (view(&lost_node), view(&survivor));
    assert_eq!(
        (
            lost.status.as_str(),
            lost.jobs_run,
            lost.jobs_succeeded,
            lost.reputation
        ),
        ("lost", 1, 0, 0.0)
    );
    assert_eq!(
        (
            kept.status.as_str(),
            kept.jobs_run,
            kept.jobs_succeeded,
            kept.reputation
        ),
        ("live", 1, 1, 1.0)
    );
    assert_eq!(kept.tier, 0, "no GPU");
    assert_ledger_consistent(&cluster).await;
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_assignment_committed_but_never_sent_is_requeued_and_runs_once() {
    let cluster = Cluster::start(ClusterOptions {
        heartbeat_interval_ms: 200,
        max_concurrent: 1,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    cluster.funded_account("jo", 1_000_000).await.unwrap();
    let module = demo();
    cluster
        .submit(&submit_request(
            "jo",
            "busy",
            wasm_spec(&module, &["count", "15", "100"], 20_000),
            500_000,
        ))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.job("busy").await.unwrap().state != JobState::Running {
        assert!(Instant::now() < deadline, "busy never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster
        .submit(&submit_request(
            "jo",
            "lost-send",
            wasm_spec(&module, &["count", "2"], 20_000),
            200_000,
        ))
        .await
        .unwrap();
    assert_eq!(
        cluster.job("lost-send").await.unwrap().state,
        JobState::Pending,
        "the only slot is busy"
    );
    // What a crash between the assignment's commit and its delivery leaves behind: the
    // orchestrator's own storage code commits the assignment, and nothing sends it.
    let mut store =
        rhizos_core::orchestrator::store::Store::open(&cluster.ledger_path(), 500).unwrap();
    assert_eq!(
        store
            .assign(
                "lost-send",
                "node-0",
                &ClusterOptions::default().pricing,
                None
            )
            .unwrap(),
        Some(1)
    );
    drop(store);

    // The node's heartbeats never list attempt 1: after the grace period it is requeued, and
    // runs as attempt 2 once the slot frees.
    let job = cluster
        .wait_for_end("lost-send", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert_eq!(job.attempt, 2);
    assert_eq!(job.stdout.as_deref(), Some("line 1\nline 2\n"));
    assert_eq!(ledger_kinds(&cluster, "lost-send"), ["hold", "settle"]);
    let busy = cluster
        .wait_for_end("busy", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(busy.state, JobState::Succeeded);
    assert_ledger_consistent(&cluster).await;
    cluster.shutdown().await.unwrap();
}

/// An agent shut down gracefully hands its running job back: it runs again elsewhere and is
/// settled once, with no retry spent and nothing refunded.
#[tokio::test]
async fn a_gracefully_stopped_agent_hands_its_job_back_to_run_elsewhere() {
    let mut cluster = Cluster::start(ClusterOptions {
        agents: 2,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    cluster.funded_account("hal", 1_000_000).await.unwrap();
    let mut spec = wasm_spec(&demo(), &["count", "6", "100"], 20_000);
    spec.max_retries = 0;
    cluster
        .submit(&submit_request("hal", "handed", spec, 500_000))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let job = cluster.job("handed").await.unwrap();
        if job.state == JobState::Running {
            break job;
        }
        assert!(Instant::now() < deadline, "never ran: {job:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let leaving = first.node_id.clone().unwrap();
    let index: usize = leaving.trim_start_matches("node-").parse().unwrap();
    cluster.stop_agent(index).await.unwrap();

    let job = cluster
        .wait_for_end("handed", Duration::from_secs(60))
        .await
        .unwrap();
    // With no retries allowed, only a hand-back (not a failure) lets it run again.
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert_eq!(job.attempt, 2);
    assert_ne!(job.node_id.as_deref(), Some(leaving.as_str()));
    assert_eq!(ledger_kinds(&cluster, "handed"), ["hold", "settle"]);
    assert_ledger_consistent(&cluster).await;
    cluster.shutdown().await.unwrap();
}

/// The bus goes away for longer than the nodes' loss window and comes back: the orchestrator
/// pauses node-loss detection while its own connection is down and gives every node a whole
/// window after it, so the running job is not requeued and ends on its first attempt.
#[tokio::test]
async fn a_bus_outage_does_not_requeue_the_network() {
    let mut cluster = Cluster::start(ClusterOptions {
        heartbeat_interval_ms: 200,
        // A 2 s window: long enough for every client to reconnect after the server is back
        // (each on its own backoff), far shorter than the outage.
        missed_heartbeats: 10,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    cluster.funded_account("otto", 1_000_000).await.unwrap();
    cluster
        .submit(&submit_request(
            "otto",
            "outage",
            wasm_spec(&demo(), &["count", "50", "200"], 30_000),
            500_000,
        ))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.job("outage").await.unwrap().state != JobState::Running {
        assert!(Instant::now() < deadline, "never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Down for 5 s: two and a half times the loss window.
    let port = cluster.nats.port();
    let data_dir = cluster.nats.data_dir().to_path_buf();
    cluster.nats.stop();
    tokio::time::sleep(Duration::from_millis(5_000)).await;
    cluster.nats = rhizos_broker::server::NatsServer::start(rhizos_broker::server::LaunchOptions {
        port: Some(port),
        data_dir: Some(data_dir),
        authorization: None,
        listen: None,
    })
    .unwrap();
    // Every client reconnects on its own schedule: until the orchestrator has resubscribed,
    // a request finds nobody serving it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = cluster.job("outage").await {
        assert!(
            Instant::now() < deadline,
            "the orchestrator never came back: {e}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let job = cluster
        .wait_for_end("outage", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        (job.state, job.attempt),
        (JobState::Succeeded, 1),
        "{job:?}"
    );
    assert_eq!(ledger_kinds(&cluster, "outage"), ["hold", "settle"]);
    assert_ledger_consistent(&cluster).await;
    cluster.shutdown().await.unwrap();
}
