//! `fovea tail`: reads fovea's topics from a Kafka cluster and prints each record decoded, one
//! line per record. Uses partition assignment (no consumer group), so it never disturbs the
//! offsets of real consumers.

use crate::records::header_of;
use anyhow::Context;
use clap::Args;
use fovea_proto::headers as h;
use fovea_proto::v1::{DeadLetter, Frame, InferenceResult, ModelOutput};
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Topics to read (repeat the flag for several).
    #[arg(long = "topic", default_values_t = vec!["fovea.results".to_string()])]
    pub topics: Vec<String>,
    /// Start at the beginning of each partition instead of the end.
    #[arg(long)]
    pub from_beginning: bool,
    /// Stop after this many records.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop when no record arrived for this many seconds.
    #[arg(long)]
    pub idle_exit: Option<f64>,
    /// Print each record id once (delivery is at least once: a record may arrive twice).
    #[arg(long)]
    pub dedupe: bool,
}

/// Record ids already printed, with a bound: the oldest are forgotten first.
struct Seen {
    ids: std::collections::HashSet<String>,
    order: std::collections::VecDeque<String>,
}

impl Seen {
    const KEEP: usize = 100_000;

    /// True the first time `key` is seen.
    fn first(&mut self, key: String) -> bool {
        if !self.ids.insert(key.clone()) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > Self::KEEP
            && let Some(old) = self.order.pop_front()
        {
            self.ids.remove(&old);
        }
        true
    }
}

pub fn run(args: TailArgs) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", "fovea-tail")
        .set("enable.auto.commit", "false")
        .set("fetch.message.max.bytes", "67108864")
        .set("log.connection.close", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for topic in &args.topics {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .with_context(|| format!("metadata for {topic}"))?;
        let partitions = md
            .topics()
            .first()
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        anyhow::ensure!(
            partitions > 0,
            "topic {topic} does not exist on {}",
            args.brokers
        );
        let start = if args.from_beginning {
            Offset::Beginning
        } else {
            Offset::End
        };
        for p in 0..partitions as i32 {
            assignment.add_partition_offset(topic, p, start)?;
        }
    }
    consumer.assign(&assignment)?;
    let mut seen = 0u64;
    let mut printed = Seen {
        ids: Default::default(),
        order: Default::default(),
    };
    let mut last = Instant::now();
    loop {
        if args.count.is_some_and(|c| seen >= c) {
            return Ok(());
        }
        if args
            .idle_exit
            .is_some_and(|s| last.elapsed().as_secs_f64() > s)
        {
            return Ok(());
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(e)) => log::warn!("tail: {e}"),
            Some(Ok(msg)) => {
                seen += 1;
                last = Instant::now();
                let schema = header_of(&msg, h::SCHEMA).unwrap_or_default();
                if args.dedupe
                    && let Some(id) = header_of(&msg, h::RECORD_ID)
                    && !printed.first(format!(
                        "{}/{schema}/{id}/{:?}",
                        msg.topic(),
                        header_of(&msg, fovea_proto::chunks::HEADER_CHUNK_INDEX)
                    ))
                {
                    continue;
                }
                println!(
                    "{} {}",
                    msg.topic(),
                    describe(&schema, msg.payload().unwrap_or_default())
                );
            }
        }
    }
}

/// One line describing a fovea record, by its schema header.
pub fn describe(schema: &str, value: &[u8]) -> String {
    match schema {
        h::SCHEMA_RESULT => match InferenceResult::decode(value) {
            Ok(r) => describe_result(&r),
            Err(e) => format!("undecodable result: {e}"),
        },
        h::SCHEMA_FRAME => match Frame::decode(value) {
            Ok(f) => format!(
                "{} {} {} {}x{} {} bytes",
                f.camera_id,
                f.record_id,
                f.content_type,
                f.width,
                f.height,
                f.data.len()
            ),
            Err(e) => format!("undecodable frame: {e}"),
        },
        h::SCHEMA_DEAD_LETTER => match DeadLetter::decode(value) {
            Ok(d) => format!(
                "{} {} [{}] {} ({} bytes from {})",
                d.camera_id, d.record_id, d.kind, d.reason, d.payload_size, d.source
            ),
            Err(e) => format!("undecodable dead letter: {e}"),
        },
        other => format!(
            "record with unknown schema {other:?}, {} bytes",
            value.len()
        ),
    }
}

fn describe_result(r: &InferenceResult) -> String {
    let status = r.status().as_str_name();
    let mut line = format!("{} {} {status}", r.camera_id, r.record_id);
    if !r.status_detail.is_empty() {
        line += &format!(" ({})", r.status_detail);
    }
    for o in &r.outputs {
        line += &format!(" | {}", describe_output(o));
    }
    if let Some(f) = &r.frame {
        line += &format!(" | frame: {} via {}", f.size_policy, f.topic);
    }
    // The camera's metadata, carried over from its Frame envelope (`fovea camera --envelope`
    // puts the photo's file name there), sorted by key so that lines compare.
    if !r.metadata.is_empty() {
        let mut items: Vec<String> = r.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
        items.sort();
        line += &format!(" | metadata: {}", items.join(" "));
    }
    line
}

fn describe_output(o: &ModelOutput) -> String {
    let items: Vec<String> = if o.detections.is_empty() {
        o.classifications
            .iter()
            .take(3)
            .map(|c| format!("{} {:.2}", c.label, c.score))
            .collect()
    } else {
        o.detections
            .iter()
            .map(|d| {
                format!(
                    "{} {:.2} [{:.0},{:.0},{:.0},{:.0}]",
                    d.label, d.score, d.x0, d.y0, d.x1, d.y1
                )
            })
            .collect()
    };
    format!(
        "{}@{} {:.1} ms: {}",
        o.model,
        o.model_version,
        o.inference_us as f64 / 1000.0,
        if items.is_empty() {
            "nothing".to_string()
        } else {
            items.join(", ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_line_ends_with_the_cameras_metadata_sorted_by_key() {
        let r = InferenceResult {
            record_id: "n/cam-1/1".into(),
            camera_id: "cam-1".into(),
            status: fovea_proto::v1::inference_result::Status::Ok as i32,
            metadata: [
                ("site".to_string(), "dock".to_string()),
                ("file".to_string(), "chelsea.png".to_string()),
            ]
            .into(),
            ..InferenceResult::default()
        };
        let line = describe(h::SCHEMA_RESULT, &r.encode_to_vec());
        assert_eq!(
            line,
            "cam-1 n/cam-1/1 OK | metadata: file=chelsea.png site=dock"
        );

        let bare = InferenceResult {
            metadata: Default::default(),
            ..r
        };
        let line = describe(h::SCHEMA_RESULT, &bare.encode_to_vec());
        assert_eq!(line, "cam-1 n/cam-1/1 OK");
    }
}
