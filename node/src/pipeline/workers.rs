//! The inference worker pool: plain OS threads, each with its own ONNX Runtime sessions, pulling
//! jobs from one bounded queue. Decoding and inference are CPU-bound and would stall the async
//! I/O threads (MQTT keep-alives, Kafka deliveries), so they never run there.
//!
//! A worker turns every job into exactly one [`Done`]: a frame with its result (OK, skipped or
//! failed) or a rejection. The outbox relies on that to keep each camera's records in order.
//! That holds when the work panics too: the panic becomes the frame's `internal-error` dead
//! letter (see [`crate::job::contain`]) and the thread takes the next job.

use super::routes::Router;
use crate::config::{InferenceConfig, WhenBehind};
use crate::inference::decode::{ImageLimits, decode};
use crate::inference::{Engine, Model};
use crate::ingress::payload;
use crate::job::{Done, Job, JobMeta, Verdict};
use crate::stats::{Stage, Stats};
use bytes::Bytes;
use fovea_proto::v1::{FrameDisposition, InferenceResult, inference_result::Status};
use image::DynamicImage;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// Claim checks: where a worker puts images too large for a record (policy `claim_check`).
pub struct Claims {
    pub store: crate::blobstore::BlobStore,
    /// Base URL consumers fetch blobs from.
    pub public_url: String,
    /// Images at least this large go to the store (the record limit less room for the rest).
    pub threshold: usize,
}

/// What every worker needs besides its own sessions.
#[derive(Clone)]
pub struct WorkerShared {
    pub claims: Option<Arc<Claims>>,
    pub node_id: String,
    pub router: Arc<Router>,
    pub policy: WhenBehind,
    pub max_age: Duration,
    /// Pixel limits and what to do with damaged images (`[inference]`).
    pub image: ImageLimits,
    /// `mqtt.max_metadata_bytes`.
    pub max_metadata: usize,
    pub stats: Arc<Stats>,
    /// Test-only: panic where inference would start on frames whose camera metadata has this
    /// key (see [`test_panic_key`]).
    pub panic_on_metadata: Option<String>,
    /// Test-only: lose the MQTT ack of frames whose camera metadata has this key (see
    /// [`test_lose_ack_key`]).
    pub lose_ack_on_metadata: Option<String>,
}

/// The variable that arms the test-only panic: `FOVEA_TEST_PANIC_ON_METADATA=key`.
pub const TEST_PANIC_ENV: &str = "FOVEA_TEST_PANIC_ON_METADATA";

/// The variable that arms the test-only lost ack: `FOVEA_TEST_LOSE_ACK_ON_METADATA=key`.
pub const TEST_LOSE_ACK_ENV: &str = "FOVEA_TEST_LOSE_ACK_ON_METADATA";

/// Test-only hook for the end-to-end test of panic containment: the metadata key that makes a
/// worker panic, from [`TEST_PANIC_ENV`], read once at start.
///
/// An environment variable rather than a cargo feature: the end-to-end tests run the very binary
/// that is shipped (`CARGO_BIN_EXE_fovea`), and a feature would mean building and testing another
/// one. Set by mistake it does no harm beyond what it says: frames carrying that key become
/// `internal-error` dead letters (and acked); a node started with it logs a warning.
pub fn test_panic_key() -> Option<String> {
    test_hook(
        TEST_PANIC_ENV,
        "workers will panic on frames with metadata key",
    )
}

/// Test-only hook for the end-to-end test of the wedge check: frames whose camera metadata has
/// this key ([`TEST_LOSE_ACK_ENV`]) are written as usual but their MQTT ack is lost, the kind of
/// bug that fills the broker's in-flight window until nothing more arrives. Set by mistake, it
/// wedges the node on such frames, and the health check then says so.
pub fn test_lose_ack_key() -> Option<String> {
    test_hook(
        TEST_LOSE_ACK_ENV,
        "the MQTT ack is lost for frames with metadata key",
    )
}

fn test_hook(env: &str, what: &str) -> Option<String> {
    let key = std::env::var(env).ok().filter(|k| !k.is_empty())?;
    log::warn!("{env} is set (test-only): {what} {key:?}");
    Some(key)
}

/// Starts `cfg.workers` threads. Sessions are created before this returns, so a model that does
/// not load fails start-up instead of the first frame. The threads end when `jobs` is closed and
/// drained.
pub fn spawn(
    cfg: &InferenceConfig,
    models: &[Arc<Model>],
    shared: WorkerShared,
    jobs: async_channel::Receiver<Job>,
    done: UnboundedSender<Done>,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let mut handles = Vec::with_capacity(cfg.workers);
    for i in 0..cfg.workers {
        let mut engine = Engine::new(models, cfg.intra_threads)?;
        let (shared, jobs, done) = (shared.clone(), jobs.clone(), done.clone());
        let handle = std::thread::Builder::new()
            .name(format!("fovea-infer-{i}"))
            .spawn(move || {
                while let Ok(job) = jobs.recv_blocking() {
                    shared.stats.liveness.worker_busy(i);
                    let finished = process(&shared, &mut engine, job);
                    shared.stats.liveness.worker_idle(i);
                    if done.send(finished).is_err() {
                        break; // the outbox is gone: shutting down
                    }
                }
            })?;
        handles.push(handle);
    }
    Ok(handles)
}

/// Decodes, checks and infers one job. A panic on the way becomes the frame's dead letter
/// (`internal-error`): the job's metadata, and with it the MQTT ack, stays out of the guarded
/// work, so the frame is still acked once the dead letter is durable.
pub fn process(shared: &WorkerShared, engine: &mut Engine, job: Job) -> Done {
    let Job { mut meta, payload } = job;
    let started = Instant::now();
    meta.started = Some(started);
    shared
        .stats
        .record(Stage::Queue, started.duration_since(meta.received));
    let verdict = crate::job::contain(|| judge(shared, engine, &meta, started, payload.clone()))
        .unwrap_or_else(|rejection| {
            log::error!(
                "a worker panicked on a frame from {}; dead-lettered as {}: {rejection}",
                meta.source,
                rejection.kind()
            );
            Verdict::Rejected { rejection, payload }
        });
    if let (Some(key), Verdict::Frame { result, .. }) = (&shared.lose_ack_on_metadata, &verdict)
        && result.metadata.contains_key(key)
    {
        log::warn!(
            "{TEST_LOSE_ACK_ENV}: losing the ack of {}",
            result.record_id
        );
        // Never sent and never dropped: held for as long as the process lives.
        std::mem::forget(std::mem::take(&mut meta.ack));
    }
    let finished = Instant::now();
    meta.finished = Some(finished);
    shared
        .stats
        .record(Stage::Inference, finished.duration_since(started));
    Done { meta, verdict }
}

/// What becomes of one frame: parsed, decoded, inferred (or skipped), claim-checked.
fn judge(
    shared: &WorkerShared,
    engine: &mut Engine,
    meta: &JobMeta,
    started: Instant,
    payload: Bytes,
) -> Verdict {
    match payload::parse(&meta.camera, payload.clone(), shared.max_metadata) {
        Err(rejection) => Verdict::Rejected { rejection, payload },
        Ok(mut frame) => {
            let stale = shared.policy == WhenBehind::SkipStale
                && started.duration_since(meta.received) > shared.max_age;
            let decoded = if stale {
                Ok(None)
            } else {
                decode(&frame.data, &frame.content_type, &shared.image).map(Some)
            };
            match decoded {
                Err(rejection) => Verdict::Rejected { rejection, payload },
                Ok(image) => {
                    frame.node_id = shared.node_id.clone();
                    frame.received_at_ms = meta.received_at_ms;
                    frame.record_id = crate::job::record_id(
                        &shared.node_id,
                        &meta.camera,
                        &payload::frame_id(&frame),
                    );
                    // The sides of the picture as inferred: upright, after EXIF orientation.
                    if let Some(d) = &image {
                        frame.width = d.image.width();
                        frame.height = d.image.height();
                    }
                    let mut result = base_result(&frame, meta.node_seq);
                    match image {
                        None => {
                            Stats::incr(&shared.stats.skipped_stale);
                            result.status = Status::SkippedStale as i32;
                            result.status_detail = format!(
                                "frame was {} ms old when a worker took it (max_frame_age_ms = {})",
                                started.duration_since(meta.received).as_millis(),
                                shared.max_age.as_millis()
                            );
                        }
                        Some(d) => {
                            infer(shared, engine, &meta.camera, &d.image, &mut result);
                            if let Some(caveat) = d.caveat
                                && result.status_detail.is_empty()
                            {
                                result.status_detail = caveat;
                            }
                        }
                    }
                    if let Some(claims) = &shared.claims {
                        claim_check(claims, &mut frame);
                    }
                    Verdict::Frame {
                        frame: Box::new(frame),
                        result: Box::new(result),
                    }
                }
            }
        }
    }
}

fn infer(
    shared: &WorkerShared,
    engine: &mut Engine,
    camera: &str,
    image: &DynamicImage,
    result: &mut InferenceResult,
) {
    let models = shared.router.models_for(camera);
    if models.is_empty() {
        result.status = Status::NoModel as i32;
        result.status_detail = format!("no route runs a model on camera {camera:?}");
        return;
    }
    if let Some(key) = &shared.panic_on_metadata
        && result.metadata.contains_key(key)
    {
        panic!(
            "{TEST_PANIC_ENV}: panicking on {} as asked (metadata key {key:?})",
            result.record_id
        );
    }
    let mut failures = Vec::new();
    for model in models {
        let started = Instant::now();
        let output = engine.run(&model.name, image);
        shared.stats.record_model(&model.name, started.elapsed());
        match output {
            Ok(output) => result.outputs.push(output),
            Err(e) => failures.push(format!("{}: {e}", model.name)),
        }
    }
    if failures.is_empty() {
        result.status = Status::Ok as i32;
    } else {
        log::warn!(
            "inference failed on {}: {}",
            result.record_id,
            failures.join("; ")
        );
        result.status = Status::Failed as i32;
        result.status_detail = failures.join("; ");
    }
}

/// Puts a large image in the blob store and leaves the reference in the frame instead. The blob is
/// durable (fsynced) before this returns, so the record that names it never points at nothing.
/// If the store fails the image stays in the frame and the outbox chunks it instead.
fn claim_check(claims: &Claims, frame: &mut fovea_proto::v1::Frame) {
    if frame.data.len() < claims.threshold {
        return;
    }
    match claims.store.put(&frame.data) {
        Ok(id) => {
            frame.claim = Some(fovea_proto::v1::ClaimCheck {
                url: crate::blobstore::blob_url(&claims.public_url, &id),
                sha256: id,
                size: frame.data.len() as u64,
            });
            frame.data = bytes::Bytes::new();
        }
        Err(e) => log::error!(
            "claim check of {} failed ({e}); the frame will be chunked instead",
            frame.record_id
        ),
    }
}

fn base_result(frame: &fovea_proto::v1::Frame, node_seq: u64) -> InferenceResult {
    InferenceResult {
        record_id: frame.record_id.clone(),
        node_id: frame.node_id.clone(),
        camera_id: frame.camera_id.clone(),
        camera_sequence: frame.sequence,
        captured_at_ms: frame.captured_at_ms,
        received_at_ms: frame.received_at_ms,
        image_width: frame.width,
        image_height: frame.height,
        content_type: frame.content_type.clone(),
        node_sequence: node_seq,
        metadata: frame.metadata.clone(),
        frame: Some(FrameDisposition {
            size_bytes: frame.data.len() as u64,
            ..FrameDisposition::default()
        }),
        ..InferenceResult::default()
    }
}
