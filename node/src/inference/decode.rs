//! Turning a frame's bytes into pixels, with the checks that keep one frame from costing the box
//! its memory or passing damage off as a picture:
//! - **pixel limits** read from the header before anything is decoded (`too-many-pixels`), and
//!   `image::Limits` on the decoder itself, so a 458 KB PNG of 11000 x 11000 never becomes 480 MB;
//! - **truncation** by structure: a JPEG must end with its end-of-image marker, a PNG with its
//!   IEND chunk (`truncated`, unless `inference.truncated = "infer"`, which infers what decodes
//!   and says so in the result);
//! - **EXIF orientation** applied, so models see (and boxes are given in) the picture as the
//!   camera meant it, upright;
//! - images too small to mean anything (`too-small`).

use crate::config::WhenTruncated;
use crate::ingress::payload;
use crate::job::Rejection;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};
use std::io::Cursor;

/// What a frame may be, from `[inference]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageLimits {
    pub min_side: u32,
    pub max_side: u32,
    pub max_pixels: u64,
    pub truncated: WhenTruncated,
}

impl ImageLimits {
    pub fn from_config(cfg: &crate::config::InferenceConfig) -> Self {
        ImageLimits {
            min_side: cfg.min_image_side,
            max_side: cfg.max_image_side,
            max_pixels: cfg.max_image_pixels,
            truncated: cfg.truncated,
        }
    }

    /// The decoder's own limits: the same sides, and room for the largest allowed image at
    /// 16 bits per channel with alpha (8 bytes a pixel), the widest format fovea decodes.
    pub fn decoder_limits(&self) -> Limits {
        let mut limits = Limits::default();
        limits.max_image_width = Some(self.max_side);
        limits.max_image_height = Some(self.max_side);
        limits.max_alloc = Some(self.max_pixels.saturating_mul(8));
        limits
    }

    fn check(&self, width: u32, height: u32) -> Result<(), Rejection> {
        let pixels = u64::from(width) * u64::from(height);
        if width > self.max_side || height > self.max_side || pixels > self.max_pixels {
            return Err(Rejection::TooManyPixels {
                width,
                height,
                max_side: self.max_side,
                max_pixels: self.max_pixels,
            });
        }
        if width < self.min_side || height < self.min_side {
            return Err(Rejection::TooSmall {
                width,
                height,
                min: self.min_side,
            });
        }
        Ok(())
    }
}

/// A decoded frame, upright, and what the result should say about it.
#[derive(Debug)]
pub struct Decoded {
    pub image: DynamicImage,
    /// Set when the image was damaged and inferred anyway (`truncated = "infer"`).
    pub caveat: Option<String>,
}

pub fn decode(data: &[u8], content_type: &str, limits: &ImageLimits) -> Result<Decoded, Rejection> {
    let format = if content_type == payload::PNG {
        ImageFormat::Png
    } else {
        ImageFormat::Jpeg
    };
    let damage = truncation(data, format);
    if let (Some(what), WhenTruncated::DeadLetter) = (&damage, limits.truncated) {
        return Err(Rejection::Truncated(what.clone()));
    }
    let mut reader = ImageReader::with_format(Cursor::new(data), format);
    // The sides are checked below, from the header, with fovea's own message; the decoder keeps
    // its allocation limit.
    let mut decoder_limits = limits.decoder_limits();
    (
        decoder_limits.max_image_width,
        decoder_limits.max_image_height,
    ) = (None, None);
    reader.limits(decoder_limits);
    let mut decoder = reader.into_decoder().map_err(|e| failed(e, &damage))?;
    let (width, height) = decoder.dimensions();
    limits.check(width, height)?;
    // A broken EXIF block is no reason to refuse the picture: keep it as stored.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| failed(e, &damage))?;
    image.apply_orientation(orientation);
    Ok(Decoded {
        image,
        caveat: damage.map(|what| format!("{what}; inferred as far as it decoded")),
    })
}

/// A decoder error; for a damaged image that could not be decoded even with `infer`, the damage
/// is the better reason.
fn failed(e: image::ImageError, damage: &Option<String>) -> Rejection {
    match (damage, e) {
        (Some(what), _) => Rejection::Truncated(what.clone()),
        (None, image::ImageError::Limits(l)) => {
            Rejection::Decode(format!("over the decoder's limits: {l}"))
        }
        (None, e) => Rejection::Decode(e.to_string()),
    }
}

/// PNG's last chunk: length 0, `IEND`, its CRC.
const PNG_IEND: [u8; 12] = [0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82];

/// How the bytes show the image is cut short, if they do. Trailing zero bytes (padding some
/// cameras add) are allowed after a JPEG's end marker.
fn truncation(data: &[u8], format: ImageFormat) -> Option<String> {
    match format {
        ImageFormat::Png if !data.ends_with(&PNG_IEND) => Some(format!(
            "PNG of {} bytes without its IEND chunk: truncated",
            data.len()
        )),
        ImageFormat::Jpeg => {
            let end = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            (!data[..end].ends_with(&[0xFF, 0xD9])).then(|| {
                format!(
                    "JPEG of {} bytes without its end-of-image marker: truncated",
                    data.len()
                )
            })
        }
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, Rgb};

    fn limits() -> ImageLimits {
        ImageLimits {
            min_side: 16,
            max_side: 200,
            max_pixels: 20_000,
            truncated: WhenTruncated::DeadLetter,
        }
    }

    fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), format).unwrap();
        out
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        encode(&DynamicImage::new_rgb8(w, h), ImageFormat::Png)
    }

    fn kind(data: &[u8], content_type: &str, limits: &ImageLimits) -> &'static str {
        decode(data, content_type, limits).unwrap_err().kind()
    }

    #[test]
    fn pixel_limits_are_checked_from_the_header() {
        assert!(decode(&png(100, 100), payload::PNG, &limits()).is_ok());
        let wide = decode(&png(201, 20), payload::PNG, &limits()).unwrap_err();
        assert_eq!(wide.kind(), "too-many-pixels");
        assert_eq!(
            wide.to_string(),
            "image is 201x20 pixels; at most 200 a side and 20000 pixels are allowed (inference.max_image_side, inference.max_image_pixels)"
        );
        assert_eq!(
            kind(&png(150, 150), payload::PNG, &limits()),
            "too-many-pixels"
        );
        assert_eq!(kind(&png(1, 1), payload::PNG, &limits()), "too-small");
    }

    #[test]
    fn truncated_images_are_named_or_inferred_with_a_caveat() {
        let jpeg = encode(
            &DynamicImage::ImageRgb8(ImageBuffer::from_fn(180, 100, |x, y| {
                Rgb([
                    (x * 7 % 256) as u8,
                    (y * 13 % 256) as u8,
                    ((x ^ y) % 256) as u8,
                ])
            })),
            ImageFormat::Jpeg,
        );
        let half = &jpeg[..jpeg.len() / 2];
        let refused = decode(half, payload::JPEG, &limits()).unwrap_err();
        assert_eq!(refused.kind(), "truncated");
        assert!(
            refused.to_string().contains("end-of-image marker"),
            "{refused}"
        );
        let mut padded = jpeg.clone();
        padded.extend([0, 0, 0]);
        assert!(
            decode(&padded, payload::JPEG, &limits())
                .unwrap()
                .caveat
                .is_none()
        );

        let infer = ImageLimits {
            truncated: WhenTruncated::Infer,
            ..limits()
        };
        let inferred = decode(half, payload::JPEG, &infer).unwrap();
        assert!(
            inferred
                .caveat
                .unwrap()
                .contains("inferred as far as it decoded")
        );
        // A PNG cut in half does not decode at all: named as truncated either way.
        let cut = &png(64, 64)[..];
        let cut = &cut[..cut.len() / 2];
        assert_eq!(kind(cut, payload::PNG, &limits()), "truncated");
        assert_eq!(kind(cut, payload::PNG, &infer), "truncated");
        assert_eq!(
            kind(
                &[0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 0xFF, 0xD9],
                payload::JPEG,
                &limits()
            ),
            "decode-failed"
        );
    }

    #[test]
    fn grey_and_16_bit_images_decode() {
        let grey = DynamicImage::ImageLuma8(ImageBuffer::from_pixel(40, 30, Luma([7u8])));
        let deep = DynamicImage::ImageRgb16(ImageBuffer::from_pixel(40, 30, Rgb([1u16, 2, 60000])));
        for img in [grey, deep] {
            let d = decode(&encode(&img, ImageFormat::Png), payload::PNG, &limits()).unwrap();
            assert_eq!((d.image.width(), d.image.height()), (40, 30));
        }
    }

    /// A CMYK JPEG (four components and Adobe's APP14 marker, as Pillow, Photoshop and print
    /// workflows write them; `tests/data/README.md`) decodes to its RGB original's colours: not
    /// refused, not inverted (measured: 1.8 levels a channel from the original, on average).
    #[test]
    fn a_cmyk_jpeg_decodes_to_the_colours_of_its_rgb_original() {
        let cmyk = include_bytes!("../../../tests/data/chelsea-cmyk.jpg"); // not a sample photo
        let rgb = include_bytes!("../../../models/samples/chelsea.png");
        let limits = ImageLimits {
            max_side: 8192,
            max_pixels: 40_000_000,
            ..limits()
        };
        let d = decode(cmyk, payload::JPEG, &limits).unwrap();
        assert!(d.caveat.is_none());
        let got = d.image.to_rgb8();
        let original = image::load_from_memory(rgb).unwrap().to_rgb8();
        assert_eq!(got.dimensions(), original.dimensions());
        let total: u64 = got
            .as_raw()
            .iter()
            .zip(original.as_raw())
            .map(|(a, b)| u64::from(a.abs_diff(*b)))
            .sum();
        let mean = total as f64 / got.as_raw().len() as f64;
        // JPEG at quality 85 costs a few levels; inverted or mis-converted colours cost ~100.
        assert!(mean < 8.0, "mean difference {mean:.2} levels per channel");
    }

    /// A JPEG that says "rotate 90° clockwise" in its EXIF block (orientation 6) comes out
    /// upright: its sides swap.
    #[test]
    fn exif_orientation_is_applied() {
        let jpeg = encode(&DynamicImage::new_rgb8(60, 20), ImageFormat::Jpeg);
        let rotated = with_exif_orientation(&jpeg, 6);
        let d = decode(&rotated, payload::JPEG, &limits()).unwrap();
        assert_eq!((d.image.width(), d.image.height()), (20, 60));
        let plain = decode(&jpeg, payload::JPEG, &limits()).unwrap();
        assert_eq!((plain.image.width(), plain.image.height()), (60, 20));
    }

    /// Inserts an APP1 Exif segment with one IFD entry, Orientation = `value`, after SOI.
    pub(crate) fn with_exif_orientation(jpeg: &[u8], value: u16) -> Vec<u8> {
        let mut tiff = b"MM\0\x2a\0\0\0\x08".to_vec();
        tiff.extend(1u16.to_be_bytes()); // one entry
        tiff.extend(0x0112u16.to_be_bytes()); // Orientation
        tiff.extend(3u16.to_be_bytes()); // SHORT
        tiff.extend(1u32.to_be_bytes()); // count
        tiff.extend(value.to_be_bytes());
        tiff.extend([0, 0]);
        tiff.extend(0u32.to_be_bytes()); // no next IFD
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend(tiff);
        let mut out = jpeg[..2].to_vec();
        out.extend([0xFF, 0xE1]);
        out.extend(((app1.len() + 2) as u16).to_be_bytes());
        out.extend(app1);
        out.extend(&jpeg[2..]);
        out
    }
}
