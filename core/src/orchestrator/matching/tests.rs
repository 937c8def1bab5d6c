//! Matching by tables: hard filters, ranking, ties, node classes, fuel budgets.

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
            input_million_micros: 0,
            output_million_micros: 0,
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
        models: vec![],
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
        err.message
            .contains("could cost up to $0.050000 at its prices, above the max cost of $0.000010"),
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

#[test]
fn artifact_sources_are_compared_as_parsed_urls_not_string_prefixes() {
    let sources = vec![
        "https://registry.example.com/artifacts/".to_owned(),
        "http://10.0.0.5:8080/mods".to_owned(),
    ];
    #[rustfmt::skip]
    let table = [
        ("https://registry.example.com/artifacts/demo.wasm", true),
        ("https://REGISTRY.example.com/artifacts/demo.wasm", true),
        ("https://registry.example.com:443/artifacts/demo.wasm", true),
        ("http://10.0.0.5:8080/mods/x.wasm", true),
        ("http://10.0.0.5:8080/mods", true),
        // another host that starts with the same text
        ("https://registry.example.com.evil.net/artifacts/demo.wasm", false),
        // credentials: the host is evil.net
        ("https://registry.example.com@evil.net/artifacts/demo.wasm", false),
        ("https://user:pw@registry.example.com/artifacts/demo.wasm", false),
        // out of the source's path by dot segments, plain or percent-encoded
        ("https://registry.example.com/artifacts/../secrets/key", false),
        ("https://registry.example.com/artifacts/%2e%2e/secrets/key", false),
        // not at a segment boundary
        ("http://10.0.0.5:8080/modsevil/x.wasm", false),
        // another scheme or port
        ("http://registry.example.com/artifacts/demo.wasm", false),
        ("https://registry.example.com:8443/artifacts/demo.wasm", false),
        ("http://10.0.0.5/mods/x.wasm", false),
        ("not a url", false),
    ];
    for (url, fetched) in table {
        assert_eq!(fetches_from(&sources, url), fetched, "{url}");
    }
    assert!(!fetches_from(
        &[],
        "https://registry.example.com/artifacts/demo.wasm"
    ));
    assert!(!fetches_from(
        &["".to_owned()],
        "https://registry.example.com/a"
    ));
}

#[test]
fn a_requeued_job_goes_to_a_node_it_has_not_failed_on_while_one_can_take_it() {
    let mut registry = Registry::new(MatchingWeights::default());
    registry.upsert(node("cheap", 1, 0, 4, 4096, 2, &[]));
    registry.upsert(node("dear", 5, 0, 4, 4096, 2, &[]));
    let job = spec(1, 128, 0, 0, &[]);
    let pick = |r: &mut Registry, avoid: &[String]| {
        r.pick_avoiding(&job, 100_000, avoid)
            .map(|n| n.registration.node_id.clone())
    };
    assert_eq!(pick(&mut registry, &[]).as_deref(), Some("cheap"));
    assert_eq!(
        pick(&mut registry, &["cheap".into()]).as_deref(),
        Some("dear")
    );
    // Only nodes it failed on: one of them rather than none.
    assert_eq!(
        pick(&mut registry, &["cheap".into(), "dear".into()]).as_deref(),
        Some("cheap")
    );
}

#[test]
fn inference_jobs_go_to_nodes_serving_their_model_warm_first_at_the_models_price() {
    use rhizos_broker::wire::{ModelOffer, Workload};
    let offer = |name: &str, warm: bool, output: u64| ModelOffer {
        backend: "openai".into(),
        service: "chat".into(),
        name: name.into(),
        context_length: 1024,
        warm,
        input_million_micros: 1_000_000,
        output_million_micros: output,
    };
    let mut registry = Registry::new(MatchingWeights::default());
    let mut cold = node("cold", 1, 0, 4, 4096, 2, &[]);
    cold.backends = vec!["openai".into()];
    cold.models = vec![offer("m", false, 1_000_000)];
    let mut warm = node("warm", 1, 0, 4, 4096, 2, &[]);
    warm.backends = vec!["openai".into()];
    warm.models = vec![offer("m", true, 2_000_000)];
    let mut other = node("other", 1, 0, 4, 4096, 2, &[]);
    other.backends = vec!["openai".into()];
    other.models = vec![offer("n", true, 1)];
    registry.upsert(cold.clone());
    registry.upsert(warm.clone());
    registry.upsert(other);
    let job = JobSpec::new(
        Workload::Inference {
            service: "chat".into(),
            model: "m".into(),
            via: String::new(),
            request: "{}".into(),
            max_input_units: 10,
            max_output_units: 10,
        },
        60_000,
        1,
    );
    // 10 in × $1/M + 10 out × $2/M = 30 micros at the warm node: it fits, and warm comes first
    // though it is dearer.
    let picked = registry
        .pick(&job, 30)
        .map(|n| n.registration.node_id.clone());
    assert_eq!(picked.as_deref(), Some("warm"));
    assert_eq!(super::estimate_micros(&job, &warm), 30);
    let agreed = super::agreed_pricing(&job, &warm);
    assert_eq!(
        (agreed.cpu_hour_cents, agreed.output_million_micros),
        (0, 2_000_000)
    );
    // 29 micros: only the cold node's price fits.
    let picked = registry
        .pick(&job, 29)
        .map(|n| n.registration.node_id.clone());
    assert_eq!(picked.as_deref(), Some("cold"));
    // A model nobody serves: refused, saying so per node.
    let mut unknown = job.clone();
    if let Workload::Inference { model, .. } = &mut unknown.workload {
        *model = "z".into();
    }
    let err = registry.feasibility(&unknown, 1_000).unwrap_err();
    assert!(
        err.message.contains("does not serve z for chat"),
        "{}",
        err.message
    );
}

#[test]
fn a_node_that_refuses_an_assignment_is_passed_over_for_a_while() {
    let mut registry = Registry::new(MatchingWeights::default());
    registry.upsert(node("picky", 1, 0, 4, 4096, 2, &[]));
    let job = spec(1, 128, 0, 0, &[]);
    let picked = |r: &mut Registry| {
        r.pick(&job, 100_000)
            .map(|n| n.registration.node_id.clone())
    };
    assert_eq!(picked(&mut registry).as_deref(), Some("picky"));
    registry.refused("picky");
    assert_eq!(
        picked(&mut registry),
        None,
        "not offered the job again at once"
    );
    std::thread::sleep(std::time::Duration::from_millis(120));
    assert_eq!(
        picked(&mut registry).as_deref(),
        Some("picky"),
        "after its pause"
    );
    registry.refused("picky");
    registry.refused("picky");
    std::thread::sleep(std::time::Duration::from_millis(120));
    assert_eq!(
        picked(&mut registry),
        None,
        "the pause grows with refusals in a row"
    );
    registry.accepted("picky");
    assert_eq!(picked(&mut registry).as_deref(), Some("picky"));
    // A new registration starts afresh too.
    registry.refused("picky");
    registry.upsert(node("picky", 1, 0, 4, 4096, 2, &[]));
    assert_eq!(picked(&mut registry).as_deref(), Some("picky"));
}

/// What a pick must choose from, by walking every node as matching did before classes kept
/// their nodes in rank order: each live node that fits and has room now (passing over `avoid`
/// while another can take the job) with its score.
fn scores_by_walking(
    registry: &Registry,
    job: &JobSpec,
    max_cost: i64,
    avoid: &[String],
) -> BTreeMap<String, f64> {
    let now = Instant::now();
    let mut candidates: Vec<(&NodeEntry, i64)> = registry
        .nodes
        .values()
        .filter(|n| !n.lost && n.cool_until.is_none_or(|until| until <= now))
        .filter_map(|n| {
            let estimate = check(job, max_cost, &n.registration).ok()?;
            has_room(job, n, fitting_gpus(job, &n.registration)).then_some((n, estimate))
        })
        .collect();
    if candidates
        .iter()
        .any(|(n, _)| !avoid.contains(&n.registration.node_id))
    {
        candidates.retain(|(n, _)| !avoid.contains(&n.registration.node_id));
    }
    let Some(cheapest) = candidates.iter().map(|(_, e)| *e).min() else {
        return BTreeMap::new();
    };
    let w = registry.weights;
    candidates
        .iter()
        .map(|(n, estimate)| {
            let price = *estimate as f64 / cheapest as f64;
            let load = f64::from(n.active()) / f64::from(n.registration.max_concurrent.max(1));
            let tier = f64::from(provider_tier(&n.registration.gpus)) / 4.0;
            let score = (f64::from(w.price) * price
                + f64::from(w.load) * load
                + f64::from(w.reputation) * (1.0 - n.reputation.clamp(0.0, 1.0))
                + f64::from(w.tier) * tier)
                / 100.0;
            (n.registration.node_id.clone(), score)
        })
        .collect()
}

/// One step of the fleet's life in [`the_ranked_pick_finds_what_walking_every_node_finds`].
#[derive(Debug, Clone)]
enum Step {
    /// Pick for a job of (cores, GPUs, max cost), avoiding node `.3` if `Some`; allocate it.
    Pick(u32, u32, i64, Option<usize>),
    Release(usize),
    Reputation(usize, u8),
    Lose(usize),
    Heartbeat(usize),
    Refuse(usize),
    /// Re-register node `.0` as the kind `.1` (of [`registration`]'s four).
    Register(usize, usize),
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        6 => (1u32..4, 0u32..2, prop_oneof![Just(10_000i64), Just(100_000), Just(10_000_000)],
              proptest::option::of(0usize..40))
            .prop_map(|(c, g, m, a)| Step::Pick(c, g, m, a)),
        3 => (0usize..40).prop_map(Step::Release),
        1 => (0usize..40, 0u8..=10).prop_map(|(n, r)| Step::Reputation(n, r)),
        1 => (0usize..40).prop_map(Step::Lose),
        1 => (0usize..40).prop_map(Step::Heartbeat),
        1 => (0usize..40).prop_map(Step::Refuse),
        1 => (0usize..40, 0usize..4).prop_map(|(n, c)| Step::Register(n, c)),
    ]
}

/// Four kinds of node: cheap small, dear small, GPU, and one priced like the first but with
/// more disk (another class whose nodes tie with the first's).
fn registration(id: usize, kind: usize) -> RegisterNode {
    let id = format!("n{id:02}");
    match kind {
        0 => node(&id, 1, 0, 4, 4096, 3, &[]),
        1 => node(&id, 3, 0, 8, 8192, 2, &[]),
        2 => node(&id, 2, 10, 8, 16384, 2, &[(24_576, "cuda")]),
        _ => RegisterNode {
            disk_mib: 20_000,
            ..node(&id, 1, 0, 4, 4096, 3, &[])
        },
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

    /// Whatever the fleet went through (jobs placed and ended, reputations, losses, refusals,
    /// re-registrations), a pick from the classes' rank orders chooses a node that walking
    /// every node scores best, and finds none only when no node can take the job.
    #[test]
    fn the_ranked_pick_finds_what_walking_every_node_finds(
        steps in proptest::collection::vec(step(), 1..200),
    ) {
        let mut registry = Registry::new(MatchingWeights::default());
        let mut held: Vec<(String, JobSpec)> = Vec::new();
        for id in 0..40 {
            registry.upsert(registration(id, id % 4));
        }
        let mut reputations = HashMap::new();
        for step in steps {
            match step {
                Step::Pick(cores, gpus, max_cost, avoid) => {
                    let job = spec(cores, 256, gpus, if gpus > 0 { 1024 } else { 0 }, &[]);
                    let avoid: Vec<String> =
                        avoid.map(|n| format!("n{n:02}")).into_iter().collect();
                    let scores = scores_by_walking(&registry, &job, max_cost, &avoid);
                    let best = scores.values().copied().min_by(f64::total_cmp);
                    let picked = registry
                        .pick_avoiding(&job, max_cost, &avoid)
                        .map(|n| n.registration.node_id.clone());
                    match (&picked, best) {
                        (None, None) => {}
                        (Some(id), Some(best)) => {
                            let score = scores.get(id).copied();
                            proptest::prop_assert!(
                                score.is_some_and(|s| (s - best).abs() < 1e-9),
                                "picked {id} scoring {score:?}, the best scores {best}: {scores:?}"
                            );
                            registry.allocate(id, &job);
                            held.push((id.clone(), job));
                        }
                        _ => proptest::prop_assert!(
                            false,
                            "picked {picked:?}, walking every node finds {scores:?}"
                        ),
                    }
                }
                Step::Release(i) => {
                    if !held.is_empty() {
                        let (id, job) = held.swap_remove(i % held.len());
                        registry.release(&id, &job);
                    }
                }
                Step::Reputation(n, r) => {
                    reputations.insert(format!("n{n:02}"), f64::from(r) / 10.0);
                    registry.set_reputations(&reputations);
                }
                Step::Lose(n) => {
                    if let Some(node) = registry.nodes.get_mut(&format!("n{n:02}")) {
                        node.last_seen = Instant::now() - Duration::from_secs(60);
                    }
                    registry.take_newly_lost(3);
                }
                Step::Heartbeat(n) => {
                    registry.heartbeat(&format!("n{n:02}"), Vec::new());
                }
                Step::Refuse(n) => registry.refused(&format!("n{n:02}")),
                Step::Register(n, kind) => registry.upsert(registration(n, kind)),
            }
        }
        // The orchestrator's refresh from the database keeps the orders true too.
        let mut per_node: BTreeMap<String, Allocation> = BTreeMap::new();
        for (id, job) in &held {
            let a = per_node.entry(id.clone()).or_default();
            a.jobs += 1;
            a.cpu_cores += job.cpu_cores;
            a.memory_mib += job.memory_mib;
            a.gpus += job.gpus;
        }
        registry.set_allocations(&per_node.into_iter().collect::<Vec<_>>());
        // Every node is filed exactly when live with a free slot, in its class, at its rank.
        for node in registry.nodes.values() {
            let id = &node.registration.node_id;
            let places: Vec<(usize, u64)> = registry
                .ranked
                .iter()
                .enumerate()
                .flat_map(|(class, order)| {
                    order
                        .iter()
                        .filter(|(_, ids)| ids.contains(id))
                        .map(move |(bits, _)| (class, *bits))
                })
                .collect();
            let expected: Vec<(usize, u64)> =
                (!node.lost && node.allocated.jobs < node.registration.max_concurrent)
                    .then(|| (node.class, rank(registry.weights, node).to_bits()))
                    .into_iter()
                    .collect();
            proptest::prop_assert_eq!(places, expected, "{}", id);
        }
    }
}

#[test]
fn ties_across_classes_are_taken_in_turn() {
    // Two classes (disk differs) at one price: six nodes tie; each is picked once in six.
    let mut registry = Registry::new(MatchingWeights::default());
    for id in 0..6 {
        registry.upsert(registration(id, if id % 2 == 0 { 0 } else { 3 }));
    }
    assert_eq!(registry.classes.len(), 2);
    let job = spec(1, 128, 0, 0, &[]);
    let picks: Vec<String> = (0..12)
        .map(|_| {
            registry
                .pick(&job, 100_000)
                .unwrap()
                .registration
                .node_id
                .clone()
        })
        .collect();
    assert_eq!(
        picks,
        [
            "n00", "n01", "n02", "n03", "n04", "n05", "n00", "n01", "n02", "n03", "n04", "n05"
        ]
    );
}

/// Only lost nodes are forgotten, only once lost long enough, and not one that registered
/// again in the meantime; a forgotten node is never picked and no longer counted.
#[test]
fn lost_nodes_are_forgotten_unless_they_registered_again() {
    let mut registry = Registry::new(MatchingWeights::default());
    let quick = |id: &str| {
        let mut registration = node(id, 1, 0, 8, 8192, 4, &[]);
        registration.heartbeat_interval_ms = 1;
        registration
    };
    for id in ["gone", "back", "live"] {
        registry.upsert(quick(id));
    }
    std::thread::sleep(std::time::Duration::from_millis(10));
    assert!(registry.heartbeat("live", Vec::new()));
    let mut lost = registry.take_newly_lost(3);
    lost.sort();
    assert_eq!(lost, ["back", "gone"]);
    assert!(
        registry
            .lost_longer_than(std::time::Duration::from_secs(60), 10)
            .is_empty(),
        "not lost long enough"
    );
    let mut old = registry.lost_longer_than(std::time::Duration::ZERO, 10);
    old.sort();
    assert_eq!(old, ["back", "gone"]);
    assert_eq!(
        registry
            .lost_longer_than(std::time::Duration::ZERO, 1)
            .len(),
        1,
        "at most as many as asked"
    );
    registry.upsert(quick("back"));
    assert_eq!(
        registry.forget(&old),
        1,
        "the one that registered again stays"
    );
    assert!(registry.get("gone").is_none() && registry.get("back").is_some());
    assert_eq!(registry.registered_count(), 2);
    for _ in 0..10 {
        let picked = registry.pick(&spec(1, 128, 0, 0, &[]), 100_000).unwrap();
        assert_ne!(picked.registration.node_id, "gone");
    }
}
