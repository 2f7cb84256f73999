//! Commands around the node: a simulated camera, a Kafka tail, the frame exporter, and the
//! benchmark.

pub mod bench;
pub mod bench_uplink;
pub mod camera;
pub mod export;
pub mod export_checks;
pub mod tail;
