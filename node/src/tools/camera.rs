//! `fovea camera`: publishes a folder of images as one or more simulated cameras, over MQTT QoS 1,
//! at a given rate, and waits until the broker acknowledged every frame.

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use fovea_proto::v1::Frame;
use prost::Message;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Args)]
pub struct CameraArgs {
    /// MQTT broker, host:port.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub mqtt: String,
    /// Folder of .jpg/.jpeg/.png images (sent in name order).
    #[arg(long)]
    pub images: PathBuf,
    /// Number of simulated cameras (cam-1 .. cam-N).
    #[arg(long, default_value_t = 1)]
    pub cameras: usize,
    /// Frames per second per camera (0 = as fast as the broker takes them).
    #[arg(long, default_value_t = 1.0)]
    pub fps: f64,
    /// Frames per camera; default: each image once. Ignored with --forever.
    #[arg(long)]
    pub count: Option<u64>,
    /// Keep publishing until interrupted.
    #[arg(long)]
    pub forever: bool,
    /// Wrap each image in a fovea.v1.Frame envelope with a sequence number and capture time.
    #[arg(long)]
    pub envelope: bool,
    /// Topic template; {camera} is replaced by the camera id.
    #[arg(long, default_value = "cameras/{camera}/frames")]
    pub topic: String,
    /// Camera id prefix.
    #[arg(long, default_value = "cam-")]
    pub prefix: String,
    /// Quiet: print only the summary.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Reads the images of a folder (sorted by name).
pub fn read_images(dir: &Path) -> anyhow::Result<Vec<(String, Bytes)>> {
    let mut images = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        if matches!(ext.as_str(), "jpg" | "jpeg" | "png") {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            images.push((name, Bytes::from(std::fs::read(&path)?)));
        }
    }
    images.sort_by(|a, b| a.0.cmp(&b.0));
    if images.is_empty() {
        bail!("no .jpg/.jpeg/.png images in {}", dir.display());
    }
    Ok(images)
}

pub fn split_host_port(addr: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = addr
        .rsplit_once(':')
        .with_context(|| format!("{addr:?} is not host:port"))?;
    Ok((
        host.to_string(),
        port.parse()
            .with_context(|| format!("bad port in {addr:?}"))?,
    ))
}

pub async fn run(args: CameraArgs) -> anyhow::Result<()> {
    let images = read_images(&args.images)?;
    let (host, port) = split_host_port(&args.mqtt)?;
    let mut opts = MqttOptions::new(format!("fovea-camera-{}", std::process::id()), host, port);
    opts.set_max_packet_size(268_435_455, 268_435_455)
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(64);
    let (client, mut events) = AsyncClient::new(opts, 64);
    let acked = Arc::new(AtomicU64::new(0));
    let acked_in_loop = acked.clone();
    let poller = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked_in_loop.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(e) => {
                    log::warn!("camera: mqtt connection error: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });

    let per_camera = if args.forever {
        u64::MAX
    } else {
        args.count.unwrap_or(images.len() as u64)
    };
    let period = if args.fps > 0.0 {
        Duration::from_secs_f64(1.0 / args.fps)
    } else {
        Duration::ZERO
    };
    let started = Instant::now();
    let mut sent = 0u64;
    for tick in 0..per_camera {
        let due = started + period.mul_f64(tick as f64);
        tokio::time::sleep_until(due.into()).await;
        for cam in 1..=args.cameras {
            let camera = format!("{}{cam}", args.prefix);
            let (name, data) = &images[(tick as usize + cam - 1) % images.len()];
            let payload = if args.envelope {
                Frame {
                    camera_id: camera.clone(),
                    sequence: tick + 1,
                    captured_at_ms: crate::job::now_ms(),
                    data: data.clone(),
                    metadata: [("file".to_string(), name.clone())].into(),
                    ..Frame::default()
                }
                .encode_to_vec()
                .into()
            } else {
                data.clone()
            };
            let topic = args.topic.replace("{camera}", &camera);
            client
                .publish_bytes(topic.clone(), QoS::AtLeastOnce, false, payload)
                .await?;
            sent += 1;
            if !args.quiet {
                println!("{topic} <- {name} ({} bytes)", data.len());
            }
        }
    }
    // Wait for the broker to take every frame.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), poller).await;
    let acked = acked.load(Ordering::Relaxed);
    println!(
        "camera: published {sent} frames from {} camera(s) in {:.1} s; broker acknowledged {acked}",
        args.cameras,
        started.elapsed().as_secs_f64()
    );
    if acked < sent {
        bail!("broker acknowledged only {acked} of {sent} frames");
    }
    Ok(())
}
