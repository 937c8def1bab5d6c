//! Fair money against a lying node: what is billed is what the orchestrator measured, and a
//! node that never reports cannot keep a job (and its escrow) past the job's deadline.

use crate::common::*;
use futures::StreamExt as _;
use rhizos_broker::wire::{
    self, Ack, AssignJob, ExecutionOutcome, ExecutionRef, Heartbeat, JobReport, JobState,
    RegisterNode, Reply, ReportPhase, StopJob, WIRE_VERSION,
};
use rhizos_testbed::cluster::wasm_spec;
use rhizos_testbed::{Cluster, ClusterOptions};
use std::time::{Duration, Instant};

pub(crate) const NODE: &str = "liar";

fn registration() -> RegisterNode {
    hand_rolled_registration(NODE, "liar-provider")
}

/// A cluster without agents, where the test speaks for node [`NODE`]: registered, with its
/// assignments subscribed.
pub(crate) async fn with_hand_rolled_node() -> (Cluster, rhizos_broker::Bus, async_nats::Subscriber)
{
    let cluster = Cluster::start(ClusterOptions {
        agents: 0,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let bus = cluster.bus.clone();
    let assignments = bus
        .client
        .subscribe(bus.subjects.job_assign(NODE).unwrap())
        .await
        .unwrap();
    bus.call(&registration()).await.unwrap();
    (cluster, bus, assignments)
}

/// The next assignment sent to the hand-rolled node (within 10 s).
pub(crate) async fn next_assignment(
    assignments: &mut async_nats::Subscriber,
) -> async_nats::Message {
    tokio::time::timeout(Duration::from_secs(10), assignments.next())
        .await
        .expect("an assignment within 10 s")
        .expect("the subscription is open")
}

/// Acks the assignment in `message` and reports it running; returns the running report.
pub(crate) async fn accept(bus: &rhizos_broker::Bus, message: async_nats::Message) -> JobReport {
    accept_as(bus, NODE, message).await
}

/// [`accept`] as node `node`.
pub(crate) async fn accept_as(
    bus: &rhizos_broker::Bus,
    node: &str,
    message: async_nats::Message,
) -> JobReport {
    let assign: AssignJob = wire::decode(&message.payload, 4 << 20).unwrap();
    let ack = wire::encode(&Reply::ok(Ack {
        accepted: true,
        note: None,
    }));
    bus.client
        .publish(message.reply.unwrap(), ack)
        .await
        .unwrap();
    let running = JobReport {
        v: WIRE_VERSION,
        node_id: node.into(),
        job_id: assign.job_id,
        attempt: assign.attempt,
        phase: ReportPhase::Running,
        signature: None,
    };
    let ack: Ack = bus.call(&running).await.unwrap();
    assert!(ack.accepted);
    running
}

/// The result of `running`: exited 0 after `elapsed_ms` (as the node claims).
fn result_of(running: &JobReport, elapsed_ms: u64) -> JobReport {
    JobReport {
        phase: ReportPhase::Finished {
            outcome: ExecutionOutcome::exited(0, elapsed_ms),
        },
        ..running.clone()
    }
}

/// Heartbeats as the hand-rolled node every 300 ms (its registered interval), listing what
/// `held` holds, until aborted: without them the node is lost after three intervals.
pub(crate) fn heartbeat(
    bus: &rhizos_broker::Bus,
    held: tokio::sync::watch::Receiver<Vec<ExecutionRef>>,
) -> tokio::task::JoinHandle<()> {
    heartbeat_as(bus, NODE, held)
}

/// [`heartbeat`] as node `node`.
pub(crate) fn heartbeat_as(
    bus: &rhizos_broker::Bus,
    node: &str,
    held: tokio::sync::watch::Receiver<Vec<ExecutionRef>>,
) -> tokio::task::JoinHandle<()> {
    let (bus, node) = (bus.clone(), node.to_owned());
    tokio::spawn(async move {
        loop {
            let beat = Heartbeat {
                v: WIRE_VERSION,
                node_id: node.clone(),
                running: held.borrow().clone(),
                free_slots: 2,
                ts_ms: 0,
                gpus: vec![],
            };
            let subject = bus.subjects.node_heartbeat(&node).unwrap();
            let _ = bus.client.publish(subject, wire::encode(&beat)).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

/// Takes the next assignment as the lying node ([`accept`]) and lists it in its heartbeats
/// from now on. Returns its running report.
async fn take(
    bus: &rhizos_broker::Bus,
    held: &tokio::sync::watch::Sender<Vec<ExecutionRef>>,
    assignments: &mut async_nats::Subscriber,
) -> JobReport {
    let message = next_assignment(assignments).await;
    let running = accept(bus, message).await;
    held.send_modify(|list| {
        list.push(ExecutionRef {
            job_id: running.job_id.clone(),
            attempt: running.attempt,
        })
    });
    running
}

#[tokio::test]
async fn a_lying_node_is_paid_what_was_measured_and_cannot_stall_a_job() {
    let (cluster, bus, mut assignments) = with_hand_rolled_node().await;
    let mut stops = bus
        .client
        .subscribe(bus.subjects.job_stop(NODE).unwrap())
        .await
        .unwrap();
    cluster.funded_account("uma", 2_000_000).await.unwrap();

    // The node answers assignments and reports them running; it keeps heartbeating the jobs it
    // holds, listing them as running forever.
    let (held_tx, held_rx) = tokio::sync::watch::channel(Vec::<ExecutionRef>::new());
    let heartbeats = heartbeat(&bus, held_rx);
    let module = demo();
    // 1. Claims a 30 s run (its whole timeout, the whole max cost) a moment after it started.
    let started = Instant::now();
    cluster
        .submit(&submit_request(
            "uma",
            "overclaim",
            wasm_spec(&module, &["count", "1"], 30_000),
            400_000,
        ))
        .await
        .unwrap();
    let running = take(&bus, &held_tx, &mut assignments).await;
    let finished = result_of(&running, 30_000);
    let ack: Ack = bus.call(&finished).await.unwrap();
    assert!(ack.accepted);
    let since = started.elapsed().as_millis() as i64;
    let job = cluster.job("overclaim").await.unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(
        job.elapsed_ms,
        Some(30_000),
        "what the node reported is kept"
    );
    let cost = job.cost_micros.unwrap();
    // At most the time since submit + the 2 s slack at 10 micro-USD per ms — not 300 000.
    assert!(
        cost <= (since + 2_000) * 10,
        "charged {cost} after {since} ms"
    );
    assert!(
        cost >= 20_000,
        "an honest-looking claim within the slack stands: {cost}"
    );
    let receipt = cluster.client().receipt_get("overclaim").await.unwrap();
    let body = receipt.verify(None).unwrap();
    assert_eq!(body.reported_elapsed_ms, Some(30_000));
    assert_eq!(body.billed_elapsed_ms, Some(cost as u64 / 10));

    // 2. Takes a 1 s job and never reports; its heartbeats keep listing it as running.
    let stalled_at = Instant::now();
    cluster
        .submit(&submit_request(
            "uma",
            "stall",
            wasm_spec(&module, &["sleep", "60000"], 1_000),
            400_000,
        ))
        .await
        .unwrap();
    let stalled = take(&bus, &held_tx, &mut assignments).await;
    let job = cluster
        .wait_for_end("stall", Duration::from_secs(30))
        .await
        .unwrap();
    let took = stalled_at.elapsed();
    assert_eq!(job.state, JobState::TimedOut, "{job:?}");
    assert!(
        job.reason
            .as_deref()
            .unwrap()
            .contains("past its timeout of 1000 ms"),
        "{job:?}"
    );
    assert!(
        took >= Duration::from_millis(3_000),
        "timeout + slack: {took:?}"
    );
    // Its whole timeout (1 000 ms × 10 micro-USD), the rest refunded.
    assert_eq!(
        (job.cost_micros, job.refund_micros),
        (Some(10_000), Some(390_000))
    );
    // And the node is told to stop it (and "overclaim", which it still lists though it ended).
    // Its first answer is the agent's "still starting; retry": the stop is asked again.
    let mut asked = 0;
    while asked < 2 {
        let message = tokio::time::timeout(Duration::from_secs(10), stops.next())
            .await
            .expect("the orchestrator stops the overrun job on its node, and asks again")
            .unwrap();
        let stop: StopJob = wire::decode(&message.payload, 64 << 10).unwrap();
        if (stop.job_id.as_str(), stop.attempt) != ("stall", stalled.attempt) {
            continue;
        }
        asked += 1;
        let ack = Ack {
            accepted: asked > 1,
            note: (asked == 1).then(|| "execution is still starting; retry".to_owned()),
        };
        if let Some(reply) = message.reply {
            bus.client
                .publish(reply, wire::encode(&Reply::ok(ack)))
                .await
                .unwrap();
        }
    }
    // A late result changes nothing.
    let late = result_of(&stalled, 60_000);
    let _: Ack = bus.call(&late).await.unwrap();
    assert_eq!(
        cluster.job("stall").await.unwrap().cost_micros,
        Some(10_000)
    );
    heartbeats.abort();
    assert_ledger_consistent(&cluster).await;
    cluster.shutdown().await.unwrap();
}

/// A registration that crosses an assignment on the wire (sent before the node saw it) does
/// not requeue it: attempts younger than the grace may be in flight.
#[tokio::test]
async fn a_registration_racing_an_assignment_does_not_requeue_it() {
    let (cluster, bus, mut assignments) = with_hand_rolled_node().await;
    // Alive throughout (on a loaded machine the steps below can outlast three intervals), and
    // listing nothing: the node has not seen the job.
    let (held, held_rx) = tokio::sync::watch::channel(Vec::<ExecutionRef>::new());
    let heartbeats = heartbeat(&bus, held_rx);
    cluster.funded_account("rae", 1_000_000).await.unwrap();
    cluster
        .submit(&submit_request(
            "rae",
            "raced",
            wasm_spec(&demo(), &["count", "1"], 10_000),
            400_000,
        ))
        .await
        .unwrap();
    let message = next_assignment(&mut assignments).await;
    // Its heartbeats list the job from now on; its registration, sent before, did not.
    let assign: AssignJob = wire::decode(&message.payload, 4 << 20).unwrap();
    held.send_modify(|list| {
        list.push(ExecutionRef {
            job_id: assign.job_id.clone(),
            attempt: assign.attempt,
        })
    });
    // The node registers again (a plugin changed) listing nothing: it had not seen the job yet.
    let ack: Ack = bus.call(&registration()).await.unwrap();
    assert!(ack.accepted);
    let job = cluster.job("raced").await.unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Assigned, 1), "{job:?}");
    // Then it takes the assignment and runs it: the first attempt is the one paid.
    let running = accept(&bus, message).await;
    let finished = result_of(&running, 5);
    let ack: Ack = bus.call(&finished).await.unwrap();
    assert!(ack.accepted, "{ack:?}");
    let job = cluster.job("raced").await.unwrap();
    assert_eq!(
        (job.state, job.attempt),
        (JobState::Succeeded, 1),
        "{job:?}"
    );
    heartbeats.abort();
    assert_ledger_consistent(&cluster).await;
    cluster.shutdown().await.unwrap();
}

/// Whether the orchestrator's ledger file holds a registration of `node_id`.
fn registered_in_the_ledger(cluster: &Cluster, node_id: &str) -> bool {
    let conn = rusqlite::Connection::open_with_flags(
        cluster.ledger_path(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.query_row("SELECT COUNT(*) FROM nodes WHERE id = ?1", [node_id], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap()
        == 1
}

/// Nodes that come and go do not pile up: a node lost for longer than `lost_node_max_age_s`
/// is forgotten (gone from the node list and the ledger's registrations; a live node stays).
/// Heartbeats from a forgotten node make the orchestrator ask its agent to register again —
/// once, however many heartbeats come — and once registered it is listed live again. A real
/// agent asked so registers again.
#[tokio::test]
async fn a_long_lost_node_is_forgotten_and_asked_to_register_when_heard_from_again() {
    let cluster = Cluster::start(ClusterOptions {
        agents: 1,
        lost_node_max_age_s: Some(1),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let (bus, client) = (cluster.bus.clone(), cluster.client());
    let mut asks = bus
        .client
        .subscribe(bus.subjects.node_reregister("drifter").unwrap())
        .await
        .unwrap();
    let drifter = hand_rolled_registration("drifter", "drifter-provider");
    bus.call(&drifter).await.unwrap();
    assert!(registered_in_the_ledger(&cluster, "drifter"));

    // It never heartbeats: lost after three missed 300 ms beats, forgotten a second later.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let nodes = client.node_list().await.unwrap().nodes;
        if !nodes.iter().any(|n| n.node_id == "drifter") {
            assert!(
                nodes
                    .iter()
                    .any(|n| n.node_id == "node-0" && n.status == "live"),
                "the live node stays: {nodes:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "never forgotten: {nodes:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!registered_in_the_ledger(&cluster, "drifter"));
    assert!(client.node_info("drifter").await.is_err());

    // Heard from again: asked to register, once for a burst of heartbeats.
    let heartbeat = Heartbeat {
        v: WIRE_VERSION,
        node_id: "drifter".into(),
        running: vec![],
        free_slots: 4,
        ts_ms: rhizos_core::now_ms(),
        gpus: vec![],
    };
    for _ in 0..5 {
        bus.client
            .publish(
                bus.subjects.node_heartbeat("drifter").unwrap(),
                wire::encode(&heartbeat),
            )
            .await
            .unwrap();
    }
    let ask = tokio::time::timeout(Duration::from_secs(5), asks.next())
        .await
        .expect("the orchestrator asked the node to register again")
        .unwrap();
    let _: wire::RegisterAgain = serde_json::from_slice(&ask.payload).unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(1_500), asks.next())
            .await
            .is_err(),
        "one ask for a burst of heartbeats"
    );
    bus.client
        .publish(
            ask.reply.unwrap(),
            wire::encode(&Reply::ok(Ack {
                accepted: true,
                note: None,
            })),
        )
        .await
        .unwrap();
    bus.call(&drifter).await.unwrap();
    let view = client.node_info("drifter").await.unwrap();
    assert_eq!(view.status, "live");
    assert!(registered_in_the_ledger(&cluster, "drifter"));

    // A real agent asked to register again does.
    let registered_ms = |cluster: &Cluster| -> i64 {
        let conn = rusqlite::Connection::open_with_flags(
            cluster.ledger_path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.query_row(
            "SELECT registered_ms FROM nodes WHERE id = 'node-0'",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    let before = registered_ms(&cluster);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let ack = bus
        .call_node("node-0", &wire::RegisterAgain { v: WIRE_VERSION })
        .await
        .unwrap();
    assert!(ack.accepted);
    let deadline = Instant::now() + Duration::from_secs(10);
    while registered_ms(&cluster) == before {
        assert!(
            Instant::now() < deadline,
            "the agent never registered again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(client.node_info("node-0").await.unwrap().status, "live");
    cluster.shutdown().await.unwrap();
}
