//! Logs prefixes starting and stopping being rate limited, from a scan of the rate table once
//! a second (never from the per-packet path), and keeps the limited-prefixes gauge current.

use std::sync::Arc;
use std::time::Duration;

use crate::backend::Shared;
use crate::lifecycle::Lifecycle;

/// Most transitions logged one by one per scan; the rest are summed up in one line, so a
/// flood from many spoofed prefixes cannot flood the log.
const MAX_LINES: usize = 10;

/// Scans the rate table every second while response rate limiting is on.
pub async fn run(shared: Arc<Shared>, lifecycle: Arc<Lifecycle>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = lifecycle.stopped() => return,
        }
        let Some(policy) = shared.load().rrl.clone() else {
            continue;
        };
        let changes = shared.rrl.scan(policy.window());
        for t in changes.iter().take(MAX_LINES) {
            if t.limited {
                tracing::warn!(
                    "rrl: limiting {} answers to {}{}",
                    t.class.as_str(),
                    t.prefix,
                    if policy.log_only() { " (log only)" } else { "" }
                );
            } else {
                tracing::info!(
                    "rrl: {} answers to {} no longer limited",
                    t.class.as_str(),
                    t.prefix
                );
            }
        }
        if changes.len() > MAX_LINES {
            let started = changes.iter().filter(|t| t.limited).count();
            tracing::warn!(
                "rrl: {} more changes not logged ({started} started, {} stopped in all); {} prefixes limited now",
                changes.len() - MAX_LINES,
                changes.len() - started,
                shared.rrl.limited_now()
            );
        }
    }
}
