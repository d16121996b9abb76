//! Buffers for received frames.
//!
//! A frame that spans many QUIC packets is copied once, from quinn's packet buffers into one buffer of the
//! declared size that then lives as long as the caller holds the frame (a Python `memoryview`, a tensor).
//! Fresh memory for a large buffer comes from the kernel, which must fault in and zero every page: for a 64 MiB
//! frame on loopback that cost more CPU than the copy itself (perf: `clear_page_erms`, `exc_page_fault` and the
//! page-table locks, ~20 % of a transfer). So:
//! - large buffers ask for transparent huge pages (`madvise(MADV_HUGEPAGE)`, honoured when THP is `always` or
//!   `madvise`): 512x fewer faults;
//! - a few large buffers are kept when their frame is dropped and handed to the next frame of a close size, so
//!   a tier receiving activations of the same shape again and again reuses warm memory. The pool is small and
//!   bounded ([`POOL_MAX_BUFFERS`], [`POOL_MAX_BYTES`]); smaller frames use the allocator as usual.

use std::sync::Mutex;

use bytes::Bytes;

/// Frames at least this large use huge pages and the pool (bytes).
pub const LARGE_FRAME_BYTES: usize = 4 << 20;
/// Most idle buffers kept for reuse.
pub const POOL_MAX_BUFFERS: usize = 2;
/// Most bytes held by idle buffers.
pub const POOL_MAX_BYTES: usize = 128 << 20;

/// Idle large buffers, by capacity.
static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty buffer with room for a frame of `n` bytes.
pub fn take(n: usize) -> Vec<u8> {
    if n < LARGE_FRAME_BYTES {
        return Vec::with_capacity(n);
    }
    if let Ok(mut pool) = POOL.lock() {
        // The smallest idle buffer that fits, if it is not more than twice what is needed.
        let best = pool.iter().enumerate().filter(|(_, b)| b.capacity() >= n && b.capacity() <= 2 * n).min_by_key(|(_, b)| b.capacity());
        if let Some((i, _)) = best {
            let mut buf = pool.swap_remove(i);
            buf.clear();
            return buf;
        }
    }
    huge_page_buffer(n)
}

/// A filled buffer as `Bytes`; a large one goes back to the pool when the last reference is dropped.
pub fn into_bytes(buf: Vec<u8>) -> Bytes {
    if buf.capacity() < LARGE_FRAME_BYTES {
        return Bytes::from(buf);
    }
    Bytes::from_owner(Pooled(buf))
}

/// Owner of a large buffer behind `Bytes` (see [`into_bytes`]).
struct Pooled(Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        if let Ok(mut pool) = POOL.lock() {
            let held: usize = pool.iter().map(Vec::capacity).sum();
            if pool.len() < POOL_MAX_BUFFERS && held + buf.capacity() <= POOL_MAX_BYTES {
                pool.push(buf);
            }
        }
    }
}

/// A new buffer whose 2 MiB-aligned interior is advised to use transparent huge pages (a hint: without THP it
/// works the same).
fn huge_page_buffer(n: usize) -> Vec<u8> {
    let mut buf: Vec<u8> = Vec::with_capacity(n);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buf.as_mut_ptr() as usize;
        let (from, to) = ((start + HUGE - 1) & !(HUGE - 1), (start + n) & !(HUGE - 1));
        if to > from {
            // SAFETY: [from, to) lies inside the allocation we own and nothing has been written to it yet;
            // madvise only changes how the kernel backs those pages.
            unsafe {
                libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE);
            }
        }
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_reused_small_ones_are_not() {
        let n = LARGE_FRAME_BYTES + 12_345;
        let mut a = take(n);
        a.extend(std::iter::repeat_n(7u8, n));
        let ptr = a.as_ptr();
        let bytes = into_bytes(a);
        assert_eq!((bytes.len(), bytes[n - 1]), (n, 7));
        drop(bytes);
        // Another thread's test may take it first; when it is there, it is handed out empty.
        let b = take(n);
        assert!(b.is_empty() && b.capacity() >= n);
        if b.as_ptr() == ptr {
            assert!(b.capacity() <= 2 * n);
        }
        // Far smaller frames do not take a huge buffer.
        assert!(take(n / 4).capacity() < n);
        let small = into_bytes(vec![1, 2, 3]);
        assert_eq!(&small[..], &[1, 2, 3]);
    }
}
