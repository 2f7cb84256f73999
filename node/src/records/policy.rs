//! How a frame travels to Kafka, as written in the `fovea-size-policy` header and in its result's
//! `frame.size_policy`.

use std::fmt;

/// How a frame's bytes were stored. Every frame record and dead letter names one; consumers (and
/// `fovea frames export`) read it to know how to get the image back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SizePolicy {
    /// The whole frame is in one record under the limit.
    Inline,
    /// The encoded `Frame` is split into ordered `FrameChunk` records under the camera's key.
    Chunked,
    /// The image is in the blob store; the record holds the reference.
    ClaimCheck,
    /// The frame could not travel: a dead letter holds its size, checksum and the reason.
    DeadLetter,
}

impl SizePolicy {
    pub const ALL: [SizePolicy; 4] = [
        SizePolicy::Inline,
        SizePolicy::Chunked,
        SizePolicy::ClaimCheck,
        SizePolicy::DeadLetter,
    ];

    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            SizePolicy::Inline => "inline",
            SizePolicy::Chunked => "chunked",
            SizePolicy::ClaimCheck => "claim-check",
            SizePolicy::DeadLetter => "dead-letter",
        }
    }

    /// Reads a header value; `None` for anything fovea does not write.
    pub fn parse(value: &str) -> Option<SizePolicy> {
        SizePolicy::ALL.into_iter().find(|p| p.as_str() == value)
    }
}

impl fmt::Display for SizePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_policy_reads_back_and_nothing_else_does() {
        for p in SizePolicy::ALL {
            assert_eq!(SizePolicy::parse(p.as_str()), Some(p));
        }
        assert_eq!(SizePolicy::parse("Inline"), None);
        assert_eq!(SizePolicy::parse(""), None);
    }
}
