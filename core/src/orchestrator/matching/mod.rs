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
//! Scores equal to 1e-9 are ties, taken in turn (round robin in node-id order from the last
//! node picked) so no node is systematically favoured.
//!
//! Nodes whose registrations agree on everything the hard filters and the price look at
//! (backends, cores, memory, disk, GPUs, prices) share a **class**: a pick checks a job against
//! each class once and then only looks at what differs between the class's nodes (free capacity,
//! load, reputation). A fleet of a thousand identical nodes costs one check per job, not a
//! thousand (`rhizos-bench marketplace` measures it).
//!
//! **The pick does not walk the fleet.** Within a class, price and tier are the same for every
//! node, so nodes differ in score only by the *rank* `(load × busy/slots + reputation ×
//! (1 − reputation)) / 100`. Each class keeps its live nodes with a free slot ordered by rank
//! (re-filed on every allocate, release, reputation change, loss and re-registration, O(log n)
//! each); a pick checks each class once, takes the first nodes of each fitting class's order
//! that have room (skipping ones cooling down after a refusal or avoided by a requeued job),
//! and compares the classes' best. A pick at 50,000 nodes costs about what it costs at 50 as
//! long as the fleet's variety (its number of classes) stays small; `rhizos-bench scale`
//! measures it.

use crate::ledger;
use rhizos_broker::config::MatchingWeights;
use rhizos_broker::wire::{
    ErrorCode, GpuInfo, JobSpec, ModelView, Pricing, RegisterNode, WireError, format_usd,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
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
    /// Where the node is filed in its class's order (class, rank bits): `None` while lost or
    /// with every slot taken.
    filed: Option<(usize, u64)>,
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
    /// Per class, its live nodes with a free slot by rank (see the module docs), ties by id.
    ranked: Vec<Ranked>,
    /// The node picked last: ties are taken in turn from the next id on.
    last_pick: String,
    weights: MatchingWeights,
}

/// One class's nodes by rank (`f64` bits of a non-negative rank order as the numbers do),
/// each rank's nodes by id.
type Ranked = BTreeMap<u64, BTreeSet<String>>;

/// The part of a node's score its class does not decide: load and unreliability, weighted.
fn rank(weights: MatchingWeights, node: &NodeEntry) -> f64 {
    let load = f64::from(node.active()) / f64::from(node.registration.max_concurrent.max(1));
    let unreliability = 1.0 - node.reputation.clamp(0.0, 1.0);
    (f64::from(weights.load) * load + f64::from(weights.reputation) * unreliability) / 100.0
}

/// Files `node` in its class's order where it belongs now (or takes it out), if that moved.
fn refile(ranked: &mut Vec<Ranked>, weights: MatchingWeights, node: &mut NodeEntry) {
    let wanted = (!node.lost && node.allocated.jobs < node.registration.max_concurrent)
        .then(|| (node.class, rank(weights, node).max(0.0).to_bits()));
    if wanted == node.filed {
        return;
    }
    let id = &node.registration.node_id;
    if let Some((class, bits)) = node.filed.take()
        && let Some(order) = ranked.get_mut(class)
        && let Some(ids) = order.get_mut(&bits)
    {
        ids.remove(id.as_str());
        if ids.is_empty() {
            order.remove(&bits);
        }
    }
    if let Some((class, bits)) = wanted {
        if ranked.len() <= class {
            ranked.resize_with(class + 1, Ranked::default);
        }
        ranked[class].entry(bits).or_default().insert(id.clone());
    }
    node.filed = wanted;
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
        let class = self.class_of(&registration);
        let (allocated, reputation) = match self.nodes.get_mut(&registration.node_id) {
            Some(previous) => {
                previous.lost = true;
                refile(&mut self.ranked, self.weights, previous);
                (previous.allocated, previous.reputation)
            }
            None => (Allocation::default(), 1.0),
        };
        let mut entry = NodeEntry {
            registration,
            last_seen: Instant::now(),
            lost: false,
            allocated,
            reputation,
            gpu_telemetry: Vec::new(),
            class,
            refusals: 0,
            cool_until: None,
            filed: None,
        };
        refile(&mut self.ranked, self.weights, &mut entry);
        self.nodes.insert(entry.registration.node_id.clone(), entry);
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
            self.ranked.clear();
            for node in self.nodes.values_mut() {
                let next = self.classes.len();
                node.class = *self
                    .classes
                    .entry(ClassKey::of(&node.registration))
                    .or_insert(next);
                node.filed = None;
                refile(&mut self.ranked, self.weights, node);
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
                node.gpu_telemetry = gpus;
                if node.lost {
                    node.lost = false;
                    refile(&mut self.ranked, self.weights, node);
                }
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
        for node in self.nodes.values_mut() {
            refile(&mut self.ranked, self.weights, node);
        }
    }

    pub fn set_reputations(&mut self, reputations: &HashMap<String, f64>) {
        for (node_id, node) in &mut self.nodes {
            node.reputation = reputations.get(node_id).copied().unwrap_or(1.0);
            refile(&mut self.ranked, self.weights, node);
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
            refile(&mut self.ranked, self.weights, node);
        }
    }

    pub fn release(&mut self, node_id: &str, spec: &JobSpec) {
        if let Some(node) = self.nodes.get_mut(node_id) {
            let a = &mut node.allocated;
            a.jobs = a.jobs.saturating_sub(1);
            a.cpu_cores = a.cpu_cores.saturating_sub(spec.cpu_cores);
            a.memory_mib = a.memory_mib.saturating_sub(spec.memory_mib);
            a.gpus = a.gpus.saturating_sub(spec.gpus);
            refile(&mut self.ranked, self.weights, node);
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

    /// Refuses a job that no live node could run even when idle, saying why for each kind of
    /// node (one node of each class named, with how many more are like it).
    pub fn feasibility(&self, spec: &JobSpec, max_cost_micros: i64) -> Result<(), WireError> {
        // One check per class: its first live node, and how many live nodes it has.
        let mut classes: Vec<Option<(&NodeEntry, usize)>> = vec![None; self.classes.len()];
        for node in self.nodes.values().filter(|n| !n.lost) {
            match classes.get_mut(node.class) {
                Some(Some((_, count))) => *count += 1,
                slot => {
                    if check(spec, max_cost_micros, &node.registration).is_ok() {
                        return Ok(());
                    }
                    if let Some(slot) = slot {
                        *slot = Some((node, 1));
                    }
                }
            }
        }
        let mut kinds: Vec<(&NodeEntry, usize)> = classes.into_iter().flatten().collect();
        kinds.sort_by(|a, b| a.0.registration.node_id.cmp(&b.0.registration.node_id));
        const LISTED: usize = 16;
        let mut reasons: Vec<String> = kinds
            .iter()
            .take(LISTED)
            .filter_map(|(node, count)| {
                let reason = unfit_reason(spec, max_cost_micros, &node.registration)?;
                Some(match count - 1 {
                    0 => reason,
                    1 => format!("{reason} (and 1 more node like it)"),
                    more => format!("{reason} (and {more} more nodes like it)"),
                })
            })
            .collect();
        if kinds.len() > LISTED {
            reasons.push(format!(
                "and {} more kinds of node (`rhizos node list` shows them)",
                kinds.len() - LISTED
            ));
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

    /// How many live nodes could run `spec` within `max_cost_micros` (load aside), and the
    /// cheapest and dearest of their estimates (the whole timeout at each node's prices).
    pub fn estimate_range(
        &self,
        spec: &JobSpec,
        max_cost_micros: i64,
    ) -> Option<(usize, i64, i64)> {
        let mut found: Option<(usize, i64, i64)> = None;
        for node in self.nodes.values().filter(|n| !n.lost) {
            if let Ok(estimate) = check(spec, max_cost_micros, &node.registration) {
                found = Some(match found {
                    None => (1, estimate, estimate),
                    Some((nodes, low, high)) => (nodes + 1, low.min(estimate), high.max(estimate)),
                });
            }
        }
        found
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
        let now = Instant::now();
        let chosen = self.choose(spec, max_cost_micros, avoid, now).or_else(|| {
            (!avoid.is_empty())
                .then(|| self.choose(spec, max_cost_micros, &[], now))
                .flatten()
        })?;
        let node = self.nodes.get(&chosen)?;
        self.last_pick = chosen;
        Some(node)
    }

    /// The node to pick (see the module docs): each fitting class's best usable node, the
    /// best of those by score, ties in turn after [`Registry::last_pick`].
    fn choose(
        &self,
        spec: &JobSpec,
        max_cost_micros: i64,
        avoid: &[String],
        now: Instant,
    ) -> Option<String> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        struct Best<'a> {
            node: &'a NodeEntry,
            estimate: i64,
            tier: f64,
            /// Whether `node` comes after the last pick in id order (else it is the first).
            after: bool,
        }
        let mut bests: Vec<Best> = Vec::new();
        let last = self.last_pick.as_str();
        for order in &self.ranked {
            // The class against the job once, through any of its nodes.
            let Some(sample) = order
                .values()
                .next()
                .and_then(|ids| ids.first())
                .and_then(|id| self.nodes.get(id))
            else {
                continue;
            };
            let Ok(estimate) = check(spec, max_cost_micros, &sample.registration) else {
                continue;
            };
            let fitting = fitting_gpus(spec, &sample.registration);
            let usable = |id: &String| {
                self.nodes.get(id).filter(|node| {
                    node.cool_until.is_none_or(|until| until <= now)
                        && !avoid.contains(id)
                        && has_room(spec, node, fitting)
                })
            };
            // The lowest rank with a usable node; of its nodes, the first after the last
            // pick, else the first.
            for ids in order.values() {
                let after = ids
                    .range::<str, _>((Excluded(last), Unbounded))
                    .find_map(usable);
                let node = after.or_else(|| {
                    ids.range::<str, _>((Unbounded, Included(last)))
                        .find_map(usable)
                });
                if let Some(node) = node {
                    bests.push(Best {
                        node,
                        estimate,
                        tier: f64::from(provider_tier(&sample.registration.gpus)) / 4.0,
                        after: after.is_some(),
                    });
                    break;
                }
            }
        }
        let cheapest = bests.iter().map(|b| b.estimate).min()?;
        let w = self.weights;
        let score = |b: &Best| {
            let price = if cheapest <= 0 {
                1.0
            } else {
                b.estimate as f64 / cheapest as f64
            };
            // A model loaded already answers without a load delay: warm nodes first.
            let cold = match model_offer(spec, &b.node.registration) {
                Some(offer) if !offer.warm => 1.0,
                _ => 0.0,
            };
            cold + (f64::from(w.price) * price + f64::from(w.tier) * b.tier) / 100.0
                + rank(w, b.node)
        };
        let scores: Vec<f64> = bests.iter().map(score).collect();
        let best = scores.iter().copied().fold(f64::INFINITY, f64::min);
        // Among the tied, the first after the last pick in id order, else the first.
        bests
            .iter()
            .zip(&scores)
            .filter(|(_, s)| (*s - best).abs() < 1e-9)
            .map(|(b, _)| (!b.after, b.node.registration.node_id.as_str()))
            .min()
            .map(|(_, id)| id.to_owned())
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

    /// At most `most` nodes lost and last heard from longer than `max_age` ago.
    pub fn lost_longer_than(&self, max_age: Duration, most: usize) -> Vec<String> {
        let now = Instant::now();
        self.nodes
            .values()
            .filter(|n| n.lost && now.duration_since(n.last_seen) > max_age)
            .map(|n| n.registration.node_id.clone())
            .take(most)
            .collect()
    }

    /// Forgets those of `node_ids` that are still lost (one that registered again since
    /// stays). Returns how many were forgotten.
    pub fn forget(&mut self, node_ids: &[String]) -> usize {
        let mut forgotten = 0;
        for node_id in node_ids {
            if let Some(node) = self.nodes.get_mut(node_id)
                && node.lost
            {
                // A lost node is in no class's order already; made sure before it goes.
                refile(&mut self.ranked, self.weights, node);
                self.nodes.remove(node_id);
                forgotten += 1;
            }
        }
        forgotten
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
                refile(&mut self.ranked, self.weights, node);
                lost.push(node.registration.node_id.clone());
            }
        }
        lost
    }
}

#[cfg(test)]
mod tests;
