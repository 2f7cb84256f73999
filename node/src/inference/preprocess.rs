//! Image -> input tensor: crop/resize per the manifest, then write the pixels straight into the
//! session's reusable input buffer (normalised f32, or raw u8).
//!
//! At most one intermediate image is made: the resized one (`image::imageops::resize`, Triangle
//! filter), and none when the image is already RGB8 and of the right size. Cropping is a view.
//! Non-RGB8 images (grey, RGBA, 16-bit) are converted to RGB8 after resizing when possible.

use std::borrow::Cow;

use image::imageops::{self, FilterType};
use image::{DynamicImage, RgbImage};

use super::manifest::{InputSpec, Layout, Resize};

/// A rectangle in source-image pixels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Rect {
    pub x: f32,
    pub y: f32,
    pub w: f32,
    pub h: f32,
}

/// Where the input tensor came from, to map model coordinates back to the source image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Geometry {
    /// Source image size in pixels.
    pub src_w: f32,
    pub src_h: f32,
    /// The part of the source the input tensor shows (all of it except for `center_crop`).
    pub region: Rect,
    /// Input tensor size in pixels.
    pub input_w: f32,
    pub input_h: f32,
}

/// Integer crop region (x, y, w, h) and target size (w, h) for an image of `w` x `h`.
pub(crate) fn plan(spec: &InputSpec, w: u32, h: u32) -> ((u32, u32, u32, u32), (u32, u32)) {
    let full = (0, 0, w, h);
    // Manifest validation guarantees the sizes needed by each mode; 1 is only a safe fallback.
    let (tw, th) = (
        spec.width.unwrap_or(1).max(1),
        spec.height.unwrap_or(1).max(1),
    );
    match spec.resize {
        Resize::Stretch => (full, (tw, th)),
        Resize::CenterCrop => {
            let (w64, h64, tw64, th64) = (u64::from(w), u64::from(h), u64::from(tw), u64::from(th));
            // Largest region of aspect tw:th inside w x h.
            let (cw, ch) = if w64 * th64 > h64 * tw64 {
                (((h64 * tw64 + th64 / 2) / th64).clamp(1, w64), h64)
            } else {
                (w64, ((w64 * th64 + tw64 / 2) / tw64).clamp(1, h64))
            };
            let (cw, ch) = (cw as u32, ch as u32);
            (((w - cw) / 2, (h - ch) / 2, cw, ch), (tw, th))
        }
        Resize::Fit => {
            let max_side = u64::from(spec.max_side.unwrap_or(1).max(1));
            let longest = u64::from(w.max(h));
            if longest <= max_side {
                (full, (w, h))
            } else {
                let scale =
                    |v: u32| ((u64::from(v) * max_side + longest / 2) / longest).max(1) as u32;
                (full, (scale(w), scale(h)))
            }
        }
    }
}

/// Crops and resizes `image` to the model's input size, as RGB8.
pub(crate) fn prepare<'a>(
    spec: &InputSpec,
    image: &'a DynamicImage,
) -> Result<(Cow<'a, RgbImage>, Geometry), String> {
    let (w, h) = (image.width(), image.height());
    if w == 0 || h == 0 {
        return Err(format!("image is {w}x{h} pixels"));
    }
    let ((rx, ry, rw, rh), (tw, th)) = plan(spec, w, h);
    let whole = (rx, ry, rw, rh) == (0, 0, w, h);
    let pixels = match image {
        DynamicImage::ImageRgb8(rgb) if whole && (tw, th) == (w, h) => Cow::Borrowed(rgb),
        _ if whole && (tw, th) == (w, h) => Cow::Owned(image.to_rgb8()),
        // Resize in the source's own pixel format, then convert the (smaller) result; free for
        // RGB8. `resize_exact` is `imageops::resize`, instantiated (and optimised) in `image`.
        _ if whole => Cow::Owned(image.resize_exact(tw, th, FilterType::Triangle).into_rgb8()),
        _ => {
            let rgb: Cow<'a, RgbImage> = match image {
                DynamicImage::ImageRgb8(rgb) => Cow::Borrowed(rgb),
                other => Cow::Owned(other.to_rgb8()),
            };
            let view = imageops::crop_imm(rgb.as_ref(), rx, ry, rw, rh);
            Cow::Owned(imageops::resize(&*view, tw, th, FilterType::Triangle))
        }
    };
    let geometry = Geometry {
        src_w: w as f32,
        src_h: h as f32,
        region: Rect {
            x: rx as f32,
            y: ry as f32,
            w: rw as f32,
            h: rh as f32,
        },
        input_w: tw as f32,
        input_h: th as f32,
    };
    Ok((pixels, geometry))
}

/// Input tensor shape for an image of `w` x `h`.
pub(crate) fn shape(layout: Layout, w: u32, h: u32) -> [usize; 4] {
    let (w, h) = (w as usize, h as usize);
    match layout {
        Layout::Nchw => [1, 3, h, w],
        Layout::Nhwc => [1, h, w, 3],
    }
}

/// Writes `(pixel * scale - mean) / std` into `out` (cleared first; its capacity is reused).
pub(crate) fn fill_f32(spec: &InputSpec, img: &RgbImage, out: &mut Vec<f32>) {
    let a: [f32; 3] = std::array::from_fn(|c| spec.scale / spec.std[c]);
    let b: [f32; 3] = std::array::from_fn(|c| -spec.mean[c] / spec.std[c]);
    let raw = img.as_raw();
    out.clear();
    out.reserve(raw.len());
    match spec.layout {
        Layout::Nchw => {
            for c in 0..3 {
                out.extend(raw.chunks_exact(3).map(|px| f32::from(px[c]) * a[c] + b[c]));
            }
        }
        Layout::Nhwc => out.extend(raw.chunks_exact(3).flat_map(|px| {
            [
                f32::from(px[0]) * a[0] + b[0],
                f32::from(px[1]) * a[1] + b[1],
                f32::from(px[2]) * a[2] + b[2],
            ]
        })),
    }
}

/// Writes raw RGB planes (NCHW u8) into `out`. NHWC u8 needs no copy: use the image's buffer.
pub(crate) fn fill_u8_planar(img: &RgbImage, out: &mut Vec<u8>) {
    let raw = img.as_raw();
    out.clear();
    out.reserve(raw.len());
    for c in 0..3 {
        out.extend(raw.chunks_exact(3).map(|px| px[c]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::manifest::DType;

    fn spec(resize: Resize, size: Option<(u32, u32)>, max_side: Option<u32>) -> InputSpec {
        InputSpec {
            name: "input".into(),
            layout: Layout::Nchw,
            dtype: DType::F32,
            resize,
            width: size.map(|s| s.0),
            height: size.map(|s| s.1),
            max_side,
            scale: 1.0,
            mean: [0.0; 3],
            std: [1.0; 3],
        }
    }

    #[test]
    fn plans_stretch_center_crop_and_fit() {
        let s = spec(Resize::Stretch, Some((224, 224)), None);
        assert_eq!(plan(&s, 451, 300), ((0, 0, 451, 300), (224, 224)));
        let s = spec(Resize::CenterCrop, Some((224, 224)), None);
        assert_eq!(plan(&s, 451, 300), ((75, 0, 300, 300), (224, 224)));
        assert_eq!(plan(&s, 300, 451), ((0, 75, 300, 300), (224, 224)));
        let s = spec(Resize::CenterCrop, Some((200, 100)), None);
        assert_eq!(plan(&s, 100, 100), ((0, 25, 100, 50), (200, 100)));
        let s = spec(Resize::Fit, None, Some(512));
        assert_eq!(plan(&s, 1024, 683), ((0, 0, 1024, 683), (512, 342)));
        assert_eq!(plan(&s, 300, 200), ((0, 0, 300, 200), (300, 200)));
        assert_eq!(plan(&s, 10_000, 1), ((0, 0, 10_000, 1), (512, 1)));
    }

    #[test]
    fn fills_planar_and_interleaved_normalised_values() {
        let img = RgbImage::from_raw(2, 1, vec![0, 51, 255, 255, 0, 102]).expect("2x1 image");
        let mut s = spec(Resize::Stretch, Some((2, 1)), None);
        s.scale = 1.0 / 255.0;
        s.mean = [0.5, 0.0, 0.0];
        s.std = [0.5, 1.0, 1.0];
        let mut out = vec![9.0; 100];
        fill_f32(&s, &img, &mut out);
        let want = [-1.0, 1.0, 0.2, 0.0, 1.0, 0.4];
        assert_eq!(out.len(), 6);
        assert!(
            out.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
            "{out:?}"
        );
        s.layout = Layout::Nhwc;
        fill_f32(&s, &img, &mut out);
        let want = [-1.0, 0.2, 1.0, 1.0, 0.0, 0.4];
        assert!(
            out.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
            "{out:?}"
        );
        let mut planes = Vec::new();
        fill_u8_planar(&img, &mut planes);
        assert_eq!(planes, vec![0, 255, 51, 0, 255, 102]);
    }

    #[test]
    fn prepare_borrows_when_no_resize_is_needed_and_rejects_empty_images() {
        let s = spec(Resize::Fit, None, Some(64));
        let img = DynamicImage::ImageRgb8(RgbImage::new(32, 16));
        let (pixels, g) = prepare(&s, &img).expect("prepare");
        assert!(matches!(pixels, Cow::Borrowed(_)));
        assert_eq!((g.input_w, g.input_h), (32.0, 16.0));
        let gray = DynamicImage::ImageLuma8(image::GrayImage::new(128, 64));
        let (pixels, _) = prepare(&s, &gray).expect("prepare gray");
        assert_eq!(pixels.dimensions(), (64, 32));
        let empty = DynamicImage::ImageRgb8(RgbImage::new(0, 10));
        assert!(prepare(&s, &empty).is_err());
    }
}
