//! The box's disk budget: what fovea may use on disk (spool, the local broker's topics within
//! their retention, the claim-check store, logs), where each part lives, and how much each holds
//! now. `fovea validate` adds the parts up per filesystem and warns when they cannot fit; the
//! node samples the current bytes for `/metrics`.
//!
//! - [`budget`]: the parts and the per-filesystem sum (pure, unit-tested);
//! - [`usage`]: reading the disk (folder sizes, free space, which filesystem);
//! - [`report`]: the budget as `fovea validate` prints it.

pub mod budget;
pub mod report;
pub mod usage;

pub use budget::{Part, parts};

use crate::stats::Stats;
use std::sync::Arc;
use std::time::Duration;

/// One part of the budget as `/metrics` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub part: &'static str,
    /// Bytes in the part's folder now (`None` when unreadable or shared, like the journal).
    pub used: Option<u64>,
    pub budget: Option<u64>,
    /// Free bytes on the part's filesystem.
    pub free: u64,
}

/// How often the sampler walks the folders: a claim-check store may hold many files, and disk
/// use changes over minutes, not seconds.
const SAMPLE_EVERY: Duration = Duration::from_secs(30);

/// Samples every part of the budget into `stats` now and then every [`SAMPLE_EVERY`], until the
/// runtime ends.
pub async fn sampler(parts: Vec<Part>, stats: Arc<Stats>) {
    let parts = Arc::new(parts);
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tick.tick().await;
        let p = parts.clone();
        let samples = tokio::task::spawn_blocking(move || {
            p.iter()
                .map(|part| {
                    let m = usage::measure(part);
                    Sample {
                        part: part.name,
                        used: m.used,
                        budget: part.budget,
                        free: m.free,
                    }
                })
                .collect::<Vec<_>>()
        })
        .await;
        if let (Ok(samples), Ok(mut slot)) = (samples, stats.disk.lock()) {
            *slot = samples;
        }
    }
}
