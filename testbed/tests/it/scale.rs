//! The scale scenario in its short form: `rhizos-bench scale` (the real binary, the real
//! `rhizosd` as a process) over two small fleets, checked for what it must show whatever the
//! machine's speed: every job settled, the heartbeats the fleet sent absorbed, figures for
//! each size in the JSON it prints and writes, and a chart drawn in the PNG.

use std::process::Command;

#[test]
fn the_scale_scenario_measures_each_fleet_and_draws_its_chart() {
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(rhizos_testbed::build_dir().join("rhizos-bench"))
        .args(["--json", "scale", "--nodes", "100,400", "--jobs", "200"])
        .args([
            "--concurrency",
            "32",
            "--idle-s",
            "1.5",
            "--heartbeat-ms",
            "500",
        ])
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("rhizos-bench is built (cargo build --workspace)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "rhizos-bench scale failed: {stderr}"
    );
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("scale.json")).unwrap()).unwrap();
    assert_eq!(printed, written, "--json prints what scale.json holds");
    let points = printed["points"].as_array().unwrap();
    assert_eq!(
        points
            .iter()
            .map(|p| p["nodes"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [100, 400]
    );
    for point in points {
        let nodes = point["nodes"].as_f64().unwrap();
        assert_eq!(point["jobs_settled"], 200, "{point}");
        assert_eq!(point["jobs_rejected"], 0, "{point}");
        // 2 heartbeats a second per node, spread evenly: what the daemon counted over a 1.5 s
        // window is what was sent, give or take a slice at either end.
        let sent = point["heartbeats_sent_per_s"].as_f64().unwrap();
        assert_eq!(sent, nodes * 2.0);
        let absorbed = point["heartbeats_absorbed_per_s"].as_f64().unwrap();
        assert!(
            (0.75 * sent..=1.25 * sent).contains(&absorbed),
            "absorbed {absorbed}/s of {sent}/s sent: {point}"
        );
        for key in [
            "idle_cpu_percent",
            "load_cpu_percent",
            "peak_rss_mib",
            "pick_us",
        ] {
            let value = point[key].as_f64().unwrap();
            assert!(value.is_finite() && value > 0.0, "{key} = {value}: {point}");
        }
        assert!(point["submit_to_running_ms"]["samples"].as_u64().unwrap() >= 190);
        assert!(
            point["submit_to_running_ms"]["p50"].as_f64().unwrap()
                <= point["submit_to_running_ms"]["p99"].as_f64().unwrap()
        );
    }
    // The chart: a PNG of the size drawn, with lines and text on it (not a blank canvas).
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(out.path().join("scale.png")).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((frame.width, frame.height), (1500, 900));
    let inked = pixels[..frame.buffer_size()]
        .chunks(3)
        .filter(|rgb| rgb.iter().any(|&c| c < 200))
        .count();
    assert!(
        inked > 20_000,
        "the chart has only {inked} non-white pixels"
    );
}
