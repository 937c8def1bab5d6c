//! Results too large for one report travel out of band: output files past the inline budget and
//! the whole of a log longer than its tail go into the namespace's blob stream, the report names
//! them by digest, and only the job's account reads them back (checked against the digest).
//! A node cannot store under another node's name, and a blob a node names but never stored is
//! not recorded.

use crate::common::*;
use crate::fairness::{NODE, accept, heartbeat, next_assignment, with_hand_rolled_node};
use crate::identity::{connect_as, secure_cluster, violation};
use rhizos_broker::Caller;
use rhizos_broker::wire::{
    BlobRef, ExecutionOutcome, ExecutionRef, JobReport, JobState, ReportPhase,
};
use rhizos_testbed::cluster::wasm_spec;
use std::time::Duration;

const USD: i64 = 1_000_000;

#[tokio::test]
async fn large_outputs_travel_out_of_band_and_only_their_account_reads_them() {
    let cluster = secure_cluster(1).await;
    cluster.funded_account("alice", 2 * USD).await.unwrap();
    cluster.funded_account("mallory", USD).await.unwrap();
    let alice = cluster.client_as(&Caller::user("alice")).await.unwrap();
    let module = demo();
    for (id, args) in [
        ("fill", vec!["fill", "3"]),
        ("chatty", vec!["count", "100000"]),
    ] {
        alice
            .submit(&submit_request(
                "alice",
                id,
                wasm_spec(&module, &args, 60_000),
                USD,
            ))
            .await
            .unwrap();
    }

    // A 3 MiB output file: not in the report, named by digest, read back whole.
    let fill = cluster
        .wait_for_end("fill", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(fill.state, JobState::Succeeded, "{fill:?}");
    assert!(
        fill.output_files.is_empty(),
        "{:?}",
        fill.output_files.keys()
    );
    let blob = fill
        .blobs
        .files
        .get("fill.bin")
        .unwrap_or_else(|| panic!("fill.bin not stored out of band: {fill:?}"));
    assert_eq!(blob.size, 3 << 20);
    let node = fill.node_id.clone().unwrap();
    let mut bytes = Vec::new();
    alice
        .bus()
        .get_blob("alice", &node, "fill.bin", blob, &mut bytes)
        .await
        .unwrap();
    assert_eq!(bytes.len(), 3 << 20);
    assert!(bytes.iter().all(|b| *b == b'x'));

    // 100 000 lines: the tail is in the job, the whole stdout out of band.
    let chatty = cluster
        .wait_for_end("chatty", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(chatty.state, JobState::Succeeded, "{chatty:?}");
    let expected: String = (1..=100_000).map(|i| format!("line {i}\n")).collect();
    let tail = chatty.stdout.clone().unwrap();
    assert!(
        tail.len() <= 64 * 1024 && tail.ends_with("line 100000\n"),
        "{}",
        tail.len()
    );
    let whole = chatty.blobs.stdout.clone().expect("whole stdout stored");
    assert_eq!(whole.size, expected.len() as u64);
    let mut text = Vec::new();
    alice
        .bus()
        .get_blob("alice", &node, "stdout", &whole, &mut text)
        .await
        .unwrap();
    assert_eq!(String::from_utf8(text).unwrap(), expected);
    // The receipt vouches for the digests too.
    let receipt = cluster.client().receipt_get("chatty").await.unwrap();
    receipt.verify(None).unwrap();

    // Mallory may not read alice's blobs: the server drops the request.
    let (mallory, errors) = connect_as(&cluster, &Caller::user("mallory")).await;
    let mut stolen = Vec::new();
    assert!(
        mallory
            .get_blob("alice", &node, "fill.bin", blob, &mut stolen)
            .await
            .is_err()
    );
    assert!(stolen.is_empty());
    violation(&errors, "$JS.API.DIRECT.GET").await;

    // A node may store blobs only under its own name.
    let (node_bus, node_errors) = connect_as(&cluster, &Caller::node(&node)).await;
    assert!(
        node_bus
            .put_blob("alice", "node-elsewhere", b"planted")
            .await
            .is_err()
    );
    violation(&node_errors, ".n.node-elsewhere.").await;

    let report = cluster.client().ledger_verify().await.unwrap();
    assert!(report.ok, "{:?}", report.problems);
}

#[tokio::test]
async fn a_blob_a_node_names_but_never_stored_is_not_recorded() {
    let (cluster, bus, mut assignments) = with_hand_rolled_node().await;
    // Alive throughout (a loaded machine can outlast three heartbeat intervals below).
    let (held, held_rx) = tokio::sync::watch::channel(Vec::new());
    let heartbeats = heartbeat(&bus, held_rx);
    cluster.funded_account("uma", 2 * USD).await.unwrap();
    cluster
        .submit(&submit_request(
            "uma",
            "claims",
            wasm_spec(&demo(), &["count", "1"], 30_000),
            400_000,
        ))
        .await
        .unwrap();
    let message = next_assignment(&mut assignments).await;
    let running = accept(&bus, message).await;
    held.send_modify(|list| {
        list.push(ExecutionRef {
            job_id: running.job_id.clone(),
            attempt: running.attempt,
        })
    });
    // One file really stored, one only claimed, stdout claimed with a malformed digest.
    let stored = bus
        .put_blob("uma", NODE, &vec![7u8; 300_000])
        .await
        .unwrap();
    let mut outcome = ExecutionOutcome::exited(0, 50);
    outcome
        .blobs
        .files
        .insert("real.bin".into(), stored.clone());
    outcome.blobs.files.insert(
        "ghost.bin".into(),
        BlobRef {
            sha256: "ab".repeat(32),
            size: 1 << 20,
        },
    );
    outcome.blobs.stdout = Some(BlobRef {
        sha256: "not-a-digest".into(),
        size: 10,
    });
    let finished = JobReport {
        phase: ReportPhase::Finished { outcome },
        ..running
    };
    let ack: rhizos_broker::wire::Ack = bus.call(&finished).await.unwrap();
    assert!(ack.accepted);
    let job = cluster.job("claims").await.unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(
        job.blobs.files.keys().collect::<Vec<_>>(),
        ["real.bin"],
        "{job:?}"
    );
    assert_eq!(job.blobs.files["real.bin"], stored);
    assert!(job.blobs.stdout.is_none());
    let stderr = job.stderr.unwrap();
    assert!(
        stderr.contains("not in the blob stream") && stderr.contains("ghost.bin"),
        "{stderr}"
    );
    // What is recorded reads back and matches its digest.
    let mut bytes = Vec::new();
    bus.get_blob("uma", NODE, "real.bin", &stored, &mut bytes)
        .await
        .unwrap();
    assert_eq!(bytes, vec![7u8; 300_000]);
    heartbeats.abort();
}

/// The orchestrator's hand-over of a blob to the node that runs a flow's next step streams it
/// chunk by chunk (whatever its size, a few chunks in memory) with every check: a good blob
/// arrives whole under the other node; bytes a lying node stored under a digest they do not
/// have are refused, and nothing of them stays filed under the other node.
#[tokio::test]
async fn a_blob_handed_to_another_node_is_copied_whole_or_not_at_all() {
    use rhizos_broker::blobs::{BlobError, CHUNK_BYTES, sha256_hex};
    let cluster = cluster().await;
    let bus = cluster.bus.clone();
    let content: Vec<u8> = (0..2 * CHUNK_BYTES + 1_000)
        .map(|i| (i % 251) as u8)
        .collect();
    let stored = bus.put_blob("uma", "from-node", &content).await.unwrap();
    bus.copy_blob("uma", "from-node", "to-node", "big.bin", &stored)
        .await
        .unwrap();
    let mut copied = Vec::new();
    bus.get_blob("uma", "to-node", "big.bin", &stored, &mut copied)
        .await
        .unwrap();
    assert!(copied == content, "the copy is the blob, byte for byte");

    let forged = BlobRef {
        sha256: sha256_hex(b"something else"),
        size: content.len() as u64,
    };
    for (index, chunk) in content.chunks(CHUNK_BYTES).enumerate() {
        let subject = bus
            .subjects
            .blob_chunk("uma", "liar", &forged.sha256, index as u64)
            .unwrap();
        bus.jetstream
            .publish(subject, bytes::Bytes::copy_from_slice(chunk))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let refused = bus
        .copy_blob("uma", "liar", "to-node", "forged.bin", &forged)
        .await
        .unwrap_err();
    assert!(matches!(refused, BlobError::Corrupt { .. }), "{refused}");
    let mut nothing = Vec::new();
    let missing = bus
        .get_blob("uma", "to-node", "forged.bin", &forged, &mut nothing)
        .await
        .unwrap_err();
    assert!(
        matches!(missing, BlobError::Missing { index: 0, .. }),
        "the copied chunks were purged: {missing}"
    );
}
