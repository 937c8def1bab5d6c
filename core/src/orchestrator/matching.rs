//! The in-memory node registry and job-to-node matching.
//!
//! **Hard filters** (a node that fails one is never chosen): alive; offers the job's backend;
//! enough cores, memory and disk; at least `gpus` GPUs with `min_vram_mib` and every required API;
//! fetches the job's artifact when it comes by reference (`artifact_url` under one of the node's
//! `artifact_sources`); enough *free* capacity right now (slots, cores, memory and GPUs not
//! already committed to its assigned and running executions — a node is never over-committed);
//! and its price for the job's whole execution timeout fits the job's `max_cost`.
//!
//! **Ranking** among the nodes that pass (lower score wins), with weights from
//! `[orchestrator.matching]`:
//!
//! ```text
//! (price × estimate / cheapest estimate + load × busy slots / slots
//!  + reputation × (1 − reputation) + tier × tier / 4) / 100
//! ```
//!
//! Scores equal to 1e-9 are ties, broken by rotation so no node is systematically favoured.
//!
//! Nodes whose registrations agree on everything the hard filters and the price look at
//! (backends, cores, memory, disk, GPUs, prices) share a **class**: a pick checks a job against
//! each class once and then only looks at what differs between the class's nodes (free capacity,
//! load, reputation). A fleet of a thousand identical nodes costs one check per job, not a
//! thousand (`rhizos-bench marketplace` measures it).

use crate::ledger;
use rhizos_broker::config::MatchingWeights;
use rhizos_broker::wire::{ErrorCode, GpuInfo, JobSpec, RegisterNode, WireError, format_usd};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// Provider tier by the largest GPU's VRAM (the Cxmpute tiers): 0 below 1 GiB (or no GPU),
/// 1 for 1–4 GiB, 2 for 4–8 GiB, 3 for 8–22 GiB, 4 from 22 GiB.
pub fn provider_tier(gpus: &[GpuInfo]) -> u8 {
    let largest_mib = gpus.iter().map(|g| g.vram_mib).max().unwrap_or(0);
    match largest_mib {
        m if m >= 22 * 1024 => 4,
        m if m >= 8 * 1024 => 3,
        m if m >= 4 * 1024 => 2,
        m if m >= 1024 => 1,
        _ => 0,
    }
}

/// Whether a node with `sources` (URL prefixes) fetches `url`.
pub fn fetches_from(sources: &[String], url: &str) -> bool {
    sources
        .iter()
        .any(|prefix| !prefix.is_empty() && url.starts_with(prefix.as_str()))
}

/// What a node has committed to its assigned and running executions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allocation {
    pub jobs: u32,
    pub cpu_cores: u32,
    pub memory_mib: u64,
    pub gpus: u32,
}

impl Allocation {
    pub fn of(spec: &JobSpec) -> Self {
        Self {
            jobs: 1,
            cpu_cores: spec.cpu_cores,
            memory_mib: spec.memory_mib,
            gpus: spec.gpus,
        }
    }
}

#[derive(Debug, Clone)]
pub struct NodeEntry {
    pub registration: RegisterNode,
    pub last_seen: Instant,
    pub lost: bool,
    pub allocated: Allocation,
    /// Success ratio over recent attempts (1.0 without history).
    pub reputation: f64,
    /// GPU state from the last heartbeat.
    pub gpu_telemetry: Vec<rhizos_broker::wire::GpuTelemetry>,
    /// The node's class (see the module docs): an index into the registry's classes.
    class: usize,
}

impl NodeEntry {
    pub fn active(&self) -> u32 {
        self.allocated.jobs
    }
}

#[derive(Debug, Default)]
pub struct Registry {
    nodes: BTreeMap<String, NodeEntry>,
    /// Class keys to class indices (dense, `0..classes.len()`).
    classes: HashMap<ClassKey, usize>,
    rotation: usize,
    weights: MatchingWeights,
}

/// What the hard filters and the price estimate read from a registration: nodes with equal
/// keys pass or fail a job's [`check`] together, at the same estimate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClassKey {
    backends: Vec<String>,
    cpu_cores: u32,
    memory_mib: u64,
    disk_mib: u64,
    /// (VRAM MiB, APIs) per GPU.
    gpus: Vec<(u64, Vec<String>)>,
    /// GPU, CPU, memory and fuel prices.
    pricing: [u64; 4],
    artifact_sources: Vec<String>,
}

impl ClassKey {
    fn of(registration: &RegisterNode) -> Self {
        let p = &registration.pricing;
        Self {
            backends: registration.backends.clone(),
            cpu_cores: registration.cpu_cores,
            memory_mib: registration.memory_mib,
            disk_mib: registration.disk_mib,
            gpus: registration
                .gpus
                .iter()
                .map(|g| (g.vram_mib, g.apis.clone()))
                .collect(),
            pricing: [
                p.gpu_hour_cents,
                p.cpu_hour_cents,
                p.memory_gb_hour_cents,
                p.fuel_million_micros,
            ],
            artifact_sources: registration.artifact_sources.clone(),
        }
    }
}

/// A class's answer to one job, worked out at most once per pick.
#[derive(Debug, Clone, Copy)]
enum Verdict {
    Unchecked,
    Unfit,
    /// Fits when idle: the estimate for the whole timeout, how many of each node's GPUs fit
    /// the job, and the tier term of the score.
    Fit {
        estimate: i64,
        fitting_gpus: u32,
        tier: f64,
    },
}

/// The most a job can cost on a node: its whole timeout at the node's prices.
pub fn estimate_micros(spec: &JobSpec, registration: &RegisterNode) -> i64 {
    ledger::cost_micros(
        spec.timeout_ms,
        spec.cpu_cores,
        spec.memory_mib,
        spec.gpus,
        &registration.pricing,
    )
}

/// The most `spec` can cost on a node for its fuel: nothing unless the node prices fuel and
/// the job set a fuel limit (without one, [`fuel_budget`] derives it from what is left).
fn fuel_estimate_micros(spec: &JobSpec, registration: &RegisterNode) -> i64 {
    match spec.fuel_limit {
        Some(fuel) if registration.pricing.fuel_million_micros > 0 => {
            ledger::fuel_cost_micros(fuel, &registration.pricing)
        }
        _ => 0,
    }
}

/// The fuel limit to run `spec` with on `registration`'s node: on a node that prices fuel,
/// at most what `max_cost` can still pay for once the whole timeout is paid, so a job never
/// burns fuel nobody pays for; elsewhere the job's own limit.
pub fn fuel_budget(
    spec: &JobSpec,
    max_cost_micros: i64,
    registration: &RegisterNode,
) -> Option<u64> {
    let price = registration.pricing.fuel_million_micros;
    if price == 0 {
        return spec.fuel_limit;
    }
    let left = max_cost_micros
        .saturating_sub(estimate_micros(spec, registration))
        .max(0);
    let affordable =
        u64::try_from(i128::from(left) * 1_000_000 / i128::from(price)).unwrap_or(u64::MAX);
    Some(
        spec.fuel_limit
            .map_or(affordable, |limit| limit.min(affordable)),
    )
}

/// GPUs of `node` that meet the job's per-GPU VRAM and API requirements.
fn fitting_gpus(spec: &JobSpec, node: &RegisterNode) -> u32 {
    let count = node
        .gpus
        .iter()
        .filter(|g| g.vram_mib >= spec.min_vram_mib)
        .filter(|g| {
            spec.gpu_apis
                .iter()
                .all(|api| g.apis.iter().any(|a| a == api))
        })
        .count();
    u32::try_from(count).unwrap_or(u32::MAX)
}

/// The first requirement a node misses (found without allocating; [`unfit_reason`] words it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unfit {
    Backend,
    Cores,
    Memory,
    Disk,
    Gpus,
    /// It does not fetch artifacts from where the job's come from.
    ArtifactSource,
    /// The whole timeout at the node's prices: this many micro-USD, above the max cost.
    Price(i64),
}

/// What keeps `node` from ever running `spec` within `max_cost` (load aside); with the
/// estimated cost for the whole timeout when it fits.
fn check(spec: &JobSpec, max_cost_micros: i64, node: &RegisterNode) -> Result<i64, Unfit> {
    let backend = spec.workload.backend();
    if !node.backends.iter().any(|b| b == backend) {
        return Err(Unfit::Backend);
    }
    if node.cpu_cores < spec.cpu_cores {
        return Err(Unfit::Cores);
    }
    if node.memory_mib < spec.memory_mib {
        return Err(Unfit::Memory);
    }
    if node.disk_mib < spec.disk_mib {
        return Err(Unfit::Disk);
    }
    if spec.gpus > 0 && fitting_gpus(spec, node) < spec.gpus {
        return Err(Unfit::Gpus);
    }
    if let Some(url) = &spec.artifact_url
        && !fetches_from(&node.artifact_sources, url)
    {
        return Err(Unfit::ArtifactSource);
    }
    let estimate = estimate_micros(spec, node).saturating_add(fuel_estimate_micros(spec, node));
    if estimate > max_cost_micros {
        return Err(Unfit::Price(estimate));
    }
    Ok(estimate)
}

/// Why `node` can never run `spec` within `max_cost`, or `None` if it can (load aside).
fn unfit_reason(spec: &JobSpec, max_cost_micros: i64, node: &RegisterNode) -> Option<String> {
    let unfit = check(spec, max_cost_micros, node).err()?;
    let backend = spec.workload.backend();
    let id = &node.node_id;
    Some(match unfit {
        Unfit::Backend => format!("{id}: no {backend} backend"),
        Unfit::Cores => format!("{id}: {} cores < {} asked", node.cpu_cores, spec.cpu_cores),
        Unfit::Memory => format!(
            "{id}: {} MiB < {} MiB asked",
            node.memory_mib, spec.memory_mib
        ),
        Unfit::Disk => format!(
            "{id}: {} MiB of disk < {} MiB asked",
            node.disk_mib, spec.disk_mib
        ),
        Unfit::Gpus => format!(
            "{id}: {} GPU(s) with ≥ {} MiB VRAM{} < {} asked",
            fitting_gpus(spec, node),
            spec.min_vram_mib,
            if spec.gpu_apis.is_empty() {
                String::new()
            } else {
                format!(" and {}", spec.gpu_apis.join(", "))
            },
            spec.gpus
        ),
        Unfit::ArtifactSource => format!(
            "{id}: does not fetch artifacts from {} (its [agent] artifact_sources)",
            spec.artifact_url.as_deref().unwrap_or_default()
        ),
        Unfit::Price(estimate) => format!(
            "{id}: running for the whole timeout ({} ms) could cost up to {} at its prices, above the max cost \
             of {} (raise the max cost or lower the timeout)",
            spec.timeout_ms,
            format_usd(estimate),
            format_usd(max_cost_micros)
        ),
    })
}

/// Whether the node has the job's resources free right now (`fitting_gpus`: how many of its
/// GPUs meet the job's per-GPU requirements).
fn has_room(spec: &JobSpec, node: &NodeEntry, fitting_gpus: u32) -> bool {
    let r = &node.registration;
    let a = &node.allocated;
    a.jobs < r.max_concurrent
        && a.cpu_cores.saturating_add(spec.cpu_cores) <= r.cpu_cores
        && a.memory_mib.saturating_add(spec.memory_mib) <= r.memory_mib
        && (spec.gpus == 0 || a.gpus.saturating_add(spec.gpus) <= fitting_gpus)
}

impl Registry {
    pub fn new(weights: MatchingWeights) -> Self {
        Self {
            weights,
            ..Self::default()
        }
    }

    pub fn upsert(&mut self, registration: RegisterNode) {
        let previous = self.nodes.get(&registration.node_id);
        let allocated = previous.map(|n| n.allocated).unwrap_or_default();
        let reputation = previous.map_or(1.0, |n| n.reputation);
        let class = self.class_of(&registration);
        self.nodes.insert(
            registration.node_id.clone(),
            NodeEntry {
                registration,
                last_seen: Instant::now(),
                lost: false,
                allocated,
                reputation,
                gpu_telemetry: Vec::new(),
                class,
            },
        );
    }

    /// The class index of `registration`, adding a class if it is new. Classes that no node
    /// uses any more are dropped once they outnumber the nodes (re-registrations with changed
    /// hardware or prices leave them behind), so the table stays as small as the fleet's variety.
    fn class_of(&mut self, registration: &RegisterNode) -> usize {
        let key = ClassKey::of(registration);
        if let Some(&class) = self.classes.get(&key) {
            return class;
        }
        if self.classes.len() > 2 * self.nodes.len() + 16 {
            self.classes.clear();
            for node in self.nodes.values_mut() {
                let next = self.classes.len();
                node.class = *self
                    .classes
                    .entry(ClassKey::of(&node.registration))
                    .or_insert(next);
            }
            if let Some(&class) = self.classes.get(&key) {
                return class;
            }
        }
        let class = self.classes.len();
        self.classes.insert(key, class);
        class
    }

    /// One node's entry.
    pub fn get(&self, node_id: &str) -> Option<&NodeEntry> {
        self.nodes.get(node_id)
    }

    pub fn entries(&self) -> Vec<NodeEntry> {
        self.nodes.values().cloned().collect()
    }

    pub fn live_count(&self) -> usize {
        self.nodes.values().filter(|n| !n.lost).count()
    }

    /// Records a heartbeat; `false` if the node is unknown.
    pub fn heartbeat(
        &mut self,
        node_id: &str,
        gpus: Vec<rhizos_broker::wire::GpuTelemetry>,
    ) -> bool {
        match self.nodes.get_mut(node_id) {
            Some(node) => {
                node.last_seen = Instant::now();
                node.lost = false;
                node.gpu_telemetry = gpus;
                true
            }
            None => false,
        }
    }

    /// Replaces every node's committed resources with the database's view.
    pub fn set_allocations(&mut self, allocations: &[(String, Allocation)]) {
        for node in self.nodes.values_mut() {
            node.allocated = Allocation::default();
        }
        for (node_id, allocation) in allocations {
            if let Some(node) = self.nodes.get_mut(node_id) {
                node.allocated = *allocation;
            }
        }
    }

    pub fn set_reputations(&mut self, reputations: &HashMap<String, f64>) {
        for (node_id, node) in &mut self.nodes {
            node.reputation = reputations.get(node_id).copied().unwrap_or(1.0);
        }
    }

    /// Commits `spec`'s resources on `node_id` (between two database refreshes).
    pub fn allocate(&mut self, node_id: &str, spec: &JobSpec) {
        if let Some(node) = self.nodes.get_mut(node_id) {
            let add = Allocation::of(spec);
            let a = &mut node.allocated;
            a.jobs += add.jobs;
            a.cpu_cores = a.cpu_cores.saturating_add(add.cpu_cores);
            a.memory_mib = a.memory_mib.saturating_add(add.memory_mib);
            a.gpus = a.gpus.saturating_add(add.gpus);
        }
    }

    pub fn release(&mut self, node_id: &str, spec: &JobSpec) {
        if let Some(node) = self.nodes.get_mut(node_id) {
            let a = &mut node.allocated;
            a.jobs = a.jobs.saturating_sub(1);
            a.cpu_cores = a.cpu_cores.saturating_sub(spec.cpu_cores);
            a.memory_mib = a.memory_mib.saturating_sub(spec.memory_mib);
            a.gpus = a.gpus.saturating_sub(spec.gpus);
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

    /// The best node with room for the job now, if any.
    pub fn pick(&mut self, spec: &JobSpec, max_cost_micros: i64) -> Option<&NodeEntry> {
        // The job against each class once, then each live node's free capacity.
        let mut verdicts = vec![Verdict::Unchecked; self.classes.len()];
        let mut candidates: Vec<(&NodeEntry, i64, f64)> = Vec::new();
        for node in self.nodes.values().filter(|n| !n.lost) {
            let verdict = match verdicts.get(node.class).copied() {
                Some(Verdict::Unchecked) | None => {
                    let verdict = match check(spec, max_cost_micros, &node.registration) {
                        Ok(estimate) => Verdict::Fit {
                            estimate,
                            fitting_gpus: fitting_gpus(spec, &node.registration),
                            tier: f64::from(provider_tier(&node.registration.gpus)) / 4.0,
                        },
                        Err(_) => Verdict::Unfit,
                    };
                    if let Some(slot) = verdicts.get_mut(node.class) {
                        *slot = verdict;
                    }
                    verdict
                }
                Some(known) => known,
            };
            if let Verdict::Fit {
                estimate,
                fitting_gpus,
                tier,
            } = verdict
                && has_room(spec, node, fitting_gpus)
            {
                candidates.push((node, estimate, tier));
            }
        }
        let cheapest = candidates.iter().map(|(_, estimate, _)| *estimate).min()?;
        let w = self.weights;
        let scores: Vec<f64> = candidates
            .iter()
            .map(|(node, estimate, tier)| {
                let price = if cheapest <= 0 {
                    1.0
                } else {
                    *estimate as f64 / cheapest as f64
                };
                let load =
                    f64::from(node.active()) / f64::from(node.registration.max_concurrent.max(1));
                let unreliability = 1.0 - node.reputation.clamp(0.0, 1.0);
                (f64::from(w.price) * price
                    + f64::from(w.load) * load
                    + f64::from(w.reputation) * unreliability
                    + f64::from(w.tier) * tier)
                    / 100.0
            })
            .collect();
        // The best score and how many nodes share it, then the rotation's turn among those.
        let best = scores.iter().copied().fold(f64::INFINITY, f64::min);
        let is_best = |score: &f64| (score - best).abs() < 1e-9;
        let tied = scores.iter().filter(|s| is_best(s)).count();
        self.rotation = self.rotation.wrapping_add(1);
        let turn = self.rotation % tied.max(1);
        candidates
            .iter()
            .zip(&scores)
            .filter(|(_, score)| is_best(score))
            .nth(turn)
            .map(|((node, _, _), _)| *node)
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

#[cfg(test)]
mod tests {
    use super::*;
    use rhizos_broker::wire::{GpuInfo, Pricing, WIRE_VERSION, Workload};

    /// A node: id, CPU ¢/h, GPU ¢/h, cores, memory MiB, slots, GPUs as (VRAM MiB, APIs).
    fn node(
        id: &str,
        cpu_cents: u64,
        gpu_cents: u64,
        cores: u32,
        memory_mib: u64,
        slots: u32,
        gpus: &[(u64, &str)],
    ) -> RegisterNode {
        RegisterNode {
            v: WIRE_VERSION,
            node_id: id.into(),
            provider_account: "p".into(),
            backends: vec!["wasm".into()],
            pricing: Pricing {
                gpu_hour_cents: gpu_cents,
                cpu_hour_cents: cpu_cents,
                memory_gb_hour_cents: 0,
                fuel_million_micros: 0,
            },
            cpu_cores: cores,
            memory_mib,
            max_concurrent: slots,
            heartbeat_interval_ms: 1000,
            plugins: vec![],
            running: vec![],
            gpus: gpus
                .iter()
                .map(|(vram_mib, apis)| GpuInfo {
                    name: "gpu".into(),
                    vram_mib: *vram_mib,
                    uuid: None,
                    compute_capability: None,
                    apis: apis
                        .split(',')
                        .filter(|a| !a.is_empty())
                        .map(str::to_owned)
                        .collect(),
                })
                .collect(),
            disk_mib: 10_000,
            hardware: None,
            artifact_sources: vec![],
        }
    }

    fn spec(cores: u32, memory_mib: u64, gpus: u32, min_vram_mib: u64, apis: &[&str]) -> JobSpec {
        JobSpec {
            cpu_cores: cores,
            gpus,
            min_vram_mib,
            gpu_apis: apis.iter().map(|a| (*a).to_owned()).collect(),
            ..JobSpec::new(
                Workload::Wasm {
                    module_b64: "AGFzbQ==".into(),
                },
                3_600_000,
                memory_mib,
            )
        }
    }

    #[test]
    fn fuel_budgets_never_exceed_what_the_max_cost_pays_for() {
        // spec(): a 1-hour timeout. At 1 cent/h per core the time part is 10,000 micro-USD.
        let mut fuel_node = node("f", 1, 0, 4, 4096, 4, &[]);
        fuel_node.pricing.fuel_million_micros = 500;
        let free_fuel = node("t", 1, 0, 4, 4096, 4, &[]);
        let mut job = spec(1, 128, 0, 0, &[]);
        // No fuel price: the job's own limit, untouched.
        assert_eq!(fuel_budget(&job, 20_000, &free_fuel), None);
        // Priced fuel, no limit: (20,000 − 10,000) micro-USD ÷ 500 per million = 20,000,000.
        assert_eq!(fuel_budget(&job, 20_000, &fuel_node), Some(20_000_000));
        // A smaller own limit wins; a larger one is cut down.
        job.fuel_limit = Some(1_000_000);
        assert_eq!(fuel_budget(&job, 20_000, &fuel_node), Some(1_000_000));
        job.fuel_limit = Some(50_000_000);
        assert_eq!(fuel_budget(&job, 20_000, &fuel_node), Some(20_000_000));
        // With a limit, the estimate counts the fuel: 10,000 + 50,000,000 × 500 / 10^6 = 35,000.
        assert_eq!(check(&job, 35_000, &fuel_node), Ok(35_000));
        assert_eq!(check(&job, 34_999, &fuel_node), Err(Unfit::Price(35_000)));
        // Nothing left after the time part: no fuel at all.
        job.fuel_limit = None;
        assert_eq!(fuel_budget(&job, 10_000, &fuel_node), Some(0));
    }

    struct Case {
        name: &'static str,
        nodes: Vec<RegisterNode>,
        /// Committed resources per node before the pick: (node, jobs, cores, MiB, GPUs).
        busy: Vec<(&'static str, u32, u32, u64, u32)>,
        reputations: Vec<(&'static str, f64)>,
        spec: JobSpec,
        max_cost: i64,
        expected: Option<&'static str>,
    }

    #[test]
    fn matching_table() {
        let a100 = (40 * 1024, "cuda");
        let t4 = (16 * 1024, "cuda");
        let small = (2 * 1024, "cuda");
        let cases = vec![
            Case {
                name: "cheapest wins",
                nodes: vec![
                    node("dear", 5, 0, 4, 4096, 4, &[]),
                    node("cheap", 1, 0, 4, 4096, 4, &[]),
                ],
                busy: vec![],
                reputations: vec![],
                spec: spec(1, 128, 0, 0, &[]),
                max_cost: 100_000,
                expected: Some("cheap"),
            },
            Case {
                name: "price cap filters the cheap node out when it is too small, none left",
                nodes: vec![
                    node("dear", 5, 0, 4, 4096, 4, &[]),
                    node("cheap", 1, 0, 1, 4096, 4, &[]),
                ],
                busy: vec![],
                reputations: vec![],
                spec: spec(2, 128, 0, 0, &[]),
                max_cost: 50_000, // 2 cores × 5 ¢ = 100 000 micros > 50 000
                expected: None,
            },
            Case {
                name: "a node is never over-committed on cores",
                nodes: vec![
                    node("cheap", 1, 0, 4, 4096, 8, &[]),
                    node("dear", 2, 0, 4, 4096, 8, &[]),
                ],
                busy: vec![("cheap", 2, 3, 256, 0)],
                reputations: vec![],
                spec: spec(2, 128, 0, 0, &[]),
                max_cost: 1_000_000,
                expected: Some("dear"),
            },
            Case {
                name: "a node is never over-committed on memory",
                nodes: vec![
                    node("cheap", 1, 0, 8, 1024, 8, &[]),
                    node("dear", 2, 0, 8, 4096, 8, &[]),
                ],
                busy: vec![("cheap", 1, 1, 900, 0)],
                reputations: vec![],
                spec: spec(1, 256, 0, 0, &[]),
                max_cost: 1_000_000,
                expected: Some("dear"),
            },
            Case {
                name: "GPU count, VRAM and API are hard filters",
                nodes: vec![
                    node("small-gpu", 1, 10, 8, 8192, 4, &[small, small]),
                    node("t4", 1, 30, 8, 8192, 4, &[t4]),
                    node("rocm", 1, 5, 8, 8192, 4, &[(80 * 1024, "rocm")]),
                ],
                busy: vec![],
                reputations: vec![],
                spec: spec(1, 1024, 1, 8 * 1024, &["cuda"]),
                max_cost: 10_000_000,
                expected: Some("t4"),
            },
            Case {
                name: "committed GPUs are not offered twice",
                nodes: vec![
                    node("one-a100", 1, 100, 8, 8192, 4, &[a100]),
                    node("two-t4", 1, 150, 8, 8192, 4, &[t4, t4]),
                ],
                busy: vec![("one-a100", 1, 1, 1024, 1)],
                reputations: vec![],
                spec: spec(1, 1024, 1, 8 * 1024, &["cuda"]),
                max_cost: 10_000_000,
                expected: Some("two-t4"),
            },
            Case {
                name: "equal price: the less loaded node wins",
                nodes: vec![
                    node("busy", 1, 0, 8, 8192, 4, &[]),
                    node("idle", 1, 0, 8, 8192, 4, &[]),
                ],
                busy: vec![("busy", 3, 3, 384, 0)],
                reputations: vec![],
                spec: spec(1, 128, 0, 0, &[]),
                max_cost: 1_000_000,
                expected: Some("idle"),
            },
            Case {
                name: "equal price and load: the more reliable node wins",
                nodes: vec![
                    node("flaky", 1, 0, 8, 8192, 4, &[]),
                    node("solid", 1, 0, 8, 8192, 4, &[]),
                ],
                busy: vec![],
                reputations: vec![("flaky", 0.5), ("solid", 0.99)],
                spec: spec(1, 128, 0, 0, &[]),
                max_cost: 1_000_000,
                expected: Some("solid"),
            },
            Case {
                name: "a CPU job leaves the big GPU node free",
                nodes: vec![
                    node("gpu-box", 1, 100, 8, 8192, 4, &[a100]),
                    node("cpu-box", 1, 0, 8, 8192, 4, &[]),
                ],
                busy: vec![],
                reputations: vec![],
                spec: spec(1, 128, 0, 0, &[]),
                max_cost: 1_000_000,
                expected: Some("cpu-box"),
            },
            Case {
                name: "price dominates a small reputation gap",
                nodes: vec![
                    node("cheap-ok", 1, 0, 8, 8192, 4, &[]),
                    node("dear-perfect", 3, 0, 8, 8192, 4, &[]),
                ],
                busy: vec![],
                reputations: vec![("cheap-ok", 0.9), ("dear-perfect", 1.0)],
                spec: spec(1, 128, 0, 0, &[]),
                max_cost: 1_000_000,
                expected: Some("cheap-ok"),
            },
        ];
        for case in cases {
            let mut registry = Registry::new(MatchingWeights::default());
            for node in case.nodes {
                registry.upsert(node);
            }
            let allocations: Vec<(String, Allocation)> = case
                .busy
                .iter()
                .map(|(id, jobs, cores, mib, gpus)| {
                    (
                        (*id).to_owned(),
                        Allocation {
                            jobs: *jobs,
                            cpu_cores: *cores,
                            memory_mib: *mib,
                            gpus: *gpus,
                        },
                    )
                })
                .collect();
            registry.set_allocations(&allocations);
            registry.set_reputations(
                &case
                    .reputations
                    .iter()
                    .map(|(id, r)| ((*id).to_owned(), *r))
                    .collect(),
            );
            let picked = registry
                .pick(&case.spec, case.max_cost)
                .map(|n| n.registration.node_id.clone());
            assert_eq!(picked.as_deref(), case.expected, "case: {}", case.name);
        }
    }

    #[test]
    fn ties_rotate_between_equal_nodes() {
        let mut registry = Registry::new(MatchingWeights::default());
        for id in ["a", "b", "c"] {
            registry.upsert(node(id, 1, 0, 8, 8192, 100, &[]));
        }
        let mut counts: HashMap<String, u32> = HashMap::new();
        for _ in 0..300 {
            *counts
                .entry(
                    registry
                        .pick(&spec(1, 128, 0, 0, &[]), 100_000)
                        .unwrap()
                        .registration
                        .node_id
                        .clone(),
                )
                .or_default() += 1;
        }
        assert_eq!(
            counts.values().copied().collect::<Vec<_>>(),
            [100, 100, 100],
            "{counts:?}"
        );
    }

    #[test]
    fn nodes_of_one_class_differ_by_what_they_have_free_and_re_registration_changes_class() {
        let mut registry = Registry::new(MatchingWeights::default());
        let job = spec(1, 128, 0, 0, &[]);
        // a and b: one class (same hardware and prices), two slots each.
        registry.upsert(node("a", 1, 0, 4, 4096, 2, &[]));
        registry.upsert(node("b", 1, 0, 4, 4096, 2, &[]));
        assert_eq!(registry.classes.len(), 1);
        registry.allocate("a", &job);
        registry.allocate("a", &job);
        let pick = |r: &mut Registry, max_cost| {
            r.pick(&job, max_cost)
                .map(|n| n.registration.node_id.clone())
        };
        assert_eq!(pick(&mut registry, 100_000).as_deref(), Some("b"));
        // b re-registers five times dearer: its own class, judged at its new price.
        registry.upsert(node("b", 5, 0, 4, 4096, 2, &[]));
        assert_eq!(registry.classes.len(), 2);
        // One hour at 5 ¢/h is $0.05: 50,000 micro-USD.
        assert_eq!(pick(&mut registry, 49_999), None, "a is full, b too dear");
        assert_eq!(pick(&mut registry, 50_000).as_deref(), Some("b"));
        // c joins a's class: a is full, c is cheaper than b.
        registry.upsert(node("c", 1, 0, 4, 4096, 2, &[]));
        assert_eq!(registry.classes.len(), 2);
        assert_eq!(pick(&mut registry, 100_000).as_deref(), Some("c"));
        // A node re-registering with ever new prices leaves classes behind; the table is
        // rebuilt before it outgrows the fleet, and picks follow the latest prices.
        for cents in 10..200 {
            registry.upsert(node("b", cents, 0, 4, 4096, 2, &[]));
            assert!(
                registry.classes.len() <= 2 * 3 + 16 + 1,
                "{}",
                registry.classes.len()
            );
        }
        registry.allocate("c", &job);
        registry.allocate("c", &job);
        assert_eq!(pick(&mut registry, 1_989_999), None);
        assert_eq!(pick(&mut registry, 1_990_000).as_deref(), Some("b"));
    }

    #[test]
    fn artifacts_by_reference_go_only_to_nodes_that_fetch_from_their_source() {
        let mut registry = Registry::new(MatchingWeights::default());
        let mut fetching = node("fetching", 5, 0, 4, 4096, 2, &[]);
        fetching.artifact_sources = vec!["https://registry.example/artifacts/".into()];
        registry.upsert(fetching);
        // Cheaper, but fetches nothing.
        registry.upsert(node("closed", 1, 0, 4, 4096, 2, &[]));
        let mut job = spec(1, 128, 0, 0, &[]);
        job.artifact_url = Some("https://registry.example/artifacts/m.wasm".into());
        assert_eq!(
            registry
                .pick(&job, 100_000)
                .map(|n| n.registration.node_id.as_str()),
            Some("fetching")
        );
        job.artifact_url = Some("https://other.example/artifacts/m.wasm".into());
        assert!(registry.pick(&job, 100_000).is_none());
        let err = registry.feasibility(&job, 100_000).unwrap_err();
        assert!(
            err.message.contains(
                "fetching: does not fetch artifacts from https://other.example/artifacts/m.wasm"
            ),
            "{}",
            err.message
        );
        // Inline bytes: any node, the cheaper first.
        job.artifact_url = None;
        assert_eq!(
            registry
                .pick(&job, 100_000)
                .map(|n| n.registration.node_id.as_str()),
            Some("closed")
        );
    }

    #[test]
    fn infeasible_jobs_are_refused_with_every_reason() {
        let mut registry = Registry::new(MatchingWeights::default());
        let err = registry
            .feasibility(&spec(1, 128, 0, 0, &[]), 1)
            .unwrap_err();
        assert!(err.message.contains("no node is registered"));
        registry.upsert(node("a", 5, 0, 4, 4096, 1, &[]));
        let err = registry
            .feasibility(&spec(1, 128, 0, 0, &[]), 10)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::NoCapacity);
        assert!(
            err.message.contains(
                "could cost up to $0.050000 at its prices, above the max cost of $0.000010"
            ),
            "{}",
            err.message
        );
        assert!(
            registry
                .feasibility(&spec(1, 1 << 20, 0, 0, &[]), 1_000_000)
                .unwrap_err()
                .message
                .contains("MiB asked")
        );
        let gpu = registry
            .feasibility(&spec(1, 128, 1, 1024, &["cuda"]), 1_000_000)
            .unwrap_err();
        assert!(
            gpu.message
                .contains("a: 0 GPU(s) with ≥ 1024 MiB VRAM and cuda < 1 asked"),
            "{}",
            gpu.message
        );
        assert!(
            registry
                .feasibility(&spec(1, 128, 0, 0, &[]), 50_000)
                .is_ok()
        );
    }
}
