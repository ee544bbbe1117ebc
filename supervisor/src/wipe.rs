//! The allocator of the `rampart` binary: the system allocator, which in the processes that
//! handle private keys (the supervisor, the keyring, the command-line client) zeroizes every block
//! before freeing it. A key that passed through a read buffer, a decoded request, a clone or a
//! parser's scratch space leaves no copy behind in freed memory. Workers, the hot path, do not pay
//! for it: for them this is the system allocator plus one relaxed load per free.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};

static WIPE: AtomicBool = AtomicBool::new(false);

/// From now on every block this process frees is zeroized first.
pub fn enable() {
    WIPE.store(true, Ordering::Relaxed);
}

pub struct WipingAllocator;

// SAFETY: every call is forwarded to the system allocator with the caller's layout; wiping only
// writes inside the block being freed, which the caller owns until the call returns.
unsafe impl GlobalAlloc for WipingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if WIPE.load(Ordering::Relaxed) {
            // SAFETY: `ptr` points to a live block of `layout.size()` bytes owned by the caller.
            // explicit_bzero is glibc's memset that the compiler may not remove as a dead store.
            unsafe { libc::explicit_bzero(ptr.cast(), layout.size()) };
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !WIPE.load(Ordering::Relaxed) {
            // SAFETY: forwarded unchanged.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // Never let the system allocator move a block: the old copy would be freed unwiped.
        // SAFETY: the caller guarantees `new_size` is valid for `layout.align()`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as in `alloc`.
        let new = unsafe { System.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are live and distinct; the copy stays within both.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wiping_realloc_moves_the_block_and_keeps_its_bytes() {
        enable();
        let a = WipingAllocator;
        let layout = Layout::from_size_align(64, 8).unwrap();
        unsafe {
            let p = a.alloc(layout);
            std::ptr::write_bytes(p, 0xA5, 64);
            let q = a.realloc(p, layout, 4096);
            assert_ne!(p, q, "a wiping realloc always moves");
            assert!(std::slice::from_raw_parts(q, 64).iter().all(|b| *b == 0xA5));
            a.dealloc(q, Layout::from_size_align(4096, 8).unwrap());
        }
    }
}
