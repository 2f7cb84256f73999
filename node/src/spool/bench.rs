//! `fovea spool bench`: how fast the spool takes and gives back records on this disk.
//!
//! Two workloads, each on a fresh spool in a temporary folder under the given folder (put it on
//! the disk the spool will use): 200 frame records of 1 MiB (each in a record file of its own)
//! and 20 000 result records of 1 KiB (in sled).
//! *Write* appends with a flush (fsync) every 16 records, as the outbox does under load;
//! *drain* reads the oldest 16 and removes them until the spool is empty, then flushes; *reopen*
//! is the start-up scan that checks every record.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;

use super::report::{human_bytes, now_ms};
use super::{Class, SledSpool, Spool, SpoolOptions, SpoolRecord, WhenFull};

/// Records appended between two flushes, and read per drain batch.
const BATCH: usize = 16;

struct Workload {
    class: Class,
    count: usize,
    value_bytes: usize,
}

/// Runs both workloads in a temporary folder under `dir` (removed afterwards) and returns the
/// printable report.
///
/// # Errors
/// The folder cannot be created, or the spool fails.
pub fn benchmark(dir: &Path) -> anyhow::Result<String> {
    let root = dir.join(format!(
        "fovea-spool-bench-{}-{}",
        std::process::id(),
        now_ms()
    ));
    let workloads = [
        Workload {
            class: Class::Frame,
            count: 200,
            value_bytes: 1 << 20,
        },
        Workload {
            class: Class::Result,
            count: 20_000,
            value_bytes: 1 << 10,
        },
    ];
    let mut out = format!(
        "spool benchmark: sled 0.34.7 in {} (MB = 10^6 bytes of records: value, key, topic, \
         headers; flush every {BATCH} records; drain in batches of {BATCH})",
        root.display()
    );
    for (i, w) in workloads.iter().enumerate() {
        let sub = root.join(format!("w{i}"));
        let line = run(&sub, w);
        let _ = std::fs::remove_dir_all(&sub);
        out.push('\n');
        out.push_str(&line?);
    }
    let _ = std::fs::remove_dir_all(&root);
    Ok(out)
}

fn run(dir: &Path, w: &Workload) -> anyhow::Result<String> {
    let opts = SpoolOptions {
        dir: dir.to_path_buf(),
        max_bytes: u64::MAX,
        when_full: WhenFull::DropOldestFrames,
    };
    let (mut spool, _) = SledSpool::open(opts.clone()).context("opening the spool")?;

    // Incompressible bytes (a cheap xorshift), changed per record in its first 8 bytes.
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let value = (0..w.value_bytes)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut rec = SpoolRecord {
        class: w.class,
        topic: "fovea.frames".to_string(),
        key: "cam-1".to_string(),
        headers: vec![
            ("content-type".into(), "application/x-protobuf".into()),
            ("fovea-schema".into(), "fovea.v1.Frame".into()),
            ("fovea-record-id".into(), "node-1/cam-1/s0".into()),
        ],
        value,
        created_ms: now_ms(),
    };
    let mut total = 0u64;
    let started = Instant::now();
    for i in 0..w.count {
        if rec.value.len() >= 8 {
            rec.value[..8].copy_from_slice(&(i as u64).to_le_bytes());
        }
        total += rec.size() as u64;
        spool.append(&rec).context("appending")?;
        if (i + 1) % BATCH == 0 {
            spool.flush().context("flushing")?;
        }
    }
    spool.flush().context("flushing")?;
    let write_s = started.elapsed().as_secs_f64();
    let disk = spool.disk_bytes().unwrap_or(0);
    drop(spool);

    let started = Instant::now();
    let (mut spool, report) = SledSpool::open(opts).context("reopening the spool")?;
    let reopen_s = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        report.records == w.count as u64,
        "reopen found {} records, {} were written",
        report.records,
        w.count
    );

    let started = Instant::now();
    let mut drained = 0usize;
    loop {
        let batch = spool.oldest(None, BATCH).context("reading the oldest")?;
        if batch.is_empty() {
            break;
        }
        drained += batch.len();
        let seqs: Vec<u64> = batch.iter().map(|(seq, _)| *seq).collect();
        spool.remove(&seqs).context("removing")?;
    }
    spool.flush().context("flushing")?;
    let drain_s = started.elapsed().as_secs_f64();
    let disk_drained = spool.disk_bytes().unwrap_or(0);
    anyhow::ensure!(
        drained == w.count,
        "drained {drained} records, {} were written",
        w.count
    );

    let mb = total as f64 / 1e6;
    Ok(format!(
        "{} {} records of {}: write {:.1} MB/s ({:.0} records/s), drain {:.1} MB/s ({:.0} \
         records/s), reopen scan {:.2} s; on disk: {} after writing {}, {} after draining",
        w.count,
        w.class,
        human_bytes(w.value_bytes as u64),
        mb / write_s,
        w.count as f64 / write_s,
        mb / drain_s,
        w.count as f64 / drain_s,
        reopen_s,
        human_bytes(disk),
        human_bytes(total),
        human_bytes(disk_drained),
    ))
}
