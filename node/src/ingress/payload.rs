//! What a camera's MQTT payload is: a bare JPEG/PNG, or a protobuf `Frame` envelope around one.
//!
//! Bare images are recognised by their magic bytes; anything else must decode as a `Frame` whose
//! `data` is a JPEG or PNG. The result is a [`Frame`] with the image bytes untouched (fovea stores
//! exactly what the camera sent) and a stable frame id for the record id.

pub use crate::job::Rejection;
use crate::job::sha256_hex;
use bytes::Bytes;
use fovea_proto::v1::Frame;
use prost::Message;

pub const JPEG: &str = "image/jpeg";
pub const PNG: &str = "image/png";

/// Sniffs the MIME type of an encoded image from its magic bytes.
pub fn sniff(data: &[u8]) -> Option<&'static str> {
    if data.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(JPEG)
    } else if data.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(PNG)
    } else {
        None
    }
}

/// Turns a payload published by `camera` into a [`Frame`] (not yet decoded: that is the workers'
/// job, off the I/O threads). Sets `camera_id` and `content_type`; fovea's own fields stay unset,
/// whatever an envelope put in them. An envelope whose metadata exceeds `max_metadata_bytes` is
/// refused.
pub fn parse(camera: &str, payload: Bytes, max_metadata_bytes: usize) -> Result<Frame, Rejection> {
    if payload.is_empty() {
        return Err(Rejection::Empty);
    }
    if let Some(content_type) = sniff(&payload) {
        return Ok(Frame {
            camera_id: camera.to_string(),
            content_type: content_type.to_string(),
            data: payload,
            ..Frame::default()
        });
    }
    let sent = Frame::decode(payload.clone()).map_err(|_| unrecognised(&payload))?;
    if sent.data.is_empty() {
        // A payload of random bytes can decode as an empty protobuf message; call it what it is.
        return Err(if sent == Frame::default() {
            unrecognised(&payload)
        } else {
            Rejection::EnvelopeEmpty
        });
    }
    // The camera's fields only: fovea's own (record id, node, sides, receive time, claim check)
    // are fovea's to set, whatever an envelope says (found by fuzz/fuzz_targets/payload.rs).
    let mut frame = Frame {
        camera_id: sent.camera_id,
        sequence: sent.sequence,
        captured_at_ms: sent.captured_at_ms,
        content_type: sent.content_type,
        data: sent.data,
        metadata: sent.metadata,
        ..Frame::default()
    };
    if !frame.camera_id.is_empty() && frame.camera_id != camera {
        return Err(Rejection::CameraMismatch {
            envelope: frame.camera_id,
            topic: camera.to_string(),
        });
    }
    let bytes: usize = frame.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > max_metadata_bytes {
        return Err(Rejection::MetadataTooLarge {
            bytes,
            entries: frame.metadata.len(),
            limit: max_metadata_bytes,
        });
    }
    let sniffed = sniff(&frame.data).ok_or_else(|| unrecognised(&frame.data))?;
    if !frame.content_type.is_empty() && frame.content_type != sniffed {
        return Err(Rejection::UnsupportedType(frame.content_type));
    }
    frame.camera_id = camera.to_string();
    frame.content_type = sniffed.to_string();
    Ok(frame)
}

fn unrecognised(data: &[u8]) -> Rejection {
    Rejection::Unrecognised(hex::encode(&data[..data.len().min(8)]))
}

/// The frame's id within its camera: the camera's own sequence number when it sent one, else the
/// first 16 hex digits of the image's SHA-256. Either way a redelivered frame gets the same id,
/// which is what lets consumers deduplicate after at-least-once delivery.
pub fn frame_id(frame: &Frame) -> String {
    if frame.sequence != 0 {
        format!("s{}", frame.sequence)
    } else {
        format!("h{}", &sha256_hex(&frame.data)[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::record_id;

    const TINY_JPEG: &[u8] = &[0xFF, 0xD8, 0xFF, 0xE0, 0, 0x10];

    #[test]
    fn bare_images_are_sniffed() {
        let f = parse("c1", Bytes::from_static(TINY_JPEG), 1 << 16).unwrap();
        assert_eq!(f.content_type, JPEG);
        assert_eq!(f.camera_id, "c1");
        assert_eq!(&f.data[..], TINY_JPEG);
        let png = parse("c1", Bytes::from_static(b"\x89PNG\r\n\x1a\nrest"), 1 << 16).unwrap();
        assert_eq!(png.content_type, PNG);
    }

    #[test]
    fn envelope_keeps_camera_metadata() {
        let env = Frame {
            sequence: 42,
            captured_at_ms: 7,
            data: Bytes::from_static(TINY_JPEG),
            metadata: [("site".to_string(), "dock".to_string())].into(),
            ..Frame::default()
        };
        let f = parse("c1", env.encode_to_vec().into(), 1 << 16).unwrap();
        assert_eq!((f.sequence, f.captured_at_ms), (42, 7));
        assert_eq!(f.metadata["site"], "dock");
        assert_eq!(f.content_type, JPEG);
        assert_eq!(frame_id(&f), "s42");
    }

    #[test]
    fn metadata_over_the_limit_is_refused_with_its_size() {
        let env = Frame {
            data: Bytes::from_static(TINY_JPEG),
            metadata: (0..40)
                .map(|i| (format!("k{i:02}"), "v".repeat(50_000)))
                .collect(),
            ..Frame::default()
        };
        let err = parse("c1", env.encode_to_vec().into(), 1 << 16).unwrap_err();
        assert_eq!(err.kind(), "metadata-too-large");
        assert_eq!(
            err.to_string(),
            "camera metadata of 2000120 bytes in 40 entries exceeds mqtt.max_metadata_bytes (65536)"
        );
        assert!(parse("c1", env.encode_to_vec().into(), 2 << 20).is_ok());
    }

    #[test]
    fn bad_payloads_are_rejected_with_a_kind() {
        assert_eq!(
            parse("c", Bytes::new(), 1 << 16).unwrap_err().kind(),
            "empty-payload"
        );
        let junk = parse("c", Bytes::from_static(b"\xff\xff\xff\xffhello"), 1 << 16).unwrap_err();
        assert_eq!(junk.kind(), "unrecognised-payload");
        let text = parse("c", Bytes::from_static(b"hello world"), 1 << 16).unwrap_err();
        assert_eq!(text.kind(), "unrecognised-payload");
        let other_cam = Frame {
            camera_id: "c2".into(),
            data: Bytes::from_static(TINY_JPEG),
            ..Frame::default()
        };
        let err = parse("c1", other_cam.encode_to_vec().into(), 1 << 16).unwrap_err();
        assert_eq!(err.kind(), "camera-mismatch");
        let no_image = Frame {
            captured_at_ms: 5,
            ..Frame::default()
        };
        let err = parse("c1", no_image.encode_to_vec().into(), 1 << 16).unwrap_err();
        assert_eq!(err.kind(), "empty-envelope");
    }

    /// An envelope that sets fovea's own fields: the fuzz target's first crash, a width of 64
    /// (field 8, fourteen times over) around a 4-byte JPEG, then the fields one by one.
    #[test]
    fn envelope_cannot_set_fovea_fields() {
        let mut crash = vec![0x40; 14];
        crash.extend([0x2a, 0x04, 0xff, 0xd8, 0xff, 0xe0]);
        crash.extend([0x40; 12]);
        let f = parse("c1", crash.into(), 1 << 16).unwrap();
        assert_eq!((f.width, &f.data[..]), (0, &[0xff, 0xd8, 0xff, 0xe0][..]));

        let env = Frame {
            sequence: 3,
            data: Bytes::from_static(TINY_JPEG),
            record_id: "other/c1/s3".into(),
            node_id: "other".into(),
            width: 640,
            height: 480,
            received_at_ms: 99,
            claim: Some(fovea_proto::v1::ClaimCheck {
                url: "http://elsewhere/blobs/x".into(),
                sha256: "x".into(),
                size: 1,
            }),
            ..Frame::default()
        };
        let f = parse("c1", env.encode_to_vec().into(), 1 << 16).unwrap();
        let expected = Frame {
            camera_id: "c1".into(),
            sequence: 3,
            content_type: JPEG.into(),
            data: Bytes::from_static(TINY_JPEG),
            ..Frame::default()
        };
        assert_eq!(f, expected);
    }

    #[test]
    fn content_hash_id_is_stable() {
        let a = parse("c", Bytes::from_static(TINY_JPEG), 1 << 16).unwrap();
        let b = parse("c", Bytes::from_static(TINY_JPEG), 1 << 16).unwrap();
        assert_eq!(frame_id(&a), frame_id(&b));
        assert!(frame_id(&a).starts_with('h'));
        assert_eq!(record_id("n", "c", "s1"), "n/c/s1");
    }
}
