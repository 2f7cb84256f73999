//! Command-line interface of the `fovea` binary.

use crate::tools::{bench::BenchArgs, camera::CameraArgs, tail::TailArgs};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "fovea",
    version,
    about = "Edge machine-vision node: MQTT camera frames -> ONNX inference -> Kafka"
)]
pub struct Cli {
    /// Log level for this run (overrides the config's log.level).
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node.
    Run {
        /// The config file (TOML).
        #[arg(
            long,
            short,
            env = "FOVEA_CONFIG",
            default_value = "/etc/fovea/fovea.toml"
        )]
        config: PathBuf,
        /// Seconds to finish frames in flight after SIGTERM/SIGINT before exiting anyway
        /// (keep it below systemd's TimeoutStopSec).
        #[arg(long, default_value_t = 20)]
        drain_timeout: u64,
    },
    /// Check a config file (and the models it names); every problem is reported, exit code 2 if any.
    Validate { config: PathBuf },
    /// Print the default config, with a comment on every setting.
    DefaultConfig,
    /// Publish a folder of images as simulated cameras over MQTT.
    Camera(CameraArgs),
    /// Print fovea's records from a Kafka cluster, decoded.
    Tail(TailArgs),
    /// Benchmark inference alone and the whole path against running brokers.
    Bench(BenchArgs),
}
