//! `fovea bench`: how fast is the main path on this machine, and how close to the limit?
//!
//! 1. The limit: the workers alone (same models, workers and intra-op threads as the config)
//!    running decode + preprocess + ONNX Runtime on the benchmark frames, no I/O.
//! 2. End to end: the real node in this process, frames published over MQTT QoS 1 to the
//!    configured broker, until every frame's records are acked by the local Kafka broker.
//!
//! Prints frames/s for both, their ratio, per-stage latency p50/p99, and peak RSS.

use crate::config::Config;
use crate::inference::decode::{ImageLimits, decode};
use crate::inference::{self, Engine};
use crate::pipeline;
use crate::stats::{STAGES, Stats};
use crate::tools::camera::{read_images, split_host_port};
use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Config of the node under test (its brokers must be running).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Photos to turn into benchmark frames.
    #[arg(long)]
    pub images: PathBuf,
    /// Frames to send end to end.
    #[arg(long, default_value_t = 400)]
    pub frames: u64,
    /// Simulated cameras the frames are spread over.
    #[arg(long, default_value_t = 4)]
    pub cameras: usize,
    /// Frame size (WIDTHxHEIGHT) and JPEG quality.
    #[arg(long, default_value = "640x480")]
    pub size: String,
    #[arg(long, default_value_t = 85)]
    pub quality: u8,
    /// Publish rate in frames/s; 0 = as fast as the broker takes them (measures throughput;
    /// a rate below the limit measures latency without a queue).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Instead of JPEG photos: PNG frames of random pixels of about this many MB each (large
    /// frames: chunked or claim-checked on the way to Kafka).
    #[arg(long)]
    pub noise_mb: Option<f64>,
    /// Frames (each a frame and a result record) to put in the spool before the node starts,
    /// so that the end-to-end run happens while that backlog drains.
    #[arg(long, default_value_t = 0)]
    pub backlog: u64,
}

pub async fn run(args: BenchArgs, cfg: Config) -> anyhow::Result<()> {
    let (w, h) = args
        .size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
        .context("--size must be WIDTHxHEIGHT")?;
    let frames = make_frames(&args, w, h)?;
    let avg_kb = frames.iter().map(Bytes::len).sum::<usize>() as f64 / frames.len() as f64 / 1024.0;
    let prepared = pipeline::prepare(cfg.clone())?;
    inference::init_runtime(&cfg.inference.onnxruntime_library)?;
    println!(
        "fovea bench: {} frames, {} (avg {avg_kb:.0} KiB), at {}, {} camera(s), models [{}], {} worker(s) x {} intra-op thread(s)",
        args.frames,
        match args.noise_mb {
            Some(mb) => format!("noise PNG ~{mb} MB"),
            None => format!("{w}x{h} JPEG q{}", args.quality),
        },
        if args.rate > 0.0 {
            format!("{} frames/s", args.rate)
        } else {
            "full speed".into()
        },
        args.cameras,
        cfg.routes
            .first()
            .map(|r| r.models.join(", "))
            .unwrap_or_default(),
        cfg.inference.workers,
        cfg.inference.intra_threads
    );

    let limit_fps = limit(&prepared, &cfg, &frames, args.frames.min(200))?;
    if args.backlog > 0 {
        fill_spool(&cfg, &frames, args.backlog)?;
    }
    let (e2e_fps, stats) = end_to_end(prepared, &cfg, &args, &frames).await?;

    println!(
        "inference only (decode+preprocess+ONNX, {} worker(s)): {limit_fps:8.1} frames/s",
        cfg.inference.workers
    );
    println!("end to end (MQTT publish -> local Kafka ack):     {e2e_fps:8.1} frames/s");
    if args.noise_mb.is_some() {
        let mb = avg_kb * 1024.0 / 1e6;
        println!(
            "  = {:.1} MB/s inference only, {:.1} MB/s end to end ({mb:.1} MB frames, policy {:?})",
            limit_fps * mb,
            e2e_fps * mb,
            cfg.large_frames.policy
        );
    }
    if args.rate > 0.0 {
        println!(
            "  (paced at {} frames/s: end-to-end rate is the offered load, not the limit)",
            args.rate
        );
    }
    println!(
        "ratio end-to-end / inference-only:                {:8.2}",
        e2e_fps / limit_fps
    );
    println!("per-stage latency:      p50 ms    p99 ms");
    for stage in STAGES {
        let q = |p| {
            stats
                .quantile(stage, p)
                .map(|d| d.as_secs_f64() * 1000.0)
                .unwrap_or(f64::NAN)
        };
        println!("  {:<12} {:>10.1} {:>9.1}", stage.name(), q(0.5), q(0.99));
    }
    println!(
        "records acked straight by the broker: {} results, {} frames, {} dead letters",
        Stats::get(&stats.results_out),
        Stats::get(&stats.frames_out),
        Stats::get(&stats.dead_letters)
    );
    if args.backlog > 0 {
        println!(
            "drained from the spool: {} records (the backlog, and live records queued behind it)",
            Stats::get(&stats.drained)
        );
    }
    println!("peak RSS: {:.1} MiB", peak_rss_kib()? as f64 / 1024.0);
    Ok(())
}

/// The benchmark frames: the photos resized to the frame size and JPEG-encoded, or noise PNGs.
fn make_frames(args: &BenchArgs, w: u32, h: u32) -> anyhow::Result<Vec<Bytes>> {
    if let Some(mb) = args.noise_mb {
        let side = ((mb * 1e6 / 3.0).sqrt()) as u32;
        return Ok((0..4u32)
            .map(|seed| Bytes::from(noise_png(side, seed)))
            .collect());
    }
    read_images(&args.images)?
        .into_iter()
        .map(|(name, data)| {
            let img = image::load_from_memory(&data).with_context(|| name.clone())?;
            let rgb = img
                .resize_exact(w, h, image::imageops::FilterType::Triangle)
                .to_rgb8();
            let mut out = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(
                &mut Cursor::new(&mut out),
                args.quality,
            )
            .encode_image(&rgb)?;
            Ok(Bytes::from(out))
        })
        .collect()
}

/// The MIME type of a benchmark frame.
fn sniffed(data: &[u8]) -> &'static str {
    crate::ingress::payload::sniff(data).unwrap_or(crate::ingress::payload::JPEG)
}

/// A PNG of `side` x `side` random pixels (~3 bytes a pixel: noise does not compress), different
/// for each seed. Used for large-frame benchmarks and tests.
pub fn noise_png(side: u32, seed: u32) -> Vec<u8> {
    let mut state = 0x2545_f491_u32 ^ seed.wrapping_mul(0x9e37_79b9);
    let img = image::RgbImage::from_fn(side, side, |_, _| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        image::Rgb([state as u8, (state >> 8) as u8, (state >> 16) as u8])
    });
    let mut out = Vec::new();
    // Encoding into memory cannot fail for an RGB image.
    let _ = img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png);
    out
}

/// Frames/s of `workers` threads doing what a worker does, without MQTT or Kafka.
fn limit(
    prepared: &pipeline::Prepared,
    cfg: &Config,
    frames: &[Bytes],
    n: u64,
) -> anyhow::Result<f64> {
    let workers_n = cfg.inference.workers as u64;
    let per_worker = n.div_ceil(workers_n);
    let mut engines = Vec::new();
    for _ in 0..workers_n {
        engines.push(Engine::new(&prepared.models, cfg.inference.intra_threads)?);
    }
    let models = prepared.router.models_for("cam-1").to_vec();
    let limits = ImageLimits {
        min_side: 1,
        ..ImageLimits::from_config(&cfg.inference)
    };
    // Warm-up: the first run of a session allocates.
    for engine in &mut engines {
        let img = decode(&frames[0], sniffed(&frames[0]), &limits)?.image;
        for m in &models {
            engine.run(&m.name, &img)?;
        }
    }
    let started = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let handles: Vec<_> = engines
            .iter_mut()
            .map(|engine| {
                let models = &models;
                s.spawn(move || -> anyhow::Result<()> {
                    for i in 0..per_worker {
                        let frame = &frames[i as usize % frames.len()];
                        let img = decode(frame, sniffed(frame), &limits)?.image;
                        for m in models {
                            engine.run(&m.name, &img)?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("bench worker panicked"))??;
        }
        Ok(())
    })?;
    Ok((per_worker * workers_n) as f64 / started.elapsed().as_secs_f64())
}

async fn end_to_end(
    prepared: pipeline::Prepared,
    cfg: &Config,
    args: &BenchArgs,
    frames: &[Bytes],
) -> anyhow::Result<(f64, Arc<Stats>)> {
    let stats = Arc::new(Stats::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let node_started = Instant::now();
    let node = tokio::spawn(pipeline::run(prepared, stop_rx, stats.clone()));

    let (host, port) = split_host_port(&format!("{}:{}", cfg.mqtt.host, cfg.mqtt.port))?;
    let mut opts = MqttOptions::new(format!("fovea-bench-{}", std::process::id()), host, port);
    opts.set_max_packet_size(268_435_455, 268_435_455)
        .set_inflight(100);
    let (client, mut events) = AsyncClient::new(opts, 100);
    let poller = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    });
    // Let the node connect and subscribe before the clock starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    let period = if args.rate > 0.0 {
        Duration::from_secs_f64(1.0 / args.rate)
    } else {
        Duration::ZERO
    };
    for i in 0..args.frames {
        tokio::time::sleep_until((started + period.mul_f64(i as f64)).into()).await;
        let camera = format!("bench-{}", i as usize % args.cameras + 1);
        let frame = frames[i as usize % frames.len()].clone();
        client
            .publish_bytes(
                format!("cameras/{camera}/frames"),
                QoS::AtLeastOnce,
                false,
                frame,
            )
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while stats.acked.load(Ordering::Relaxed) < args.frames {
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out: {} of {} acked",
            Stats::get(&stats.acked),
            args.frames
        );
        anyhow::ensure!(!node.is_finished(), "the node stopped during the benchmark");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let fps = args.frames as f64 / started.elapsed().as_secs_f64();
    if args.backlog > 0 {
        while Stats::get(&stats.drained) < 2 * args.backlog {
            anyhow::ensure!(Instant::now() < deadline, "backlog never drained");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let secs = node_started.elapsed().as_secs_f64();
        println!(
            "backlog of {} frames ({} records) drained in {secs:.1} s from node start: {:.0} records/s",
            args.backlog,
            2 * args.backlog,
            (2 * args.backlog) as f64 / secs
        );
    }
    let _ = client.disconnect().await;
    poller.abort();
    let _ = stop_tx.send(true);
    node.await??;
    Ok((fps, stats))
}

/// Puts `n` frames, each a frame record and a small result record, into the node's spool.
fn fill_spool(cfg: &Config, frames: &[Bytes], n: u64) -> anyhow::Result<()> {
    use crate::spool::{Class, SledSpool, Spool, SpoolOptions, SpoolRecord};
    use fovea_proto::headers as h;
    use prost::Message;
    let dir = cfg.spool_dir();
    std::fs::create_dir_all(&dir)?;
    let (mut spool, _) = SledSpool::open(SpoolOptions {
        dir,
        max_bytes: u64::MAX,
        when_full: cfg.spool.when_full,
    })?;
    let started = Instant::now();
    let mut bytes = 0usize;
    for i in 0..n {
        let camera = format!("backlog-{}", i % 4 + 1);
        let id = format!("bench/{camera}/s{i}");
        let frame = fovea_proto::v1::Frame {
            camera_id: camera.clone(),
            sequence: i + 1,
            record_id: id.clone(),
            data: frames[i as usize % frames.len()].clone(),
            ..Default::default()
        };
        let result = fovea_proto::v1::InferenceResult {
            record_id: id.clone(),
            camera_id: camera.clone(),
            ..Default::default()
        };
        let t = &cfg.kafka.topics;
        for (class, topic, schema, value) in [
            (
                Class::Frame,
                &t.frames,
                h::SCHEMA_FRAME,
                frame.encode_to_vec(),
            ),
            (
                Class::Result,
                &t.results,
                h::SCHEMA_RESULT,
                result.encode_to_vec(),
            ),
        ] {
            let record = SpoolRecord {
                class,
                topic: topic.clone(),
                key: camera.clone(),
                headers: vec![
                    (h::SCHEMA.into(), schema.into()),
                    (h::RECORD_ID.into(), id.clone()),
                ],
                value,
                created_ms: crate::job::now_ms(),
            };
            bytes += record.size();
            spool.append(&record)?;
        }
    }
    spool.flush()?;
    println!(
        "spooled a backlog of {n} frames ({:.1} MB) in {:.1} s",
        bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Peak resident set size of this process (VmHWM), KiB.
pub fn peak_rss_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmHWM not found in /proc/self/status")
}
