//! Which frames go to the cloud.
//!
//! Results are always replicated (they are small); frames are not, because the uplink is often a
//! metered link. An operator chooses the frames worth paying for: those with a label they care
//! about, above a score, at most so many per camera per minute, optionally as a thumbnail.
//!
//! [`FrameSelector`] is pure: the caller passes the clock, so the rate limit is tested without
//! sleeping.

use fovea_proto::v1::InferenceResult;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Width of the per-camera rate-limit window.
const WINDOW: Duration = Duration::from_secs(60);
/// A camera with no frame sent for this long is forgotten, so a node that has seen many camera
/// ids (renamed, replaced) does not keep their history forever.
const IDLE_FORGET: Duration = Duration::from_secs(120);
/// How often the idle cameras are swept (a sweep walks every camera, so not on every frame).
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The `[uplink.frames]` rules (config). The default replicates no frames.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FrameRules {
    /// False: no frames are replicated at all (results always are).
    pub enabled: bool,
    /// Send a frame if any classification or detection label matches one of these,
    /// case-insensitively; a model label line like `"tabby, tabby cat"` also matches each of its
    /// comma-separated names. Empty: any label.
    pub labels: Vec<String>,
    /// ...with at least this score. 0.0: any score.
    pub min_score: f32,
    /// Frames sent per camera in any 60 s window; 0 = unlimited. Caps the cost of a camera that
    /// sees a matching label all day.
    pub max_per_camera_per_minute: u32,
    /// 0: send the full image; else a JPEG whose longest side is at most this many pixels.
    pub thumbnail_max_side: u32,
}

impl Default for FrameRules {
    fn default() -> Self {
        Self {
            enabled: false,
            labels: Vec::new(),
            min_score: 0.0,
            max_per_camera_per_minute: 0,
            thumbnail_max_side: 0,
        }
    }
}

/// What to do with one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Send,
    Skip(SkipReason),
}

/// Why a frame was not replicated; each has a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// Frame replication is off.
    Disabled,
    /// No prediction matched the labels and score.
    NoMatch,
    /// The camera already sent its allowance in the last 60 s.
    RateLimited,
}

impl SkipReason {
    /// Stable name for counters and logs.
    pub fn name(self) -> &'static str {
        match self {
            SkipReason::Disabled => "disabled",
            SkipReason::NoMatch => "no-match",
            SkipReason::RateLimited => "rate-limited",
        }
    }
}

/// Applies [`FrameRules`] to results, one camera's rate limit each.
#[derive(Debug)]
pub struct FrameSelector {
    rules: FrameRules,
    /// The configured labels, trimmed and lower-cased once rather than per frame.
    labels: Vec<String>,
    /// Per camera, when its frames were sent within the last [`WINDOW`] (at most
    /// `max_per_camera_per_minute` entries). Empty when there is no rate limit.
    recent: HashMap<String, VecDeque<Instant>>,
    /// When idle cameras were last swept out of `recent`.
    last_sweep: Option<Instant>,
}

impl FrameSelector {
    pub fn new(rules: FrameRules) -> Self {
        let labels = rules
            .labels
            .iter()
            .map(|l| l.trim().to_lowercase())
            .collect();
        Self {
            rules,
            labels,
            recent: HashMap::new(),
            last_sweep: None,
        }
    }

    pub fn rules(&self) -> &FrameRules {
        &self.rules
    }

    /// Decides whether `result`'s frame goes to the cloud. A `Send` counts against the camera's
    /// rate limit, so call this once per frame and only send on `Send`. `now` must come from a
    /// monotonic clock; a clock that steps back is treated as no time passing.
    pub fn decide(&mut self, result: &InferenceResult, now: Instant) -> Verdict {
        if !self.rules.enabled {
            return Verdict::Skip(SkipReason::Disabled);
        }
        if !self.matches(result) {
            return Verdict::Skip(SkipReason::NoMatch);
        }
        self.sweep(now);
        let max = self.rules.max_per_camera_per_minute as usize;
        if max == 0 {
            return Verdict::Send;
        }
        // Allocate the camera id only for a camera not seen in the last two minutes.
        let times = match self.recent.get_mut(result.camera_id.as_str()) {
            Some(times) => times,
            None => self.recent.entry(result.camera_id.clone()).or_default(),
        };
        while times
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= WINDOW)
        {
            times.pop_front();
        }
        if times.len() >= max {
            return Verdict::Skip(SkipReason::RateLimited);
        }
        times.push_back(now);
        Verdict::Send
    }

    /// How many cameras have rate-limit history (memory is bounded by cameras active in the last
    /// two minutes).
    pub fn tracked_cameras(&self) -> usize {
        self.recent.len()
    }

    /// True if a prediction passes the label and score filters. With both filters off every
    /// frame matches, including one with no predictions (no model routed, or skipped as stale):
    /// "enabled, no labels, no score" means "send every frame".
    fn matches(&self, result: &InferenceResult) -> bool {
        if self.labels.is_empty() && self.rules.min_score <= 0.0 {
            return true;
        }
        let predictions = result.outputs.iter().flat_map(|o| {
            let classes = o
                .classifications
                .iter()
                .map(|c| (c.label.as_str(), c.score));
            classes.chain(o.detections.iter().map(|d| (d.label.as_str(), d.score)))
        });
        for (label, score) in predictions {
            if score >= self.rules.min_score && self.label_matches(label) {
                return true;
            }
        }
        false
    }

    fn label_matches(&self, label: &str) -> bool {
        if self.labels.is_empty() {
            return true;
        }
        let label = label.trim().to_lowercase();
        std::iter::once(label.as_str())
            .chain(label.split(", "))
            .any(|name| self.labels.iter().any(|want| want == name.trim()))
    }

    /// Forgets cameras with no frame sent for [`IDLE_FORGET`], at most once per [`SWEEP_EVERY`].
    fn sweep(&mut self, now: Instant) {
        if self
            .last_sweep
            .is_some_and(|t| now.saturating_duration_since(t) < SWEEP_EVERY)
        {
            return;
        }
        self.last_sweep = Some(now);
        self.recent.retain(|_, times| {
            times
                .back()
                .is_some_and(|&t| now.saturating_duration_since(t) <= IDLE_FORGET)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fovea_proto::v1::{Classification, Detection, ModelOutput};

    fn result(camera: &str, classes: &[(&str, f32)], boxes: &[(&str, f32)]) -> InferenceResult {
        InferenceResult {
            camera_id: camera.into(),
            outputs: vec![ModelOutput {
                classifications: classes
                    .iter()
                    .map(|&(label, score)| Classification {
                        label: label.into(),
                        score,
                        ..Default::default()
                    })
                    .collect(),
                detections: boxes
                    .iter()
                    .map(|&(label, score)| Detection {
                        label: label.into(),
                        score,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn rules(labels: &[&str], min_score: f32, max: u32) -> FrameRules {
        FrameRules {
            enabled: true,
            labels: labels.iter().map(|l| l.to_string()).collect(),
            min_score,
            max_per_camera_per_minute: max,
            thumbnail_max_side: 0,
        }
    }

    const NO_MATCH: Verdict = Verdict::Skip(SkipReason::NoMatch);
    const LIMITED: Verdict = Verdict::Skip(SkipReason::RateLimited);

    #[test]
    fn default_sends_nothing() {
        let mut s = FrameSelector::new(FrameRules::default());
        let r = result("cam-1", &[("person", 0.9)], &[]);
        assert_eq!(
            s.decide(&r, Instant::now()),
            Verdict::Skip(SkipReason::Disabled)
        );
    }

    #[test]
    fn labels_match_case_insensitively_and_by_comma_separated_name() {
        let mut s = FrameSelector::new(rules(&["Tabby Cat", " PERSON "], 0.0, 0));
        let now = Instant::now();
        let tabby = result("cam-1", &[("tabby, tabby cat", 0.1)], &[]);
        assert_eq!(s.decide(&tabby, now), Verdict::Send);
        let person = result("cam-1", &[], &[("Person", 0.5)]);
        assert_eq!(s.decide(&person, now), Verdict::Send);
        let mut whole_line = FrameSelector::new(rules(&["tabby, tabby cat"], 0.0, 0));
        assert_eq!(whole_line.decide(&tabby, now), Verdict::Send);
        // A substring is not a match.
        let tiger = result("cam-1", &[("tiger cat", 0.9)], &[("cat", 0.9)]);
        assert_eq!(s.decide(&tiger, now), NO_MATCH);
    }

    #[test]
    fn min_score_applies_to_the_matching_prediction() {
        let mut s = FrameSelector::new(rules(&["person"], 0.5, 0));
        let now = Instant::now();
        // A confident prediction of another label does not lift a weak "person".
        let weak = result("cam-1", &[("barbell", 0.9)], &[("person", 0.4)]);
        assert_eq!(s.decide(&weak, now), NO_MATCH);
        let exact = result("cam-1", &[], &[("person", 0.5)]);
        assert_eq!(s.decide(&exact, now), Verdict::Send);
    }

    #[test]
    fn empty_labels_match_any_label_above_the_score() {
        let mut s = FrameSelector::new(rules(&[], 0.8, 0));
        let now = Instant::now();
        assert_eq!(
            s.decide(&result("c", &[("barbell", 0.81)], &[]), now),
            Verdict::Send
        );
        assert_eq!(
            s.decide(&result("c", &[("barbell", 0.79)], &[]), now),
            NO_MATCH
        );
        assert_eq!(s.decide(&result("c", &[], &[]), now), NO_MATCH);
    }

    #[test]
    fn no_filters_send_every_frame_even_without_predictions() {
        let mut s = FrameSelector::new(rules(&[], 0.0, 0));
        let bare = InferenceResult {
            camera_id: "cam-1".into(),
            ..Default::default()
        };
        assert_eq!(s.decide(&bare, Instant::now()), Verdict::Send);
    }

    #[test]
    fn rate_limit_is_a_sliding_window_per_camera() {
        let mut s = FrameSelector::new(rules(&["person"], 0.0, 2));
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let cam1 = result("cam-1", &[("person", 1.0)], &[]);
        let cam2 = result("cam-2", &[("person", 1.0)], &[]);
        assert_eq!(s.decide(&cam1, at(0)), Verdict::Send);
        assert_eq!(s.decide(&cam1, at(30)), Verdict::Send);
        assert_eq!(s.decide(&cam1, at(59)), LIMITED);
        assert_eq!(
            s.decide(&cam2, at(59)),
            Verdict::Send,
            "cameras are independent"
        );
        // The send at 0 leaves the window at 60 s; the one at 30 is still in it.
        assert_eq!(s.decide(&cam1, at(60)), Verdict::Send);
        assert_eq!(s.decide(&cam1, at(61)), LIMITED);
        assert_eq!(s.decide(&cam1, at(90)), Verdict::Send);
    }

    #[test]
    fn only_matching_frames_count_against_the_rate_limit() {
        let mut s = FrameSelector::new(rules(&["person"], 0.0, 1));
        let t0 = Instant::now();
        for i in 0..100 {
            let other = result("cam-1", &[("barbell", 1.0)], &[]);
            assert_eq!(s.decide(&other, t0 + Duration::from_millis(i)), NO_MATCH);
        }
        let person = result("cam-1", &[("person", 1.0)], &[]);
        assert_eq!(
            s.decide(&person, t0 + Duration::from_secs(1)),
            Verdict::Send
        );
        assert_eq!(s.decide(&person, t0 + Duration::from_secs(2)), LIMITED);
    }

    #[test]
    fn idle_cameras_are_forgotten() {
        let mut s = FrameSelector::new(rules(&[], 0.0, 5));
        let t0 = Instant::now();
        for i in 0..50 {
            s.decide(&result(&format!("cam-{i}"), &[], &[]), t0);
        }
        assert_eq!(s.tracked_cameras(), 50);
        let later = t0 + IDLE_FORGET + SWEEP_EVERY;
        assert_eq!(s.decide(&result("cam-new", &[], &[]), later), Verdict::Send);
        assert_eq!(s.tracked_cameras(), 1);
    }

    #[test]
    fn a_clock_stepping_back_does_not_panic() {
        let mut s = FrameSelector::new(rules(&[], 0.0, 1));
        let t0 = Instant::now() + Duration::from_secs(600);
        let r = result("cam-1", &[], &[]);
        assert_eq!(s.decide(&r, t0), Verdict::Send);
        assert_eq!(s.decide(&r, t0 - Duration::from_secs(300)), LIMITED);
    }

    #[test]
    fn skip_reason_names() {
        let names: Vec<_> = [
            SkipReason::Disabled,
            SkipReason::NoMatch,
            SkipReason::RateLimited,
        ]
        .map(SkipReason::name)
        .into();
        assert_eq!(names, ["disabled", "no-match", "rate-limited"]);
    }

    #[test]
    fn config_defaults_and_unknown_keys() {
        let parsed: FrameRules = toml::from_str("enabled = true\nlabels = [\"person\"]").unwrap();
        assert_eq!(
            parsed,
            FrameRules {
                enabled: true,
                labels: vec!["person".into()],
                ..FrameRules::default()
            }
        );
        let typo = toml::from_str::<FrameRules>("min_scroe = 0.5").unwrap_err();
        assert!(typo.to_string().contains("min_scroe"), "{typo}");
    }
}
