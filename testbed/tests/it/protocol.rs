//! Bad input on the bus gets clear error replies, and results are settled exactly once.

use crate::common::*;
use bytes::Bytes;
use rhizos_broker::wire::{
    Ack, ErrorCode, ExecutionOutcome, ExitKind, JobReport, JobState, ReportPhase, SubmitJobReply,
    WIRE_VERSION,
};
use rhizos_testbed::cluster::wasm_spec;
use std::time::Duration;

#[tokio::test]
async fn malformed_oversized_and_wrong_version_requests_get_errors_and_serving_continues() {
    let cluster = cluster().await;
    cluster.funded_account("erin", 1_000_000).await.unwrap();
    let bus = &cluster.bus;
    let submit = bus
        .subjects
        .op(
            rhizos_broker::CtlOp::JobSubmit,
            &rhizos_broker::Caller::user("erin"),
        )
        .unwrap();
    let valid = serde_json::to_value(submit_request(
        "erin",
        "ok-1",
        wasm_spec(&demo(), &["count", "2"], 30_000),
        500_000,
    ))
    .unwrap();

    let mut wrong_version = valid.clone();
    wrong_version["v"] = 2.into();
    let mut missing_field = valid.clone();
    missing_field.as_object_mut().unwrap().remove("spec");
    let mut bad_account = valid.clone();
    bad_account["account"] = "Erin.*".into();
    let mut negative_cost = valid.clone();
    negative_cost["max_cost_micros"] = (-5).into();
    let mut bad_base64 = valid.clone();
    bad_base64["spec"]["workload"]["module_b64"] = "%%%".into();
    let cases: Vec<(&str, Bytes, ErrorCode, &str)> = vec![
        (
            "not json",
            Bytes::from_static(b"{{{ nope"),
            ErrorCode::BadRequest,
            "not a JSON object",
        ),
        (
            "empty",
            Bytes::new(),
            ErrorCode::BadRequest,
            "not a JSON object",
        ),
        (
            "oversized",
            Bytes::from(vec![b' '; 1_000_000]),
            ErrorCode::TooLarge,
            "the limit is 921600 bytes",
        ),
        (
            "wrong version",
            serde_json::to_vec(&wrong_version).unwrap().into(),
            ErrorCode::UnsupportedVersion,
            "version 2",
        ),
        (
            "missing spec",
            serde_json::to_vec(&missing_field).unwrap().into(),
            ErrorCode::BadRequest,
            "spec",
        ),
        (
            "bad account",
            serde_json::to_vec(&bad_account).unwrap().into(),
            ErrorCode::BadRequest,
            "invalid account",
        ),
        (
            "negative cost",
            serde_json::to_vec(&negative_cost).unwrap().into(),
            ErrorCode::BadRequest,
            "max_cost_micros",
        ),
        (
            "bad base64",
            serde_json::to_vec(&bad_base64).unwrap().into(),
            ErrorCode::BadRequest,
            "base64",
        ),
    ];
    for (name, payload, code, text) in cases {
        let error = bus
            .request_raw::<SubmitJobReply>(submit.clone(), payload)
            .await
            .unwrap_err();
        let remote = error
            .remote()
            .unwrap_or_else(|| panic!("{name}: expected an error reply, got {error}"));
        assert_eq!(remote.code, code, "{name}: {}", remote.message);
        assert!(
            remote.message.contains(text),
            "{name}: {:?} should mention {text:?}",
            remote.message
        );
    }
    let unknown = format!("{}frobnicate", submit.trim_end_matches("submit"));
    let error = bus
        .request_raw::<SubmitJobReply>(unknown, Bytes::from_static(b"{}"))
        .await
        .unwrap_err();
    assert_eq!(error.remote().unwrap().code, ErrorCode::UnsupportedSubject);

    // Nothing was held by the refused requests, and the next valid one is served.
    assert_eq!(
        cluster.balance("erin").await.unwrap().balance_micros,
        1_000_000
    );
    let reply: SubmitJobReply = bus
        .request_raw(submit, serde_json::to_vec(&valid).unwrap().into())
        .await
        .unwrap();
    let job = cluster
        .wait_for_end(&reply.job_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.stdout.as_deref(), Some("line 1\nline 2\n"));
    assert_ledger_consistent(&cluster).await;
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_same_result_reported_twice_is_settled_once() {
    let cluster = cluster().await;
    cluster.funded_account("finn", 1_000_000).await.unwrap();
    cluster
        .submit(&submit_request(
            "finn",
            "twice",
            wasm_spec(&demo(), &["count", "1"], 30_000),
            500_000,
        ))
        .await
        .unwrap();
    let job = cluster
        .wait_for_end("twice", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    let before = balances(&cluster);

    // A replayed report (a retry after a lost ack), even one claiming a longer run, pays nothing.
    let replay = JobReport {
        v: WIRE_VERSION,
        node_id: "node-0".into(),
        job_id: "twice".into(),
        attempt: 1,
        phase: ReportPhase::Finished {
            outcome: ExecutionOutcome {
                fuel_consumed: None,
                output_files: Default::default(),
                kind: ExitKind::Exited,
                exit_code: Some(0),
                message: None,
                elapsed_ms: 40_000,
                stdout: String::new(),
                stderr: String::new(),
                blobs: Default::default(),
                usage: None,
            },
        },
        signature: None,
    };
    let subject = cluster.bus.subject_for(&replay).unwrap();
    let ack: Ack = cluster.bus.request(subject.clone(), &replay).await.unwrap();
    assert_eq!(
        ack,
        Ack {
            accepted: true,
            note: Some("already recorded".into())
        }
    );
    // A report for an attempt the job never had is refused, and pays nothing either.
    let stale = JobReport {
        attempt: 7,
        ..replay.clone()
    };
    let ack: Ack = cluster.bus.request(subject.clone(), &stale).await.unwrap();
    assert!(!ack.accepted);
    assert!(ack.note.unwrap().contains("not current"));
    let wrong_node = JobReport {
        node_id: "node-9".into(),
        ..replay
    };
    // In node-0's name: refused before the store is asked (a node reports only as itself).
    let error = cluster
        .bus
        .request::<_, Ack>(subject, &wrong_node)
        .await
        .unwrap_err();
    assert_eq!(
        error.remote().unwrap().code,
        ErrorCode::Forbidden,
        "{error}"
    );
    // In its own name: not the job's node, so not accepted.
    let ack: Ack = cluster.client().job_report(&wrong_node).await.unwrap();
    assert!(!ack.accepted);

    assert_eq!(balances(&cluster), before);
    assert_eq!(ledger_kinds(&cluster, "twice"), ["hold", "settle"]);
    assert_eq!(cluster.job("twice").await.unwrap(), job);
    assert_ledger_consistent(&cluster).await;
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn lists_come_in_pages_and_a_forged_cursor_is_refused() {
    let cluster = rhizos_testbed::Cluster::start(rhizos_testbed::ClusterOptions {
        agents: 0,
        ..rhizos_testbed::ClusterOptions::default()
    })
    .await
    .unwrap();
    let client = cluster.client();
    for i in 0..5 {
        cluster
            .bus
            .call(&hand_rolled_registration(&format!("node-{i}"), "prov"))
            .await
            .unwrap();
    }
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = client.node_page(after.take(), Some(2)).await.unwrap();
        pages.push(
            page.nodes
                .iter()
                .map(|n| n.node_id.clone())
                .collect::<Vec<_>>(),
        );
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(
        pages,
        [
            vec!["node-0", "node-1"],
            vec!["node-2", "node-3"],
            vec!["node-4"]
        ]
    );
    assert_eq!(client.node_list().await.unwrap().nodes.len(), 5);
    assert_eq!(client.node_info("node-3").await.unwrap().node_id, "node-3");
    let unknown = client.node_info("node-30").await.unwrap_err();
    assert_eq!(
        unknown.remote().map(|e| e.code),
        Some(ErrorCode::NotFound),
        "{unknown}"
    );

    cluster.funded_account("pat", 10_000_000).await.unwrap();
    for i in 0..3 {
        let request = submit_request(
            "pat",
            &format!("page-{i}"),
            wasm_spec(&demo(), &[], 30_000),
            400_000,
        );
        cluster.submit(&request).await.unwrap();
    }
    let first = client.job_list(Some("pat"), None, Some(2)).await.unwrap();
    let next = first.next.clone().expect("a second page");
    let second = client
        .job_list_after(Some("pat"), None, Some(2), Some(&next))
        .await
        .unwrap();
    let mut seen: Vec<String> = first
        .jobs
        .iter()
        .chain(&second.jobs)
        .map(|j| j.job_id.clone())
        .collect();
    seen.sort();
    assert_eq!(seen, ["page-0", "page-1", "page-2"]);
    assert_eq!(second.next, None);
    for forged in ["1.2.3", "x", "99999999999999999999.a"] {
        let refused = client
            .job_list_after(Some("pat"), None, Some(2), Some(forged))
            .await
            .unwrap_err();
        assert_eq!(
            refused.remote().map(|e| e.code),
            Some(ErrorCode::BadRequest),
            "{forged}: {refused}"
        );
    }
    let refused = client
        .node_page(Some("No*de".into()), None)
        .await
        .unwrap_err();
    assert_eq!(
        refused.remote().map(|e| e.code),
        Some(ErrorCode::BadRequest),
        "{refused}"
    );
}

/// Past `max_requests_in_flight` a request is answered `too_busy` at once (retryable), every
/// other request is served, and serving goes on: a flood queues nothing without limit.
#[tokio::test]
async fn a_flood_past_the_request_limit_is_answered_too_busy_and_serving_goes_on() {
    let cluster = rhizos_testbed::Cluster::start(rhizos_testbed::ClusterOptions {
        agents: 0,
        max_requests_in_flight: Some(1),
        ..rhizos_testbed::ClusterOptions::default()
    })
    .await
    .unwrap();
    cluster.funded_account("flo", 1_000).await.unwrap();
    let client = cluster.client();
    let answers = futures::future::join_all((0..300).map(|_| client.account_balance("flo"))).await;
    let (mut served, mut busy) = (0, 0);
    for answer in answers {
        match answer {
            Ok(view) => {
                assert_eq!(view.balance_micros, 1_000);
                served += 1;
            }
            Err(e) if e.remote().map(|e| e.code) == Some(ErrorCode::TooBusy) => {
                assert!(ErrorCode::TooBusy.is_retryable());
                busy += 1;
            }
            Err(e) => panic!("neither served nor too_busy: {e}"),
        }
    }
    assert!(served >= 1 && busy >= 1, "served {served}, too_busy {busy}");
    // Nothing was lost: the next request is served.
    assert_eq!(
        client.account_balance("flo").await.unwrap().balance_micros,
        1_000
    );
}

/// An orchestrator that cannot write the ledger (it is handing over) answers `unavailable`.
/// A client sends a request again until served when that cannot do twice what it does once —
/// a submit with its job id — and returns a submit without one at once (sent again, it could
/// make two jobs).
#[tokio::test]
async fn unavailable_is_sent_again_only_when_that_cannot_do_it_twice() {
    use futures::StreamExt as _;
    use rhizos_broker::wire::{Reply, WireError, encode};
    let nats = rhizos_broker::server::NatsServer::start(Default::default()).unwrap();
    let mut settings = rhizos_broker::Settings::default();
    settings.nats.url = nats.url();
    let bus = rhizos_broker::Bus::connect(&settings.nats).await.unwrap();
    let with_id = submit_request("ada", "once-1", wasm_spec(&demo(), &[], 1_000), 1_000);
    let mut without_id = with_id.clone();
    without_id.job_id = None;
    // A stand-in orchestrator: `unavailable` to the first two of each run of requests.
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut requests = bus
        .client
        .subscribe(bus.subject_for(&with_id).unwrap())
        .await
        .unwrap();
    let (client, counter) = (bus.client.clone(), asked.clone());
    tokio::spawn(async move {
        while let Some(message) = requests.next().await {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let reply = if n < 2 {
                encode(&Reply::<SubmitJobReply>::err(WireError::new(
                    ErrorCode::Unavailable,
                    "ledger not replicated: handing over; retry",
                )))
            } else {
                encode(&Reply::ok(SubmitJobReply {
                    job_id: "once-1".into(),
                    state: JobState::Pending,
                    node_id: None,
                    attempt: None,
                }))
            };
            client.publish(message.reply.unwrap(), reply).await.unwrap();
        }
    });
    let served = bus.call(&with_id).await.unwrap();
    assert_eq!(served.job_id, "once-1");
    assert_eq!(
        asked.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "sent until served"
    );

    asked.store(0, std::sync::atomic::Ordering::SeqCst);
    let refused = bus.call(&without_id).await.unwrap_err();
    assert_eq!(
        refused.remote().map(|e| e.code),
        Some(ErrorCode::Unavailable),
        "{refused}"
    );
    assert!(ErrorCode::Unavailable.is_retryable());
    assert_eq!(
        asked.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a submit without its id is not sent twice"
    );
}
