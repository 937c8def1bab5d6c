//! `rhizos models` (what the network serves, from the bus) and `rhizos chat` (a question to a
//! model through the AI gateway's OpenAI-compatible HTTP API, streamed as it is generated).

use crate::GlobalArgs;
use anyhow::Context as _;
use clap::Args;
use rhizos_broker::wire::format_usd;
use std::io::{BufRead, BufReader, Write};

pub async fn models(global: &GlobalArgs) -> anyhow::Result<()> {
    let client = global.client().await?;
    let list = client.model_list().await?;
    if global.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if list.models.is_empty() {
        println!(
            "no models are served now: a node serves them through a backend such as openai \
             ([agent.plugins.openai] base_url and models) or ollama"
        );
        return Ok(());
    }
    println!(
        "{:<28} {:<11} {:>5} {:>5} {:>8} {:>16} {:>16}",
        "MODEL", "SERVICE", "NODES", "WARM", "CONTEXT", "IN $/1M", "OUT $/1M"
    );
    for m in &list.models {
        let range = |lo: u64, hi: u64| {
            if lo == hi {
                format_usd(hi as i64)
            } else {
                format!("{}–{}", format_usd(lo as i64), format_usd(hi as i64))
            }
        };
        println!(
            "{:<28} {:<11} {:>5} {:>5} {:>8} {:>16} {:>16}",
            m.name,
            m.service,
            m.nodes,
            m.warm_nodes,
            m.context_length,
            range(m.input_million_micros_min, m.input_million_micros_max),
            range(m.output_million_micros_min, m.output_million_micros_max)
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct ChatArgs {
    /// The model (see `rhizos models`).
    model: String,
    /// The question.
    prompt: String,
    /// The gateway's base URL.
    #[arg(
        long,
        env = "RHIZOS_GATEWAY_URL",
        default_value = "http://127.0.0.1:8080/v1"
    )]
    gateway: String,
    /// An API key of the account to charge (`rhizos key create`).
    #[arg(long, env = "RHIZOS_API_KEY", hide_env_values = true)]
    key: String,
    /// Most tokens to generate (the request's hold is made for them).
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    #[arg(long)]
    temperature: Option<f64>,
    /// A system message before the prompt.
    #[arg(long)]
    system: Option<String>,
}

/// Streams the answer to stdout, then prints what it used and cost (from `/v1/generation`).
pub async fn chat(global: &GlobalArgs, args: ChatArgs) -> anyhow::Result<()> {
    let json = global.json;
    tokio::task::spawn_blocking(move || chat_blocking(args, json)).await?
}

fn chat_blocking(args: ChatArgs, json: bool) -> anyhow::Result<()> {
    let base = args.gateway.trim_end_matches('/').to_owned();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(serde_json::json!({"role": "system", "content": system}));
    }
    messages.push(serde_json::json!({"role": "user", "content": args.prompt}));
    let mut body = serde_json::json!({
        "model": args.model, "messages": messages, "max_tokens": args.max_tokens,
        "stream": true, "stream_options": {"include_usage": true},
    });
    if let Some(t) = args.temperature {
        body["temperature"] = t.into();
    }
    let response = agent
        .post(format!("{base}/chat/completions"))
        .header("Authorization", format!("Bearer {}", args.key))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .with_context(|| {
            format!("the gateway at {base} does not answer (is `rhizos up` running?)")
        })?;
    let status = response.status().as_u16();
    if status != 200 {
        let text = response.into_body().read_to_string().unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or(text);
        anyhow::bail!("the gateway refused the request (HTTP {status}): {message}");
    }
    let (mut id, mut usage, mut content) = (String::new(), serde_json::Value::Null, String::new());
    let mut out = std::io::stdout();
    for line in BufReader::new(response.into_body().into_reader()).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let event: serde_json::Value = serde_json::from_str(data)?;
        if let Some(message) = event["error"]["message"].as_str() {
            anyhow::bail!("the answer broke off: {message}");
        }
        if let Some(text) = event["id"].as_str() {
            id = text.to_owned();
        }
        if let Some(delta) = event["choices"][0]["delta"]["content"].as_str() {
            content.push_str(delta);
            if !json {
                write!(out, "{delta}")?;
                out.flush()?;
            }
        }
        if event["usage"].is_object() {
            usage = event["usage"].clone();
        }
    }
    // The bill settles right after the answer: ask for it.
    let mut generation = serde_json::Value::Null;
    for _ in 0..50 {
        let response = agent
            .get(format!("{base}/generation?id={id}"))
            .header("Authorization", format!("Bearer {}", args.key))
            .call()?;
        generation = serde_json::from_str(&response.into_body().read_to_string()?)?;
        if generation["cost_micros"].is_i64() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"id": id, "content": content, "usage": usage, "generation": generation})
        );
        return Ok(());
    }
    println!();
    let micros = |field: &str| {
        generation[field]
            .as_i64()
            .map_or("—".to_owned(), format_usd)
    };
    println!(
        "\n{id}: {} prompt + {} completion tokens on {}\n  held:     {}\n  cost:     {}\n  provider: {}\n  fee:      {}\n  refund:   {}",
        usage["prompt_tokens"],
        usage["completion_tokens"],
        generation["node_id"].as_str().unwrap_or("?"),
        micros("held_micros"),
        micros("cost_micros"),
        micros("provider_micros"),
        micros("fee_micros"),
        micros("refund_micros"),
    );
    Ok(())
}
