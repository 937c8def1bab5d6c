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
use rhizos_broker::wire::{
    ErrorCode, GpuInfo, JobSpec, ModelView, Pricing, RegisterNode, WireError, format_usd,
};
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

/// Whether a node with `sources` (URL prefixes) fetches `url`, comparing parsed URLs (WHATWG,
/// as the fetch itself parses them): the same scheme, host and port exactly, and the path
/// (with `.` / `..` segments resolved) under the source's path at a segment boundary. A URL
/// with credentials in it is never fetched. A string prefix would let
/// `https://registry.example.com.evil.net/` or `https://registry.example.com@evil.net/` pass.
pub fn fetches_from(sources: &[String], url: &str) -> bool {
    let Ok(target) = url::Url::parse(url) else {
        return false;
    };
    if !target.username().is_empty() || target.password().is_some() || target.host().is_none() {
        return false;
    }
    sources.iter().any(|source| {
        let Ok(source) = url::Url::parse(source) else {
            return false;
        };
        let base = source.path();
        let path = target.path();
        source.scheme() == target.scheme()
            && source.host() == target.host()
            && source.port_or_known_default() == target.port_or_known_default()
            && path.starts_with(base)
            && (base.ends_with('/')
                || path.len() == base.len()
                || path[base.len()..].starts_with('/'))
    })
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
    /// Assignments it refused (or did not acknowledge) in a row, and until when it is passed
    /// over for that: a node that takes nothing is not offered the same job in a tight loop.
    refusals: u32,
    cool_until: Option<Instant>,
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
    /// The models served, with their prices and whether warm.
    models: Vec<rhizos_broker::wire::ModelOffer>,
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
            models: registration.models.clone(),
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

/// The node's offer of the model an inference job asks for (its service, name and, when the
/// job names one, backend); `None` for other jobs or when it does not serve it.
pub fn model_offer<'a>(
    spec: &JobSpec,
    registration: &'a RegisterNode,
) -> Option<&'a rhizos_broker::wire::ModelOffer> {
    let rhizos_broker::wire::Workload::Inference {
        service,
        model,
        via,
        ..
    } = &spec.workload
    else {
        return None;
    };
    registration.models.iter().find(|offer| {
        offer.name == *model
            && offer.service == *service
            && (via.is_empty() || offer.backend == *via)
    })
}

/// The prices a job is billed at on a node, recorded with its assignment: the node's own,
/// or for an inference job only its price for that model's units (no time is billed).
pub fn agreed_pricing(spec: &JobSpec, registration: &RegisterNode) -> Pricing {
    match model_offer(spec, registration) {
        Some(offer) => Pricing {
            gpu_hour_cents: 0,
            cpu_hour_cents: 0,
            memory_gb_hour_cents: 0,
            fuel_million_micros: 0,
            input_million_micros: offer.input_million_micros,
            output_million_micros: offer.output_million_micros,
        },
        None => registration.pricing,
    }
}

/// The most a job can cost on a node: its whole timeout at the node's prices (an inference
/// job: its most units at the node's price for the model).
pub fn estimate_micros(spec: &JobSpec, registration: &RegisterNode) -> i64 {
    if let rhizos_broker::wire::Workload::Inference {
        max_input_units,
        max_output_units,
        ..
    } = &spec.workload
    {
        return ledger::metered_cost_micros(
            rhizos_broker::wire::Metered {
                input_units: *max_input_units,
                output_units: *max_output_units,
            },
            &agreed_pricing(spec, registration),
        );
    }
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
    /// It does not serve the inference job's model (for that service).
    Model,
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
    if matches!(
        spec.workload,
        rhizos_broker::wire::Workload::Inference { .. }
    ) {
        if model_offer(spec, node).is_none() {
            return Err(Unfit::Model);
        }
    } else if !node.backends.iter().any(|b| b == backend) {
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
        Unfit::Model => match &spec.workload {
            rhizos_broker::wire::Workload::Inference { service, model, .. } => {
                format!("{id}: does not serve {model} for {service}")
            }
            _ => format!("{id}: serves no model"),
        },
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
        Unfit::Price(estimate) if model_offer(spec, node).is_some() => format!(
            "{id}: the request's most units could cost up to {} at its prices for the model, above the max cost of {}",
            format_usd(estimate),
            format_usd(max_cost_micros)
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
                refusals: 0,
                cool_until: None,
            },
        );
    }

    /// `node_id` refused an assignment (or did not acknowledge it): passed over for 100 ms,
    /// doubling with each refusal in a row up to 30 s, until it takes one or registers again.
    pub fn refused(&mut self, node_id: &str) {
        if let Some(node) = self.nodes.get_mut(node_id) {
            node.refusals = node.refusals.saturating_add(1);
            let pause = Duration::from_millis(100)
                .saturating_mul(1 << node.refusals.min(9).saturating_sub(1))
                .min(Duration::from_secs(30));
            node.cool_until = Some(Instant::now() + pause);
        }
    }

    /// `node_id` took an assignment: no longer passed over.
    pub fn accepted(&mut self, node_id: &str) {
        if let Some(node) = self.nodes.get_mut(node_id)
            && node.refusals > 0
        {
            node.refusals = 0;
            node.cool_until = None;
        }
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

    /// Up to `limit` entries in node-id order from `start`, and whether more follow.
    pub fn page(&self, start: std::ops::Bound<&str>, limit: usize) -> (Vec<NodeEntry>, bool) {
        use std::ops::Bound;
        let mut entries: Vec<NodeEntry> = self
            .nodes
            .range::<str, _>((start, Bound::Unbounded))
            .take(limit + 1)
            .map(|(_, entry)| entry.clone())
            .collect();
        let more = entries.len() > limit;
        entries.truncate(limit);
        (entries, more)
    }

    pub fn live_count(&self) -> usize {
        self.nodes.values().filter(|n| !n.lost).count()
    }

    /// Nodes registered, live or lost.
    pub fn registered_count(&self) -> usize {
        self.nodes.len()
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

    /// The models live nodes serve, by name and service, with how many nodes serve each (and
    /// how many warm) and the range of their prices.
    pub fn models(&self) -> Vec<ModelView> {
        let mut views: BTreeMap<(String, String), ModelView> = BTreeMap::new();
        for node in self.nodes.values().filter(|n| !n.lost) {
            for offer in &node.registration.models {
                let view = views
                    .entry((offer.name.clone(), offer.service.clone()))
                    .or_insert_with(|| ModelView {
                        name: offer.name.clone(),
                        service: offer.service.clone(),
                        nodes: 0,
                        warm_nodes: 0,
                        context_length: 0,
                        input_million_micros_min: u64::MAX,
                        input_million_micros_max: 0,
                        output_million_micros_min: u64::MAX,
                        output_million_micros_max: 0,
                    });
                view.nodes += 1;
                view.warm_nodes += u32::from(offer.warm);
                view.context_length = view.context_length.max(offer.context_length);
                view.input_million_micros_min = view
                    .input_million_micros_min
                    .min(offer.input_million_micros);
                view.input_million_micros_max = view
                    .input_million_micros_max
                    .max(offer.input_million_micros);
                view.output_million_micros_min = view
                    .output_million_micros_min
                    .min(offer.output_million_micros);
                view.output_million_micros_max = view
                    .output_million_micros_max
                    .max(offer.output_million_micros);
            }
        }
        views.into_values().collect()
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
        self.pick_avoiding(spec, max_cost_micros, &[])
    }

    /// [`Registry::pick`], passing over the nodes in `avoid` (where an earlier attempt of the
    /// job failed or was lost) while any other node can take it: a requeued job goes elsewhere.
    pub fn pick_avoiding(
        &mut self,
        spec: &JobSpec,
        max_cost_micros: i64,
        avoid: &[String],
    ) -> Option<&NodeEntry> {
        // The job against each class once, then each live node's free capacity.
        let mut verdicts = vec![Verdict::Unchecked; self.classes.len()];
        let mut candidates: Vec<(&NodeEntry, i64, f64)> = Vec::new();
        let now = Instant::now();
        for node in self
            .nodes
            .values()
            .filter(|n| !n.lost && n.cool_until.is_none_or(|until| until <= now))
        {
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
        if !avoid.is_empty()
            && candidates
                .iter()
                .any(|(node, _, _)| !avoid.contains(&node.registration.node_id))
        {
            candidates.retain(|(node, _, _)| !avoid.contains(&node.registration.node_id));
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
                // A model loaded already answers without a load delay: warm nodes first.
                let cold = match model_offer(spec, &node.registration) {
                    Some(offer) if !offer.warm => 1.0,
                    _ => 0.0,
                };
                cold + (f64::from(w.price) * price
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
    /// Counts every live node as heard from now: after the orchestrator's own bus connection
    /// was down, nobody's silence meant anything, so each node gets a whole window again.
    pub fn forgive_silence(&mut self) {
        let now = Instant::now();
        for node in self.nodes.values_mut().filter(|n| !n.lost) {
            node.last_seen = now;
        }
    }

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
mod tests;
