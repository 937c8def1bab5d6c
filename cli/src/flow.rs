//! `rhizos flow check FLOW` and `rhizos flow estimate FLOW`: a flow file (TOML or JSON, the
//! format of `rhizos_broker::wire::FlowSpec`) checked offline — every error names the step and
//! the field, a cycle is refused naming its steps — and priced on the nodes online now.

use crate::GlobalArgs;
use anyhow::Context as _;
use clap::Subcommand;
use rhizos_broker::wire::{FlowSpec, format_usd};
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
}

pub async fn run(global: &GlobalArgs, command: FlowCommand) -> anyhow::Result<()> {
    match command {
        FlowCommand::Check { flow } => check(global, &flow),
        FlowCommand::Estimate { flow } => estimate(global, &flow).await,
    }
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
