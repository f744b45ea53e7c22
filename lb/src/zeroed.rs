//! Fixed tables allocated zeroed: the kernel maps zero pages, so a table sized for the worst
//! case takes memory only as its slots are used.

use std::alloc::{alloc_zeroed, handle_alloc_error, Layout};

/// Types for which all-zero bytes are a valid value (atomics, integers, and `repr(C)`
/// structs of them).
///
/// # Safety
/// An implementor must be valid when every byte is zero.
pub unsafe trait Zeroable {}

// SAFETY: the atomics have the same bit validity as their integers (their documentation says
// so), for which zero is valid.
unsafe impl Zeroable for std::sync::atomic::AtomicU64 {}
unsafe impl Zeroable for std::sync::atomic::AtomicU32 {}

/// `n` zeroed values, allocated at once with `alloc_zeroed` (nothing is written, so untouched
/// pages stay unmapped). Aborts like `Vec` when memory is exhausted.
pub fn zeroed_slice<T: Zeroable>(n: usize) -> Box<[T]> {
    let layout = Layout::array::<T>(n).expect("table size fits the address space");
    if layout.size() == 0 {
        // SAFETY: zero-sized: no allocation, and all-zero T is valid (T: Zeroable).
        return (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
    }
    // SAFETY: the layout is not zero-sized; the memory is zeroed, which is a valid [T; n]
    // (T: Zeroable), allocated with T's array layout as Box<[T]> frees it.
    unsafe {
        let p = alloc_zeroed(layout) as *mut T;
        if p.is_null() {
            handle_alloc_error(layout);
        }
        Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn zeroed_tables_read_zero_and_can_be_written() {
        let t: Box<[AtomicU64]> = zeroed_slice(1 << 16);
        assert_eq!(t.len(), 1 << 16);
        assert!(t.iter().all(|w| w.load(Ordering::Relaxed) == 0));
        t[7].store(9, Ordering::Relaxed);
        assert_eq!(t[7].load(Ordering::Relaxed), 9);
        let empty: Box<[AtomicU64]> = zeroed_slice(0);
        assert!(empty.is_empty());
    }
}
