//! A panic is one frame's problem: the stages run the work on one frame (decode, preprocess,
//! infer, build its records) inside [`contain`], which turns a panic into
//! [`Rejection::Internal`] with the panic's message and where it happened. The frame is then
//! dead-lettered as `internal-error` and acked like any refused payload, so a frame that makes
//! fovea panic is not redelivered forever, and the worker goes on with the next frame.
//!
//! This needs `panic = "unwind"` (the release profile says so); with `abort` a panic still ends
//! the process and the frame is redelivered after the restart.

use super::Rejection;
use std::any::Any;
use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// Where the last panic on this thread happened, set by the hook [`contain`] installs.
    static LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs `work`; a panic in it becomes `Err(Rejection::Internal("<message> at <file:line>"))`.
///
/// `AssertUnwindSafe`: what `work` borrows is one frame's data, which is dropped with the
/// rejection, plus long-lived state (ONNX Runtime sessions, counters) whose Rust side keeps no
/// invariant half-updated across a model run, and whose locks tolerate poisoning.
pub fn contain<T>(work: impl FnOnce() -> T) -> Result<T, Rejection> {
    install_hook();
    LOCATION.with(|l| l.borrow_mut().take());
    panic::catch_unwind(AssertUnwindSafe(work)).map_err(|payload| {
        let location = LOCATION.with(|l| l.borrow_mut().take());
        Rejection::Internal(describe(payload.as_ref(), location.as_deref()))
    })
}

/// The panic's message (a `&str` or `String` payload, as `panic!` makes), and where.
fn describe(payload: &(dyn Any + Send), location: Option<&str>) -> String {
    let message = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-text payload".to_string()
    };
    match location {
        Some(at) => format!("panic: {message} (at {at})"),
        None => format!("panic: {message}"),
    }
}

/// Adds the location to the thread-local before the previous hook (which prints the panic to
/// stderr, so the journal has it with a backtrace when RUST_BACKTRACE is set) runs.
fn install_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()));
            LOCATION.with(|l| *l.borrow_mut() = at);
            previous(info);
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_internal_error_with_its_message_and_place() {
        let err = contain(|| -> u32 { panic!("boom {}", 7) }).unwrap_err();
        assert_eq!(err.kind(), "internal-error");
        let text = err.to_string();
        assert!(text.contains("panic: boom 7 (at "), "{text}");
        assert!(text.contains("panic.rs:"), "{text}");
        let err = contain(|| -> u32 { std::panic::panic_any(42_u8) }).unwrap_err();
        assert!(err.to_string().contains("non-text payload"), "{err}");
    }

    #[test]
    fn work_that_does_not_panic_returns_its_value() {
        assert_eq!(contain(|| 2 + 2), Ok(4));
    }
}
