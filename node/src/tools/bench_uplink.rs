//! `fovea bench-uplink`: replication throughput and catch-up time. Writes a backlog the size of
//! `--minutes` of traffic at `--fps` frames/s into the local topics (a result per frame, and the
//! frame itself once a second for the frame rule to pick), then runs the uplink against the
//! configured cloud cluster until the backlog is replicated.

use crate::config::Config;
use crate::outbox::producer::enqueue;
use crate::records::{self, RecordLimit};
use crate::stats::Stats;
use crate::tools::camera::read_images;
use clap::Args;
use fovea_proto::v1::{Classification, Frame, InferenceResult, ModelOutput};
use rdkafka::producer::FutureProducer;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Args)]
pub struct UplinkBenchArgs {
    /// Config with `[uplink]` pointing at a running cloud cluster.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Photos whose bytes stand in for the replicated frames.
    #[arg(long)]
    pub images: PathBuf,
    /// Minutes of traffic in the backlog.
    #[arg(long, default_value_t = 10.0)]
    pub minutes: f64,
    /// Frames per second of that traffic (all cameras together).
    #[arg(long, default_value_t = 25.0)]
    pub fps: f64,
}

pub async fn run(args: UplinkBenchArgs, cfg: Config) -> anyhow::Result<()> {
    let n = (args.minutes * 60.0 * args.fps) as u64;
    let images = read_images(&args.images)?;
    let local: FutureProducer =
        crate::outbox::producer::client_config(&cfg.kafka, "fovea-bench-uplink", 30_000)
            .create()?;
    crate::outbox::topics::ensure(
        &cfg.kafka,
        &crate::outbox::topics::TopicSpec::node_topics(&cfg)[..2],
        Duration::from_secs(30),
    )
    .await?;
    let limit = RecordLimit::new(cfg.kafka.record_limit_bytes);
    let started = Instant::now();
    let (mut frames, mut bytes) = (0u64, 0usize);
    let mut pending = Vec::new();
    for i in 0..n {
        let camera = format!("cam-{}", i % 5 + 1);
        let id = format!("bench/{camera}/s{i}");
        let every_second = i % args.fps.max(1.0) as u64 == 0;
        if every_second {
            let frame = Frame {
                camera_id: camera.clone(),
                record_id: id.clone(),
                data: images[i as usize % images.len()].1.clone(),
                ..Frame::default()
            };
            let built = records::frame_records(&frame, &cfg.kafka.topics.frames, &[], limit, true)?;
            for record in &built.records {
                bytes += record.value.len();
                pending.push(enqueue(&local, record).await?);
            }
            frames += 1;
        }
        let result = InferenceResult {
            record_id: id.clone(),
            camera_id: camera.clone(),
            status: 1,
            outputs: vec![ModelOutput {
                model: "efficientnet-lite0".into(),
                model_version: "1".into(),
                classifications: (0..5)
                    .map(|k| Classification {
                        class_id: k,
                        label: format!("label {k}"),
                        score: 0.2,
                    })
                    .collect(),
                ..ModelOutput::default()
            }],
            ..InferenceResult::default()
        };
        let record = records::fit_result(&result, &cfg.kafka.topics.results, limit)
            .map_err(|letter| anyhow::anyhow!("{}", letter.reason))?;
        bytes += record.value.len();
        pending.push(enqueue(&local, &record).await?);
    }
    for f in pending {
        let _ = f.await;
    }
    println!(
        "backlog: {:.0} minutes at {} frames/s = {n} results + {frames} frames ({:.1} MB) written locally in {:.1} s",
        args.minutes,
        args.fps,
        bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );

    let stats = Arc::new(Stats::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let uplink = tokio::spawn(crate::uplink::replicator::run(
        cfg.clone(),
        stats.clone(),
        stop_rx,
    ));
    let deadline = started + Duration::from_secs(1800);
    while Stats::get(&stats.uplink_results) < n
        || Stats::get(&stats.uplink_frames) + Stats::get(&stats.uplink_filtered) < frames
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the backlog did not replicate in 30 minutes"
        );
        anyhow::ensure!(!uplink.is_finished(), "the uplink stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Handed to the producer; now wait until the cloud acknowledged them all.
    let secs_sent = started.elapsed().as_secs_f64();
    let records = Stats::get(&stats.uplink_results) + Stats::get(&stats.uplink_frames);
    while Stats::get(&stats.uplink_acked) < records {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the cloud did not acknowledge the backlog"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    uplink.await??;
    let sent_bytes = Stats::get(&stats.uplink_bytes) as f64;
    println!(
        "replicated {records} records ({} results, {} frames, {:.1} MB), all acknowledged by the cloud after {secs:.1} s (handed to the producer after {secs_sent:.1} s)",
        Stats::get(&stats.uplink_results),
        Stats::get(&stats.uplink_frames),
        sent_bytes / 1e6
    );
    println!(
        "throughput: {:.0} records/s, {:.1} MB/s; catch-up of {:.0} minutes of traffic: {secs:.1} s",
        records as f64 / secs,
        sent_bytes / 1e6 / secs,
        args.minutes
    );
    Ok(())
}
