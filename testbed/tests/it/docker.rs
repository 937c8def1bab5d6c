//! The Docker backend plugin against the real engine of this machine, with an image the test
//! builds itself (`rhizos-test/probe`: one static binary, see `testbed/images/probe.c`).
//!
//! Every cluster here has its own node-id prefix: containers are labelled with the node id, and
//! tests run in parallel against the one engine.

use crate::common::*;
use futures::StreamExt as _;
use rhizos_broker::wire::{self, JobSpec, JobState, LogBatch, LogStream, NodeView, Workload};
use rhizos_testbed::cluster::{docker_spec, uuid_like};
use rhizos_testbed::{Cluster, ClusterOptions, images};
use std::process::Command;
use std::time::{Duration, Instant};

const USD: i64 = 1_000_000;

/// The probe image; fails the test (does not skip it) when there is no engine.
fn probe() -> String {
    assert!(
        images::docker_available(),
        "these tests need a Docker engine: `docker info` does not answer"
    );
    images::probe_image().expect("probe image builds")
}

async fn docker_cluster(prefix: &str, config: serde_json::Value) -> Cluster {
    Cluster::start(ClusterOptions {
        plugin_files: vec![rhizos_testbed::plugin_file("rhizos_plugin_docker").unwrap()],
        plugin_config: [("docker".to_owned(), config)].into(),
        node_prefix: format!("{prefix}{}", &uuid_like()[..8]),
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts")
}

/// Names of the containers (running or not) labelled with `label=value`.
fn containers_labelled(label: &str, value: &str) -> Vec<String> {
    let output = Command::new("docker")
        .args([
            "ps",
            "-a",
            "--filter",
            &format!("label={label}={value}"),
            "--format",
            "{{.Names}} {{.State}}",
        ])
        .output()
        .expect("docker ps runs");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The node's containers are all removed (right after the result: within seconds).
async fn assert_containers_removed(node: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = containers_labelled("rhizos.node", node);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "containers left behind: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn node_of(cluster: &Cluster) -> String {
    cluster.agents[0].node_id().to_owned()
}

async fn wait_running(cluster: &Cluster, job_id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job = cluster.job(job_id).await.unwrap();
        if job.state == JobState::Running {
            return;
        }
        assert!(
            Instant::now() < deadline && !job.state.is_terminal(),
            "{job_id} never ran: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_container_job_runs_sandboxed_with_env_stdin_and_files_and_settles() {
    let image = probe();
    let cluster = docker_cluster("dka", serde_json::json!({"pull": "never"})).await;
    let node = node_of(&cluster);
    cluster.funded_account("alice", 2 * USD).await.unwrap();
    let mut spec = docker_spec(
        &image,
        &[
            "out:hello from a container",
            "env:GREETING",
            "id",
            "caps",
            "nnp",
            "cat:/input/data/in.txt",
            "touch:/input/data/in.txt",
            "touch:/input/new.txt",
            "stdin",
            "write:/output/result.txt=done",
            "err:a warning",
        ],
        30_000,
    );
    spec.env.insert("GREETING".into(), "hi there".into());
    spec.stdin_b64 = Some(wire::b64_encode(b"line one\nline two\n"));
    spec.input_files
        .insert("data/in.txt".into(), wire::b64_encode(b"input content\n"));
    cluster
        .submit(&submit_request("alice", "box-1", spec, USD))
        .await
        .unwrap();
    let job = cluster
        .wait_for_end("box-1", Duration::from_secs(60))
        .await
        .unwrap();

    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert_eq!(job.exit_code, Some(0), "{job:?}");
    assert_eq!(
        job.stdout.as_deref(),
        Some(
            "hello from a container\n\
             GREETING=hi there\n\
             uid=65534 gid=65534\n\
             CapEff:\t0000000000000000\n\
             NoNewPrivs:\t1\n\
             input content\n\
             touch /input/data/in.txt: Permission denied\n\
             touch /input/new.txt: Permission denied\n\
             stdin: line one\n\
             stdin: line two\n"
        ),
        "{job:?}"
    );
    assert_eq!(job.stderr.as_deref(), Some("a warning\n"), "{job:?}");
    assert_eq!(
        job.output_files.get("result.txt").map(String::as_str),
        Some(wire::b64_encode(b"done").as_str()),
        "{job:?}"
    );
    // The measured time at $36/CPU-hour = 10 µ$/ms, to the micro; 5% of it is the fee.
    let cost = job.elapsed_ms.unwrap() as i64 * 10;
    assert!(cost > 0, "{job:?}");
    let split = rhizos_core::ledger::split(cost, USD, 500);
    assert_eq!(job.cost_micros, Some(split.cost_micros));
    assert_eq!(job.fee_micros, Some(split.fee_micros));
    assert_eq!(job.provider_micros, Some(cost - split.fee_micros));
    assert_eq!(job.refund_micros, Some(USD - cost));
    assert_ledger_consistent(&cluster).await;
    // The container is gone.
    assert_containers_removed(&node).await;
}

#[tokio::test]
async fn limits_end_container_jobs_with_exact_reasons_and_no_network_by_default() {
    let image = probe();
    let cluster = docker_cluster("dkb", serde_json::json!({"pull": "never"})).await;
    let node = node_of(&cluster);
    cluster.funded_account("bob", 10 * USD).await.unwrap();
    let mut oom = docker_spec(&image, &["alloc:256"], 30_000);
    oom.memory_mib = 32;
    // disk_mib is enforced: past it the container is killed; within it the job succeeds (its
    // 2 MiB output file comes back out of band).
    let mut disk = docker_spec(&image, &["fill:/output/big=100", "sleep:30000"], 30_000);
    disk.disk_mib = 16;
    let mut disk_ok = docker_spec(&image, &["fill:/output/ok.bin=2"], 30_000);
    disk_ok.disk_mib = 16;
    let cases: Vec<(&str, JobSpec, JobState, &str)> = vec![
        (
            "exit",
            docker_spec(&image, &["out:bye", "exit:3"], 30_000),
            JobState::Failed,
            "exited with code 3",
        ),
        (
            "sleep",
            docker_spec(&image, &["sleep:60000"], 1_500),
            JobState::Failed,
            "wall-clock deadline of 1500 ms exceeded: container killed",
        ),
        (
            "oom",
            oom,
            JobState::Failed,
            "memory limit exceeded: the container went over its 32 MiB",
        ),
        (
            "disk",
            disk,
            JobState::Failed,
            "disk quota exceeded: the container wrote",
        ),
        ("disk-ok", disk_ok, JobState::Succeeded, ""),
        (
            "missing",
            docker_spec("rhizos-test/not-built:nowhere", &[], 30_000),
            JobState::Failed,
            "image rhizos-test/not-built:nowhere is not in this node's local image store, and this node does not pull images",
        ),
        (
            "wants-net",
            JobSpec {
                workload: Workload::Docker {
                    image: image.clone(),
                    entrypoint: None,
                    workdir: None,
                    network: true,
                },
                ..docker_spec(&image, &["net"], 30_000)
            },
            JobState::Failed,
            "the job asks for network access, which this node does not give containers",
        ),
    ];
    for (name, spec, _, _) in &cases {
        cluster
            .submit(&submit_request("bob", name, spec.clone(), USD))
            .await
            .unwrap();
    }
    let started = Instant::now();
    for (name, _, state, reason) in &cases {
        let job = cluster
            .wait_for_end(name, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(job.state, *state, "{name}: {job:?}");
        let got = job.reason.clone().unwrap_or_default();
        assert!(got.contains(reason), "{name}: {got:?} lacks {reason:?}");
    }
    let disk = cluster.job("disk").await.unwrap();
    assert!(
        disk.reason
            .as_deref()
            .unwrap_or_default()
            .contains("the limit is 16 MiB"),
        "{disk:?}"
    );
    let disk_ok = cluster.job("disk-ok").await.unwrap();
    assert_eq!(
        disk_ok.blobs.files.get("ok.bin").map(|b| b.size),
        Some(2 << 20),
        "{disk_ok:?}"
    );
    // The timeout was enforced by killing the container, not by waiting for its 60 s sleep.
    assert!(started.elapsed() < Duration::from_secs(45));

    // No network: only the loopback interface, and nothing is reachable.
    cluster
        .submit(&submit_request(
            "bob",
            "net",
            docker_spec(&image, &["net"], 30_000),
            USD,
        ))
        .await
        .unwrap();
    let net = cluster
        .wait_for_end("net", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(net.state, JobState::Succeeded, "{net:?}");
    assert_eq!(
        net.stdout.as_deref(),
        Some("iface lo\nconnect: Network is unreachable\n")
    );
    assert_ledger_consistent(&cluster).await;
    assert_containers_removed(&node).await;
}

#[tokio::test]
async fn logs_stream_live_in_order_and_cancel_kills_the_container() {
    let image = probe();
    let cluster = docker_cluster("dkc", serde_json::json!({"pull": "never"})).await;
    let node = node_of(&cluster);
    cluster.funded_account("carol", 10 * USD).await.unwrap();

    // Live: the first lines arrive while the container is still running (it sleeps 20 s after).
    let mut logs = follow_logs(&cluster, "carol", "chatty").await;
    cluster
        .submit(&submit_request(
            "carol",
            "chatty",
            docker_spec(&image, &["interleave:40", "sleep:20000"], 60_000),
            USD,
        ))
        .await
        .unwrap();
    let mut received = Vec::new();
    while received.len() < 40 {
        let message = tokio::time::timeout(Duration::from_secs(20), logs.next())
            .await
            .expect("log line while the container runs")
            .unwrap();
        received.extend(
            serde_json::from_slice::<LogBatch>(&message.payload)
                .unwrap()
                .into_lines(),
        );
    }
    assert_eq!(
        cluster.job("chatty").await.unwrap().state,
        JobState::Running
    );
    let expected: Vec<(LogStream, String)> = (0..40)
        .map(|i| {
            if i % 2 == 0 {
                (LogStream::Stdout, format!("out {i}"))
            } else {
                (LogStream::Stderr, format!("err {i}"))
            }
        })
        .collect();
    // Each stream in the order written; stdout and stderr are two pipes, so across them the
    // order is the engine's order of arrival.
    for stream in [LogStream::Stdout, LogStream::Stderr] {
        let pick = |lines: Vec<(LogStream, String)>| -> Vec<String> {
            lines
                .into_iter()
                .filter(|(s, _)| *s == stream)
                .map(|(_, l)| l)
                .collect()
        };
        assert_eq!(
            pick(
                received
                    .iter()
                    .map(|l| (l.stream, l.line.clone()))
                    .collect()
            ),
            pick(expected.clone())
        );
    }
    assert_eq!(
        received.iter().map(|l| l.seq).collect::<Vec<_>>(),
        (0..40).collect::<Vec<u64>>()
    );

    // Cancel while it sleeps: the container is killed and removed, the time used is paid.
    let _: wire::JobView = cluster.client().job_cancel("chatty").await.unwrap();
    let job = cluster
        .wait_for_end("chatty", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Cancelled, "{job:?}");
    assert!(
        job.elapsed_ms.unwrap() < 15_000,
        "killed, not slept out: {job:?}"
    );
    assert_eq!(job.cost_micros, Some(job.elapsed_ms.unwrap() as i64 * 10));
    assert_ledger_consistent(&cluster).await;
    assert_containers_removed(&node).await;
}

#[tokio::test]
async fn a_node_that_allows_network_gives_it_only_to_jobs_that_ask() {
    let image = probe();
    let cluster = docker_cluster(
        "dkd",
        serde_json::json!({"pull": "never", "allow_network": true}),
    )
    .await;
    cluster.funded_account("erin", 10 * USD).await.unwrap();
    let mut asks = docker_spec(&image, &["net"], 30_000);
    asks.workload = Workload::Docker {
        image: image.clone(),
        entrypoint: None,
        workdir: None,
        network: true,
    };
    for (id, spec) in [
        ("asks", asks),
        ("quiet", docker_spec(&image, &["net"], 30_000)),
    ] {
        cluster
            .submit(&submit_request("erin", id, spec, USD))
            .await
            .unwrap();
    }
    let asks = cluster
        .wait_for_end("asks", Duration::from_secs(60))
        .await
        .unwrap();
    let quiet = cluster
        .wait_for_end("quiet", Duration::from_secs(60))
        .await
        .unwrap();
    let asks_out = asks.stdout.unwrap_or_default();
    assert!(
        asks_out.contains("iface eth0"),
        "a job that asks joins the bridge network: {asks_out}"
    );
    assert_eq!(
        quiet.stdout.as_deref(),
        Some("iface lo\nconnect: Network is unreachable\n")
    );
}

#[tokio::test]
async fn without_an_engine_the_node_offers_no_docker_and_says_why() {
    let cluster = docker_cluster(
        "dke",
        serde_json::json!({"host": "unix:///nonexistent/docker.sock"}),
    )
    .await;
    let node: NodeView = cluster
        .client()
        .node_info(&node_of(&cluster))
        .await
        .unwrap();
    assert!(!node.backends.contains(&"docker".to_owned()), "{node:?}");
    let refusal = node
        .plugins
        .iter()
        .find_map(|p| p.refused.clone())
        .unwrap_or_default();
    assert!(
        refusal.contains("no Docker engine: socket /nonexistent/docker.sock does not exist"),
        "{refusal}"
    );
    // A docker job now has nowhere to run: refused at submit with the reason.
    cluster.funded_account("fay", USD).await.unwrap();
    let err = cluster
        .submit(&submit_request(
            "fay",
            "nowhere",
            docker_spec("busybox", &[], 1_000),
            USD,
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("docker"), "{err}");
}

#[tokio::test]
async fn containers_of_a_killed_agent_are_removed_when_it_starts_again() {
    let image = probe();
    let cluster = Cluster::start(ClusterOptions {
        agents: 0,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    cluster.funded_account("gus", 10 * USD).await.unwrap();
    let node = format!("dkf{}", &uuid_like()[..8]);
    let plugin_dir = cluster.data_dir.path().join("docker-plugins");
    std::fs::create_dir_all(&plugin_dir).unwrap();
    std::fs::copy(
        rhizos_testbed::plugin_file("rhizos_plugin_docker").unwrap(),
        plugin_dir.join("librhizos_plugin_docker.so"),
    )
    .unwrap();
    let start_agent = || {
        Command::new(rhizos_testbed::build_dir().join("rhizosd"))
            .args([
                "--nats-url",
                &cluster.settings.nats.url,
                "--namespace",
                &cluster.settings.nats.namespace,
                "agent",
                "--node-id",
                &node,
                "--plugin-dir",
            ])
            .arg(&plugin_dir)
            .env("RHIZOS_AGENT__HEARTBEAT_INTERVAL_MS", "500")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("rhizosd is built (cargo build --workspace)")
    };
    let mut first = start_agent();
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.client().node_info(&node).await.is_err() {
        assert!(Instant::now() < deadline, "the agent never registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster
        .submit(&submit_request(
            "gus",
            "sleeper",
            docker_spec(&image, &["sleep:120000"], 150_000),
            5 * USD,
        ))
        .await
        .unwrap();
    wait_running(&cluster, "sleeper").await;
    // The job is `running` once the plugin took it; the container itself starts a moment later.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !containers_labelled("rhizos.node", &node)
        .iter()
        .any(|c| c.ends_with(" running"))
    {
        assert!(Instant::now() < deadline, "the container never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // kill -9: the agent cannot clean up; its container runs on.
    first.kill().unwrap();
    first.wait().unwrap();
    let left = containers_labelled("rhizos.node", &node);
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].ends_with(" running"), "{left:?}");

    let mut second = start_agent();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now: Vec<String> = containers_labelled("rhizos.node", &node)
            .into_iter()
            .filter(|c| c.starts_with(&format!("rhizos-{node}-sleeper-1 ")))
            .collect();
        if now.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "orphan never removed: {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = second.kill();
    let _ = second.wait();
    // The new agent may have been creating the job's next attempt when it was killed: give the
    // engine a moment to finish that request, then remove whatever this node left.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = Command::new("docker")
        .args(["rm", "-f", "-v"])
        .args(
            containers_labelled("rhizos.node", &node)
                .iter()
                .filter_map(|c| c.split_whitespace().next()),
        )
        .output();
}

#[tokio::test]
async fn a_read_only_node_keeps_the_root_unwritable_and_an_unreachable_registry_fails_fast() {
    let image = probe();
    let cluster = docker_cluster(
        "dkg",
        serde_json::json!({"read_only_rootfs": true, "pull": "if-missing", "pull_timeout_ms": 20000,
                           "pull_registries": ["docker.io", "127.0.0.1:1"]}),
    )
    .await;
    let node = node_of(&cluster);
    cluster.funded_account("hank", 10 * USD).await.unwrap();
    let mut spec = docker_spec(
        &image,
        &[
            "touch:/probe-was-here",
            "touch:/input/new.txt",
            "cat:/input/in.txt",
            "write:/output/out.txt=written",
        ],
        30_000,
    );
    spec.input_files
        .insert("in.txt".into(), wire::b64_encode(b"read me\n"));
    cluster
        .submit(&submit_request("hank", "ro", spec, USD))
        .await
        .unwrap();
    // A registry that refuses connections (nothing listens on port 1): the pull fails at once.
    cluster
        .submit(&submit_request(
            "hank",
            "unpullable",
            docker_spec("127.0.0.1:1/rhizos/absent:1", &[], 30_000),
            USD,
        ))
        .await
        .unwrap();
    // A registry the operator did not list: refused before the engine is asked to reach it.
    cluster
        .submit(&submit_request(
            "hank",
            "elsewhere",
            docker_spec("10.9.8.7:5000/rhizos/absent:1", &[], 30_000),
            USD,
        ))
        .await
        .unwrap();
    let ro = cluster
        .wait_for_end("ro", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(ro.state, JobState::Succeeded, "{ro:?}");
    assert_eq!(
        ro.stdout.as_deref(),
        Some(
            "touch /probe-was-here: Read-only file system\n\
             touch /input/new.txt: Permission denied\n\
             read me\n"
        )
    );
    assert_eq!(
        ro.output_files.get("out.txt").map(String::as_str),
        Some(wire::b64_encode(b"written").as_str())
    );
    let started = Instant::now();
    let unpullable = cluster
        .wait_for_end("unpullable", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(unpullable.state, JobState::Failed, "{unpullable:?}");
    let reason = unpullable.reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with(
            "image 127.0.0.1:1/rhizos/absent:1 is not in this node's local image store and could not be pulled: "
        ),
        "{reason}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    let elsewhere = cluster
        .wait_for_end("elsewhere", Duration::from_secs(60))
        .await
        .unwrap();
    let reason = elsewhere.reason.clone().unwrap_or_default();
    assert!(
        reason.contains(
            "its registry 10.9.8.7:5000 is not one this node pulls from ([agent.plugins.docker] pull_registries = [\"docker.io\", \"127.0.0.1:1\"])"
        ),
        "{reason}"
    );
    assert!(
        !elsewhere
            .stderr
            .unwrap_or_default()
            .contains("pulling image"),
        "no pull was tried"
    );
    // The pull was announced on the job's stderr.
    let stderr = unpullable.stderr.unwrap_or_default();
    assert!(
        stderr.contains("rhizos: pulling image 127.0.0.1:1/rhizos/absent:1"),
        "{stderr}"
    );
    assert_containers_removed(&node).await;
}

#[tokio::test]
async fn a_container_module_runs_only_on_the_image_its_registry_entry_names() {
    use rhizos_testbed::registry_server::{RegistryServer, Route};
    let image = probe();
    let id = String::from_utf8(
        Command::new("docker")
            .args(["image", "inspect", "--format", "{{.Id}}", &image])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_owned();
    let digest = id.trim_start_matches("sha256:").to_owned();
    let entry = |module: &str, sha: &str| {
        serde_json::json!({
            "id": module, "version": "1.0.0", "backend": "docker",
            "artifact": {"image": image, "sha256": sha},
            "args": ["out:from the registry", "env:MODE"],
            "env": {"MODE": "module"},
            "requirements": {"memory_mib": 32},
        })
        .to_string()
    };
    let route = |body: String| Route::Json {
        body,
        etag: "\"1\"".into(),
    };
    let server = RegistryServer::start(
        [
            (
                "/modules/mod-probe".to_owned(),
                route(entry("mod-probe", &digest)),
            ),
            (
                "/modules/mod-swapped".to_owned(),
                route(entry("mod-swapped", &"f".repeat(64))),
            ),
        ]
        .into(),
    )
    .unwrap();
    let resolvers = http_resolver_dir();
    let cluster = Cluster::start(ClusterOptions {
        plugin_files: vec![rhizos_testbed::plugin_file("rhizos_plugin_docker").unwrap()],
        plugin_config: [("docker".to_owned(), serde_json::json!({"pull": "never"}))].into(),
        node_prefix: format!("dkh{}", &uuid_like()[..8]),
        resolver_dir: Some(resolvers.path().to_path_buf()),
        resolver_config: [(
            "http".to_owned(),
            serde_json::json!({"base_url": server.base_url}),
        )]
        .into(),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let node = node_of(&cluster);
    cluster.funded_account("olga", 10 * USD).await.unwrap();
    for (job, uri) in [
        ("probe", "chain://mod-probe"),
        ("swapped", "chain://mod-swapped"),
    ] {
        cluster
            .submit(&submit_request(
                "olga",
                job,
                JobSpec::new(Workload::Module { uri: uri.into() }, 30_000, 16),
                USD,
            ))
            .await
            .unwrap();
    }
    let ran = cluster
        .wait_for_end("probe", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(ran.state, JobState::Succeeded, "{ran:?}");
    assert_eq!(
        ran.stdout.as_deref(),
        Some("from the registry\nMODE=module\n")
    );
    let swapped = cluster
        .wait_for_end("swapped", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(swapped.state, JobState::Failed, "{swapped:?}");
    let reason = swapped.reason.unwrap_or_default();
    assert!(
        reason.contains(&format!("artifact digest mismatch: image {image} is {id}")),
        "{reason}"
    );
    assert_eq!(swapped.stdout.as_deref().unwrap_or(""), "", "nothing ran");
    assert_ledger_consistent(&cluster).await;
    assert_containers_removed(&node).await;
}
