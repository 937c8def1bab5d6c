//! Jobs end to end: success with exact money, failures with full refunds, insufficient funds.

use crate::common::*;
use futures::StreamExt as _;
use rhizos_broker::wire::{ErrorCode, JobState, LogBatch, LogStream, Pricing};
use rhizos_core::ledger;
use rhizos_testbed::cluster::wasm_spec;
use rhizos_testbed::{Cluster, ClusterOptions};
use std::time::Duration;

const USD: i64 = 1_000_000;

#[tokio::test]
async fn demo_job_succeeds_streams_logs_in_order_and_settles_to_the_micro() {
    let cluster = cluster().await;
    cluster.funded_account("alice", 2 * USD).await.unwrap();
    let mut logs = follow_logs(&cluster, "alice", "demo-1").await;

    let request = submit_request(
        "alice",
        "demo-1",
        wasm_spec(&demo(), &["hello", "tester"], 30_000),
        USD,
    );
    let reply = cluster.submit(&request).await.unwrap();
    assert_eq!(reply.job_id, "demo-1");
    // Nothing queued ahead and an idle node: placed in the operation that accepted it.
    assert_eq!(reply.state, JobState::Assigned);
    let job = cluster
        .wait_for_end("demo-1", Duration::from_secs(60))
        .await
        .unwrap();

    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert_eq!(job.exit_code, Some(0));
    let expected: Vec<String> = std::iter::once("Hello from RhizOS, tester!".to_owned())
        .chain((1..=5).map(|i| format!("working... step {i}/5")))
        .chain(std::iter::once("done".to_owned()))
        .collect();
    assert_eq!(
        job.stdout.as_deref(),
        Some(format!("{}\n", expected.join("\n")).as_str())
    );

    // Every line arrived, in order, with gapless sequence numbers.
    let mut received = Vec::new();
    while received.len() < expected.len() {
        let message = tokio::time::timeout(Duration::from_secs(5), logs.next())
            .await
            .expect("log line")
            .unwrap();
        received.extend(
            serde_json::from_slice::<LogBatch>(&message.payload)
                .unwrap()
                .into_lines(),
        );
    }
    assert_eq!(
        received.iter().map(|l| l.seq).collect::<Vec<_>>(),
        (0..expected.len() as u64).collect::<Vec<_>>()
    );
    assert!(
        received
            .iter()
            .all(|l| l.stream == LogStream::Stdout && l.attempt == 1)
    );
    assert_eq!(
        received.iter().map(|l| l.line.clone()).collect::<Vec<_>>(),
        expected
    );

    // The money, to the micro: cost = run time × 1 core × $36/h = 10 micro-USD per ms.
    let elapsed_ms = job.elapsed_ms.expect("run time recorded");
    assert!(
        elapsed_ms >= 500,
        "the demo sleeps 5 × 100 ms, ran {elapsed_ms} ms"
    );
    let pricing = Pricing {
        gpu_hour_cents: 0,
        cpu_hour_cents: 3_600,
        memory_gb_hour_cents: 0,
        fuel_million_micros: 0,
        input_million_micros: 0,
        output_million_micros: 0,
    };
    let cost = ledger::cost_micros(elapsed_ms, 1, 64, 0, &pricing);
    assert_eq!(cost, elapsed_ms as i64 * 10);
    let fee = (cost * 500 + 5_000) / 10_000;
    assert_eq!(job.cost_micros, Some(cost));
    assert_eq!(job.fee_micros, Some(fee));
    assert_eq!(job.provider_micros, Some(cost - fee));
    assert_eq!(job.refund_micros, Some(USD - cost));

    let balances = balances(&cluster);
    assert_eq!(balances["alice"], 2 * USD - cost);
    assert_eq!(balances["provider-0"], cost - fee);
    assert_eq!(balances[ledger::PLATFORM_FEES], fee);
    assert_eq!(balances["escrow:demo-1"], 0);
    assert_eq!(balances[ledger::EXTERNAL], -2 * USD);
    assert_eq!(ledger_kinds(&cluster, "demo-1"), ["hold", "settle"]);
    assert_eq!(cluster.balance("alice").await.unwrap().held_micros, 0);
    assert_ledger_consistent(&cluster).await;
    cluster.shutdown().await.unwrap();
}

/// A failed workload (its own exit, trap, deadline, memory or fuel limit, invalid module)
/// ends `failed` with its reason and pays for the time it used, never more than its timeout
/// (`failed_workload_charge = "time_used"`, the default).
#[tokio::test]
async fn failing_workloads_fail_with_their_reason_and_pay_for_the_time_they_used() {
    let cluster = cluster().await;
    cluster.funded_account("bob", 5 * USD).await.unwrap();
    let module = demo();
    let mut big = wasm_spec(&module, &["alloc", "256"], 30_000);
    big.memory_mib = 32;
    let cases = [
        ("trap", wasm_spec(&module, &["trap"], 30_000), "wasm trap"),
        (
            "exit",
            wasm_spec(&module, &["exit", "3"], 30_000),
            "exited with code 3",
        ),
        (
            "spin",
            wasm_spec(&module, &["spin"], 500),
            "wall-clock deadline of 500 ms exceeded",
        ),
        (
            "sleep",
            wasm_spec(&module, &["sleep", "60000"], 500),
            "wall-clock deadline of 500 ms exceeded",
        ),
        ("alloc", big, "memory limit exceeded"),
        (
            "fuel",
            rhizos_broker::wire::JobSpec {
                fuel_limit: Some(2_000_000),
                ..wasm_spec(&module, &["spin"], 30_000)
            },
            "fuel limit of 2000000 units exhausted",
        ),
        (
            "garbage",
            wasm_spec(b"(module (func (i32.bogus)))", &[], 1_000),
            "invalid WASM module",
        ),
        (
            "nostart",
            wasm_spec(b"(module)", &[], 1_000),
            "exports no `_start`",
        ),
    ];
    for (name, spec, _) in &cases {
        cluster
            .submit(&submit_request("bob", name, spec.clone(), 400_000))
            .await
            .unwrap();
    }
    let mut charged = Vec::new();
    for (name, _, reason) in &cases {
        let job = cluster
            .wait_for_end(name, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(job.state, JobState::Failed, "{name}: {job:?}");
        let got = job.reason.clone().unwrap_or_default();
        assert!(
            got.contains(reason),
            "{name}: reason {got:?} should contain {reason:?}"
        );
        let (cost, fee, provider, refund) = (
            job.cost_micros.unwrap(),
            job.fee_micros.unwrap(),
            job.provider_micros.unwrap(),
            job.refund_micros.unwrap(),
        );
        assert_eq!((cost + refund, provider + fee), (400_000, cost), "{name}");
        assert_eq!(fee, (cost * 500 + 5_000) / 10_000, "{name}: 5% half up");
        assert_eq!(ledger_kinds(&cluster, name), ["hold", "settle"], "{name}");
        charged.push((*name, cost, provider, fee));
    }
    let cost_of = |wanted: &str| charged.iter().find(|(name, ..)| *name == wanted).unwrap().1;
    // The 500 ms deadlines ran their whole timeout and no more: 500 ms × 10 micro-USD.
    assert_eq!(cost_of("spin"), 5_000);
    assert_eq!(cost_of("sleep"), 5_000);
    assert!(cost_of("fuel") > 0, "the fuel job spun until its limit");
    let fuel_job = cluster.job("fuel").await.unwrap();
    assert_eq!(
        fuel_job.fuel_consumed,
        Some(2_000_000),
        "burned exactly its limit"
    );
    let exit_job = cluster.job("exit").await.unwrap();
    assert_eq!(exit_job.exit_code, Some(3));
    assert_eq!(
        exit_job.stderr.as_deref(),
        Some("exiting with code 3 as asked\n")
    );

    let books = balances(&cluster);
    let total = |pick: fn(&(&str, i64, i64, i64)) -> i64| charged.iter().map(pick).sum::<i64>();
    assert_eq!(books["bob"], 5 * USD - total(|c| c.1));
    assert_eq!(books["provider-0"], total(|c| c.2));
    assert_eq!(books[ledger::PLATFORM_FEES], total(|c| c.3));
    assert_ledger_consistent(&cluster).await;
    cluster.shutdown().await.unwrap();

    // `failed_workload_charge = "none"`: the same failure is refunded in full.
    let cluster = Cluster::start(ClusterOptions {
        failed_workload_charge: rhizos_broker::config::FailedWorkloadCharge::None,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    cluster.funded_account("bob", 5 * USD).await.unwrap();
    let spec = wasm_spec(&module, &["exit", "3"], 30_000);
    let job = run_to_end(&cluster, "bob", "exit", spec, 400_000).await;
    assert_eq!(
        (job.state, job.cost_micros, job.refund_micros),
        (JobState::Failed, Some(0), Some(400_000))
    );
    assert_eq!(ledger_kinds(&cluster, "exit"), ["hold", "refund"]);
    assert_eq!(balances(&cluster)["bob"], 5 * USD);
    assert_ledger_consistent(&cluster).await;
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn insufficient_balance_is_rejected_and_nothing_is_held() {
    let cluster = cluster().await;
    cluster.funded_account("carol", 1_000).await.unwrap();
    let request = submit_request("carol", "too-dear", wasm_spec(&demo(), &[], 100), 5_000);
    let error = cluster.submit(&request).await.unwrap_err();
    let remote = error.remote().expect("an error reply");
    assert_eq!(remote.code, ErrorCode::InsufficientFunds);
    assert!(
        remote.message.contains("carol has $0.001000"),
        "{}",
        remote.message
    );

    let account = cluster.balance("carol").await.unwrap();
    assert_eq!((account.balance_micros, account.held_micros), (1_000, 0));
    let not_found = cluster.job("too-dear").await.unwrap_err().to_string();
    assert!(not_found.contains("no job too-dear"), "{not_found}");
    assert!(ledger_kinds(&cluster, "too-dear").is_empty());
    assert!(!balances(&cluster).contains_key("escrow:too-dear"));

    // Unknown accounts are refused the same way.
    let error = cluster
        .submit(&submit_request(
            "nobody",
            "j2",
            wasm_spec(&demo(), &[], 100),
            5_000,
        ))
        .await
        .unwrap_err();
    assert_eq!(error.remote().unwrap().code, ErrorCode::NotFound);
    assert_ledger_consistent(&cluster).await;
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn cancelling_a_running_job_stops_it_and_charges_the_time_used() {
    let cluster = cluster().await;
    cluster.funded_account("dan", USD).await.unwrap();
    cluster
        .submit(&submit_request(
            "dan",
            "long",
            wasm_spec(&demo(), &["sleep", "60000"], 60_000),
            USD,
        ))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while cluster.job("long").await.unwrap().state != JobState::Running {
        assert!(std::time::Instant::now() < deadline, "job never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.client().job_cancel("long").await.unwrap();
    let job = cluster
        .wait_for_end("long", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Cancelled, "{job:?}");
    let cost = job.cost_micros.unwrap();
    assert_eq!(cost, job.elapsed_ms.unwrap() as i64 * 10);
    assert!(cost >= 3_000, "ran at least 300 ms: {cost}");
    assert_eq!(balances(&cluster)["dan"], USD - cost);

    // Cancelling before start refunds everything; cancelling an ended job is an error.
    let error = cluster.client().job_cancel("long").await.unwrap_err();
    assert_eq!(error.remote().unwrap().code, ErrorCode::InvalidState);
    assert_ledger_consistent(&cluster).await;
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn queue_and_total_timeouts_end_jobs_as_timed_out_with_the_right_money() {
    let options = rhizos_testbed::ClusterOptions {
        max_concurrent: 1,
        ..Default::default()
    };
    let cluster = rhizos_testbed::Cluster::start(options).await.unwrap();
    cluster.funded_account("lee", USD).await.unwrap();
    // Runs until its total timeout stops it: it pays for the time it used.
    let mut long = wasm_spec(&demo(), &["sleep", "60000"], 30_000);
    long.total_timeout_ms = Some(1_500);
    cluster
        .submit(&submit_request("lee", "overdue", long, 400_000))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while cluster.job("overdue").await.unwrap().state != JobState::Running {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The only slot is busy: this one waits, and gives up after its queue timeout, refunded.
    let mut waiting = wasm_spec(&demo(), &["count", "1"], 1_000);
    waiting.queue_timeout_ms = Some(300);
    cluster
        .submit(&submit_request("lee", "starved", waiting, 50_000))
        .await
        .unwrap();

    let starved = cluster
        .wait_for_end("starved", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(starved.state, JobState::TimedOut, "{starved:?}");
    assert!(starved.reason.unwrap().contains("queue timeout of 300 ms"));
    assert_eq!(
        (starved.cost_micros, starved.refund_micros),
        (Some(0), Some(50_000))
    );

    let overdue = cluster
        .wait_for_end("overdue", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(overdue.state, JobState::TimedOut, "{overdue:?}");
    assert_eq!(
        overdue.reason.as_deref(),
        Some("stopped at the job's total timeout")
    );
    let cost = overdue.cost_micros.unwrap();
    assert_eq!(cost, overdue.elapsed_ms.unwrap() as i64 * 10);
    assert!(cost > 0 && cost < 400_000, "paid for the time used: {cost}");
    assert_eq!(balances(&cluster)["lee"], USD - cost);
    assert_ledger_consistent(&cluster).await;
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_node_pricing_fuel_bills_the_exact_deterministic_fuel_burned() {
    // Fuel only: 250 micro-USD per million units, nothing per hour.
    let pricing = Pricing {
        gpu_hour_cents: 0,
        cpu_hour_cents: 0,
        memory_gb_hour_cents: 0,
        fuel_million_micros: 250,
        input_million_micros: 0,
        output_million_micros: 0,
    };
    let cluster = rhizos_testbed::Cluster::start(rhizos_testbed::ClusterOptions {
        pricing,
        ..rhizos_testbed::ClusterOptions::default()
    })
    .await
    .unwrap();
    cluster.funded_account("fay", USD).await.unwrap();
    let module = demo();
    let mut burned = Vec::new();
    for name in ["fuel-a", "fuel-b"] {
        cluster
            .submit(&submit_request(
                "fay",
                name,
                wasm_spec(&module, &["count", "3"], 30_000),
                100_000,
            ))
            .await
            .unwrap();
        let job = cluster
            .wait_for_end(name, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
        let fuel = job.fuel_consumed.expect("the wasm backend meters fuel");
        assert!(fuel > 1_000, "{fuel}");
        let cost = ledger::fuel_cost_micros(fuel, &pricing);
        assert_eq!(cost, (fuel * 250).div_ceil(1_000_000) as i64);
        let fee = (cost * 500 + 5_000) / 10_000;
        assert_eq!(
            (
                job.cost_micros,
                job.fee_micros,
                job.provider_micros,
                job.refund_micros
            ),
            (
                Some(cost),
                Some(fee),
                Some(cost - fee),
                Some(100_000 - cost)
            ),
            "{name}"
        );
        burned.push(fuel);
    }
    assert_eq!(
        burned[0], burned[1],
        "the same job burns the same fuel: deterministic billing"
    );

    // Without a fuel limit, the job may burn only what its max cost pays for: 20 micro-USD at
    // 250 per million = 80,000 units.
    cluster
        .submit(&submit_request(
            "fay",
            "capped",
            wasm_spec(&module, &["spin"], 30_000),
            20,
        ))
        .await
        .unwrap();
    let job = cluster
        .wait_for_end("capped", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Failed, "{job:?}");
    assert_eq!(
        job.reason.as_deref(),
        Some("fuel limit of 80000 units exhausted")
    );
    assert_eq!(job.fuel_consumed, Some(80_000));
    assert_eq!(
        (job.cost_micros, job.refund_micros),
        (Some(20), Some(0)),
        "it burned all the fuel its max cost pays for, and pays for it"
    );
    assert_ledger_consistent(&cluster).await;
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn wasi_preview2_command_components_run_as_jobs_with_the_same_limits() {
    let cluster = cluster().await;
    cluster.funded_account("gus", 5 * USD).await.unwrap();
    let component = std::fs::read(
        rhizos_testbed::guests::demo_component().expect("the demo builds for wasm32-wasip2"),
    )
    .unwrap();
    assert_eq!(
        &component[4..8],
        &[0x0d, 0, 1, 0],
        "a component, not a core module"
    );
    let cases = [
        ("p2-hello", wasm_spec(&component, &["hello", "p2"], 30_000)),
        ("p2-exit", wasm_spec(&component, &["exit", "3"], 30_000)),
        (
            "p2-fuel",
            rhizos_broker::wire::JobSpec {
                fuel_limit: Some(3_000_000),
                ..wasm_spec(&component, &["spin"], 30_000)
            },
        ),
    ];
    for (name, spec) in &cases {
        cluster
            .submit(&submit_request("gus", name, spec.clone(), 400_000))
            .await
            .unwrap();
    }
    let hello = cluster
        .wait_for_end("p2-hello", Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(hello.state, JobState::Succeeded, "{hello:?}");
    assert!(
        hello
            .stdout
            .as_deref()
            .unwrap_or_default()
            .starts_with("Hello from RhizOS, p2!\n"),
        "{hello:?}"
    );
    assert!(
        hello.fuel_consumed.unwrap_or(0) > 0,
        "fuel is metered for components too"
    );
    let exit = cluster
        .wait_for_end("p2-exit", Duration::from_secs(60))
        .await
        .unwrap();
    // WASI 0.2's `exit` carries success or failure only (exit codes are an unstable extension
    // the Rust toolchain does not emit): `exit(3)` reaches the host as failure, code 1.
    assert_eq!(
        (exit.state, exit.exit_code),
        (JobState::Failed, Some(1)),
        "{exit:?}"
    );
    assert_eq!(
        exit.stderr.as_deref(),
        Some("exiting with code 3 as asked\n")
    );
    let fuel = cluster
        .wait_for_end("p2-fuel", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(fuel.state, JobState::Failed, "{fuel:?}");
    assert_eq!(
        fuel.reason.as_deref(),
        Some("fuel limit of 3000000 units exhausted")
    );
    // Charged for the time it spun (the workload's own limit), the rest refunded.
    assert_eq!(
        fuel.cost_micros.unwrap() + fuel.refund_micros.unwrap(),
        400_000
    );
    assert_eq!(ledger_kinds(&cluster, "p2-fuel"), ["hold", "settle"]);
    assert_ledger_consistent(&cluster).await;
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn input_files_are_read_only_and_output_files_come_back_with_the_result() {
    let cluster = cluster().await;
    cluster.funded_account("hana", 5 * USD).await.unwrap();
    let module = demo();
    let component = std::fs::read(rhizos_testbed::guests::demo_component().unwrap()).unwrap();
    let text = "first line\nsecond line\nthird\n";
    for (name, bytes) in [("files-p1", &module), ("files-p2", &component)] {
        let spec = rhizos_broker::wire::JobSpec {
            input_files: [(
                "data/in.txt".to_owned(),
                rhizos_broker::wire::b64_encode(text.as_bytes()),
            )]
            .into(),
            ..wasm_spec(bytes, &["upper", "data/in.txt", "result/out.txt"], 30_000)
        };
        cluster
            .submit(&submit_request("hana", name, spec, 400_000))
            .await
            .unwrap();
        let job = cluster
            .wait_for_end(name, Duration::from_secs(120))
            .await
            .unwrap();
        assert_eq!(job.state, JobState::Succeeded, "{name}: {job:?}");
        let outputs: Vec<(String, String)> = job
            .output_files
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    String::from_utf8(rhizos_broker::wire::b64_decode("f", v).unwrap()).unwrap(),
                )
            })
            .collect();
        assert_eq!(
            outputs,
            [
                ("result/out.txt".to_owned(), text.to_uppercase()),
                ("result/out.txt.lines".to_owned(), "3".to_owned()),
            ],
            "{name}"
        );
    }
    // /input is read-only.
    let spec = rhizos_broker::wire::JobSpec {
        input_files: [("a.txt".to_owned(), rhizos_broker::wire::b64_encode(b"x"))].into(),
        ..wasm_spec(&module, &["write-input", "a.txt"], 30_000)
    };
    cluster
        .submit(&submit_request("hana", "ro", spec, 400_000))
        .await
        .unwrap();
    let job = cluster
        .wait_for_end("ro", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        (job.state, job.exit_code),
        (JobState::Failed, Some(5)),
        "{job:?}"
    );
    assert!(
        job.stdout
            .as_deref()
            .unwrap_or_default()
            .starts_with("refused: ")
    );
    assert!(job.output_files.is_empty());
    // Names that could escape the input directory are refused at submit.
    for bad in ["../x", "/etc/passwd", "a//b", "./a"] {
        let spec = rhizos_broker::wire::JobSpec {
            input_files: [(bad.to_owned(), rhizos_broker::wire::b64_encode(b"x"))].into(),
            ..wasm_spec(&module, &["hello"], 30_000)
        };
        let error = cluster
            .submit(&submit_request("hana", "escape", spec, 400_000))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("not a plain relative path"),
            "{bad}: {error}"
        );
    }
    assert_ledger_consistent(&cluster).await;
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_cli_transcript_of_a_waited_job_reads_in_order() {
    // `rhizos job submit --wait` as a user runs it, stdout and stderr on one pipe: the job's
    // output lines reach the CLI straight from the agent and can beat the `running` event (it
    // goes through the orchestrator's commit and outbox); the CLI holds them until it is shown.
    let cluster = cluster().await;
    cluster.funded_account("carol", 2 * USD).await.unwrap();
    let rhizos = rhizos_testbed::build_dir().join("rhizos");
    let module = rhizos_testbed::guests::demo_wasm().unwrap();
    let output = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(r#""$0" job submit --account carol --wasm "$1" --max-cost 1 --wait 2>&1"#)
        .arg(&rhizos)
        .arg(&module)
        .env("RHIZOS_NATS_URL", &cluster.settings.nats.url)
        .env("RHIZOS_NAMESPACE", &cluster.settings.nats.namespace)
        .output()
        .await
        .expect("rhizos is built (cargo build --workspace)");
    let transcript = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}\n{transcript}");
    let at = |needle: &str| {
        transcript
            .find(needle)
            .unwrap_or_else(|| panic!("{needle:?} missing from:\n{transcript}"))
    };
    assert!(at("· assigned on ") < at("· running on "), "{transcript}");
    assert!(
        at("· running on ") < at("Hello from RhizOS"),
        "{transcript}"
    );
    assert!(
        at("Hello from RhizOS") < at("working... step 1/5"),
        "{transcript}"
    );
    assert!(at("working... step 5/5") < at("succeeded"), "{transcript}");
    assert!(transcript.contains("refund:"), "{transcript}");
}

/// A guest printing in a loop streams only its log budget (then one notice), in batches; the
/// result still has the tail of everything it printed.
#[tokio::test]
async fn a_log_flood_streams_only_the_jobs_budget_and_keeps_the_tail() {
    let cluster = Cluster::start(ClusterOptions {
        max_log_lines: Some(100),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    cluster.funded_account("flo", USD).await.unwrap();
    let mut logs = follow_logs(&cluster, "flo", "flood").await;
    cluster
        .submit(&submit_request(
            "flo",
            "flood",
            wasm_spec(&demo(), &["count", "20000"], 30_000),
            USD,
        ))
        .await
        .unwrap();
    let job = cluster
        .wait_for_end("flood", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert!(
        job.stdout
            .as_deref()
            .unwrap()
            .ends_with("line 19999\nline 20000\n"),
        "the tail of everything printed"
    );
    let mut received = Vec::new();
    let mut messages = 0;
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(500), logs.next()).await
    {
        messages += 1;
        received.extend(
            serde_json::from_slice::<LogBatch>(&message.payload)
                .unwrap()
                .into_lines(),
        );
    }
    assert_eq!(received.len(), 101, "100 lines and the budget notice");
    assert_eq!(
        received.iter().map(|l| l.seq).collect::<Vec<_>>(),
        (0..=100).collect::<Vec<_>>()
    );
    assert_eq!(received[99].line, "line 100");
    let notice = &received[100];
    assert_eq!(notice.stream, LogStream::Stderr);
    assert!(
        notice.line.contains("live log budget (100 lines"),
        "{notice:?}"
    );
    assert!(messages <= received.len(), "{messages} messages");
    cluster.shutdown().await.unwrap();
}

/// A guest filling /output past its quota is stopped with the reason, not left to fill the
/// provider's disk.
#[tokio::test]
async fn a_guest_filling_its_output_dir_is_stopped_at_the_quota() {
    let cluster = cluster().await;
    cluster.funded_account("dee", USD).await.unwrap();
    let spec = wasm_spec(&demo(), &["fill", "4096"], 60_000);
    let job = run_to_end(&cluster, "dee", "fill", spec, USD).await;
    assert_eq!(job.state, JobState::Failed, "{job:?}");
    let reason = job.reason.unwrap_or_default();
    assert!(reason.contains("disk quota exceeded"), "{reason}");
    assert!(reason.contains("the quota is 64 MiB"), "{reason}");
    assert!(job.output_files.is_empty(), "a 64 MiB file is not returned");
    cluster.shutdown().await.unwrap();
}
