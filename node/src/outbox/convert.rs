//! Records on their way to the spool and back: a planned [`Record`], a message librdkafka gave
//! back after a failed delivery, and a [`SpoolRecord`] are the same record in three shapes.

use super::records::{Record, RecordKind};
use crate::spool::{Class, SpoolRecord};
use fovea_proto::headers as h;
use rdkafka::message::{Headers, Message, OwnedMessage};

pub fn class_of(kind: RecordKind) -> Class {
    match kind {
        RecordKind::Frame => Class::Frame,
        RecordKind::Result => Class::Result,
        RecordKind::DeadLetter => Class::DeadLetter,
    }
}

pub fn to_spool(record: &Record, now_ms: i64) -> SpoolRecord {
    SpoolRecord {
        class: class_of(record.kind),
        topic: record.topic.clone(),
        key: record.key.clone(),
        headers: record
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        value: record.value.clone(),
        created_ms: now_ms,
    }
}

/// A message whose delivery failed, as librdkafka handed it back. Its class comes from the
/// schema header fovea put on it.
pub fn failed_to_spool(msg: &OwnedMessage, now_ms: i64) -> SpoolRecord {
    let headers: Vec<(String, String)> = msg
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|hd| {
                    let value = hd.value.map(|v| String::from_utf8_lossy(v).into_owned());
                    (hd.key.to_string(), value.unwrap_or_default())
                })
                .collect()
        })
        .unwrap_or_default();
    let schema = headers
        .iter()
        .find(|(k, _)| k == h::SCHEMA)
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    let class = match schema {
        h::SCHEMA_FRAME => Class::Frame,
        h::SCHEMA_DEAD_LETTER => Class::DeadLetter,
        _ => Class::Result,
    };
    SpoolRecord {
        class,
        topic: msg.topic().to_string(),
        key: msg
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default(),
        headers,
        value: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        created_ms: now_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::Timestamp;
    use rdkafka::message::{Header, OwnedHeaders};

    #[test]
    fn a_failed_message_keeps_everything_and_its_class() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: h::SCHEMA,
                value: Some(h::SCHEMA_FRAME),
            })
            .insert(Header {
                key: h::RECORD_ID,
                value: Some("n/c/s1"),
            });
        let msg = OwnedMessage::new(
            Some(vec![1, 2, 3]),
            Some(b"cam".to_vec()),
            "fovea.frames".into(),
            Timestamp::NotAvailable,
            0,
            0,
            Some(headers),
        );
        let rec = failed_to_spool(&msg, 42);
        assert_eq!(rec.class, Class::Frame);
        assert_eq!(
            (rec.topic.as_str(), rec.key.as_str()),
            ("fovea.frames", "cam")
        );
        assert_eq!(rec.value, vec![1, 2, 3]);
        assert_eq!(
            rec.headers[1],
            (h::RECORD_ID.to_string(), "n/c/s1".to_string())
        );
        assert_eq!(rec.created_ms, 42);
    }
}
