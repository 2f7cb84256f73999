//! Commands around the node: a simulated camera, a Kafka tail, and the benchmark.

pub mod bench;
pub mod camera;
pub mod tail;
