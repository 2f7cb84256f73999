//! A camera's MQTT payload: `payload::sniff`, `payload::parse` (bare image or `Frame`
//! envelope) and `payload::frame_id`.
//!
//! Checks: never a panic; a parsed frame is the topic's camera, with none of fovea's own fields
//! (record id, node, sides, receive time, claim check) set by the camera, its type is what its bytes
//! sniff as, a bare image is kept byte for byte, an envelope's metadata is within the limit,
//! the frame id is `s<sequence>` or `h<16 hex digits>`, and parsing the frame re-encoded gives
//! the same frame.
#![no_main]

use bytes::Bytes;
use fovea::ingress::payload::{frame_id, parse, sniff};
use fovea_fuzz as _;
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// `mqtt.max_metadata_bytes` for the run: small, so that inputs reach both sides of it.
const MAX_METADATA: usize = 256;

fuzz_target!(|data: &[u8]| {
    let sniffed = sniff(data);
    let frame = match parse("cam-1", Bytes::copy_from_slice(data), MAX_METADATA) {
        Ok(frame) => frame,
        Err(rejection) => {
            assert!(!rejection.kind().is_empty());
            let _ = rejection.to_string();
            assert!(
                sniffed.is_none(),
                "a sniffed image is never refused: {rejection}"
            );
            if data.is_empty() {
                assert_eq!(rejection.kind(), "empty-payload");
            }
            return;
        }
    };
    assert_eq!(frame.camera_id, "cam-1");
    // fovea's own fields are fovea's to set ("leaves fovea's own fields unset").
    assert!(
        frame.record_id.is_empty() && frame.node_id.is_empty(),
        "{frame:?}"
    );
    assert_eq!((frame.width, frame.height, frame.received_at_ms), (0, 0, 0));
    assert!(frame.claim.is_none(), "{frame:?}");
    assert_eq!(sniff(&frame.data), Some(frame.content_type.as_str()));
    if sniffed.is_some() {
        assert_eq!(&frame.data[..], data, "a bare image is kept as sent");
    } else {
        let bytes: usize = frame.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(bytes <= MAX_METADATA);
    }
    let id = frame_id(&frame);
    if frame.sequence != 0 {
        assert_eq!(id, format!("s{}", frame.sequence));
    } else {
        let hex = id.strip_prefix('h').expect("a hash id");
        assert!(
            hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
    }
    if sniffed.is_none() {
        let again = parse("cam-1", frame.encode_to_vec().into(), MAX_METADATA);
        assert_eq!(
            again.as_ref(),
            Ok(&frame),
            "re-encoded envelope parses the same"
        );
    }
});
