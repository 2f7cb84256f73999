//! Camera ids from MQTT topics.
//!
//! Cameras publish on a topic that names them; fovea subscribes with filters that have exactly one
//! `+` level (checked by config validation), and that level of the concrete topic is the camera id:
//! filter `cameras/+/frames`, topic `cameras/dock-3/frames` -> camera `dock-3`.

/// Returns the camera id of `topic` under the first filter in `filters` that matches it, or `None`
/// when no filter matches or the id is not a valid camera id.
pub fn camera_id<'t>(filters: &[String], topic: &'t str) -> Option<&'t str> {
    filters.iter().find_map(|f| match_filter(f, topic))
}

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
    camera.filter(|c| is_valid_camera_id(c))
}

/// Camera ids go into Kafka keys, record ids and file names: keep them to a safe alphabet.
pub fn is_valid_camera_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
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
    }

    #[test]
    fn unsafe_camera_ids_are_refused() {
        assert_eq!(camera_id(&filters(), "cameras//frames"), None);
        assert_eq!(camera_id(&filters(), "cameras/a b/frames"), None);
        assert_eq!(camera_id(&filters(), "cameras/ü/frames"), None);
    }
}
