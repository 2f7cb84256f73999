//! A spooled record and its on-disk format (version 1, described in the [module doc](super)).
//!
//! [`encode`] and [`decode`] are the only code that touches stored bytes. `decode` never
//! panics: anything it does not recognise is a [`FormatError`] saying what is wrong, so the
//! engine can quarantine the record.

use std::fmt;

/// What kind of record; decides what a full spool may drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// A camera image (large): dropped first when the spool is full.
    Frame,
    /// An inference result (small): always kept.
    Result,
    /// A payload fovea could not use, with the reason (small): always kept.
    DeadLetter,
}

impl Class {
    /// Every class, in display order.
    pub const ALL: [Class; 3] = [Class::Frame, Class::Result, Class::DeadLetter];

    /// The name used in stats, counters and logs.
    pub fn name(self) -> &'static str {
        match self {
            Class::Frame => "frame",
            Class::Result => "result",
            Class::DeadLetter => "dead-letter",
        }
    }

    /// The number stored in the record body (0 is never written: it marks a damaged body).
    fn code(self) -> i32 {
        match self {
            Class::Frame => 1,
            Class::Result => 2,
            Class::DeadLetter => 3,
        }
    }

    fn from_code(code: i32) -> Option<Class> {
        match code {
            1 => Some(Class::Frame),
            2 => Some(Class::Result),
            3 => Some(Class::DeadLetter),
            _ => None,
        }
    }

    /// Index into per-class arrays (same order as [`Class::ALL`]).
    pub(crate) fn index(self) -> usize {
        match self {
            Class::Frame => 0,
            Class::Result => 1,
            Class::DeadLetter => 2,
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One record bound for Kafka, as the outbox hands it over and gets it back.
#[derive(Debug, Clone, PartialEq)]
pub struct SpoolRecord {
    /// Decides what a full spool may drop.
    pub class: Class,
    /// The Kafka topic it goes to.
    pub topic: String,
    /// The Kafka key (the camera id).
    pub key: String,
    /// The Kafka headers, in order (they include `fovea-record-id`, for deduplication).
    pub headers: Vec<(String, String)>,
    /// The Kafka value (protobuf).
    pub value: Vec<u8>,
    /// When it was spooled (wall clock, Unix ms): for the "oldest" age in stats.
    pub created_ms: i64,
}

impl SpoolRecord {
    /// Bytes that count against `max_bytes`: topic, key, header names and values, and value.
    pub fn size(&self) -> usize {
        self.topic.len()
            + self.key.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + self.value.len()
    }
}

/// The first two bytes of every stored record.
pub const MAGIC: [u8; 2] = *b"FS";
/// The format version written by [`encode`].
pub const VERSION: u8 = 1;
/// Bytes before the body: magic, version, CRC-32C, body length.
pub const HEADER_LEN: usize = 2 + 1 + 4 + 4;

/// The protobuf body: a private mirror of [`SpoolRecord`].
#[derive(Clone, PartialEq, prost::Message)]
struct Body {
    #[prost(int32, tag = "1")]
    class: i32,
    #[prost(string, tag = "2")]
    topic: String,
    #[prost(string, tag = "3")]
    key: String,
    #[prost(message, repeated, tag = "4")]
    headers: Vec<Header>,
    #[prost(bytes = "vec", tag = "5")]
    value: Vec<u8>,
    #[prost(int64, tag = "6")]
    created_ms: i64,
    /// [`FramePart::first`] (frame records written since frames are stored as units).
    #[prost(uint64, tag = "7")]
    frame_first: u64,
    /// [`FramePart::count`]; 0 (absent) in records written before units, and in results and
    /// dead letters.
    #[prost(uint32, tag = "8")]
    frame_count: u32,
}

/// Which frame a frame record belongs to: every frame record appended by one
/// `Spool::append_frame` call (the chunks of one frame, or its single record) carries the seq of
/// the first of them and how many there are. The start-up scan rebuilds the `frames` tree from
/// this. Records written before frames were units have none: each is a frame of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramePart {
    /// Seq of the frame's first frame record.
    pub first: u64,
    /// Frame records in the frame (at least 1).
    pub count: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Header {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    value: String,
}

/// Why stored bytes are not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("{len} bytes, shorter than the {HEADER_LEN}-byte header")]
    Short { len: usize },
    #[error("bad magic {found:02x?} (expected \"FS\")")]
    Magic { found: [u8; 2] },
    #[error("unknown format version {0} (this build reads version {VERSION})")]
    Version(u8),
    #[error("body length {declared} in the header, {actual} bytes stored")]
    Length { declared: u64, actual: u64 },
    #[error("checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("body does not decode: {0}")]
    Body(String),
    #[error("unknown record class {0}")]
    Class(i32),
    #[error("key of {0} bytes is not an 8-byte sequence number")]
    Key(usize),
    #[error("record file {path}: {detail}")]
    File { path: String, detail: String },
    #[error(
        "record file {path} does not match its stub (stub: crc {stub_crc:08x}, {stub_len} bytes; \
         file: crc {file_crc:08x}, {file_len} bytes)"
    )]
    FileMismatch {
        path: String,
        stub_crc: u32,
        stub_len: u32,
        file_crc: u32,
        file_len: u32,
    },
}

/// The first two bytes of a `records` value whose record lives in a file of its own.
pub const FILE_MAGIC: [u8; 2] = *b"FL";

/// A `records` value: the record itself, or a stub naming the file that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored<'a> {
    /// The encoded record (to be checked by [`decode`]).
    Inline(&'a [u8]),
    /// The record is in a file; the stub repeats the file's checksum and body length.
    File(FileStub),
}

/// A `records` value for a record kept in a file: the file's 11-byte header with magic
/// [`FILE_MAGIC`] (so the checksum and length of the file's body are known without the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStub {
    /// CRC-32C of the file's body.
    pub crc: u32,
    /// Length of the file's body.
    pub len: u32,
}

impl FileStub {
    /// The stub of an encoded record (as returned by [`encode`]).
    pub fn of(encoded: &[u8]) -> FileStub {
        let word = |at: usize| {
            encoded
                .get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u32::from_le_bytes)
        };
        FileStub {
            crc: word(3),
            len: word(7),
        }
    }

    /// The stub's stored bytes.
    pub fn encode(self) -> [u8; HEADER_LEN] {
        let mut out = [0; HEADER_LEN];
        out[..2].copy_from_slice(&FILE_MAGIC);
        out[2] = VERSION;
        out[3..7].copy_from_slice(&self.crc.to_le_bytes());
        out[7..11].copy_from_slice(&self.len.to_le_bytes());
        out
    }
}

/// Tells a stub from an inline record (whose checks are left to [`decode`]).
pub fn stored(value: &[u8]) -> Result<Stored<'_>, FormatError> {
    if value.get(..2) != Some(&FILE_MAGIC[..]) {
        return Ok(Stored::Inline(value));
    }
    if value.len() != HEADER_LEN {
        return Err(FormatError::Length {
            declared: HEADER_LEN as u64,
            actual: value.len() as u64,
        });
    }
    if value[2] != VERSION {
        return Err(FormatError::Version(value[2]));
    }
    Ok(Stored::File(FileStub::of(value)))
}

/// Decodes a record file's bytes, which must match the stub that points to it.
pub fn decode_file(
    stub: FileStub,
    path: &str,
    bytes: &[u8],
) -> Result<(SpoolRecord, Option<FramePart>), FormatError> {
    let found = FileStub::of(bytes);
    if found != stub {
        return Err(FormatError::FileMismatch {
            path: path.to_string(),
            stub_crc: stub.crc,
            stub_len: stub.len,
            file_crc: found.crc,
            file_len: found.len,
        });
    }
    decode_part(bytes)
}

/// Encodes a record into its stored bytes (as a frame of its own, if it is one).
///
/// # Errors
/// A body over 4 GiB (the length field is 32 bits); the outbox never builds one.
pub fn encode(rec: &SpoolRecord) -> Result<Vec<u8>, FormatError> {
    encode_part(rec, None)
}

/// Encodes a record into its stored bytes, with its place in its frame (frame records only).
///
/// # Errors
/// As [`encode`].
pub fn encode_part(rec: &SpoolRecord, part: Option<FramePart>) -> Result<Vec<u8>, FormatError> {
    use prost::Message;
    let body = Body {
        class: rec.class.code(),
        topic: rec.topic.clone(),
        key: rec.key.clone(),
        headers: rec
            .headers
            .iter()
            .map(|(name, value)| Header {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        value: rec.value.clone(),
        created_ms: rec.created_ms,
        frame_first: part.map_or(0, |p| p.first),
        frame_count: part.map_or(0, |p| p.count),
    };
    let body_len = body.encoded_len();
    let declared = u32::try_from(body_len).map_err(|_| FormatError::Length {
        declared: u64::from(u32::MAX),
        actual: body_len as u64,
    })?;
    let mut out = Vec::with_capacity(HEADER_LEN + body_len);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&[0; 4]); // CRC, filled in below
    out.extend_from_slice(&declared.to_le_bytes());
    body.encode(&mut out)
        .map_err(|e| FormatError::Body(e.to_string()))?;
    let crc = crc32c::crc32c(&out[HEADER_LEN..]);
    out[3..7].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decodes stored bytes, checking magic, version, length and checksum first.
pub fn decode(bytes: &[u8]) -> Result<SpoolRecord, FormatError> {
    decode_part(bytes).map(|(rec, _)| rec)
}

/// [`decode`], and the record's place in its frame (`None`: not a frame record, or written
/// before frames were units).
pub fn decode_part(bytes: &[u8]) -> Result<(SpoolRecord, Option<FramePart>), FormatError> {
    use prost::Message;
    if bytes.len() < HEADER_LEN {
        return Err(FormatError::Short { len: bytes.len() });
    }
    let magic = [bytes[0], bytes[1]];
    if magic != MAGIC {
        return Err(FormatError::Magic { found: magic });
    }
    if bytes[2] != VERSION {
        return Err(FormatError::Version(bytes[2]));
    }
    let stored = u32::from_le_bytes([bytes[3], bytes[4], bytes[5], bytes[6]]);
    let declared = u32::from_le_bytes([bytes[7], bytes[8], bytes[9], bytes[10]]);
    let body = &bytes[HEADER_LEN..];
    if u64::from(declared) != body.len() as u64 {
        return Err(FormatError::Length {
            declared: u64::from(declared),
            actual: body.len() as u64,
        });
    }
    let computed = crc32c::crc32c(body);
    if computed != stored {
        return Err(FormatError::Checksum { stored, computed });
    }
    let body = Body::decode(body).map_err(|e| FormatError::Body(e.to_string()))?;
    let class = Class::from_code(body.class).ok_or(FormatError::Class(body.class))?;
    let part = (class == Class::Frame && body.frame_count > 0).then_some(FramePart {
        first: body.frame_first,
        count: body.frame_count,
    });
    let rec = SpoolRecord {
        class,
        topic: body.topic,
        key: body.key,
        headers: body
            .headers
            .into_iter()
            .map(|h| (h.name, h.value))
            .collect(),
        value: body.value,
        created_ms: body.created_ms,
    };
    Ok((rec, part))
}

/// The sled key of a seq: big-endian, so sled's byte order is seq order.
pub fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// The seq of a sled key.
pub fn key_seq(key: &[u8]) -> Result<u64, FormatError> {
    let arr: [u8; 8] = key.try_into().map_err(|_| FormatError::Key(key.len()))?;
    Ok(u64::from_be_bytes(arr))
}
