//! `fovea frames export`: turns a frames topic back into the original image files, whatever size
//! policy each frame took: inline frames are written as they are, chunked frames are reassembled
//! with `fovea_proto::chunks` (the library consumers use too), claim checks are fetched from the
//! blob store and verified against their SHA-256. Files are `<out>/<camera>/<frame id>.<ext>`, so
//! a frame delivered twice (at least once) is written once.
//!
//! Records are outside input: a record whose camera or frame id is no safe file name, or whose
//! claim check points outside the allowed URL prefixes (`--allow-url`, by default the node's own
//! `large_frames.public_url`), is refused with the reason and nothing is written or fetched for
//! it (see [`super::export_checks`]).

use super::export_checks::{UrlAllowList, frame_path};
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
    /// Fetch claim checks only from URLs under this prefix (repeatable), e.g.
    /// `http://10.0.0.5:8089`. Default: the node's own `large_frames.public_url`, from --config.
    #[arg(long = "allow-url", value_name = "PREFIX")]
    pub allow_url: Vec<String>,
    /// The node's config file, read only for the default of --allow-url.
    #[arg(
        long,
        short,
        env = "FOVEA_CONFIG",
        default_value = "/etc/fovea/fovea.toml"
    )]
    pub config: PathBuf,
}

impl ExportArgs {
    /// Where claim checks may be fetched from: `--allow-url`, else the config's public URL. A
    /// config that cannot be read allows nothing (inline and chunked frames still export), and
    /// each claim check refused says why.
    pub fn allowed_urls(&self) -> anyhow::Result<UrlAllowList> {
        if !self.allow_url.is_empty() {
            return UrlAllowList::new(&self.allow_url).map_err(anyhow::Error::msg);
        }
        match crate::config::load(&self.config) {
            Ok(cfg) => UrlAllowList::new(&[cfg.blob_public_url()]).map_err(|e| {
                anyhow::anyhow!("{e} (large_frames.public_url of {})", self.config.display())
            }),
            Err(e) => Ok(UrlAllowList::none(format!(
                "no --allow-url was given and the node's config {} could not be read for its                  large_frames.public_url ({})",
                self.config.display(),
                e.to_string().lines().next().unwrap_or_default()
            ))),
        }
    }
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
    /// Records refused as unsafe: a path outside the folder, a claim URL not allowed.
    pub refused: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exported {} frame(s) ({} inline, {} chunked, {} claim-check); {} duplicate(s), {} incomplete, {} failed, {} refused",
            self.written,
            self.inline,
            self.chunked,
            self.claimed,
            self.duplicates,
            self.incomplete,
            self.failed,
            self.refused
        )
    }
}

pub async fn run(args: ExportArgs) -> anyhow::Result<Summary> {
    let allowed = args.allowed_urls()?;
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
                        match write_frame(&args.out, frame, &allowed, &mut seen).await {
                            Ok(Written::New) if claimed => summary.claimed += 1,
                            Ok(Written::New) => summary.inline += 1,
                            Ok(Written::Duplicate) => summary.duplicates += 1,
                            Err(e) => summary.count_error(&e),
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
            handle(outcome, &args.out, &allowed, &mut seen, &mut summary).await;
        }
        summary.written = summary.inline + summary.chunked + summary.claimed;
    }
    // Whatever is still incomplete now will not complete.
    for outcome in aggregator.expire(Instant::now() + timeout * 2) {
        handle(outcome, &args.out, &allowed, &mut seen, &mut summary).await;
    }
    summary.written = summary.inline + summary.chunked + summary.claimed;
    Ok(summary)
}

async fn handle(
    outcome: Outcome,
    out: &Path,
    allowed: &UrlAllowList,
    seen: &mut HashSet<String>,
    summary: &mut Summary,
) {
    match outcome {
        Outcome::Complete(done) => {
            let written = match Frame::decode(done.payload.clone()) {
                Ok(frame) => write_frame(out, frame, allowed, seen).await,
                Err(e) => Err(anyhow::anyhow!(
                    "reassembled frame {} does not decode: {e}",
                    done.frame_id
                )),
            };
            match written {
                Ok(Written::New) => summary.chunked += 1,
                Ok(Written::Duplicate) => summary.duplicates += 1,
                Err(e) => summary.count_error(&e),
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

/// What `write_frame` did with a frame.
enum Written {
    New,
    /// Written already (the same record id delivered again).
    Duplicate,
}

/// A record refused as unsafe (told apart from a failure in the summary).
#[derive(Debug, thiserror::Error)]
#[error("refused record: {0}")]
struct Refused(String);

impl Summary {
    fn count_error(&mut self, e: &anyhow::Error) {
        if e.is::<Refused>() {
            self.refused += 1;
        } else {
            self.failed += 1;
        }
        eprintln!("export: {e:#}");
    }
}

/// Writes one frame's image (fetching a claim check). The file name and the claim URL are checked
/// before anything is fetched or written.
async fn write_frame(
    out: &Path,
    frame: Frame,
    allowed: &UrlAllowList,
    seen: &mut HashSet<String>,
) -> anyhow::Result<Written> {
    let ext = if frame.content_type == "image/png" {
        "png"
    } else {
        "jpg"
    };
    let path = frame_path(out, &frame.camera_id, &frame.record_id, ext).map_err(Refused)?;
    if let Some(claim) = &frame.claim {
        allowed.check(&claim.url).map_err(Refused)?;
    }
    if !seen.insert(frame.record_id.clone()) {
        return Ok(Written::Duplicate);
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
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
    Ok(Written::New)
}
