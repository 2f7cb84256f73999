//! The node's configuration: one TOML file, typed by the structs in `schema.rs`, every key
//! optional (`default.toml`, printed by `fovea default-config`, shows them all with their
//! defaults and why one would change them).
//!
//! Loading reports **every** problem at once, each with its key path (`mqtt.port`,
//! `models[0].path`), so one `fovea validate` run lists everything to fix:
//! - a TOML syntax error (one error, with line and column: nothing after it can be trusted);
//! - unknown keys, anywhere (a typo must not silently fall back to a default);
//! - values of the wrong type (the key is then dropped so the rest can still be checked);
//! - semantic problems: values that type-check but cannot work (see `validate.rs`).
//!
//! Environment overrides (`FOVEA_<SECTION>__<KEY>=value`, e.g. `FOVEA_MQTT__PORT=1884`) are
//! applied to the document before it is typed, so they are checked like the file; their errors
//! are reported under `env FOVEA_...` (see `env.rs`).
//!
//! Relative paths (`node.state_dir`, `inference.onnxruntime_library`, `models[].path`) are
//! resolved against the config file's folder, never the working directory.
//!
//! Layout: `schema` (the types), `defaults` (their values), `load` (the pipeline), `env`,
//! `deser` (typing with every error kept), `validate` (semantic checks), `keypath`, `error`.

mod defaults;
mod deser;
mod env;
mod error;
mod keypath;
mod load;
mod schema;
mod validate;

pub use error::{ConfigError, ConfigErrors};
pub use load::{load, load_str};
pub use schema::*;

/// The commented default config, printed by `fovea default-config`. A test checks it loads to
/// exactly `Config::default()` and writes out every key.
pub const DEFAULT_TOML: &str = include_str!("default.toml");
