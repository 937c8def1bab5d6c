//! API keys of the AI gateway, as the orchestrator keeps them: made there and shown once, only
//! their SHA-256 stored, each account's own (another account's key is not even disclosed).

use crate::common::*;
use crate::identity::secure_cluster;
use rhizos_broker::wire::{CreateKey, ErrorCode, JobState, key_id_of};
use rhizos_broker::{Caller, RequestError};
use rhizos_testbed::cluster::wasm_spec;
use std::time::Duration;

const USD: i64 = 1_000_000;

fn code(result: Result<impl std::fmt::Debug, RequestError>) -> Option<ErrorCode> {
    match result {
        Ok(reply) => panic!("expected an error, got {reply:?}"),
        Err(e) => e.remote().map(|e| e.code),
    }
}

#[tokio::test]
async fn api_keys_are_shown_once_stored_as_digests_and_only_their_account_manages_them() {
    let cluster = secure_cluster(0).await;
    cluster.funded_account("alice", USD).await.unwrap();
    cluster.funded_account("bob", USD).await.unwrap();
    let alice = cluster.client_as(&Caller::user("alice")).await.unwrap();
    let bob = cluster.client_as(&Caller::user("bob")).await.unwrap();

    let created = alice
        .key_create(CreateKey {
            account: "alice".into(),
            name: Some("laptop".into()),
            credit_limit_micros: Some(10_000),
            models: vec!["smollm2-135m".into()],
            routes: vec!["chat".into(), "models".into()],
            rpm: Some(60),
            ..CreateKey::default()
        })
        .await
        .unwrap();
    assert_eq!(key_id_of(&created.key), Some(created.view.key_id.as_str()));
    assert_eq!(
        (created.view.account.as_str(), created.view.spent_micros),
        ("alice", 0)
    );
    assert_eq!(created.view.credit_limit_micros, Some(10_000));
    let second = alice
        .key_create(CreateKey {
            account: "alice".into(),
            ..CreateKey::default()
        })
        .await
        .unwrap();
    assert_ne!(second.key, created.key);

    // Only the digest is stored: the key appears nowhere in the ledger's files.
    let conn = rusqlite::Connection::open(cluster.ledger_path()).unwrap();
    let stored: String = conn
        .query_row(
            "SELECT key_sha256 FROM api_keys WHERE key_id = ?1",
            [&created.view.key_id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        stored,
        rhizos_broker::blobs::sha256_hex(created.key.as_bytes())
    );
    let secret = created.key.rsplit('_').next().unwrap();
    for suffix in ["", "-wal"] {
        let path = format!("{}{suffix}", cluster.ledger_path().display());
        if let Ok(bytes) = std::fs::read(&path) {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "the key's secret is in {path}"
            );
        }
    }

    // Lists never carry the key; newest first.
    let listed = alice.key_list("alice").await.unwrap().keys;
    assert_eq!(
        listed
            .iter()
            .map(|k| k.key_id.as_str())
            .collect::<Vec<_>>()
            .len(),
        2
    );
    assert!(!serde_json::to_string(&listed).unwrap().contains(secret));
    let operator_view = cluster.client().key_list("alice").await.unwrap().keys;
    assert_eq!(operator_view, listed);

    // Bob can neither make, list nor revoke alice's keys (her key is "not found" to him).
    let for_alice = CreateKey {
        account: "alice".into(),
        ..CreateKey::default()
    };
    assert_eq!(
        code(bob.key_create(for_alice).await),
        Some(ErrorCode::Forbidden)
    );
    assert_eq!(
        code(bob.key_list("alice").await),
        Some(ErrorCode::Forbidden)
    );
    assert_eq!(
        code(bob.key_revoke(&created.view.key_id).await),
        Some(ErrorCode::NotFound)
    );
    // Limits are checked field by field; an unknown account is named.
    let bad = CreateKey {
        account: "alice".into(),
        routes: vec!["admin".into()],
        ..CreateKey::default()
    };
    assert_eq!(
        code(alice.key_create(bad).await),
        Some(ErrorCode::BadRequest)
    );
    let nobody = CreateKey {
        account: "nobody".into(),
        ..CreateKey::default()
    };
    assert_eq!(
        code(cluster.client().key_create(nobody).await),
        Some(ErrorCode::NotFound)
    );

    // Revoked at once, and once.
    let revoked = alice.key_revoke(&created.view.key_id).await.unwrap();
    let when = revoked.revoked_ms.expect("revoked");
    let again = alice.key_revoke(&created.view.key_id).await.unwrap();
    assert_eq!(again.revoked_ms, Some(when));
    let listed = alice.key_list("alice").await.unwrap().keys;
    let first = listed
        .iter()
        .find(|k| k.key_id == created.view.key_id)
        .unwrap();
    assert_eq!(first.revoked_ms, Some(when));
    assert!(
        listed
            .iter()
            .any(|k| k.key_id == second.view.key_id && k.revoked_ms.is_none())
    );
}

#[tokio::test]
async fn a_gateway_authenticates_keys_by_digest_and_nobody_else_may() {
    let cluster = secure_cluster(0).await;
    cluster.funded_account("alice", USD).await.unwrap();
    let alice = cluster.client_as(&Caller::user("alice")).await.unwrap();
    let gateway = cluster.client_as(&Caller::gateway("gw")).await.unwrap();
    let key = alice
        .key_create(CreateKey {
            account: "alice".into(),
            models: vec!["smollm2-135m".into()],
            ..CreateKey::default()
        })
        .await
        .unwrap();

    // A working key: its view (limits for the gateway to apply), and its use recorded.
    let view = gateway.key_authenticate(&key.key).await.unwrap();
    assert_eq!(view.key_id, key.view.key_id);
    assert_eq!(view.models, ["smollm2-135m"]);
    let used = alice.key_list("alice").await.unwrap().keys[0].last_used_ms;
    assert!(used.is_some(), "last use not recorded");
    // A second use within the minute writes nothing new.
    gateway.key_authenticate(&key.key).await.unwrap();
    assert_eq!(
        alice.key_list("alice").await.unwrap().keys[0].last_used_ms,
        used
    );

    // A wrong key, a revoked one and an expired one are refused, saying which.
    // (The last hex digit changed to another, never to itself.)
    let last = if key.key.ends_with('0') { '1' } else { '0' };
    let wrong = format!("{}{last}", &key.key[..key.key.len() - 1]);
    assert_ne!(wrong, key.key);
    assert_eq!(
        code(gateway.key_authenticate(&wrong).await),
        Some(ErrorCode::NotFound)
    );
    let expiring = alice
        .key_create(CreateKey {
            account: "alice".into(),
            expires_ms: Some(rhizos_core::now_ms() + 300),
            ..CreateKey::default()
        })
        .await
        .unwrap();
    gateway.key_authenticate(&expiring.key).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let expired = gateway.key_authenticate(&expiring.key).await.unwrap_err();
    assert!(expired.to_string().contains("expired"), "{expired}");
    alice.key_revoke(&key.view.key_id).await.unwrap();
    let revoked = gateway.key_authenticate(&key.key).await.unwrap_err();
    assert_eq!(revoked.remote().map(|e| e.code), Some(ErrorCode::Forbidden));
    assert!(revoked.to_string().contains("revoked"), "{revoked}");

    // Only a gateway (or the operator) may ask: a user is refused, and a gateway may do
    // nothing else (no money, no accounts' jobs).
    assert!(alice.key_authenticate(&key.key).await.is_err());
    assert!(gateway.account_balance("alice").await.is_err());
    assert!(gateway.job_list(None, None, None).await.is_err());
}

#[tokio::test]
async fn a_keys_credit_limit_holds_under_fifty_concurrent_requests() {
    let cluster = secure_cluster(1).await;
    cluster.funded_account("alice", 10 * USD).await.unwrap();
    cluster.funded_account("bob", USD).await.unwrap();
    let alice = cluster.client_as(&Caller::user("alice")).await.unwrap();
    let gateway = cluster.client_as(&Caller::gateway("gw")).await.unwrap();
    // Room for exactly 7 holds of $0.10.
    let key = alice
        .key_create(CreateKey {
            account: "alice".into(),
            credit_limit_micros: Some(700_000),
            ..CreateKey::default()
        })
        .await
        .unwrap();
    let digest = rhizos_broker::blobs::sha256_hex(key.key.as_bytes());
    let module = demo();
    let request = |id: String, account: &str, digest: Option<&String>| {
        let mut request = submit_request(
            account,
            &id,
            wasm_spec(&module, &["count", "1"], 5_000),
            100_000,
        );
        request.api_key_sha256 = digest.cloned();
        request
    };

    // Without its client's key, or for another account than the key's, a gateway is refused.
    assert_eq!(
        code(
            gateway
                .submit(&request("no-key".into(), "alice", None))
                .await
        ),
        Some(ErrorCode::Forbidden)
    );
    assert_eq!(
        code(
            gateway
                .submit(&request("for-bob".into(), "bob", Some(&digest)))
                .await
        ),
        Some(ErrorCode::Forbidden)
    );

    // A gateway submits inference jobs only (it witnesses what it delivers); the key's own
    // user may charge anything to the key.
    let refused = gateway
        .submit(&request("wasm".into(), "alice", Some(&digest)))
        .await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("inference jobs only")),
        "{refused:?}"
    );

    // Fifty at once: exactly seven fit the key's limit; the rest are refused, naming the key.
    let submits = (0..50).map(|i| {
        let (gateway, request) = (
            alice.clone(),
            request(format!("burst-{i}"), "alice", Some(&digest)),
        );
        async move {
            (
                request.job_id.clone().unwrap(),
                gateway.submit(&request).await,
            )
        }
    });
    let results = futures::future::join_all(submits).await;
    let accepted: Vec<String> = results
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(accepted.len(), 7, "{results:?}");
    for (_, result) in results.iter().filter(|(_, r)| r.is_err()) {
        let error = result.as_ref().unwrap_err();
        assert_eq!(
            error.remote().map(|e| e.code),
            Some(ErrorCode::InsufficientFunds),
            "{error}"
        );
        assert!(error.to_string().contains(&key.view.key_id), "{error}");
    }

    // They run and settle; the key has spent exactly what they cost.
    let mut cost = 0;
    for id in &accepted {
        let job = cluster
            .wait_for_end(id, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
        cost += job.cost_micros.unwrap();
    }
    let spent = alice.key_list("alice").await.unwrap().keys[0].spent_micros;
    assert_eq!(spent, cost);
    // What is left is exactly what may still be held: a unit more is refused.
    let left = 700_000 - spent;
    let mut over = request("over".into(), "alice", Some(&digest));
    over.max_cost_micros = left + 1;
    assert_eq!(
        code(alice.submit(&over).await),
        Some(ErrorCode::InsufficientFunds)
    );
    let mut fits = request("fits".into(), "alice", Some(&digest));
    fits.max_cost_micros = left;
    alice.submit(&fits).await.unwrap();
    cluster
        .wait_for_end("fits", Duration::from_secs(60))
        .await
        .unwrap();
    // A revoked key charges nothing more.
    alice.key_revoke(&key.view.key_id).await.unwrap();
    assert_eq!(
        code(
            alice
                .submit(&request("after".into(), "alice", Some(&digest)))
                .await
        ),
        Some(ErrorCode::Forbidden)
    );
    // So does an expired one: expiry is checked in the hold's transaction too.
    let expiring = alice
        .key_create(CreateKey {
            account: "alice".into(),
            expires_ms: Some(rhizos_core::now_ms() + 300),
            ..CreateKey::default()
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let expired = alice
        .submit(&request(
            "expired".into(),
            "alice",
            Some(&rhizos_broker::blobs::sha256_hex(expiring.key.as_bytes())),
        ))
        .await
        .unwrap_err();
    assert_eq!(expired.remote().map(|e| e.code), Some(ErrorCode::Forbidden));
    assert!(expired.to_string().contains("expired"), "{expired}");
    let report = cluster.client().ledger_verify().await.unwrap();
    assert!(report.ok, "{:?}", report.problems);
    // A spend written behind the store's back is found.
    rusqlite::Connection::open(cluster.ledger_path())
        .unwrap()
        .execute("UPDATE api_keys SET spent_micros = spent_micros + 1", [])
        .unwrap();
    let report = cluster.client().ledger_verify().await.unwrap();
    assert!(
        !report.ok && report.problems.iter().any(|p| p.contains(&key.view.key_id)),
        "{:?}",
        report.problems
    );
}
