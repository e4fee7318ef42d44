//! A heap guard for this test binary: the system allocator, counting live bytes, which refuses
//! any allocation that would take the live heap above a limit. A refused allocation aborts the
//! process through `handle_alloc_error` after one line on stderr naming the limit, so that an
//! input which makes a reader allocate without bound (a fuzzed length, a blown-up search) fails
//! here, loudly and reproducibly (the fuzz seeds are fixed), instead of running the machine out
//! of memory until the kernel's OOM killer takes the test binary with a bare SIGKILL.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The live-heap limit. Every test here needs well under 0.5 GiB; CI machines have 24 GiB.
const LIMIT: usize = 6 << 30;

pub struct Guarded;

static LIVE: AtomicUsize = AtomicUsize::new(0);

impl Guarded {
    fn admit(&self, size: usize) -> bool {
        let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
        if live <= LIMIT {
            return true;
        }
        LIVE.fetch_sub(size, Ordering::Relaxed);
        // No allocation here: format into a stack buffer.
        let mut msg = [0u8; 160];
        let mut w = &mut msg[..];
        let _ = writeln!(
            w,
            "heap guard: refusing {size} bytes with {} bytes live (limit {} GiB)",
            live - size,
            LIMIT >> 30
        );
        let used = 160 - w.len();
        let _ = std::io::stderr().write_all(&msg[..used]);
        false
    }
}

impl Guarded {
    /// Admits `size` bytes, then allocates them with `allocate` (undoing the count if it fails).
    fn allocate(&self, size: usize, allocate: impl FnOnce() -> *mut u8) -> *mut u8 {
        if !self.admit(size) {
            return std::ptr::null_mut();
        }
        let p = allocate();
        if p.is_null() {
            LIVE.fetch_sub(size, Ordering::Relaxed);
        }
        p
    }
}

unsafe impl GlobalAlloc for Guarded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.allocate(layout.size(), || unsafe { System.alloc(layout) })
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.allocate(layout.size(), || unsafe { System.alloc_zeroed(layout) })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        if new_size > old && !self.admit(new_size - old) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            if new_size > old {
                LIVE.fetch_sub(new_size - old, Ordering::Relaxed);
            }
        } else if new_size < old {
            LIVE.fetch_sub(old - new_size, Ordering::Relaxed);
        }
        p
    }
}
