//! The AI gateway end to end with real parts: llama.cpp's server with SmolLM2-135M behind the
//! `openai` backend plugin on a node, the gateway over a secure network, and the official
//! OpenAI Python SDK as the client. Every request's money is checked to the micro.

use rhizos_broker::wire::{CreateKey, JobState};
use rhizos_broker::wire::{JobReport, WIRE_VERSION};
use rhizos_broker::{Bus, Caller, Client};
use rhizos_core::Gateway;
use rhizos_testbed::ai::{self, LlamaServer};
use rhizos_testbed::{Cluster, ClusterOptions};
use std::time::Duration;

const USD: i64 = 1_000_000;
/// The cluster's token prices: $1 per million input tokens, $2 per million output tokens —
/// one and two micro-USD per token.
const IN_MICROS: i64 = 1;
const OUT_MICROS: i64 = 2;

/// The `openai` plugin's config for a node served by `llama` (its health checked every
/// `check_ms`).
fn openai_config(
    llama: &LlamaServer,
    check_ms: u64,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let mut config = std::collections::BTreeMap::new();
    config.insert(
        "openai".to_owned(),
        serde_json::json!({
            "base_url": llama.base_url(),
            "check_ms": check_ms,
            "models": [{"name": "smollm2-135m", "upstream": "smollm2", "service": "chat", "context_length": 1024}],
        }),
    );
    config
}

/// A secure network of one node per plugin config, and a gateway on a free port.
async fn ai_network_of(
    configs: Vec<std::collections::BTreeMap<String, serde_json::Value>>,
) -> (Cluster, String) {
    let (cluster, base, _) = ai_network_with_gateway(configs).await;
    (cluster, base)
}

/// [`ai_network_of`], and the gateway itself.
async fn ai_network_with_gateway(
    configs: Vec<std::collections::BTreeMap<String, serde_json::Value>>,
) -> (Cluster, String, Gateway) {
    let cluster = Cluster::start(ClusterOptions {
        agents: configs.len(),
        secure: true,
        plugin_files: vec![
            rhizos_testbed::plugin_file("rhizos_plugin_openai").unwrap(),
            rhizos_testbed::plugin_file("rhizos_plugin_tts").unwrap(),
        ],
        plugin_config_per_agent: configs,
        heartbeat_interval_ms: 300,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");
    let gateway_bus = Bus::connect(&cluster.settings_as(&Caller::gateway("gw")).unwrap())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let settings = rhizos_broker::config::GatewaySettings {
        listen: listener.local_addr().unwrap().to_string(),
        ..Default::default()
    };
    let gateway = Gateway::new(gateway_bus, settings);
    tokio::spawn(gateway.clone().serve(listener, std::future::pending()));
    // The node offers the model once its plugin has seen the server answer.
    let client = cluster.client();
    let until = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let models = client.model_list().await.unwrap().models;
        if models
            .iter()
            .any(|m| m.name == "smollm2-135m" && m.nodes as usize == cluster.agents.len())
        {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "the model was never offered: {models:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (cluster, base, gateway)
}

async fn key(alice: &Client, limit: Option<i64>, rpm: Option<u32>) -> String {
    alice
        .key_create(CreateKey {
            account: "alice".into(),
            credit_limit_micros: limit,
            rpm,
            ..CreateKey::default()
        })
        .await
        .unwrap()
        .key
}

/// The SDK's view of a request, and the job behind it, agree — and the money is exact.
async fn check_money(cluster: &Cluster, response_id: &str, usage: &serde_json::Value) {
    let job_id = response_id.strip_prefix("chatcmpl-").expect("a chat id");
    let job = cluster
        .wait_for_end(job_id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    let billed = job.billed_usage.expect("billed units");
    let reported = job.reported_usage.expect("reported units");
    assert_eq!(usage["prompt_tokens"], billed.input_units, "{job:?}");
    assert_eq!(usage["completion_tokens"], billed.output_units, "{job:?}");
    assert!(
        billed.input_units <= reported.input_units && billed.output_units <= reported.output_units
    );
    assert!(
        billed.input_units > 0 && billed.output_units > 0,
        "{billed:?}"
    );
    let cost = billed.input_units as i64 * IN_MICROS + billed.output_units as i64 * OUT_MICROS;
    assert_eq!(job.cost_micros, Some(cost), "{job:?}");
    let fee = (cost * 500 + 5_000) / 10_000;
    assert_eq!(job.fee_micros, Some(fee));
    assert_eq!(job.provider_micros, Some(cost - fee));
    assert_eq!(job.refund_micros, Some(job.max_cost_micros - cost));
}

#[tokio::test]
async fn the_openai_sdk_is_served_by_a_node_and_every_request_is_settled_exactly() {
    if std::env::var_os("RHIZOS_TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("RHIZOS_TEST_LOG").unwrap_or_default())
            .try_init();
    }
    let llama = LlamaServer::start(&ai::chat_model().unwrap(), "smollm2", &[]).unwrap();
    // Sentence embeddings from all-MiniLM-L6-v2 on a second server in embedding mode.
    let embedder =
        LlamaServer::start(&ai::embed_model().unwrap(), "minilm", &["--embedding"]).unwrap();
    let mut config = openai_config(&llama, 2_000);
    config.get_mut("openai").unwrap()["models"]
        .as_array_mut()
        .unwrap()
        .push(
            serde_json::json!({"name": "all-minilm-l6-v2", "upstream": "minilm",
            "service": "embeddings", "base_url": embedder.base_url(), "context_length": 512}),
        );
    let (cluster, base, gateway) = ai_network_with_gateway(vec![config]).await;
    cluster.funded_account("alice", USD).await.unwrap();
    let alice = cluster.client_as(&Caller::user("alice")).await.unwrap();
    let (good, quota, rate) = (
        key(&alice, None, None).await,
        key(&alice, Some(1), None).await,
        key(&alice, None, Some(2)).await,
    );
    let tpm = alice
        .key_create(CreateKey {
            account: "alice".into(),
            tpm: Some(20),
            ..CreateKey::default()
        })
        .await
        .unwrap()
        .key;

    let output = tokio::process::Command::new(ai::python().unwrap())
        .arg(ai::repo_root().join("testbed/ai/sdk_check.py"))
        .args([
            &base,
            &good,
            "smollm2-135m",
            "all-minilm-l6-v2",
            &quota,
            &rate,
            &tpm,
        ])
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "sdk_check.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();

    assert_eq!(
        seen["models"],
        serde_json::json!(["all-minilm-l6-v2", "espeak", "smollm2-135m"])
    );
    assert_eq!(seen["model"], "smollm2-135m");
    // A real model's real answer.
    let chat = &seen["chat"];
    assert!(
        chat["content"].as_str().unwrap().contains("Paris"),
        "{chat}"
    );
    assert!(matches!(
        chat["finish_reason"].as_str(),
        Some("stop" | "length")
    ));
    check_money(&cluster, chat["id"].as_str().unwrap(), &chat["usage"]).await;

    let stream = &seen["stream"];
    assert_eq!(stream["same_id"], true, "{stream}");
    assert_eq!(stream["first_role"], "assistant");
    assert!(!stream["content"].as_str().unwrap().is_empty());
    assert_eq!(
        stream["finish_reason"].as_array().unwrap().len(),
        1,
        "{stream}"
    );
    assert_eq!(stream["usage_chunk_has_no_choices"], true, "{stream}");
    assert_eq!(
        stream["usage"]["completion_tokens"], stream["content_chunks"],
        "{stream}"
    );
    check_money(&cluster, stream["id"].as_str().unwrap(), &stream["usage"]).await;

    // Embeddings, as floats and as base64 (the SDK's default, decoded by the SDK).
    let embeddings = &seen["embeddings"];
    assert_eq!(embeddings["count"], 3, "{embeddings}");
    assert_eq!(
        embeddings["dims"], 384,
        "all-MiniLM-L6-v2's width: {embeddings}"
    );
    let (near, far) = (
        embeddings["paraphrase_cosine"].as_f64().unwrap(),
        embeddings["unrelated_cosine"].as_f64().unwrap(),
    );
    assert!(
        near > 0.8 && far < 0.4,
        "a sentence model puts a paraphrase near and an unrelated sentence far: {embeddings}"
    );
    assert_eq!(embeddings["base64_matches_float"], true, "{embeddings}");
    assert_eq!(embeddings["dimensions_64"], 64, "{embeddings}");
    let job_id = embeddings["id"]
        .as_str()
        .unwrap()
        .strip_prefix("embd-")
        .unwrap();
    let job = cluster
        .wait_for_end(job_id, Duration::from_secs(20))
        .await
        .unwrap();
    let billed = job.billed_usage.unwrap();
    assert_eq!(embeddings["prompt_tokens"], billed.input_units, "{job:?}");
    assert!(billed.input_units > 0);
    assert_eq!(billed.output_units, 0);
    assert_eq!(job.cost_micros, Some(billed.input_units as i64 * IN_MICROS));

    // Speech: a real WAV (espeak-ng on the node), not silent, billed per character.
    let speech = &seen["speech"];
    assert_eq!(speech["riff"], true, "{speech}");
    assert_eq!(speech["content_type"], "audio/wav");
    assert_eq!(speech["rate"], 22_050);
    assert_eq!(speech["channels"], 1);
    assert!(speech["seconds"].as_f64().unwrap() > 1.0, "{speech}");
    assert!(speech["rms"].as_f64().unwrap() > 100.0, "silent: {speech}");
    assert_eq!(speech["pcm_is_headerless"], true);
    assert!(speech["pcm_bytes"].as_u64().unwrap() > 10_000, "{speech}");
    let job_id = speech["id"]
        .as_str()
        .unwrap()
        .strip_prefix("speech-")
        .unwrap();
    let job = cluster
        .wait_for_end(job_id, Duration::from_secs(20))
        .await
        .unwrap();
    let chars = speech["chars"].as_u64().unwrap();
    assert_eq!(
        job.billed_usage.map(|u| u.input_units),
        Some(chars),
        "{job:?}"
    );
    assert_eq!(job.cost_micros, Some(chars as i64 * IN_MICROS));

    // Errors in OpenAI's shape, with the statuses the SDK acts on.
    assert_eq!(seen["bad_key"]["status"], 401, "{}", seen["bad_key"]);
    assert_eq!(seen["bad_key"]["code"], "invalid_api_key");
    assert_eq!(seen["no_model"]["status"], 404, "{}", seen["no_model"]);
    assert_eq!(seen["no_model"]["code"], "model_not_found");
    assert_eq!(seen["bad_param"]["status"], 400);
    assert_eq!(seen["bad_param"]["param"], "temperature");
    assert_eq!(seen["quota"]["status"], 429, "{}", seen["quota"]);
    assert_eq!(seen["quota"]["code"], "insufficient_quota");
    assert_eq!(seen["quota"]["should_retry"], "false");
    let rate = seen["rate"].as_array().unwrap();
    assert!(rate[0].is_null() && rate[1].is_null(), "{rate:?}");
    assert_eq!(rate[2]["status"], 429, "{rate:?}");
    assert_eq!(rate[2]["code"], "rate_limit_exceeded");
    assert!(
        rate[2]["retry_after"]
            .as_str()
            .is_some_and(|s| s.parse::<u64>().unwrap() >= 1)
    );

    // Tokens per minute are counted from what was served: one chat spends the key's 20.
    let tpm = seen["tpm"].as_array().unwrap();
    assert!(tpm[0].is_null(), "{tpm:?}");
    assert_eq!(tpm[1]["status"], 429, "{tpm:?}");
    assert_eq!(tpm[1]["code"], "rate_limit_exceeded");
    assert!(
        tpm[1]["message"]
            .as_str()
            .is_some_and(|m| m.contains("20 tokens per minute")),
        "{tpm:?}"
    );

    // The refused requests held nothing: only the served ones (two chats, three embeddings, two
    // speeches, two chats within the rate limit, one within the token limit) were ever charged,
    // and the ledger agrees.
    let jobs = cluster
        .client()
        .job_list(Some("alice"), None, None)
        .await
        .unwrap();
    assert_eq!(jobs.jobs.len(), 10, "{:?}", jobs.jobs);

    // `rhizos chat`: the answer streamed, then its tokens, node and money.
    let rhizos = rhizos_testbed::build_dir().join("rhizos");
    // (tokio's process: the gateway runs on this test's own runtime thread.)
    let chat = |args: &[&str]| {
        let mut command = tokio::process::Command::new(&rhizos);
        command
            .args([
                "chat",
                "smollm2-135m",
                "Which city is the capital of France?",
            ])
            .args([
                "--gateway",
                &base,
                "--max-tokens",
                "16",
                "--temperature",
                "0",
            ])
            .args(args);
        async move { command.output().await }
    };
    let output = chat(&["--key", &good, "--json"]).await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(
        seen["content"].as_str().unwrap().contains("Paris"),
        "{seen}"
    );
    check_money(&cluster, seen["id"].as_str().unwrap(), &seen["usage"]).await;
    assert_eq!(seen["generation"]["node_id"], "node-0", "{seen}");
    let job = cluster
        .client()
        .job_get(
            seen["id"]
                .as_str()
                .unwrap()
                .strip_prefix("chatcmpl-")
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(seen["generation"]["cost_micros"], job.cost_micros.unwrap());
    let output = chat(&["--key", &good]).await.unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && text.contains("Paris"), "{text}");
    assert!(
        text.contains("completion tokens on node-0") && text.contains("refund:"),
        "{text}"
    );
    let output = chat(&["--key", "rhz_000000000000_nope"]).await.unwrap();
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && error.contains("HTTP 401"),
        "a bad key says so: {error}"
    );

    let report = cluster.client().ledger_verify().await.unwrap();
    assert!(report.ok, "{:?}", report.problems);

    // Prometheus metrics of the three daemons, scraped over HTTP as Prometheus (or curl) would.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    tokio::spawn(rhizos_core::metrics::serve(
        listener,
        vec![
            cluster.orchestrator.metrics_source(),
            cluster.agents[0].metrics_source(),
            gateway.metrics_source(),
        ],
        std::future::pending(),
    ));
    let text = tokio::task::spawn_blocking(move || {
        ureq::get(&url)
            .call()
            .unwrap()
            .into_body()
            .read_to_string()
            .unwrap()
    })
    .await
    .unwrap();
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{series} not in the metrics:\n{text}"))
            .parse()
            .unwrap()
    };
    let jobs = cluster
        .client()
        .job_list(Some("alice"), None, None)
        .await
        .unwrap()
        .jobs;
    let succeeded = jobs
        .iter()
        .filter(|j| j.state == JobState::Succeeded)
        .count();
    assert_eq!(value("rhizos_jobs{state=\"succeeded\"}"), succeeded as f64);
    assert!(value("rhizos_heartbeats_total") > 0.0);
    assert!(value("rhizos_ledger_commit_seconds_count") > 0.0);
    assert!(value("rhizos_job_submit_to_running_seconds_count") >= succeeded as f64);
    assert!(
        value("rhizos_orchestrator_requests_total{op=\"job.submit\",outcome=\"ok\"}")
            >= succeeded as f64
    );
    // Alice's jobs are the only ones: the platform's fees are theirs.
    let fees: i64 = jobs.iter().filter_map(|j| j.fee_micros).sum();
    assert!(fees > 0);
    assert_eq!(value("rhizos_fees_micros"), fees as f64);
    assert_eq!(
        value("rhizos_escrow_held_micros"),
        0.0,
        "everything settled"
    );
    assert_eq!(value("rhizos_nodes{status=\"live\"}"), 1.0);
    // `network.stats` (what `rhizos top` shows) agrees with the ledger: every job here is an AI
    // request, and its tokens are the units billed.
    let stats = cluster.client().network_stats(None).await.unwrap();
    let billed = |f: fn(&rhizos_broker::wire::Metered) -> u64| -> u64 {
        jobs.iter()
            .filter_map(|j| j.billed_usage.as_ref())
            .map(f)
            .sum()
    };
    assert_eq!(stats.ai_requests, jobs.len() as u64, "{stats:?}");
    assert_eq!(stats.ai_input_units, billed(|m| m.input_units), "{stats:?}");
    assert_eq!(
        stats.ai_output_units,
        billed(|m| m.output_units),
        "{stats:?}"
    );
    assert_eq!(stats.fees_micros, Some(fees));
    assert_eq!(
        stats.jobs_by_state.get("succeeded").copied(),
        Some(succeeded as u64)
    );
    let own = alice.network_stats(Some("alice")).await.unwrap();
    assert_eq!(
        (own.ai_requests, own.fees_micros),
        (stats.ai_requests, None)
    );
    assert!(
        value("rhizos_agent_executions_total{backend=\"inference\",outcome=\"exited\"}")
            >= succeeded as f64
    );
    // The SDK and the CLI's chats (three served, two within the rpm limit, one within tpm).
    assert_eq!(
        value(
            "rhizos_gateway_requests_total{model=\"smollm2-135m\",outcome=\"served\",route=\"chat\"}"
        ),
        7.0
    );
    assert!(
        value("rhizos_gateway_tokens_total{direction=\"output\",model=\"smollm2-135m\"}") > 0.0
    );
    assert_eq!(
        value("rhizos_gateway_errors_total{code=\"rate_limit_exceeded\",model=\"smollm2-135m\"}"),
        2.0
    );
    // The SDK retries what it may (max_retries 2 here): an empty wallet reached the gateway
    // exactly once, because the gateway said `x-should-retry: false`.
    assert_eq!(
        value("rhizos_gateway_errors_total{code=\"insufficient_quota\",model=\"smollm2-135m\"}"),
        1.0
    );
    assert!(value("rhizos_gateway_first_chunk_seconds_count{model=\"smollm2-135m\"}") >= 7.0);
}

/// A hand-rolled node serving `tiny` (it speaks the agent's side of the protocol itself).
const LIAR: &str = "liar-ai";

async fn gateway_over(cluster: &Cluster) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let gateway = Gateway::new(
        cluster.bus.clone(),
        rhizos_broker::config::GatewaySettings {
            listen: listener.local_addr().unwrap().to_string(),
            ..Default::default()
        },
    );
    tokio::spawn(gateway.serve(listener, std::future::pending()));
    base
}

/// POSTs `body` to `url` with `key`; the status and the body.
async fn post(url: String, key: String, body: serde_json::Value) -> (u16, serde_json::Value) {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let response = agent
            .post(&url)
            .header("Authorization", format!("Bearer {key}"))
            .send_json(&body)
            .unwrap();
        let status = response.status().as_u16();
        let text = response.into_body().read_to_string().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    })
    .await
    .unwrap()
}

/// Publishes one chunk of `job`'s response as `node`, attempt `attempt`, number `seq`.
async fn chunk(bus: &Bus, job: &str, node: &str, attempt: u32, seq: u64, body: serde_json::Value) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        rhizos_broker::wire::AI_ATTEMPT_HEADER,
        attempt.to_string().as_str(),
    );
    headers.insert(rhizos_broker::wire::AI_SEQ_HEADER, seq.to_string().as_str());
    bus.client
        .publish_with_headers(
            bus.subjects.ai_stream(job, node).unwrap(),
            headers,
            body.to_string().into(),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_lying_node_bills_only_what_the_gateway_delivered_and_no_other_node_can_inject_text() {
    use rhizos_broker::wire::{self, ExecutionOutcome, Metered, ReportPhase};
    let cluster = Cluster::start(ClusterOptions {
        agents: 0,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let bus = cluster.bus.clone();
    let mut assignments = bus
        .client
        .subscribe(bus.subjects.job_assign(LIAR).unwrap())
        .await
        .unwrap();
    let mut registration = crate::common::hand_rolled_registration(LIAR, "liar-provider");
    registration.backends = vec!["openai".into()];
    registration.models = vec![wire::ModelOffer {
        backend: "openai".into(),
        service: "chat".into(),
        name: "tiny".into(),
        context_length: 512,
        warm: true,
        input_million_micros: 1_000_000,
        output_million_micros: 2_000_000,
    }];
    bus.call(&registration).await.unwrap();
    let (_held, beats) = tokio::sync::watch::channel(vec![]);
    let _heartbeat = crate::fairness::heartbeat_as(&bus, LIAR, beats);
    cluster.funded_account("alice", USD).await.unwrap();
    let key = key(&cluster.client(), None, None).await;
    let base = gateway_over(&cluster).await;

    let request = tokio::spawn(post(
        format!("{base}/chat/completions"),
        key.clone(),
        serde_json::json!({"model": "tiny", "max_tokens": 10,
                           "messages": [{"role": "user", "content": "Say three words."}]}),
    ));
    let message = crate::fairness::next_assignment(&mut assignments).await;
    let running = crate::fairness::accept_as(&bus, LIAR, message).await;
    let (job, attempt) = (running.job_id.clone(), running.attempt);
    // Another node tries to put words in the answer: not the job's node, dropped.
    chunk(
        &bus,
        &job,
        "intruder",
        attempt,
        0,
        serde_json::json!({"content": "INJECTED "}),
    )
    .await;
    for (seq, word) in ["one ", "two ", "three"].iter().enumerate() {
        chunk(
            &bus,
            &job,
            LIAR,
            attempt,
            seq as u64,
            serde_json::json!({"content": word}),
        )
        .await;
    }
    chunk(
        &bus,
        &job,
        LIAR,
        attempt,
        3,
        serde_json::json!({"finish_reason": "stop"}),
    )
    .await;
    // It claims a huge prompt and 500 tokens: the gateway delivered 3.
    let claimed = Metered {
        input_units: 999_999,
        output_units: 500,
    };
    let end = wire::StreamEnd {
        v: WIRE_VERSION,
        attempt,
        chunks: 4,
        kind: wire::ExitKind::Exited,
        message: None,
        usage: Some(claimed),
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(wire::AI_ATTEMPT_HEADER, attempt.to_string().as_str());
    let answered = bus
        .client
        .send_request(
            bus.subjects.ai_stream(&job, LIAR).unwrap(),
            async_nats::Request::new()
                .headers(headers)
                .payload(wire::encode(&end))
                .timeout(Some(Duration::from_secs(5))),
        )
        .await
        .unwrap();
    let ack: wire::Reply<wire::Ack> = wire::decode(&answered.payload, 64 * 1024).unwrap();
    assert!(ack.data.unwrap().accepted, "the witness was recorded first");
    let mut outcome = ExecutionOutcome::exited(0, 50);
    outcome.usage = Some(claimed);
    let report = JobReport {
        phase: ReportPhase::Finished { outcome },
        ..running
    };
    assert!(bus.call(&report).await.unwrap().accepted);

    let (status, body) = request.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "one two three");
    assert_eq!(body["usage"]["completion_tokens"], 3, "{body}");
    let job = cluster
        .wait_for_end(&job, Duration::from_secs(10))
        .await
        .unwrap();
    let billed = job.billed_usage.unwrap();
    assert_eq!(job.reported_usage, Some(claimed));
    assert_eq!(billed.output_units, 3, "billed what was delivered");
    // The prompt's bound: its bytes + role + 8 per message + 16.
    let bound = ("Say three words.".len() + "user".len() + 8 + 16) as u64;
    assert_eq!(
        billed.input_units, bound,
        "billed no more than the prompt can be"
    );
    let cost = bound as i64 * IN_MICROS + 3 * OUT_MICROS;
    assert_eq!(job.cost_micros, Some(cost));
    assert_eq!(job.refund_micros, Some(job.max_cost_micros - cost));
    assert_eq!(
        job.max_cost_micros,
        bound as i64 * IN_MICROS + 10 * OUT_MICROS
    );
    // Its claim was far beyond what was delivered: counted against it.
    let outcome: String = rusqlite::Connection::open(cluster.ledger_path())
        .unwrap()
        .query_row(
            "SELECT outcome FROM attempts WHERE job_id = ?1",
            [&job.job_id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(outcome, "overbilled");

    // A node that reports without ending its stream (so without the gateway's witness) is
    // paid nothing, and the client is told the answer did not complete.
    let request = tokio::spawn(post(
        format!("{base}/chat/completions"),
        key.clone(),
        serde_json::json!({"model": "tiny", "max_tokens": 10, "stream": true,
                           "messages": [{"role": "user", "content": "Again."}]}),
    ));
    let message = crate::fairness::next_assignment(&mut assignments).await;
    let running = crate::fairness::accept_as(&bus, LIAR, message).await;
    let job = running.job_id.clone();
    chunk(
        &bus,
        &job,
        LIAR,
        running.attempt,
        0,
        serde_json::json!({"content": "hi"}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut outcome = ExecutionOutcome::exited(0, 50);
    outcome.usage = Some(Metered {
        input_units: 5,
        output_units: 1,
    });
    let report = JobReport {
        phase: ReportPhase::Finished { outcome },
        ..running
    };
    assert!(bus.call(&report).await.unwrap().accepted);
    let ended = cluster
        .wait_for_end(&job, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(ended.cost_micros, Some(0), "{ended:?}");
    assert_eq!(ended.refund_micros, Some(ended.max_cost_micros));
    let (status, body) = request.await.unwrap();
    assert_eq!(status, 200);
    let text = body.as_str().unwrap();
    assert!(text.contains("\"content\":\"hi\""), "{text}");
    assert!(
        text.contains("\"error\""),
        "the stream ends with an error event: {text}"
    );
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let report = cluster.client().ledger_verify().await.unwrap();
    assert!(report.ok, "{:?}", report.problems);
}

#[tokio::test]
async fn a_node_whose_model_server_dies_before_the_first_token_is_replaced_and_billed_once() {
    let model = ai::chat_model().unwrap();
    let mut dying = LlamaServer::start(&model, "smollm2", &[]).unwrap();
    let healthy = LlamaServer::start(&model, "smollm2", &[]).unwrap();
    // Node 0 checks its server rarely: it still offers the model after the server died.
    let (cluster, base) = ai_network_of(vec![
        openai_config(&dying, 600_000),
        openai_config(&healthy, 2_000),
    ])
    .await;
    cluster.funded_account("alice", USD).await.unwrap();
    let alice = cluster.client_as(&Caller::user("alice")).await.unwrap();
    let key = key(&alice, None, None).await;
    dying.kill();

    // Equal nodes take turns: within two requests one lands on node 0 first.
    let mut moved = None;
    for _ in 0..2 {
        let (status, body) = post(
            format!("{base}/chat/completions"),
            key.clone(),
            serde_json::json!({"model": "smollm2-135m", "max_tokens": 8, "temperature": 0,
                               "messages": [{"role": "user", "content": "Which city is the capital of France?"}]}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let job_id = body["id"]
            .as_str()
            .unwrap()
            .strip_prefix("chatcmpl-")
            .unwrap()
            .to_owned();
        let job = cluster
            .wait_for_end(&job_id, Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
        assert_eq!(
            job.node_id.as_deref(),
            Some("node-1"),
            "served by the live node: {job:?}"
        );
        check_money(&cluster, body["id"].as_str().unwrap(), &body["usage"]).await;
        if job.attempt == 2 {
            moved = Some(job);
        }
    }
    let moved = moved.expect("one request was first given to the node whose server died");
    // Billed once: the failed attempt paid nothing (one settlement, to node 1's provider).
    let statement = cluster
        .client()
        .account_statement("provider-0", Some(50))
        .await;
    assert!(
        statement.map_or(true, |s| s.lines.is_empty()),
        "node 0 was paid for an answer it never gave"
    );
    assert!(moved.cost_micros.unwrap() > 0);
    let report = cluster.client().ledger_verify().await.unwrap();
    assert!(report.ok, "{:?}", report.problems);
}

/// Streams a chat of up to `max_tokens` and reads it until `stop_after` content deltas came;
/// then `at_stop` runs and the rest of the stream is read (`None`: the client hangs up there).
/// The response id, the deltas read and the rest of the body.
async fn stream_until(
    url: String,
    key: String,
    max_tokens: u32,
    stop_after: usize,
    at_stop: Option<Box<dyn FnOnce() + Send>>,
) -> (String, usize, String) {
    tokio::task::spawn_blocking(move || {
        use std::io::BufRead as _;
        let response = ureq::post(&url)
            .header("Authorization", format!("Bearer {key}"))
            .send_json(serde_json::json!({
                "model": "smollm2-135m", "max_tokens": max_tokens, "temperature": 0, "stream": true,
                "messages": [{"role": "user", "content": "Write a long story about a dragon who learns to sail."}]
            }))
            .unwrap();
        let lines = std::io::BufReader::new(response.into_body().into_reader()).lines();
        let (mut deltas, mut id, mut rest) = (0, String::new(), String::new());
        let mut at_stop = at_stop;
        for line in lines {
            let line = line.expect("the stream reads");
            if let Some(data) = line.strip_prefix("data: ")
                && let Ok(chunk) = serde_json::from_str::<serde_json::Value>(data)
            {
                if let Some(chunk_id) = chunk["id"].as_str() {
                    id = chunk_id.to_owned();
                }
                if chunk["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty())
                {
                    deltas += 1;
                }
            }
            if deltas < stop_after {
                continue;
            }
            if deltas == stop_after && rest.is_empty() {
                match at_stop.take() {
                    Some(at_stop) => at_stop(),
                    None => return (id, deltas, rest),
                }
            }
            rest.push_str(&line);
            rest.push('\n');
        }
        (id, deltas, rest)
    })
    .await
    .unwrap()
}

/// The money of a metered job that ended with `billed` units at the cluster's prices.
fn assert_charged(job: &rhizos_broker::wire::JobView) {
    let billed = job.billed_usage.expect("billed units");
    let cost = billed.input_units as i64 * IN_MICROS + billed.output_units as i64 * OUT_MICROS;
    assert_eq!(job.cost_micros, Some(cost), "{job:?}");
    let fee = (cost * 500 + 5_000) / 10_000;
    assert_eq!(job.fee_micros, Some(fee), "{job:?}");
    assert_eq!(job.provider_micros, Some(cost - fee), "{job:?}");
    assert_eq!(
        job.refund_micros,
        Some(job.max_cost_micros - cost),
        "{job:?}"
    );
}

#[tokio::test]
async fn a_node_failing_after_the_first_token_is_paid_what_it_delivered_and_nobody_answers_twice() {
    let model = ai::chat_model().unwrap();
    let dying = LlamaServer::start(&model, "smollm2", &[]).unwrap();
    let (cluster, base) = ai_network_of(vec![openai_config(&dying, 600_000)]).await;
    cluster.funded_account("alice", USD).await.unwrap();
    let alice = cluster.client_as(&Caller::user("alice")).await.unwrap();
    let key = key(&alice, None, None).await;
    let job_of = |id: &str| id.strip_prefix("chatcmpl-").expect("a chat id").to_owned();

    // A client hanging up mid-answer: the node is paid for what the gateway delivered.
    let (id, read, _) = stream_until(
        format!("{base}/chat/completions"),
        key.clone(),
        200,
        3,
        None,
    )
    .await;
    assert_eq!(read, 3);
    let hung_up = cluster
        .wait_for_end(&job_of(&id), Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(hung_up.state, JobState::Cancelled, "{hung_up:?}");
    let billed = hung_up.billed_usage.expect("billed units");
    assert!(
        billed.output_units >= 3 && billed.output_units < 200,
        "billed what was delivered before the client left: {hung_up:?}"
    );
    assert_charged(&hung_up);

    // The model server dies after the first tokens: the client gets an error event, the node
    // is paid for the deltas delivered, and the job is not given to anyone again.
    let mut dying = Some(dying);
    let (id, delivered, rest) = stream_until(
        format!("{base}/chat/completions"),
        key.clone(),
        200,
        3,
        Some(Box::new(move || {
            if let Some(mut server) = dying.take() {
                server.kill();
            }
        })),
    )
    .await;
    assert!(rest.contains("\"error\""), "an error event ends it: {rest}");
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    let broken = cluster
        .wait_for_end(&job_of(&id), Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(broken.state, JobState::Failed, "{broken:?}");
    assert_eq!(
        broken.attempt, 1,
        "not requeued after text went out: {broken:?}"
    );
    let billed = broken.billed_usage.expect("billed units");
    assert_eq!(
        billed.output_units, delivered as u64,
        "paid exactly the deltas the client got: {broken:?}"
    );
    assert_charged(&broken);
    assert!(broken.cost_micros.unwrap() > 0);
    let report = cluster.client().ledger_verify().await.unwrap();
    assert!(report.ok, "{:?}", report.problems);
}

#[tokio::test]
async fn the_ollama_backend_pulls_its_model_and_serves_it_with_options_where_ollama_wants_them() {
    let llama = LlamaServer::start(&ai::chat_model().unwrap(), "smollm2", &[]).unwrap();
    let ollama = ai::OllamaDouble::start(&llama, &[]).unwrap();
    let mut plugin_config = std::collections::BTreeMap::new();
    plugin_config.insert(
        "ollama".to_owned(),
        serde_json::json!({"base_url": ollama.base_url(), "check_ms": 200,
            "models": [{"name": "smollm2:135m", "service": "chat", "context_length": 1024}]}),
    );
    let cluster = Cluster::start(ClusterOptions {
        agents: 1,
        secure: true,
        plugin_files: vec![rhizos_testbed::plugin_file("rhizos_plugin_ollama").unwrap()],
        plugin_config,
        heartbeat_interval_ms: 300,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    // Not present at first: the plugin pulls it, then the node offers it (cold).
    let client = cluster.client();
    let until = std::time::Instant::now() + Duration::from_secs(20);
    let model = loop {
        let models = client.model_list().await.unwrap().models;
        if let Some(m) = models.into_iter().find(|m| m.name == "smollm2:135m") {
            break m;
        }
        assert!(
            std::time::Instant::now() < until,
            "never offered after its pull"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((model.service.as_str(), model.warm_nodes), ("chat", 0));
    let base = gateway_over_as(&cluster).await;
    cluster.funded_account("alice", USD).await.unwrap();
    let alice = cluster.client_as(&Caller::user("alice")).await.unwrap();
    let key = key(&alice, None, None).await;

    let (status, body) = post(
        format!("{base}/chat/completions"),
        key.clone(),
        serde_json::json!({"model": "smollm2:135m", "max_tokens": 8, "temperature": 0, "seed": 4,
                           "messages": [{"role": "user", "content": "Which city is the capital of France?"}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{body}"
    );
    // OpenAI's parameters reached Ollama as Ollama wants them.
    let last: serde_json::Value = tokio::task::spawn_blocking({
        let url = format!("{}/_double/last_chat", ollama.base_url());
        move || {
            ureq::get(&url)
                .call()
                .unwrap()
                .into_body()
                .read_json()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(last["options"]["num_predict"], 8, "{last}");
    assert_eq!(last["options"]["temperature"].as_f64(), Some(0.0), "{last}");
    assert_eq!(last["options"]["seed"], 4, "{last}");
    assert!(last.get("max_tokens").is_none());
    // Billed by Ollama's counts, bounded by what the gateway delivered.
    check_money(&cluster, body["id"].as_str().unwrap(), &body["usage"]).await;
    // Loaded now: warm once the plugin has seen /api/ps say so.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while client.model_list().await.unwrap().models[0].warm_nodes == 0 {
        assert!(std::time::Instant::now() < until, "never warm");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A gateway with gateway credentials on a secure cluster.
async fn gateway_over_as(cluster: &Cluster) -> String {
    let bus = Bus::connect(&cluster.settings_as(&Caller::gateway("gw")).unwrap())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let settings = rhizos_broker::config::GatewaySettings {
        listen: listener.local_addr().unwrap().to_string(),
        ..Default::default()
    };
    tokio::spawn(Gateway::new(bus, settings).serve(listener, std::future::pending()));
    base
}

/// A local web server answering every request with `html` (and `/moved` with a redirect to
/// `/page`), on a free loopback port.
fn web_page(html: &'static str) -> u16 {
    use std::io::{BufRead as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            let _ = reader.read_line(&mut request);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let mut stream = stream;
            let response = if request.contains(" /moved ") {
                format!(
                    "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}/page\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{html}",
                    html.len()
                )
            };
            let _ = stream.write_all(response.as_bytes());
        }
    });
    port
}

/// A secure one-node network with the scrape plugin (`allow_private` as given) and a gateway.
async fn scrape_network(allow_private: bool) -> (Cluster, String, String) {
    let mut plugin_config = std::collections::BTreeMap::new();
    plugin_config.insert(
        "scrape".to_owned(),
        serde_json::json!({"allow_private": allow_private}),
    );
    let cluster = Cluster::start(ClusterOptions {
        agents: 1,
        secure: true,
        plugin_files: vec![rhizos_testbed::plugin_file("rhizos_plugin_scrape").unwrap()],
        plugin_config,
        heartbeat_interval_ms: 300,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let base = gateway_over_as(&cluster).await;
    cluster.funded_account("alice", USD).await.unwrap();
    let alice = cluster.client_as(&Caller::user("alice")).await.unwrap();
    let key = key(&alice, None, None).await;
    (cluster, base, key)
}

#[tokio::test]
async fn scrape_turns_pages_into_markdown_per_page_and_refuses_private_addresses_after_dns() {
    let port = web_page(
        "<html><head><title>RhizOS news</title><script>evil()</script></head>\
         <body><h1>Compute for all</h1><p>Nodes <b>earn</b> per <a href=\"/jobs\">job</a>.</p></body></html>",
    );
    // An operator who allows private addresses (a lab): the page comes back as markdown.
    let (cluster, base, key) = scrape_network(true).await;
    let (status, body) = post(
        format!("{base}/scrape"),
        key.clone(),
        serde_json::json!({"urls": [format!("http://127.0.0.1:{port}/moved"), "http://127.0.0.1:1/closed"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{body}");
    assert_eq!(results[0]["ok"], true, "{body}");
    assert_eq!(results[0]["title"], "RhizOS news");
    assert_eq!(
        results[0]["final_url"],
        format!("http://127.0.0.1:{port}/page")
    );
    let markdown = results[0]["content"].as_str().unwrap();
    assert!(markdown.contains("# Compute for all"), "{markdown}");
    assert!(
        markdown.contains("**earn**") && markdown.contains("[job](/jobs)"),
        "{markdown}"
    );
    assert!(
        !markdown.contains("evil"),
        "scripts are dropped: {markdown}"
    );
    assert_eq!(results[1]["ok"], false);
    assert!(
        results[1]["error"]
            .as_str()
            .unwrap()
            .contains("fetching failed"),
        "{body}"
    );
    // Billed: 2 URLs asked (input) and 1 page fetched (output), to the micro.
    let job_id = body["id"]
        .as_str()
        .unwrap()
        .strip_prefix("scrape-")
        .unwrap();
    let job = cluster
        .wait_for_end(job_id, Duration::from_secs(10))
        .await
        .unwrap();
    let billed = job.billed_usage.unwrap();
    assert_eq!((billed.input_units, billed.output_units), (2, 1), "{job:?}");
    assert_eq!(job.cost_micros, Some(2 * IN_MICROS + OUT_MICROS));
    assert_eq!(body["usage"]["pages"], 1);
    // As text: no markup.
    let (_, text) = post(
        format!("{base}/scrape"),
        key,
        serde_json::json!({"urls": [format!("http://127.0.0.1:{port}/page")], "format": "text"}),
    )
    .await;
    let content = text["results"][0]["content"].as_str().unwrap();
    assert!(content.contains("Nodes earn per job."), "{content}");
    drop(cluster);

    // The default: loopback, private and metadata addresses are refused — by address and by a
    // name that resolves to one — and nothing is fetched or billed as a page.
    let (cluster, base, key) = scrape_network(false).await;
    let (status, body) = post(
        format!("{base}/scrape"),
        key.clone(),
        serde_json::json!({"urls": [
            format!("http://127.0.0.1:{port}/page"),
            format!("http://localhost:{port}/page"),
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]/",
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for result in body["results"].as_array().unwrap() {
        assert_eq!(result["ok"], false, "{result}");
        assert!(
            result["error"]
                .as_str()
                .unwrap()
                .contains("private or reserved address: refused"),
            "{result}"
        );
    }
    let job_id = body["id"]
        .as_str()
        .unwrap()
        .strip_prefix("scrape-")
        .unwrap();
    let job = cluster
        .wait_for_end(job_id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(job.billed_usage.unwrap().output_units, 0);
    // Not even asked of a node: another scheme is a bad request.
    let (status, body) = post(
        format!("{base}/scrape"),
        key,
        serde_json::json!({"urls": ["file:///etc/passwd"]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "urls");
    let report = cluster.client().ledger_verify().await.unwrap();
    assert!(report.ok, "{:?}", report.problems);
}
