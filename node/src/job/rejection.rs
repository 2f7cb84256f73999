//! Why a payload is not a frame: the dead-letter kinds of payloads refused at the door.

/// Why a payload is not a frame. Each is dead-lettered with [`Rejection::kind`] and its message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("empty payload")]
    Empty,
    #[error("payload of {size} bytes exceeds mqtt.max_frame_bytes ({limit})")]
    TooLarge { size: usize, limit: usize },
    #[error("payload is neither a JPEG, a PNG nor a fovea.v1.Frame envelope (first bytes: {0})")]
    Unrecognised(String),
    #[error("Frame envelope holds no image data")]
    EnvelopeEmpty,
    #[error("Frame envelope content_type {0:?} is not image/jpeg or image/png")]
    UnsupportedType(String),
    #[error("Frame envelope names camera {envelope:?} but was published for camera {topic:?}")]
    CameraMismatch { envelope: String, topic: String },
    #[error("topic {0:?} does not name a camera under any subscribed filter")]
    BadTopic(String),
    /// The topic matched a subscribed filter, but its camera level is not a safe camera id.
    #[error("topic {topic:?} names camera {why}")]
    BadCameraId { topic: String, why: String },
    #[error("image could not be decoded: {0}")]
    Decode(String),
    #[error("image is {width}x{height} pixels; the minimum is {min}x{min}")]
    TooSmall { width: u32, height: u32, min: u32 },
    #[error(
        "image is {width}x{height} pixels; at most {max_side} a side and {max_pixels} pixels are allowed (inference.max_image_side, inference.max_image_pixels)"
    )]
    TooManyPixels {
        width: u32,
        height: u32,
        max_side: u32,
        max_pixels: u64,
    },
    #[error("{0}")]
    Truncated(String),
    #[error(
        "camera metadata of {bytes} bytes in {entries} entries exceeds mqtt.max_metadata_bytes ({limit})"
    )]
    MetadataTooLarge {
        bytes: usize,
        entries: usize,
        limit: usize,
    },
    #[error("chunked upload: {0}")]
    BadChunk(String),
    #[error("chunked upload incomplete: {0}")]
    ChunksIncomplete(String),
    #[error("chunked upload rejected: {0}")]
    ChunkRejected(String),
    /// The node already knows `mqtt.max_cameras` cameras, none idle long enough to forget.
    #[error(
        "camera {camera:?} is one camera too many: the node knows mqtt.max_cameras ({max}) cameras with frames in the last mqtt.camera_idle_secs"
    )]
    TooManyCameras { camera: String, max: usize },
    /// A worker panicked on this frame (a bug in fovea or a library it uses, not the camera's
    /// fault); the frame is dead-lettered and acked so that it is not redelivered forever.
    #[error("internal error while processing the frame: {0}")]
    Internal(String),
}

impl Rejection {
    /// Machine-readable class, written to the dead letter's `kind` and header.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::Empty => "empty-payload",
            Rejection::MetadataTooLarge { .. } => "metadata-too-large",
            Rejection::TooLarge { .. } => "too-large",
            Rejection::Unrecognised(_) => "unrecognised-payload",
            Rejection::EnvelopeEmpty => "empty-envelope",
            Rejection::UnsupportedType(_) => "unsupported-type",
            Rejection::CameraMismatch { .. } => "camera-mismatch",
            Rejection::BadTopic(_) => "bad-topic",
            Rejection::BadCameraId { .. } => "bad-camera-id",
            Rejection::Decode(_) => "decode-failed",
            Rejection::TooSmall { .. } => "too-small",
            Rejection::TooManyPixels { .. } => "too-many-pixels",
            Rejection::Truncated(_) => "truncated",
            Rejection::BadChunk(_) => "bad-chunk",
            Rejection::ChunksIncomplete(_) => "chunks-incomplete",
            Rejection::ChunkRejected(_) => "chunk-rejected",
            Rejection::TooManyCameras { .. } => "too-many-cameras",
            Rejection::Internal(_) => "internal-error",
        }
    }
}
