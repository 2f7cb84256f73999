//! Thumbnails for frames replicated over a metered link.
//!
//! A 4K frame is megabytes; a 320-pixel JPEG of it is a few kilobytes and is usually enough to
//! see what the model saw. Decoding uses `image`'s default limits (512 MiB of allocations), so a
//! hostile image header cannot make the node allocate without bound. The Triangle filter is the
//! one preprocessing uses: it averages over the whole footprint when shrinking, so thumbnails do
//! not alias.

use image::imageops::FilterType;
use image::{DynamicImage, ImageFormat, ImageReader};
use std::io::Cursor;

/// Why a thumbnail could not be made. The frame itself is fine to keep; the caller decides
/// whether to send the full image instead or skip it.
#[derive(Debug, thiserror::Error)]
pub enum ThumbnailError {
    /// `max_side` 0 means "the full image" in the rules: a caller bug, not a frame problem.
    #[error("thumbnail max side is 0; send the full image instead of calling thumbnail()")]
    ZeroMaxSide,
    /// The bytes are not a JPEG or PNG. Skip the frame or send it as it is.
    #[error("frame is not a JPEG or PNG (found {found}); send it unchanged or skip it")]
    Unsupported { found: String },
    /// Corrupt, truncated, or over the decoder's memory limit. Skip the frame or send it as it is.
    #[error("cannot decode the frame's image: {0}; send it unchanged or skip it")]
    Decode(#[source] image::ImageError),
    /// Encoding to JPEG failed (should not happen for 8-bit RGB or gray). Send the full image.
    #[error("cannot encode the thumbnail as JPEG: {0}; send the full image instead")]
    Encode(#[source] image::ImageError),
}

/// Decodes a JPEG or PNG, shrinks it so that its longest side is at most `max_side` (keeping the
/// aspect ratio; never enlarging: a smaller image is only re-encoded), and encodes it as a JPEG
/// at `quality` (1-100, clamped). Returns the JPEG and its width and height.
pub fn thumbnail(
    data: &[u8],
    max_side: u32,
    quality: u8,
    limits: image::Limits,
) -> Result<(Vec<u8>, u32, u32), ThumbnailError> {
    if max_side == 0 {
        return Err(ThumbnailError::ZeroMaxSide);
    }
    let reader = ImageReader::new(Cursor::new(data))
        .with_guessed_format()
        .map_err(|e| ThumbnailError::Decode(e.into()))?;
    match reader.format() {
        Some(ImageFormat::Jpeg | ImageFormat::Png) => {}
        other => {
            let found = other.map_or_else(|| "unknown data".to_string(), |f| format!("{f:?}"));
            return Err(ThumbnailError::Unsupported { found });
        }
    }
    // The node's pixel limits: a local record is not trusted to be small once decoded.
    let mut reader = reader;
    reader.limits(limits);
    let image = reader.decode().map_err(ThumbnailError::Decode)?;
    let (width, height) = fit(image.width(), image.height(), max_side);
    let image = if (width, height) == (image.width(), image.height()) {
        image
    } else {
        image.resize_exact(width, height, FilterType::Triangle)
    };
    // JPEG has no alpha and no 16-bit samples: flatten to 8-bit gray or RGB.
    let image = if image.color().has_color() {
        DynamicImage::ImageRgb8(image.to_rgb8())
    } else {
        DynamicImage::ImageLuma8(image.to_luma8())
    };
    let mut out = Vec::new();
    let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
    image
        .write_with_encoder(encoder)
        .map_err(ThumbnailError::Encode)?;
    Ok((out, width, height))
}

/// The size that fits `width` x `height` within `max_side`, rounding to the nearest pixel and
/// never below 1 (a 1000x1 strip stays 1 pixel high).
fn fit(width: u32, height: u32, max_side: u32) -> (u32, u32) {
    let longest = width.max(height);
    if longest <= max_side {
        return (width, height);
    }
    let scale = |side: u32| {
        let scaled =
            (u64::from(side) * u64::from(max_side) + u64::from(longest) / 2) / u64::from(longest);
        // scaled <= max_side, so it fits in u32.
        u32::try_from(scaled).unwrap_or(max_side).max(1)
    };
    (scale(width), scale(height))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHELSEA: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/samples/chelsea.png"
    ));
    const ROCKET: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/samples/rocket.jpg"
    ));

    /// Decodes `jpeg` and checks it is a JPEG of the stated size.
    fn assert_jpeg(jpeg: &[u8], width: u32, height: u32) {
        assert_eq!(&jpeg[..3], &[0xFF, 0xD8, 0xFF], "not a JPEG");
        let img = image::load_from_memory_with_format(jpeg, ImageFormat::Jpeg).unwrap();
        assert_eq!((img.width(), img.height()), (width, height));
    }

    fn png(img: DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn png_is_shrunk_keeping_aspect() {
        let (jpeg, w, h) = thumbnail(CHELSEA, 128, 80, image::Limits::default()).unwrap();
        assert_eq!((w, h), (128, 85));
        assert_jpeg(&jpeg, 128, 85);
        assert!(jpeg.len() < CHELSEA.len() / 10, "{} bytes", jpeg.len());
    }

    #[test]
    fn jpeg_is_shrunk_keeping_aspect() {
        let (jpeg, w, h) = thumbnail(ROCKET, 128, 80, image::Limits::default()).unwrap();
        assert_eq!((w, h), (128, 85)); // 640x427
        assert_jpeg(&jpeg, 128, 85);
    }

    #[test]
    fn smaller_image_is_not_enlarged() {
        let (jpeg, w, h) = thumbnail(CHELSEA, 1000, 80, image::Limits::default()).unwrap();
        assert_eq!((w, h), (451, 300));
        assert_jpeg(&jpeg, 451, 300);
        let (_, w, h) = thumbnail(CHELSEA, 451, 80, image::Limits::default()).unwrap();
        assert_eq!((w, h), (451, 300));
    }

    #[test]
    fn portrait_and_extreme_aspects() {
        let tall = png(DynamicImage::ImageRgb8(image::RgbImage::new(30, 200)));
        let (_, w, h) = thumbnail(&tall, 50, 80, image::Limits::default()).unwrap();
        assert_eq!((w, h), (8, 50)); // 7.5 rounds up
        let strip = png(DynamicImage::ImageRgb8(image::RgbImage::new(1000, 1)));
        let (jpeg, w, h) = thumbnail(&strip, 10, 80, image::Limits::default()).unwrap();
        assert_eq!((w, h), (10, 1));
        assert_jpeg(&jpeg, 10, 1);
    }

    #[test]
    fn alpha_gray_and_16_bit_images_encode() {
        let rgba = png(DynamicImage::ImageRgba8(image::RgbaImage::new(64, 32)));
        assert_jpeg(
            &thumbnail(&rgba, 16, 80, image::Limits::default())
                .unwrap()
                .0,
            16,
            8,
        );
        let gray = png(DynamicImage::ImageLuma8(image::GrayImage::new(64, 32)));
        assert_jpeg(
            &thumbnail(&gray, 16, 80, image::Limits::default())
                .unwrap()
                .0,
            16,
            8,
        );
        let deep = png(DynamicImage::ImageRgb16(image::ImageBuffer::new(64, 32)));
        assert_jpeg(
            &thumbnail(&deep, 16, 80, image::Limits::default())
                .unwrap()
                .0,
            16,
            8,
        );
    }

    #[test]
    fn lower_quality_is_smaller() {
        let (low, ..) = thumbnail(ROCKET, 320, 30, image::Limits::default()).unwrap();
        let (high, ..) = thumbnail(ROCKET, 320, 95, image::Limits::default()).unwrap();
        assert!(low.len() < high.len(), "{} vs {}", low.len(), high.len());
        // Out-of-range qualities are clamped, not errors.
        thumbnail(ROCKET, 64, 0, image::Limits::default()).unwrap();
        thumbnail(ROCKET, 64, 255, image::Limits::default()).unwrap();
    }

    #[test]
    fn bad_input_errors_say_what_to_do() {
        let err = thumbnail(b"not an image at all", 128, 80, image::Limits::default()).unwrap_err();
        assert!(matches!(err, ThumbnailError::Unsupported { .. }), "{err:?}");
        assert!(
            err.to_string().contains("send it unchanged or skip it"),
            "{err}"
        );

        // (A truncated JPEG decodes, gray below the cut, as the JPEG decoder is lenient.)
        let truncated = &CHELSEA[..CHELSEA.len() / 3];
        let err = thumbnail(truncated, 128, 80, image::Limits::default()).unwrap_err();
        assert!(matches!(err, ThumbnailError::Decode(_)), "{err:?}");

        let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;";
        let err = thumbnail(gif, 128, 80, image::Limits::default()).unwrap_err();
        assert!(err.to_string().contains("Gif"), "{err}");

        let err = thumbnail(CHELSEA, 0, 80, image::Limits::default()).unwrap_err();
        assert!(matches!(err, ThumbnailError::ZeroMaxSide), "{err:?}");
    }

    #[test]
    fn fit_rounds_and_never_enlarges() {
        assert_eq!(fit(451, 300, 128), (128, 85));
        assert_eq!(fit(300, 451, 128), (85, 128));
        assert_eq!(fit(100, 100, 100), (100, 100));
        assert_eq!(fit(10, 5, 1000), (10, 5));
        assert_eq!(fit(u32::MAX, 1, 1), (1, 1));
    }
}
