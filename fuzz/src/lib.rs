//! What the fuzz targets share: an allocator that refuses any single allocation over
//! [`MAX_ALLOCATION`], so that a decoder an input makes allocate much fails the run (Rust's
//! allocation-error handler aborts with "memory allocation of N bytes failed", which libFuzzer
//! reports as a crash and saves the input). The targets run the decoders with small limits,
//! under which nothing needs more than a few hundred KiB; without a sanitizer (scripts/fuzz.sh
//! builds with `--sanitizer none`) libFuzzer's own `-malloc_limit_mb` does not work, and a
//! large zeroed allocation would not show in its RSS limit either.

use std::alloc::{GlobalAlloc, Layout, System};

pub use fovea::fuzzing::{EXPIRE, ROUND_TRIP, aggregator_limits, pieces};

/// The largest single allocation a target may make.
pub const MAX_ALLOCATION: usize = 32 << 20;

/// [`System`], refusing allocations over [`MAX_ALLOCATION`].
pub struct Capped;

// SAFETY: forwards to `System` unchanged, or returns null, which `GlobalAlloc` allows for a
// request the allocator cannot serve.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;
