//! Model tests: the real ONNX Runtime (from `ORT_DYLIB_PATH`), the shipped models in `models/`,
//! and real photos from `models/samples`. Without the runtime these tests fail, on purpose.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use fovea_proto::v1::ModelOutput;
use fovea_proto::v1::model_output::Task as ProtoTask;

use super::postprocess::iou;
use super::{Engine, InferenceError, Model, init_runtime, load_models};

const MODELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models");
const IMAGES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/samples");
const CLASSIFIER: &str = "efficientnet-lite0";
const DETECTOR: &str = "ssdlite-person";

fn runtime() {
    let lib = std::env::var_os("ORT_DYLIB_PATH")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| {
            panic!(
                "ORT_DYLIB_PATH is not set: the model tests need the real ONNX Runtime. Run \
                 scripts/install-deps.sh and set ORT_DYLIB_PATH to the libonnxruntime.so.1.31.1 \
                 it installs"
            )
        });
    if let Err(e) = init_runtime(Path::new(&lib)) {
        panic!("{e} (run scripts/install-deps.sh)");
    }
}

fn models() -> Vec<Arc<Model>> {
    let dirs = [CLASSIFIER, DETECTOR].map(|m| PathBuf::from(MODELS).join(m));
    load_models(&dirs).expect("shipped models load")
}

fn engine() -> Engine {
    runtime();
    Engine::new(&models(), 1).expect("sessions for the shipped models")
}

fn photo(name: &str) -> image::DynamicImage {
    let path = Path::new(IMAGES).join(name);
    image::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// First name of an ImageNet label: "tabby, tabby cat" -> "tabby".
fn top1(out: &ModelOutput) -> (&str, f32) {
    let c = out.classifications.first().expect("at least one class");
    (c.label.split(',').next().unwrap_or_default(), c.score)
}

#[test]
fn classifies_chelsea_as_a_cat() {
    let out = engine()
        .run(CLASSIFIER, &photo("chelsea.png"))
        .expect("run");
    let (label, score) = top1(&out);
    assert!(
        ["Egyptian cat", "tabby", "tiger cat"].contains(&label),
        "{out:?}"
    );
    // The reference output (models/README.md) is "Egyptian cat" 0.80 with resize = "stretch".
    assert!((score - 0.80).abs() < 0.05, "{out:?}");
    assert_eq!(out.classifications.len(), 5);
    assert!(
        out.classifications
            .windows(2)
            .all(|w| w[0].score >= w[1].score)
    );
    assert_eq!(out.task, ProtoTask::Classification as i32);
    assert_eq!(
        (out.model.as_str(), out.model_version.as_str()),
        (CLASSIFIER, "1")
    );
    assert_eq!(out.model_sha256.len(), 64);
    assert!(out.inference_us > 0);
}

#[test]
fn classifies_coffee_as_espresso() {
    let out = engine().run(CLASSIFIER, &photo("coffee.png")).expect("run");
    let (label, score) = top1(&out);
    assert!(["espresso", "cup"].contains(&label), "{out:?}");
    // Reference: "espresso" 0.86.
    assert!((score - 0.86).abs() < 0.05, "{out:?}");
}

#[test]
fn detects_the_astronaut() {
    let out = engine()
        .run(DETECTOR, &photo("astronaut.png"))
        .expect("run");
    assert_eq!(out.task, ProtoTask::Detection as i32);
    let best = out
        .detections
        .iter()
        .filter(|d| d.label == "person")
        .map(|d| iou(&[d.x0, d.y0, d.x1, d.y1], &[5.0, 32.0, 377.0, 509.0]))
        .fold(0.0, f32::max);
    assert!(best >= 0.5, "no person box near [5,32,377,509]: {out:?}");
    assert!(out.detections.iter().all(|d| d.score >= 0.5));
}

#[test]
fn boxes_are_in_source_pixels_when_the_frame_is_scaled_down() {
    let mut engine = engine();
    let small = engine
        .run(DETECTOR, &photo("astronaut.png"))
        .expect("run 512px");
    // Twice the size: fit scales it back to 512, boxes must come back twice as large.
    let big =
        photo("astronaut.png").resize_exact(1024, 1024, image::imageops::FilterType::Triangle);
    let large = engine.run(DETECTOR, &big).expect("run 1024px");
    let (a, b) = (&small.detections[0], &large.detections[0]);
    let doubled = [a.x0 * 2.0, a.y0 * 2.0, a.x1 * 2.0, a.y1 * 2.0];
    assert!(
        iou(&doubled, &[b.x0, b.y0, b.x1, b.y1]) > 0.9,
        "{a:?} vs {b:?}"
    );
}

#[test]
fn runs_both_models_on_rocket_and_odd_images() {
    let mut engine = engine();
    let odd = [
        photo("rocket.jpg"),
        image::DynamicImage::ImageRgb8(image::RgbImage::new(1, 1)),
        image::DynamicImage::ImageLuma8(image::GrayImage::new(3000, 7)),
        image::DynamicImage::ImageRgba8(image::RgbaImage::new(17, 640)),
    ];
    for img in &odd {
        for model in [CLASSIFIER, DETECTOR] {
            let out = engine.run(model, img);
            assert!(
                out.is_ok(),
                "{model} on {}x{}: {out:?}",
                img.width(),
                img.height()
            );
        }
    }
    let empty = image::DynamicImage::ImageRgb8(image::RgbImage::new(0, 0));
    let e = engine.run(DETECTOR, &empty).expect_err("empty image");
    assert!(matches!(e, InferenceError::Image { .. }), "{e}");
    let e = engine.run("nope", &odd[0]).expect_err("unknown model");
    assert!(matches!(e, InferenceError::UnknownModel { .. }), "{e}");
}

#[test]
fn engine_rejects_manifests_that_do_not_match_the_model() {
    runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = PathBuf::from(MODELS).join(CLASSIFIER);
    let manifest = std::fs::read_to_string(src.join("manifest.toml")).expect("manifest");
    let manifest = manifest.replace(
        "file = \"model.onnx\"",
        &format!("file = {:?}", src.join("model.onnx").display().to_string()),
    );
    let labels = std::fs::read_to_string(src.join("labels.txt")).expect("labels");
    let short: String = labels.lines().take(999).map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.path().join("labels.txt"), short).expect("write labels");

    let cases = [
        (manifest.clone(), "999 labels"),
        (
            manifest.replace("name = \"input\"", "name = \"image\""),
            "not an input",
        ),
        (
            manifest.replace("width = 224", "width = 300"),
            "does not match",
        ),
        (
            manifest
                .replace("dtype = \"f32\"", "dtype = \"u8\"\n")
                .replace("scale = 0.00392156862745098", "")
                .replace("mean = [0.485, 0.456, 0.406]", "")
                .replace("std = [0.229, 0.224, 0.225]", ""),
            "manifest says U8",
        ),
        (
            manifest.replace("logits = \"logits\"", "logits = \"scores\""),
            "not an output",
        ),
    ];
    for (text, expected) in cases {
        std::fs::write(dir.path().join("manifest.toml"), &text).expect("write manifest");
        let model = Arc::new(Model::load(dir.path()).expect("manifest itself is valid"));
        let e = Engine::new(&[model], 1)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains(expected), "expected {expected:?} in error {e:?}");
    }
}

#[test]
fn engine_can_move_to_a_worker_thread() {
    fn assert_send<T: Send>() {}
    assert_send::<Engine>();
    assert_send::<Arc<Model>>();
}

#[test]
fn init_runtime_reports_a_missing_library() {
    let e = init_runtime(Path::new("/nonexistent/libonnxruntime.so")).expect_err("missing");
    assert!(matches!(e, InferenceError::RuntimeMissing { .. }), "{e}");
    assert!(e.to_string().contains("scripts/install-deps.sh"), "{e}");
}

/// Per-image latency, one intra-op thread. A measurement, not a check: run with
/// `cargo test --release -p fovea --lib inference::tests::latency -- --ignored --nocapture`.
#[test]
#[ignore = "measurement; run explicitly in a release build"]
fn latency() {
    let mut engine = engine();
    for (model, name) in [
        (CLASSIFIER, "chelsea.png"),
        (CLASSIFIER, "coffee.png"),
        (DETECTOR, "astronaut.png"),
        (DETECTOR, "rocket.jpg"),
    ] {
        let img = photo(name);
        engine.run(model, &img).expect("warm-up");
        let runs = 20;
        let start = Instant::now();
        let mut inference_us = 0;
        for _ in 0..runs {
            inference_us += engine.run(model, &img).expect("run").inference_us;
        }
        let wall = start.elapsed().as_secs_f64() * 1000.0 / f64::from(runs);
        let reported = inference_us as f64 / 1000.0 / f64::from(runs);
        println!("{model} {name}: {wall:.1} ms/image (inference_us {reported:.1} ms)");
    }
}
