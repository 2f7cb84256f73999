//! The inference module's one error type. Each variant's doc says what the caller should do.

use std::path::PathBuf;

/// Everything that can go wrong between a manifest on disk and a model output.
///
/// Start-up variants (runtime, manifest, model file, session) are fatal for the process: log them
/// and exit non-zero. Per-frame variants ([`InferenceError::Image`], [`InferenceError::Run`],
/// [`InferenceError::Output`]) concern one frame only: report that frame as failed and go on.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// No ONNX Runtime library was named. Fatal: set `ORT_DYLIB_PATH` or the config's library
    /// path (run `scripts/install-deps.sh` to install the library).
    #[error(
        "no ONNX Runtime library configured: set ORT_DYLIB_PATH (or the inference library path in \
         the config) to libonnxruntime.so.1.31.x; run scripts/install-deps.sh to install it"
    )]
    RuntimeNotConfigured,

    /// The named library file does not exist. Fatal: fix the path or run
    /// `scripts/install-deps.sh`.
    #[error(
        "ONNX Runtime library {path} does not exist; run scripts/install-deps.sh or fix the path"
    )]
    RuntimeMissing { path: PathBuf },

    /// The library could not be loaded (not a library, wrong architecture, or older than ONNX
    /// Runtime 1.31), or the runtime was already loaded from another file. Fatal: install the
    /// right library (`scripts/install-deps.sh`).
    #[error("cannot load ONNX Runtime from {path}: {detail}")]
    RuntimeLoad { path: PathBuf, detail: String },

    /// [`super::init_runtime`] has not run (or failed). A programming error: call it once at
    /// start-up, before building an [`super::Engine`].
    #[error("ONNX Runtime is not initialised: call init_runtime before creating an Engine")]
    RuntimeNotInitialised,

    /// A `manifest.toml` is missing, unreadable, or invalid. Fatal: fix the manifest; the message
    /// names the file and the offending key.
    #[error("model manifest {path}: {detail}")]
    Manifest { path: PathBuf, detail: String },

    /// A file a manifest points to (model or labels) cannot be read. Fatal: restore the file.
    #[error("model file {path}: {source}")]
    ModelFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Two model folders declare the same name. Fatal: give each model a unique `name`.
    #[error("model name {name:?} is declared twice: in {first} and in {second}")]
    DuplicateModel {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },

    /// ONNX Runtime could not create a session for the model, or the model's inputs and outputs
    /// do not match its manifest. Fatal: fix the manifest or replace the .onnx file.
    #[error("model {model} ({path}): {detail}")]
    Session {
        model: String,
        path: PathBuf,
        detail: String,
    },

    /// `run` was asked for a model this engine did not load. A routing/config bug: only route to
    /// models passed to [`super::Engine::new`].
    #[error("model {model:?} is not loaded in this engine")]
    UnknownModel { model: String },

    /// The image cannot be fed to the model (for example zero width). Per frame: mark this frame
    /// failed (or dead-letter it) and continue.
    #[error("model {model}: unusable image: {detail}")]
    Image { model: String, detail: String },

    /// ONNX Runtime failed while running the model on this frame. Per frame: mark it failed and
    /// continue; if every frame fails, the model or runtime is broken.
    #[error("model {model}: ONNX Runtime run failed: {detail}")]
    Run { model: String, detail: String },

    /// The model returned outputs of an unexpected name, type or shape. Per frame: mark it
    /// failed; if it repeats, the manifest's `[output]` does not describe this model.
    #[error("model {model}: unexpected output: {detail}")]
    Output { model: String, detail: String },
}
