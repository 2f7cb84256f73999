//! The uplink: replicates results (always) and frames (chosen by rules) from the local broker to
//! the cloud cluster that dashboards read.
//!
//! - `replicator`: the loop: local consumers, cloud producer, at-least-once commits.
//! - `rules`: which frames go (labels, score, rate per camera, thumbnail size).
//! - `thumbnail`: downscaled JPEGs for metered links.
//! - `bucket`: the bandwidth cap.
//! - `offsets`: which local offsets may be committed (everything before them is in the cloud).
//! - `reassembly`: chunked local frames, and the positions of their chunks (every one ends done).
//! - `status`: replication lag for `fovea status`.

pub mod bucket;
pub mod offsets;
pub mod reassembly;
pub mod replicator;
pub mod rules;
pub mod status;
pub mod thumbnail;
