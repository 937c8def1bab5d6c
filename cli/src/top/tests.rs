//! `rhizos top`'s screens for a network in a known state, drawn by ratatui's `TestBackend` and
//! compared with the snapshots in `snapshots/` (review a change with `cargo insta review`, or
//! rerun with `INSTA_UPDATE=always` and read the diff), and its keys.

use super::model::{Detail, Model, NodeSort, Scope, Tab, Update};
use super::{event_account, ui};
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use rhizos_broker::wire::{
    EscrowKind, Event, EventBody, Heartbeat, JobState, JobView, LogBatch, NetworkStatsView,
    NodeView, PluginList,
};
use serde_json::json;

const NOW: u64 = 1_796_000_000_000;

fn node(id: &str, active: u32, cpu_cents: u64, gpus: bool, status: &str) -> NodeView {
    let mut view = json!({
        "node_id": id, "provider_account": format!("prov-{id}"), "tier": 1,
        "backends": ["wasm", "docker"],
        "pricing": {"gpu_hour_cents": 90, "cpu_hour_cents": cpu_cents, "memory_gb_hour_cents": 1,
                    "input_million_micros": 1000000, "output_million_micros": 2000000},
        "cpu_cores": 16, "memory_mib": 65536, "gpus": [], "max_concurrent": 4, "active": active,
        "status": status, "last_heartbeat_ms_ago": if status == "live" { 1_000 } else { 45_000 },
        "jobs_run": 120, "jobs_succeeded": 117, "reputation": 0.97, "plugins": [],
        "hardware": {"cpu_model": "AMD EPYC 9354", "cpu_cores": 16, "cpu_threads": 32,
                     "cpu_features": ["avx2"], "os": "Debian 12", "kernel": "6.1.0", "runtimes": ["docker"]}
    });
    if gpus {
        view["tier"] = json!(3);
        view["backends"] = json!(["cuda", "docker"]);
        view["gpus"] =
            json!([{"name": "NVIDIA H100 80GB HBM3", "vram_mib": 81559, "uuid": "GPU-1"}]);
        view["gpu_telemetry"] = json!([{"uuid": "GPU-1", "utilization_pct": 87, "vram_used_mib": 40960,
            "vram_total_mib": 81559, "temperature_c": 64, "power_mw": 412000}]);
    }
    serde_json::from_value(view).unwrap()
}

fn job(
    id: &str,
    account: &str,
    state: JobState,
    node: Option<&str>,
    cost: Option<i64>,
    age_s: u64,
) -> JobView {
    serde_json::from_value(json!({
        "job_id": id, "account": account, "backend": "wasm", "state": state, "attempt": 1,
        "node_id": node, "max_cost_micros": 50_000, "cost_micros": cost,
        "provider_micros": cost.map(|c| c - c / 20), "fee_micros": cost.map(|c| c / 20),
        "refund_micros": cost.map(|c| 50_000 - c), "exit_code": cost.map(|_| 0),
        "stdout": null, "stderr": null, "reason": if state == JobState::Failed { Some("exit status 3") } else { None },
        "elapsed_ms": cost.map(|_| 1_234), "created_ms": NOW - age_s * 1_000 - 5_000,
        "updated_ms": NOW - age_s * 1_000
    }))
    .unwrap()
}

fn stats(ts_ms: u64, ended: u64, account: Option<&str>) -> NetworkStatsView {
    NetworkStatsView {
        ts_ms,
        account: account.map(str::to_owned),
        nodes_live: 2,
        nodes_lost: 1,
        jobs_by_state: [
            ("pending", 3),
            ("running", 2),
            ("succeeded", ended - 5),
            ("failed", 5),
        ]
        .into_iter()
        .map(|(s, n)| (s.to_owned(), n))
        .collect(),
        jobs_ended: ended,
        escrow_held_micros: 250_000,
        fees_micros: account.is_none().then_some(1_234_567),
        balance_micros: account.map(|_| 4_500_000),
        ai_requests: 100 + ended,
        ai_input_units: 10_000 + ended * 30,
        ai_output_units: 20_000 + ended * 50,
    }
}

/// A network in a known state: three nodes (one with a busy GPU, one lost), five jobs.
fn network(scope: Scope) -> Model {
    let account = match &scope {
        Scope::Account(a) => Some(a.clone()),
        Scope::Operator => None,
    };
    let mut model = Model::new(scope, "dev", NOW);
    model.apply(Update::Stats(Box::new(stats(
        NOW - 2_000,
        1_000,
        account.as_deref(),
    ))));
    model.apply(Update::Stats(Box::new(stats(
        NOW,
        1_020,
        account.as_deref(),
    ))));
    model.apply(Update::Nodes(vec![
        node("node-a", 2, 3_600, false, "live"),
        node("node-gpu", 1, 250, true, "live"),
        node("node-old", 0, 100, false, "lost"),
    ]));
    let owner = account.as_deref().unwrap_or("alice");
    model.apply(Update::Jobs(vec![
        job(
            "job-0190a1b2c3d4e5f6a7b8c9d0e1f2a301",
            owner,
            JobState::Running,
            Some("node-a"),
            None,
            3,
        ),
        job(
            "job-0190a1b2c3d4e5f6a7b8c9d0e1f2a302",
            owner,
            JobState::Succeeded,
            Some("node-gpu"),
            Some(12_340),
            10,
        ),
        job(
            "job-0190a1b2c3d4e5f6a7b8c9d0e1f2a303",
            "bob",
            JobState::Failed,
            Some("node-a"),
            Some(870),
            75,
        ),
        job(
            "job-0190a1b2c3d4e5f6a7b8c9d0e1f2a304",
            owner,
            JobState::Pending,
            None,
            None,
            1,
        ),
        job(
            "job-0190a1b2c3d4e5f6a7b8c9d0e1f2a305",
            "bob",
            JobState::Cancelled,
            None,
            Some(0),
            4_000,
        ),
    ]));
    model
}

fn screen(model: &Model) -> String {
    let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
    terminal.draw(|f| ui::draw(f, model)).unwrap();
    terminal.backend().to_string()
}

fn press(model: &mut Model, code: KeyCode) -> Option<super::Command> {
    model.key(KeyEvent::new(code, KeyModifiers::NONE))
}

#[test]
fn overview_of_a_network_for_the_operator() {
    let model = network(Scope::Operator);
    // 20 jobs ended in 2 s; 20 AI requests; 20 × 80 tokens.
    let rates = model.rates.unwrap();
    assert_eq!(rates.jobs_ended, 10.0);
    assert_eq!(rates.tokens, 800.0);
    insta::assert_snapshot!(screen(&model));
}

#[test]
fn a_user_sees_their_balance_not_the_fees() {
    let model = network(Scope::Account("alice".into()));
    let text = screen(&model);
    assert!(text.contains("Balance  $4.500000"), "{text}");
    assert!(!text.contains("Fees"), "{text}");
    insta::assert_snapshot!(text);
}

#[test]
fn nodes_tab_sorts_and_filters() {
    let mut model = network(Scope::Operator);
    press(&mut model, KeyCode::Char('2'));
    assert_eq!(model.tab, Tab::Nodes);
    let ids = |m: &Model| {
        m.visible_nodes()
            .iter()
            .map(|r| r.view.node_id.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&model), ["node-a", "node-gpu", "node-old"]);
    press(&mut model, KeyCode::Char('s'));
    assert_eq!(model.node_sort, NodeSort::Load);
    assert_eq!(ids(&model), ["node-a", "node-gpu", "node-old"]);
    press(&mut model, KeyCode::Char('s'));
    assert_eq!(
        ids(&model),
        ["node-old", "node-gpu", "node-a"],
        "cheapest first"
    );
    press(&mut model, KeyCode::Char('s'));
    press(&mut model, KeyCode::Char('s'));
    assert_eq!(model.node_sort, NodeSort::Gpu);
    assert_eq!(ids(&model)[0], "node-gpu");
    insta::assert_snapshot!("nodes_by_gpu", screen(&model));
    for c in "/gpu".chars() {
        press(&mut model, KeyCode::Char(c));
    }
    assert!(model.filtering);
    press(&mut model, KeyCode::Enter);
    assert!(!model.filtering);
    assert_eq!(ids(&model), ["node-gpu"]);
    press(&mut model, KeyCode::Esc);
    assert_eq!(ids(&model).len(), 3, "esc clears the filter");
}

#[test]
fn heartbeats_update_load_and_gpu_between_lists() {
    let mut model = network(Scope::Operator);
    let beat: Heartbeat = serde_json::from_value(json!({
        "v": 1, "node_id": "node-gpu", "running": [{"job_id": "j1", "attempt": 1}, {"job_id": "j2", "attempt": 1}],
        "free_slots": 2, "ts_ms": NOW,
        "gpus": [{"uuid": "GPU-1", "utilization_pct": 12, "vram_used_mib": 1024, "vram_total_mib": 81559,
                  "temperature_c": 41, "power_mw": 90000}]
    }))
    .unwrap();
    model.apply(Update::Heartbeat(beat));
    let row = &model.nodes["node-gpu"];
    assert_eq!(row.view.active, 2);
    assert_eq!(row.view.gpu_telemetry[0].utilization_pct, 12);
    // A node list read before that heartbeat does not undo it.
    model.apply(Update::Nodes(vec![node("node-gpu", 1, 250, true, "live")]));
    assert_eq!(model.nodes["node-gpu"].view.active, 2);
    assert_eq!(
        model.nodes["node-gpu"].view.gpu_telemetry[0].utilization_pct,
        12
    );
    assert_eq!(model.nodes.len(), 1, "nodes no longer listed go");
}

#[test]
fn job_stream_follows_events_and_enter_opens_a_job_with_its_logs() {
    let mut model = network(Scope::Operator);
    press(&mut model, KeyCode::Char('3'));
    let event = |state: JobState, ts: u64| Event {
        v: 1,
        ts_ms: ts,
        body: EventBody::Job {
            job_id: "job-0190a1b2c3d4e5f6a7b8c9d0e1f2a3ff".into(),
            state,
            attempt: 1,
            node_id: Some("node-a".into()),
            reason: None,
        },
    };
    model.apply(Update::Event(
        Some("carol".into()),
        event(JobState::Running, NOW),
    ));
    model.apply(Update::Event(
        Some("carol".into()),
        Event {
            v: 1,
            ts_ms: NOW,
            body: EventBody::Escrow {
                job_id: "job-0190a1b2c3d4e5f6a7b8c9d0e1f2a3ff".into(),
                kind: EscrowKind::Held,
                account: "carol".into(),
                amount_micros: 30_000,
                provider_account: None,
                provider_micros: None,
                fee_micros: None,
                refund_micros: None,
            },
        },
    ));
    // A late "running" after "succeeded" does not bring the job back.
    model.apply(Update::Event(
        Some("carol".into()),
        event(JobState::Succeeded, NOW + 1),
    ));
    model.apply(Update::Event(
        Some("carol".into()),
        event(JobState::Running, NOW),
    ));
    let newest = model.visible_jobs()[0].clone();
    assert_eq!(newest.job_id, "job-0190a1b2c3d4e5f6a7b8c9d0e1f2a3ff");
    assert_eq!(newest.state, JobState::Succeeded);
    assert_eq!(newest.account, "carol");
    assert_eq!(newest.max_cost_micros, Some(30_000));
    insta::assert_snapshot!("jobs", screen(&model));

    press(&mut model, KeyCode::Down);
    let command = press(&mut model, KeyCode::Enter);
    assert_eq!(
        command,
        Some(super::Command::OpenJob(
            "job-0190a1b2c3d4e5f6a7b8c9d0e1f2a304".into(),
            "alice".into()
        ))
    );
    let mut view = job(
        "job-0190a1b2c3d4e5f6a7b8c9d0e1f2a304",
        "alice",
        JobState::Running,
        Some("node-a"),
        None,
        1,
    );
    view.attempt = 1;
    model.apply(Update::Job(Box::new(view)));
    let batch: LogBatch = serde_json::from_value(json!({
        "v": 1, "job_id": "job-0190a1b2c3d4e5f6a7b8c9d0e1f2a304", "attempt": 1,
        "lines": [
            {"seq": 0, "stream": "stdout", "line": "loading weights", "ts_ms": NOW},
            {"seq": 1, "stream": "stdout", "line": "epoch 1/3 loss 0.912", "ts_ms": NOW},
            {"seq": 4, "stream": "stderr", "line": "warning: slow disk", "ts_ms": NOW}
        ]
    }))
    .unwrap();
    model.apply(Update::Logs(batch));
    let Some(Detail::Job { logs, skipped, .. }) = &model.detail else {
        panic!("no detail")
    };
    assert_eq!(logs.len(), 3);
    assert_eq!(*skipped, 2, "seq 2 and 3 were not streamed");
    // Another state change of the open job asks for it again.
    let refresh = model.apply(Update::Event(
        Some("alice".into()),
        Event {
            v: 1,
            ts_ms: NOW + 5,
            body: EventBody::Job {
                job_id: "job-0190a1b2c3d4e5f6a7b8c9d0e1f2a304".into(),
                state: JobState::Succeeded,
                attempt: 1,
                node_id: Some("node-a".into()),
                reason: None,
            },
        },
    ));
    assert_eq!(
        refresh,
        Some(super::Command::RefreshJob(
            "job-0190a1b2c3d4e5f6a7b8c9d0e1f2a304".into()
        ))
    );
    insta::assert_snapshot!("job_detail", screen(&model));
    assert_eq!(press(&mut model, KeyCode::Esc), Some(super::Command::Close));
    assert!(model.detail.is_none());
    assert_eq!(
        press(&mut model, KeyCode::Char('q')),
        Some(super::Command::Quit)
    );
}

#[test]
fn enter_on_a_node_shows_its_plugins_and_telemetry() {
    let mut model = network(Scope::Operator);
    press(&mut model, KeyCode::Char('2'));
    press(&mut model, KeyCode::Down);
    assert_eq!(
        press(&mut model, KeyCode::Enter),
        Some(super::Command::OpenNode("node-gpu".into()))
    );
    let plugins: PluginList = serde_json::from_value(json!({
        "node_id": "node-gpu", "plugin_dir": "/var/lib/rhizos/plugins",
        "plugins": [
            {"file": "librhizos_plugin_cuda.so", "name": "cuda", "version": "0.1.0", "kind": "backend",
             "backends": ["cuda"], "refused": null},
            {"file": "libold.so", "name": null, "version": null, "backends": [],
             "refused": "built against plugin API 0.9, this agent speaks 1.x"}
        ]
    }))
    .unwrap();
    model.apply(Update::Plugins("node-gpu".into(), Ok(plugins)));
    insta::assert_snapshot!("node_detail", screen(&model));
}

#[test]
fn nothing_yet_and_problems_are_said() {
    let mut model = Model::new(Scope::Operator, "dev", NOW);
    assert!(screen(&model).contains("waiting for the orchestrator"));
    model.apply(Update::Problem(Some(
        "network.stats: request timed out".into(),
    )));
    assert!(screen(&model).contains("⚠ network.stats: request timed out"));
    // Keys on an empty table do nothing harmful.
    press(&mut model, KeyCode::Char('3'));
    press(&mut model, KeyCode::Down);
    assert_eq!(press(&mut model, KeyCode::Enter), None);
    assert_eq!(
        model.key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
        Some(super::Command::Quit)
    );
}

#[test]
fn events_are_attributed_to_the_account_their_subject_names() {
    assert_eq!(
        event_account("dev", "rhizos.evt.v1.dev.u.alice.job.running.job-1").as_deref(),
        Some("alice")
    );
    assert_eq!(
        event_account("dev", "rhizos.evt.v1.other.u.alice.job.running.j"),
        None
    );
    assert_eq!(event_account("dev", "garbage"), None);
}
