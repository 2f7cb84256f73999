//! The record type, and reading one back from where records live: an rdkafka message (a
//! consumer's, or one librdkafka handed back after a failed delivery) or the spool.

use super::policy::SizePolicy;
use crate::spool::{Class, SpoolRecord};
use fovea_proto::headers as h;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};

/// What a record is about; decided by its `fovea-schema` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// A whole frame (`fovea.v1.Frame`).
    Frame,
    /// One piece of a chunked frame (`fovea.v1.FrameChunk`).
    FrameChunk,
    /// An inference result.
    Result,
    /// A dead letter: something that could not be processed or stored, with the reason.
    DeadLetter,
}

impl RecordKind {
    /// The schema header value.
    pub fn schema(self) -> &'static str {
        match self {
            RecordKind::Frame => h::SCHEMA_FRAME,
            RecordKind::FrameChunk => h::SCHEMA_FRAME_CHUNK,
            RecordKind::Result => h::SCHEMA_RESULT,
            RecordKind::DeadLetter => h::SCHEMA_DEAD_LETTER,
        }
    }

    /// Reads a schema header value; `None` for anything fovea does not write.
    pub fn from_schema(schema: &str) -> Option<RecordKind> {
        [
            RecordKind::Frame,
            RecordKind::FrameChunk,
            RecordKind::Result,
            RecordKind::DeadLetter,
        ]
        .into_iter()
        .find(|k| k.schema() == schema)
    }

    /// The spool's class (what a full spool may drop: frames and their chunks).
    pub fn class(self) -> Class {
        match self {
            RecordKind::Frame | RecordKind::FrameChunk => Class::Frame,
            RecordKind::Result => Class::Result,
            RecordKind::DeadLetter => Class::DeadLetter,
        }
    }

    /// Frame records and chunks.
    pub fn is_frame(self) -> bool {
        self.class() == Class::Frame
    }
}

/// One Kafka record as fovea writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// From the schema header; [`RecordKind::Result`] for a record without one (never written by
    /// fovea; only met when reading foreign records).
    pub kind: RecordKind,
    pub topic: String,
    /// The camera id: a camera's records share a partition, so they stay in order.
    pub key: String,
    /// In the order they were added; names are fovea's `fovea-*` constants.
    pub headers: Vec<(String, String)>,
    pub value: Vec<u8>,
}

impl Record {
    /// Bytes the producer and broker count against `message.max.bytes`: key, value and headers
    /// (the batch framing around them is the limit's allowance, see
    /// [`RecordLimit`](super::RecordLimit)).
    pub fn size(&self) -> usize {
        self.key.len() + self.value.len() + headers_size(&self.headers)
    }

    /// The value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The record's id (`node/camera/frame`), shared by every record about one frame.
    pub fn record_id(&self) -> Option<&str> {
        self.header(h::RECORD_ID)
    }

    /// How the frame this record carries travels, if it says.
    pub fn size_policy(&self) -> Option<SizePolicy> {
        self.header(h::SIZE_POLICY).and_then(SizePolicy::parse)
    }

    /// Sets header `name` (replacing an earlier value).
    pub fn set_header(&mut self, name: &str, value: impl Into<String>) {
        let value = value.into();
        match self.headers.iter_mut().find(|(k, _)| k == name) {
            Some(slot) => slot.1 = value,
            None => self.headers.push((name.to_string(), value)),
        }
    }

    /// A record read from Kafka (or handed back by librdkafka after a failed delivery). Header
    /// values that are not UTF-8 are read lossily; a missing key or value is empty.
    pub fn from_message<M: Message>(msg: &M) -> Record {
        let headers = headers_of(msg);
        let kind = headers
            .iter()
            .find(|(k, _)| k == h::SCHEMA)
            .and_then(|(_, v)| RecordKind::from_schema(v))
            .unwrap_or(RecordKind::Result);
        Record {
            kind,
            topic: msg.topic().to_string(),
            key: msg
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_default(),
            headers,
            value: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        }
    }

    /// The headers in rdkafka's form, for producing.
    pub fn kafka_headers(&self) -> OwnedHeaders {
        let mut out = OwnedHeaders::new_with_capacity(self.headers.len());
        for (key, value) in &self.headers {
            out = out.insert(Header {
                key,
                value: Some(value.as_str()),
            });
        }
        out
    }

    /// The spool's shape of this record.
    pub fn to_spool(&self, created_ms: i64) -> SpoolRecord {
        SpoolRecord {
            class: self.kind.class(),
            topic: self.topic.clone(),
            key: self.key.clone(),
            headers: self.headers.clone(),
            value: self.value.clone(),
            created_ms,
        }
    }

    /// A spooled record, back in this shape (its kind from its schema header, as written).
    pub fn from_spool(rec: SpoolRecord) -> Record {
        let kind = rec
            .headers
            .iter()
            .find(|(k, _)| k == h::SCHEMA)
            .and_then(|(_, v)| RecordKind::from_schema(v))
            .unwrap_or(match rec.class {
                Class::Frame => RecordKind::Frame,
                Class::Result => RecordKind::Result,
                Class::DeadLetter => RecordKind::DeadLetter,
            });
        Record {
            kind,
            topic: rec.topic,
            key: rec.key,
            headers: rec.headers,
            value: rec.value,
        }
    }
}

/// Bytes of header names and values.
pub(super) fn headers_size(headers: &[(String, String)]) -> usize {
    headers.iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// A message's headers as (name, value) pairs.
pub fn headers_of<M: Message>(msg: &M) -> Vec<(String, String)> {
    msg.headers()
        .map(|hs| {
            hs.iter()
                .map(|x| {
                    (
                        x.key.to_string(),
                        String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::Timestamp;
    use rdkafka::message::OwnedMessage;

    fn sample() -> Record {
        Record {
            kind: RecordKind::FrameChunk,
            topic: "fovea.frames".into(),
            key: "cam".into(),
            headers: vec![
                (h::SCHEMA.into(), h::SCHEMA_FRAME_CHUNK.into()),
                (h::RECORD_ID.into(), "n/cam/s1".into()),
                (h::SIZE_POLICY.into(), SizePolicy::Chunked.as_str().into()),
            ],
            value: vec![1, 2, 3],
        }
    }

    #[test]
    fn a_message_reads_back_as_the_record_that_was_sent() {
        let rec = sample();
        let msg = OwnedMessage::new(
            Some(rec.value.clone()),
            Some(rec.key.clone().into_bytes()),
            rec.topic.clone(),
            Timestamp::NotAvailable,
            0,
            0,
            Some(rec.kafka_headers()),
        );
        assert_eq!(Record::from_message(&msg), rec);
    }

    #[test]
    fn the_spool_round_trip_keeps_everything() {
        let rec = sample();
        let spooled = rec.to_spool(42);
        assert_eq!(spooled.class, Class::Frame);
        assert_eq!(spooled.created_ms, 42);
        assert_eq!(spooled.size(), rec.size() + rec.topic.len());
        assert_eq!(Record::from_spool(spooled), rec);
    }

    #[test]
    fn size_counts_key_value_and_headers() {
        let rec = sample();
        let headers: usize = rec.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert_eq!(rec.size(), 3 + 3 + headers);
    }

    #[test]
    fn headers_are_read_and_replaced_by_name() {
        let mut rec = sample();
        assert_eq!(rec.record_id(), Some("n/cam/s1"));
        assert_eq!(rec.size_policy(), Some(SizePolicy::Chunked));
        rec.set_header(h::SIZE_POLICY, SizePolicy::Inline.as_str());
        rec.set_header("fovea-edge-node", "n");
        assert_eq!(rec.size_policy(), Some(SizePolicy::Inline));
        assert_eq!(rec.header("fovea-edge-node"), Some("n"));
        assert_eq!(rec.headers.len(), 4);
    }

    #[test]
    fn kinds_map_to_schemas_and_classes() {
        for kind in [
            RecordKind::Frame,
            RecordKind::FrameChunk,
            RecordKind::Result,
            RecordKind::DeadLetter,
        ] {
            assert_eq!(RecordKind::from_schema(kind.schema()), Some(kind));
        }
        assert!(RecordKind::FrameChunk.is_frame() && !RecordKind::Result.is_frame());
        assert_eq!(RecordKind::from_schema("x"), None);
    }
}
