//! Camera ids from MQTT topics.
//!
//! Cameras publish on a topic that names them; fovea subscribes with filters that have exactly one
//! `+` level (checked by config validation), and that level of the concrete topic is the camera id:
//! filter `cameras/+/frames`, topic `cameras/dock-3/frames` -> camera `dock-3`.
//!
//! A topic that matches a filter but whose camera level is no safe camera id (`..`, `.hidden`,
//! `a b`) is told apart from a topic that matches no filter: the broker delivered it because we
//! subscribed, so it is acked and dead-lettered as `bad-camera-id`, not `bad-topic`.

/// What a concrete topic means under a set of filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicMatch<'t> {
    /// A filter matches and its `+` level is a safe camera id.
    Camera(&'t str),
    /// A filter matches but its `+` level is not a safe camera id.
    BadCamera(&'t str),
    /// No filter matches.
    NoMatch,
}

/// What `topic` means under the first filter in `filters` that matches it.
pub fn classify<'t>(filters: &[String], topic: &'t str) -> TopicMatch<'t> {
    match filters.iter().find_map(|f| match_filter(f, topic)) {
        Some(id) if is_valid_camera_id(id) => TopicMatch::Camera(id),
        Some(id) => TopicMatch::BadCamera(id),
        None => TopicMatch::NoMatch,
    }
}

/// Returns the camera id of `topic` under the first filter in `filters` that matches it, or `None`
/// when no filter matches or the id is not a valid camera id.
pub fn camera_id<'t>(filters: &[String], topic: &'t str) -> Option<&'t str> {
    match classify(filters, topic) {
        TopicMatch::Camera(id) => Some(id),
        _ => None,
    }
}

/// The `+` level of `topic` under `filter`, whatever it holds; `None` if the filter does not match.
fn match_filter<'t>(filter: &str, topic: &'t str) -> Option<&'t str> {
    let mut camera = None;
    let mut levels = topic.split('/');
    for want in filter.split('/') {
        let got = levels.next()?;
        match want {
            "+" => camera = camera.or(Some(got)),
            _ if want == got => {}
            _ => return None,
        }
    }
    if levels.next().is_some() {
        return None;
    }
    camera
}

/// Longest camera id accepted.
pub const MAX_CAMERA_ID_BYTES: usize = 128;

/// Camera ids go into Kafka keys, record ids and file names (`fovea frames export` writes
/// `<out>/<camera>/...`), so each must be one safe path component: ASCII letters, digits, `-`,
/// `_` and `.`, at most 128 bytes, and not starting with `.` (which refuses `.`, `..` and hidden
/// names). A `/` cannot occur: MQTT splits levels on it.
pub fn is_valid_camera_id(id: &str) -> bool {
    is_safe_component(id) && id.len() <= MAX_CAMERA_ID_BYTES
}

/// Whether `name` is one path component that cannot leave or hide in its folder: non-empty,
/// only `[A-Za-z0-9._-]`, and no leading `.`. Used for camera ids and for the file names
/// `frames export` makes from records.
pub fn is_safe_component(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Why `id` is not a valid camera id, for the dead letter (the id quoted and cut to a readable
/// length, since it came from outside).
pub fn why_invalid(id: &str) -> String {
    let shown: String = id.chars().take(64).collect();
    let cut = if shown.len() < id.len() { "..." } else { "" };
    let why = if id.is_empty() {
        "it is empty"
    } else if id == "." || id == ".." {
        "it names a folder, not a camera"
    } else if id.starts_with('.') {
        "it starts with '.'"
    } else if id.len() > MAX_CAMERA_ID_BYTES {
        "it is longer than 128 bytes"
    } else {
        "only ASCII letters, digits, '-', '_' and '.' are allowed"
    };
    format!("{shown:?}{cut}: {why}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filters() -> Vec<String> {
        vec!["cameras/+/frames".into(), "site/a/+".into()]
    }

    #[test]
    fn camera_is_the_plus_level() {
        assert_eq!(camera_id(&filters(), "cameras/cam-1/frames"), Some("cam-1"));
        assert_eq!(camera_id(&filters(), "site/a/door.2"), Some("door.2"));
    }

    #[test]
    fn non_matching_topics_have_no_camera() {
        assert_eq!(camera_id(&filters(), "cameras/cam-1/frames/x"), None);
        assert_eq!(camera_id(&filters(), "cameras/cam-1"), None);
        assert_eq!(camera_id(&filters(), "other/cam-1/frames"), None);
        assert_eq!(
            classify(&filters(), "other/cam-1/frames"),
            TopicMatch::NoMatch
        );
    }

    #[test]
    fn unsafe_camera_ids_are_refused() {
        for topic in [
            "cameras//frames",
            "cameras/a b/frames",
            "cameras/ü/frames",
            "cameras/./frames",
            "cameras/../frames",
            "cameras/.hidden/frames",
            "cameras/a\\b/frames",
        ] {
            assert_eq!(camera_id(&filters(), topic), None, "{topic}");
            assert!(
                matches!(classify(&filters(), topic), TopicMatch::BadCamera(_)),
                "{topic}"
            );
        }
        let long = format!("cameras/{}/frames", "a".repeat(129));
        assert!(matches!(
            classify(&filters(), &long),
            TopicMatch::BadCamera(_)
        ));
        assert!(is_valid_camera_id(&"a".repeat(128)));
        assert!(is_valid_camera_id("v1.2"));
        assert!(is_valid_camera_id("_x"));
    }

    #[test]
    fn reasons_name_the_problem_and_quote_the_id() {
        assert_eq!(
            why_invalid(".."),
            r#""..": it names a folder, not a camera"#
        );
        assert_eq!(why_invalid(".cfg"), r#"".cfg": it starts with '.'"#);
        assert_eq!(
            why_invalid("a b"),
            r#""a b": only ASCII letters, digits, '-', '_' and '.' are allowed"#
        );
        let long = why_invalid(&"x".repeat(200));
        assert!(long.contains("...: it is longer than 128 bytes"), "{long}");
        assert!(long.len() < 120, "{long}");
    }
}
