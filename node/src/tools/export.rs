//! `fovea frames export`: turns a frames topic back into the original image files, whatever size
//! policy each frame took: inline frames are written as they are, chunked frames are reassembled
//! with `fovea_proto::chunks` (the library consumers use too), claim checks are fetched from the
//! blob store and verified against their SHA-256. Files are `<out>/<camera>/<frame id>.<ext>`, so
//! a frame delivered twice (at least once) is written once.

use crate::blobstore;
use anyhow::Context;
use clap::Args;
use fovea_proto::chunks::{Aggregator, Limits, Outcome};
use fovea_proto::headers as h;
use fovea_proto::v1::{Frame, FrameChunk};
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// The frames topic.
    #[arg(long, default_value = "fovea.frames")]
    pub topic: String,
    /// Folder to write the images to.
    #[arg(long)]
    pub out: PathBuf,
    /// Stop after this many frames were written.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop when no record arrived for this many seconds.
    #[arg(long, default_value_t = 5.0)]
    pub idle_exit: f64,
    /// Seconds a chunked frame may take to complete before it is reported incomplete.
    #[arg(long, default_value_t = 60.0)]
    pub chunk_timeout: f64,
}

/// What an export did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub written: u64,
    pub inline: u64,
    pub chunked: u64,
    pub claimed: u64,
    pub duplicates: u64,
    pub incomplete: u64,
    pub failed: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exported {} frame(s) ({} inline, {} chunked, {} claim-check); {} duplicate(s), {} incomplete, {} failed",
            self.written,
            self.inline,
            self.chunked,
            self.claimed,
            self.duplicates,
            self.incomplete,
            self.failed
        )
    }
}

pub async fn run(args: ExportArgs) -> anyhow::Result<Summary> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", "fovea-export")
        .set("enable.auto.commit", "false")
        .set("fetch.message.max.bytes", "67108864")
        .set("log.connection.close", "false")
        .create()?;
    let md = consumer
        .fetch_metadata(Some(&args.topic), Duration::from_secs(10))
        .with_context(|| format!("metadata for {}", args.topic))?;
    let partitions = md.topics().first().map_or(0, |t| t.partitions().len());
    anyhow::ensure!(
        partitions > 0,
        "topic {} does not exist on {}",
        args.topic,
        args.brokers
    );
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(&args.topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    std::fs::create_dir_all(&args.out)?;

    let timeout = Duration::from_secs_f64(args.chunk_timeout);
    let mut aggregator = Aggregator::new(Limits {
        max_frame_bytes: 1 << 30,
        max_frames_in_flight: 256,
        max_bytes_in_flight: 2 << 30,
        timeout,
    });
    let mut seen = HashSet::new();
    let mut summary = Summary::default();
    let mut last = Instant::now();
    loop {
        if args.count.is_some_and(|c| summary.written >= c)
            || last.elapsed().as_secs_f64() > args.idle_exit
        {
            break;
        }
        let outcomes = match consumer.poll(Duration::from_millis(200)) {
            None => aggregator.expire(Instant::now()),
            Some(Err(e)) => {
                log::warn!("export: {e}");
                continue;
            }
            Some(Ok(msg)) => {
                last = Instant::now();
                let value = msg.payload().unwrap_or_default();
                match crate::records::header_of(&msg, h::SCHEMA).as_deref() {
                    Some(h::SCHEMA_FRAME) => {
                        let frame = Frame::decode(value).context("undecodable frame record")?;
                        let claimed = frame.claim.is_some();
                        match write_frame(&args.out, frame, &mut seen).await {
                            Ok(true) if claimed => summary.claimed += 1,
                            Ok(true) => summary.inline += 1,
                            Ok(false) => summary.duplicates += 1,
                            Err(e) => {
                                summary.failed += 1;
                                eprintln!("export: {e:#}");
                            }
                        }
                        Vec::new()
                    }
                    Some(h::SCHEMA_FRAME_CHUNK) => match FrameChunk::decode(value) {
                        Ok(chunk) => aggregator.push(chunk, Instant::now()),
                        Err(e) => {
                            summary.failed += 1;
                            eprintln!("export: undecodable chunk: {e}");
                            Vec::new()
                        }
                    },
                    _ => Vec::new(),
                }
            }
        };
        for outcome in outcomes {
            handle(outcome, &args.out, &mut seen, &mut summary).await;
        }
        summary.written = summary.inline + summary.chunked + summary.claimed;
    }
    // Whatever is still incomplete now will not complete.
    for outcome in aggregator.expire(Instant::now() + timeout * 2) {
        handle(outcome, &args.out, &mut seen, &mut summary).await;
    }
    summary.written = summary.inline + summary.chunked + summary.claimed;
    Ok(summary)
}

async fn handle(outcome: Outcome, out: &Path, seen: &mut HashSet<String>, summary: &mut Summary) {
    match outcome {
        Outcome::Complete(done) => {
            let written = match Frame::decode(done.payload.clone()) {
                Ok(frame) => write_frame(out, frame, seen).await,
                Err(e) => Err(anyhow::anyhow!(
                    "reassembled frame {} does not decode: {e}",
                    done.frame_id
                )),
            };
            match written {
                Ok(true) => summary.chunked += 1,
                Ok(false) => summary.duplicates += 1,
                Err(e) => {
                    summary.failed += 1;
                    eprintln!("export: {e:#}");
                }
            }
        }
        Outcome::Incomplete {
            frame_id,
            camera_id,
            received,
            count,
            missing,
            ..
        } => {
            summary.incomplete += 1;
            eprintln!(
                "export: frame {frame_id} of {camera_id} incomplete: {received}/{count} chunks, missing {missing:?}"
            );
        }
        Outcome::Rejected {
            frame_id,
            camera_id,
            reason,
        } => {
            summary.failed += 1;
            eprintln!("export: frame {frame_id} of {camera_id} rejected: {reason}");
        }
    }
}

/// Writes one frame's image (fetching a claim check); false if this frame was written already.
async fn write_frame(out: &Path, frame: Frame, seen: &mut HashSet<String>) -> anyhow::Result<bool> {
    if !seen.insert(frame.record_id.clone()) {
        return Ok(false);
    }
    let data = match &frame.claim {
        None => frame.data.to_vec(),
        Some(claim) => {
            let data = blobstore::fetch(&claim.url, claim.size.max(1) + 1, Duration::from_secs(60))
                .await
                .with_context(|| format!("fetching {}", claim.url))?;
            let sha = hex::encode(Sha256::digest(&data));
            anyhow::ensure!(sha == claim.sha256, "blob {} has SHA-256 {sha}", claim.url);
            data
        }
    };
    let frame_id = frame.record_id.rsplit('/').next().unwrap_or("frame");
    let ext = if frame.content_type == "image/png" {
        "png"
    } else {
        "jpg"
    };
    let dir = out.join(&frame.camera_id);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("{frame_id}.{ext}")), data)?;
    Ok(true)
}
