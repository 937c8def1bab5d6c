//! `rhizos module resolve URI`: what a `chain://` module resolves to, through the
//! orchestrator's resolver chain (the same resolution a job submitted with `--module` gets).

use crate::GlobalArgs;
use clap::Subcommand;
use rhizos_broker::wire::{ModuleRef, ResolveModule, ResolvedModule, WIRE_VERSION};

#[derive(Subcommand)]
pub enum ModuleCommand {
    /// Resolve chain://<id>[@<version>] and print its manifest: backend, artifact digest,
    /// default arguments and requirements, and which resolver answered.
    Resolve { uri: String },
}

pub async fn run(global: &GlobalArgs, command: ModuleCommand) -> anyhow::Result<()> {
    let ModuleCommand::Resolve { uri } = command;
    ModuleRef::parse(&uri).map_err(anyhow::Error::msg)?;
    let bus = global.bus().await?;
    let resolved: ResolvedModule = bus
        .request(
            bus.subjects.module_resolve(),
            &ResolveModule {
                v: WIRE_VERSION,
                uri,
            },
        )
        .await?;
    if global.json {
        println!("{}", serde_json::to_string(&resolved)?);
        return Ok(());
    }
    let m = &resolved.manifest;
    println!(
        "{} → chain://{}@{} (resolver {}{})",
        resolved.uri,
        m.id,
        m.version,
        resolved.resolver,
        if resolved.cached { ", cached" } else { "" }
    );
    if let Some(description) = &m.description {
        println!("  description:  {description}");
    }
    println!("  backend:      {}", m.backend);
    if let Some(image) = &m.artifact.image {
        println!("  image:        {image}");
    }
    if let Some(data) = &m.artifact.data_b64 {
        println!("  artifact:     {} bytes inline", data.len() / 4 * 3);
    }
    println!("  sha256:       {}", m.artifact.sha256);
    if !m.args.is_empty() {
        println!("  args:         {}", m.args.join(" "));
    }
    let r = &m.requirements;
    println!(
        "  requirements: {} MiB, {} core(s), {} GPU(s){}",
        r.memory_mib,
        r.cpu_cores,
        r.gpus,
        if r.min_vram_mib > 0 {
            format!(" with {} MiB VRAM", r.min_vram_mib)
        } else {
            String::new()
        }
    );
    if let Some(price) = m.price_hint_micros {
        println!("  price hint:   {}", crate::money::format_usd(price));
    }
    Ok(())
}
