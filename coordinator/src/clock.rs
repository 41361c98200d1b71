//! The coordinator's two clocks: the wall clock for what is shown and persisted, and a
//! monotonic one for what is timed (leases, stalls, grace periods), never persisted.

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds since the Unix epoch: for what is shown and persisted.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Milliseconds on the monotonic clock since this process first asked. Leases, stalls and grace
/// periods are timed on it (and never persisted), so that a step of the wall clock (NTP, a
/// resumed virtual machine) neither expires every lease at once nor hides a dead worker. It is
/// tokio's clock, which tests may pause and advance.
pub fn monotonic_ms() -> i64 {
    static START: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(tokio::time::Instant::now);
    tokio::time::Instant::now()
        .saturating_duration_since(start)
        .as_millis() as i64
}
