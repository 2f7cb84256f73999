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
    /// Benchmark the uplink: replication throughput and catch-up after a backlog.
    BenchUplink(crate::tools::bench_uplink::UplinkBenchArgs),
    /// Replication lag of the uplink, read from the brokers (the node need not run).
    Status {
        #[arg(
            long,
            short,
            env = "FOVEA_CONFIG",
            default_value = "/etc/fovea/fovea.toml"
        )]
        config: PathBuf,
    },
    /// Work with the frames fovea wrote to Kafka.
    #[command(subcommand)]
    Frames(FramesCommand),
    /// Inspect the on-disk spool (the node must be stopped: one process at a time).
    #[command(subcommand)]
    Spool(SpoolCommand),
}

#[derive(Debug, Subcommand)]
pub enum FramesCommand {
    /// Turn a frames topic back into image files (reassembling chunks, fetching claim checks).
    Export(crate::tools::export::ExportArgs),
}

#[derive(Debug, Subcommand)]
pub enum SpoolCommand {
    /// Records and bytes by class, oldest record, drops by class and reason, quarantined records.
    Stats(SpoolTarget),
    /// Checks every record's checksum without changing anything; exit 1 if any is corrupt.
    Verify(SpoolTarget),
    /// Measures spool write and drain MB/s for 1 MB frames and 1 KB results (in a temp folder).
    Bench {
        /// Folder to measure in (default: a temporary folder under /tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// Which spool: a folder, or the one a config file names.
#[derive(Debug, clap::Args)]
pub struct SpoolTarget {
    /// The spool folder.
    #[arg(long, conflicts_with = "config")]
    pub dir: Option<PathBuf>,
    /// A config file: its spool.dir (default /etc/fovea/fovea.toml).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}
