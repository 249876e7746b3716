//! The daemon's global allocator: the C library's `malloc`, with
//! over-aligned blocks carved out of a slightly larger `malloc` block
//! instead of `posix_memalign`.
//!
//! tokio aligns its task cells and I/O registrations to 128 bytes (cache
//! padding), three such blocks per relayed session. glibc serves
//! `posix_memalign` on its slow path every time (no per-thread cache for
//! aligned blocks, a split and a free of the leading fragment): ~1,700 of a
//! small session's ~58,000 user-space instructions (callgrind). A `malloc`
//! of `size + align` is served from the thread's cache like any small
//! block; the aligned block starts inside it, with the pointer `malloc`
//! returned stored in the 8 bytes just before it. The price is up to
//! `align` bytes per over-aligned block, which idle sessions do not hold
//! (the holding pen keeps no task and no registration).
//!
//! Everything else goes to `malloc`/`free`/`realloc` as with
//! [`std::alloc::System`]. A general-purpose allocator (mimalloc) cut more
//! instructions but quadrupled a held session's RSS (`bench/analysis.md`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;

/// `malloc`'s own alignment on 64-bit Linux: blocks that need no more go
/// straight to it.
const MALLOC_ALIGN: usize = 16;

/// See the module docs. `#[global_allocator] static A: Allocator = Allocator;`
#[derive(Debug, Default, Clone, Copy)]
pub struct Allocator;

impl Allocator {
    /// The `malloc` block behind an over-aligned one.
    fn padded(layout: Layout) -> Option<usize> {
        layout.size().checked_add(layout.align())
    }
}

// SAFETY: every block comes from the C allocator and is returned to it
// whole: small-aligned ones directly (as `System` does), over-aligned ones
// through the pointer stored just before them, which `alloc` wrote and
// nothing else touches (it lies outside the block handed out).
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            // SAFETY: layout has a non-zero size (GlobalAlloc's contract).
            return unsafe { System.alloc(layout) };
        }
        let Some(padded) = Self::padded(layout) else {
            return ptr::null_mut();
        };
        // SAFETY: a plain C allocation; null is handled below.
        let raw = unsafe { libc::malloc(padded) }.cast::<u8>();
        if raw.is_null() {
            return raw;
        }
        // `raw` is 16-aligned and `align` a power of two above 16, so the
        // aligned address is 16 to `align` bytes in: room for the pointer
        // before it, and `size` bytes after it within `padded`.
        let offset = layout.align() - (raw as usize & (layout.align() - 1));
        // SAFETY: offset <= align, so the result is inside the block.
        let aligned = unsafe { raw.add(offset) };
        // SAFETY: aligned - 8 >= raw + 8 lies inside the block, and is
        // 8-aligned (aligned is a multiple of 32 or more).
        unsafe { aligned.cast::<*mut u8>().sub(1).write(raw) };
        aligned
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.align() <= MALLOC_ALIGN {
            // SAFETY: allocated by System.alloc with this layout.
            return unsafe { System.dealloc(ptr, layout) };
        }
        // SAFETY: `alloc` stored the C allocator's pointer just before
        // the block.
        let raw = unsafe { ptr.cast::<*mut u8>().sub(1).read() };
        // SAFETY: raw came from libc::malloc and is freed once.
        unsafe { libc::free(raw.cast()) };
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            // SAFETY: as in `alloc`.
            return unsafe { System.alloc_zeroed(layout) };
        }
        // SAFETY: as in `alloc`.
        let block = unsafe { self.alloc(layout) };
        if !block.is_null() {
            // SAFETY: the block holds layout.size() bytes.
            unsafe { ptr::write_bytes(block, 0, layout.size()) };
        }
        block
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            // SAFETY: allocated by System with this layout.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the new layout is valid (GlobalAlloc's contract for
        // realloc); moved by hand, as the default realloc does.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as in `alloc`.
        let moved = unsafe { self.alloc(new_layout) };
        if !moved.is_null() {
            // SAFETY: both blocks hold at least the smaller size and are
            // distinct allocations.
            unsafe { ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size)) };
            // SAFETY: ptr was allocated by `alloc` with `layout`.
            unsafe { self.dealloc(ptr, layout) };
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of every alignment tokio and the standard library ask for
    /// come back aligned, hold their bytes, survive a realloc, and free
    /// cleanly (run under the test harness's own allocator: the calls are
    /// made directly).
    #[test]
    fn blocks_are_aligned_hold_their_bytes_and_move_on_realloc() {
        for align in [1, 8, 16, 32, 64, 128, 4096] {
            for size in [1, 7, 16, 100, 128, 1000, 5000] {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                // SAFETY: non-zero size; every block is freed with its layout.
                unsafe {
                    let p = Allocator.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    for i in 0..size {
                        p.add(i).write(i as u8);
                    }
                    let q = Allocator.realloc(p, layout, size * 3);
                    assert!(!q.is_null());
                    assert_eq!(q as usize % align, 0, "realloc, size {size} align {align}");
                    for i in 0..size {
                        assert_eq!(q.add(i).read(), i as u8);
                    }
                    // Shrunk back: the first bytes stay.
                    let r = Allocator.realloc(
                        q,
                        Layout::from_size_align_unchecked(size * 3, align),
                        size,
                    );
                    assert_eq!(r as usize % align, 0, "shrink, size {size} align {align}");
                    for i in 0..size {
                        assert_eq!(r.add(i).read(), i as u8);
                    }
                    // Dirtied and freed, so that a zeroed block of the same
                    // layout (malloc's cache gives it back) must be cleared.
                    ptr::write_bytes(r, 0xAA, size);
                    Allocator.dealloc(r, layout);

                    let z = Allocator.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0);
                    assert!((0..size).all(|i| z.add(i).read() == 0));
                    Allocator.dealloc(z, layout);
                }
            }
        }
    }
}
