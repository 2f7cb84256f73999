//! Camera ids from MQTT topics: `topic::classify`, `camera_id`, `why_invalid`.
//!
//! Input: UTF-8 text, the topic on the first line and up to four filters on the next ones.
//! Checks: never a panic; a camera id is a valid, safe path component and one level of the
//! topic, and `camera_id` agrees with `classify`; a bad camera id is not valid, and the reason
//! given for it is short.
#![no_main]

use fovea::ingress::topic::{TopicMatch, camera_id, classify, is_valid_camera_id, why_invalid};
use fovea_fuzz as _;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // MQTT topics are UTF-8: the client refuses anything else before fovea sees it.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let topic = lines.next().unwrap_or_default();
    let filters: Vec<String> = lines.take(4).map(str::to_string).collect();
    let class = classify(&filters, topic);
    match class {
        TopicMatch::Camera(id) => {
            assert!(is_valid_camera_id(id));
            assert!(!id.is_empty() && !id.starts_with('.') && !id.contains('/'));
            assert!(topic.split('/').any(|level| level == id));
            assert_eq!(camera_id(&filters, topic), Some(id));
        }
        TopicMatch::BadCamera(id) => {
            assert!(!is_valid_camera_id(id));
            assert!(topic.split('/').any(|level| level == id));
            assert_eq!(camera_id(&filters, topic), None);
            let why = why_invalid(id);
            // 64 characters at most, each escaped to at most 10 (`\u{10ffff}`), and the reason.
            assert!(why.len() <= 64 * 10 + 80, "{why}");
        }
        TopicMatch::NoMatch => assert_eq!(camera_id(&filters, topic), None),
    }
});
