//! The CUDA backend plugin: its no-driver path on this machine as it is, and its GPU path
//! (detection, whole-GPU allocation, `CUDA_VISIBLE_DEVICES`, VRAM enforcement, telemetry in
//! heartbeats, GPU billing) against the NVML test double (`testbed/doubles/nvml`), the only
//! stand-in here: the plugin, the agent and the orchestrator are the real ones.

use crate::common::*;
use rhizos_broker::wire::{self, JobSpec, JobState, NodeView, Pricing, Workload};
use rhizos_testbed::doubles::{DoubleGpu, NvmlDouble};
use rhizos_testbed::{Cluster, ClusterOptions, images};
use std::time::{Duration, Instant};

const USD: i64 = 1_000_000;
const GPU_A: &str = "GPU-0a0a0a0a-1111-2222-3333-444444444444";
const GPU_B: &str = "GPU-0b0b0b0b-5555-6666-7777-888888888888";

async fn node_view(cluster: &Cluster) -> NodeView {
    cluster
        .client()
        .node_info(cluster.agents[0].node_id())
        .await
        .unwrap()
}

fn cuda_spec(args: &[&str], gpus: u32, min_vram_mib: u64) -> JobSpec {
    let program = std::fs::read(images::probe_native().expect("probe builds")).unwrap();
    JobSpec {
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        gpus,
        min_vram_mib,
        ..JobSpec::new(
            Workload::Cuda {
                program_b64: wire::b64_encode(&program),
            },
            30_000,
            64,
        )
    }
}

#[tokio::test]
async fn without_a_driver_the_cuda_plugin_loads_offers_nothing_and_says_why() {
    let cluster = Cluster::start(ClusterOptions {
        plugin_files: vec![rhizos_testbed::plugin_file("rhizos_plugin_cuda").unwrap()],
        plugin_config: [("cuda".to_owned(), serde_json::json!({"allow_native": true}))].into(),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let node = node_view(&cluster).await;
    let plugin = node
        .plugins
        .iter()
        .find(|p| p.name.as_deref() == Some("cuda"))
        .unwrap_or_else(|| panic!("cuda plugin loaded: {node:?}"));
    assert_eq!(plugin.refused, None);
    assert!(plugin.backends.is_empty(), "{plugin:?}");
    let note = plugin.note.clone().unwrap_or_default();
    assert!(note.starts_with("no NVIDIA driver (NVML: "), "{note}");
    assert!(!node.backends.contains(&"cuda".to_owned()), "{node:?}");
    assert!(node.gpus.is_empty());
    let gpu_note = node.hardware.and_then(|h| h.gpu_note).unwrap_or_default();
    assert!(
        gpu_note.starts_with("no NVIDIA driver (NVML: "),
        "{gpu_note}"
    );

    // A CUDA job has nowhere to run: refused at submit, nothing held.
    cluster.funded_account("hal", USD).await.unwrap();
    let err = cluster
        .submit(&submit_request("hal", "gpu-job", cuda_spec(&[], 1, 0), USD))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cuda"), "{err}");
    assert_eq!(cluster.balance("hal").await.unwrap().balance_micros, USD);
}

#[tokio::test]
async fn on_gpus_a_cuda_job_sees_only_its_own_is_billed_for_them_and_vram_is_enforced() {
    let double = NvmlDouble::new(&[
        DoubleGpu {
            name: "NVIDIA H100 80GB HBM3 (NVML double)",
            uuid: GPU_A,
            vram_mib: 81_559,
            compute_capability: "9.0",
        },
        DoubleGpu {
            name: "NVIDIA H100 80GB HBM3 (NVML double)",
            uuid: GPU_B,
            vram_mib: 81_559,
            compute_capability: "9.0",
        },
    ])
    .unwrap();
    let pricing = Pricing {
        gpu_hour_cents: 3_600,
        cpu_hour_cents: 3_600,
        memory_gb_hour_cents: 0,
        fuel_million_micros: 0,
        input_million_micros: 0,
        output_million_micros: 0,
    };
    let cluster = Cluster::start(ClusterOptions {
        plugin_files: vec![rhizos_testbed::plugin_file("rhizos_plugin_cuda").unwrap()],
        plugin_config: [(
            "cuda".to_owned(),
            serde_json::json!({
                "allow_native": true,
                "nvml_library": double.library(),
                "watch_interval_ms": 50,
            }),
        )]
        .into(),
        nvml_library: Some(double.library()),
        pricing,
        heartbeat_interval_ms: 200,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();

    // Detection: both GPUs with UUID, VRAM and compute capability; tier 4; driver versions;
    // telemetry arrives with heartbeats.
    let deadline = Instant::now() + Duration::from_secs(10);
    let node = loop {
        let node = node_view(&cluster).await;
        if node.gpu_telemetry.len() == 2 {
            break node;
        }
        assert!(Instant::now() < deadline, "no GPU telemetry: {node:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(node.backends.contains(&"cuda".to_owned()), "{node:?}");
    assert_eq!(node.tier, 4);
    assert_eq!(
        node.gpus
            .iter()
            .map(|g| (
                g.uuid.as_deref(),
                g.vram_mib,
                g.compute_capability.as_deref()
            ))
            .collect::<Vec<_>>(),
        [
            (Some(GPU_A), 81_559, Some("9.0")),
            (Some(GPU_B), 81_559, Some("9.0"))
        ]
    );
    assert_eq!(
        node.hardware.and_then(|h| h.gpu_driver).as_deref(),
        Some("550.54.15, CUDA 12.4")
    );
    let telemetry = &node.gpu_telemetry[0];
    assert_eq!(
        (
            telemetry.temperature_c,
            telemetry.power_mw,
            telemetry.vram_total_mib
        ),
        (41, 68_500, 81_559)
    );

    cluster.funded_account("ivy", 10 * USD).await.unwrap();
    let double_dir = double.dir().display().to_string();
    let with_double = |mut spec: JobSpec| {
        spec.env
            .insert("RHIZOS_NVML_DOUBLE_DIR".into(), double_dir.clone());
        spec
    };

    // Two jobs at once get one GPU each, and each sees only its own.
    let mut first = with_double(cuda_spec(
        &[
            "env:CUDA_VISIBLE_DEVICES",
            "vram:512",
            "sleep:600",
            "cat:input/in.txt",
            "write:output/result.txt=ok",
        ],
        1,
        1_024,
    ));
    first
        .input_files
        .insert("in.txt".into(), wire::b64_encode(b"input\n"));
    let second = with_double(cuda_spec(
        &["env:CUDA_VISIBLE_DEVICES", "sleep:600"],
        1,
        1_024,
    ));
    for (id, spec) in [("first", first), ("second", second)] {
        cluster
            .submit(&submit_request("ivy", id, spec, USD))
            .await
            .unwrap();
    }
    let first = cluster
        .wait_for_end("first", Duration::from_secs(60))
        .await
        .unwrap();
    let second = cluster
        .wait_for_end("second", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(first.state, JobState::Succeeded, "{first:?}");
    assert_eq!(second.state, JobState::Succeeded, "{second:?}");
    let seen = |job: &wire::JobView| {
        job.stdout
            .as_deref()
            .and_then(|s| s.lines().next())
            .and_then(|l| l.strip_prefix("CUDA_VISIBLE_DEVICES="))
            .map(str::to_owned)
            .unwrap_or_default()
    };
    let mut both = [seen(&first), seen(&second)];
    both.sort();
    assert_eq!(both, [GPU_A.to_owned(), GPU_B.to_owned()]);
    let stdout = first.stdout.clone().unwrap_or_default();
    assert!(stdout.ends_with("input\n"), "{stdout}");
    assert_eq!(
        first.output_files.get("result.txt").map(String::as_str),
        Some(wire::b64_encode(b"ok").as_str())
    );
    let stderr = first.stderr.clone().unwrap_or_default();
    assert!(
        stderr.contains("GPU-seconds on 1 GPU(s)") && stderr.contains("peak VRAM 512 MiB"),
        "{stderr}"
    );
    // Billed for its GPU and its core, to the micro.
    let elapsed = first.elapsed_ms.unwrap();
    assert_eq!(
        first.cost_micros,
        Some(rhizos_core::ledger::cost_micros(
            elapsed, 1, 64, 1, &pricing
        ))
    );
    assert_eq!(first.cost_micros, Some(elapsed as i64 * 20));

    // Over its VRAM limit: stopped with the exact reason, long before its 30 s sleep ends.
    cluster
        .submit(&submit_request(
            "ivy",
            "hog",
            with_double(cuda_spec(&["vram:2048", "sleep:30000"], 1, 1_024)),
            USD,
        ))
        .await
        .unwrap();
    let hog = cluster
        .wait_for_end("hog", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(hog.state, JobState::Failed, "{hog:?}");
    let reason = hog.reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with("VRAM limit exceeded: the job held 2048 MiB on GPU GPU-0")
            && reason.ends_with("its limit is 1024 MiB"),
        "{reason}"
    );
    assert!(hog.elapsed_ms.unwrap() < 10_000, "{hog:?}");
    assert_ledger_consistent(&cluster).await;
}

#[tokio::test]
async fn a_native_program_runs_under_its_own_uid_and_nothing_it_starts_outlives_it() {
    let double = NvmlDouble::new(&[DoubleGpu {
        name: "NVIDIA L4 (NVML double)",
        uuid: GPU_A,
        vram_mib: 23_034,
        compute_capability: "8.9",
    }])
    .unwrap();
    let cluster = Cluster::start(ClusterOptions {
        plugin_files: vec![rhizos_testbed::plugin_file("rhizos_plugin_cuda").unwrap()],
        plugin_config: [(
            "cuda".to_owned(),
            serde_json::json!({"allow_native": true, "nvml_library": double.library()}),
        )]
        .into(),
        nvml_library: Some(double.library()),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    cluster.funded_account("ada", 10 * USD).await.unwrap();
    let plugin_dir = cluster.plugin_dir(0);
    let ledger = cluster.ledger_path();
    let touch = format!("touch:{}/evil.so", plugin_dir.display());
    let cat = format!("cat:{}", ledger.display());
    cluster
        .submit(&submit_request(
            "ada",
            "escape",
            cuda_spec(&["id", "nnp", "daemon:60", &touch, &cat], 1, 0),
            USD,
        ))
        .await
        .unwrap();
    let job = cluster
        .wait_for_end("escape", Duration::from_secs(60))
        .await
        .unwrap();
    let stdout = job.stdout.clone().unwrap_or_default();
    let stderr = job.stderr.clone().unwrap_or_default();
    // Its own uid and gid (from first_uid), no new privileges.
    let uid: u32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("uid="))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("no uid line: {stdout}"));
    assert!((200_000..201_024).contains(&uid), "{stdout}");
    assert!(stdout.contains(&format!("gid={uid}")), "{stdout}");
    assert!(stdout.contains("NoNewPrivs:\t1"), "{stdout}");
    // It cannot write the plugin directory nor read the ledger.
    assert!(
        stdout.contains(&format!(
            "touch {}/evil.so: Permission denied",
            plugin_dir.display()
        )),
        "{stdout}"
    );
    assert!(!plugin_dir.join("evil.so").exists());
    assert!(stderr.contains("Permission denied"), "{stderr} / {stdout}");
    assert_eq!(job.exit_code, Some(2), "{job:?}");
    // The daemon it started (setsid + double fork, out of its process group) died with it.
    let daemon: i32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("daemon "))
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or_else(|| panic!("no daemon line: {stdout}"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{daemon}")).exists() {
        assert!(
            Instant::now() < deadline,
            "process {daemon} outlived its job"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_ledger_consistent(&cluster).await;
}
