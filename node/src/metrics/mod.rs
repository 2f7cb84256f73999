//! Prometheus metrics: histograms fed by the stages, rendered on `/metrics`
//! (served by [`crate::service::http`]).

pub mod exposition;
pub mod histogram;
