//! The claim-check server's request parser (the `/metrics` endpoint reads requests the same way):
//! `fovea::fuzzing::parse_request` (the head as the servers read it, 8 KiB at most, then the
//! request line) and `route`.
//!
//! Checks: never a panic; a request has an upper-case method and a target that starts with `/`
//! and holds no space; a blob route's id is the path after `/blobs/`; 431 only for at least
//! 8 KiB of input, "incomplete" only for less.
#![no_main]

use fovea::fuzzing::{MAX_REQUEST_HEAD, ParsedRequest, Route, parse_request, route};
use fovea_fuzz as _;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limit = MAX_REQUEST_HEAD as usize;
    match parse_request(data) {
        ParsedRequest::Request { method, target } => {
            assert!(!method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase()));
            assert!(
                target.starts_with('/') && !target.contains(' '),
                "{target:?}"
            );
            let path = target.split('?').next().unwrap_or_default();
            match route(&method, &target) {
                Route::Blob(id) => assert_eq!(path, format!("/blobs/{id}")),
                Route::Health => assert_eq!(path, "/healthz"),
                Route::MethodNotAllowed => assert!(method != "GET" && method != "HEAD"),
                Route::NotFound => assert!(path != "/healthz" && !path.starts_with("/blobs/")),
            }
        }
        ParsedRequest::Refused { status: 431, .. } => assert!(data.len() >= limit),
        ParsedRequest::Refused { status, why } => assert!(status == 400 && !why.is_empty()),
        ParsedRequest::Incomplete => assert!(data.len() < limit),
    }
});
