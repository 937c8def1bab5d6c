//! Signed receipts: a job that ran gets a receipt signed by the orchestrator, stating exactly what
//! the ledger recorded; it verifies offline with the real CLI, and a changed byte, a wrong key or
//! a forged signature each fail with the reason.

use crate::common::*;
use rhizos_broker::wire::{ErrorCode, JobState, ReceiptError, SignedReceipt};
use rhizos_testbed::cluster::wasm_spec;
use std::time::Duration;

const USD: i64 = 1_000_000;

#[tokio::test]
async fn a_settled_job_gets_a_receipt_that_verifies_offline_and_detects_any_change() {
    let cluster = cluster().await;
    cluster.funded_account("rita", 2 * USD).await.unwrap();
    let client = cluster.client();
    let request = submit_request(
        "rita",
        "receipt-1",
        wasm_spec(&demo(), &["count", "1"], 30_000),
        USD,
    );
    cluster.submit(&request).await.unwrap();
    let job = cluster
        .wait_for_end("receipt-1", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");

    let receipt = client.receipt_get("receipt-1").await.unwrap();
    let key = cluster.orchestrator.public_key();
    assert_eq!(receipt.orchestrator_key, key);
    let body = receipt.verify(Some(&key)).unwrap();
    // What the receipt states is what the job and the ledger say.
    assert_eq!(body.job_id, "receipt-1");
    assert_eq!((body.state, body.attempt), (JobState::Succeeded, 1));
    assert_eq!(body.account, "rita");
    assert_eq!(body.node_id, job.node_id);
    assert_eq!(
        (
            body.max_cost_micros,
            body.cost_micros,
            body.fee_micros,
            body.provider_micros,
            body.refund_micros
        ),
        (
            USD,
            job.cost_micros.unwrap(),
            job.fee_micros.unwrap(),
            job.provider_micros.unwrap(),
            job.refund_micros.unwrap()
        )
    );
    assert!(body.cost_micros > 0);
    assert_eq!(body.provider_account.as_deref(), Some("provider-0"));
    assert_eq!(body.fee_bps, 500);
    assert_eq!(body.reported_elapsed_ms, job.elapsed_ms);
    assert!(
        body.started_ms
            .is_some_and(|s| s >= body.submitted_ms && s <= body.ended_ms)
    );
    assert_eq!(body.spec_sha256.len(), 64);
    // The same job always gets the same receipt, byte for byte.
    assert_eq!(client.receipt_get("receipt-1").await.unwrap(), receipt);

    // Tampering: any changed byte of the body, another key, a signature by someone else.
    let mut changed = receipt.clone();
    changed.body = changed
        .body
        .replace("\"account\":\"rita\"", "\"account\":\"ritb\"");
    assert_ne!(changed.body, receipt.body);
    assert_eq!(
        changed.verify(Some(&key)).unwrap_err(),
        ReceiptError::Mismatch
    );
    let other = nkeys::KeyPair::new_server();
    assert!(matches!(
        receipt.verify(Some(&other.public_key())).unwrap_err(),
        ReceiptError::WrongKey { .. }
    ));
    let forged = SignedReceipt::sign(&body, &other).unwrap();
    let mut claimed = forged.clone();
    claimed.orchestrator_key = key.clone();
    assert_eq!(
        claimed.verify(Some(&key)).unwrap_err(),
        ReceiptError::Mismatch
    );

    // The real CLI, offline (no NATS settings at all): the receipt file verifies; a changed one
    // does not, with exit 4 and the reason.
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.json");
    let bad = dir.path().join("bad.json");
    std::fs::write(&good, serde_json::to_string(&receipt).unwrap()).unwrap();
    std::fs::write(&bad, serde_json::to_string(&changed).unwrap()).unwrap();
    let rhizos = rhizos_testbed::build_dir().join("rhizos");
    let verify = |file: &std::path::Path, key: &str| {
        std::process::Command::new(&rhizos)
            .args(["receipt", "verify"])
            .arg(file)
            .args(["--orchestrator-key", key])
            .env("RHIZOS_NATS_URL", "nats://127.0.0.1:1")
            .output()
            .expect("rhizos is built (cargo build --workspace)")
    };
    let ok = verify(&good, &key);
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("receipt of job receipt-1 verifies"));
    let refused = verify(&bad, &key);
    assert_eq!(refused.status.code(), Some(4), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("changed after signing"),
        "{refused:?}"
    );
    let wrong_key = verify(&good, &other.public_key());
    assert_eq!(wrong_key.status.code(), Some(4));
    assert!(
        String::from_utf8_lossy(&wrong_key.stderr).contains("not by the expected orchestrator key")
    );
}

#[tokio::test]
async fn a_job_that_has_not_ended_has_no_receipt_yet_and_an_unknown_one_none() {
    let cluster = cluster().await;
    cluster.funded_account("rob", 2 * USD).await.unwrap();
    let client = cluster.client();
    // Wait-for-ever job (sleeps) so it is still running when asked.
    let request = submit_request(
        "rob",
        "receipt-open",
        wasm_spec(&demo(), &["sleep", "5000"], 30_000),
        USD,
    );
    cluster.submit(&request).await.unwrap();
    let error = client.receipt_get("receipt-open").await.unwrap_err();
    assert_eq!(
        error.remote().unwrap().code,
        ErrorCode::InvalidState,
        "{error}"
    );
    let error = client.receipt_get("no-such-job").await.unwrap_err();
    assert_eq!(error.remote().unwrap().code, ErrorCode::NotFound);
    // Once it ends (cancelled while running: charged for the time used) it has one.
    client.job_cancel("receipt-open").await.unwrap();
    let job = cluster
        .wait_for_end("receipt-open", Duration::from_secs(60))
        .await
        .unwrap();
    let receipt = client.receipt_get("receipt-open").await.unwrap();
    let body = receipt
        .verify(Some(&cluster.orchestrator.public_key()))
        .unwrap();
    assert_eq!(body.state, job.state);
    assert_eq!(body.cost_micros + body.refund_micros, USD);
}

#[tokio::test]
async fn a_registration_while_a_job_runs_cannot_redirect_its_earnings() {
    use rhizos_broker::wire::{ExecutionRef, RegisterNode, WIRE_VERSION};
    let cluster = cluster().await;
    cluster.funded_account("rose", 2 * USD).await.unwrap();
    let request = submit_request(
        "rose",
        "earned",
        wasm_spec(&demo(), &["sleep", "1500"], 30_000),
        USD,
    );
    cluster.submit(&request).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let running = loop {
        let job = cluster.job("earned").await.unwrap();
        if job.state == JobState::Running {
            break job;
        }
        assert!(std::time::Instant::now() < deadline, "never ran: {job:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let node_id = running.node_id.clone().unwrap();
    // Someone re-registers the node with their own provider account while the job runs (listing
    // the execution, so nothing is requeued).
    let forged = RegisterNode {
        v: WIRE_VERSION,
        node_id: node_id.clone(),
        provider_account: "mallory".into(),
        backends: vec!["wasm".into()],
        pricing: rhizos_testbed::ClusterOptions::default().pricing,
        cpu_cores: 2,
        memory_mib: 1024,
        max_concurrent: 4,
        heartbeat_interval_ms: 1_000,
        plugins: vec![],
        running: vec![ExecutionRef {
            job_id: "earned".into(),
            attempt: running.attempt,
        }],
        gpus: vec![],
        disk_mib: 0,
        hardware: None,
        artifact_sources: vec![],
        models: vec![],
    };
    assert!(
        cluster
            .client()
            .node_register(&forged)
            .await
            .unwrap()
            .accepted
    );
    let job = cluster
        .wait_for_end("earned", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    let provider = job.provider_micros.unwrap();
    assert!(provider > 0);
    let balances = balances(&cluster);
    assert_eq!(balances.get("provider-0").copied(), Some(provider));
    assert_eq!(balances.get("mallory").copied().unwrap_or(0), 0);
    let receipt = cluster.client().receipt_get("earned").await.unwrap();
    let body = receipt
        .verify(Some(&cluster.orchestrator.public_key()))
        .unwrap();
    assert_eq!(body.provider_account.as_deref(), Some("provider-0"));
    assert_ledger_consistent(&cluster).await;
}

/// Past `[orchestrator] job_payload_max_age_s` an ended job's payloads — spec, outputs, the
/// node's report — are dropped by the active orchestrator; its money and state stay, and its
/// receipt still vouches for the same spec and result by their digests (it no longer carries
/// the node's report). A retry of the submit still finds the job; the CLI says why there is no
/// output any more; the ledger still verifies.
#[tokio::test]
async fn an_ended_jobs_payloads_are_dropped_after_the_retention_and_its_receipt_keeps_their_digests()
 {
    // Secure: nodes sign their reports (what the receipt carries until the prune).
    let cluster = rhizos_testbed::Cluster::start(rhizos_testbed::ClusterOptions {
        job_payload_max_age_s: Some(1),
        secure: true,
        ..Default::default()
    })
    .await
    .unwrap();
    cluster.funded_account("pia", 2 * USD).await.unwrap();
    let client = cluster.client();
    let pia = cluster
        .client_as(&rhizos_broker::Caller::user("pia"))
        .await
        .unwrap();
    let mut spec = wasm_spec(&demo(), &["upper", "in.txt", "out.txt"], 30_000);
    spec.input_files.insert(
        "in.txt".into(),
        rhizos_broker::wire::b64_encode(b"kept for a while\n"),
    );
    let request = submit_request("pia", "retained-1", spec.clone(), USD);
    pia.submit(&request).await.unwrap();
    let ended = cluster
        .wait_for_end("retained-1", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(ended.state, JobState::Succeeded, "{ended:?}");
    assert!(ended.output_files.contains_key("out.txt"), "{ended:?}");
    let key = cluster.orchestrator.public_key();
    let before = client.receipt_get("retained-1").await.unwrap();
    let before = before.verify(Some(&key)).unwrap();
    assert!(before.node_report.is_some(), "the node signed its report");

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let pruned = loop {
        let job = cluster.job("retained-1").await.unwrap();
        if job.pruned_ms.is_some() {
            break job;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the job's payloads were never dropped: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(pruned.pruned_ms.unwrap() >= ended.updated_ms + 1_000);
    assert!(
        pruned.output_files.is_empty()
            && pruned.stdout.is_none()
            && pruned.stderr.is_none()
            && pruned.blobs.is_empty(),
        "{pruned:?}"
    );
    // The money, state and times are the job's as it ended.
    let money = |j: &rhizos_broker::wire::JobView| {
        (
            j.state,
            j.exit_code,
            j.cost_micros,
            j.provider_micros,
            j.fee_micros,
            j.refund_micros,
            j.elapsed_ms,
            j.created_ms,
            j.updated_ms,
        )
    };
    assert_eq!(money(&pruned), money(&ended));
    let after = client.receipt_get("retained-1").await.unwrap();
    let after = after.verify(Some(&key)).unwrap();
    assert_eq!(
        (&after.spec_sha256, &after.result_sha256),
        (&before.spec_sha256, &before.result_sha256),
        "the receipt vouches for the same spec and result"
    );
    assert_eq!(
        (
            after.cost_micros,
            after.fee_micros,
            after.provider_micros,
            after.refund_micros,
            after.ledger_tx_id,
            &after.provider_account
        ),
        (
            before.cost_micros,
            before.fee_micros,
            before.provider_micros,
            before.refund_micros,
            before.ledger_tx_id,
            &before.provider_account
        )
    );
    assert!(after.node_report.is_none() && after.node_signature_b64.is_none());

    // A retry of the submit still finds the job; its id with another spec is refused.
    let again = pia.submit(&request).await.unwrap();
    assert_eq!(
        (again.job_id.as_str(), again.state),
        ("retained-1", JobState::Succeeded)
    );
    let mut other = spec.clone();
    other.args.push("extra".into());
    let refused = pia
        .submit(&submit_request("pia", "retained-1", other, USD))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("taken"), "{refused}");

    // The CLI says why there is no output, and what is left.
    let rhizos = RhizosCli {
        url: cluster.settings.nats.url.clone(),
        namespace: cluster.settings.nats.namespace.clone(),
        home: cluster.data_dir.path().join("cli-home"),
    };
    let operator = rhizos_testbed::cluster::credentials_path(
        cluster.auth.as_ref().unwrap(),
        &rhizos_broker::Caller::operator("operator"),
    );
    let (ok, text) = tokio::task::spawn_blocking(move || {
        run(rhizos
            .command(&["job", "output", "retained-1", "out.txt", "--credentials"])
            .arg(operator))
    })
    .await
    .unwrap();
    assert!(!ok, "{text}");
    assert!(
        text.contains("was dropped") && text.contains("job_payload_max_age_s"),
        "{text}"
    );
    assert_ledger_consistent(&cluster).await;
}
