//! The parts of the disk budget and their sum per filesystem. Pure: the figures read from the
//! disk come in as [`Measured`], so every warning is unit-tested without a disk.

use crate::config::{Config, LargeFramePolicy};
use std::path::PathBuf;

/// One part of what fovea may use on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// `spool`, `local_broker`, `chunk_uploads`, `ingress_spill`, `claim_checks`, `logs` (the
    /// `part` label in `/metrics`).
    pub name: &'static str,
    /// The folder the part lives in.
    pub path: PathBuf,
    /// Bytes the part may grow to; `None` = no bound (a retention of -1).
    pub budget: Option<u64>,
    /// Where the figure comes from, for `fovea validate`.
    pub basis: String,
    /// Whether the folder holds this part alone, so that its size is the part's (not so for the
    /// journal, which holds every service's logs).
    pub own_folder: bool,
}

/// Where the journal keeps its files (persistent journal).
const JOURNAL_DIR: &str = "/var/log/journal";

/// The parts of `cfg`'s budget. The local broker counts only when it keeps its data on this box
/// (`kafka.data_dir`), the claim-check store only when `large_frames.policy` uses it.
pub fn parts(cfg: &Config) -> Vec<Part> {
    let mut parts = vec![Part {
        name: "spool",
        path: cfg.spool_dir(),
        budget: Some(cfg.spool.max_bytes),
        basis: "spool.max_bytes".into(),
        own_folder: true,
    }];
    if !cfg.kafka.data_dir.as_os_str().is_empty() {
        let partitions = cfg.kafka.partitions.max(1) as u64;
        let per_topic: Vec<Option<u64>> = cfg
            .local_topics()
            .iter()
            .map(|(_, class)| {
                cfg.kafka
                    .retention
                    .of(*class)
                    .partition_bytes()
                    .map(|b| b * partitions)
            })
            .collect();
        let budget = per_topic.iter().copied().sum::<Option<u64>>();
        parts.push(Part {
            name: "local_broker",
            path: cfg.kafka.data_dir.clone(),
            budget,
            basis: format!(
                "{} topics x {partitions} partitions x (retention_bytes + segment_bytes), kafka.retention",
                per_topic.len()
            ),
            own_folder: true,
        });
    }
    // The ingress's transient files: chunks of uploads in progress (the reassembly holds at most
    // twice mqtt.max_frame_bytes of uploads) and payloads over the memory budget.
    parts.push(Part {
        name: "chunk_uploads",
        path: cfg.node.state_dir.join("chunks"),
        budget: Some(cfg.mqtt.max_frame_bytes as u64 * 2),
        basis: "2 x mqtt.max_frame_bytes (uploads being reassembled)".into(),
        own_folder: true,
    });
    if cfg.mqtt.spill_max_bytes > 0 {
        parts.push(Part {
            name: "ingress_spill",
            path: cfg.node.state_dir.join("ingress-spill"),
            budget: Some(cfg.mqtt.spill_max_bytes),
            basis: "mqtt.spill_max_bytes".into(),
            own_folder: true,
        });
    }
    if cfg.large_frames.policy == LargeFramePolicy::ClaimCheck {
        parts.push(Part {
            name: "claim_checks",
            path: cfg.blob_dir(),
            budget: Some(cfg.large_frames.store_max_bytes),
            basis: "large_frames.store_max_bytes".into(),
            own_folder: true,
        });
    }
    parts.push(Part {
        name: "logs",
        path: PathBuf::from(JOURNAL_DIR),
        budget: Some(cfg.log.disk_budget_bytes),
        basis: "log.disk_budget_bytes (journald's SystemMaxUse= enforces it)".into(),
        own_folder: false,
    });
    parts
}

/// What was read from the disk about one part.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// Identifies the filesystem (`st_dev` of the nearest existing folder).
    pub filesystem: u64,
    /// Bytes free for fovea on that filesystem.
    pub free: u64,
    /// Bytes the part holds now; `None` when it cannot be read (e.g. the broker's folder belongs
    /// to another user).
    pub used: Option<u64>,
}

/// The budget of one filesystem.
#[derive(Debug, Clone, PartialEq)]
pub struct Filesystem {
    /// The parts on it (indices into the parts given to [`by_filesystem`]).
    pub parts: Vec<usize>,
    /// Sum of their budgets; `None` when one of them is unbounded.
    pub budget: Option<u64>,
    /// What they hold now (the parts that could be read).
    pub used: u64,
    pub free: u64,
}

impl Filesystem {
    /// Whether the parts can grow to their budgets: what they may still add fits in the free
    /// space. An unbounded part never fits.
    pub fn fits(&self) -> bool {
        self.budget
            .is_some_and(|b| b.saturating_sub(self.used) <= self.free)
    }
}

/// Groups `parts` by filesystem (`measured` is in the same order) and adds up their budgets and
/// what they hold now.
pub fn sum(parts: &[Part], measured: &[Measured]) -> Vec<Filesystem> {
    let mut out: Vec<(u64, Filesystem)> = Vec::new();
    for (i, m) in measured.iter().enumerate() {
        let at = match out.iter().position(|(id, _)| *id == m.filesystem) {
            Some(at) => at,
            None => {
                let fs = Filesystem {
                    parts: Vec::new(),
                    budget: Some(0),
                    used: 0,
                    free: m.free,
                };
                out.push((m.filesystem, fs));
                out.len() - 1
            }
        };
        let fs = &mut out[at].1;
        fs.parts.push(i);
        fs.used += m.used.unwrap_or(0);
        fs.free = fs.free.min(m.free);
        fs.budget = fs.budget.zip(parts[i].budget).map(|(a, b)| a + b);
    }
    out.into_iter().map(|(_, fs)| fs).collect()
}

/// Bytes in a unit a reader takes in at a glance (binary units, one decimal).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_budget_has_every_part_but_the_unused_store() {
        let cfg = Config::default();
        let parts = parts(&cfg);
        let names: Vec<_> = parts.iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            [
                "spool",
                "local_broker",
                "chunk_uploads",
                "ingress_spill",
                "logs"
            ]
        );
        // 3 partitions x ((1 GiB + 64 MiB) frames + (1 GiB + 64 MiB) results + (128 + 16) MiB
        // dead letters).
        let gib = 1u64 << 30;
        let mib = 1u64 << 20;
        assert_eq!(
            parts[1].budget,
            Some(3 * (2 * (gib + 64 * mib) + 144 * mib))
        );
        assert_eq!(parts[0].budget, Some(gib));
        assert_eq!(parts[2].budget, Some(128 * mib), "2 x mqtt.max_frame_bytes");
        assert_eq!(parts[3].budget, Some(gib), "mqtt.spill_max_bytes");
        let mut off = Config::default();
        off.mqtt.spill_max_bytes = 0;
        assert!(super::parts(&off).iter().all(|p| p.name != "ingress_spill"));
    }

    #[test]
    fn claim_checks_count_only_with_their_policy_and_an_unbounded_topic_makes_it_unbounded() {
        let mut cfg = Config::default();
        cfg.large_frames.policy = LargeFramePolicy::ClaimCheck;
        cfg.kafka.retention.results.retention_bytes = -1;
        let parts = parts(&cfg);
        assert!(parts.iter().any(|p| p.name == "claim_checks"));
        let broker = parts.iter().find(|p| p.name == "local_broker").unwrap();
        assert_eq!(broker.budget, None);
        cfg.kafka.data_dir = PathBuf::new();
        assert!(!super::parts(&cfg).iter().any(|p| p.name == "local_broker"));
    }

    fn part(budget: Option<u64>) -> Part {
        Part {
            name: "spool",
            path: PathBuf::from("/x"),
            budget,
            basis: String::new(),
            own_folder: true,
        }
    }

    #[test]
    fn parts_on_one_filesystem_are_added_up_against_its_free_space() {
        let parts = [part(Some(600)), part(Some(500)), part(Some(10))];
        let measured = [
            Measured {
                filesystem: 1,
                free: 1000,
                used: Some(100),
            },
            Measured {
                filesystem: 1,
                free: 1000,
                used: None,
            },
            Measured {
                filesystem: 2,
                free: 5,
                used: Some(0),
            },
        ];
        let fs = sum(&parts, &measured);
        assert_eq!(fs.len(), 2);
        assert_eq!(fs[0].parts, [0, 1]);
        assert_eq!(fs[0].budget, Some(1100));
        // 1100 budget - 100 already there = 1000 more, and 1000 are free.
        assert!(fs[0].fits());
        assert!(!fs[1].fits(), "10 bytes do not fit in 5");
        let unbounded = sum(&[part(None)], &measured[..1]);
        assert!(!unbounded[0].fits());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(5 << 30), "5.0 GiB");
    }
}
