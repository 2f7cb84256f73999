//! ONNX Runtime: loading the library once per process, one session per model per worker, and
//! running a model on an image.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use fovea_proto::v1::{Classification, Detection, ModelOutput};
use ort::environment::Environment;
use ort::session::{Session, SessionInputValue, SessionOutputs};
use ort::value::{DynValue, TensorElementType, TensorRef, ValueType};

use super::InferenceError;
use super::manifest::{
    ClassificationOutput, DType, DetectionOutput, Layout, Model, OutputSpec, Resize,
};
use super::postprocess::{self, DecodeOptions, RawDetections};
use super::preprocess::{self, Geometry};

/// The process's ONNX Runtime environment and the library it was loaded from. ort allows one
/// environment per process; it lives until exit.
static RUNTIME: Mutex<Option<(PathBuf, Environment)>> = Mutex::new(None);

/// Loads ONNX Runtime from `library` (if non-empty) or from env `ORT_DYLIB_PATH`; call once per
/// process (later calls with the same library are no-ops).
pub fn init_runtime(library: &Path) -> Result<(), InferenceError> {
    let path = if library.as_os_str().is_empty() {
        match std::env::var_os("ORT_DYLIB_PATH") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => return Err(InferenceError::RuntimeNotConfigured),
        }
    } else {
        library.to_path_buf()
    };
    let path = std::path::absolute(&path).unwrap_or(path);
    if !path.is_file() {
        return Err(InferenceError::RuntimeMissing { path });
    }
    let mut runtime = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((loaded, _)) = runtime.as_ref() {
        if *loaded == path {
            return Ok(());
        }
        return Err(InferenceError::RuntimeLoad {
            path,
            detail: format!("ONNX Runtime is already loaded from {}", loaded.display()),
        });
    }
    let load_err = |detail: String| InferenceError::RuntimeLoad {
        path: path.clone(),
        detail,
    };
    let env = ort::init_from(&path)
        .map_err(|e| load_err(e.to_string()))?
        .with_name("fovea")
        // The PyPI build reports usage to its vendor and keeps a device id under $HOME/.cache;
        // an edge box has no business doing either. (ORT_DISABLE_TELEMETRY=1, set by the unit
        // and scripts/env.sh, also stops the one event sent while the environment is created.)
        .with_telemetry(false)
        .build()
        .map_err(|e| load_err(e.to_string()))?;
    log::info!("ONNX Runtime loaded from {}", path.display());
    *runtime = Some((path, env));
    Ok(())
}

fn environment() -> Result<Environment, InferenceError> {
    let runtime = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner);
    runtime
        .as_ref()
        .map(|(_, env)| env.clone())
        .ok_or(InferenceError::RuntimeNotInitialised)
}

/// One model's session and its reusable input buffer.
struct ModelSession {
    model: Arc<Model>,
    session: Session,
    /// Input tensor storage, reused across frames (f32 inputs, and u8 NCHW inputs).
    input_f32: Vec<f32>,
    input_u8: Vec<u8>,
}

/// One worker's sessions, one per model.
///
/// ONNX Runtime sessions are not shared between workers so that workers never wait on each
/// other: ort's `Session::run` takes `&mut self`, so a shared session would sit behind a lock.
/// Hence [`Engine::run`] takes `&mut self` too. `Engine` is `Send`: build one per worker (on
/// any thread) and move it into the worker.
pub struct Engine {
    sessions: Vec<ModelSession>,
}

impl Engine {
    /// Creates a session for every model, each using `intra_threads` threads per run (0 = ONNX
    /// Runtime's default, one per core), and checks each model's inputs and outputs against its
    /// manifest. Needs [`init_runtime`] first.
    pub fn new(models: &[Arc<Model>], intra_threads: usize) -> Result<Engine, InferenceError> {
        let env = environment()?;
        let mut sessions = Vec::with_capacity(models.len());
        for model in models {
            let session_err = |detail: String| InferenceError::Session {
                model: model.name.clone(),
                path: model.onnx_path.clone(),
                detail,
            };
            let session = Session::builder(&env)
                .and_then(|b| Ok(b.with_intra_threads(intra_threads)?))
                .and_then(|b| Ok(b.with_inter_threads(1)?))
                // Workers share few cores: idle runtime threads must sleep, not spin.
                .and_then(|b| Ok(b.with_intra_op_spinning(false)?))
                .and_then(|mut b| b.commit_from_file(&model.onnx_path))
                .map_err(|e| session_err(format!("ONNX Runtime cannot load it: {e}")))?;
            check_signature(model, &session).map_err(session_err)?;
            sessions.push(ModelSession {
                model: Arc::clone(model),
                session,
                input_f32: Vec::new(),
                input_u8: Vec::new(),
            });
        }
        Ok(Engine { sessions })
    }

    /// The models this engine runs.
    pub fn models(&self) -> impl Iterator<Item = &Arc<Model>> {
        self.sessions.iter().map(|s| &s.model)
    }

    /// Runs one model on a decoded image; returns the proto output with model name/version/
    /// sha256, task, classifications or detections (boxes in source-image pixels, x0,y0,x1,y1),
    /// and `inference_us` (preprocessing plus the ONNX Runtime call).
    pub fn run(
        &mut self,
        model: &str,
        image: &image::DynamicImage,
    ) -> Result<ModelOutput, InferenceError> {
        let ModelSession {
            model: m,
            session,
            input_f32,
            input_u8,
        } = self
            .sessions
            .iter_mut()
            .find(|s| s.model.name == model)
            .ok_or_else(|| InferenceError::UnknownModel {
                model: model.to_string(),
            })?;
        let start = Instant::now();
        let spec = &m.input;
        let (pixels, geometry) =
            preprocess::prepare(spec, image).map_err(|detail| InferenceError::Image {
                model: m.name.clone(),
                detail,
            })?;
        let shape = preprocess::shape(spec.layout, pixels.width(), pixels.height());
        let run_err = |e: ort::Error| InferenceError::Run {
            model: m.name.clone(),
            detail: e.to_string(),
        };
        let input: SessionInputValue<'_> = match (spec.dtype, spec.layout) {
            (DType::F32, _) => {
                preprocess::fill_f32(spec, &pixels, input_f32);
                TensorRef::from_array_view((shape, input_f32.as_slice())).map(Into::into)
            }
            // The resized RGB8 image already is an NHWC u8 tensor: no copy.
            (DType::U8, Layout::Nhwc) => {
                TensorRef::from_array_view((shape, pixels.as_raw().as_slice())).map(Into::into)
            }
            (DType::U8, Layout::Nchw) => {
                preprocess::fill_u8_planar(&pixels, input_u8);
                TensorRef::from_array_view((shape, input_u8.as_slice())).map(Into::into)
            }
        }
        .map_err(run_err)?;
        let outputs = session
            .run(ort::inputs![spec.name.as_str() => input])
            .map_err(run_err)?;
        let inference_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        let mut out = ModelOutput {
            model: m.name.clone(),
            model_version: m.version.clone(),
            model_sha256: m.sha256.clone(),
            task: m.task.to_proto() as i32,
            inference_us,
            ..ModelOutput::default()
        };
        let output_err = |detail: String| InferenceError::Output {
            model: m.name.clone(),
            detail,
        };
        match &m.output {
            OutputSpec::Classification(c) => {
                out.classifications = classify(m, c, &outputs).map_err(output_err)?;
            }
            OutputSpec::Detection(d) => {
                out.detections = detect(m, d, &outputs, &geometry).map_err(output_err)?;
            }
        }
        Ok(out)
    }
}

fn classify(
    m: &Model,
    spec: &ClassificationOutput,
    outputs: &SessionOutputs,
) -> Result<Vec<Classification>, String> {
    let (_, mut scores) = output_f32(outputs, &spec.logits)?;
    if spec.softmax {
        postprocess::softmax(scores.to_mut());
    }
    let post = &m.postprocess;
    Ok(postprocess::top_k(&scores, post.top_k, post.min_score)
        .into_iter()
        .map(|(id, score)| Classification {
            class_id: id as u32,
            label: m.label(id as u32).to_string(),
            score,
        })
        .collect())
}

fn detect(
    m: &Model,
    spec: &DetectionOutput,
    outputs: &SessionOutputs,
    geometry: &Geometry,
) -> Result<Vec<Detection>, String> {
    let (_, boxes) = output_f32(outputs, &spec.boxes)?;
    let (score_shape, scores) = output_f32(outputs, &spec.scores)?;
    let classes = match &spec.classes {
        Some(name) => Some(output_f32(outputs, name)?.1),
        None => None,
    };
    let count = match &spec.count {
        Some(name) => {
            let (_, c) = output_f32(outputs, name)?;
            let c = c.first().copied().unwrap_or(0.0);
            if c.is_finite() && c > 0.0 {
                c as usize
            } else {
                0
            }
        }
        None => usize::MAX,
    };
    let raw = RawDetections {
        boxes: &boxes,
        scores: &scores,
        num_classes: if score_shape.len() >= 3 {
            score_shape.last().map_or(1, |&d| d.max(1) as usize)
        } else {
            1
        },
        classes: classes.as_deref(),
        count,
    };
    let post = &m.postprocess;
    let options = DecodeOptions {
        format: spec.box_format,
        min_score: post.min_score,
        top_k: post.top_k,
        nms_iou: if spec.nms_in_graph {
            None
        } else {
            post.iou_threshold
        },
    };
    Ok(postprocess::decode_detections(&raw, &options, geometry)
        .into_iter()
        .map(|d| Detection {
            class_id: d.class_id,
            label: m.label(d.class_id).to_string(),
            score: d.score,
            x0: d.bbox[0],
            y0: d.bbox[1],
            x1: d.bbox[2],
            y1: d.bbox[3],
        })
        .collect())
}

/// An output as f32 values (borrowed when the output is f32, converted from integer types),
/// with its shape.
fn output_f32<'o>(
    outputs: &'o SessionOutputs,
    name: &str,
) -> Result<(Vec<i64>, Cow<'o, [f32]>), String> {
    let value: &DynValue = outputs
        .get(name)
        .ok_or_else(|| format!("no output named {name:?}"))?;
    if let Ok((shape, data)) = value.try_extract_tensor::<f32>() {
        return Ok((shape.to_vec(), Cow::Borrowed(data)));
    }
    if let Ok((shape, data)) = value.try_extract_tensor::<i64>() {
        return Ok((shape.to_vec(), data.iter().map(|&v| v as f32).collect()));
    }
    if let Ok((shape, data)) = value.try_extract_tensor::<i32>() {
        return Ok((shape.to_vec(), data.iter().map(|&v| v as f32).collect()));
    }
    Err(format!(
        "output {name:?} is {:?}, expected a float or integer tensor",
        value.dtype()
    ))
}

/// Checks the session's inputs and outputs against the manifest, so that a wrong manifest fails
/// at start-up rather than on every frame.
fn check_signature(m: &Model, session: &Session) -> Result<(), String> {
    let spec = &m.input;
    let input = session
        .inputs()
        .iter()
        .find(|i| i.name() == spec.name)
        .ok_or_else(|| {
            let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
            format!(
                "[input] name {:?} is not an input of the model (inputs: {names:?})",
                spec.name
            )
        })?;
    let (ty, dims) = tensor_info(input.dtype())
        .ok_or_else(|| format!("input {:?} is not a tensor", spec.name))?;
    let want = match spec.dtype {
        DType::F32 => TensorElementType::Float32,
        DType::U8 => TensorElementType::Uint8,
    };
    if ty != want {
        return Err(format!(
            "input {:?} is {ty:?}, manifest says {:?}",
            spec.name, spec.dtype
        ));
    }
    let (c, h, w) = match (dims.len(), spec.layout) {
        (4, Layout::Nchw) => (dims[1], dims[2], dims[3]),
        (4, Layout::Nhwc) => (dims[3], dims[1], dims[2]),
        _ => {
            return Err(format!(
                "input {:?} has shape {dims:?}, expected 4 dimensions",
                spec.name
            ));
        }
    };
    let fits = |d: i64, want: Option<u32>| d < 0 || want.is_some_and(|v| i64::from(v) == d);
    let size_ok = match spec.resize {
        Resize::Fit => h < 0 && w < 0,
        Resize::Stretch | Resize::CenterCrop => fits(h, spec.height) && fits(w, spec.width),
    };
    if !(c < 0 || c == 3) || !(dims[0] < 0 || dims[0] == 1) || !size_ok {
        return Err(format!(
            "input {:?} has shape {dims:?}, which does not match layout {:?} with 3 channels and \
             the manifest's size (resize = \"fit\" needs dynamic height and width)",
            spec.name, spec.layout
        ));
    }
    let mut names: Vec<&str> = Vec::new();
    match &m.output {
        OutputSpec::Classification(c) => names.push(&c.logits),
        OutputSpec::Detection(d) => {
            names.extend([d.boxes.as_str(), d.scores.as_str()]);
            names.extend(d.classes.as_deref());
            names.extend(d.count.as_deref());
        }
    }
    for name in names {
        if !session.outputs().iter().any(|o| o.name() == name) {
            let all: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
            return Err(format!(
                "[output] {name:?} is not an output of the model (outputs: {all:?})"
            ));
        }
    }
    if let OutputSpec::Classification(c) = &m.output {
        let classes = session
            .outputs()
            .iter()
            .find(|o| o.name() == c.logits)
            .and_then(|o| tensor_info(o.dtype()))
            .and_then(|(_, dims)| dims.last().copied())
            .unwrap_or(-1);
        if classes > 0 && classes as usize != m.labels.len() {
            return Err(format!(
                "labels file has {} labels but output {:?} has {classes} classes",
                m.labels.len(),
                c.logits
            ));
        }
    }
    Ok(())
}

fn tensor_info(t: &ValueType) -> Option<(TensorElementType, Vec<i64>)> {
    match t {
        ValueType::Tensor { ty, shape, .. } => Some((*ty, shape.to_vec())),
        _ => None,
    }
}
