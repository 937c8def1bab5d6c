//! Flows (issue 19, first part): a flow is checked before anything runs — errors name the
//! step and the field, a cycle is refused naming its steps — and priced on the nodes online
//! now, through the orchestrator (`flow.estimate`) and the CLI (`rhizos flow check|estimate`).

use crate::common::*;
use rhizos_broker::wire::{ErrorCode, FlowEdge, FlowSpec, FlowStep};
use rhizos_testbed::cluster::wasm_spec;

fn step(name: &str, timeout_ms: u64) -> FlowStep {
    FlowStep::new(name, wasm_spec(&demo(), &["count", "1"], timeout_ms))
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

fn upper(name: &str, from: &str, to: &str) -> FlowStep {
    FlowStep {
        max_cost_micros: Some(1_000_000),
        ..FlowStep::new(name, wasm_spec(&demo(), &["upper", from, to], 20_000))
    }
}

fn slow_upper(name: &str, from: &str, to: &str) -> FlowStep {
    let mut step = upper(name, from, to);
    step.spec.args.push("1000".into());
    step
}

fn b64(text: &str) -> String {
    rhizos_broker::wire::b64_encode(text.as_bytes())
}

/// A test network started with `options`, with `account` funded with `micros`: the network,
/// its operator's client, and the account's balance before any flow.
async fn funded_cluster(
    options: rhizos_testbed::ClusterOptions,
    account: &str,
    micros: i64,
) -> (rhizos_testbed::Cluster, rhizos_broker::Client, i64) {
    let cluster = rhizos_testbed::Cluster::start(options).await.unwrap();
    let client = cluster.client();
    let before = cluster
        .funded_account(account, micros)
        .await
        .unwrap()
        .balance_micros;
    (cluster, client, before)
}

/// Waits (up to 60 s) until the flow has ended.
async fn flow_end(client: &rhizos_broker::Client, flow_id: &str) -> rhizos_broker::wire::FlowView {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let flow = client.flow_get(flow_id).await.unwrap();
        if flow.state.is_terminal() {
            return flow;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "flow {flow_id} did not end: {flow:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Every step job's cost, and that the flow's money adds up to the micro: each step settled
/// from the flow's escrow, the rest refunded, the account charged exactly the steps' costs.
async fn assert_flow_money(
    cluster: &rhizos_testbed::Cluster,
    flow: &rhizos_broker::wire::FlowView,
    before: i64,
) {
    let mut spent = 0;
    for step in &flow.steps {
        let mut step_cost = 0;
        for run in 1..=step.runs {
            let index = flow.steps.iter().position(|s| s.step == step.step).unwrap();
            let job = cluster
                .job(&format!("{}-{index}-{run}", flow.flow_id))
                .await
                .unwrap();
            assert_eq!(job.account, flow.account, "{job:?}");
            let cost = job.cost_micros.expect("a step's job is settled");
            step_cost += cost;
        }
        assert_eq!(step.cost_micros, step_cost, "{step:?}");
        spent += step_cost;
    }
    assert_eq!(flow.cost_micros, Some(spent), "{flow:#?}");
    assert_eq!(
        flow.cost_micros.unwrap() + flow.refund_micros.unwrap(),
        flow.max_cost_micros
    );
    assert_eq!(flow.escrow_micros, 0);
    let after = cluster.balance(&flow.account).await.unwrap();
    assert_eq!(after.balance_micros, before - spent);
    assert_eq!(after.held_micros, 0);
    assert_ledger_consistent(cluster).await;
}

/// A three-step fan-out of real WASM jobs: `prep` feeds its output file to `left` and `right`
/// (which run as soon as it is done, at the same time), `right` under a condition on a JSON
/// value `prep` wrote (true), `never` under an exit-code condition (false: skipped). One
/// escrow for the flow; each step settled from it; the rest refunded — to the micro. Then a
/// flow whose first step fails after its retry: its dependant is skipped, the independent
/// step still runs, the flow fails saying why and refunds what is left.
#[tokio::test]
async fn a_fan_out_flow_runs_on_the_network_and_settles_from_one_escrow() {
    use rhizos_broker::wire::{CompareOp, Condition, FlowState, StepState};
    // Secure: each party is who its credentials say (a user sees only its own flows).
    let (cluster, client, before) = funded_cluster(
        rhizos_testbed::ClusterOptions {
            secure: true,
            ..Default::default()
        },
        "fay",
        20_000_000,
    )
    .await;

    let mut prep = upper("prep", "in.txt", "up.txt");
    prep.spec
        .input_files
        .insert("in.txt".into(), b64("hello\nflows\n"));
    let mut never = upper("never", "x.txt", "y.txt");
    never.spec.args = vec!["hello".into()];
    let flow = FlowSpec {
        name: "fan-out".into(),
        max_cost_micros: 5_000_000,
        timeout_ms: Some(60_000),
        steps: vec![
            prep,
            upper("left", "a.txt", "left.txt"),
            upper("right", "b.txt", "right.txt"),
            never,
        ],
        edges: vec![
            edge("prep:/output/up.txt", "left:/input/a.txt"),
            FlowEdge {
                when: Some(Condition {
                    exit_code: None,
                    json: Some("/output/up.txt.lines".into()),
                    pointer: Some(String::new()),
                    op: CompareOp::Ge,
                    value: Some(serde_json::json!(2)),
                }),
                ..edge("prep:/output/up.txt", "right:/input/b.txt")
            },
            FlowEdge {
                when: Some(Condition {
                    exit_code: Some(3),
                    json: None,
                    pointer: None,
                    op: CompareOp::Eq,
                    value: None,
                }),
                ..edge("prep", "never")
            },
        ],
    };
    let started = client
        .flow_run(Some("fan-1"), "fay", flow.clone())
        .await
        .unwrap();
    assert_eq!(started.flow_id, "fan-1");
    assert_eq!(started.max_cost_micros, 5_000_000);
    // Sending the same start again (a client's retry) starts nothing more.
    let again = client
        .flow_run(Some("fan-1"), "fay", flow.clone())
        .await
        .unwrap();
    assert_eq!(again.flow_id, "fan-1");
    let done = flow_end(&client, "fan-1").await;
    assert_eq!(done.state, FlowState::Succeeded, "{done:#?}");
    let states: Vec<_> = done
        .steps
        .iter()
        .map(|s| (s.step.as_str(), s.state, s.runs))
        .collect();
    assert_eq!(
        states,
        [
            ("prep", StepState::Succeeded, 1),
            ("left", StepState::Succeeded, 1),
            ("right", StepState::Succeeded, 1),
            ("never", StepState::Skipped, 0),
        ]
    );
    assert!(
        done.steps[3]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("condition on the edge from \"prep\" is false")),
        "{done:#?}"
    );
    // The file went from prep to both branches, through their own jobs.
    for (index, file, text) in [
        (1, "left.txt", "HELLO\nFLOWS\n"),
        (2, "right.txt", "HELLO\nFLOWS\n"),
    ] {
        let job = cluster.job(&format!("fan-1-{index}-1")).await.unwrap();
        assert_eq!(
            job.output_files.get(file).map(String::as_str),
            Some(b64(text).as_str()),
            "{job:?}"
        );
    }
    // left and right ran at the same time: both started before either ended.
    let (left, right) = (
        cluster.job("fan-1-1-1").await.unwrap(),
        cluster.job("fan-1-2-1").await.unwrap(),
    );
    let prep_job = cluster.job("fan-1-0-1").await.unwrap();
    assert!(left.created_ms >= prep_job.updated_ms && right.created_ms >= prep_job.updated_ms);
    assert_flow_money(&cluster, &done, before).await;
    let before = cluster.balance("fay").await.unwrap().balance_micros;

    // Every change is an event on the account's flow subject, in order: the flow starts,
    // each step's states, the flow ends.
    {
        let events = stored_events(
            &cluster.bus,
            vec![cluster.bus.subjects.flow_events_of("fay", "fan-1").unwrap()],
            std::time::Duration::from_millis(1_500),
        )
        .await;
        let mut history = Vec::new();
        for event in events {
            if let rhizos_broker::wire::EventBody::Flow { step, state, .. } = event.body {
                history.push(format!("{}:{state}", step.as_deref().unwrap_or("flow")));
            }
        }
        assert_eq!(
            history.first().map(String::as_str),
            Some("flow:running"),
            "{history:?}"
        );
        assert_eq!(
            history.last().map(String::as_str),
            Some("flow:succeeded"),
            "{history:?}"
        );
        for step in ["prep", "left", "right"] {
            let of: Vec<_> = history
                .iter()
                .filter(|h| h.starts_with(&format!("{step}:")))
                .collect();
            assert_eq!(
                of,
                [&format!("{step}:running"), &format!("{step}:succeeded")],
                "{history:?}"
            );
        }
        assert!(history.contains(&"never:skipped".to_owned()), "{history:?}");
    }

    // A failing step: retried once after its backoff, then failed; its dependant skipped;
    // the independent step still runs; the flow fails and refunds the rest.
    let mut broken = upper("broken", "in.txt", "out.txt");
    broken.spec.args = vec!["exit".into(), "3".into()];
    broken.retries = 1;
    broken.backoff_ms = 200;
    let failing = FlowSpec {
        name: "failing".into(),
        max_cost_micros: 4_000_000,
        timeout_ms: None,
        steps: vec![broken, upper("after", "a.txt", "b.txt"), {
            let mut alone = upper("alone", "in.txt", "out.txt");
            alone.spec.input_files.insert("in.txt".into(), b64("x"));
            alone
        }],
        edges: vec![edge("broken:/output/out.txt", "after:/input/a.txt")],
    };
    client
        .flow_run(Some("fail-1"), "fay", failing)
        .await
        .unwrap();
    let failed = flow_end(&client, "fail-1").await;
    assert_eq!(failed.state, FlowState::Failed, "{failed:#?}");
    let states: Vec<_> = failed
        .steps
        .iter()
        .map(|s| (s.step.as_str(), s.state, s.runs))
        .collect();
    assert_eq!(
        states,
        [
            ("broken", StepState::Failed, 2),
            ("after", StepState::Skipped, 0),
            ("alone", StepState::Succeeded, 1),
        ]
    );
    assert_eq!(failed.steps[0].exit_code, Some(3));
    assert!(
        failed
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("step \"broken\" failed")),
        "{failed:#?}"
    );
    assert!(
        failed.steps[1].reason.as_deref() == Some("step \"broken\" failed"),
        "{failed:#?}"
    );
    assert_flow_money(&cluster, &failed, before).await;

    // Another account sees none of it; the list shows the account's flows, newest first.
    let listed = client.flow_list(Some("fay"), None).await.unwrap();
    let ids: Vec<_> = listed.flows.iter().map(|f| f.flow_id.as_str()).collect();
    assert_eq!(ids, ["fail-1", "fan-1"]);
    cluster.funded_account("gus", 1_000_000).await.unwrap();
    let gus = cluster
        .client_as(&rhizos_broker::Caller::user("gus"))
        .await
        .unwrap();
    let hidden = gus.flow_get("fan-1").await.unwrap_err();
    assert_eq!(hidden.remote().unwrap().code, ErrorCode::NotFound);
    assert!(gus.flow_list(None, None).await.unwrap().flows.is_empty());
    let refused = gus.flow_cancel("fan-1").await.unwrap_err();
    assert_eq!(refused.remote().unwrap().code, ErrorCode::NotFound);
    // gus's own flow, cancelled while its step runs: the step's job is stopped, the flow
    // ends cancelled, and everything not spent comes back.
    let mut slow = upper("slow", "in.txt", "out.txt");
    slow.spec.args = vec!["sleep".into(), "20000".into()];
    slow.spec.timeout_ms = 60_000;
    let gus_before = cluster.balance("gus").await.unwrap().balance_micros;
    gus.flow_run(
        Some("gus-1"),
        "gus",
        FlowSpec {
            name: "slow".into(),
            max_cost_micros: 1_000_000,
            timeout_ms: None,
            steps: vec![slow],
            edges: vec![],
        },
    )
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !cluster
        .job("gus-1-0-1")
        .await
        .is_ok_and(|j| j.state == rhizos_broker::wire::JobState::Running)
    {
        assert!(std::time::Instant::now() < deadline, "the step never ran");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let stopping = gus.flow_cancel("gus-1").await.unwrap();
    assert!(
        matches!(stopping.state, FlowState::Stopping | FlowState::Cancelled),
        "{stopping:#?}"
    );
    let cancelled = flow_end(&gus, "gus-1").await;
    assert_eq!(cancelled.state, FlowState::Cancelled, "{cancelled:#?}");
    assert_eq!(
        cancelled.steps[0].state,
        StepState::Cancelled,
        "{cancelled:#?}"
    );
    assert_flow_money(&cluster, &cancelled, gus_before).await;
    // A cycle is refused before anything is held.
    let mut cycle = flow.clone();
    cycle.edges.push(edge("left", "prep"));
    let refused = client
        .flow_run(Some("loop-1"), "fay", cycle)
        .await
        .unwrap_err();
    assert_eq!(refused.remote().unwrap().code, ErrorCode::BadRequest);
    assert_eq!(cluster.balance("fay").await.unwrap().held_micros, 0);
}

/// A file too large to travel in a report goes from step to step out of band: the upstream
/// node stores it in the blob stream, the orchestrator files it under each node that runs a
/// downstream step (nodes read blobs only under their own token), and that node reads it
/// there with its digest checked. Three nodes of one slot each, so the two downstream steps
/// run at once and at least one on another node than the upstream one.
#[tokio::test]
async fn a_large_file_goes_between_steps_on_different_nodes_out_of_band() {
    use rhizos_broker::wire::{FlowState, StepState};
    let (cluster, client, before) = funded_cluster(
        rhizos_testbed::ClusterOptions {
            agents: 3,
            max_concurrent: 1,
            secure: true,
            ..Default::default()
        },
        "bea",
        10_000_000,
    )
    .await;
    let mut fill = upper("fill", "-", "-");
    fill.spec.args = vec!["fill".into(), "1".into()];
    let flow = FlowSpec {
        name: "big-file".into(),
        max_cost_micros: 3_000_000,
        timeout_ms: Some(120_000),
        steps: vec![
            fill,
            // Each a second long, so that the two overlap (on two nodes of one slot each).
            slow_upper("one", "in.bin", "one.bin"),
            slow_upper("two", "in.bin", "two.bin"),
        ],
        edges: vec![
            edge("fill:/output/fill.bin", "one:/input/in.bin"),
            edge("fill:/output/fill.bin", "two:/input/in.bin"),
        ],
    };
    client.flow_run(Some("big-1"), "bea", flow).await.unwrap();
    let done = flow_end(&client, "big-1").await;
    assert_eq!(done.state, FlowState::Succeeded, "{done:#?}");
    assert!(done.steps.iter().all(|s| s.state == StepState::Succeeded));
    let upstream = cluster.job("big-1-0-1").await.unwrap();
    let stored = upstream
        .blobs
        .files
        .get("fill.bin")
        .expect("stored out of band");
    assert_eq!(stored.size, 1 << 20);
    let upper = rhizos_broker::blobs::sha256_hex(&vec![b'X'; 1 << 20]);
    let mut nodes = Vec::new();
    for (index, file) in [(1, "one.bin"), (2, "two.bin")] {
        let job = cluster.job(&format!("big-1-{index}-1")).await.unwrap();
        let blob = job
            .blobs
            .files
            .get(file)
            .unwrap_or_else(|| panic!("{job:?}"));
        assert_eq!((blob.sha256.as_str(), blob.size), (upper.as_str(), 1 << 20));
        nodes.push(job.node_id.clone());
    }
    assert!(
        nodes.iter().any(|n| n != &upstream.node_id),
        "a downstream step ran on another node than {:?}: {nodes:?}",
        upstream.node_id
    );
    assert_flow_money(&cluster, &done, before).await;

    // A user cannot hand a job someone's blob by naming it: input_blobs are the flows' own.
    let mut spec = wasm_spec(&demo(), &["upper", "in.bin", "o"], 10_000);
    spec.input_blobs.insert(
        "in.bin".into(),
        rhizos_broker::wire::InputBlob {
            sha256: stored.sha256.clone(),
            size: stored.size,
            from_node: upstream.node_id.clone().unwrap(),
        },
    );
    let bea = cluster
        .client_as(&rhizos_broker::Caller::user("bea"))
        .await
        .unwrap();
    let refused = bea
        .submit(&submit_request("bea", "forged", spec, 500_000))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("input_blobs"), "{refused}");
}

/// A flow mixing backends: a WASM step's output file goes into a container (the probe image,
/// a real Docker engine) and into another WASM step at the same time; both settle from the
/// flow's escrow.
#[tokio::test]
async fn a_flow_runs_wasm_and_docker_steps_from_one_escrow() {
    use rhizos_broker::wire::{FlowState, StepState};
    assert!(
        rhizos_testbed::images::docker_available(),
        "this test needs a Docker engine: `docker info` does not answer"
    );
    let image = rhizos_testbed::images::probe_image().expect("probe image builds");
    let (cluster, client, before) = funded_cluster(
        rhizos_testbed::ClusterOptions {
            plugin_files: vec![
                rhizos_testbed::plugin_file("rhizos_plugin_wasm").unwrap(),
                rhizos_testbed::plugin_file("rhizos_plugin_docker").unwrap(),
            ],
            plugin_config: [("docker".to_owned(), serde_json::json!({"pull": "never"}))].into(),
            node_prefix: format!("flowbox{}", &rhizos_testbed::cluster::uuid_like()[..8]),
            ..Default::default()
        },
        "dot",
        10_000_000,
    )
    .await;
    let mut prep = upper("prep", "in.txt", "up.txt");
    prep.spec
        .input_files
        .insert("in.txt".into(), b64("hello\nflows\n"));
    let boxed = FlowStep {
        max_cost_micros: Some(2_000_000),
        ..FlowStep::new(
            "box",
            rhizos_testbed::cluster::docker_spec(
                &image,
                &["cat:/input/text.txt", "write:/output/boxed.txt=boxed"],
                30_000,
            ),
        )
    };
    let flow = FlowSpec {
        name: "mixed".into(),
        max_cost_micros: 5_000_000,
        timeout_ms: Some(120_000),
        steps: vec![prep, boxed, upper("left", "a.txt", "left.txt")],
        edges: vec![
            edge("prep:/output/up.txt", "box:/input/text.txt"),
            edge("prep:/output/up.txt", "left:/input/a.txt"),
        ],
    };
    client.flow_run(Some("mix-1"), "dot", flow).await.unwrap();
    let done = flow_end(&client, "mix-1").await;
    assert_eq!(done.state, FlowState::Succeeded, "{done:#?}");
    assert!(done.steps.iter().all(|s| s.state == StepState::Succeeded));
    let container = cluster.job("mix-1-1-1").await.unwrap();
    assert_eq!(container.backend, "docker");
    assert_eq!(
        container.stdout.as_deref(),
        Some("HELLO\nFLOWS\n"),
        "the container read the WASM step's file: {container:?}"
    );
    assert_eq!(
        container.output_files.get("boxed.txt").map(String::as_str),
        Some(b64("boxed").as_str())
    );
    assert_flow_money(&cluster, &done, before).await;
}

/// A condition reads a JSON output that travelled out of band (past the 64 KiB a report
/// carries inline): the orchestrator fetches it from the blob stream, digest checked, before
/// the flow moves on — the branch whose condition holds runs, the other is skipped — and a
/// condition on a file that is not JSON is false, saying why. The money adds up.
#[tokio::test]
async fn a_condition_reads_a_json_output_stored_out_of_band() {
    use rhizos_broker::wire::{CompareOp, Condition, FlowState, StepState};
    let (cluster, client, before) =
        funded_cluster(rhizos_testbed::ClusterOptions::default(), "jo", 10_000_000).await;
    let mut make = upper("make", "in.json", "out.json");
    let document = format!("{{\"N\": 5, \"PAD\": \"{}\"}}", "A".repeat(70_000));
    make.spec
        .input_files
        .insert("in.json".into(), b64(&document));
    let mut text = upper("text", "in.txt", "out.txt");
    text.spec
        .input_files
        .insert("in.txt".into(), b64(&"b".repeat(70_000)));
    let when = |file: &str, op: CompareOp| Condition {
        exit_code: None,
        json: Some(file.into()),
        pointer: Some("/N".into()),
        op,
        value: Some(serde_json::json!(3)),
    };
    let flow = FlowSpec {
        name: "blob-condition".into(),
        max_cost_micros: 4_000_000,
        timeout_ms: None,
        steps: vec![
            make,
            upper("big", "in.json", "seen.json"),
            upper("small", "in.json", "seen.json"),
            text,
            upper("garbled", "in.txt", "seen.txt"),
        ],
        edges: vec![
            FlowEdge {
                when: Some(when("/output/out.json", CompareOp::Gt)),
                ..edge("make:/output/out.json", "big:/input/in.json")
            },
            FlowEdge {
                when: Some(when("/output/out.json", CompareOp::Lt)),
                ..edge("make:/output/out.json", "small:/input/in.json")
            },
            // 70 KB of text, out of band too, but not JSON.
            FlowEdge {
                when: Some(when("/output/out.txt", CompareOp::Gt)),
                ..edge("text:/output/out.txt", "garbled:/input/in.txt")
            },
        ],
    };
    client.flow_run(Some("bc-1"), "jo", flow).await.unwrap();
    let flow = flow_end(&client, "bc-1").await;
    assert_eq!(flow.state, FlowState::Succeeded, "{flow:#?}");
    let states: Vec<_> = flow
        .steps
        .iter()
        .map(|s| (s.step.as_str(), s.state))
        .collect();
    assert_eq!(
        states,
        [
            ("make", StepState::Succeeded),
            ("big", StepState::Succeeded),
            ("small", StepState::Skipped),
            ("text", StepState::Succeeded),
            ("garbled", StepState::Skipped),
        ]
    );
    let made = cluster.job("bc-1-0-1").await.unwrap();
    assert!(
        made.blobs.files.contains_key("out.json") && !made.output_files.contains_key("out.json"),
        "the document went out of band: {made:?}"
    );
    // The branch that ran read the whole document (through the blob hand-over).
    let big = cluster.job("bc-1-1-1").await.unwrap();
    let seen = big
        .blobs
        .files
        .get("seen.json")
        .expect("the big branch's output is out of band too");
    assert_eq!(seen.size, document.len() as u64);
    assert!(
        flow.steps[2]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("condition") && r.contains("false")),
        "{:?}",
        flow.steps[2]
    );
    assert!(
        flow.steps[4]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("/output/out.txt is not JSON")),
        "{:?}",
        flow.steps[4]
    );
    assert_flow_money(&cluster, &flow, before).await;
}
