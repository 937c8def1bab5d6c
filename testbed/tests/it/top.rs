//! `rhizos top` in a real terminal (tmux) against a real network: the operator sees the nodes
//! and every account's jobs, opens a running job and watches its log lines arrive, opens a node
//! and sees its plugins as its agent answers, and `q` leaves the terminal as it was; a user sees
//! their own jobs and balance only. `--json` snapshots and `network.stats` checked against the
//! ledger, and the bus refusing a user the network's figures or another account's.

use crate::common::{demo, submit_request};
use rhizos_broker::wire::{ErrorCode, JobState};
use rhizos_broker::{Caller, RequestError};
use rhizos_testbed::cluster::wasm_spec;
use rhizos_testbed::{Cluster, ClusterOptions};
use std::time::Duration;
use tokio::process::Command;

const USD: i64 = 1_000_000;

/// A tmux server of its own (a private socket), so the test never touches a user's sessions.
struct Tmux {
    socket: String,
    /// Where each session's stderr and exit status go (the shell around `rhizos top` writes
    /// `exit N` there when it ends: the status whatever the tmux version reports).
    dir: tempfile::TempDir,
}

impl Tmux {
    fn exit_file(&self, session: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{session}.exit"))
    }

    async fn tmux(&self, args: &[&str]) -> String {
        let output = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .await
            .expect("tmux runs (apt-get install tmux)");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Starts `rhizos top` in an 80×24 window as the party `credentials` names.
    async fn start(&self, session: &str, cluster: &Cluster, credentials: &std::path::Path) {
        let command = format!(
            "env RHIZOS_NATS_URL='{}' RHIZOS_NAMESPACE='{}' RHIZOS_CREDENTIALS='{}' TERM=xterm-256color '{}' top --interval-ms 300 2>'{err}'; echo \"exit $?\" >> '{err}'",
            cluster.settings.nats.url,
            cluster.bus.subjects.namespace(),
            credentials.display(),
            rhizos_testbed::build_dir().join("rhizos").display(),
            err = self.exit_file(session).display(),
        );
        self.tmux(&[
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "80",
            "-y",
            "24",
            &command,
        ])
        .await;
        // Keep the pane after top exits, to read its exit status and screen.
        self.tmux(&["set-option", "-t", session, "remain-on-exit", "on"])
            .await;
    }

    async fn screen(&self, session: &str) -> String {
        self.tmux(&["capture-pane", "-p", "-t", session]).await
    }

    /// Waits (up to 20 s) until the screen shows every one of `texts`.
    async fn wait_for(&self, session: &str, texts: &[&str]) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let screen = self.screen(session).await;
            if texts.iter().all(|t| screen.contains(t)) {
                return screen;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the screen never showed {texts:?}:\n{screen}"
            );
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    async fn keys(&self, session: &str, keys: &[&str]) {
        for key in keys {
            self.tmux(&["send-keys", "-t", session, key]).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn pane(&self, session: &str, format: &str) -> String {
        self.tmux(&["display-message", "-p", "-t", session, format])
            .await
            .trim()
            .to_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

fn tail(job_id: &str) -> &str {
    &job_id[job_id.len() - 11..]
}

#[tokio::test]
async fn rhizos_top_shows_the_live_network_in_a_real_terminal_and_each_user_only_their_own() {
    let cluster = Cluster::start(ClusterOptions {
        secure: true,
        heartbeat_interval_ms: 300,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let node_id = cluster.agents[0].node_id().to_owned();
    cluster.funded_account("alice", USD).await.unwrap();
    cluster.funded_account("bob", USD).await.unwrap();
    let module = demo();
    let unique = rhizos_testbed::cluster::uuid_like();
    let bob_job = format!("job-bob{}", &unique[..24]);
    let alice_job = format!("job-alice{}", &rhizos_testbed::cluster::uuid_like()[..24]);
    let bob = cluster.client_as(&Caller::user("bob")).await.unwrap();
    bob.submit(&submit_request(
        "bob",
        &bob_job,
        wasm_spec(&module, &["hello", "bob"], 10_000),
        USD / 10,
    ))
    .await
    .unwrap();
    let ended = cluster
        .wait_for_end(&bob_job, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(ended.state, JobState::Succeeded);
    // Alice's job prints a line every 200 ms for 30 s: still running while top watches it.
    let alice = cluster.client_as(&Caller::user("alice")).await.unwrap();
    alice
        .submit(&submit_request(
            "alice",
            &alice_job,
            wasm_spec(&module, &["count", "150", "200"], 60_000),
            USD * 8 / 10,
        ))
        .await
        .unwrap();

    let tmux = Tmux {
        socket: format!("rhizos-top-{}", &unique[..12]),
        dir: tempfile::tempdir().unwrap(),
    };
    let operator = cluster
        .settings_as(&Caller::operator("operator"))
        .unwrap()
        .credentials
        .unwrap();
    tmux.start("op", &cluster, &operator).await;
    let screen = tmux
        .wait_for(
            "op",
            &[
                "operator",
                "● live",
                &node_id,
                tail(&alice_job),
                tail(&bob_job),
            ],
        )
        .await;
    assert!(screen.contains("1 live"), "{screen}");
    assert!(screen.contains("Fees"), "{screen}");

    // The job stream; the newest (Alice's running job) is selected: Enter opens it and its
    // log lines arrive live.
    tmux.keys("op", &["3"]).await;
    tmux.wait_for("op", &["Jobs (2)"]).await;
    tmux.keys("op", &["Enter"]).await;
    let screen = tmux
        .wait_for("op", &[&alice_job, "running", "Logs ·", "line "])
        .await;
    assert!(
        screen.contains("account   alice · backend wasm"),
        "{screen}"
    );
    let first: u32 = line_number(&screen);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let later = line_number(&tmux.screen("op").await);
    assert!(
        later > first,
        "log lines keep arriving: {first} then {later}"
    );

    // Back, the nodes page, and the node's plugins as its agent answers.
    tmux.keys("op", &["Escape", "2"]).await;
    tmux.wait_for("op", &["Nodes (1)", "live"]).await;
    tmux.keys("op", &["Enter"]).await;
    let screen = tmux
        .wait_for("op", &["Plugins (live from the agent)", "✓", "wasm"])
        .await;
    assert!(screen.contains(&format!("node      {node_id}")), "{screen}");

    // q quits, with status 0, and the terminal is back on its normal screen.
    tmux.keys("op", &["Escape", "q"]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let exit = loop {
        let written = std::fs::read_to_string(tmux.exit_file("op")).unwrap_or_default();
        if written.contains("exit ") {
            break written;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "top did not quit on q:\n{written}\n{}",
            tmux.screen("op").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        exit.ends_with("exit 0\n"),
        "top exits with status 0: {exit}"
    );
    assert_eq!(
        tmux.pane("op", "#{alternate_on}").await,
        "0",
        "the terminal left the alternate screen"
    );

    // Alice sees her account: her job and balance, not Bob's job, not the fees.
    let alice_credentials = cluster
        .settings_as(&Caller::user("alice"))
        .unwrap()
        .credentials
        .unwrap();
    tmux.start("alice", &cluster, &alice_credentials).await;
    let screen = tmux
        .wait_for(
            "alice",
            &["account alice", "Balance", tail(&alice_job), &node_id],
        )
        .await;
    assert!(!screen.contains(tail(&bob_job)), "{screen}");
    assert!(!screen.contains("Fees"), "{screen}");
    // Her job ends while she watches: the stream shows it without a reload.
    alice.job_cancel(&alice_job).await.unwrap();
    tmux.wait_for("alice", &["cancelled"]).await;
    tmux.keys("alice", &["q"]).await;

    // `--json`: one snapshot, as the ledger has it.
    let json = |credentials: &std::path::Path, extra: &[&str]| {
        let mut command = Command::new(rhizos_testbed::build_dir().join("rhizos"));
        command
            .args(["top", "--json"])
            .args(extra)
            .env("RHIZOS_NATS_URL", &cluster.settings.nats.url)
            .env("RHIZOS_NAMESPACE", cluster.bus.subjects.namespace())
            .env("RHIZOS_CREDENTIALS", credentials);
        command
    };
    let cancelled = cluster
        .wait_for_end(&alice_job, Duration::from_secs(20))
        .await
        .unwrap();
    // The network's figures may be up to a second old (read at most once a second).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let snapshot = loop {
        let output = json(&operator, &[]).output().await.unwrap();
        assert!(output.status.success(), "{output:?}");
        let snapshot: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        if snapshot["stats"]["jobs_by_state"]["cancelled"] == 1 {
            break snapshot;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the figures never showed the cancelled job: {snapshot}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let stats = &snapshot["stats"];
    assert_eq!(stats["nodes_live"], 1, "{snapshot}");
    assert_eq!(stats["jobs_by_state"]["succeeded"], 1, "{snapshot}");
    assert_eq!(stats["jobs_by_state"]["cancelled"], 1, "{snapshot}");
    assert_eq!(stats["jobs_ended"], 2, "{snapshot}");
    assert_eq!(stats["escrow_held_micros"], 0, "{snapshot}");
    assert_eq!(
        stats["fees_micros"],
        ended.fee_micros.unwrap() + cancelled.fee_micros.unwrap_or(0),
        "{snapshot}"
    );
    assert_eq!(snapshot["nodes"][0]["node_id"], node_id.as_str());
    let output = json(&alice_credentials, &[]).output().await.unwrap();
    assert!(output.status.success(), "{output:?}");
    let snapshot: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(snapshot["stats"]["account"], "alice");
    assert_eq!(snapshot["stats"]["jobs_by_state"]["cancelled"], 1);
    assert!(
        snapshot["stats"]["jobs_by_state"]
            .get("succeeded")
            .is_none(),
        "{snapshot}"
    );
    assert_eq!(
        snapshot["stats"]["balance_micros"],
        USD - cancelled.cost_micros.unwrap_or(0)
    );
    assert!(snapshot["stats"].get("fees_micros").is_none(), "{snapshot}");
    // Another account's figures are refused, saying why; so are the network's to a user.
    let output = json(&alice_credentials, &["--account", "bob"])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    match alice.network_stats(None).await {
        Err(RequestError::Remote(e)) => {
            assert_eq!(e.code, ErrorCode::Forbidden);
            assert!(e.message.contains("operator"), "{e:?}");
        }
        other => panic!("a user got the network's figures: {other:?}"),
    }
    match alice.network_stats(Some("bob")).await {
        Err(RequestError::Remote(e)) => assert_eq!(e.code, ErrorCode::Forbidden),
        other => panic!("alice read bob's figures: {other:?}"),
    }
    cluster.shutdown().await.unwrap();
}

/// The highest `line N` on the screen.
fn line_number(screen: &str) -> u32 {
    screen
        .split("line ")
        .skip(1)
        .filter_map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
        })
        .max()
        .unwrap_or(0)
}
