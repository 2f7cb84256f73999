//! The `fovea` binary: parses the command line and runs one command. Errors end here, printed
//! with their causes, with a non-zero exit code (so systemd restarts a failed node).

use clap::Parser;
use fovea::cli::{Cli, Command, FramesCommand, SpoolCommand, SpoolTarget};
use fovea::{config, logging, pipeline, tools};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::DefaultConfig => {
            print!("{}", config::DEFAULT_TOML);
            ExitCode::SUCCESS
        }
        Command::Validate { config } => validate(&config),
        Command::Spool(command) => match spool_command(command) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("fovea: error: {e:#}");
                ExitCode::FAILURE
            }
        },
        command => match run(command, cli.log_level.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fovea: error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn validate(path: &std::path::Path) -> ExitCode {
    let cfg = match config::load(path) {
        Ok(cfg) => cfg,
        Err(errors) => {
            eprintln!(
                "{}: {} problem(s):\n{errors}",
                path.display(),
                errors.0.len()
            );
            return ExitCode::from(2);
        }
    };
    match pipeline::prepare(cfg) {
        Ok(p) => {
            println!(
                "{}: OK ({} model(s): {}; {} route(s))",
                path.display(),
                p.models.len(),
                p.models
                    .iter()
                    .map(|m| format!("{}@{}", m.name, m.version))
                    .collect::<Vec<_>>()
                    .join(", "),
                p.cfg.routes.len()
            );
            // Warnings, not errors: validate runs as the unit's ExecStartPre, and a tight disk
            // is for the operator to weigh, not a reason not to start.
            let disk = fovea::disk::report::report(&p.cfg);
            print!("{}", disk.text);
            for w in &disk.warnings {
                eprintln!("warning: {w}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e:#}", path.display());
            ExitCode::from(2)
        }
    }
}

/// Loads a config file; the error names the file and lists every problem.
fn load_config(path: &std::path::Path) -> anyhow::Result<config::Config> {
    config::load(path).map_err(|e| anyhow::anyhow!("{}:\n{e}", path.display()))
}

fn spool_command(command: SpoolCommand) -> anyhow::Result<ExitCode> {
    let dir = |target: SpoolTarget| -> anyhow::Result<std::path::PathBuf> {
        if let Some(dir) = target.dir {
            return Ok(dir);
        }
        let path = target
            .config
            .unwrap_or_else(|| "/etc/fovea/fovea.toml".into());
        let cfg = load_config(&path)?;
        Ok(cfg.spool_dir())
    };
    match command {
        SpoolCommand::Stats(target) => {
            // The read-only survey `verify` makes is the stats; only the exit code differs.
            println!("{}", fovea::spool::verify(&dir(target)?)?);
            Ok(ExitCode::SUCCESS)
        }
        SpoolCommand::Verify(target) => {
            let report = fovea::spool::verify(&dir(target)?)?;
            println!("{report}");
            Ok(if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        SpoolCommand::Bench { dir } => {
            let tmp;
            let dir = match dir {
                Some(d) => d,
                None => {
                    tmp = std::env::temp_dir()
                        .join(format!("fovea-spool-bench-{}", std::process::id()));
                    tmp
                }
            };
            let report = fovea::spool::bench::benchmark(&dir);
            let _ = std::fs::remove_dir_all(&dir);
            println!("{}", report?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn run(command: Command, log_level: Option<&str>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match command {
        Command::Run {
            config,
            drain_timeout,
        } => {
            let cfg = load_config(&config)?;
            logging::init(&cfg.log, log_level)?;
            let outcome = runtime.block_on(fovea::service::run::run(
                cfg,
                Duration::from_secs(drain_timeout),
            ));
            // Past the drain deadline (or after a second signal) nothing is worth waiting for.
            runtime.shutdown_timeout(Duration::from_millis(500));
            outcome
        }
        Command::Camera(args) => {
            logging::init(&config::LogConfig::default(), log_level)?;
            runtime.block_on(tools::camera::run(args))
        }
        Command::Tail(args) => {
            logging::init(&config::LogConfig::default(), log_level.or(Some("warn")))?;
            tools::tail::run(args)
        }
        Command::Status { config } => {
            let cfg = load_config(&config)?;
            logging::init(&cfg.log, log_level.or(Some("error")))?;
            print!("{}", fovea::uplink::status::report(&cfg));
            Ok(())
        }
        Command::Frames(FramesCommand::Export(args)) => {
            logging::init(&config::LogConfig::default(), log_level.or(Some("warn")))?;
            let summary = runtime.block_on(tools::export::run(args))?;
            println!("{summary}");
            anyhow::ensure!(
                summary.incomplete == 0 && summary.failed == 0 && summary.refused == 0,
                "some frames could not be exported"
            );
            Ok(())
        }
        Command::BenchUplink(args) => {
            let cfg = load_config(&args.config)?;
            logging::init(&cfg.log, log_level.or(Some("warn")))?;
            runtime.block_on(tools::bench_uplink::run(args, cfg))
        }
        Command::Bench(args) => {
            let cfg = load_config(&args.config)?;
            logging::init(&cfg.log, log_level.or(Some("warn")))?;
            runtime.block_on(tools::bench::run(args, cfg))
        }
        Command::Validate { .. } | Command::DefaultConfig | Command::Spool(_) => {
            unreachable!("handled in main")
        }
    }
}
