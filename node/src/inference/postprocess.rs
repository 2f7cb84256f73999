//! Output tensors -> results: softmax and top-k for classification; box decoding to source-image
//! pixels, score filtering and (when the graph has none) greedy per-class NMS for detection.
//!
//! Pure functions over slices: no ONNX Runtime types, so they are unit-tested directly. NaN or
//! infinite values never panic; they are dropped.

use std::cmp::Ordering;

use super::manifest::BoxFormat;
use super::preprocess::Geometry;

/// Numerically stable softmax, in place.
pub(crate) fn softmax(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in v.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    for x in v.iter_mut() {
        *x /= sum;
    }
}

/// Best first; ties by lower index, so results are deterministic.
fn by_score_desc(a: &(usize, f32), b: &(usize, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The `k` best (index, score) pairs scoring at least `min_score`, best first. NaN never passes.
pub(crate) fn top_k(scores: &[f32], k: usize, min_score: f32) -> Vec<(usize, f32)> {
    let mut kept: Vec<(usize, f32)> = scores
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, s)| *s >= min_score)
        .collect();
    if k == 0 {
        return Vec::new();
    }
    if kept.len() > k {
        kept.select_nth_unstable_by(k - 1, by_score_desc);
        kept.truncate(k);
    }
    kept.sort_unstable_by(by_score_desc);
    kept
}

/// One detected box: x0, y0, x1, y1 in source-image pixels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct BoxDet {
    pub class_id: u32,
    pub score: f32,
    pub bbox: [f32; 4],
}

/// Intersection over union of two x0,y0,x1,y1 boxes (0 when either is empty).
pub(crate) fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// Greedy per-class non-maximum suppression: best first, a box is dropped when it overlaps a
/// kept box of the same class by more than `iou_threshold`. Returns the kept boxes, best first.
pub(crate) fn nms(mut dets: Vec<BoxDet>, iou_threshold: f32) -> Vec<BoxDet> {
    dets.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<BoxDet> = Vec::with_capacity(dets.len());
    for d in dets {
        let suppressed = kept
            .iter()
            .any(|k| k.class_id == d.class_id && iou(&k.bbox, &d.bbox) > iou_threshold);
        if !suppressed {
            kept.push(d);
        }
    }
    kept
}

/// Maps one box from the model's convention to source-image pixels (x0,y0,x1,y1), clamped to
/// the image. `None` for non-finite or empty boxes.
pub(crate) fn map_box(raw: [f32; 4], format: BoxFormat, g: &Geometry) -> Option<[f32; 4]> {
    let [a, b, c, d] = raw;
    let (x0, y0, x1, y1) = match format {
        BoxFormat::YxyxNormalized => (b, a, d, c),
        BoxFormat::XyxyNormalized | BoxFormat::XyxyPixels => (a, b, c, d),
    };
    let (sx, sy) = match format {
        BoxFormat::XyxyPixels => (g.region.w / g.input_w, g.region.h / g.input_h),
        _ => (g.region.w, g.region.h),
    };
    let px = |v: f32| (g.region.x + v * sx).clamp(0.0, g.src_w);
    let py = |v: f32| (g.region.y + v * sy).clamp(0.0, g.src_h);
    let (x0, x1) = (px(x0.min(x1)), px(x0.max(x1)));
    let (y0, y1) = (py(y0.min(y1)), py(y0.max(y1)));
    let ok = [x0, y0, x1, y1].iter().all(|v| v.is_finite()) && x1 > x0 && y1 > y0;
    ok.then_some([x0, y0, x1, y1])
}

/// A detection model's outputs, already flattened (batch 1).
pub(crate) struct RawDetections<'a> {
    /// N x 4 values.
    pub boxes: &'a [f32],
    /// N (with `classes`) or N x `num_classes` values.
    pub scores: &'a [f32],
    pub num_classes: usize,
    /// N class ids, when the model emits them.
    pub classes: Option<&'a [f32]>,
    /// Valid boxes (from the count output), or `usize::MAX` to read all.
    pub count: usize,
}

/// How to decode [`RawDetections`].
pub(crate) struct DecodeOptions {
    pub format: BoxFormat,
    pub min_score: f32,
    pub top_k: usize,
    /// `Some(threshold)` to run NMS here (the graph has none).
    pub nms_iou: Option<f32>,
}

/// Decodes, filters and (optionally) suppresses detections; best first, at most `top_k`.
pub(crate) fn decode_detections(
    raw: &RawDetections,
    opt: &DecodeOptions,
    g: &Geometry,
) -> Vec<BoxDet> {
    let per_box = if raw.classes.is_some() {
        1
    } else {
        raw.num_classes.max(1)
    };
    let mut n = raw
        .count
        .min(raw.boxes.len() / 4)
        .min(raw.scores.len() / per_box);
    if let Some(classes) = raw.classes {
        n = n.min(classes.len());
    }
    let mut dets = Vec::new();
    for i in 0..n {
        let (class, score) = match raw.classes {
            Some(classes) => (classes[i], raw.scores[i]),
            None => {
                let row = &raw.scores[i * per_box..(i + 1) * per_box];
                let best = top_k(row, 1, f32::NEG_INFINITY);
                match best.first() {
                    Some(&(c, s)) => (c as f32, s),
                    None => continue,
                }
            }
        };
        let valid_class = class.is_finite() && class >= 0.0 && class < u32::MAX as f32;
        if score.is_nan() || score < opt.min_score || !valid_class {
            continue;
        }
        let b = &raw.boxes[i * 4..i * 4 + 4];
        if let Some(bbox) = map_box([b[0], b[1], b[2], b[3]], opt.format, g) {
            dets.push(BoxDet {
                class_id: class.round() as u32,
                score,
                bbox,
            });
        }
    }
    if let Some(threshold) = opt.nms_iou {
        dets = nms(dets, threshold);
    } else {
        dets.sort_by(|a, b| b.score.total_cmp(&a.score));
    }
    dets.truncate(opt.top_k);
    dets
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::preprocess::Rect;

    fn geometry(src_w: f32, src_h: f32, region: Rect, input_w: f32, input_h: f32) -> Geometry {
        Geometry {
            src_w,
            src_h,
            region,
            input_w,
            input_h,
        }
    }

    fn full(w: f32, h: f32) -> Rect {
        Rect {
            x: 0.0,
            y: 0.0,
            w,
            h,
        }
    }

    fn det(class_id: u32, score: f32, bbox: [f32; 4]) -> BoxDet {
        BoxDet {
            class_id,
            score,
            bbox,
        }
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut v = [1.0, 3.0, 2.0];
        softmax(&mut v);
        assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{v:?}");
        assert!(v[1] > v[2] && v[2] > v[0], "{v:?}");
        // Large logits do not overflow.
        let mut big = [1000.0, -1000.0, 0.0];
        softmax(&mut big);
        assert!(
            big.iter().all(|x| x.is_finite()) && big[0] > 0.999,
            "{big:?}"
        );
        let mut w = [0.0, 0.0];
        softmax(&mut w);
        assert_eq!(w, [0.5, 0.5]);
    }

    #[test]
    fn top_k_is_best_first_with_ties_by_index_and_drops_nan() {
        let scores = [0.1, 0.5, f32::NAN, 0.5, 0.9, 0.05];
        assert_eq!(top_k(&scores, 3, 0.0), vec![(4, 0.9), (1, 0.5), (3, 0.5)]);
        assert_eq!(top_k(&scores, 10, 0.1).len(), 4);
        assert_eq!(top_k(&scores, 10, 0.6), vec![(4, 0.9)]);
        assert!(top_k(&scores, 0, 0.0).is_empty());
        assert!(top_k(&[], 5, 0.0).is_empty());
    }

    #[test]
    fn iou_of_identical_disjoint_and_half_overlapping_boxes() {
        let a = [0.0, 0.0, 10.0, 10.0];
        assert!((iou(&a, &a) - 1.0).abs() < 1e-6);
        assert_eq!(iou(&a, &[20.0, 20.0, 30.0, 30.0]), 0.0);
        // Overlap 5x10 = 50; union 100 + 100 - 50 = 150.
        assert!((iou(&a, &[5.0, 0.0, 15.0, 10.0]) - 50.0 / 150.0).abs() < 1e-6);
        assert_eq!(iou(&[0.0; 4], &[0.0; 4]), 0.0);
    }

    #[test]
    fn nms_suppresses_same_class_overlaps_and_keeps_other_classes() {
        let dets = vec![
            det(1, 0.8, [0.0, 0.0, 10.0, 10.0]),
            det(1, 0.9, [1.0, 0.0, 11.0, 10.0]), // best; overlaps the first by 0.82
            det(2, 0.7, [0.0, 0.0, 10.0, 10.0]), // other class: kept
            det(1, 0.6, [50.0, 50.0, 60.0, 60.0]), // same class, far away: kept
        ];
        let kept = nms(dets, 0.5);
        let scores: Vec<f32> = kept.iter().map(|d| d.score).collect();
        assert_eq!(scores, vec![0.9, 0.7, 0.6]);
    }

    #[test]
    fn maps_normalised_yxyx_to_source_pixels() {
        let g = geometry(640.0, 480.0, full(640.0, 480.0), 512.0, 384.0);
        let b = map_box([0.25, 0.5, 0.75, 1.0], BoxFormat::YxyxNormalized, &g);
        assert_eq!(b, Some([320.0, 120.0, 640.0, 360.0]));
        // Out of range is clamped; swapped corners are ordered; empty and NaN boxes are dropped.
        let b = map_box([1.2, 0.5, -0.1, 0.0], BoxFormat::YxyxNormalized, &g);
        assert_eq!(b, Some([0.0, 0.0, 320.0, 480.0]));
        assert_eq!(
            map_box([0.5, 0.5, 0.5, 0.9], BoxFormat::YxyxNormalized, &g),
            None
        );
        assert_eq!(
            map_box([f32::NAN, 0.0, 1.0, 1.0], BoxFormat::YxyxNormalized, &g),
            None
        );
    }

    #[test]
    fn maps_pixel_boxes_through_a_center_crop() {
        // 400x200 source, centre crop 200x200 at x=100, scaled to a 100x100 input.
        let crop = Rect {
            x: 100.0,
            y: 0.0,
            w: 200.0,
            h: 200.0,
        };
        let g = geometry(400.0, 200.0, crop, 100.0, 100.0);
        let b = map_box([10.0, 20.0, 50.0, 100.0], BoxFormat::XyxyPixels, &g);
        assert_eq!(b, Some([120.0, 40.0, 200.0, 200.0]));
        let b = map_box([0.0, 0.0, 0.5, 0.5], BoxFormat::XyxyNormalized, &g);
        assert_eq!(b, Some([100.0, 0.0, 200.0, 100.0]));
    }

    #[test]
    fn decodes_count_scores_classes_and_limits() {
        let g = geometry(100.0, 100.0, full(100.0, 100.0), 100.0, 100.0);
        let boxes = [
            0.0, 0.0, 0.5, 0.5, // 0: kept
            0.0, 0.0, 0.5, 0.5, // 1: below min_score
            0.5, 0.5, 1.0, 1.0, // 2: kept
            0.0, 0.0, 1.0, 1.0, // 3: beyond count
        ];
        let raw = RawDetections {
            boxes: &boxes,
            scores: &[0.6, 0.4, 0.9, 0.99],
            num_classes: 1,
            classes: Some(&[1.0, 1.0, 3.0, 1.0]),
            count: 3,
        };
        let opt = DecodeOptions {
            format: BoxFormat::YxyxNormalized,
            min_score: 0.5,
            top_k: 10,
            nms_iou: None,
        };
        let dets = decode_detections(&raw, &opt, &g);
        assert_eq!(
            dets,
            vec![
                det(3, 0.9, [50.0, 50.0, 100.0, 100.0]),
                det(1, 0.6, [0.0, 0.0, 50.0, 50.0])
            ]
        );
        let opt = DecodeOptions { top_k: 1, ..opt };
        assert_eq!(decode_detections(&raw, &opt, &g).len(), 1);
    }

    #[test]
    fn decodes_per_class_score_rows_and_runs_nms() {
        let g = geometry(10.0, 10.0, full(10.0, 10.0), 10.0, 10.0);
        let boxes = [0.0, 0.0, 5.0, 5.0, 0.0, 0.0, 5.0, 5.0, 0.0, 0.0, 5.0, 5.0];
        // Three boxes, two classes each: class = best column.
        let scores = [0.1, 0.8, 0.7, 0.2, 0.1, 0.6];
        let raw = RawDetections {
            boxes: &boxes,
            scores: &scores,
            num_classes: 2,
            classes: None,
            count: usize::MAX,
        };
        let opt = DecodeOptions {
            format: BoxFormat::XyxyPixels,
            min_score: 0.0,
            top_k: 10,
            nms_iou: Some(0.5),
        };
        let dets = decode_detections(&raw, &opt, &g);
        let got: Vec<(u32, f32)> = dets.iter().map(|d| (d.class_id, d.score)).collect();
        assert_eq!(got, vec![(1, 0.8), (0, 0.7)]);
    }
}
