//! The chaos, cluster and partition scenarios in their short form: `rhizos-bench chaos`,
//! `rhizos-bench cluster` and `rhizos-bench partition` (the real binary; nats-servers, orchestrators and agents as real
//! processes, killed with `kill -9`), checked for what they must show whatever the machine's
//! speed: faults really happened, zero violations (every job ended, none settled twice, the
//! ledger verified, the money exact, both orchestrators' ledgers equal), and the JSON and the
//! chart written. The full runs (`--seeds 100`) are benchmark commands.

use std::process::Command;

fn scenario(args: &[&str], out: &std::path::Path, name: &str) -> serde_json::Value {
    let output = Command::new(rhizos_testbed::build_dir().join("rhizos-bench"))
        .arg("--json")
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .expect("rhizos-bench is built (cargo build --workspace)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "rhizos-bench {name} failed:\n{stdout}\n{stderr}"
    );
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join(format!("{name}.json"))).unwrap()).unwrap();
    assert_eq!(printed, written, "--json prints what {name}.json holds");
    let png = std::fs::read(out.join(format!("{name}.png"))).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a chart is drawn"
    );
    // A count (chaos, cluster: per seed in `seeds`) or the list itself (partition).
    let violations = &printed["violations"];
    let count = violations
        .as_u64()
        .or_else(|| violations.as_array().map(|list| list.len() as u64));
    assert_eq!(count, Some(0), "{printed}");
    printed
}

#[test]
fn chaos_with_seeded_kills_of_orchestrators_agents_and_nats_servers_breaks_nothing() {
    let out = tempfile::tempdir().unwrap();
    let args = ["chaos", "--seed", "7", "--seeds", "2", "--jobs", "30"];
    let report = scenario(&args, out.path(), "chaos");
    let seeds = report["seeds"].as_array().unwrap();
    assert_eq!(seeds.len(), 2);
    for seed in seeds {
        assert_eq!(
            seed["succeeded"].as_u64().unwrap() + seed["failed"].as_u64().unwrap(),
            30,
            "{seed}"
        );
        let killed = seed["faults"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| !f["killed"].is_null())
            .count();
        assert!(killed >= 1, "the seed's faults killed something: {seed}");
    }
    // The same seed draws the same faults.
    let again = scenario(
        &["chaos", "--seed", "7", "--seeds", "1", "--jobs", "30"],
        out.path(),
        "chaos",
    );
    let plan = |r: &serde_json::Value| {
        r["seeds"][0]["faults"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["victim"].to_string(),
                    f["at_s"].as_f64().unwrap().to_bits(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(plan(&again), plan(&report));
}

#[test]
fn the_cluster_scenario_loses_a_nats_server_and_carries_on() {
    let out = tempfile::tempdir().unwrap();
    let report = scenario(&["cluster", "--jobs", "30"], out.path(), "cluster");
    let seed = &report["seeds"][0];
    assert_eq!(seed["succeeded"], 30, "{seed}");
    assert_eq!(seed["faults"][0]["killed"], "nats-server 1", "{seed}");
    assert!(seed["longest_wait_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn a_node_cut_off_from_the_bus_is_requeued_once_and_never_paid_twice() {
    let out = tempfile::tempdir().unwrap();
    let report = scenario(&["partition", "--jobs", "8"], out.path(), "partition");
    let cut = report["running_when_cut"].as_array().unwrap().len();
    assert!(cut >= 1, "a job was running on the cut node: {report}");
    assert_eq!(report["requeued_once"], cut, "{report}");
    assert!(
        report["late_reports_refused"].as_u64().unwrap() >= cut as u64,
        "{report}"
    );
    assert_eq!(report["succeeded"], 8, "{report}");
}
