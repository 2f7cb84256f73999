//! What `fovea frames export` refuses to do whatever a record says: write outside its output
//! folder, or fetch a claim check from a URL the user did not allow.
//!
//! Records come from a Kafka topic that anything with access to the broker can write to, so
//! their camera ids, record ids and claim-check URLs are outside input. A file name is made only
//! from components that pass [`is_safe_component`] (no `/`, no `..`, no leading `.`), and a claim
//! check is fetched only from under one of the allowed URL prefixes (by default the node's own
//! `large_frames.public_url`).

use crate::ingress::topic::{is_safe_component, is_valid_camera_id};
use std::path::{Path, PathBuf};

/// Longest frame id (the last level of a record id) used as a file name.
const MAX_FRAME_ID_BYTES: usize = 128;

/// The file `<out>/<camera>/<frame id>.<ext>` for a frame record, or why there is none.
pub fn frame_path(out: &Path, camera: &str, record_id: &str, ext: &str) -> Result<PathBuf, String> {
    if !is_valid_camera_id(camera) {
        return Err(format!(
            "record {record_id:?} names camera {}",
            crate::ingress::topic::why_invalid(camera)
        ));
    }
    let frame_id = record_id.rsplit('/').next().unwrap_or_default();
    if !is_safe_component(frame_id) || frame_id.len() > MAX_FRAME_ID_BYTES {
        return Err(format!(
            "record id {record_id:?} does not end in a safe frame id (one path component of \
             ASCII letters, digits, '-', '_' and '.', not starting with '.')"
        ));
    }
    let path = out.join(camera).join(format!("{frame_id}.{ext}"));
    // Both components were checked above; this guards the check itself.
    if !path.starts_with(out) || path.components().count() != out.components().count() + 2 {
        return Err(format!(
            "{} is not inside {}",
            path.display(),
            out.display()
        ));
    }
    Ok(path)
}

/// The URL prefixes claim checks may be fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlAllowList {
    prefixes: Vec<String>,
    /// Why the list is empty, when it is (said on every refusal).
    why_empty: Option<String>,
}

impl UrlAllowList {
    /// Prefixes given by the user (`--allow-url`) or taken from the node's config. Each must be an
    /// `http://host[:port][/path]` URL; a trailing `/` is ignored.
    pub fn new(prefixes: &[String]) -> Result<UrlAllowList, String> {
        let mut out = Vec::new();
        for p in prefixes {
            let rest = p.strip_prefix("http://").ok_or_else(|| {
                format!("allowed URL prefix {p:?}: only http://host[:port][/path] prefixes are supported")
            })?;
            let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
            if host.is_empty() || host.contains('@') {
                return Err(format!(
                    "allowed URL prefix {p:?}: expected a host (and no user name) after http://"
                ));
            }
            out.push(p.trim_end_matches('/').to_string());
        }
        Ok(UrlAllowList {
            prefixes: out,
            why_empty: None,
        })
    }

    /// No URL allowed, and why (said with every refusal).
    pub fn none(why: String) -> UrlAllowList {
        UrlAllowList {
            prefixes: Vec::new(),
            why_empty: Some(why),
        }
    }

    pub fn prefixes(&self) -> &[String] {
        &self.prefixes
    }

    /// Whether `url` may be fetched; if not, why. A prefix matches only up to a boundary
    /// (`http://h:80` allows `http://h:80/blobs/x`, not `http://h:8080/...` nor
    /// `http://h:80.evil/...`), and a URL with `..`/`.` segments or encoded dots, which could
    /// climb out of the prefix's path on the server, is refused.
    pub fn check(&self, url: &str) -> Result<(), String> {
        if let Some(why) = &self.why_empty {
            return Err(format!("claim check URL {url:?} refused: {why}"));
        }
        let path = url.split(['?', '#']).next().unwrap_or_default();
        let lowered = path.to_ascii_lowercase();
        if path.split('/').any(|s| s == ".." || s == ".")
            || lowered.contains("%2e")
            || lowered.contains("%2f")
            || path.contains('\\')
        {
            return Err(format!(
                "claim check URL {url:?} refused: its path has '.' or '..' segments, encoded dots or slashes, or backslashes"
            ));
        }
        let allowed = self.prefixes.iter().any(|prefix| {
            url.strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?']))
        });
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "claim check URL {url:?} refused: it is not under an allowed prefix ({}); \
                 pass --allow-url PREFIX to fetch from there",
                self.prefixes.join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_records_get_a_file_inside_the_folder() {
        let out = Path::new("/tmp/export");
        assert_eq!(
            frame_path(out, "cam-1", "node/cam-1/s42", "jpg").unwrap(),
            Path::new("/tmp/export/cam-1/s42.jpg") // not a sample photo
        );
        assert_eq!(
            frame_path(out, "dock.3", "n/dock.3/h0123abcd", "png").unwrap(),
            Path::new("/tmp/export/dock.3/h0123abcd.png") // not a sample photo
        );
    }

    #[test]
    fn hostile_records_are_refused_with_the_reason() {
        let out = Path::new("/tmp/export");
        for camera in ["../x", "/abs", "..", ".", ".hidden", "", "a/b", "a\\b", "ü"] {
            let err = frame_path(out, camera, "n/c/s1", "jpg").unwrap_err();
            assert!(err.contains("names camera"), "{camera}: {err}");
        }
        for record_id in ["n/c/..", "n/c/.", "n/c/", "n/c/.x", "n/c/a b", "n/c/a\\b"] {
            let err = frame_path(out, "c", record_id, "jpg").unwrap_err();
            assert!(err.contains("safe frame id"), "{record_id}: {err}");
        }
        let long = format!("n/c/{}", "a".repeat(129));
        assert!(frame_path(out, "c", &long, "jpg").is_err());
    }

    #[test]
    fn claim_urls_must_be_under_an_allowed_prefix() {
        let allow = UrlAllowList::new(&["http://127.0.0.1:8080/".to_string()]).unwrap();
        assert_eq!(allow.prefixes(), ["http://127.0.0.1:8080"]);
        assert!(allow.check("http://127.0.0.1:8080/blobs/abc").is_ok());
        for url in [
            "http://127.0.0.1:80801/blobs/abc",
            "http://127.0.0.1:8080.evil.example/blobs/abc",
            "http://127.0.0.1:8080@evil.example/blobs/abc",
            "http://evil.example/blobs/abc",
            "https://127.0.0.1:8080/blobs/abc",
            "file:///etc/passwd",
        ] {
            let err = allow.check(url).unwrap_err();
            assert!(err.contains("not under an allowed prefix"), "{url}: {err}");
            assert!(err.contains("--allow-url"), "{err}");
        }
        let with_path = UrlAllowList::new(&["http://h:1/blobs".to_string()]).unwrap();
        assert!(with_path.check("http://h:1/blobs/x").is_ok());
        assert!(with_path.check("http://h:1/blobsy/x").is_err());
        for url in [
            "http://h:1/blobs/../admin",
            "http://h:1/blobs/%2e%2e/admin",
            "http://h:1/blobs/./x",
            "http://h:1/blobs/..%2fadmin",
        ] {
            let err = with_path.check(url).unwrap_err();
            assert!(err.contains("segments"), "{url}: {err}");
        }
    }

    #[test]
    fn bad_prefixes_and_an_empty_list_say_why() {
        assert!(UrlAllowList::new(&["https://h/".into()]).is_err());
        assert!(UrlAllowList::new(&["http://".into()]).is_err());
        assert!(UrlAllowList::new(&["http://u@h/".into()]).is_err());
        let none = UrlAllowList::none("no config".into());
        assert_eq!(
            none.check("http://h/x").unwrap_err(),
            "claim check URL \"http://h/x\" refused: no config"
        );
    }
}
