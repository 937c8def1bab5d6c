//! The in-memory node registry and job-to-node matching.
//!
//! Hard filters: the node is alive, offers the job's backend, has the cores and memory, has a free
//! slot, and its price for the job's whole timeout fits the job's `max_cost`. Among the nodes that
//! pass, the cheapest estimate wins, then the least loaded; remaining ties rotate so no node is
//! systematically favoured.

use crate::ledger;
use rhizos_broker::wire::{ErrorCode, JobSpec, RegisterNode, WireError};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct NodeEntry {
    pub registration: RegisterNode,
    pub last_seen: Instant,
    pub lost: bool,
    /// Assigned + running executions.
    pub active: u32,
}

#[derive(Debug, Default)]
pub struct Registry {
    nodes: BTreeMap<String, NodeEntry>,
    rotation: usize,
}

/// The most a job can cost on a node: its whole timeout at the node's prices.
pub fn estimate_micros(spec: &JobSpec, registration: &RegisterNode) -> i64 {
    ledger::cost_micros(
        spec.timeout_ms,
        spec.cpu_cores,
        spec.memory_mib,
        0,
        &registration.pricing,
    )
}

/// Why `node` can never run `spec` within `max_cost`, or `None` if it can (load aside).
fn unfit_reason(spec: &JobSpec, max_cost_micros: i64, node: &RegisterNode) -> Option<String> {
    let backend = spec.workload.backend();
    if !node.backends.iter().any(|b| b == backend) {
        return Some(format!("{}: no {backend} backend", node.node_id));
    }
    if node.cpu_cores < spec.cpu_cores {
        return Some(format!(
            "{}: {} cores < {} asked",
            node.node_id, node.cpu_cores, spec.cpu_cores
        ));
    }
    if node.memory_mib < spec.memory_mib {
        return Some(format!(
            "{}: {} MiB < {} MiB asked",
            node.node_id, node.memory_mib, spec.memory_mib
        ));
    }
    let estimate = estimate_micros(spec, node);
    if estimate > max_cost_micros {
        return Some(format!(
            "{}: running for the whole timeout ({} ms) could cost up to {} at its prices, above the max cost \
             of {} (raise the max cost or lower the timeout)",
            node.node_id,
            spec.timeout_ms,
            crate::orchestrator::store::format_usd(estimate),
            crate::orchestrator::store::format_usd(max_cost_micros)
        ));
    }
    None
}

impl Registry {
    pub fn upsert(&mut self, registration: RegisterNode) {
        let active = self
            .nodes
            .get(&registration.node_id)
            .map_or(0, |n| n.active);
        self.nodes.insert(
            registration.node_id.clone(),
            NodeEntry {
                registration,
                last_seen: Instant::now(),
                lost: false,
                active,
            },
        );
    }

    pub fn entries(&self) -> Vec<NodeEntry> {
        self.nodes.values().cloned().collect()
    }

    pub fn live_count(&self) -> usize {
        self.nodes.values().filter(|n| !n.lost).count()
    }

    /// Records a heartbeat; `false` if the node is unknown.
    pub fn heartbeat(&mut self, node_id: &str) -> bool {
        match self.nodes.get_mut(node_id) {
            Some(node) => {
                node.last_seen = Instant::now();
                node.lost = false;
                true
            }
            None => false,
        }
    }

    pub fn set_active(&mut self, counts: &[(String, u32)]) {
        for node in self.nodes.values_mut() {
            node.active = 0;
        }
        for (node_id, count) in counts {
            if let Some(node) = self.nodes.get_mut(node_id) {
                node.active = *count;
            }
        }
    }

    pub fn add_active(&mut self, node_id: &str) {
        if let Some(node) = self.nodes.get_mut(node_id) {
            node.active += 1;
        }
    }

    pub fn remove_active(&mut self, node_id: &str) {
        if let Some(node) = self.nodes.get_mut(node_id) {
            node.active = node.active.saturating_sub(1);
        }
    }

    /// Refuses a job that no live node could run even when idle, saying why for each node.
    pub fn feasibility(&self, spec: &JobSpec, max_cost_micros: i64) -> Result<(), WireError> {
        let mut reasons = Vec::new();
        for node in self.nodes.values().filter(|n| !n.lost) {
            match unfit_reason(spec, max_cost_micros, &node.registration) {
                None => return Ok(()),
                Some(reason) => reasons.push(reason),
            }
        }
        let detail = if reasons.is_empty() {
            "no node is registered".to_owned()
        } else {
            reasons.join("; ")
        };
        Err(WireError::new(
            ErrorCode::NoCapacity,
            format!(
                "no node can run this {} job: {detail}",
                spec.workload.backend()
            ),
        ))
    }

    /// The best node with a free slot for the job, if any.
    pub fn pick(&mut self, spec: &JobSpec, max_cost_micros: i64) -> Option<NodeEntry> {
        let candidates: Vec<&NodeEntry> = self
            .nodes
            .values()
            .filter(|n| !n.lost && n.active < n.registration.max_concurrent)
            .filter(|n| unfit_reason(spec, max_cost_micros, &n.registration).is_none())
            .collect();
        let best_key = candidates
            .iter()
            .map(|n| (estimate_micros(spec, &n.registration), load_permille(n)))
            .min()?;
        let best: Vec<&NodeEntry> = candidates
            .into_iter()
            .filter(|n| (estimate_micros(spec, &n.registration), load_permille(n)) == best_key)
            .collect();
        self.rotation = self.rotation.wrapping_add(1);
        Some(best[self.rotation % best.len()].clone())
    }

    /// Nodes whose last heartbeat is older than `missed` intervals, marked lost (once).
    pub fn take_newly_lost(&mut self, missed: u32) -> Vec<String> {
        let now = Instant::now();
        let mut lost = Vec::new();
        for node in self.nodes.values_mut().filter(|n| !n.lost) {
            let limit = Duration::from_millis(
                node.registration
                    .heartbeat_interval_ms
                    .saturating_mul(u64::from(missed.max(1))),
            );
            if now.duration_since(node.last_seen) > limit {
                node.lost = true;
                lost.push(node.registration.node_id.clone());
            }
        }
        lost
    }
}

fn load_permille(node: &NodeEntry) -> u32 {
    node.active * 1000 / node.registration.max_concurrent.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rhizos_broker::wire::{Pricing, WIRE_VERSION, Workload};

    fn node(id: &str, cpu_hour_cents: u64, max_concurrent: u32) -> RegisterNode {
        RegisterNode {
            v: WIRE_VERSION,
            node_id: id.into(),
            provider_account: "p".into(),
            backends: vec!["wasm".into()],
            pricing: Pricing {
                gpu_hour_cents: 0,
                cpu_hour_cents,
                memory_gb_hour_cents: 0,
            },
            cpu_cores: 4,
            memory_mib: 4096,
            max_concurrent,
            heartbeat_interval_ms: 1000,
            plugins: vec![],
            running: vec![],
            gpus: vec![],
        }
    }

    fn spec() -> JobSpec {
        JobSpec {
            workload: Workload::Wasm {
                module_b64: "AGFzbQ==".into(),
            },
            args: vec![],
            env: Default::default(),
            stdin_b64: None,
            timeout_ms: 3_600_000,
            memory_mib: 128,
            cpu_cores: 1,
            max_retries: rhizos_broker::wire::DEFAULT_MAX_RETRIES,
            queue_timeout_ms: None,
            total_timeout_ms: None,
        }
    }

    #[test]
    fn cheapest_fitting_node_wins_and_full_nodes_are_skipped() {
        let mut registry = Registry::default();
        registry.upsert(node("cheap", 1, 1));
        registry.upsert(node("dear", 5, 1));
        // 1 h at 1 cent = 10 000 micros; at 5 cents = 50 000.
        assert_eq!(
            registry
                .pick(&spec(), 100_000)
                .unwrap()
                .registration
                .node_id,
            "cheap"
        );
        registry.add_active("cheap");
        assert_eq!(
            registry
                .pick(&spec(), 100_000)
                .unwrap()
                .registration
                .node_id,
            "dear"
        );
        // Only the cheap one fits 20 000, and it is full.
        assert!(registry.pick(&spec(), 20_000).is_none());
        registry.remove_active("cheap");
        assert_eq!(
            registry.pick(&spec(), 20_000).unwrap().registration.node_id,
            "cheap"
        );
    }

    #[test]
    fn ties_rotate_between_equal_nodes() {
        let mut registry = Registry::default();
        registry.upsert(node("a", 1, 4));
        registry.upsert(node("b", 1, 4));
        let picks: Vec<String> = (0..4)
            .map(|_| {
                registry
                    .pick(&spec(), 100_000)
                    .unwrap()
                    .registration
                    .node_id
            })
            .collect();
        assert_eq!(picks.iter().filter(|p| *p == "a").count(), 2, "{picks:?}");
    }

    #[test]
    fn infeasible_jobs_are_refused_with_every_reason() {
        let mut registry = Registry::default();
        assert!(
            registry
                .feasibility(&spec(), 1)
                .unwrap_err()
                .message
                .contains("no node is registered")
        );
        registry.upsert(node("a", 5, 1));
        let err = registry.feasibility(&spec(), 10).unwrap_err();
        assert_eq!(err.code, ErrorCode::NoCapacity);
        assert!(
            err.message.contains(
                "could cost up to $0.050000 at its prices, above the max cost of $0.000010"
            ),
            "{}",
            err.message
        );
        let mut big = spec();
        big.memory_mib = 1 << 20;
        assert!(
            registry
                .feasibility(&big, 1_000_000)
                .unwrap_err()
                .message
                .contains("MiB asked")
        );
        assert!(registry.feasibility(&spec(), 50_000).is_ok());
    }
}
