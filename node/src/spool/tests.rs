//! Spool tests: the record format, the engine on real sled databases in temporary folders, a
//! crash in a child process, and a model-based test of random operation sequences.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::Path;

use super::record::{self, FormatError, HEADER_LEN};
use super::sled_spool::{REASON_NO_ROOM, REASON_OLDEST};
use super::*;

const MB: u64 = 1 << 20;

fn rec(class: Class, i: u64, len: usize) -> SpoolRecord {
    SpoolRecord {
        class,
        topic: format!("fovea.{}", class.name()),
        key: format!("cam-{}", i % 3),
        headers: vec![
            ("fovea-record-id".into(), format!("node/cam/s{i}")),
            ("content-type".into(), "application/x-protobuf".into()),
        ],
        value: (0..len)
            .map(|b| (b as u64 ^ i.wrapping_mul(31)) as u8)
            .collect(),
        created_ms: 1_700_000_000_000 + i as i64,
    }
}

fn opts(dir: &Path, max_bytes: u64, when_full: WhenFull) -> SpoolOptions {
    SpoolOptions {
        dir: dir.join("spool"),
        max_bytes,
        when_full,
    }
}

fn open(o: &SpoolOptions) -> (SledSpool, OpenReport) {
    SledSpool::open(o.clone()).expect("open spool")
}

fn stored(a: Appended) -> (u64, Vec<Dropped>) {
    match a {
        Appended::Stored { seqs, dropped } => (seqs.start, dropped),
        other => panic!("expected Stored, got {other:?}"),
    }
}

fn all(s: &mut SledSpool) -> Vec<(u64, SpoolRecord)> {
    s.oldest(None, usize::MAX).expect("oldest")
}

/// The spool's sled database opened directly, to damage it as a crash would. sled's background
/// flusher can hold the folder's lock for a moment after the spool was dropped (seen under qemu
/// on CI's aarch64 run), so a lock error is retried for a while.
fn raw_db(dir: &Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("sled: {e}"),
        }
    }
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

// ---- record format ----

#[test]
fn record_roundtrip_and_every_damage_detected() {
    let r = rec(Class::DeadLetter, 7, 300);
    let bytes = record::encode(&r).expect("encode");
    assert_eq!(&bytes[..3], b"FS\x01");
    assert_eq!(record::decode(&bytes).expect("decode"), r);
    let header_bytes: usize = r.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert_eq!(
        header_bytes,
        "fovea-record-id".len() + "node/cam/s7".len() + 12 + 22
    );
    assert_eq!(
        r.size(),
        "fovea.dead-letter".len() + "cam-1".len() + 300 + header_bytes
    );

    // A flipped bit anywhere is caught (magic, version, crc, length or body).
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x10;
        assert!(record::decode(&bad).is_err(), "flip at {i} not detected");
    }
    assert!(matches!(
        record::decode(&bytes[..5]),
        Err(FormatError::Short { len: 5 })
    ));
    assert!(matches!(
        record::decode(&bytes[..bytes.len() - 1]),
        Err(FormatError::Length { .. })
    ));
    let mut v2 = bytes.clone();
    v2[2] = 2;
    assert_eq!(record::decode(&v2), Err(FormatError::Version(2)));
    // A body with a valid checksum but no class is still refused.
    let body = [0x12, 0x01, b't']; // field 2 (topic) = "t", class missing
    let mut raw = b"FS\x01".to_vec();
    raw.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    raw.extend_from_slice(&(body.len() as u32).to_le_bytes());
    raw.extend_from_slice(&body);
    assert_eq!(raw.len(), HEADER_LEN + 3);
    assert_eq!(record::decode(&raw), Err(FormatError::Class(0)));
}

// ---- engine ----

#[test]
fn append_flush_reopen_keeps_everything_in_order() {
    let d = tmp();
    let o = opts(d.path(), 100 * MB, WhenFull::DropOldestFrames);
    let (mut s, report) = open(&o);
    assert_eq!((report.records, report.moved_aside.clone()), (0, None));
    assert!(s.is_empty());
    let mut want = Vec::new();
    for i in 0..30 {
        let class = Class::ALL[i as usize % 3];
        let r = rec(class, i, 100 + i as usize * 37);
        let (seq, dropped) = stored(s.append(&r).expect("append"));
        assert!(dropped.is_empty());
        want.push((seq, r));
    }
    s.flush().expect("flush");
    assert!(want.windows(2).all(|w| w[0].0 < w[1].0), "seqs increase");
    assert_eq!(all(&mut s), want);
    drop(s);

    let (mut s, report) = open(&o);
    assert_eq!(report.records, 30);
    assert_eq!(report.quarantined, 0);
    assert_eq!(report.index_repaired, 0);
    assert_eq!(all(&mut s), want);
}

#[test]
fn seqs_keep_increasing_across_reopen_even_when_emptied() {
    let d = tmp();
    let o = opts(d.path(), 100 * MB, WhenFull::DropOldestFrames);
    let mut last = None;
    for round in 0..4 {
        let (mut s, _) = open(&o);
        for i in 0..5 {
            let (seq, _) = stored(s.append(&rec(Class::Result, i, 10)).expect("append"));
            assert!(
                last.is_none_or(|l| seq > l),
                "round {round}: {seq} after {last:?}"
            );
            last = Some(seq);
        }
        s.flush().expect("flush");
        // Drain all: the next round must not reuse a seq although no record is left.
        let seqs: Vec<u64> = all(&mut s).iter().map(|(q, _)| *q).collect();
        s.remove(&seqs).expect("remove");
        s.flush().expect("flush");
        assert!(s.is_empty());
    }
}

#[test]
fn oldest_and_remove_drain_in_order() {
    let d = tmp();
    let o = opts(d.path(), 100 * MB, WhenFull::DropOldestFrames);
    let (mut s, _) = open(&o);
    let seqs: Vec<u64> = (0..10)
        .map(|i| stored(s.append(&rec(Class::Result, i, 50)).expect("append")).0)
        .collect();
    s.flush().expect("flush");

    let first = s.oldest(None, 3).expect("oldest");
    assert_eq!(first.iter().map(|(q, _)| *q).collect::<Vec<_>>(), seqs[..3]);
    // A cursor reads past records in flight without removing them.
    let next = s.oldest(Some(seqs[2]), 3).expect("oldest");
    assert_eq!(next.iter().map(|(q, _)| *q).collect::<Vec<_>>(), seqs[3..6]);
    assert!(s.oldest(None, 0).expect("oldest").is_empty());
    assert!(s.oldest(Some(u64::MAX), 5).expect("oldest").is_empty());

    // Removing out of order, twice, and unknown seqs is fine.
    s.remove(&[seqs[4], seqs[0], 999_999]).expect("remove");
    s.remove(&[seqs[4]]).expect("remove again");
    let left: Vec<u64> = all(&mut s).iter().map(|(q, _)| *q).collect();
    assert_eq!(left, [1, 2, 3, 5, 6, 7, 8, 9].map(|i| seqs[i]));
    assert_eq!(s.stats().total_records, 8);
    s.remove(&left).expect("remove");
    assert!(s.is_empty());
    assert!(all(&mut s).is_empty());
    assert_eq!(s.stats().total_bytes, 0);
    assert_eq!(s.stats().oldest_created_ms, None);
}

#[test]
fn byte_accounting_matches_after_reopen() {
    let d = tmp();
    let o = opts(d.path(), 100 * MB, WhenFull::DropOldestFrames);
    let (mut s, _) = open(&o);
    let mut per_class = [0u64; 3];
    let mut seqs = Vec::new();
    for i in 0..24u64 {
        let class = Class::ALL[(i % 3) as usize];
        let r = rec(class, i, 1000 + i as usize);
        per_class[class.index()] += r.size() as u64;
        seqs.push((
            stored(s.append(&r).expect("append")).0,
            class,
            r.size() as u64,
        ));
    }
    // Remove a few, of each class.
    for &(seq, class, size) in seqs.iter().step_by(5) {
        s.remove(&[seq]).expect("remove");
        per_class[class.index()] -= size;
    }
    s.flush().expect("flush");
    let before = s.stats();
    for c in Class::ALL {
        assert_eq!(before.bytes[&c], per_class[c.index()], "{c}");
    }
    assert_eq!(before.total_bytes, per_class.iter().sum::<u64>());
    assert_eq!(before.oldest_created_ms, Some(1_700_000_000_001));
    drop(s);
    let (s, report) = open(&o);
    let after = s.stats();
    assert_eq!(after, before);
    assert_eq!(report.bytes, before.total_bytes);
    assert_eq!(report.records, 24 - 5);
}

#[test]
fn drop_oldest_frames_first_never_results_and_counts_persist() {
    let d = tmp();
    let frame_len = 10_000;
    let frame_size = rec(Class::Frame, 0, frame_len).size() as u64;
    // Room for 5 frames (and change).
    let o = opts(d.path(), frame_size * 5 + 2000, WhenFull::DropOldestFrames);
    let (mut s, _) = open(&o);
    let mut frames = Vec::new();
    let mut others = Vec::new();
    for i in 0..5 {
        frames.push(stored(s.append(&rec(Class::Frame, i, frame_len)).expect("append")).0);
        let class = if i % 2 == 0 {
            Class::Result
        } else {
            Class::DeadLetter
        };
        others.push(stored(s.append(&rec(class, 100 + i, 50)).expect("append")).0);
    }
    assert!(!s.has_room(Class::Frame, frame_size));
    // Two more frames: each drops the oldest frame.
    for i in 5..7 {
        let (seq, dropped) = stored(s.append(&rec(Class::Frame, i, frame_len)).expect("append"));
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].class, Class::Frame);
        assert_eq!(dropped[0].seq, frames[(i - 5) as usize]);
        assert_eq!(dropped[0].bytes, frame_size);
        assert_eq!(dropped[0].created_ms, 1_700_000_000_000 + (i - 5) as i64);
        frames.push(seq);
    }
    // A result over the bound drops the next oldest frame and is stored.
    let (rseq, dropped) = stored(
        s.append(&rec(Class::Result, 200, 2 * frame_len))
            .expect("append"),
    );
    assert_eq!(
        dropped.iter().map(|d| d.seq).collect::<Vec<_>>(),
        frames[2..4]
    );
    others.push(rseq);
    s.flush().expect("flush");

    let left = all(&mut s);
    let left_frames: Vec<u64> = left
        .iter()
        .filter(|(_, r)| r.class == Class::Frame)
        .map(|(q, _)| *q)
        .collect();
    assert_eq!(left_frames, frames[4..]);
    let left_others: Vec<u64> = left
        .iter()
        .filter(|(_, r)| r.class != Class::Frame)
        .map(|(q, _)| *q)
        .collect();
    assert_eq!(
        left_others, others,
        "results and dead letters are never dropped"
    );
    let key = ("frame".to_string(), REASON_OLDEST.to_string());
    assert_eq!(s.stats().dropped.get(&key), Some(&4));
    assert!(s.stats().total_bytes <= o.max_bytes);
    drop(s);

    let (s, _) = open(&o);
    assert_eq!(s.stats().dropped.get(&key), Some(&4), "counter persisted");
    assert!(
        s.stats()
            .to_string()
            .contains("dropped frame/spool-full-oldest: 4")
    );
}

#[test]
fn drop_oldest_frames_refuses_a_frame_that_cannot_fit_and_keeps_older_ones() {
    let d = tmp();
    let o = opts(d.path(), 3000, WhenFull::DropOldestFrames);
    let (mut s, _) = open(&o);
    let f = stored(s.append(&rec(Class::Frame, 0, 500)).expect("append")).0;
    // Results fill the spool beyond its bound: always stored (they may drop the frame first).
    let (_, dropped) = stored(s.append(&rec(Class::Result, 1, 2000)).expect("append"));
    assert!(dropped.is_empty(), "it fit without dropping");
    let (_, dropped) = stored(s.append(&rec(Class::Result, 2, 2000)).expect("append"));
    assert_eq!(dropped.iter().map(|d| d.seq).collect::<Vec<_>>(), [f]);
    assert!(s.stats().total_bytes > o.max_bytes);
    // No frame left to drop, no room: the new frame is refused and counted.
    let (_, dropped) = stored(s.append(&rec(Class::DeadLetter, 3, 10)).expect("append"));
    assert!(dropped.is_empty());
    let frame = rec(Class::Frame, 4, 500);
    assert_eq!(
        s.append(&frame).expect("append"),
        Appended::FrameDropped {
            seqs: 4..4,
            records: 1,
            bytes: frame.size() as u64,
            dropped: Vec::new()
        }
    );
    let st = s.stats();
    assert_eq!(
        st.dropped
            .get(&("frame".to_string(), REASON_NO_ROOM.to_string())),
        Some(&1)
    );
    assert_eq!(st.records[&Class::Frame], 0);
    assert_eq!(st.records[&Class::Result], 2);
    assert_eq!(st.records[&Class::DeadLetter], 1);
}

#[test]
fn backpressure_refuses_frames_and_still_stores_results() {
    let d = tmp();
    let o = opts(d.path(), 5000, WhenFull::Backpressure);
    let (mut s, _) = open(&o);
    let f1 = stored(s.append(&rec(Class::Frame, 0, 2000)).expect("append")).0;
    let f2 = stored(s.append(&rec(Class::Frame, 1, 2000)).expect("append")).0;
    assert!(!s.has_room(Class::Frame, 2000));
    assert!(s.has_room(Class::Result, 2000), "results always go in");
    assert_eq!(
        s.append(&rec(Class::Frame, 2, 2000)).expect("append"),
        Appended::Refused
    );
    let (r, dropped) = stored(s.append(&rec(Class::Result, 3, 2000)).expect("append"));
    assert!(dropped.is_empty());
    let (dl, _) = stored(s.append(&rec(Class::DeadLetter, 4, 2000)).expect("append"));
    let seqs: Vec<u64> = all(&mut s).iter().map(|(q, _)| *q).collect();
    assert_eq!(seqs, [f1, f2, r, dl]);
    assert!(s.stats().dropped.is_empty(), "backpressure drops nothing");
    // Drained: frames fit again.
    s.remove(&[f1, f2, r, dl]).expect("remove");
    assert!(s.has_room(Class::Frame, 2000));
    stored(s.append(&rec(Class::Frame, 5, 2000)).expect("append"));
}

#[test]
fn corrupt_records_are_quarantined_on_open_and_verify_reports_them() {
    let d = tmp();
    let o = opts(d.path(), 100 * MB, WhenFull::DropOldestFrames);
    let (mut s, _) = open(&o);
    let a = stored(s.append(&rec(Class::Frame, 0, 3000)).expect("append")).0;
    s.flush().expect("flush");
    drop(s);

    // Garbage, and a real record with one byte flipped in its body.
    let garbage = inject_raw_for_tests(&o.dir, b"not a spool record").expect("inject");
    let mut flipped = record::encode(&rec(Class::Result, 1, 200)).expect("encode");
    flipped[HEADER_LEN + 20] ^= 0x01;
    let bad = inject_raw_for_tests(&o.dir, &flipped).expect("inject");
    assert!(garbage > a && bad > garbage);

    // verify sees both, and changes nothing.
    for _ in 0..2 {
        let v = verify(&o.dir).expect("verify");
        assert_eq!(v.corrupt.len(), 2, "{v}");
        assert_eq!(v.corrupt[0].seq, Some(garbage));
        assert!(
            v.corrupt[0].reason.contains("magic"),
            "{}",
            v.corrupt[0].reason
        );
        assert_eq!(v.corrupt[1].seq, Some(bad));
        assert!(
            v.corrupt[1].reason.contains("checksum"),
            "{}",
            v.corrupt[1].reason
        );
        assert_eq!(v.records[&Class::Frame], 1);
        assert_eq!(v.records[&Class::Result], 0);
        assert_eq!(v.quarantined, 0);
        assert!(!v.is_clean());
        let text = v.to_string();
        assert!(
            text.contains(&format!("corrupt seq {bad}: checksum mismatch")),
            "{text}"
        );
    }

    // Opening quarantines them; the intact record still comes out; seqs go on after them.
    let (mut s, report) = open(&o);
    assert_eq!(report.quarantined, 2);
    assert_eq!(report.records, 1);
    let b = stored(s.append(&rec(Class::Result, 2, 100)).expect("append")).0;
    assert!(b > bad, "seq after injected ones");
    let seqs: Vec<u64> = all(&mut s).iter().map(|(q, _)| *q).collect();
    assert_eq!(seqs, [a, b]);
    assert_eq!(s.stats().quarantined, 2);
    assert!(s.stats().to_string().contains("quarantined: 2"));
    s.flush().expect("flush");
    drop(s);

    let v = verify(&o.dir).expect("verify");
    assert!(v.is_clean(), "{v}");
    assert_eq!(v.quarantined, 2);
    let (_, report) = open(&o);
    assert_eq!(report.quarantined, 0, "quarantined once, not again");
    assert_eq!(report.records, 2);
}

#[test]
fn corrupt_record_met_while_draining_is_quarantined_and_skipped() {
    let d = tmp();
    let o = opts(d.path(), 100 * MB, WhenFull::DropOldestFrames);
    let (mut s, _) = open(&o);
    let seqs: Vec<u64> = (0..6)
        .map(|i| {
            let class = if i == 2 { Class::Frame } else { Class::Result };
            stored(s.append(&rec(class, i, 500)).expect("append")).0
        })
        .collect();
    // Damage records 1 (a result) and 2 (a frame) behind the spool's back.
    for &i in &[1usize, 2] {
        let key = seqs[i].to_be_bytes();
        let mut v = s
            .records_tree()
            .get(key)
            .expect("get")
            .expect("present")
            .to_vec();
        let last = v.len() - 1;
        v[last] ^= 0xff;
        s.records_tree().insert(key, v).expect("insert");
    }
    let got: Vec<u64> = s
        .oldest(None, 3)
        .expect("oldest")
        .iter()
        .map(|(q, _)| *q)
        .collect();
    assert_eq!(
        got,
        [seqs[0], seqs[3], seqs[4]],
        "skipped, still `max` records"
    );
    let st = s.stats();
    assert_eq!(st.quarantined, 2);
    assert_eq!(st.total_records, 4);
    assert_eq!(st.records[&Class::Frame], 0);
    // Not met again.
    assert_eq!(all(&mut s).len(), 4);
    assert_eq!(s.stats().quarantined, 2);
}

#[test]
fn locked_spool_is_refused_not_moved_aside() {
    let d = tmp();
    let o = opts(d.path(), MB, WhenFull::DropOldestFrames);
    let (_s, _) = open(&o);
    let err = SledSpool::open(o.clone())
        .err()
        .expect("second open must fail");
    assert!(matches!(err, SpoolError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("stop it first"), "{err}");
    let err = verify(&o.dir).expect_err("verify while open");
    assert!(matches!(err, SpoolError::Locked { .. }), "{err}");
    let siblings = std::fs::read_dir(d.path()).expect("read_dir").count();
    assert_eq!(siblings, 1, "nothing moved aside");
}

#[test]
fn verify_and_inject_need_an_existing_spool() {
    let d = tmp();
    let missing = d.path().join("nothing-here");
    assert!(matches!(verify(&missing), Err(SpoolError::NotFound { .. })));
    assert!(matches!(
        inject_raw_for_tests(&missing, b"x"),
        Err(SpoolError::NotFound { .. })
    ));
    assert!(!missing.exists(), "verify creates nothing");
}

fn garbage_file(path: &Path) {
    let junk: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(path, junk).expect("write garbage");
}

#[test]
fn a_spool_sled_cannot_open_or_lost_is_moved_aside_and_a_fresh_one_opens() {
    // conf: sled refuses to open. db: sled 0.34 opens a garbage log as an empty database
    // without an error; the seq file beside it shows that records were lost.
    for (damaged, reopened) in [("conf", false), ("db", false), ("db", true)] {
        let d = tmp();
        let o = opts(d.path(), MB, WhenFull::DropOldestFrames);
        let (mut s, _) = open(&o);
        let (old, _) = stored(s.append(&rec(Class::Result, 0, 100)).expect("append"));
        s.flush().expect("flush");
        drop(s);
        if reopened {
            drop(open(&o));
        }
        garbage_file(&o.dir.join(damaged));
        // Depending on what sled finds, it refuses or opens an empty database.
        match verify(&o.dir) {
            Ok(v) => {
                assert!(v.sled_lost_records() && !v.is_clean(), "{damaged}: {v}");
                assert!(v.to_string().contains("sled lost records"), "{v}");
            }
            Err(err) => assert!(matches!(err, SpoolError::Damaged { .. }), "{err}"),
        }

        let (mut s, report) = open(&o);
        let aside = report.moved_aside.clone().expect("moved aside");
        assert!(
            aside.join(damaged).exists(),
            "{damaged}: kept for inspection"
        );
        assert!(
            aside
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("spool.corrupt-")),
            "{}",
            aside.display()
        );
        assert!(report.to_string().contains("moved aside"), "{report}");
        assert_eq!(report.records, 0);
        let (seq, _) = stored(s.append(&rec(Class::Result, 1, 100)).expect("append"));
        assert!(seq > old, "{damaged}: seqs go on past the old spool's");
        s.flush().expect("flush");
        assert_eq!(all(&mut s).len(), 1, "{damaged}: the fresh spool works");
        drop(s);
        let (_, report) = open(&o);
        assert_eq!((report.records, report.moved_aside), (1, None));
    }
}

#[test]
fn index_is_repaired_after_a_crash_between_tree_writes() {
    let d = tmp();
    let o = opts(d.path(), 100 * MB, WhenFull::DropOldestFrames);
    let (mut s, _) = open(&o);
    let f = stored(s.append(&rec(Class::Frame, 0, 900)).expect("append")).0;
    let r = stored(s.append(&rec(Class::Result, 1, 90)).expect("append")).0;
    let before = s.stats();
    drop(s);
    {
        // As if the process died after writing `records` but before `index` and `frames`, and
        // as if a removal reached `index` but not `records`.
        let db = raw_db(&o.dir);
        let index = db.open_tree("index").expect("tree");
        let frames = db.open_tree("frames").expect("tree");
        index.remove(f.to_be_bytes()).expect("remove");
        frames.remove(f.to_be_bytes()).expect("remove");
        index
            .insert(12345u64.to_be_bytes(), &[1u8; 17][..])
            .expect("insert");
        frames
            .insert(12346u64.to_be_bytes(), &[0u8; 8][..])
            .expect("insert");
        db.flush().expect("flush");
    }
    assert_eq!(verify(&o.dir).expect("verify").index_mismatches, 4);
    let (mut s, report) = open(&o);
    assert_eq!(report.index_repaired, 4);
    assert_eq!(s.stats(), before);
    let seqs: Vec<u64> = all(&mut s).iter().map(|(q, _)| *q).collect();
    assert_eq!(seqs, [f, r]);
    assert!(s.append(&rec(Class::Frame, 2, 900)).is_ok());
    drop(s);
    assert!(verify(&o.dir).expect("verify").is_clean());
}

#[test]
fn stats_print_one_fact_per_line() {
    let d = tmp();
    let o = opts(d.path(), MB, WhenFull::DropOldestFrames);
    let (mut s, _) = open(&o);
    let empty = s.stats().to_string();
    assert!(
        empty.contains("records: 0 (frame 0, result 0, dead-letter 0)"),
        "{empty}"
    );
    assert!(empty.contains("oldest: none"), "{empty}");
    assert!(empty.contains("dropped: none"), "{empty}");
    let mut r = rec(Class::Frame, 0, 2048);
    r.created_ms = super::report::now_ms() - 3_200;
    stored(s.append(&r).expect("append"));
    stored(s.append(&rec(Class::Result, 1, 10)).expect("append"));
    let text = s.stats().to_string();
    assert!(
        text.contains("records: 2 (frame 1, result 1, dead-letter 0)"),
        "{text}"
    );
    assert!(
        text.contains("KiB of 1.0 MiB max (frame 2.1 KiB, result 87 B, dead-letter 0 B)"),
        "{text}"
    );
    assert!(text.contains("oldest: 3."), "{text}");
    assert!(text.contains("s ago"), "{text}");
    assert!(text.ends_with("quarantined: 0"), "{text}");
}

// ---- frames as units: all or nothing ----

fn bytes_of(recs: &[SpoolRecord]) -> u64 {
    recs.iter().map(|r| r.size() as u64).sum()
}

fn seqs_of(got: &[(u64, SpoolRecord)]) -> Vec<u64> {
    got.iter().map(|(q, _)| *q).collect()
}

/// Appends a unit that must be stored whole: (its first seq, the frames dropped for it).
fn put(s: &mut SledSpool, u: &[SpoolRecord]) -> (u64, Vec<Dropped>) {
    stored(s.append_frame(u).expect("append"))
}

/// (first seq, records) of each dropped frame.
fn whole(dropped: &[Dropped]) -> Vec<(u64, u64)> {
    dropped.iter().map(|d| (d.seq, d.records)).collect()
}

#[test]
fn backpressure_refuses_a_chunked_frame_larger_than_the_free_room_as_a_whole() {
    let d = tmp();
    let first = unit(1, 3, 8000, true, false);
    // Room for the first frame and 10 000 bytes more: the next frame's first chunk would fit.
    let o = opts(d.path(), bytes_of(&first) + 10_000, WhenFull::Backpressure);
    let (mut s, _) = open(&o);
    let Appended::Stored { seqs, dropped } = s.append_frame(&first).expect("append") else {
        panic!("the first frame fits")
    };
    assert_eq!(
        (seqs.clone(), dropped),
        (0..4, Vec::new()),
        "consecutive seqs"
    );
    let before = s.stats();
    let content = all(&mut s);

    let big = unit(2, 4, 8000, true, true);
    assert_eq!(s.append_frame(&big).expect("append"), Appended::Refused);
    assert_eq!(
        s.stats(),
        before,
        "nothing of it stored, nothing dropped or counted"
    );
    assert_eq!(all(&mut s), content);

    // A result or dead letter alone is stored even above the bound, as before.
    let results = unit(3, 0, 0, true, true);
    let Appended::Stored { seqs, .. } = s.append_frame(&results).expect("append") else {
        panic!("results are always stored")
    };
    assert_eq!(seqs.end - seqs.start, 2);
    // Drained: the whole frame goes in.
    let drained: Vec<u64> = seqs_of(&all(&mut s));
    s.remove(&drained).expect("remove");
    let Appended::Stored { seqs, dropped } = s.append_frame(&big).expect("append") else {
        panic!("fits once drained")
    };
    assert_eq!(seqs.end - seqs.start, 6);
    assert!(dropped.is_empty());
    let got: Vec<SpoolRecord> = all(&mut s).into_iter().map(|(_, r)| r).collect();
    assert_eq!(got, big, "every record, in order");
    assert!(s.stats().dropped.is_empty(), "backpressure never drops");
}

#[test]
fn drop_oldest_frames_drops_whole_chunked_frames_and_counts_each_once() {
    let d = tmp();
    let frames: Vec<Vec<SpoolRecord>> = (0..4).map(|i| unit(i, 4, 5000, true, false)).collect();
    let o = opts(
        d.path(),
        bytes_of(&frames[0]) * 4,
        WhenFull::DropOldestFrames,
    );
    let (mut s, _) = open(&o);
    let mut firsts = Vec::new();
    for f in &frames {
        firsts.push(stored(s.append_frame(f).expect("append")).0);
    }
    // 1.5 frames more than the free room: the two oldest frames go, whole.
    let next = unit(9, 6, 5000, true, false);
    let (_, dropped) = put(&mut s, &next);
    let chunk = frames[0][0].size() as u64;
    assert_eq!(
        dropped
            .iter()
            .map(|d| (d.seq, d.records, d.bytes))
            .collect::<Vec<_>>(),
        [(firsts[0], 4, 4 * chunk), (firsts[1], 4, 4 * chunk)]
    );
    let got = all(&mut s);
    assert_whole_frames(&got, &HashSet::new(), "after the drop");
    let ids = |class: Class| -> Vec<String> {
        let mut v: Vec<String> = got
            .iter()
            .filter(|(_, r)| r.class == class)
            .filter_map(|(_, r)| header(r, "fovea-record-id").map(str::to_string))
            .collect();
        v.dedup();
        v
    };
    assert_eq!(
        ids(Class::Frame),
        ["node/cam/u2", "node/cam/u3", "node/cam/u9"]
    );
    assert_eq!(ids(Class::Result).len(), 5, "every result kept");
    let key = ("frame".to_string(), REASON_OLDEST.to_string());
    assert_eq!(s.stats().dropped.get(&key), Some(&2), "one per frame");

    // A frame larger than the whole spool: its chunks go, counted once, its result is stored.
    let huge = unit(10, 30, 5000, true, false);
    match s.append_frame(&huge).expect("append") {
        Appended::FrameDropped {
            seqs,
            records,
            bytes,
            dropped,
        } => {
            assert_eq!((seqs.end - seqs.start, records), (1, 30));
            assert_eq!(bytes, bytes_of(&huge[..30]));
            assert!(dropped.is_empty(), "nothing older dropped for it");
        }
        other => panic!("expected FrameDropped, got {other:?}"),
    }
    let st = s.stats();
    assert_eq!(
        st.dropped
            .get(&("frame".to_string(), REASON_NO_ROOM.to_string())),
        Some(&1)
    );
    assert_eq!(
        st.records[&Class::Frame],
        14,
        "u2, u3: 4 chunks each; u9: 6"
    );
    assert_eq!(st.records[&Class::Result], 6);
}

#[test]
fn a_frame_being_delivered_is_never_dropped() {
    let d = tmp();
    let a = unit(1, 3, 5000, true, false);
    let b = unit(2, 3, 5000, true, false);
    let o = opts(d.path(), bytes_of(&a) * 2 + 100, WhenFull::DropOldestFrames);
    let (mut s, _) = open(&o);
    let fa = put(&mut s, &a).0;
    let fb = put(&mut s, &b).0;
    // Frame a's first chunk reached Kafka: dropping the rest would leave a partial frame there.
    s.remove(&[fa]).expect("remove");
    let (_, dropped) = put(&mut s, &unit(3, 3, 5000, true, false));
    assert_eq!(dropped.iter().map(|d| d.seq).collect::<Vec<_>>(), [fb]);
    assert!(seqs_of(&all(&mut s)).contains(&(fa + 1)), "a drains");
}

/// Puts a file where `large/` was, so that writing a record file fails; returns a guard that
/// puts the folder back.
fn break_large_folder(spool_dir: &Path) -> impl Drop {
    struct Restore(std::path::PathBuf);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
            std::fs::create_dir(&self.0).expect("restore large/");
        }
    }
    let large = spool_dir.join("large");
    std::fs::remove_dir(&large).expect("large/ is empty");
    std::fs::write(&large, b"not a folder").expect("file in its place");
    Restore(large)
}

#[test]
fn a_write_failing_half_way_rolls_the_whole_unit_back() {
    let d = tmp();
    let o = opts(d.path(), 100 * MB, WhenFull::DropOldestFrames);
    let (mut s, _) = open(&o);
    put(&mut s, &unit(1, 2, 3000, true, false));
    s.flush().expect("flush");
    let before = s.stats();
    let content = all(&mut s);
    // Chunk 0 goes to sled, chunk 1 (over 64 KiB) needs a record file: that write fails.
    let mut broken = unit(2, 3, 3000, true, false);
    broken[1] = {
        let mut big = rec(Class::Frame, 201, 100_000);
        big.headers = broken[1].headers.clone();
        big
    };
    {
        let _restore = break_large_folder(&o.dir);
        let err = s
            .append_frame(&broken)
            .expect_err("the record file cannot be written");
        assert!(matches!(err, SpoolError::Io { .. }), "{err}");
        assert!(!err.is_disk_full());
        assert_eq!(s.stats(), before, "counters unchanged");
        assert_eq!(all(&mut s), content, "nothing of the unit stays");
        s.flush().expect("flush");
    }
    // The retry stores it whole; the spool is consistent on disk too.
    let (seq, _) = put(&mut s, &broken);
    assert!(
        seq > content.last().map_or(0, |(q, _)| *q) + 4,
        "seqs are not reused"
    );
    s.flush().expect("flush");
    let want = all(&mut s);
    drop(s);
    let v = verify(&o.dir).expect("verify");
    assert!(v.is_clean() && v.orphan_files == 0, "{v}");
    let (mut s, report) = open(&o);
    assert_eq!((report.index_repaired, report.interrupted), (0, 0));
    assert_eq!(all(&mut s), want);
    assert_whole_frames(&want, &HashSet::new(), "after reopen");
}

#[test]
fn an_append_or_a_drop_cut_short_by_a_crash_is_undone_or_finished_on_open() {
    let d = tmp();
    let o = opts(d.path(), 100 * MB, WhenFull::DropOldestFrames);
    let (mut s, _) = open(&o);
    let kept = put(&mut s, &unit(1, 3, 2000, true, false)).0;
    let dropping = put(&mut s, &unit(2, 3, 2000, true, false)).0;
    let cut = put(&mut s, &unit(3, 3, 90_000, true, false)).0;
    s.flush().expect("flush");
    drop(s);
    {
        // As if the process died half-way through appending unit 3 (its marker still set, its
        // result never written) and half-way through dropping frame 2 (counter stored, marker
        // set, its `frames` entry and first chunk gone).
        let db = raw_db(&o.dir);
        let meta = db.open_tree("meta").expect("tree");
        let records = db.open_tree("records").expect("tree");
        let index = db.open_tree("index").expect("tree");
        let frames = db.open_tree("frames").expect("tree");
        let range = |a: u64, b: u64| [a.to_be_bytes(), b.to_be_bytes()].concat();
        meta.insert("unit_open", range(cut, cut + 4))
            .expect("insert");
        records.remove((cut + 3).to_be_bytes()).expect("remove");
        index.remove((cut + 3).to_be_bytes()).expect("remove");
        meta.insert("drop_open", range(dropping, dropping + 3))
            .expect("insert");
        meta.insert("drop/frame/spool-full-oldest", &1u64.to_be_bytes()[..])
            .expect("insert");
        frames.remove(dropping.to_be_bytes()).expect("remove");
        records.remove(dropping.to_be_bytes()).expect("remove");
        index.remove(dropping.to_be_bytes()).expect("remove");
        db.flush().expect("flush");
    }
    let v = verify(&o.dir).expect("verify");
    assert!(!v.is_clean(), "{v}");
    assert_eq!(v.interrupted, 3 + 2 + 2, "{v}");
    assert!(
        v.to_string().contains("interrupted append or drop: 7"),
        "{v}"
    );

    let (mut s, report) = open(&o);
    assert_eq!(
        report.interrupted, 5,
        "3 chunks of unit 3, 2 left of frame 2"
    );
    assert!(
        report.to_string().contains("5 records of an interrupted"),
        "{report}"
    );
    let got = all(&mut s);
    assert_eq!(
        seqs_of(&got),
        [kept, kept + 1, kept + 2, kept + 3, dropping + 3],
        "frame 1 whole, frame 2's result"
    );
    assert_eq!(
        large_files(&o.dir),
        Vec::<String>::new(),
        "unit 3's files deleted"
    );
    let st = s.stats();
    assert_eq!(
        (st.records[&Class::Frame], st.records[&Class::Result]),
        (3, 2)
    );
    // Frame 1 is still a whole frame that may be dropped.
    let o2 = SpoolOptions {
        max_bytes: st.total_bytes + 10,
        ..o.clone()
    };
    drop(s);
    let (mut s, _) = open(&o2);
    let (_, dropped) = put(&mut s, &unit(4, 1, 500, false, false));
    assert_eq!(whole(&dropped), [(kept, 3)]);
    drop(s);
    assert!(verify(&o.dir).expect("verify").is_clean());
}

#[test]
fn frames_index_is_rebuilt_for_whole_frames_after_a_crash_between_trees() {
    let d = tmp();
    let o = opts(d.path(), 100 * MB, WhenFull::DropOldestFrames);
    let (mut s, _) = open(&o);
    let a = put(&mut s, &unit(1, 4, 1000, true, false)).0;
    let b = put(&mut s, &unit(2, 2, 1000, true, false)).0;
    let before = s.stats();
    drop(s);
    {
        // `frames` lost frame 1's entry and holds a wrong one for frame 2.
        let db = raw_db(&o.dir);
        let frames = db.open_tree("frames").expect("tree");
        frames.remove(a.to_be_bytes()).expect("remove");
        frames
            .insert(b.to_be_bytes(), &[0u8; 16][..])
            .expect("insert");
        db.flush().expect("flush");
    }
    assert_eq!(verify(&o.dir).expect("verify").index_mismatches, 2);
    let (s, report) = open(&o);
    assert_eq!(report.index_repaired, 2);
    assert_eq!(s.stats(), before);
    drop(s);
    // Both are whole frames again: room for one more frame of 2 drops all 4 chunks of frame 1.
    let o2 = SpoolOptions {
        max_bytes: before.total_bytes + 100,
        ..o.clone()
    };
    let (mut s, _) = open(&o2);
    let (_, dropped) = put(&mut s, &unit(3, 2, 1000, false, false));
    assert_eq!(whole(&dropped), [(a, 4)]);
    assert_whole_frames(&all(&mut s), &HashSet::new(), "after the drop");
}

#[test]
fn a_spool_written_before_frames_were_units_opens_unchanged() {
    // The previous version's layout: records without a frame part, `frames` entries of 8 bytes
    // (the size of one frame record), every chunk a frame of its own.
    let d = tmp();
    let o = opts(d.path(), 100 * MB, WhenFull::DropOldestFrames);
    let old = unit(1, 3, 1500, true, false);
    {
        std::fs::create_dir_all(&o.dir).expect("mkdir");
        let db = raw_db(&o.dir);
        let tree = |name: &str| db.open_tree(name).expect("tree");
        let (records, index, frames, meta) =
            (tree("records"), tree("index"), tree("frames"), tree("meta"));
        for (seq, r) in old.iter().enumerate() {
            let key = (seq as u64).to_be_bytes();
            records
                .insert(key, record::encode(r).expect("encode"))
                .expect("insert");
            let mut entry = vec![r.class.index() as u8];
            entry.extend_from_slice(&(r.size() as u64).to_be_bytes());
            entry.extend_from_slice(&r.created_ms.to_be_bytes());
            index.insert(key, entry).expect("insert");
            if r.class == Class::Frame {
                frames
                    .insert(key, &(r.size() as u64).to_be_bytes()[..])
                    .expect("insert");
            }
        }
        meta.insert("next_seq", &4u64.to_be_bytes()[..])
            .expect("insert");
        db.flush().expect("flush");
    }
    assert!(verify(&o.dir).expect("verify").is_clean());
    let (mut s, report) = open(&o);
    assert_eq!((report.records, report.index_repaired), (4, 0), "{report}");
    assert_eq!(
        all(&mut s).into_iter().map(|(_, r)| r).collect::<Vec<_>>(),
        old
    );
    // New frames are units beside the old ones; the old chunks are still frames of one record.
    let new = put(&mut s, &unit(2, 3, 1500, true, false)).0;
    assert_eq!(new, 4);
    drop(s);
    let chunk = old[0].size() as u64;
    let o2 = SpoolOptions {
        max_bytes: bytes_of(&old) + bytes_of(&unit(2, 3, 1500, true, false)) + chunk / 2,
        ..o.clone()
    };
    let (mut s, report) = open(&o2);
    assert_eq!(report.index_repaired, 0, "nothing to migrate");
    let (_, dropped) = put(&mut s, &unit(3, 1, 1500, false, false));
    assert_eq!(
        whole(&dropped),
        [(0, 1)],
        "an old chunk is dropped alone, as the previous version did"
    );
    let (_, dropped) = put(&mut s, &unit(4, 3, 1500, false, false));
    assert_eq!(whole(&dropped), [(1, 1), (2, 1), (new, 3)]);
    drop(s);
    assert!(verify(&o.dir).expect("verify").is_clean());
}

#[test]
fn disk_full_is_recognised_also_when_sled_wraps_it() {
    use std::io::{Error, ErrorKind};
    let enospc = || Error::from_raw_os_error(28);
    assert!(SpoolError::io("x", enospc()).is_disk_full());
    assert!(SpoolError::io("x", Error::new(ErrorKind::StorageFull, "full")).is_disk_full());
    // sled 0.34's own wrapping, as measured on a full tmpfs: the kind, and the error as text.
    let sled_style = Error::new(ErrorKind::StorageFull, format!("{:?}", enospc()));
    assert!(SpoolError::sled("x", sled::Error::Io(sled_style)).is_disk_full());
    assert!(SpoolError::sled("x", sled::Error::Io(Error::other(enospc()))).is_disk_full());
    assert!(SpoolError::sled("x", sled::Error::Io(enospc())).is_disk_full());
    assert!(!SpoolError::io("x", Error::from_raw_os_error(5)).is_disk_full());
    assert!(!SpoolError::sled("x", sled::Error::Unsupported("x".into())).is_disk_full());
}

/// A tmpfs of `mib` MiB mounted in a fresh folder, unmounted when dropped; `None` (with a line
/// saying so) where mounting is not allowed (not root, or no CAP_SYS_ADMIN).
pub(crate) struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    pub(crate) fn mount(mib: u64) -> Option<Tmpfs> {
        let dir = tmp();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(dir)),
            Ok(o) => {
                println!(
                    "skipped: cannot mount a tmpfs here ({}): needs root",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                println!("skipped: cannot run mount: {e}");
                None
            }
        }
    }

    pub(crate) fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn a_full_file_system_refuses_whole_units_before_sled_meets_it() {
    // 12 MiB, max_bytes far above: the file system is the bound. sled 0.34 must never meet
    // ENOSPC (module doc, "A full disk"): every refusal has to come from the free-space check.
    let Some(fs) = Tmpfs::mount(12) else { return };
    let o = opts(fs.path(), 100 * MB, WhenFull::Backpressure);
    let (mut s, _) = open(&o);
    let mut id = 0;
    for cycle in 0..3 {
        // Fill with frames of 4 chunks: kept in sled (30 KB) or in record files (70 KB).
        let mut units = 0;
        let err = loop {
            id += 1;
            let len = if id % 3 == 0 { 70_000 } else { 30_000 };
            match s.append_frame(&unit(id, 4, len, true, false)) {
                Ok(a) => {
                    stored(a);
                    units += 1;
                }
                Err(e) => break e,
            }
            if units % 4 == 0 {
                s.flush().expect("flush: sled never meets the full disk");
            }
        };
        assert!(err.is_disk_full(), "{err}");
        assert!(matches!(err, SpoolError::DiskFull { .. }), "{err}");
        if cycle == 0 {
            assert!(units >= 10, "only {units} frames fit");
        }
        // Results need the disk too: stored while it has room, then refused the same way.
        let err = loop {
            match s.append_frame(&unit(0, 0, 0, true, false)) {
                Ok(a) => stored(a).0,
                Err(e) => break e,
            };
        };
        assert!(matches!(err, SpoolError::DiskFull { .. }), "{err}");
        s.flush().expect("flush");
        let got = all(&mut s);
        assert_whole_frames(&got, &HashSet::new(), &format!("cycle {cycle}"));
        assert_eq!(got.len() as u64, s.stats().total_records);
        println!(
            "cycle {cycle}: {units} frames, {} record bytes, until full; {} bytes on disk, {} \
             free",
            s.stats().total_bytes,
            s.disk_bytes().expect("disk bytes"),
            fs2::available_space(fs.path()).expect("statvfs"),
        );
        if cycle == 1 {
            // A restart on the full file system: sled opens within the reserve.
            drop(s);
            let (s2, report) = open(&o);
            assert_eq!(report.records, got.len() as u64);
            s = s2;
        }
        // Drain everything: removals work on the full disk.
        s.remove(&seqs_of(&got)).expect("remove");
        s.flush().expect("flush");
        assert!(s.is_empty());
    }
    drop(s);
    assert!(verify(&o.dir).expect("verify").is_clean());
}

// ---- large records: files of their own ----

#[test]
fn large_records_live_in_files_that_go_with_their_records() {
    let d = tmp();
    let o = opts(d.path(), 100 * MB, WhenFull::DropOldestFrames);
    let (mut s, _) = open(&o);
    let big = rec(Class::Frame, 0, 300_000);
    let small = rec(Class::Result, 1, 1000);
    let (b, _) = stored(s.append(&big).expect("append"));
    let (r, _) = stored(s.append(&small).expect("append"));
    s.flush().expect("flush");
    assert_eq!(large_files(&o.dir), [format!("{b:016x}.rec")]);
    assert!(s.disk_bytes().expect("disk") >= 300_000);
    drop(s);

    let (mut s, report) = open(&o);
    assert_eq!((report.records, report.orphan_files), (2, 0));
    assert_eq!(all(&mut s), [(b, big), (r, small)]);
    s.remove(&[b]).expect("remove");
    assert!(
        large_files(&o.dir).is_empty(),
        "deleted once the removal is durable"
    );
    assert_eq!(s.stats().total_records, 1);
}

#[test]
fn a_missing_or_damaged_record_file_is_quarantined() {
    let d = tmp();
    let o = opts(d.path(), 100 * MB, WhenFull::DropOldestFrames);
    let (mut s, _) = open(&o);
    let seqs: Vec<u64> = (0..3)
        .map(|i| stored(s.append(&rec(Class::Frame, i, 100_000)).expect("append")).0)
        .collect();
    drop(s);
    let file = |seq: u64| o.dir.join("large").join(format!("{seq:016x}.rec"));
    std::fs::remove_file(file(seqs[0])).expect("remove file");
    let mut bytes = std::fs::read(file(seqs[1])).expect("read");
    bytes[50_000] ^= 0x04;
    std::fs::write(file(seqs[1]), bytes).expect("write");

    let v = verify(&o.dir).expect("verify");
    assert_eq!(v.corrupt.len(), 2, "{v}");
    assert!(v.corrupt[0].reason.contains("record file"), "{v}");
    assert!(v.corrupt[1].reason.contains("checksum mismatch"), "{v}");

    let (mut s, report) = open(&o);
    assert_eq!((report.quarantined, report.records), (2, 1));
    let left: Vec<u64> = all(&mut s).iter().map(|(q, _)| *q).collect();
    assert_eq!(left, [seqs[2]]);
    let frame_bytes = rec(Class::Frame, 2, 100_000).size() as u64;
    assert_eq!(s.stats().bytes[&Class::Frame], frame_bytes);
    assert_eq!(
        large_files(&o.dir),
        [
            format!("{:016x}.quarantined", seqs[1]),
            format!("{:016x}.rec", seqs[2])
        ]
    );
}

#[test]
fn orphaned_record_files_are_deleted_on_open() {
    let d = tmp();
    let o = opts(d.path(), 100 * MB, WhenFull::DropOldestFrames);
    let (mut s, _) = open(&o);
    let (keep, _) = stored(s.append(&rec(Class::Frame, 0, 100_000)).expect("append"));
    drop(s);
    // As if the process died after writing a file but before its stub reached sled.
    std::fs::write(o.dir.join("large").join("00000000000000ff.rec"), b"torn").expect("write");
    let v = verify(&o.dir).expect("verify");
    assert_eq!(v.orphan_files, 1);
    assert!(v.is_clean(), "orphans are harmless: {v}");
    let (_, report) = open(&o);
    assert_eq!((report.orphan_files, report.records), (1, 1));
    assert_eq!(large_files(&o.dir), [format!("{keep:016x}.rec")]);
}

// ---- a real crash: a child process appends, flushes, appends more, and aborts ----

const CRASH_ENV: &str = "FOVEA_SPOOL_CRASH_DIR";
const CRASH_FLUSHED: u64 = 40;

/// Every 4th record is a frame large enough for a record file.
fn crash_record(i: u64) -> (Class, usize) {
    if i.is_multiple_of(4) {
        (Class::Frame, 100_000)
    } else {
        (Class::Result, 2_000)
    }
}

#[test]
#[ignore = "helper: run in a child process by crash_after_flush_loses_nothing"]
fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_ENV) else {
        return;
    };
    let o = SpoolOptions {
        dir: dir.into(),
        max_bytes: 100 * MB,
        when_full: WhenFull::DropOldestFrames,
    };
    let (mut s, _) = open(&o);
    for i in 0..CRASH_FLUSHED {
        let (class, len) = crash_record(i);
        stored(s.append(&rec(class, i, len)).expect("append"));
    }
    s.flush().expect("flush");
    // Not flushed: may or may not survive.
    for i in CRASH_FLUSHED..CRASH_FLUSHED + 20 {
        let len = 50_000 + 10_000 * (i as usize % 3);
        stored(s.append(&rec(Class::Frame, i, len)).expect("append"));
    }
    std::process::abort();
}

#[test]
fn crash_after_flush_loses_nothing() {
    let d = tmp();
    let dir = d.path().join("spool");
    let exe = std::env::current_exe().expect("current exe");
    let status = std::process::Command::new(exe)
        .args([
            "--exact",
            "spool::tests::crash_child",
            "--ignored",
            "--nocapture",
        ])
        .env(CRASH_ENV, &dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run child");
    assert!(!status.success(), "the child aborts");
    let o = SpoolOptions {
        dir,
        max_bytes: 100 * MB,
        when_full: WhenFull::DropOldestFrames,
    };
    let (mut s, report) = open(&o);
    assert_eq!(report.quarantined, 0);
    let got = all(&mut s);
    assert!(got.len() as u64 >= CRASH_FLUSHED, "{} records", got.len());
    for (i, (seq, r)) in got.iter().enumerate().take(CRASH_FLUSHED as usize) {
        let (class, len) = crash_record(i as u64);
        assert_eq!(*seq, i as u64);
        assert_eq!(*r, rec(class, i as u64, len));
    }
    let last = got.last().map(|(q, _)| *q).expect("records");
    let (seq, _) = stored(s.append(&rec(Class::Result, 99, 10)).expect("append"));
    assert!(seq > last);
}

// ---- model-based: random operations against a VecDeque ----

/// splitmix64: small, deterministic, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The records of one frame as the outbox spools them: `chunks` frame records (each `len`
/// bytes), then its result, and a dead letter if `letter`. Every record carries the frame's id;
/// frame records their index and count (so a test can tell a whole frame from part of one).
fn unit(id: u64, chunks: u64, len: usize, result: bool, letter: bool) -> Vec<SpoolRecord> {
    let mut out = Vec::new();
    for i in 0..chunks {
        let mut r = rec(Class::Frame, id * 100 + i, len);
        r.headers = vec![
            ("fovea-record-id".into(), format!("node/cam/u{id}")),
            ("fovea-chunk-index".into(), i.to_string()),
            ("fovea-chunk-count".into(), chunks.to_string()),
        ];
        out.push(r);
    }
    for (class, wanted) in [(Class::Result, result), (Class::DeadLetter, letter)] {
        if wanted {
            let mut r = rec(class, id * 100 + 99, 300);
            r.headers = vec![("fovea-record-id".into(), format!("node/cam/u{id}"))];
            out.push(r);
        }
    }
    out
}

fn header<'a>(r: &'a SpoolRecord, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Every frame in the spool is whole: for each frame id, all `fovea-chunk-count` chunks are
/// there, unless one of its records was removed (delivered) by the test (`started`).
fn assert_whole_frames(got: &[(u64, SpoolRecord)], started: &HashSet<String>, what: &str) {
    let mut chunks: HashMap<String, (usize, usize)> = HashMap::new();
    for (_, r) in got.iter().filter(|(_, r)| r.class == Class::Frame) {
        let (Some(id), Some(count)) =
            (header(r, "fovea-record-id"), header(r, "fovea-chunk-count"))
        else {
            continue;
        };
        let e = chunks.entry(id.to_string()).or_default();
        e.0 += 1;
        e.1 = count.parse().expect("chunk count");
    }
    for (id, (found, count)) in chunks {
        assert!(
            found == count || started.contains(&id),
            "{what}: frame {id} has {found} of its {count} chunks in the spool"
        );
    }
}

struct Model {
    max_bytes: u64,
    when_full: WhenFull,
    recs: VecDeque<(u64, SpoolRecord)>,
    /// Frames that may be dropped: first frame seq -> (frame seqs, bytes), oldest first.
    frames: BTreeMap<u64, (Vec<u64>, u64)>,
    /// Frame ids of which a record was removed (delivered): never dropped, never checked whole.
    started: HashSet<String>,
    last_seq: Option<u64>,
    dropped_oldest: u64,
    dropped_no_room: u64,
    refused: u64,
}

/// What `append_frame` must return, by the model.
#[derive(Debug, PartialEq)]
enum Want {
    Refused,
    /// The frames dropped (first seqs) and whether the unit's own frame records were dropped.
    Stored {
        dropped: Vec<u64>,
        frame_dropped: bool,
    },
}

impl Model {
    fn bytes(&self, class: Option<Class>) -> u64 {
        self.recs
            .iter()
            .filter(|(_, r)| class.is_none_or(|c| r.class == c))
            .map(|(_, r)| r.size() as u64)
            .sum()
    }

    fn over(&self, bytes: u64) -> u64 {
        (self.bytes(None) + bytes).saturating_sub(self.max_bytes)
    }

    /// Drops the oldest whole frames until `need` bytes are freed (or none is left).
    fn drop_oldest(&mut self, need: u64) -> Vec<u64> {
        let mut freed = 0;
        let mut victims = Vec::new();
        for (first, (_, bytes)) in &self.frames {
            if freed >= need {
                break;
            }
            freed += bytes;
            victims.push(*first);
        }
        for first in &victims {
            let (seqs, _) = self.frames.remove(first).expect("victim");
            self.recs.retain(|(q, _)| !seqs.contains(q));
        }
        self.dropped_oldest += victims.len() as u64;
        victims
    }

    /// What `append_frame(unit)` must do; applies the drops. The caller stores the records.
    fn expect_append(&mut self, unit: &[SpoolRecord]) -> Want {
        let size = |frames: bool| -> u64 {
            unit.iter()
                .filter(|r| (r.class == Class::Frame) == frames)
                .map(|r| r.size() as u64)
                .sum()
        };
        let (frame_bytes, other_bytes) = (size(true), size(false));
        let has_frames = unit.iter().any(|r| r.class == Class::Frame);
        let need = self.over(frame_bytes + other_bytes);
        if need == 0 {
            return Want::Stored {
                dropped: Vec::new(),
                frame_dropped: false,
            };
        }
        match self.when_full {
            WhenFull::Backpressure if has_frames => Want::Refused,
            WhenFull::Backpressure => Want::Stored {
                dropped: Vec::new(),
                frame_dropped: false,
            },
            WhenFull::DropOldestFrames => {
                let droppable: u64 = self.frames.values().map(|(_, b)| b).sum();
                if !has_frames || need <= droppable {
                    let dropped = self.drop_oldest(need);
                    Want::Stored {
                        dropped,
                        frame_dropped: false,
                    }
                } else {
                    let dropped = self.drop_oldest(self.over(other_bytes));
                    self.dropped_no_room += 1;
                    Want::Stored {
                        dropped,
                        frame_dropped: true,
                    }
                }
            }
        }
    }

    /// Stores `recs` under `seqs` (frame records make one droppable frame).
    fn store(&mut self, seqs: std::ops::Range<u64>, recs: Vec<&SpoolRecord>) {
        let mut frame = (Vec::new(), 0);
        for (seq, r) in seqs.zip(recs) {
            if r.class == Class::Frame {
                frame.0.push(seq);
                frame.1 += r.size() as u64;
            }
            self.recs.push_back((seq, r.clone()));
        }
        if let Some(&first) = frame.0.first() {
            self.frames.insert(first, frame);
        }
    }

    /// Records `seqs` were removed (delivered): their frames are started.
    fn remove(&mut self, seqs: &[u64]) {
        for (q, r) in self.recs.iter().filter(|(q, _)| seqs.contains(q)) {
            if r.class == Class::Frame {
                self.frames.retain(|_, (members, _)| !members.contains(q));
                if let Some(id) = header(r, "fovea-record-id") {
                    self.started.insert(id.to_string());
                }
            }
        }
        self.recs.retain(|(q, _)| !seqs.contains(q));
    }

    fn check(&self, s: &SledSpool, step: usize) {
        let st = s.stats();
        assert_eq!(st.total_records, self.recs.len() as u64, "step {step}");
        assert_eq!(st.total_bytes, self.bytes(None), "step {step}");
        for c in Class::ALL {
            assert_eq!(st.bytes[&c], self.bytes(Some(c)), "step {step} {c}");
        }
        assert_eq!(
            st.oldest_created_ms,
            self.recs.front().map(|(_, r)| r.created_ms),
            "step {step}"
        );
        let get = |reason: &str| {
            st.dropped
                .get(&("frame".to_string(), reason.to_string()))
                .copied()
                .unwrap_or(0)
        };
        assert_eq!(get(REASON_OLDEST), self.dropped_oldest, "step {step}");
        assert_eq!(get(REASON_NO_ROOM), self.dropped_no_room, "step {step}");
        assert_eq!(s.is_empty(), self.recs.is_empty(), "step {step}");
    }
}

/// A random unit: a frame in 1..=6 chunks (some large enough for record files) with its result
/// (sometimes a dead letter too), a dead letter alone, or a result alone.
fn random_unit(rng: &mut Rng, id: u64) -> Vec<SpoolRecord> {
    match rng.below(10) {
        0..=5 => {
            let chunks = 1 + rng.below(6);
            let len = match rng.below(6) {
                0 => 66_000 + rng.below(10_000),
                _ => 1000 + rng.below(9_000),
            } as usize;
            unit(id, chunks, len, true, rng.below(8) == 0)
        }
        6 | 7 => unit(id, 0, 0, true, false),
        _ => unit(id, 0, 0, false, true),
    }
}

/// Runs one seed; returns (frames dropped as oldest, frames dropped for no room, refused).
fn run_model(seed: u64, steps: usize) -> (u64, u64, u64) {
    let mut rng = Rng(seed);
    let d = tmp();
    let when_full = if seed.is_multiple_of(2) {
        WhenFull::DropOldestFrames
    } else {
        WhenFull::Backpressure
    };
    let o = opts(d.path(), 150_000, when_full);
    let (mut s, _) = open(&o);
    let mut m = Model {
        max_bytes: o.max_bytes,
        when_full,
        recs: VecDeque::new(),
        frames: BTreeMap::new(),
        started: HashSet::new(),
        last_seq: None,
        dropped_oldest: 0,
        dropped_no_room: 0,
        refused: 0,
    };
    let mut n = 0u64;
    for step in 0..steps {
        match rng.below(100) {
            0..=44 => {
                n += 1;
                let u = random_unit(&mut rng, n);
                let want = m.expect_append(&u);
                let got = s.append_frame(&u).expect("append");
                let (seqs, dropped, frame_dropped) = match (got, &want) {
                    (Appended::Refused, Want::Refused) => {
                        m.refused += 1;
                        m.check(&s, step);
                        continue;
                    }
                    (Appended::Stored { seqs, dropped }, _) => (seqs, dropped, false),
                    (
                        Appended::FrameDropped {
                            seqs,
                            dropped,
                            records,
                            bytes,
                        },
                        _,
                    ) => {
                        let frames: Vec<_> = u.iter().filter(|r| r.class == Class::Frame).collect();
                        assert_eq!(records, frames.len() as u64, "step {step}");
                        assert_eq!(
                            bytes,
                            frames.iter().map(|r| r.size() as u64).sum::<u64>(),
                            "step {step}"
                        );
                        (seqs, dropped, true)
                    }
                    (got, want) => panic!("step {step}: got {got:?}, model says {want:?}"),
                };
                assert_eq!(
                    Want::Stored {
                        dropped: dropped.iter().map(|d| d.seq).collect(),
                        frame_dropped
                    },
                    want,
                    "step {step}"
                );
                for d in &dropped {
                    assert!(d.records >= 1 && d.bytes > 0, "step {step}: {d:?}");
                }
                let kept: Vec<&SpoolRecord> = u
                    .iter()
                    .filter(|r| !frame_dropped || r.class != Class::Frame)
                    .collect();
                assert_eq!(seqs.end - seqs.start, kept.len() as u64, "step {step}");
                if !seqs.is_empty() {
                    assert!(
                        m.last_seq.is_none_or(|l| seqs.start > l),
                        "step {step}: seq {seqs:?}"
                    );
                    m.last_seq = Some(seqs.end - 1);
                }
                m.store(seqs, kept);
                // The property: after every append, every frame in the spool is whole.
                assert_whole_frames(&all(&mut s), &m.started, &format!("step {step}"));
            }
            45..=54 => s.flush().expect("flush"),
            55..=74 => {
                let after = match rng.below(3) {
                    0 => None,
                    _ if m.recs.is_empty() => None,
                    _ => Some(m.recs[rng.below(m.recs.len() as u64) as usize].0),
                };
                let max = 1 + rng.below(8) as usize;
                let got = s.oldest(after, max).expect("oldest");
                let want: Vec<(u64, SpoolRecord)> = m
                    .recs
                    .iter()
                    .filter(|(q, _)| after.is_none_or(|a| *q > a))
                    .take(max)
                    .cloned()
                    .collect();
                assert_eq!(got, want, "step {step}: oldest({after:?}, {max})");
            }
            75..=91 => {
                // Remove a prefix (as a drain does) or scattered records, plus an unknown seq.
                let mut seqs: Vec<u64> = if rng.below(2) == 0 {
                    let k = rng.below(5) as usize;
                    m.recs.iter().take(k).map(|(q, _)| *q).collect()
                } else {
                    m.recs
                        .iter()
                        .filter(|_| rng.below(4) == 0)
                        .map(|(q, _)| *q)
                        .collect()
                };
                seqs.push(m.last_seq.map_or(0, |l| l + 1000));
                s.remove(&seqs).expect("remove");
                m.remove(&seqs);
            }
            _ => {
                // Clean restart: appended records survive (sled flushes on close) and every
                // flushed one must; the frames that may be dropped are rebuilt the same.
                drop(s);
                let (s2, report) = open(&o);
                s = s2;
                assert_eq!(report.records, m.recs.len() as u64, "step {step}: reopen");
                assert_eq!(report.quarantined, 0);
                assert_eq!(report.index_repaired, 0);
                assert_eq!(report.interrupted, 0);
                assert_eq!(report.orphan_files, 0);
            }
        }
        m.check(&s, step);
    }
    s.flush().expect("flush");
    let want: Vec<(u64, SpoolRecord)> = m.recs.iter().cloned().collect();
    assert_eq!(all(&mut s), want, "seed {seed}: final content");
    drop(s);
    let (mut s, _) = open(&o);
    assert_eq!(all(&mut s), want, "seed {seed}: final content after reopen");
    drop(s);
    let v = verify(&o.dir).expect("verify");
    assert!(v.is_clean() && v.orphan_files == 0, "{v}");
    // Only the records left have files.
    let large = want.iter().filter(|(_, r)| r.size() > 64 * 1024).count();
    assert_eq!(
        large_files(&o.dir).len(),
        large,
        "seed {seed}: record files"
    );
    (m.dropped_oldest, m.dropped_no_room, m.refused)
}

fn large_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("large"))
        .expect("large folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn model_random_operations_drop_oldest_frames() {
    let mut dropped = 0;
    for seed in [2, 4, 1_000_000] {
        dropped += run_model(seed, 400).0;
    }
    assert!(
        dropped > 10,
        "the runs must fill the spool: {dropped} drops"
    );
}

#[test]
fn model_random_operations_backpressure() {
    let mut refused = 0;
    for seed in [1, 3, 999_999] {
        refused += run_model(seed, 400).2;
    }
    assert!(
        refused > 10,
        "the runs must fill the spool: {refused} refusals"
    );
}

#[test]
#[ignore = "benchmark: cargo test -p fovea --lib spool::tests::benchmark -- --ignored --nocapture"]
fn benchmark() {
    let d = tmp();
    println!("{}", super::bench::benchmark(d.path()).expect("benchmark"));
}
