//! Flows (issue 19, first part): a flow is checked before anything runs — errors name the
//! step and the field, a cycle is refused naming its steps — and priced on the nodes online
//! now, through the orchestrator (`flow.estimate`) and the CLI (`rhizos flow check|estimate`).

use crate::common::*;
use rhizos_broker::wire::{ErrorCode, FlowEdge, FlowSpec, FlowStep};
use rhizos_testbed::cluster::wasm_spec;

fn step(name: &str, timeout_ms: u64) -> FlowStep {
    FlowStep {
        name: name.into(),
        spec: wasm_spec(&demo(), &["count", "1"], timeout_ms),
        max_cost_micros: None,
        retries: 0,
        backoff_ms: 1_000,
        ok_exit_codes: vec![0],
    }
}

fn edge(from: &str, to: &str) -> FlowEdge {
    FlowEdge {
        from: from.into(),
        to: to.into(),
        when: None,
    }
}

#[tokio::test]
async fn a_flow_is_checked_and_priced_on_the_nodes_online_now() {
    let cluster = cluster().await;
    let client = cluster.client();
    let mut flow = FlowSpec {
        name: "fan-out".into(),
        max_cost_micros: 5_000_000,
        timeout_ms: None,
        steps: vec![
            step("probe", 20_000),
            step("left", 10_000),
            step("right", 30_000),
        ],
        edges: vec![
            edge("probe:/output/clip.bin", "left:/input/clip.bin"),
            edge("probe:/output/clip.bin", "right:/input/clip.bin"),
        ],
    };
    flow.steps[2].retries = 2;

    // What the nodes' own prices say each step costs at most (its whole timeout).
    let nodes = client.node_list().await.unwrap().nodes;
    let wasm: Vec<_> = nodes
        .iter()
        .filter(|n| n.status == "live" && n.backends.iter().any(|b| b == "wasm"))
        .collect();
    assert!(!wasm.is_empty(), "the cluster has WASM nodes");
    let range = |timeout_ms: u64| {
        let costs: Vec<i64> = wasm
            .iter()
            .map(|n| rhizos_core::ledger::cost_micros(timeout_ms, 1, 64, 0, &n.pricing))
            .collect();
        (*costs.iter().min().unwrap(), *costs.iter().max().unwrap())
    };

    let estimate = client.flow_estimate(flow.clone()).await.unwrap();
    assert_eq!(
        estimate.stages,
        vec![
            vec!["probe".to_owned()],
            vec!["left".to_owned(), "right".to_owned()]
        ]
    );
    for (step, timeout_ms) in estimate.steps.iter().zip([20_000, 10_000, 30_000]) {
        assert_eq!(step.nodes, wasm.len(), "{step:?}");
        assert_eq!(step.backend, "wasm");
        assert_eq!(
            (step.cheapest_micros, step.dearest_micros),
            range(timeout_ms),
            "{step:?}"
        );
        assert!(
            step.cheapest_micros > 0 && step.problem.is_none(),
            "{step:?}"
        );
    }
    assert_eq!(estimate.steps[2].runs, 3);
    let (p, l, r) = (range(20_000), range(10_000), range(30_000));
    assert_eq!(estimate.cheapest_micros, p.0 + l.0 + r.0);
    assert_eq!(estimate.worst_case_micros, p.1 + l.1 + 3 * r.1);
    assert!(estimate.fits);

    // A budget below the worst case does not fit; nor does a step no node can run.
    let mut tight = flow.clone();
    tight.max_cost_micros = estimate.worst_case_micros - 1;
    assert!(!client.flow_estimate(tight).await.unwrap().fits);
    let mut gpu = flow.clone();
    gpu.steps[1].spec.gpus = 1;
    let priced = client.flow_estimate(gpu).await.unwrap();
    assert!(!priced.fits);
    assert_eq!(priced.steps[1].nodes, 0);
    assert!(priced.steps[1].problem.is_some(), "{:?}", priced.steps[1]);

    // Nothing runs a flow with a cycle: refused, naming its steps.
    let mut cycle = flow.clone();
    cycle.edges.push(edge("right", "probe"));
    let refused = client.flow_estimate(cycle).await.unwrap_err();
    let error = refused.remote().unwrap();
    assert_eq!(error.code, ErrorCode::BadRequest);
    assert!(
        error.message.contains("probe → right → probe"),
        "{}",
        error.message
    );
    // A bad field in a step is named, with its step.
    let mut bad = flow.clone();
    bad.steps[1].spec.memory_mib = 0;
    let refused = client.flow_estimate(bad).await.unwrap_err();
    let message = &refused.remote().unwrap().message;
    assert!(
        message.starts_with("step \"left\", steps[1].spec"),
        "{message}"
    );

    // The CLI: a TOML flow checked offline, then priced.
    let dir = tempfile::tempdir().unwrap();
    let cli = RhizosCli {
        url: cluster.settings.nats.url.clone(),
        namespace: cluster.settings.nats.namespace.clone(),
        home: dir.path().to_owned(),
    };
    let file = dir.path().join("fan-out.toml");
    std::fs::write(&file, toml::to_string(&flow).unwrap()).unwrap();
    let (ok, text) = run(&mut cli.command(&["flow", "check", file.to_str().unwrap()]));
    assert!(ok, "{text}");
    assert!(text.contains("stage 2: left, right"), "{text}");
    // (Run off this test's one runtime thread: the orchestrator answering it runs there.)
    let mut command = cli.command(&["--json", "flow", "estimate", file.to_str().unwrap()]);
    let (ok, text) = tokio::task::spawn_blocking(move || run(&mut command))
        .await
        .unwrap();
    assert!(ok, "{text}");
    let priced: rhizos_broker::wire::FlowEstimate = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(priced, estimate);
    let looped = dir.path().join("loop.json");
    let mut cycle = flow.clone();
    cycle.edges.push(edge("left", "probe"));
    std::fs::write(&looped, serde_json::to_string(&cycle).unwrap()).unwrap();
    let (ok, text) = run(&mut cli.command(&["flow", "check", looped.to_str().unwrap()]));
    assert!(!ok, "{text}");
    assert!(text.contains("probe → left → probe"), "{text}");
}
