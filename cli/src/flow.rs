//! `rhizos flow check|estimate|run|get|list|cancel`: a flow file (TOML or JSON, the format of
//! `rhizos_broker::wire::FlowSpec`) checked offline — every error names the step and the field,
//! a cycle is refused naming its steps — priced on the nodes online now, run with its budget
//! held in one escrow, watched, listed and cancelled.

use crate::GlobalArgs;
use anyhow::Context as _;
use clap::Subcommand;
use rhizos_broker::wire::{FlowSpec, FlowView, format_usd};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum FlowCommand {
    /// Check FLOW (a .toml or .json file) without the network: its fields, its edges, no
    /// cycle; print its stages (the steps in a stage can run at the same time).
    Check { flow: PathBuf },
    /// Price FLOW's steps on the nodes online now: per step the live nodes that can run it and
    /// the most one run costs on the cheapest and the dearest of them; for the flow the
    /// cheapest total and the worst case (every retry on the dearest nodes) against its
    /// max_cost_micros. Modules are resolved as a run would.
    Estimate { flow: PathBuf },
    /// Run FLOW paid from ACCOUNT: its max_cost_micros is held in one escrow, steps run as
    /// their inputs are ready (independent ones at the same time, on whichever nodes match),
    /// each step's cost is settled from the escrow and what is left goes back when the flow
    /// ends. Prints the flow id; with --wait, each step's progress until the flow ends.
    Run {
        flow: PathBuf,
        /// The paying account (yours).
        #[arg(long)]
        account: String,
        /// Choose the flow's id ([a-z0-9_-], at most 40): running the same file again with
        /// it starts the flow once.
        #[arg(long)]
        id: Option<String>,
        /// Follow the flow until it ends; exits non-zero unless it succeeded.
        #[arg(long)]
        wait: bool,
    },
    /// A flow and each of its steps: state, runs, job, exit code, cost, why.
    Get {
        flow_id: String,
        /// Follow it until it ends (as `run --wait`).
        #[arg(long)]
        wait: bool,
    },
    /// Your flows, newest first (the operator: ACCOUNT's, or everyone's).
    List {
        #[arg(long)]
        account: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Stop a flow: running steps are cancelled, the rest never start, and its escrow's rest
    /// is refunded once they have stopped.
    Cancel { flow_id: String },
}

pub async fn run(global: &GlobalArgs, command: FlowCommand) -> anyhow::Result<()> {
    match command {
        FlowCommand::Check { flow } => check(global, &flow),
        FlowCommand::Estimate { flow } => estimate(global, &flow).await,
        FlowCommand::Run {
            flow,
            account,
            id,
            wait,
        } => {
            let spec = read(&flow)?;
            spec.plan()
                .with_context(|| format!("{} is not a valid flow", flow.display()))?;
            let client = global.client_for(&account).await?;
            let view = client.flow_run(id.as_deref(), &account, spec).await?;
            if wait {
                follow(global, &client, view).await
            } else {
                show(global, &view)
            }
        }
        FlowCommand::Get { flow_id, wait } => {
            let client = global.client().await?;
            let view = client.flow_get(&flow_id).await?;
            if wait {
                follow(global, &client, view).await
            } else {
                show(global, &view)
            }
        }
        FlowCommand::List { account, limit } => {
            let client = match &account {
                Some(account) => global.client_for(account).await?,
                None => global.client().await?,
            };
            let list = client.flow_list(account.as_deref(), Some(limit)).await?;
            if global.json {
                println!("{}", serde_json::to_string(&list)?);
                return Ok(());
            }
            if list.flows.is_empty() {
                println!("no flows");
            }
            for flow in &list.flows {
                let done = flow.steps.iter().filter(|s| s.state.is_terminal()).count();
                println!(
                    "{:<28} {:<20} {:<10} {}/{} steps  {}",
                    flow.flow_id,
                    flow.name,
                    flow.state.as_str(),
                    done,
                    flow.steps.len(),
                    money(flow)
                );
            }
            Ok(())
        }
        FlowCommand::Cancel { flow_id } => {
            let view = global.client().await?.flow_cancel(&flow_id).await?;
            show(global, &view)
        }
    }
}

fn money(flow: &FlowView) -> String {
    match (flow.cost_micros, flow.refund_micros) {
        (Some(cost), Some(refund)) => format!(
            "cost {} · refunded {} of {}",
            format_usd(cost),
            format_usd(refund),
            format_usd(flow.max_cost_micros)
        ),
        _ => format!(
            "{} of {} left in escrow",
            format_usd(flow.escrow_micros),
            format_usd(flow.max_cost_micros)
        ),
    }
}

fn show(global: &GlobalArgs, flow: &FlowView) -> anyhow::Result<()> {
    if global.json {
        println!("{}", serde_json::to_string(flow)?);
        return Ok(());
    }
    println!(
        "flow {} ({}): {}{} — {}",
        flow.flow_id,
        flow.name,
        flow.state.as_str(),
        flow.reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default(),
        money(flow)
    );
    for step in &flow.steps {
        println!(
            "  {:<16} {:<9} runs {}{}{} cost {}{}",
            step.step,
            step.state.as_str(),
            step.runs,
            step.job_id
                .as_deref()
                .map(|j| format!("  job {j}"))
                .unwrap_or_default(),
            step.exit_code
                .map(|c| format!("  exit {c}"))
                .unwrap_or_default(),
            format_usd(step.cost_micros),
            step.reason
                .as_deref()
                .map(|r| format!("  — {r}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// Prints each step's changes until the flow ends (a line per change; `--json`: the flow
/// as JSON at the end); fails unless it succeeded.
async fn follow(
    global: &GlobalArgs,
    client: &rhizos_broker::Client,
    mut flow: FlowView,
) -> anyhow::Result<()> {
    let mut seen: Vec<(String, &'static str, u32)> = Vec::new();
    loop {
        if !global.json {
            for step in &flow.steps {
                let now = (step.step.clone(), step.state.as_str(), step.runs);
                if !seen.contains(&now) {
                    eprintln!(
                        "  {:<16} {}{}",
                        step.step,
                        step.state.as_str(),
                        step.reason
                            .as_deref()
                            .map(|r| format!(" — {r}"))
                            .unwrap_or_default()
                    );
                    seen.push(now);
                }
            }
        }
        if flow.state.is_terminal() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        flow = client.flow_get(&flow.flow_id).await?;
    }
    show(global, &flow)?;
    anyhow::ensure!(
        flow.state == rhizos_broker::wire::FlowState::Succeeded,
        "flow {} ended {}{}",
        flow.flow_id,
        flow.state.as_str(),
        flow.reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    );
    Ok(())
}

/// Reads a flow file: TOML when it ends in `.toml`, JSON otherwise.
pub fn read(path: &Path) -> anyhow::Result<FlowSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the flow file {}", path.display()))?;
    let toml = path.extension().is_some_and(|e| e == "toml");
    let parsed = if toml {
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{e}"))
    } else {
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{e}"))
    };
    parsed.with_context(|| {
        format!(
            "{} is not a flow ({}: README, Flows, has the format)",
            path.display(),
            if toml { "TOML" } else { "JSON" }
        )
    })
}

fn check(global: &GlobalArgs, path: &Path) -> anyhow::Result<()> {
    let flow = read(path)?;
    let plan = flow
        .plan()
        .with_context(|| format!("{} is not a valid flow", path.display()))?;
    if global.json {
        println!(
            "{}",
            serde_json::json!({ "flow": flow.name, "stages": plan.stages, "edges": flow.edges.len() })
        );
        return Ok(());
    }
    println!(
        "flow {}: {} steps, {} edges, max cost {}",
        flow.name,
        flow.steps.len(),
        flow.edges.len(),
        format_usd(flow.max_cost_micros)
    );
    for (i, stage) in plan.stages.iter().enumerate() {
        println!("  stage {}: {}", i + 1, stage.join(", "));
    }
    Ok(())
}

async fn estimate(global: &GlobalArgs, path: &Path) -> anyhow::Result<()> {
    let flow = read(path)?;
    // Checked here first: the same errors, without a round trip.
    flow.plan()
        .with_context(|| format!("{} is not a valid flow", path.display()))?;
    let estimate = global.client().await?.flow_estimate(flow).await?;
    if global.json {
        println!("{}", serde_json::to_string(&estimate)?);
        return Ok(());
    }
    println!(
        "flow {}: cheapest {} · worst case {} · max cost {} — {}",
        estimate.flow,
        format_usd(estimate.cheapest_micros),
        format_usd(estimate.worst_case_micros),
        format_usd(estimate.max_cost_micros),
        if estimate.fits {
            "fits"
        } else {
            "DOES NOT FIT: raise max_cost_micros, lower timeouts or retries, or wait for nodes"
        }
    );
    for step in &estimate.steps {
        let what = step.module.as_deref().unwrap_or(&step.backend);
        match &step.problem {
            Some(problem) => println!("  {:<16} {what}: no node now — {problem}", step.step),
            None => println!(
                "  {:<16} {what}: {} nodes, {} – {} a run, {} run{} at most",
                step.step,
                step.nodes,
                format_usd(step.cheapest_micros),
                format_usd(step.dearest_micros),
                step.runs,
                if step.runs == 1 { "" } else { "s" }
            ),
        }
    }
    Ok(())
}
