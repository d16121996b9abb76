//! Buffers for received frames.
//!
//! A frame that spans many QUIC packets is copied once, from quinn's packet buffers into one buffer that then
//! lives as long as the caller holds the frame (a Python `memoryview`, a tensor). The buffer grows as the bytes
//! arrive ([`Growing`]: doubling, never past the declared size), never from what the peer declares: a peer that
//! declares 1 GiB and sends 40 bytes costs a few KiB, and each growth is charged to the request's in-flight
//! budgets ([`super::budget`]) before it is made. Growing a large buffer is a `realloc`, which glibc serves with
//! `mremap` (no copy) once the buffer is mmapped.
//!
//! Fresh memory for a large buffer comes from the kernel, which must fault in and zero every page: for a 64 MiB
//! frame on loopback that cost more CPU than the copy itself (perf: `clear_page_erms`, `exc_page_fault` and the
//! page-table locks, ~20 % of a transfer). So:
//! - large buffers ask for transparent huge pages (`madvise(MADV_HUGEPAGE)`, honoured when THP is `always` or
//!   `madvise`): 512x fewer faults;
//! - a few large buffers are kept when their frame is dropped and handed to the next frame of a close size once
//!   that frame's received bytes reach [`LARGE_FRAME_BYTES`], so a tier receiving activations of the same shape
//!   again and again reuses warm memory. The pool is small and bounded ([`POOL_MAX_BUFFERS`],
//!   [`POOL_MAX_BYTES`]); smaller frames use the allocator as usual.

use std::sync::Mutex;

use bytes::Bytes;

use crate::error::{Error, Result};

/// Frames at least this large use huge pages and the pool (bytes).
pub const LARGE_FRAME_BYTES: usize = 4 << 20;
/// Most idle buffers kept for reuse.
pub const POOL_MAX_BUFFERS: usize = 2;
/// Most bytes held by idle buffers.
pub const POOL_MAX_BYTES: usize = 128 << 20;
/// The first allocation of a growing buffer (bytes), unless the frame is smaller or its first bytes more.
pub const MIN_GROWTH_BYTES: usize = 4 << 10;

/// Idle large buffers, by capacity.
static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// The idle pooled buffer that best fits a frame of `n` bytes: the smallest with room for it, if it is not more
/// than twice what is needed.
fn pool_take(n: usize) -> Option<Vec<u8>> {
    let mut pool = POOL.lock().ok()?;
    let best = pool.iter().enumerate().filter(|(_, b)| b.capacity() >= n && b.capacity() <= 2 * n).min_by_key(|(_, b)| b.capacity());
    let (i, _) = best?;
    let mut buf = pool.swap_remove(i);
    buf.clear();
    Some(buf)
}

/// Keeps an idle large buffer for reuse, if the pool has room.
fn pool_put(buf: Vec<u8>) {
    if let Ok(mut pool) = POOL.lock() {
        let held: usize = pool.iter().map(Vec::capacity).sum();
        if pool.len() < POOL_MAX_BUFFERS && held + buf.capacity() <= POOL_MAX_BYTES {
            pool.push(buf);
        }
    }
}

/// A receive buffer for a frame of `n` declared bytes that grows as they arrive.
#[derive(Debug)]
pub struct Growing {
    buf: Vec<u8>,
    n: usize,
}

impl Growing {
    /// No memory yet: the first bytes allocate.
    pub fn new(n: usize) -> Growing {
        Growing { buf: Vec::new(), n }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Appends `data`, first growing the buffer if needed: `charge(bytes)` is called with each growth before it
    /// is made and may refuse it. Fails (`LimitExceeded`) when the memory cannot be had, and (`Transport`) on
    /// more bytes than declared.
    pub fn extend(&mut self, data: &[u8], charge: &mut dyn FnMut(u64) -> Result<()>) -> Result<()> {
        let need = self.buf.len() + data.len();
        if need > self.n {
            return Err(Error::Transport(format!("the peer sent more than the {} bytes it declared", self.n)));
        }
        if need > self.buf.capacity() {
            self.grow(need, charge)?;
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    fn grow(&mut self, need: usize, charge: &mut dyn FnMut(u64) -> Result<()>) -> Result<()> {
        let cap = self.buf.capacity();
        let target = need.max(cap.saturating_mul(2)).max(MIN_GROWTH_BYTES).min(self.n);
        if target >= LARGE_FRAME_BYTES && cap < LARGE_FRAME_BYTES {
            if let Some(mut pooled) = pool_take(self.n) {
                if let Err(e) = charge((pooled.capacity() - cap) as u64) {
                    pool_put(pooled);
                    return Err(e);
                }
                pooled.extend_from_slice(&self.buf);
                self.buf = pooled;
                return Ok(());
            }
        }
        charge((target - cap) as u64)?;
        self.buf.try_reserve_exact(target - self.buf.len()).map_err(|e| {
            Error::LimitExceeded(format!("the server cannot allocate a {target}-byte receive buffer now ({e}); retry later"))
        })?;
        if target >= LARGE_FRAME_BYTES {
            advise_huge_pages(&mut self.buf);
        }
        Ok(())
    }

    /// The filled buffer as `Bytes` (see [`into_bytes`]).
    pub fn into_bytes(self) -> Bytes {
        into_bytes(self.buf)
    }
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
        pool_put(std::mem::take(&mut self.0));
    }
}

/// Advises the kernel to back the 2 MiB-aligned interior of `buf`'s allocation with transparent huge pages (a
/// hint: without THP it works the same).
fn advise_huge_pages(buf: &mut Vec<u8>) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buf.as_mut_ptr() as usize;
        let (from, to) = ((start + HUGE - 1) & !(HUGE - 1), (start + buf.capacity()) & !(HUGE - 1));
        if to > from {
            // SAFETY: [from, to) lies inside the allocation we own; madvise only changes how the kernel backs
            // those pages (their contents are kept).
            unsafe {
                libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(n: usize, charged: &mut u64) -> Growing {
        let mut g = Growing::new(n);
        let chunk = vec![7u8; 64 << 10];
        while g.len() < n {
            let k = chunk.len().min(n - g.len());
            g.extend(&chunk[..k], &mut |b| {
                *charged += b;
                Ok(())
            })
            .unwrap();
            // Memory follows the bytes received: never more than twice them (a pooled buffer: twice the frame).
            assert!(g.buf.capacity() <= 2 * g.len() || g.len() >= LARGE_FRAME_BYTES / 2, "{} for {}", g.buf.capacity(), g.len());
        }
        g
    }

    #[test]
    fn buffers_grow_with_the_bytes_and_large_ones_are_reused() {
        let n = LARGE_FRAME_BYTES + 12_345;
        let mut charged = 0;
        let g = fill(n, &mut charged);
        assert_eq!(charged, g.buf.capacity() as u64);
        let ptr = g.buf.as_ptr();
        let bytes = g.into_bytes();
        assert_eq!((bytes.len(), bytes[n - 1]), (n, 7));
        drop(bytes);
        // Another thread's test may take it first; when it is there, it is handed out once the bytes arrive.
        let mut charged = 0;
        let g = fill(n, &mut charged);
        assert_eq!(charged, g.buf.capacity() as u64);
        if g.buf.as_ptr() == ptr {
            assert!(g.buf.capacity() <= 2 * n);
        }
        // A declared size allocates nothing; a refused growth leaves the buffer as it was.
        let mut g = Growing::new(1 << 30);
        assert_eq!(g.buf.capacity(), 0);
        let e = g.extend(&[1, 2, 3], &mut |_| Err(Error::LimitExceeded("budget".into()))).unwrap_err();
        assert!(matches!(e, Error::LimitExceeded(_)) && g.is_empty());
        let mut charged = 0;
        g.extend(&[1, 2, 3], &mut |b| {
            charged += b;
            Ok(())
        })
        .unwrap();
        assert_eq!(charged, MIN_GROWTH_BYTES as u64);
        assert!(g.extend(&vec![0; 1 << 30], &mut |_| Ok(())).is_err(), "more than declared");
        let small = into_bytes(vec![1, 2, 3]);
        assert_eq!(&small[..], &[1, 2, 3]);
    }
}
