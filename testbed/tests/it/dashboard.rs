//! The web dashboard in a real browser (headless Chromium over WebDriver,
//! `testbed/web/dashboard_check.py`) against a real, secure network: a user signs in with their
//! credentials file, deploys a job and sees its log lines and its money settle, runs a flow and
//! watches its graph until every step succeeded, opens every page,
//! creates an API key and verifies the job's receipt in the page; the operator sees the fees.
//! The screenshots land in `target/dashboard-screenshots/` (look at them).

use crate::common::assert_ledger_consistent;
use rhizos_broker::config::GatewaySettings;
use rhizos_broker::wire::{JobState, format_usd};
use rhizos_broker::{Bus, Caller};
use rhizos_core::Gateway;
use rhizos_testbed::{Cluster, ClusterOptions};
use std::time::Duration;

#[tokio::test]
async fn the_dashboard_deploys_a_job_and_shows_it_settle_in_a_real_browser() {
    let Some(python) = std::env::var_os("RHIZOS_WEB_PYTHON") else {
        panic!(
            "RHIZOS_WEB_PYTHON is not set: source testbed/web/setup.sh (it installs Chromium, chromedriver and Selenium)"
        );
    };
    let cluster = Cluster::start(ClusterOptions {
        secure: true,
        heartbeat_interval_ms: 300,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    cluster.funded_account("alice", 1_000_000).await.unwrap();
    let user = cluster
        .settings_as(&Caller::user("alice"))
        .unwrap()
        .credentials
        .unwrap();
    let operator = cluster
        .settings_as(&Caller::operator("operator"))
        .unwrap()
        .credentials
        .unwrap();
    let gateway_bus = Bus::connect(&cluster.settings_as(&Caller::gateway("gw")).unwrap())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let gateway = Gateway::new(gateway_bus, GatewaySettings::default())
        .with_dashboard(cluster.settings.nats.clone());
    tokio::spawn(gateway.serve(listener, std::future::pending()));

    let out = rhizos_testbed::build_dir()
        .parent()
        .unwrap()
        .join("dashboard-screenshots");
    let _ = std::fs::remove_dir_all(&out);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("web/dashboard_check.py");
    let run = tokio::process::Command::new(python)
        .arg(&script)
        .arg(&base)
        .arg(&user)
        .arg(&operator)
        .arg(rhizos_testbed::guests::demo_wasm().unwrap())
        .arg(&out)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the browser check finishes within 3 minutes")
        .unwrap();
    assert!(
        output.status.success(),
        "the browser check failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();

    // What the page showed is what the ledger holds.
    let job_id = seen["job_id"].as_str().unwrap();
    let job = cluster.job(job_id).await.unwrap();
    assert_eq!(job.account, "alice");
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert_eq!(seen["cost"], format_usd(job.cost_micros.unwrap()), "{seen}");
    let log = seen["log"].as_str().unwrap();
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        (1..=6).map(|i| format!("line {i}")).collect::<Vec<_>>()
    );
    assert!(
        seen["lines_first_seen"].as_u64().unwrap() < 6,
        "log lines appeared while the job ran, not only at its end: {seen}"
    );
    assert!(
        seen["states"].as_str().unwrap().contains("succeeded"),
        "{seen}"
    );
    assert!(
        seen["receipt"]
            .as_str()
            .unwrap()
            .contains("signature valid"),
        "{seen}"
    );
    assert!(
        seen["node_page"].as_str().unwrap().contains("wasm"),
        "{seen}"
    );
    // The flow run from the Flows page: its graph showed every step succeeded, and the money
    // it showed is what the ledger holds.
    let flow_id = seen["flow_id"].as_str().unwrap();
    let flow = cluster.client().flow_get(flow_id).await.unwrap();
    assert_eq!(flow.account, "alice");
    assert_eq!(
        flow.state,
        rhizos_broker::wire::FlowState::Succeeded,
        "{flow:#?}"
    );
    assert_eq!(
        seen["flow_graph"],
        serde_json::json!(["left:succeeded", "prep:succeeded", "right:succeeded"]),
        "{seen}"
    );
    assert_eq!(seen["flow_edges"], 2, "{seen}");
    assert!(
        seen["flow_money"]
            .as_str()
            .unwrap()
            .starts_with(&format_usd(flow.cost_micros.unwrap())),
        "{seen}"
    );
    // The key made in the page works, and is alice's.
    let key = seen["key"].as_str().unwrap();
    let key = key[key.find("rhz_").unwrap()..]
        .split_whitespace()
        .next()
        .unwrap();
    let view = cluster.client().key_authenticate(key).await.unwrap();
    assert_eq!(view.account, "alice");
    assert_eq!(view.name.as_deref(), Some("browser"));
    assert!(
        seen["operator_dashboard"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("fees earned")
    );
    for page in [
        "dashboard",
        "deploy",
        "modules",
        "node",
        "account",
        "receipts",
        "operator-dashboard",
    ] {
        let shot = out.join(format!("{page}.png"));
        assert!(
            std::fs::metadata(&shot)
                .map(|m| m.len() > 10_000)
                .unwrap_or(false),
            "no screenshot of {page} at {}",
            shot.display()
        );
    }
    assert_ledger_consistent(&cluster).await;
    cluster.shutdown().await.unwrap();
}
