//! Inference: a decoded image in, a [`fovea_proto::v1::ModelOutput`] out.
//!
//! The flow, one file per step:
//! - [`decode`]: the frame's bytes to an upright image, within the pixel limits, with damage
//!   named (`too-many-pixels`, `truncated`, `too-small`, `decode-failed`).
//! - [`manifest`]: each model folder holds `manifest.toml` (schema in `models/README.md`): the
//!   .onnx file, labels, how to build the input tensor and where the results are in the outputs.
//!   [`load_models`] reads them once at start-up into shared, immutable [`Model`]s (metadata,
//!   labels, SHA-256 of the weights: no runtime state).
//! - [`preprocess`](self::preprocess): crop/resize with `image::imageops` (Triangle filter), then
//!   write the pixels, normalised, straight into the session's reusable input buffer.
//! - [`engine`](self::engine): ONNX Runtime, loaded from a shared library by [`init_runtime`]
//!   (once per process), runs the model.
//! - [`postprocess`](self::postprocess): softmax and top-k, or boxes mapped back to source-image
//!   pixels, filtered, and suppressed (NMS) when the graph does not do it.
//!
//! Sessions are per worker: an [`Engine`] owns one ONNX Runtime session per model and is owned
//! by one worker thread. `ort`'s `Session::run` takes `&mut self` (ONNX Runtime is not safe for
//! concurrent runs of one session in every execution provider), so a shared session would need a
//! lock and workers would queue on it. With one engine per worker, N workers run N frames in
//! parallel at the cost of N copies of the weights in memory; size `intra_threads` x workers to
//! the cores available.
//!
//! Nothing here panics on bad input: an unusable image or unexpected output is an
//! [`InferenceError`] for that frame.

pub mod decode;
mod engine;
mod error;
pub mod manifest;
mod postprocess;
mod preprocess;

#[cfg(test)]
mod tests;

pub use engine::{Engine, init_runtime};
pub use error::InferenceError;
pub use manifest::{Model, Task, load_models};
