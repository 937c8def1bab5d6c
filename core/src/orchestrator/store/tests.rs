//! Unit tests of the store against real SQLite files: exact money, replays, migrations, group
//! commit, and a property test over random operation sequences.

use super::schema::SCHEMA;
use super::*;
use rhizos_broker::config::FailedWorkloadCharge;
use rhizos_broker::wire::{
    ErrorCode, ExecutionOutcome, ExecutionRef, ExitKind, JobState, Pricing, RegisterNode,
    WIRE_VERSION, Workload,
};
use rusqlite::Connection;

/// The wire error a store error becomes at the orchestrator's API edge.
trait Wire {
    fn wire(self) -> rhizos_broker::wire::WireError;
}

impl Wire for StoreError {
    fn wire(self) -> rhizos_broker::wire::WireError {
        self.into()
    }
}

const PRICING: Pricing = Pricing {
    gpu_hour_cents: 0,
    cpu_hour_cents: 3_600,
    memory_gb_hour_cents: 0,
    fuel_million_micros: 0,
    input_million_micros: 0,
    output_million_micros: 0,
};

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("ledger.db"), 500).unwrap();
    (dir, store)
}

fn spec() -> JobSpec {
    JobSpec::new(
        Workload::Wasm {
            module_b64: "AGFzbQ==".into(),
        },
        10_000,
        64,
    )
}

fn node(store: &mut Store) {
    store
        .upsert_node(&RegisterNode {
            v: WIRE_VERSION,
            node_id: "n1".into(),
            provider_account: "prov".into(),
            backends: vec!["wasm".into()],
            pricing: PRICING,
            cpu_cores: 2,
            memory_mib: 1024,
            max_concurrent: 2,
            heartbeat_interval_ms: 1000,
            plugins: vec![],
            running: Vec::<ExecutionRef>::new(),
            gpus: vec![],
            disk_mib: 0,
            hardware: None,
            artifact_sources: vec![],
            models: vec![],
        })
        .unwrap();
}

fn exited(code: i32, elapsed_ms: u64) -> ExecutionOutcome {
    ExecutionOutcome {
        fuel_consumed: None,
        output_files: Default::default(),
        kind: ExitKind::Exited,
        exit_code: Some(code),
        message: None,
        elapsed_ms,
        stdout: "out\n".into(),
        stderr: String::new(),
        blobs: Default::default(),
        usage: None,
    }
}

fn balance(store: &Store, account: &str) -> i64 {
    ledger::balance(store.connection(), account)
        .unwrap()
        .unwrap_or(0)
}

#[test]
fn hold_settle_and_replays_move_money_exactly_once() {
    let (_dir, mut store) = store();
    node(&mut store);
    store.create_account("u").unwrap();
    store.deposit("u", 1_000_000, Some("d1")).unwrap();
    store.deposit("u", 1_000_000, Some("d1")).unwrap(); // replayed deposit: no change
    assert_eq!(balance(&store, "u"), 1_000_000);

    let (job, created) = store.submit("j1", "u", &spec(), 200_000).unwrap();
    assert!(created);
    assert_eq!(job.state, JobState::Pending);
    let (_, created_again) = store.submit("j1", "u", &spec(), 200_000).unwrap();
    assert!(!created_again, "resubmitting the same id returns the job");
    assert_eq!(balance(&store, "u"), 800_000);
    assert_eq!(balance(&store, "escrow:j1"), 200_000);

    let attempt = store.assign("j1", "n1", &PRICING, None).unwrap().unwrap();
    assert_eq!(attempt, 1);
    assert_eq!(
        store.assign("j1", "n1", &PRICING, None).unwrap(),
        None,
        "only pending jobs are assigned"
    );
    assert_eq!(
        store.mark_running("j1", "n1", 1).unwrap(),
        ReportEffect::Applied
    );
    assert_eq!(
        store.mark_running("j1", "n1", 1).unwrap(),
        ReportEffect::Duplicate
    );

    // 1 234 ms at 10 micro-USD/ms = 12 340; fee 5% = 617; provider 11 723; refund 187 660.
    assert_eq!(
        store
            .finish("j1", "n1", 1, &exited(0, 1_234), 1024)
            .unwrap(),
        ReportEffect::Applied
    );
    let job = store.get_job("j1").unwrap();
    assert_eq!(
        (
            job.state,
            job.cost_micros,
            job.fee_micros,
            job.provider_micros,
            job.refund_micros
        ),
        (
            JobState::Succeeded,
            Some(12_340),
            Some(617),
            Some(11_723),
            Some(187_660)
        )
    );
    assert_eq!(
        store
            .finish("j1", "n1", 1, &exited(0, 99_999), 1024)
            .unwrap(),
        ReportEffect::Duplicate
    );
    assert!(matches!(
        store.finish("j1", "n1", 2, &exited(0, 1), 1024).unwrap(),
        ReportEffect::Stale(_)
    ));
    assert!(matches!(
        store.finish("j1", "n2", 1, &exited(0, 1), 1024).unwrap(),
        ReportEffect::Stale(_)
    ));

    assert_eq!(balance(&store, "u"), 1_000_000 - 12_340);
    assert_eq!(balance(&store, "prov"), 11_723);
    assert_eq!(balance(&store, ledger::PLATFORM_FEES), 617);
    assert_eq!(balance(&store, "escrow:j1"), 0);
    assert_eq!(balance(&store, ledger::EXTERNAL), -1_000_000);
    assert!(ledger::verify(store.connection()).unwrap().is_ok());
    // Events: pending, held, assigned, running, succeeded, settled — in that order, on the
    // subjects the publisher puts them on.
    let namespace = rhizos_broker::Subjects::new("t").unwrap();
    let subjects: Vec<String> = store
        .outbox_batch(100)
        .unwrap()
        .into_iter()
        .map(|r| {
            crate::orchestrator::outbox::encode(&namespace, r.event)
                .unwrap()
                .0
        })
        .collect();
    assert_eq!(
        subjects,
        [
            "rhizos.evt.v1.t.u.u.job.pending.j1",
            "rhizos.evt.v1.t.u.u.escrow.held.j1",
            "rhizos.evt.v1.t.u.u.job.assigned.j1",
            "rhizos.evt.v1.t.u.u.job.running.j1",
            "rhizos.evt.v1.t.u.u.job.succeeded.j1",
            "rhizos.evt.v1.t.u.u.escrow.settled.j1",
        ]
    );
}

#[test]
fn failures_and_early_cancels_refund_in_full_and_late_cancels_pay_for_time() {
    let (_dir, mut store) = store();
    node(&mut store);
    store.create_account("u").unwrap();
    store.deposit("u", 1_000_000, None).unwrap();
    store.set_charge_policy(ChargePolicy {
        failed_workload: FailedWorkloadCharge::None,
        ..ChargePolicy::default()
    });
    for id in ["fail", "early", "late"] {
        store.submit(id, "u", &spec(), 100_000).unwrap();
    }
    store.assign("fail", "n1", &PRICING, None).unwrap();
    store
        .finish("fail", "n1", 1, &exited(7, 1_500), 1024)
        .unwrap();
    let failed = store.get_job("fail").unwrap();
    assert_eq!(
        (failed.state, failed.refund_micros, failed.cost_micros),
        (JobState::Failed, Some(100_000), Some(0)),
        "failed_workload_charge = none refunds a failed workload"
    );
    assert_eq!(failed.reason.as_deref(), Some("exited with code 7"));

    let cancelled = store.cancel("early").unwrap();
    assert_eq!(cancelled.job.state, JobState::Cancelled);
    assert_eq!(cancelled.stop, None);

    store.assign("late", "n1", &PRICING, None).unwrap();
    store.mark_running("late", "n1", 1).unwrap();
    let effect = store.cancel("late").unwrap();
    assert_eq!(effect.stop, Some(("n1".to_owned(), 1)));
    assert_eq!(
        effect.job.state,
        JobState::Running,
        "ends when the node confirms"
    );
    let stopped = ExecutionOutcome {
        fuel_consumed: None,
        output_files: Default::default(),
        kind: ExitKind::Cancelled,
        exit_code: None,
        message: None,
        ..exited(0, 300)
    };
    store.finish("late", "n1", 1, &stopped, 1024).unwrap();
    let late = store.get_job("late").unwrap();
    assert_eq!(
        (late.state, late.cost_micros, late.fee_micros),
        (JobState::Cancelled, Some(3_000), Some(150))
    );
    assert_eq!(
        store.cancel("late").unwrap_err().wire().code,
        ErrorCode::InvalidState
    );

    assert_eq!(balance(&store, "u"), 1_000_000 - 3_000);
    assert_eq!(store.account("u").unwrap().held_micros, 0);
    assert!(ledger::verify(store.connection()).unwrap().is_ok());
    assert!(
        store.verify().unwrap().ok,
        "{:?}",
        store.verify().unwrap().problems
    );
}

#[test]
fn a_failed_workload_pays_for_the_time_it_used_and_a_node_fault_is_requeued_unpaid() {
    let (_dir, mut store) = store();
    node(&mut store);
    store.create_account("u").unwrap();
    store.deposit("u", 1_000_000, None).unwrap();
    let mut spec = spec();
    spec.max_retries = 1;
    for id in ["exit1", "fault", "fault-again"] {
        store.submit(id, "u", &spec, 100_000).unwrap();
        store.assign(id, "n1", &PRICING, None).unwrap();
        store.mark_running(id, "n1", 1).unwrap();
    }
    // Default policy (time_used): the work was done, written and returned; it is paid.
    store
        .finish("exit1", "n1", 1, &exited(1, 1_500), 1024)
        .unwrap();
    let job = store.get_job("exit1").unwrap();
    assert_eq!(
        (
            job.state,
            job.cost_micros,
            job.fee_micros,
            job.refund_micros
        ),
        (JobState::Failed, Some(15_000), Some(750), Some(85_000))
    );
    assert_eq!(balance(&store, "prov"), 14_250);
    // The node's own failure: requeued with the hold intact, nothing paid, a retry spent.
    let engine = ExecutionOutcome {
        kind: ExitKind::NodeError,
        exit_code: None,
        message: Some("lost track of the container".into()),
        ..exited(0, 1_500)
    };
    store.finish("fault", "n1", 1, &engine, 1024).unwrap();
    let job = store.get_job("fault").unwrap();
    assert_eq!((job.state, job.cost_micros), (JobState::Pending, None));
    assert!(
        job.reason.as_deref().unwrap().starts_with(
            "the node could not run it: lost track of the container (node n1); requeued (retry 1 of 1)"
        ),
        "{:?}",
        job.reason
    );
    assert_eq!(balance(&store, "escrow:fault"), 100_000);
    // The retry fails the same way: no retries left, ended and refunded in full.
    store.assign("fault", "n1", &PRICING, None).unwrap();
    store.finish("fault", "n1", 2, &engine, 1024).unwrap();
    let job = store.get_job("fault").unwrap();
    assert_eq!(
        (job.state, job.cost_micros, job.refund_micros),
        (JobState::Failed, Some(0), Some(100_000))
    );
    // Stopped by the node though nobody asked: the node's fault too.
    let unasked = ExecutionOutcome {
        kind: ExitKind::Cancelled,
        exit_code: None,
        ..exited(0, 1_000)
    };
    store
        .finish("fault-again", "n1", 1, &unasked, 1024)
        .unwrap();
    assert_eq!(
        store.get_job("fault-again").unwrap().state,
        JobState::Pending
    );
    assert_eq!(balance(&store, "prov"), 14_250, "node faults pay nothing");
    assert!(
        store.verify().unwrap().ok,
        "{:?}",
        store.verify().unwrap().problems
    );
}

#[test]
fn a_node_cannot_bill_more_than_the_orchestrator_measured() {
    let (_dir, mut store) = store();
    node(&mut store);
    store.create_account("u").unwrap();
    store.deposit("u", 10_000_000, None).unwrap();
    let fuel_pricing = Pricing {
        fuel_million_micros: 1_000_000,
        ..PRICING
    };
    // Reported run times far beyond what passed since the assignment (a moment ago), beyond
    // the job's timeout, and fuel beyond the limit sent.
    store.submit("liar", "u", &spec(), 5_000_000).unwrap();
    store
        .assign("liar", "n1", &fuel_pricing, Some(300))
        .unwrap();
    store.mark_running("liar", "n1", 1).unwrap();
    let claimed = ExecutionOutcome {
        fuel_consumed: Some(u64::MAX),
        ..exited(0, u64::MAX)
    };
    store.finish("liar", "n1", 1, &claimed, 1024).unwrap();
    let job = store.get_job("liar").unwrap();
    assert_eq!(
        job.elapsed_ms,
        Some(i64::MAX as u64),
        "the report is kept as reported"
    );
    let closed = store.closed_job("liar").unwrap();
    let billed = closed.billed_elapsed_ms.unwrap();
    // Slack 2 000 ms plus the few ms this test took between assign and finish.
    assert!((2_000..2_500).contains(&billed), "billed {billed} ms");
    // 10 micros per ms of CPU plus 300 fuel units at 1 micro each, not the 5 000 000 hold.
    assert_eq!(job.cost_micros, Some(billed as i64 * 10 + 300));
    assert_eq!(closed.fee_bps, Some(500));
    let report = store.verify().unwrap();
    assert!(report.ok, "{:?}", report.problems);

    // A lie written behind the store's back is found by ledger verify: cost, bounds, fee and
    // the provider paid.
    let conn = store.connection();
    conn.execute(
        "UPDATE jobs SET billed_elapsed_ms = 9000000 WHERE id = 'liar'",
        [],
    )
    .unwrap();
    let problems = store.verify().unwrap().problems;
    assert!(
        problems
            .iter()
            .any(|p| p.contains("billed 9000000 ms, more than timeout_ms")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("its billed usage costs")),
        "{problems:?}"
    );
    conn.execute(
        &format!("UPDATE jobs SET billed_elapsed_ms = {billed}, fee_bps = 100, provider_account = 'mallory' WHERE id = 'liar'"),
        [],
    )
    .unwrap();
    let problems = store.verify().unwrap().problems;
    assert!(
        problems.iter().any(|p| p.contains("round_half_up")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("escrow → provider recorded at assignment")),
        "{problems:?}"
    );
}

#[test]
fn node_stats_count_every_attempt_and_rate_the_last_hundred() {
    let (_dir, mut store) = store();
    node(&mut store);
    store.create_account("u").unwrap();
    store.deposit("u", 100_000_000, None).unwrap();
    // 20 attempts lost with the node, then 100 successes: the window has only successes.
    let mut spec = spec();
    spec.max_retries = 0;
    for index in 0..20 {
        let id = format!("lost-{index}");
        store.submit(&id, "u", &spec, 100_000).unwrap();
        assert_eq!(store.assign(&id, "n1", &PRICING, None).unwrap(), Some(1));
        store.requeue_or_fail(&id, 1, "node n1 was lost").unwrap();
    }
    let stats = store.node_stats().unwrap();
    assert_eq!(stats["n1"], (20, 0, 0.0));
    for index in 0..100 {
        let id = format!("ok-{index}");
        store.submit(&id, "u", &spec, 100_000).unwrap();
        assert_eq!(store.assign(&id, "n1", &PRICING, None).unwrap(), Some(1));
        store.mark_running(&id, "n1", 1).unwrap();
        store.finish(&id, "n1", 1, &exited(0, 10), 1024).unwrap();
        if index == 49 {
            // 20 failed + 50 succeeded in the window.
            let (ended, succeeded, reputation) = store.node_stats().unwrap()["n1"];
            assert_eq!((ended, succeeded), (70, 50));
            assert!((reputation - 50.0 / 70.0).abs() < 1e-12, "{reputation}");
        }
    }
    // A replayed result counts once.
    store
        .finish("ok-99", "n1", 1, &exited(0, 10), 1024)
        .unwrap();
    assert_eq!(store.node_stats().unwrap()["n1"], (120, 100, 1.0));
    // A job's own non-zero exit is not the node's fault: counted as ended, rating unchanged.
    store.submit("bad", "u", &spec, 100_000).unwrap();
    store.assign("bad", "n1", &PRICING, None).unwrap();
    store.mark_running("bad", "n1", 1).unwrap();
    store.finish("bad", "n1", 1, &exited(3, 10), 1024).unwrap();
    assert_eq!(store.node_stats().unwrap()["n1"], (121, 100, 1.0));
}

#[test]
fn an_older_database_is_migrated_with_its_node_stats_filled_in() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    {
        // The schema as first released: no queue_timeout_ms column, no node_stats table.
        let conn = Connection::open(&path).unwrap();
        let old = SCHEMA
            .replace("    queue_timeout_ms INTEGER,\n", "")
            .replace("    fuel_consumed INTEGER,\n", "")
            .replace("    output_files TEXT,\n", "")
            .split("CREATE TABLE IF NOT EXISTS node_stats")
            .next()
            .unwrap()
            .to_owned();
        assert!(!old.contains("queue_timeout_ms") && !old.contains("fuel_consumed INTEGER"));
        conn.execute_batch(&old).unwrap();
        conn.execute_batch(
            "INSERT INTO attempts VALUES ('a', 1, 'n1', 'node_failed', 1),
                                             ('b', 1, 'n1', 'succeeded', 2),
                                             ('c', 1, 'n1', 'succeeded', 3),
                                             ('d', 1, 'n1', 'job_failed', 4),
                                             ('e', 1, 'n2', 'succeeded', 5)",
        )
        .unwrap();
    }
    let mut store = Store::open(&path, 500).unwrap();
    let stats = store.node_stats().unwrap();
    let (ended, succeeded, reputation) = stats["n1"];
    assert_eq!((ended, succeeded), (4, 2));
    assert!((reputation - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(stats["n2"], (1, 1, 1.0));
    // The new column works, and opening again changes nothing.
    store.create_account("u").unwrap();
    store.deposit("u", 1_000_000, None).unwrap();
    let mut spec = spec();
    spec.queue_timeout_ms = Some(5);
    store.submit("j", "u", &spec, 100_000).unwrap();
    drop(store);
    let store = Store::open(&path, 500).unwrap();
    assert_eq!(store.node_stats().unwrap()["n1"].0, 4);
    assert_eq!(store.queue_expired(now_ms() + 10, 60_000).unwrap().len(), 1);
}

#[test]
fn queue_expiry_uses_the_jobs_own_timeout_or_the_default() {
    let (_dir, mut store) = store();
    store.create_account("u").unwrap();
    store.deposit("u", 1_000_000, None).unwrap();
    let mut own = spec();
    own.queue_timeout_ms = Some(1_000);
    store.submit("own", "u", &own, 100_000).unwrap();
    store.submit("default", "u", &spec(), 100_000).unwrap();
    let since = store.get_job("own").unwrap().created_ms;
    assert!(
        store
            .queue_expired(since + 1_000, 5_000)
            .unwrap()
            .is_empty(),
        "not past it yet"
    );
    assert_eq!(
        store.queue_expired(since + 1_001, 5_000).unwrap(),
        vec![("own".to_owned(), 1_000)]
    );
    let mut expired: Vec<(String, u64)> = store.queue_expired(since + 5_001 + 100, 5_000).unwrap();
    expired.sort();
    assert_eq!(
        expired,
        [("default".to_owned(), 5_000), ("own".to_owned(), 1_000)]
    );
    // A job no longer pending never expires.
    node(&mut store);
    store.assign("own", "n1", &PRICING, None).unwrap();
    assert_eq!(store.queue_expired(u64::MAX / 2, 5_000).unwrap().len(), 1);
}

#[test]
fn lost_attempts_are_requeued_with_the_hold_intact_until_retries_run_out() {
    let (_dir, mut store) = store();
    node(&mut store);
    store.create_account("u").unwrap();
    store.deposit("u", 1_000_000, None).unwrap();
    let mut spec = spec();
    spec.max_retries = 2;
    store.submit("j", "u", &spec, 100_000).unwrap();
    for attempt in 1..=2 {
        assert_eq!(
            store.assign("j", "n1", &PRICING, None).unwrap(),
            Some(attempt)
        );
        assert_eq!(
            store
                .requeue_or_fail("j", attempt, "node n1 was lost")
                .unwrap(),
            Some(JobState::Pending)
        );
        assert_eq!(
            balance(&store, "escrow:j"),
            100_000,
            "the hold stays while the job moves"
        );
        assert_eq!(
            store.requeue_or_fail("j", attempt, "again").unwrap(),
            None,
            "stale attempt ignored"
        );
    }
    let job = store.get_job("j").unwrap();
    assert_eq!(
        job.reason.as_deref(),
        Some("node n1 was lost; requeued (retry 2 of 2)")
    );
    assert_eq!(store.assign("j", "n1", &PRICING, None).unwrap(), Some(3));
    assert_eq!(
        store.requeue_or_fail("j", 3, "node n1 was lost").unwrap(),
        Some(JobState::Failed)
    );
    let job = store.get_job("j").unwrap();
    assert_eq!(
        (job.state, job.refund_micros),
        (JobState::Failed, Some(100_000))
    );
    assert_eq!(
        job.reason.as_deref(),
        Some("node n1 was lost; no retries left (2 allowed)")
    );
    assert_eq!(balance(&store, "u"), 1_000_000);
    assert!(ledger::verify(store.connection()).unwrap().is_ok());
}

#[test]
fn a_group_commit_keeps_each_operation_all_or_nothing() {
    let (_dir, mut store) = store();
    node(&mut store);
    let (results, commit) = store.group_commit(|store| {
        (
            store.create_account("g").map(|_| ()),
            store.deposit("g", 50, Some("once")).map(|_| ()),
            store.submit("too-dear", "g", &spec(), 51).map(|_| ()),
            store.submit("fits", "g", &spec(), 40).map(|_| ()),
        )
    });
    assert_eq!(commit, Ok(()));
    assert!(results.0.is_ok() && results.1.is_ok() && results.3.is_ok());
    assert_eq!(
        results.2.unwrap_err().wire().code,
        ErrorCode::InsufficientFunds
    );
    assert!(
        store.find_job("too-dear").unwrap().is_none(),
        "the failed op left nothing"
    );
    assert_eq!(store.get_job("fits").unwrap().state, JobState::Pending);
    assert_eq!(balance(&store, "g"), 10);
    assert!(store.verify().unwrap().ok);
    // Outside a batch, each op commits on its own.
    store.deposit("g", 5, None).unwrap();
    assert_eq!(balance(&store, "g"), 15);
}

#[test]
fn a_lean_unit_that_fails_after_writing_rolls_its_whole_batch_back() {
    let (_dir, mut store) = store();
    store.create_account("u").unwrap();
    let (deposited, commit) = store.group_commit(|store| {
        let deposited = store.deposit("u", 7, None).is_ok();
        // A write, then the unit ends without committing (an error or panic half-way).
        let (unit, _) = store.begin_lean().unwrap();
        ledger::ensure_account(&unit, "half-made", ledger::AccountKind::User, 1).unwrap();
        drop(unit);
        deposited
    });
    assert!(deposited, "the other operation ran");
    assert!(commit.unwrap_err().to_string().contains("rolled back"));
    assert_eq!(balance(&store, "u"), 0, "nothing of the batch stayed");
    assert_eq!(
        ledger::balance(store.connection(), "half-made").unwrap(),
        None
    );
    // A lean unit that refuses before writing leaves its batch alone, and the next batch
    // commits as usual.
    let ((), commit) = store.group_commit(|store| {
        store.deposit("u", 3, None).unwrap();
        let (unit, _) = store.begin_lean().unwrap();
        let _ = ledger::balance(&unit, "u").unwrap();
        drop(unit);
    });
    assert_eq!(commit, Ok(()));
    assert_eq!(balance(&store, "u"), 3);
    assert!(store.verify().unwrap().ok);
}

#[test]
fn insufficient_funds_leave_no_trace() {
    let (_dir, mut store) = store();
    store.create_account("u").unwrap();
    store.deposit("u", 10, None).unwrap();
    let error = store.submit("j", "u", &spec(), 11).unwrap_err().wire();
    assert_eq!(error.code, ErrorCode::InsufficientFunds);
    assert!(error.message.contains("10"), "{}", error.message);
    assert!(store.find_job("j").unwrap().is_none());
    assert_eq!(ledger::balance(store.connection(), "u").unwrap(), Some(10));
    assert_eq!(
        ledger::balance(store.connection(), "escrow:j").unwrap(),
        None
    );
    assert!(store.outbox_batch(10).unwrap().is_empty());
    assert_eq!(
        store.create_account("u").unwrap_err().wire().code,
        ErrorCode::AlreadyExists
    );
    assert_eq!(
        store.deposit("nobody", 5, None).unwrap_err().wire().code,
        ErrorCode::NotFound
    );
    // Also inside a group commit: the failed operation's savepoint undoes it alone.
    let (results, commit) = store.group_commit(|store| {
        (
            store.submit("g1", "u", &spec(), 11).is_err(),
            store.submit("g2", "u", &spec(), 4).is_ok(),
        )
    });
    assert_eq!((results, commit), ((true, true), Ok(())));
    assert_eq!(ledger::balance(store.connection(), "u").unwrap(), Some(6));
    assert!(store.find_job("g1").unwrap().is_none());
}

/// Property test: whatever happens, in whatever order, the money adds up.
mod properties {
    use super::super::nodes::reputation;
    use super::*;
    use crate::ledger::escrow_account;
    use proptest::prelude::*;

    const PRICING: Pricing = Pricing {
        gpu_hour_cents: 0,
        cpu_hour_cents: 3_600,
        memory_gb_hour_cents: 0,
        fuel_million_micros: 0,
        input_million_micros: 0,
        output_million_micros: 0,
    };
    const NODES: [&str; 2] = ["n0", "n1"];
    const INITIAL_DEPOSIT: i64 = 300_000;
    const USERS: [&str; 2] = ["u0", "u1"];

    #[derive(Debug, Clone)]
    enum Op {
        Deposit {
            user: usize,
            amount: i64,
        },
        Submit {
            user: usize,
            max_cost: i64,
            retries: u32,
        },
        Assign {
            job: usize,
            node: usize,
        },
        Running {
            job: usize,
        },
        Finish {
            job: usize,
            exit_code: i32,
            elapsed_ms: u64,
            replay: bool,
        },
        Cancelled {
            job: usize,
        },
        NodeLost {
            job: usize,
        },
        Cancel {
            job: usize,
        },
        StaleReport {
            job: usize,
            elapsed_ms: u64,
        },
        QueueTimeout {
            job: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => (0..2usize, 1..500_000i64).prop_map(|(user, amount)| Op::Deposit { user, amount }),
            3 => (0..2usize, 1..200_000i64, 0..3u32).prop_map(|(user, max_cost, retries)| Op::Submit {
                user,
                max_cost,
                retries
            }),
            3 => (0..3usize, 0..2usize).prop_map(|(job, node)| Op::Assign { job, node }),
            2 => (0..3usize).prop_map(|job| Op::Running { job }),
            3 => (
                0..3usize,
                prop_oneof![Just(0), Just(0), Just(1), Just(137)],
                0..50_000u64,
                any::<bool>()
            )
                .prop_map(|(job, exit_code, elapsed_ms, replay)| Op::Finish {
                    job,
                    exit_code,
                    elapsed_ms,
                    replay
                }),
            1 => (0..3usize).prop_map(|job| Op::Cancelled { job }),
            1 => (0..3usize).prop_map(|job| Op::NodeLost { job }),
            1 => (0..3usize).prop_map(|job| Op::Cancel { job }),
            1 => (0..3usize, 0..50_000u64)
                .prop_map(|(job, elapsed_ms)| Op::StaleReport { job, elapsed_ms }),
            1 => (0..3usize).prop_map(|job| Op::QueueTimeout { job }),
        ]
    }

    fn outcome(kind: ExitKind, exit_code: Option<i32>, elapsed_ms: u64) -> ExecutionOutcome {
        ExecutionOutcome {
            kind,
            exit_code,
            message: None,
            elapsed_ms,
            fuel_consumed: None,
            output_files: Default::default(),
            stdout: String::new(),
            stderr: String::new(),
            blobs: Default::default(),
            usage: None,
        }
    }

    fn setup() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("ledger.db"), 500).unwrap();
        for (index, node) in NODES.iter().enumerate() {
            store
                .upsert_node(&RegisterNode {
                    v: WIRE_VERSION,
                    node_id: (*node).into(),
                    provider_account: format!("prov{index}"),
                    backends: vec!["wasm".into()],
                    pricing: PRICING,
                    cpu_cores: 4,
                    memory_mib: 4096,
                    max_concurrent: 8,
                    heartbeat_interval_ms: 1000,
                    plugins: vec![],
                    running: Vec::<ExecutionRef>::new(),
                    gpus: vec![],
                    disk_mib: 0,
                    hardware: None,
                    artifact_sources: vec![],
                    models: vec![],
                })
                .unwrap();
        }
        for user in USERS {
            store.create_account(user).unwrap();
            store.deposit(user, INITIAL_DEPOSIT, None).unwrap();
        }
        (dir, store)
    }

    /// The node and attempt the job currently has, if any.
    fn current(store: &Store, job_id: &str) -> Option<(String, u32)> {
        store.current_execution(job_id).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        #[test]
        fn every_sequence_keeps_the_ledger_invariants(
            ops in proptest::collection::vec(op(), 10..80),
            batched in any::<bool>(),
        ) {
            let (_dir, mut store) = setup();
            let mut jobs: Vec<String> = Vec::new();
            let mut deposited = INITIAL_DEPOSIT * USERS.len() as i64;
            for op in ops {
                // Batched: each step runs as the ledger writer runs it, inside a group commit,
                // where lean operations have no savepoint: none may refuse after writing.
                if batched {
                    store.conn.execute_batch("BEGIN IMMEDIATE").unwrap();
                    store.grouped = true;
                }
                let step = format!("{op:?}");
                match op {
                    Op::Deposit { user, amount } => {
                        store.deposit(USERS[user], amount, None).unwrap();
                        deposited += amount;
                    }
                    Op::Submit { user, max_cost, retries } => {
                        let id = format!("j{}", jobs.len());
                        let spec = JobSpec { max_retries: retries, ..JobSpec::new(Workload::Wasm { module_b64: "AGFzbQ==".into() }, 10_000, 64) };
                        match store.submit(&id, USERS[user], &spec, max_cost) {
                            Ok(_) => jobs.push(id),
                            Err(e) => prop_assert_eq!(e.wire().code, ErrorCode::InsufficientFunds),
                        }
                    }
                    Op::Assign { job, node } => {
                        if let Some(id) = jobs.get(job) {
                            store.assign(id, NODES[node], &PRICING, None).unwrap();
                        }
                    }
                    Op::Running { job } => {
                        if let Some(id) = jobs.get(job) && let Some((node, attempt)) = current(&store, id) {
                            store.mark_running(id, &node, attempt).unwrap();
                        }
                    }
                    Op::Finish { job, exit_code, elapsed_ms, replay } => {
                        if let Some(id) = jobs.get(job) && let Some((node, attempt)) = current(&store, id) {
                            let report = outcome(ExitKind::Exited, Some(exit_code), elapsed_ms);
                            prop_assert_eq!(store.finish(id, &node, attempt, &report, 1024).unwrap(), ReportEffect::Applied);
                            let after = store.get_job(id).unwrap();
                            if replay {
                                let replayed = store.finish(id, &node, attempt, &report, 1024).unwrap();
                                prop_assert_eq!(replayed, ReportEffect::Duplicate);
                                prop_assert_eq!(store.get_job(id).unwrap(), after);
                            }
                        }
                    }
                    Op::Cancelled { job } => {
                        if let Some(id) = jobs.get(job) && let Some((node, attempt)) = current(&store, id) {
                            store.finish(id, &node, attempt, &outcome(ExitKind::Cancelled, None, 700), 1024).unwrap();
                        }
                    }
                    Op::NodeLost { job } => {
                        if let Some(id) = jobs.get(job) && let Some((_, attempt)) = current(&store, id) {
                            store.requeue_or_fail(id, attempt, "node lost").unwrap();
                        }
                    }
                    Op::Cancel { job } => {
                        if let Some(id) = jobs.get(job) {
                            let _ = store.cancel(id);
                        }
                    }
                    Op::StaleReport { job, elapsed_ms } => {
                        if let Some(id) = jobs.get(job) {
                            let before = store.get_job(id).unwrap();
                            let attempt = before.attempt + 5;
                            let report = outcome(ExitKind::Exited, Some(0), elapsed_ms);
                            prop_assert!(matches!(store.finish(id, "n0", attempt, &report, 1024).unwrap(), ReportEffect::Stale(_)));
                            prop_assert_eq!(store.get_job(id).unwrap(), before);
                        }
                    }
                    Op::QueueTimeout { job } => {
                        if let Some(id) = jobs.get(job) && store.get_job(id).unwrap().state == JobState::Pending {
                            store.end_with_refund(id, JobState::TimedOut, "queue timeout").unwrap();
                        }
                    }
                }
                if batched {
                    store.grouped = false;
                    prop_assert!(
                        !store.broken.load(std::sync::atomic::Ordering::Relaxed),
                        "{step} failed after writing inside a group commit"
                    );
                    store.conn.execute_batch("COMMIT").unwrap();
                }
                let report = store.verify().unwrap();
                prop_assert!(report.ok, "{:?}", report.problems);
            }
            // Conservation: what came in is exactly what the users, escrows, providers and the
            // platform hold now.
            let held: i64 = jobs.iter().map(|id| ledger::balance(store.connection(), &escrow_account(id)).unwrap().unwrap_or(0)).sum();
            let users: i64 = USERS.iter().map(|u| ledger::balance(store.connection(), u).unwrap().unwrap_or(0)).sum();
            let providers: i64 = (0..2).map(|i| ledger::balance(store.connection(), &format!("prov{i}")).unwrap().unwrap_or(0)).sum();
            let fees = ledger::balance(store.connection(), ledger::PLATFORM_FEES).unwrap().unwrap_or(0);
            prop_assert_eq!(users + held + providers + fees, deposited);
            prop_assert_eq!(ledger::balance(store.connection(), ledger::EXTERNAL).unwrap(), Some(-deposited));
            // Every ended job: its split matches the postings it made.
            for id in &jobs {
                let job = store.get_job(id).unwrap();
                if job.state.is_terminal() {
                    let (cost, fee, provider, refund) = (job.cost_micros.unwrap(), job.fee_micros.unwrap(), job.provider_micros.unwrap(), job.refund_micros.unwrap());
                    prop_assert_eq!(cost + refund, job.max_cost_micros);
                    prop_assert_eq!(provider + fee, cost);
                    prop_assert_eq!(fee, (cost * 500 + 5_000) / 10_000);
                }
            }
            // The running node totals agree with the attempts they summarise.
            let mut expected = std::collections::HashMap::<String, (u64, u64, String)>::new();
            let mut rows = store.connection().prepare("SELECT node_id, outcome FROM attempts ORDER BY rowid").unwrap();
            for row in rows.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).unwrap() {
                let (node, outcome) = row.unwrap();
                let entry = expected.entry(node).or_default();
                entry.0 += 1;
                entry.1 += u64::from(outcome == "succeeded");
                match outcome.as_str() { "succeeded" => entry.2.push('s'), "node_failed" => entry.2.push('f'), _ => {} }
            }
            drop(rows);
            let stats = store.node_stats().unwrap();
            prop_assert_eq!(stats.len(), expected.len());
            for (node, (ended, succeeded, recent)) in expected {
                let recent = &recent[recent.len().saturating_sub(REPUTATION_WINDOW)..];
                prop_assert_eq!(stats[&node], (ended, succeeded, reputation(recent)));
            }
        }
    }
}

#[test]
fn outbox_rows_from_before_domain_events_survive_the_migration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    {
        // A database at schema version 1 with an event waiting in its outbox, as that release
        // wrote it: subject and wire payload.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(ledger::SCHEMA).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.execute_batch(
            "INSERT INTO outbox (subject, payload, created_ms)
             VALUES ('rhizos.evt.v1.t.job.pending.old', x'7b7d', 1);
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let mut store = Store::open(&path, 500).unwrap();
    let version: u32 = store
        .connection()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, super::schema::SCHEMA_VERSION);
    store.create_account("u").unwrap();
    store.deposit("u", 100, None).unwrap();
    store.submit("new", "u", &spec(), 10).unwrap();
    let rows = store.outbox_batch(10).unwrap();
    assert_eq!(
        rows[0].event,
        OutboxEvent::Encoded {
            subject: "rhizos.evt.v1.t.job.pending.old".into(),
            payload: b"{}".to_vec()
        }
    );
    assert!(
        matches!(&rows[1].event, OutboxEvent::Domain(Recorded { event: DomainEvent::Job { job_id, state: JobState::Pending, .. }, .. }) if job_id == "new"),
        "{:?}",
        rows[1].event
    );
    assert_eq!(rows.len(), 3, "pending, held");
    // A database from a newer release is refused, not misread.
    drop(store);
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let error = Store::open(&path, 500).err().unwrap().to_string();
    assert!(error.contains("newer RhizOS"), "{error}");
}

#[test]
fn a_job_id_is_reused_only_by_a_retry_of_the_same_request() {
    let (_dir, mut store) = store();
    store.create_account("u").unwrap();
    store.deposit("u", 1_000_000, None).unwrap();
    let (_, created) = store.submit("j", "u", &spec(), 100_000).unwrap();
    assert!(created);
    // The same request again: the job it made, nothing held twice.
    let (job, created) = store.submit("j", "u", &spec(), 100_000).unwrap();
    assert!(!created);
    assert_eq!(job.job_id, "j");
    assert_eq!(balance(&store, "u"), 900_000);
    // Anything else under that id is refused, not answered with the other job.
    let mut other = spec();
    other.args = vec!["different".into()];
    let error = store.submit("j", "u", &other, 100_000).unwrap_err().wire();
    assert_eq!(error.code, ErrorCode::AlreadyExists);
    assert!(
        error.message.contains("choose another id"),
        "{}",
        error.message
    );
    assert_eq!(
        store
            .submit("j", "u", &spec(), 99_999)
            .unwrap_err()
            .wire()
            .code,
        ErrorCode::AlreadyExists
    );
    store.create_account("v").unwrap();
    store.deposit("v", 1_000_000, None).unwrap();
    assert_eq!(
        store
            .submit("j", "v", &spec(), 100_000)
            .unwrap_err()
            .wire()
            .code,
        ErrorCode::AlreadyExists
    );
    assert_eq!(balance(&store, "u"), 900_000);
    assert_eq!(balance(&store, "v"), 1_000_000);
    assert!(store.verify().unwrap().ok);
}

#[test]
fn a_withdrawal_pays_out_once_per_key_and_never_below_zero_or_into_escrow() {
    let (_dir, mut store) = store();
    store.create_account("u").unwrap();
    store.deposit("u", 1_000, Some("d")).unwrap();
    store.submit("j", "u", &spec(), 300).unwrap();
    // 700 is the account's; the 300 held for the job is not.
    let error = store.withdraw("u", 701, "too-much").unwrap_err().wire();
    assert_eq!(
        error.code,
        ErrorCode::InsufficientFunds,
        "{}",
        error.message
    );
    assert_eq!(balance(&store, "u"), 700);
    assert_eq!(store.withdraw("u", 400, "w1").unwrap().balance_micros, 300);
    // A retry with the same key pays nothing more, even for another amount.
    assert_eq!(store.withdraw("u", 400, "w1").unwrap().balance_micros, 300);
    assert_eq!(store.withdraw("u", 999, "w1").unwrap().balance_micros, 300);
    assert_eq!(store.withdraw("u", 300, "w2").unwrap().balance_micros, 0);
    assert_eq!(
        store.withdraw("u", 1, "w3").unwrap_err().wire().code,
        ErrorCode::InsufficientFunds
    );
    assert_eq!(
        store.withdraw("nobody", 1, "w").unwrap_err().wire().code,
        ErrorCode::NotFound
    );
    assert_eq!(
        store.withdraw("u", 0, "w4").unwrap_err().wire().code,
        ErrorCode::BadRequest
    );
    // The money left through `external`: deposits in minus withdrawals out.
    assert_eq!(balance(&store, ledger::EXTERNAL), -1_000 + 700);
    assert_eq!(balance(&store, "escrow:j"), 300);
    let kinds: Vec<String> = store
        .connection()
        .prepare("SELECT kind FROM ledger_tx ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(kinds, ["deposit", "hold", "withdraw", "withdraw"]);
    let report = store.verify().unwrap();
    assert!(report.ok, "{:?}", report.problems);
}

#[test]
fn an_enrolment_fixes_the_provider_account_and_a_removal_is_recorded() {
    let (_dir, mut store) = store();
    assert_eq!(store.enrolment("n1").unwrap(), None);
    let first = store.enroll("n1", "acme", Some("UKEY")).unwrap();
    assert_eq!(
        (
            first.provider_account.as_str(),
            first.public_key.as_deref(),
            first.removed_ms
        ),
        ("acme", Some("UKEY"), None)
    );
    // The provider account exists, to be paid into.
    assert_eq!(balance(&store, "acme"), 0);
    // Again with the same account: the same enrolment; with another: refused.
    assert_eq!(
        store
            .enroll("n1", "acme", None)
            .unwrap()
            .public_key
            .as_deref(),
        Some("UKEY")
    );
    let error = store.enroll("n1", "mallory", None).unwrap_err().wire();
    assert_eq!(error.code, ErrorCode::AlreadyExists);
    assert!(error.message.contains("acme"), "{}", error.message);
    let removed = store.remove_enrolment("n1").unwrap();
    assert!(removed.removed_ms.is_some());
    assert_eq!(store.enrolment("n1").unwrap(), Some(removed.clone()));
    // Removing twice keeps the first time; enrolling again re-admits.
    assert_eq!(
        store.remove_enrolment("n1").unwrap().removed_ms,
        removed.removed_ms
    );
    assert_eq!(store.enroll("n1", "acme", None).unwrap().removed_ms, None);
    assert_eq!(
        store.remove_enrolment("n2").unwrap_err().wire().code,
        ErrorCode::NotFound
    );
}

#[test]
fn a_job_past_its_deadline_is_ended_by_the_orchestrator_and_pays_for_its_timeout() {
    let (_dir, mut store) = store();
    node(&mut store);
    store.create_account("u").unwrap();
    store.deposit("u", 1_000_000, None).unwrap();
    for id in ["stuck", "fresh"] {
        store.submit(id, "u", &spec(), 500_000).unwrap();
        store.assign(id, "n1", &PRICING, None).unwrap();
        store.mark_running(id, "n1", 1).unwrap();
    }
    // "stuck" started 13 s ago: timeout 10 s + slack 2 s have passed; "fresh" just started.
    let now = now_ms();
    store
        .connection()
        .execute(
            "UPDATE jobs SET started_ms = ?1, assigned_ms = ?1 WHERE id = 'stuck'",
            [now as i64 - 13_000],
        )
        .unwrap();
    assert_eq!(store.overrun(now).unwrap(), vec!["stuck".to_owned()]);
    assert_eq!(
        store.end_at_deadline("stuck").unwrap(),
        Some(("n1".to_owned(), 1)),
        "its node is to be told to stop"
    );
    let job = store.get_job("stuck").unwrap();
    assert_eq!(job.state, JobState::TimedOut);
    assert!(job.reason.unwrap().contains("past its timeout of 10000 ms"));
    // Its whole timeout at 10 micros per ms.
    assert_eq!(
        (job.cost_micros, job.refund_micros),
        (Some(100_000), Some(400_000))
    );
    assert_eq!(store.end_at_deadline("stuck").unwrap(), None, "once");
    // The node's late result changes nothing.
    assert_eq!(
        store
            .finish("stuck", "n1", 1, &exited(0, 60_000), 1024)
            .unwrap(),
        ReportEffect::Duplicate
    );
    assert_eq!(store.get_job("stuck").unwrap().cost_micros, Some(100_000));
    assert!(store.overrun(now).unwrap().is_empty());
    let report = store.verify().unwrap();
    assert!(report.ok, "{:?}", report.problems);
}

#[test]
fn a_handed_back_job_is_requeued_without_spending_a_retry_a_few_times() {
    let (_dir, mut store) = store();
    node(&mut store);
    store.create_account("u").unwrap();
    store.deposit("u", 1_000_000, None).unwrap();
    let mut spec = spec();
    spec.max_retries = 0;
    store.submit("j", "u", &spec, 100_000).unwrap();
    for attempt in 1..=ending::FREE_HAND_BACKS {
        assert_eq!(
            store.assign("j", "n1", &PRICING, None).unwrap(),
            Some(attempt)
        );
        store.mark_running("j", "n1", attempt).unwrap();
        // A hand-back for another attempt or from another node is stale.
        assert!(matches!(
            store
                .hand_back("j", "n2", attempt, "shutting down")
                .unwrap(),
            ReportEffect::Stale(_)
        ));
        assert_eq!(
            store
                .hand_back("j", "n1", attempt, "shutting down")
                .unwrap(),
            ReportEffect::Applied
        );
        let job = store.get_job("j").unwrap();
        assert_eq!(job.state, JobState::Pending, "attempt {attempt}");
        assert_eq!(
            job.reason.as_deref(),
            Some("node n1 handed it back: shutting down; requeued")
        );
        assert_eq!(balance(&store, "escrow:j"), 100_000);
    }
    // Past the free hand-backs, one counts like a lost attempt: no retries left, refunded.
    let last = ending::FREE_HAND_BACKS + 1;
    store.assign("j", "n1", &PRICING, None).unwrap();
    store.hand_back("j", "n1", last, "shutting down").unwrap();
    let job = store.get_job("j").unwrap();
    assert_eq!(
        (job.state, job.refund_micros),
        (JobState::Failed, Some(100_000))
    );
    // Hand-backs do not lower the node's reputation.
    assert_eq!(store.node_stats().unwrap()["n1"].2, 1.0);
    let report = store.verify().unwrap();
    assert!(report.ok, "{:?}", report.problems);
}

#[test]
fn a_provider_enrols_at_most_the_node_limit() {
    let (_dir, mut store) = store();
    let most = crate::orchestrator::validate::limits::MAX_NODES_PER_PROVIDER;
    let ((), commit) = store.group_commit(|store| {
        for index in 0..most {
            store.enroll(&format!("n{index}"), "big", None).unwrap();
        }
    });
    commit.unwrap();
    let error = store.enroll("one-more", "big", None).unwrap_err().wire();
    assert_eq!(error.code, ErrorCode::InvalidState);
    assert!(
        error.message.contains("already has 10000 enrolled nodes"),
        "{}",
        error.message
    );
    // Enrolling a known node again is not a new one; another provider is not affected.
    store.enroll("n0", "big", None).unwrap();
    store.enroll("one-more", "small", None).unwrap();
    // A removed node frees its place.
    store.remove_enrolment("n1").unwrap();
    store.enroll("one-more-big", "big", None).unwrap();
}

#[test]
fn lists_leave_outputs_out_and_a_reader_sees_committed_state_without_writing() {
    let (dir, mut store) = store();
    node(&mut store);
    store.create_account("u").unwrap();
    store.deposit("u", 1_000_000, None).unwrap();
    store.submit("j", "u", &spec(), 100_000).unwrap();
    store.assign("j", "n1", &PRICING, None).unwrap();
    store.finish("j", "n1", 1, &exited(0, 10), 1024).unwrap();
    assert_eq!(store.get_job("j").unwrap().stdout.as_deref(), Some("out\n"));
    let mut reader = Store::open_reader(&dir.path().join("ledger.db"), 500).unwrap();
    let listed = reader
        .snapshot(|r| r.list_jobs(Some("u"), None, 10, None))
        .unwrap()
        .0;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].stdout.as_ref(), listed[0].stderr.as_ref()),
        (None, None)
    );
    assert_eq!(listed[0].cost_micros, Some(100));
    let report = reader.snapshot(|r| r.verify()).unwrap();
    assert!(report.ok, "{:?}", report.problems);
    // The reader cannot write.
    assert!(reader.deposit("u", 1, None).is_err());
    assert_eq!(balance(&store, "u"), 1_000_000 - 100);
}

#[test]
fn job_list_pages_are_stable_while_jobs_are_submitted() {
    let (_dir, mut store) = store();
    store.create_account("u").unwrap();
    store.deposit("u", 1_000_000, None).unwrap();
    for i in 0..5 {
        store.submit(&format!("j{i}"), "u", &spec(), 1_000).unwrap();
    }
    let ids = |jobs: &[JobRecord]| jobs.iter().map(|j| j.job_id.clone()).collect::<Vec<_>>();
    let (first, next) = store.list_jobs(Some("u"), None, 2, None).unwrap();
    assert_eq!(ids(&first), ["j4", "j3"]);
    let next = next.expect("more pages");
    // A cursor survives the wire and a newer job does not shift the next page.
    let next = JobCursor::parse(&next.encode()).unwrap();
    store.submit("j5", "u", &spec(), 1_000).unwrap();
    let (second, next) = store.list_jobs(Some("u"), None, 2, Some(&next)).unwrap();
    assert_eq!(ids(&second), ["j2", "j1"]);
    let (last, end) = store
        .list_jobs(Some("u"), None, 2, Some(&next.unwrap()))
        .unwrap();
    assert_eq!(ids(&last), ["j0"]);
    assert_eq!(end, None, "the last page has no next");
    // Exactly a page left: no empty page after it.
    let (all, end) = store.list_jobs(Some("u"), None, 6, None).unwrap();
    assert_eq!((all.len(), end), (6, None));
}

#[test]
fn job_cursors_refuse_what_encode_did_not_write() {
    for text in ["", "12", ".j", "-1.j", "x.j", "12.J", "12.a.b", "12.a*"] {
        assert_eq!(JobCursor::parse(text), None, "{text:?}");
    }
    assert_eq!(
        JobCursor::parse("12.job-1"),
        Some(JobCursor {
            created_ms: 12,
            job_id: "job-1".into()
        })
    );
}

/// A journal that keeps what it is given (the stream, in memory), or refuses.
struct Kept {
    log: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    refuse: bool,
}

impl Journal for Kept {
    fn append(&mut self, changeset: Vec<u8>) -> Result<u64, String> {
        if self.refuse {
            return Err("wrong last sequence".into());
        }
        let mut log = self.log.lock().unwrap();
        log.push(changeset);
        Ok(log.len() as u64 + 1)
    }

    /// A snapshot record carries no changes: kept as an empty changeset.
    fn append_snapshot(&mut self, _object: &str, _covers: u64) -> Result<u64, String> {
        self.append(Vec::new())
    }

    fn stop(&mut self, _why: String) {
        self.refuse = true;
    }
}

/// Every row of the tables the replicated ledger carries, as text: two databases that agree
/// give the same dump.
fn dump(conn: &Connection) -> Vec<String> {
    let tables = changes::replicated_tables(conn).unwrap();
    let mut rows = Vec::new();
    for table in tables {
        let table = table.to_str().unwrap().to_owned();
        let mut statement = conn
            .prepare(&format!("SELECT * FROM {table} ORDER BY 1, 2"))
            .unwrap();
        let columns = statement.column_count();
        let mut query = statement.query([]).unwrap();
        while let Some(row) = query.next().unwrap() {
            let values: Vec<String> = (0..columns)
                .map(|i| format!("{:?}", row.get_ref(i).unwrap()))
                .collect();
            rows.push(format!("{table}: {}", values.join(" | ")));
        }
    }
    rows
}

#[test]
fn a_standby_applying_the_writers_changesets_holds_the_same_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let (writer_path, standby_path) = (dir.path().join("w.db"), dir.path().join("s.db"));
    let mut writer = Store::open(&writer_path, 500).unwrap();
    // The genesis snapshot: the standby starts from a copy of the writer's file.
    writer
        .connection()
        .execute("VACUUM INTO ?1", [standby_path.to_str().unwrap()])
        .unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    writer
        .set_journal(Some(Box::new(Kept {
            log: log.clone(),
            refuse: false,
        })))
        .unwrap();
    let batch = |store: &mut Store, ops: &dyn Fn(&mut Store)| {
        let ((), commit) = store.group_commit(|store| ops(store));
        commit
    };
    batch(&mut writer, &|store| {
        node(store);
        store.create_account("u").unwrap();
        store.deposit("u", 1_000_000, Some("d1")).unwrap();
    })
    .unwrap();
    batch(&mut writer, &|store| {
        store.submit("j1", "u", &spec(), 200_000).unwrap();
        // A refused operation leaves nothing in the batch's changes.
        assert!(store.submit("dear", "u", &spec(), 5_000_000).is_err());
        store.submit("j2", "u", &spec(), 100_000).unwrap();
    })
    .unwrap();
    batch(&mut writer, &|store| {
        store.assign("j1", "n1", &PRICING, None).unwrap();
        store.mark_running("j1", "n1", 1).unwrap();
        store.cancel("j2").unwrap();
    })
    .unwrap();
    batch(&mut writer, &|store| {
        store
            .finish("j1", "n1", 1, &exited(0, 1_234), 1024)
            .unwrap();
    })
    .unwrap();
    // A batch that changes nothing appends nothing.
    batch(&mut writer, &|store| {
        store.deposit("u", 1_000_000, Some("d1")).unwrap();
    })
    .unwrap();
    assert_eq!(log.lock().unwrap().len(), 4);
    assert_eq!(
        writer.applied().unwrap(),
        5,
        "the writer notes each append's position"
    );

    let mut standby = Store::open(&standby_path, 500).unwrap();
    standby.set_standby();
    // Restored from the snapshot record at position 1.
    standby.set_applied(1).unwrap();
    let records = log.lock().unwrap().clone();
    // Out of order: refused, nothing applied.
    assert!(standby.apply_replicated(1, 3, &records[1]).is_err());
    for (index, changeset) in records.iter().enumerate() {
        let position = index as u64 + 2;
        let ((), commit) = standby.group_commit(|store| {
            store
                .apply_replicated(position - 1, position, changeset)
                .unwrap();
        });
        commit.unwrap();
    }
    // Applied twice: refused by position, not applied twice.
    assert!(standby.apply_replicated(4, 5, &records[3]).is_err());
    assert_eq!(standby.applied().unwrap(), 5);
    assert_eq!(dump(standby.connection()), dump(writer.connection()));
    assert_eq!(balance(&standby, "u"), 1_000_000 - 12_340);
    assert!(standby.verify().unwrap().ok);

    // A standby writes nothing of its own: the batch is rolled back.
    let (_, commit) = standby.group_commit(|store| store.deposit("u", 5, None));
    // Answered `unavailable`: the request may go again, to whoever writes.
    assert!(matches!(commit, Err(CommitError::NotWriting(e)) if e.contains("standby")));
    assert_eq!(balance(&standby, "u"), 1_000_000 - 12_340);

    // A changeset the standby's rows disagree with is refused whole, naming the table.
    standby
        .connection()
        .execute(
            "UPDATE accounts SET balance_micros = balance_micros + 1 WHERE id = 'u'",
            [],
        )
        .unwrap();
    let ((), commit) = writer.group_commit(|store| {
        store.deposit("u", 10, None).unwrap();
    });
    commit.unwrap();
    let last = log.lock().unwrap().last().unwrap().clone();
    let error = standby
        .apply_replicated(5, 6, &last)
        .unwrap_err()
        .to_string();
    assert!(error.contains("table accounts"), "{error}");
    assert_eq!(standby.applied().unwrap(), 5);
}

#[test]
fn a_batch_the_journal_refuses_is_not_committed() {
    let (_dir, mut store) = store();
    store.create_account("u").unwrap();
    assert!(deposit_the_journal_refuses(&mut store), "the operation ran");
}

/// Deposits into account `u` (empty) in a batch whose append the journal refuses: the batch
/// is not committed and nothing of it stays. Returns whether the deposit itself ran.
fn deposit_the_journal_refuses(store: &mut Store) -> bool {
    store
        .set_journal(Some(Box::new(Kept {
            log: Default::default(),
            refuse: true,
        })))
        .unwrap();
    let (deposited, commit) = store.group_commit(|store| store.deposit("u", 7, None).is_ok());
    assert!(matches!(commit, Err(CommitError::NotWriting(e)) if e.contains("not replicated")));
    assert_eq!(balance(store, "u"), 0, "nothing of the batch stayed");
    assert_eq!(store.applied().unwrap(), 0);
    deposited
}

/// Another connection holding the write lock when a batch starts: the replicated ledger's
/// writer does not fall back to committing operation by operation (each would be in the file
/// before the log has it). The busy handler fails the batch's attempt at the lock and has the
/// other connection let go of it, so the operation can write after the transaction could not
/// start: with the journal refusing, nothing of it may stay.
#[test]
fn a_writer_that_cannot_start_its_transaction_commits_nothing_the_log_lacks() {
    static HOLDER: std::sync::Mutex<Option<Connection>> = std::sync::Mutex::new(None);
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    fn busy(_: i32) -> bool {
        CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(holder) = HOLDER.lock().unwrap().take() {
            holder.execute_batch("ROLLBACK").unwrap();
        }
        false
    }
    let (dir, mut store) = store();
    store.create_account("u").unwrap();
    let holder = Connection::open(dir.path().join("ledger.db")).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    *HOLDER.lock().unwrap() = Some(holder);
    store.conn.busy_handler(Some(busy)).unwrap();
    let deposited = deposit_the_journal_refuses(&mut store);
    assert_eq!(
        CALLS.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the lock was contended"
    );
    assert!(deposited, "the operation wrote once the lock was free");
}

/// A standby the stream was trimmed past takes the latest snapshot's rows in one go (a group
/// commit, as on the ledger thread), is then equal to the writer row for row, and applies
/// the records after the snapshot in order.
#[test]
fn a_standby_reset_from_a_snapshot_holds_the_writers_ledger_and_follows_on() {
    let dir = tempfile::tempdir().unwrap();
    let (writer_path, standby_path) = (dir.path().join("w.db"), dir.path().join("s.db"));
    let mut writer = Store::open(&writer_path, 500).unwrap();
    writer
        .connection()
        .execute("VACUUM INTO ?1", [standby_path.to_str().unwrap()])
        .unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    writer
        .set_journal(Some(Box::new(Kept {
            log: log.clone(),
            refuse: false,
        })))
        .unwrap();
    let batch = |store: &mut Store, ops: &dyn Fn(&mut Store)| {
        let ((), commit) = store.group_commit(|store| ops(store));
        commit.unwrap();
    };
    batch(&mut writer, &|store| {
        node(store);
        store.create_account("u").unwrap();
        store.deposit("u", 1_000_000, Some("d1")).unwrap();
    });
    batch(&mut writer, &|store| {
        store.submit("j1", "u", &spec(), 200_000).unwrap();
        store.assign("j1", "n1", &PRICING, None).unwrap();
    });
    // The snapshot: the writer's file as it is now (applied up to 3), and its record.
    let snapshot = dir.path().join("snapshot.db");
    writer
        .connection()
        .execute("VACUUM INTO ?1", [snapshot.to_str().unwrap()])
        .unwrap();
    let covers = writer.applied().unwrap();
    let ((), commit) = writer.group_commit(|store| {
        store.record_snapshot("snapshot-object", covers).unwrap();
    });
    commit.unwrap();
    batch(&mut writer, &|store| {
        store.mark_running("j1", "n1", 1).unwrap();
        store
            .finish("j1", "n1", 1, &exited(0, 1_234), 1024)
            .unwrap();
    });

    // The standby never followed (it holds the genesis copy): reset, it holds exactly the
    // snapshot's rows and follows on from what the snapshot covers.
    let mut standby = Store::open(&standby_path, 500).unwrap();
    standby.set_standby();
    standby.set_applied(1).unwrap();
    let ((), commit) = standby.group_commit(|store| {
        store.reset_from_snapshot(&snapshot, covers).unwrap();
    });
    commit.unwrap();
    assert_eq!(standby.applied().unwrap(), covers);
    let records = log.lock().unwrap().clone();
    for (index, changeset) in records.iter().enumerate() {
        let position = index as u64 + 2;
        if position <= covers {
            continue;
        }
        let ((), commit) = standby.group_commit(|store| {
            store
                .apply_replicated(position - 1, position, changeset)
                .unwrap();
        });
        commit.unwrap();
    }
    assert_eq!(standby.applied().unwrap(), writer.applied().unwrap());
    assert_eq!(dump(standby.connection()), dump(writer.connection()));
    assert_eq!(balance(&standby, "u"), 1_000_000 - 12_340);
    assert!(standby.verify().unwrap().ok);
    // The writer itself is never reset.
    assert!(writer.reset_from_snapshot(&snapshot, covers).is_err());
}

/// A flow holds its budget at start, refunds it whole when cancelled before a step ran, and
/// an account has at most `MAX_OPEN_FLOWS` open at once.
#[test]
fn flows_hold_their_budget_and_an_account_opens_only_so_many() {
    use rhizos_broker::wire::{FlowSpec, FlowState, FlowStep};
    let (_dir, mut store) = store();
    store.create_account("u").unwrap();
    store.deposit("u", 10_000_000, None).unwrap();
    let flow = FlowSpec {
        name: "f".into(),
        max_cost_micros: 1_000,
        timeout_ms: None,
        steps: vec![FlowStep::new("s", spec())],
        edges: vec![],
    };
    for i in 0..flows::MAX_OPEN_FLOWS {
        let (view, created) = store.start_flow(&format!("f{i}"), "u", &flow).unwrap();
        assert!(created);
        assert_eq!(
            (view.state, view.escrow_micros),
            (FlowState::Running, 1_000)
        );
    }
    assert_eq!(
        balance(&store, "u"),
        10_000_000 - 1_000 * flows::MAX_OPEN_FLOWS
    );
    // The same start again is the same flow; one more is refused, saying why.
    assert!(!store.start_flow("f0", "u", &flow).unwrap().1);
    let refused = store
        .start_flow("more", "u", &flow)
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("flows running, the most at once"),
        "{refused}"
    );
    // Nothing to do for a flow whose step has not run yet (its job never submitted here).
    assert!(store.flows_due(crate::now_ms()).unwrap().is_empty());
    // Cancelled before anything ran: stopping (due), then ended with the whole hold back.
    assert_eq!(store.cancel_flow("f0").unwrap().state, FlowState::Stopping);
    assert_eq!(store.flows_due(crate::now_ms()).unwrap(), ["f0"]);
    let ended = store.advance_flow("f0", crate::now_ms()).unwrap();
    assert_eq!(ended.ended, Some(FlowState::Cancelled));
    let view = store.flow("f0").unwrap();
    assert_eq!(
        (view.cost_micros, view.refund_micros, view.escrow_micros),
        (Some(0), Some(1_000), 0)
    );
    assert!(store.start_flow("more", "u", &flow).unwrap().1);
    assert_eq!(
        balance(&store, "u"),
        10_000_000 - 1_000 * flows::MAX_OPEN_FLOWS
    );
    // Past its timeout a flow is due, stops, and ends timed out with its hold back.
    store.cancel_flow("more").unwrap();
    store.advance_flow("more", crate::now_ms()).unwrap();
    let timed = FlowSpec {
        timeout_ms: Some(50),
        ..flow.clone()
    };
    store.start_flow("timed", "u", &timed).unwrap();
    let later = crate::now_ms() + 100;
    assert_eq!(store.flows_due(later).unwrap(), ["timed"]);
    let ended = store.advance_flow("timed", later).unwrap();
    assert_eq!(ended.ended, Some(FlowState::TimedOut));
    let view = store.flow("timed").unwrap();
    assert_eq!(view.refund_micros, Some(1_000));
    assert!(view.reason.unwrap().contains("timeout_ms (50 ms) passed"));
    assert!(store.verify().unwrap().ok);
}

/// Retention: a closed job's payloads go once it is old enough — oldest first, in batches
/// bounded by jobs and bytes — while its money, state and the digests its receipt states stay;
/// a pending job and the jobs of a flow still running are left alone; a retry of a pruned
/// job's submit still finds it; the ledger verifies.
#[test]
fn pruning_drops_closed_jobs_payloads_and_keeps_their_money_and_digests() {
    use rhizos_broker::wire::{FlowEdge, FlowSpec, FlowState, FlowStep};
    let (_dir, mut store) = store();
    node(&mut store);
    store.create_account("u").unwrap();
    store.deposit("u", 10_000_000, Some("d1")).unwrap();
    let run = |store: &mut Store, id: &str| {
        store.assign(id, "n1", &PRICING, None).unwrap().unwrap();
        store.mark_running(id, "n1", 1).unwrap();
        let mut outcome = exited(0, 1_000);
        outcome
            .output_files
            .insert("out.txt".into(), rhizos_broker::wire::b64_encode(b"result"));
        store.finish(id, "n1", 1, &outcome, 1024).unwrap();
    };
    for id in ["j1", "j2", "j3"] {
        store.submit(id, "u", &spec(), 200_000).unwrap();
    }
    run(&mut store, "j1");
    run(&mut store, "j2");
    // A flow of two steps: its first step's job ends, the flow runs on.
    let step = |name: &str| FlowStep::new(name, spec());
    let flow = FlowSpec {
        name: "f".into(),
        max_cost_micros: 1_000_000,
        timeout_ms: None,
        steps: vec![step("first"), step("second")],
        edges: vec![FlowEdge {
            from: "first".into(),
            to: "second".into(),
            when: None,
        }],
    };
    store.start_flow("fl", "u", &flow).unwrap();
    store.advance_flow("fl", crate::now_ms()).unwrap();
    run(&mut store, "fl-0-1");

    let before = store.closed_job("j1").unwrap();
    assert!(before.node_report.is_none() && before.record.stdout.is_some());
    let now = crate::now_ms() + 1_000;
    assert_eq!(
        store.prune_job_payloads(0, 100, u64::MAX, now).unwrap(),
        0,
        "none closed that long ago"
    );
    // A byte budget under one job's payload still takes one job a batch.
    assert_eq!(store.prune_job_payloads(now, 100, 1, now).unwrap(), 1);
    assert_eq!(
        store.prune_job_payloads(now, 100, u64::MAX, now).unwrap(),
        1
    );
    assert_eq!(
        store.prune_job_payloads(now, 100, u64::MAX, now).unwrap(),
        0,
        "the pending job and the running flow's job are left"
    );
    let job = store.get_job("j1").unwrap();
    assert_eq!(job.pruned_ms, Some(now));
    assert!(job.stdout.is_none() && job.output_files.is_empty());
    let after = store.closed_job("j1").unwrap();
    assert_eq!(
        (&after.spec_sha256, &after.result_sha256),
        (&before.spec_sha256, &before.result_sha256)
    );
    let money = |c: &ClosedJob| {
        (
            c.record.state,
            c.record.cost_micros,
            c.record.provider_micros,
            c.record.fee_micros,
            c.record.refund_micros,
            c.ledger_tx_id,
            c.provider_account.clone(),
        )
    };
    assert_eq!(money(&after), money(&before));
    assert!(store.get_job("fl-0-1").unwrap().pruned_ms.is_none());
    assert!(store.get_job("j3").unwrap().pruned_ms.is_none());
    // A retry of the submit finds the pruned job (by its spec's digest); another spec under
    // its id is refused.
    assert!(!store.submit("j1", "u", &spec(), 200_000).unwrap().1);
    let mut other = spec();
    other.timeout_ms += 1;
    assert!(matches!(
        store.submit("j1", "u", &other, 200_000),
        Err(StoreError::AlreadyExists(_))
    ));
    // Once the flow ended, its jobs go too.
    store.advance_flow("fl", crate::now_ms()).unwrap();
    run(&mut store, "fl-1-1");
    let ended = store.advance_flow("fl", crate::now_ms()).unwrap();
    assert_eq!(ended.ended, Some(FlowState::Succeeded));
    let later = crate::now_ms() + 1_000;
    assert_eq!(
        store
            .prune_job_payloads(later, 100, u64::MAX, later)
            .unwrap(),
        2
    );
    // The pending job still runs from its spec.
    run(&mut store, "j3");
    assert_eq!(store.get_job("j3").unwrap().state, JobState::Succeeded);
    assert!(store.verify().unwrap().ok);
}
