//! Events reach the JetStream stream after commit, in order, each exactly once.

use crate::common::*;
use futures::StreamExt as _;
use rhizos_broker::wire::{EscrowKind, Event, EventBody, JobState};
use rhizos_testbed::cluster::wasm_spec;
use std::time::Duration;

#[tokio::test]
async fn a_job_leaves_its_whole_history_in_the_event_stream() {
    let cluster = cluster().await;
    cluster.funded_account("hana", 1_000_000).await.unwrap();
    let spec = wasm_spec(&demo(), &["count", "1"], 30_000);
    cluster
        .submit(&submit_request("hana", "evt-1", spec, 500_000))
        .await
        .unwrap();
    let job = cluster
        .wait_for_end("evt-1", Duration::from_secs(60))
        .await
        .unwrap();

    let stream = cluster.bus.ensure_event_stream().await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subjects: cluster.bus.subjects.job_events_of(None, "evt-1").unwrap(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut history = Vec::new();
    while history.len() < 6 {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .unwrap_or_else(|_| panic!("only {} events: {history:?}", history.len()))
            .unwrap()
            .unwrap();
        let event: Event = serde_json::from_slice(&message.payload).unwrap();
        history.push(match event.body {
            EventBody::Job { state, .. } => format!("job {}", state.as_str()),
            EventBody::Escrow {
                kind,
                amount_micros,
                ..
            } => format!("escrow {kind:?} {amount_micros}"),
            EventBody::Flow { state, .. } => format!("flow {state}"),
        });
        if let EventBody::Escrow {
            kind: EscrowKind::Settled,
            provider_micros,
            fee_micros,
            refund_micros,
            ..
        } = serde_json::from_slice::<Event>(&message.payload)
            .unwrap()
            .body
        {
            assert_eq!(
                (provider_micros, fee_micros, refund_micros),
                (job.provider_micros, job.fee_micros, job.refund_micros)
            );
        }
    }
    let cost = job.cost_micros.unwrap();
    assert_eq!(
        history,
        [
            "job pending".to_owned(),
            "escrow Held 500000".to_owned(),
            "job assigned".to_owned(),
            "job running".to_owned(),
            "job succeeded".to_owned(),
            format!("escrow Settled {cost}"),
        ]
    );
    // Nothing more (no duplicate publication).
    let extra = tokio::time::timeout(Duration::from_millis(500), messages.next()).await;
    assert!(extra.is_err(), "unexpected extra event");
    assert_eq!(job.state, JobState::Succeeded);
    cluster.shutdown().await.unwrap();
}

/// Heartbeats travel on core NATS only: the event stream keeps job and escrow history, which
/// a fleet's heartbeats would otherwise push out of its byte limit.
#[tokio::test]
async fn heartbeats_are_not_kept_in_the_event_stream() {
    let cluster = cluster().await;
    let mut beats = cluster
        .bus
        .client
        .subscribe(cluster.bus.subjects.node_heartbeat_wildcard())
        .await
        .unwrap();
    // Two heartbeats arrive (1 s apart), live.
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(5), beats.next())
            .await
            .expect("heartbeats flow")
            .unwrap();
    }
    let mut stream = cluster.bus.ensure_event_stream().await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(
        info.state.messages, 0,
        "nothing happened but heartbeats, and the stream kept none of them"
    );
    cluster.shutdown().await.unwrap();
}
