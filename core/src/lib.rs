//! The RhizOS runtime behind `rhizosd`: the orchestrator (registry, matching, jobs, escrow ledger)
//! and the node agent (plugin host, executions, heartbeats). Both take their NATS connection and a
//! shutdown future as arguments, so they run as daemons, inside `rhizos up`, or inside a test.

pub mod agent;
pub mod component;
pub mod gateway;
pub mod ledger;
pub mod metrics;
pub mod orchestrator;
pub mod telemetry;

pub use agent::Agent;
pub use gateway::Gateway;
pub use orchestrator::Orchestrator;

/// SHA-256 of `bytes` as 64 lowercase hex digits (how artifacts, modules and plugin copies are
/// named and checked).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Milliseconds since the Unix epoch on the daemons' clock — stored timestamps, event times,
/// queue, total and run deadlines. The wall clock is read once, when the process first asks, and
/// then advanced by the monotonic clock: a step of the system clock (an NTP correction, an
/// operator's `date -s`) cannot fire every timeout at once or hold them all back. A restarted
/// daemon reads the wall clock again.
pub fn now_ms() -> u64 {
    static ANCHOR: std::sync::OnceLock<(u64, std::time::Instant)> = std::sync::OnceLock::new();
    let (wall, at) = *ANCHOR.get_or_init(|| (wall_clock_ms(), std::time::Instant::now()));
    anchored_ms(wall, at.elapsed())
}

/// The wall clock in ms since the Unix epoch (0 before it).
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The anchor's wall time advanced by the monotonic time since it.
fn anchored_ms(wall_at_anchor: u64, since_anchor: std::time::Duration) -> u64 {
    wall_at_anchor.saturating_add(u64::try_from(since_anchor.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_clock_is_the_wall_clock_at_start_advanced_monotonically() {
        let first = super::now_ms();
        let wall = super::wall_clock_ms();
        assert!(first.abs_diff(wall) < 1_000, "{first} vs {wall}");
        let mut last = first;
        for _ in 0..1_000 {
            let now = super::now_ms();
            assert!(now >= last, "never goes back");
            last = now;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(super::now_ms() >= first + 20);
        // Whatever the wall clock does later, the daemon's time is the anchor plus the
        // monotonic time since it.
        assert_eq!(
            super::anchored_ms(1_000, std::time::Duration::from_millis(2_500)),
            3_500
        );
        assert_eq!(
            super::anchored_ms(u64::MAX, std::time::Duration::from_secs(1)),
            u64::MAX
        );
    }
}
