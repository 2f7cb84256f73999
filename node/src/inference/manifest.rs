//! `manifest.toml`: what a model folder holds and how to feed and read the model.
//!
//! The schema is documented for users in `models/README.md`. Parsing is strict
//! (`deny_unknown_fields`): a misspelt key is an error naming the file and the key, never a
//! silently ignored setting. Loading a model reads its labels and hashes its .onnx file; it does
//! not create an ONNX Runtime session (that is [`super::Engine`]'s job, once per worker).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::InferenceError;

/// Name of the manifest file inside a model folder.
pub const MANIFEST_FILE: &str = "manifest.toml";

/// What a model does, which decides how its outputs are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Classification,
    Detection,
}

impl Task {
    /// The value of `ModelOutput.task` for this task.
    pub fn to_proto(self) -> fovea_proto::v1::model_output::Task {
        match self {
            Task::Classification => fovea_proto::v1::model_output::Task::Classification,
            Task::Detection => fovea_proto::v1::model_output::Task::Detection,
        }
    }
}

/// A model described by its manifest: metadata only (no ONNX Runtime session), cheap to share
/// between workers behind an `Arc`.
#[derive(Clone, Debug)]
pub struct Model {
    /// Unique name; routes and results refer to the model by it.
    pub name: String,
    /// Version of the weights, from the manifest; written into every result.
    pub version: String,
    /// Hex SHA-256 of the .onnx file, so that a result can be traced to the exact weights.
    pub sha256: String,
    pub task: Task,
    /// Class labels; index = class id as the model emits it.
    pub labels: Vec<String>,
    /// The model folder (holds `manifest.toml`); used in error messages.
    pub dir: PathBuf,
    /// The .onnx file, resolved against `dir`.
    pub onnx_path: PathBuf,
    /// How an image becomes the input tensor.
    pub input: InputSpec,
    /// Where the results are in the outputs.
    pub output: OutputSpec,
    /// Filtering of the results.
    pub postprocess: Postprocess,
}

/// `[input]`: the input tensor and how to fill it from an RGB image.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Name of the graph input.
    pub name: String,
    pub layout: Layout,
    pub dtype: DType,
    pub resize: Resize,
    /// Fixed input size (`stretch`, `center_crop`).
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Longest side for `fit`: larger images are scaled down to it (never up).
    pub max_side: Option<u32>,
    /// Pixel values (0..=255) are multiplied by `scale`, then `(v - mean) / std` per channel.
    #[serde(default = "one")]
    pub scale: f32,
    #[serde(default)]
    pub mean: [f32; 3],
    #[serde(default = "ones")]
    pub std: [f32; 3],
}

/// Order of the input tensor's axes (batch is always 1, channels are RGB).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    Nchw,
    Nhwc,
}

/// Element type of the input tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    F32,
    U8,
}

/// How the source image is brought to the input size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resize {
    /// Scale both axes to `width` x `height`, ignoring the aspect ratio.
    Stretch,
    /// Take the largest centred region with the aspect ratio of `width` x `height`, then scale it.
    CenterCrop,
    /// Keep the aspect ratio; scale down so that the longest side is at most `max_side`.
    Fit,
}

/// `[output]`, read according to the manifest's `task`.
#[derive(Clone, Debug, PartialEq)]
pub enum OutputSpec {
    Classification(ClassificationOutput),
    Detection(DetectionOutput),
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassificationOutput {
    /// Output holding one score per class, shape `[1, classes]`.
    pub logits: String,
    /// Apply softmax (the output holds logits). Required: it changes what `min_score` means.
    pub softmax: bool,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectionOutput {
    /// Boxes, `[1, N, 4]`, in `box_format`.
    pub boxes: String,
    /// Scores: `[1, N]` together with `classes`, or `[1, N, C]` (class = best column).
    pub scores: String,
    /// Class ids per box, `[1, N]` (float or integer). Without it: see `scores`.
    pub classes: Option<String>,
    /// Number of valid boxes, `[1]`; without it all N boxes are read.
    pub count: Option<String>,
    pub box_format: BoxFormat,
    /// The graph already did non-maximum suppression. If false, fovea runs greedy per-class NMS
    /// with `postprocess.iou_threshold`. Required: forgetting NMS floods results with duplicates.
    pub nms_in_graph: bool,
}

/// Coordinate convention of a detection model's boxes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BoxFormat {
    /// `ymin, xmin, ymax, xmax` in 0..1 of the input image (TensorFlow object detection API).
    YxyxNormalized,
    /// `xmin, ymin, xmax, ymax` in 0..1 of the input image.
    XyxyNormalized,
    /// `xmin, ymin, xmax, ymax` in pixels of the model's input tensor.
    XyxyPixels,
}

/// `[postprocess]`: which results are kept.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Postprocess {
    /// Most results kept: classes for classification, boxes for detection.
    pub top_k: usize,
    /// Results scoring below this are dropped.
    pub min_score: f32,
    /// Overlap above which a lower-scoring box of the same class is suppressed. Only for
    /// detection with `nms_in_graph = false` (default 0.5 there; an error elsewhere).
    pub iou_threshold: Option<f32>,
}

impl Default for Postprocess {
    fn default() -> Self {
        Postprocess {
            top_k: 5,
            min_score: 0.0,
            iou_threshold: None,
        }
    }
}

fn one() -> f32 {
    1.0
}

fn ones() -> [f32; 3] {
    [1.0; 3]
}

/// The manifest file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    name: String,
    version: String,
    task: Task,
    file: PathBuf,
    labels: PathBuf,
    input: InputSpec,
    output: toml::Table,
    #[serde(default)]
    postprocess: Postprocess,
}

/// A parsed and checked manifest, before its files are read.
#[derive(Debug)]
pub(crate) struct Manifest {
    pub name: String,
    pub version: String,
    pub task: Task,
    pub file: PathBuf,
    pub labels: PathBuf,
    pub input: InputSpec,
    pub output: OutputSpec,
    pub postprocess: Postprocess,
}

/// Parses and validates manifest text; `path` is only used in error messages.
pub(crate) fn parse_manifest(text: &str, path: &Path) -> Result<Manifest, InferenceError> {
    let err = |detail: String| InferenceError::Manifest {
        path: path.to_path_buf(),
        detail,
    };
    let raw: ManifestFile = toml::from_str(text).map_err(|e| err(e.to_string()))?;
    let output = match raw.task {
        Task::Classification => raw.output.try_into().map(OutputSpec::Classification),
        Task::Detection => raw.output.try_into().map(OutputSpec::Detection),
    }
    .map_err(|e: toml::de::Error| err(format!("[output]: {}", e.message())))?;
    let manifest = Manifest {
        name: raw.name,
        version: raw.version,
        task: raw.task,
        file: raw.file,
        labels: raw.labels,
        input: raw.input,
        output,
        postprocess: raw.postprocess,
    };
    let problems = validate(&manifest);
    if problems.is_empty() {
        Ok(manifest)
    } else {
        Err(err(problems.join("; ")))
    }
}

/// Every problem of a syntactically valid manifest (empty = valid).
fn validate(m: &Manifest) -> Vec<String> {
    let mut p = Vec::new();
    for (key, value) in [("name", &m.name), ("version", &m.version)] {
        let ok = !value.is_empty()
            && value.len() <= 64
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !ok {
            p.push(format!(
                "{key} {value:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"
            ));
        }
    }
    let i = &m.input;
    match i.resize {
        Resize::Stretch | Resize::CenterCrop => {
            for (key, v) in [("width", i.width), ("height", i.height)] {
                if !matches!(v, Some(1..=8192)) {
                    p.push(format!(
                        "[input] {key} (1..=8192) is required with this resize"
                    ));
                }
            }
            if i.max_side.is_some() {
                p.push("[input] max_side is only for resize = \"fit\"".into());
            }
        }
        Resize::Fit => {
            if !matches!(i.max_side, Some(1..=8192)) {
                p.push("[input] max_side (1..=8192) is required with resize = \"fit\"".into());
            }
            if i.width.is_some() || i.height.is_some() {
                p.push(
                    "[input] width/height are not used with resize = \"fit\"; use max_side".into(),
                );
            }
        }
    }
    if !(i.scale.is_finite() && i.scale > 0.0) {
        p.push("[input] scale must be a positive number".into());
    }
    if i.mean.iter().any(|v| !v.is_finite()) || i.std.iter().any(|v| !v.is_finite() || *v == 0.0) {
        p.push("[input] mean must be finite and std finite and non-zero".into());
    }
    if i.dtype == DType::U8 && (i.scale != 1.0 || i.mean != [0.0; 3] || i.std != [1.0; 3]) {
        p.push("[input] dtype = \"u8\" takes raw pixels: remove scale/mean/std".into());
    }
    let post = &m.postprocess;
    if post.top_k == 0 {
        p.push("[postprocess] top_k must be at least 1".into());
    }
    if !post.min_score.is_finite() {
        p.push("[postprocess] min_score must be a finite number".into());
    }
    let nms_here = matches!(&m.output, OutputSpec::Detection(d) if !d.nms_in_graph);
    match post.iou_threshold {
        Some(t) if !nms_here => p.push(format!(
            "[postprocess] iou_threshold = {t} only applies to detection with nms_in_graph = false"
        )),
        Some(t) if !(t > 0.0 && t <= 1.0) => {
            p.push("[postprocess] iou_threshold must be in (0, 1]".into())
        }
        _ => {}
    }
    p
}

impl Model {
    /// Reads `dir/manifest.toml`, the labels file, and hashes the .onnx file.
    pub fn load(dir: &Path) -> Result<Model, InferenceError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let text =
            std::fs::read_to_string(&manifest_path).map_err(|e| InferenceError::Manifest {
                path: manifest_path.clone(),
                detail: format!("cannot read: {e}"),
            })?;
        let m = parse_manifest(&text, &manifest_path)?;
        let labels = read_labels(&dir.join(&m.labels), &manifest_path)?;
        let onnx_path = dir.join(&m.file);
        let sha256 = sha256_file(&onnx_path)?;
        let mut postprocess = m.postprocess;
        if matches!(&m.output, OutputSpec::Detection(d) if !d.nms_in_graph) {
            postprocess.iou_threshold.get_or_insert(0.5);
        }
        Ok(Model {
            name: m.name,
            version: m.version,
            sha256,
            task: m.task,
            labels,
            dir: dir.to_path_buf(),
            onnx_path,
            input: m.input,
            output: m.output,
            postprocess,
        })
    }

    /// The label of a class id, or "" when the labels file has no such line.
    pub fn label(&self, class_id: u32) -> &str {
        self.labels
            .get(class_id as usize)
            .map_or("", String::as_str)
    }
}

/// Loads every model folder; model names must be unique.
pub fn load_models(dirs: &[PathBuf]) -> Result<Vec<Arc<Model>>, InferenceError> {
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    let mut models = Vec::with_capacity(dirs.len());
    for dir in dirs {
        let model = Model::load(dir)?;
        if let Some(first) = seen.insert(model.name.clone(), dir.clone()) {
            return Err(InferenceError::DuplicateModel {
                name: model.name,
                first,
                second: dir.clone(),
            });
        }
        models.push(Arc::new(model));
    }
    Ok(models)
}

/// One label a line; a trailing empty line is ignored; at least one label.
fn read_labels(path: &Path, manifest: &Path) -> Result<Vec<String>, InferenceError> {
    let text = std::fs::read_to_string(path).map_err(|e| InferenceError::Manifest {
        path: manifest.to_path_buf(),
        detail: format!("labels file {}: {e}", path.display()),
    })?;
    let labels: Vec<String> = text.lines().map(|l| l.trim_end().to_string()).collect();
    if labels.iter().all(String::is_empty) {
        return Err(InferenceError::Manifest {
            path: manifest.to_path_buf(),
            detail: format!("labels file {} has no labels", path.display()),
        });
    }
    Ok(labels)
}

/// Hex SHA-256 of a file, read in blocks.
fn sha256_file(path: &Path) -> Result<String, InferenceError> {
    let io_err = |source| InferenceError::ModelFile {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(io_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLASSIFIER: &str = r#"
name = "clf"
version = "1"
task = "classification"
file = "model.onnx"
labels = "labels.txt"
[input]
name = "input"
layout = "nchw"
dtype = "f32"
resize = "stretch"
width = 4
height = 4
[output]
logits = "logits"
softmax = true
"#;

    fn error_of(text: &str) -> String {
        match parse_manifest(text, Path::new("/m/manifest.toml")) {
            Ok(m) => panic!("expected an error, parsed {m:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_a_minimal_manifest_with_defaults() {
        let m = parse_manifest(CLASSIFIER, Path::new("m.toml")).expect("valid manifest");
        assert_eq!(m.task, Task::Classification);
        assert_eq!(m.input.std, [1.0; 3]);
        assert_eq!(m.postprocess, Postprocess::default());
        assert!(matches!(m.output, OutputSpec::Classification(ref c) if c.softmax));
    }

    #[test]
    fn rejects_unknown_keys_naming_file_and_key() {
        let e = error_of(&CLASSIFIER.replace("task =", "colour = 1\ntask ="));
        assert!(
            e.contains("/m/manifest.toml") && e.contains("colour"),
            "{e}"
        );
        let e =
            error_of(&CLASSIFIER.replace("softmax = true", "softmax = true\nnms_in_graph = true"));
        assert!(e.contains("[output]") && e.contains("nms_in_graph"), "{e}");
        let e = error_of(&CLASSIFIER.replace("[input]", "[input]\nmeans = [0, 0, 0]"));
        assert!(e.contains("means"), "{e}");
    }

    #[test]
    fn reports_every_invalid_value() {
        let text = CLASSIFIER
            .replace("name = \"clf\"", "name = \"a b\"")
            .replace("resize = \"stretch\"", "resize = \"fit\"")
            .replace(
                "softmax = true",
                "softmax = true\n[postprocess]\ntop_k = 0\niou_threshold = 0.5",
            );
        let e = error_of(&text);
        for part in [
            "name \"a b\"",
            "max_side",
            "width/height",
            "top_k",
            "iou_threshold",
        ] {
            assert!(e.contains(part), "{part:?} missing from: {e}");
        }
        let e = error_of(&CLASSIFIER.replace("dtype = \"f32\"", "dtype = \"u8\"\nscale = 0.5"));
        assert!(e.contains("u8"), "{e}");
        let e = error_of(&CLASSIFIER.replace("task = \"classification\"", "task = \"detection\""));
        assert!(e.contains("[output]") && e.contains("boxes"), "{e}");
    }

    #[test]
    fn missing_labels_file_and_duplicate_names_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a");
        std::fs::create_dir(&a).expect("mkdir");
        std::fs::write(a.join(MANIFEST_FILE), CLASSIFIER).expect("write manifest");
        std::fs::write(a.join("model.onnx"), b"not really onnx").expect("write model");
        let e = Model::load(&a)
            .expect_err("labels.txt is missing")
            .to_string();
        assert!(
            e.contains("manifest.toml") && e.contains("labels.txt"),
            "{e}"
        );

        std::fs::write(a.join("labels.txt"), "cat\ndog\n").expect("write labels");
        let model = Model::load(&a).expect("loads");
        assert_eq!(model.labels, vec!["cat", "dog"]);
        assert_eq!(
            model.sha256,
            hex::encode(Sha256::digest(b"not really onnx"))
        );
        assert_eq!((model.label(1), model.label(7)), ("dog", ""));

        let b = dir.path().join("b");
        std::fs::create_dir(&b).expect("mkdir");
        for f in [MANIFEST_FILE, "labels.txt", "model.onnx"] {
            std::fs::copy(a.join(f), b.join(f)).expect("copy");
        }
        let e = load_models(&[a, b]).expect_err("same name twice");
        assert!(matches!(e, InferenceError::DuplicateModel { ref name, .. } if name == "clf"));
    }

    #[test]
    fn loads_the_shipped_models() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let models = load_models(&[root.join("efficientnet-lite0"), root.join("ssdlite-person")])
            .expect("shipped manifests are valid");
        assert_eq!(models[0].labels.len(), 1000);
        assert_eq!(models[1].labels.len(), 91);
        assert_eq!(models[1].label(1), "person");
        assert!(models.iter().all(|m| m.sha256.len() == 64));
    }
}
