//! Image header checks and a bounded decode: `inference::decode::decode` with small limits
//! (at most 256 a side, 32768 pixels, so the decoder's allocation limit is 256 KiB), the type
//! sniffed as `payload::parse` does, under both `inference.truncated` settings.
//!
//! Checks: never a panic, no allocation over the fuzz allocator's cap; a decoded image is
//! within the limits (upright, after EXIF orientation); with `dead_letter` nothing decodes with
//! a caveat, and what decodes there decodes the same under `infer`, without one; a refusal is
//! one of the decoder's kinds.
#![no_main]

use fovea::config::WhenTruncated;
use fovea::inference::decode::{ImageLimits, decode};
use fovea::ingress::payload::{JPEG, sniff};
use fovea_fuzz as _;
use libfuzzer_sys::fuzz_target;

const LIMITS: ImageLimits = ImageLimits {
    min_side: 2,
    max_side: 256,
    max_pixels: 32_768,
    truncated: WhenTruncated::DeadLetter,
};

fuzz_target!(|data: &[u8]| {
    let content_type = sniff(data).unwrap_or(JPEG);
    let strict = decode(data, content_type, &LIMITS);
    let infer = ImageLimits {
        truncated: WhenTruncated::Infer,
        ..LIMITS
    };
    let lenient = decode(data, content_type, &infer);
    for outcome in [&strict, &lenient] {
        match outcome {
            Ok(d) => {
                let (w, h) = (d.image.width(), d.image.height());
                assert!(w <= LIMITS.max_side && h <= LIMITS.max_side, "{w}x{h}");
                assert!(w >= LIMITS.min_side && h >= LIMITS.min_side, "{w}x{h}");
                assert!(u64::from(w) * u64::from(h) <= LIMITS.max_pixels, "{w}x{h}");
            }
            Err(r) => assert!(
                matches!(
                    r.kind(),
                    "decode-failed" | "truncated" | "too-many-pixels" | "too-small"
                ),
                "{}: {r}",
                r.kind()
            ),
        }
    }
    if let Ok(d) = &strict {
        assert!(d.caveat.is_none());
        let l = lenient
            .as_ref()
            .expect("what decodes strictly decodes leniently");
        assert!(l.caveat.is_none());
        assert_eq!(l.image, d.image);
    }
});
