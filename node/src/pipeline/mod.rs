//! The data path, wired: ingress -> workers -> outbox, and the orderly way it stops.
//!
//! ```text
//! MQTT --Job--> [bounded queue] --> inference workers (threads) --Done--> outbox --> Kafka
//!   ^                                                                          |
//!   +------------------------------ PUBACK once every record is acked <-------+
//! ```
//! - `job`: what travels between the stages.
//! - `routes`: which models run on which camera.
//! - `workers`: decode + inference, off the async threads.
//! - `sequencer`: per-camera reordering before the outbox writes.

pub mod routes;
pub mod workers;

use crate::blobstore::{self, BlobStore, BlobStoreOptions};
use crate::config::Config;
use crate::config::LargeFramePolicy;
use crate::inference;
use crate::ingress::chunk_store::ChunkStore;
use crate::ingress::dispatch::{BestEffort, Dispatcher, DispatcherParts, LargeFrameLimits};
use crate::ingress::mqtt::Ingress;
use crate::ingress::spill::Spill;
use crate::job::Cameras;
use crate::outbox::plan::RecordPlanner;
use crate::outbox::{Outbox, producer};
use crate::records::{FRAMING_ALLOWANCE, RecordLimit};
use crate::spool::{SledSpool, Spool, SpoolOptions};
use crate::stats::Stats;
use anyhow::Context;
use routes::Router;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Everything loaded and checked before the node takes its first frame.
pub struct Prepared {
    pub cfg: Config,
    pub models: Vec<Arc<inference::Model>>,
    pub router: Arc<Router>,
}

/// Loads models and resolves routes; no broker is touched. Used by `run` and by `validate`.
pub fn prepare(cfg: Config) -> anyhow::Result<Prepared> {
    let dirs: Vec<_> = cfg.models.iter().map(|m| m.path.clone()).collect();
    let models = inference::load_models(&dirs).context("loading models")?;
    let router = Router::new(&cfg.routes, &models)
        .map_err(|errors| anyhow::anyhow!("{}", errors.join("\n")))?;
    Ok(Prepared {
        cfg,
        models,
        router: Arc::new(router),
    })
}

/// Runs the node until `shutdown` turns true, then drains: frames in flight are finished and
/// acked, new ones stay un-acked at the MQTT broker. Returns the run's statistics.
pub async fn run(
    prepared: Prepared,
    shutdown: watch::Receiver<bool>,
    stats: Arc<Stats>,
) -> anyhow::Result<()> {
    let Prepared {
        cfg,
        models,
        router,
    } = prepared;
    let node_id = cfg.node_id();
    inference::init_runtime(&cfg.inference.onnxruntime_library)?;

    let k = &cfg.kafka;
    let spool = open_spool(&cfg)?;
    // Topics are created by the outbox when it first reaches the broker: a node whose broker is
    // down at start still takes frames (into the spool).
    let producer = producer::KafkaProducer::new(
        k,
        crate::outbox::topics::TopicSpec::node_topics(&cfg),
        &format!("fovea-{node_id}"),
        cfg.spool.divert_after_ms,
    )?;

    let claims = start_claim_checks(&cfg, &shutdown).await?;

    let (jobs_tx, jobs_rx) = async_channel::bounded(cfg.inference.queue_capacity);
    let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel();
    let shared = workers::WorkerShared {
        claims,
        node_id: node_id.clone(),
        router,
        policy: cfg.inference.when_behind,
        max_age: Duration::from_millis(cfg.inference.max_frame_age_ms),
        image: crate::inference::decode::ImageLimits::from_config(&cfg.inference),
        max_metadata: cfg.mqtt.max_metadata_bytes,
        stats: stats.clone(),
        panic_on_metadata: workers::test_panic_key(),
        lose_ack_on_metadata: workers::test_lose_ack_key(),
    };
    let threads = workers::spawn(&cfg.inference, &models, shared, jobs_rx, done_tx.clone())?;
    log::info!(
        "node {node_id}: {} worker(s), models: {}",
        threads.len(),
        models
            .iter()
            .map(|m| format!("{}@{}", m.name, m.version))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let cameras = Arc::new(Cameras::new(
        cfg.mqtt.max_cameras,
        Duration::from_secs(cfg.mqtt.camera_idle_secs),
    ));
    let outbox = Outbox {
        cameras: cameras.clone(),
        producer,
        planner: RecordPlanner {
            node_id,
            topics: k.topics.clone(),
            limit: RecordLimit::new(k.record_limit_bytes),
            large_policy: cfg.large_frames.policy,
        },
        stats: stats.clone(),
        spool,
        spool_cfg: cfg.spool.clone(),
    };
    let (drained_tx, drained_rx) = watch::channel(false);
    let outbox_task = tokio::spawn(async move {
        outbox.run(done_rx).await;
        let _ = drained_tx.send(true);
    });

    let large = LargeFrameLimits {
        config: &cfg.large_frames,
        record_limit: k.record_limit_bytes,
    };
    let uplink = cfg.uplink.enabled.then(|| {
        let (cfg, stats, stop) = (cfg.clone(), stats.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::uplink::replicator::run(cfg, stats, stop).await {
                log::error!("uplink stopped: {e:#}");
            }
        })
    });

    let chunk_dir = cfg.node.state_dir.join("chunks");
    let store = match ChunkStore::open(&chunk_dir) {
        Ok(opened) => Some(opened),
        Err(e) => {
            // Chunked uploads still work, holding every chunk's ack until the frame is durable
            // (which needs a broker in-flight window longer than the upload).
            log::error!(
                "chunk store {}: {e}; chunk acks wait for whole frames",
                chunk_dir.display()
            );
            None
        }
    };
    let spill_dir = cfg.node.state_dir.join("ingress-spill");
    let spill = match Spill::open(&spill_dir, cfg.mqtt.spill_max_bytes) {
        Ok(spill) => Some(spill),
        Err(e) => {
            log::error!(
                "ingress spill folder {}: {e}; deliveries over the memory budget are shed",
                spill_dir.display()
            );
            None
        }
    };
    let best_effort = Arc::new(BestEffort {
        limit: cfg.inference.queue_capacity,
        ..BestEffort::default()
    });
    let (deliveries_tx, deliveries_rx) = tokio::sync::mpsc::unbounded_channel();
    let dispatcher = Dispatcher::new(DispatcherParts {
        cfg: &cfg.mqtt,
        jobs: jobs_tx,
        done: done_tx,
        stats: stats.clone(),
        cameras,
        best_effort: best_effort.clone(),
        large,
        store,
    });
    let dispatcher = tokio::spawn(dispatcher.run(deliveries_rx, shutdown.clone()));
    let ingress = Ingress::new(
        &cfg.mqtt,
        &cfg.mqtt_client_id(),
        deliveries_tx,
        best_effort,
        spill,
        stats.clone(),
    );
    stats.liveness.set_started();
    ingress.run(shutdown, drained_rx).await;
    stats
        .mqtt_connected
        .store(false, std::sync::atomic::Ordering::Relaxed);

    dispatcher.await.context("ingress dispatcher task")?;
    outbox_task.await.context("outbox task")?;
    if let Some(uplink) = uplink {
        let _ = uplink.await;
    }
    tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    })
    .await?;
    Ok(())
}

/// Opens the spool, replaying what a previous run left; says what it found.
fn open_spool(cfg: &Config) -> anyhow::Result<Box<dyn Spool>> {
    let opts = SpoolOptions {
        dir: cfg.spool_dir(),
        max_bytes: cfg.spool.max_bytes,
        when_full: cfg.spool.when_full,
    };
    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("creating the spool folder {}", opts.dir.display()))?;
    let (spool, report) = SledSpool::open(opts)
        .with_context(|| format!("opening the spool in {}", cfg.spool_dir().display()))?;
    log::info!("spool {}: {report}", cfg.spool_dir().display());
    Ok(Box::new(spool))
}

/// With `large_frames.policy = "claim_check"`: opens the blob store, serves it over HTTP and
/// prunes it in the background (both stop with `shutdown`), and returns what the workers need.
async fn start_claim_checks(
    cfg: &Config,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<Option<Arc<workers::Claims>>> {
    let lf = &cfg.large_frames;
    if lf.policy != LargeFramePolicy::ClaimCheck {
        return Ok(None);
    }
    let store = BlobStore::open(BlobStoreOptions {
        dir: cfg.blob_dir(),
        max_bytes: lf.store_max_bytes,
        retention: Duration::from_secs(lf.retention_hours * 3600),
    })
    .with_context(|| format!("opening the blob store in {}", cfg.blob_dir().display()))?;
    let listener = tokio::net::TcpListener::bind(&lf.http_listen)
        .await
        .with_context(|| format!("serving the blob store on {}", lf.http_listen))?;
    log::info!(
        "claim checks: blobs in {}, served on http://{} as {}",
        cfg.blob_dir().display(),
        lf.http_listen,
        cfg.blob_public_url()
    );
    tokio::spawn(blobstore::serve(store.clone(), listener, shutdown.clone()));
    tokio::spawn(blobstore::run_pruner(
        store.clone(),
        Duration::from_secs(600),
        shutdown.clone(),
    ));
    Ok(Some(Arc::new(workers::Claims {
        store,
        public_url: cfg.blob_public_url(),
        // Room for the rest of the frame record (ids, metadata, headers) under the limit.
        threshold: cfg
            .kafka
            .record_limit_bytes
            .saturating_sub(FRAMING_ALLOWANCE + 4096),
    })))
}
