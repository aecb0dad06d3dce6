//! Fallible, zero-initialised allocation of large buffers (the host tier).
//!
//! `alloc_zeroed` maps fresh pages for large sizes, which the OS commits lazily, so a host tier
//! sized for the engine's whole block pool costs only what is written. Failure is an error
//! the caller can report, never an abort.

use std::alloc::{alloc_zeroed, Layout};

use super::elem::ZeroBits;

/// A zeroed `Vec<T>` of `n` elements, or `None` when the allocator refuses (or the size
/// overflows).
pub fn try_zeroed_vec<T: ZeroBits>(n: usize) -> Option<Vec<T>> {
    assert!(std::mem::size_of::<T>() > 0);
    if n == 0 {
        return Some(Vec::new());
    }
    let layout = Layout::array::<T>(n).ok()?;
    // SAFETY: `layout` has a non-zero size (n > 0, T is not zero-sized).
    let ptr = unsafe { alloc_zeroed(layout) } as *mut T;
    if ptr.is_null() {
        return None;
    }
    // SAFETY: `ptr` comes from the global allocator with `Layout::array::<T>(n)`, which is the
    // layout a `Vec<T>` of capacity `n` deallocates with; its bytes are zero, which is a valid
    // `T` (`ZeroBits` contract), so all `n` elements are initialised.
    Some(unsafe { Vec::from_raw_parts(ptr, n, n) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_and_fallible() {
        let v = try_zeroed_vec::<f32>(1000).unwrap();
        assert!(v.iter().all(|&x| x == 0.0));
        assert_eq!(v.capacity(), 1000);
        assert!(try_zeroed_vec::<f32>(0).unwrap().is_empty());
        // Larger than the address space: refused, not an abort.
        assert!(try_zeroed_vec::<f32>(usize::MAX / 2).is_none());
    }
}
