//! `rhizos module resolve URI`: what a `chain://` module resolves to, through the
//! orchestrator's resolver chain (the same resolution a job submitted with `--module` gets).
//! `rhizos module pack SOURCE --out INDEX`: builds a registry index (for the `index` resolver)
//! from entries whose artifacts are local files, filling in their bytes and digests.

use crate::GlobalArgs;
use anyhow::Context as _;
use clap::Subcommand;
use rhizos_broker::wire::{self, ModuleManifest, ModuleRef};
use sha2::Digest as _;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum ModuleCommand {
    /// Resolve chain://<id>[@<version>] and print its manifest: backend, artifact digest,
    /// default arguments and requirements, and which resolver answered.
    Resolve { uri: String },
    /// Every module version the orchestrator's resolvers can enumerate (the first resolver
    /// listing an id@version wins, as in resolution), and those that cannot.
    List,
    /// Build a registry index from SOURCE: `{"modules": [manifest, …]}` where an artifact may
    /// be `{"file": "path"}` (relative to SOURCE) instead of `data_b64` + `sha256`; the file's
    /// bytes and SHA-256 are filled in and every entry is checked as a manifest. Works offline.
    Pack {
        source: PathBuf,
        /// Where to write the index (e.g. a directory the `index` resolver is granted).
        #[arg(long)]
        out: PathBuf,
    },
}

pub async fn run(global: &GlobalArgs, command: ModuleCommand) -> anyhow::Result<()> {
    let uri = match command {
        ModuleCommand::Resolve { uri } => uri,
        ModuleCommand::List => return list(global).await,
        ModuleCommand::Pack { source, out } => return pack(global, &source, &out),
    };
    ModuleRef::parse(&uri).map_err(anyhow::Error::msg)?;
    let resolved = global.client().await?.module_resolve(&uri).await?;
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
    if let Some(url) = &m.artifact.url {
        println!("  artifact:     {url} (fetched by nodes that allow its source)");
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

fn pack(global: &GlobalArgs, source: &Path, out: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(source)
        .with_context(|| format!("cannot read {}", source.display()))?;
    let mut index: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", source.display()))?;
    let base = source.parent().unwrap_or(Path::new("."));
    let entries = index
        .get_mut("modules")
        .and_then(serde_json::Value::as_array_mut)
        .with_context(|| format!("{}: no \"modules\" array", source.display()))?;
    let mut packed = Vec::new();
    let bar = if global.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(entries.len() as u64).with_style(
            indicatif::ProgressStyle::with_template("packing {pos}/{len} {wide_bar} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        )
    };
    for (position, entry) in entries.iter_mut().enumerate() {
        let name = entry_name(entry);
        bar.set_message(name.clone());
        bar.inc(1);
        let at = || format!("{} modules[{position}] ({name})", source.display());
        if let Some(file) = entry
            .pointer("/artifact/file")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
        {
            let path = base.join(&file);
            let bytes = std::fs::read(&path).with_context(|| {
                format!("{}: artifact.file {}: cannot read it", at(), path.display())
            })?;
            let digest: String = sha2::Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let artifact = entry
                .get_mut("artifact")
                .and_then(serde_json::Value::as_object_mut)
                .with_context(at)?;
            artifact.remove("file");
            artifact.insert("data_b64".into(), wire::b64_encode(&bytes).into());
            artifact.insert("sha256".into(), digest.into());
        }
        let manifest: ModuleManifest = serde_json::from_value(entry.clone())
            .with_context(|| format!("{}: not a module manifest", at()))?;
        packed.push(manifest);
    }
    bar.finish_and_clear();
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(out, serde_json::to_vec_pretty(&index)?)
        .with_context(|| format!("cannot write {}", out.display()))?;
    if global.json {
        println!(
            "{}",
            serde_json::json!({"index": out, "modules": packed.iter().map(|m| serde_json::json!({"id": m.id, "version": m.version, "sha256": m.artifact.sha256})).collect::<Vec<_>>()})
        );
    } else {
        for m in &packed {
            println!(
                "packed chain://{}@{} ({}, sha256 {})",
                m.id, m.version, m.backend, m.artifact.sha256
            );
        }
        println!("{} module(s) → {}", packed.len(), out.display());
    }
    Ok(())
}

fn entry_name(entry: &serde_json::Value) -> String {
    format!(
        "{}@{}",
        entry["id"].as_str().unwrap_or("?"),
        entry["version"].as_str().unwrap_or("?")
    )
}

async fn list(global: &GlobalArgs) -> anyhow::Result<()> {
    let list = global.client().await?.module_list().await?;
    if global.json {
        println!("{}", serde_json::to_string(&list)?);
        return Ok(());
    }
    println!(
        "{:<36} {:<10} {:<10} {:>12}  description",
        "module", "backend", "resolver", "price hint"
    );
    for m in &list.modules {
        println!(
            "{:<36} {:<10} {:<10} {:>12}  {}",
            m.uri,
            m.backend,
            m.resolver,
            m.price_hint_micros
                .map(crate::money::format_usd)
                .unwrap_or_else(|| "-".into()),
            m.description.as_deref().unwrap_or("")
        );
    }
    if !list.unlisted.is_empty() {
        println!(
            "(cannot enumerate their registry: {}; `module resolve` still asks them)",
            list.unlisted.join(", ")
        );
    }
    for problem in &list.problems {
        eprintln!("! {problem}");
    }
    Ok(())
}
