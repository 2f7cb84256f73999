//! The uplink: replicates results (always) and frames (chosen by rules) from the local broker to
//! the cloud cluster that dashboards read.
//!
//! - `replicator`: the loop: local consumers, cloud producer, at-least-once commits.
//! - `rules`: which frames go (labels, score, rate per camera, thumbnail size).
//! - `thumbnail`: downscaled JPEGs for metered links.
//! - `bucket`: the bandwidth cap.
//! - `gaps`: records that expired locally before they were replicated (counted, logged, passed).
//! - `backlog`: age of the oldest unreplicated record against the topic's retention.
//! - `offsets`: which local offsets may be committed (everything before them is in the cloud).
//! - `reassembly`: chunked local frames, and the positions of their chunks (every one ends done).
//! - `status`: replication lag for `fovea status`.

pub mod backlog;
pub mod bucket;
pub mod gaps;
pub mod offsets;
pub mod reassembly;
pub mod replicator;
pub mod rules;
pub mod status;
pub mod thumbnail;
