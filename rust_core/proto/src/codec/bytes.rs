//! Viewing byte buffers as typed slices. Buffers from Python (numpy, torch) are aligned in practice, so the fast
//! path is a reinterpretation; an unaligned buffer falls back to a copy instead of undefined behaviour.

use std::borrow::Cow;

#[cfg(target_endian = "big")]
compile_error!("aiflow frames are little-endian; big-endian hosts are not supported");

/// Plain-old-data element types we reinterpret bytes as.
pub trait Pod: Copy + Default + 'static {}
impl Pod for f32 {}
impl Pod for u16 {}
impl Pod for i8 {}
impl Pod for half::f16 {}
impl Pod for half::bf16 {}

/// `bytes` as `&[T]`, borrowed when aligned, copied otherwise. `bytes.len()` must be a multiple of `size_of::<T>()`.
pub fn cast_slice<T: Pod>(bytes: &[u8]) -> Cow<'_, [T]> {
    let size = std::mem::size_of::<T>();
    debug_assert_eq!(bytes.len() % size, 0);
    // SAFETY: T is plain old data (every bit pattern valid); align_to only yields a middle part that is aligned.
    let (head, mid, tail) = unsafe { bytes.align_to::<T>() };
    if head.is_empty() && tail.is_empty() {
        return Cow::Borrowed(mid);
    }
    let mut owned = vec![T::default(); bytes.len() / size];
    // SAFETY: `owned` has exactly bytes.len() bytes of POD storage.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), owned.as_mut_ptr() as *mut u8, bytes.len()) };
    Cow::Owned(owned)
}

/// Runs `f` on `bytes` viewed as `&mut [T]`; if unaligned, on a scratch copy that is written back afterwards.
pub fn with_slice_mut<T: Pod, R>(bytes: &mut [u8], f: impl FnOnce(&mut [T]) -> R) -> R {
    let size = std::mem::size_of::<T>();
    debug_assert_eq!(bytes.len() % size, 0);
    // SAFETY: as in `cast_slice`.
    let (head, mid, tail) = unsafe { bytes.align_to_mut::<T>() };
    if head.is_empty() && tail.is_empty() {
        return f(mid);
    }
    let mut scratch = vec![T::default(); bytes.len() / size];
    let r = f(&mut scratch);
    // SAFETY: scratch holds bytes.len() bytes of POD data.
    unsafe { std::ptr::copy_nonoverlapping(scratch.as_ptr() as *const u8, bytes.as_mut_ptr(), bytes.len()) };
    r
}

/// Appends `n` zeroed bytes to `out` and returns them.
pub fn grow(out: &mut Vec<u8>, n: usize) -> &mut [u8] {
    let start = out.len();
    out.resize(start + n, 0);
    &mut out[start..]
}
