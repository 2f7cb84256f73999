#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Pictures in the other forms cameras and photo tools write keep working through the real node
//! (issue 13, item 6: "CMYK, 16-bit and grey images keep working"), with real mosquitto, a real
//! Kafka-protocol broker and the default config: a CMYK JPEG made from chelsea.png
//! (`tests/data/chelsea-cmyk.jpg`, provenance in `tests/data/README.md`) and a 16-bit PNG of the
//! same photo get the RGB original's top-1 label; a grey JPEG of it is inferred (its label may
//! differ: the colour is gone, so only its status is checked).

mod harness;

use fovea_proto::v1::{InferenceResult, inference_result::Status};
use harness::*;
use image::{DynamicImage, ImageFormat};
use prost::Message as _;
use rdkafka::message::Message as _;
use std::collections::HashMap;
use std::io::Cursor;
use std::time::Duration;

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), format).unwrap();
    out
}

/// Components of a baseline or progressive JPEG, from its start-of-frame segment.
fn jpeg_components(jpeg: &[u8]) -> u8 {
    let at = jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xC0] || w == [0xFF, 0xC2])
        .expect("a start-of-frame marker");
    // Marker (2), length (2), precision (1), height (2), width (2), then the component count.
    jpeg[at + 9]
}

#[test]
fn cmyk_16_bit_and_grey_pictures_are_inferred_like_their_rgb_original() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    let _node = Node::start(dir.path(), &node_config(&mqtt, &kafka, ""));
    let original = sample_image("chelsea.png");
    let path = repo_root().join("tests/data/chelsea-cmyk.jpg"); // not a sample photo: tests/data
    let cmyk = std::fs::read(&path).unwrap();
    assert_eq!(jpeg_components(&cmyk), 4, "CMYK: four components");
    let photo = image::load_from_memory(&original).unwrap();
    let deep = encode(
        &DynamicImage::ImageRgb16(photo.to_rgb16()),
        ImageFormat::Png,
    );
    let grey = encode(
        &DynamicImage::ImageLuma8(photo.to_luma8()),
        ImageFormat::Jpeg,
    );
    assert_eq!(jpeg_components(&grey), 1, "grey: one component");
    let t = |c: &str| format!("cameras/{c}/frames");
    publish(
        mqtt.port,
        &[
            (t("rgb"), original),
            (t("cmyk"), cmyk),
            (t("deep16"), deep),
            (t("grey"), grey),
        ],
    );

    let records = kafka.read("fovea.results", 4, Duration::from_secs(90));
    assert_eq!(records.len(), 4);
    let mut top1: HashMap<String, (String, f32)> = HashMap::new();
    for r in &records {
        let result = InferenceResult::decode(r.payload().unwrap()).unwrap();
        assert_eq!(
            result.status(),
            Status::Ok,
            "{}: {}",
            result.camera_id,
            result.status_detail
        );
        let best = &result
            .outputs
            .iter()
            .find(|o| o.model == "efficientnet-lite0")
            .expect("the classifier's output")
            .classifications[0];
        top1.insert(result.camera_id.clone(), (best.label.clone(), best.score));
    }
    println!("top-1 by picture: {top1:?}");
    for camera in ["cmyk", "deep16"] {
        assert_eq!(top1[camera].0, top1["rgb"].0, "{camera}: {top1:?}");
    }
    assert!(top1.contains_key("grey"));
}
