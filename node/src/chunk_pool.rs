//! Reused buffers for chunk data, on both sides of a transfer.
//!
//! [`crate::allocator`] fixes glibc's mmap threshold at 128 KiB so that large buffers
//! go back to the system when freed (a long-running node must not keep the peak of
//! every transfer). The price, for a 1 MiB chunk buffer allocated per request: an
//! `mmap`, 256 page faults each zeroing a page, and an `munmap` that flushes the
//! other cores' TLBs. Measured on the 1 GiB loopback fetch (`servant-bench files`),
//! the kernel spent more time on that than Servant spent on everything else.
//!
//! So chunk buffers are recycled: the codec reads a response into a pooled buffer,
//! the fetch gives it back once the chunk is written, the store reads a chunk to
//! serve into one and the codec gives it back once it is sent. The pool holds at most
//! [`MAX_POOLED`] buffers and drops any left unused for [`IDLE`] (checked on every use
//! and on the event loop's tick), so an idle node holds none of them.

use std::{
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

/// Buffers kept at most: a fetch's windows in flight, with room to spare.
pub const MAX_POOLED: usize = 32;
/// Buffers unused for this long are freed.
pub const IDLE: Duration = Duration::from_secs(2);
/// Smaller buffers come from the heap cheaply and are not pooled.
const MIN_POOLED: usize = 128 * 1024;
/// Larger capacities (none a chunk needs) are not kept.
const MAX_CAPACITY: usize = servant_protocol::manifest::MAX_CHUNK_SIZE as usize;

static POOL: Mutex<Vec<(Instant, Vec<u8>)>> = Mutex::new(Vec::new());

fn pool() -> MutexGuard<'static, Vec<(Instant, Vec<u8>)>> {
    // The pool holds only spare buffers: whatever a panic left in it is still fine.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A buffer of exactly `len` bytes for a chunk to be read into. Its contents are
/// unspecified (a reused buffer keeps its old bytes): the caller overwrites them all.
pub fn take(len: usize) -> Vec<u8> {
    if len < MIN_POOLED {
        return vec![0u8; len];
    }
    let reused = {
        let mut pool = pool();
        purge_locked(&mut pool);
        pool.iter()
            .rposition(|(_, b)| b.capacity() >= len)
            .map(|i| pool.swap_remove(i).1)
    };
    match reused {
        Some(mut buf) => {
            // Shrinking keeps the bytes; growing within capacity zeroes only the tail.
            buf.resize(len, 0);
            buf
        }
        None => vec![0u8; len],
    }
}

/// Gives a chunk buffer back for reuse (or frees it, if the pool is full or the
/// buffer is not chunk-sized).
pub fn give(buf: Vec<u8>) {
    if !(MIN_POOLED..=MAX_CAPACITY).contains(&buf.capacity()) {
        return;
    }
    let mut pool = pool();
    purge_locked(&mut pool);
    if pool.len() < MAX_POOLED {
        pool.push((Instant::now(), buf));
    }
}

/// Frees the buffers unused for [`IDLE`].
pub fn purge() {
    purge_locked(&mut pool());
}

/// Buffers held now.
pub fn pooled() -> usize {
    pool().len()
}

fn purge_locked(pool: &mut Vec<(Instant, Vec<u8>)>) {
    pool.retain(|(since, _)| since.elapsed() < IDLE);
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test, since the pool is process-wide and tests run in parallel.
    #[test]
    fn buffers_are_reused_bounded_and_small_ones_are_not_kept() {
        let big = take(1 << 20);
        assert_eq!(big.len(), 1 << 20);
        let ptr = big.as_ptr();
        give(big);
        let again = take((1 << 20) - 5);
        assert_eq!(again.len(), (1 << 20) - 5);
        assert_eq!(
            again.as_ptr(),
            ptr,
            "the buffer given back is the one taken"
        );
        give(again);
        // A larger request than any pooled capacity gets a new buffer.
        let larger = take(2 << 20);
        assert_eq!(larger.len(), 2 << 20);
        give(vec![0u8; 1024]);
        for _ in 0..MAX_POOLED * 2 {
            give(Vec::with_capacity(1 << 20));
        }
        assert!(pooled() <= MAX_POOLED);
        give(larger);
    }
}
