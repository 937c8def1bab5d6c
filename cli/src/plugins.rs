//! `rhizos plugins list [--node ID]`: what each node's agent loaded and refused.
//!
//! With `--node`, the agent itself answers (its live view, on `node.plugins.<node>`); without,
//! the orchestrator's view of every node (what each registered last, which agents refresh
//! whenever their plugin directory changes).

use crate::GlobalArgs;
use clap::Subcommand;
use rhizos_broker::wire::{PluginList, PluginView};
use std::time::Duration;

#[derive(Subcommand)]
pub enum PluginsCommand {
    /// Loaded plugins (name, kind, version, backends) and refused files with the reason.
    List {
        /// Ask this node's agent directly (its live view) instead of the orchestrator.
        #[arg(long)]
        node: Option<String>,
    },
}

pub async fn run(global: &GlobalArgs, command: PluginsCommand) -> anyhow::Result<()> {
    let client = global.client().await?;
    let PluginsCommand::List { node } = command;
    let lists: Vec<PluginList> = match node {
        Some(node_id) => {
            let list = tokio::time::timeout(Duration::from_secs(5), client.node_plugins(&node_id))
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "node {node_id} did not answer within 5 s (is its agent running?)"
                    )
                })?
                .map_err(|e| match e {
                    rhizos_broker::RequestError::NoResponders { .. } => anyhow::anyhow!(
                        "no agent named {node_id} is connected (see `rhizos node list`)"
                    ),
                    other => other.into(),
                })?;
            vec![list]
        }
        None => {
            let nodes = client.node_list().await?;
            nodes
                .nodes
                .into_iter()
                .map(|n| PluginList {
                    node_id: n.node_id,
                    plugin_dir: String::new(),
                    plugins: n.plugins,
                })
                .collect()
        }
    };
    if global.json {
        println!("{}", serde_json::to_string(&lists)?);
        return Ok(());
    }
    if lists.is_empty() {
        println!("no nodes registered");
        return Ok(());
    }
    println!(
        "{:<16} {:<12} {:<9} {:<9} {:<14} FILE / REASON",
        "NODE", "PLUGIN", "KIND", "VERSION", "BACKENDS"
    );
    for list in &lists {
        if list.plugins.is_empty() {
            println!("{:<16} (no plugin files)", list.node_id);
        }
        for plugin in &list.plugins {
            println!("{}", row(&list.node_id, plugin));
        }
    }
    Ok(())
}

fn row(node_id: &str, plugin: &PluginView) -> String {
    match &plugin.refused {
        None => format!(
            "{:<16} {:<12} {:<9} {:<9} {:<14} {}{}",
            node_id,
            plugin.name.as_deref().unwrap_or("?"),
            plugin.kind.as_deref().unwrap_or("backend"),
            plugin.version.as_deref().unwrap_or("?"),
            if plugin.backends.is_empty() && plugin.note.is_some() {
                "(none)".to_owned()
            } else {
                plugin.backends.join(",")
            },
            plugin.file,
            plugin
                .note
                .as_deref()
                .map(|n| format!(": {n}"))
                .unwrap_or_default()
        ),
        Some(reason) => format!(
            "{:<16} {:<12} {:<9} {:<9} {:<14} {}: {reason}",
            node_id, "REFUSED", "-", "-", "-", plugin.file
        ),
    }
}
