//! A fork-aware rayon thread pool shared by the batch entry points.
//!
//! Rayon's worker threads do not survive `fork()`: a child process (a PyTorch
//! DataLoader worker, say) that reuses a pool built by its parent would wait
//! forever on threads that do not exist. We remember which process built the
//! pool and build a fresh one whenever the current pid differs.

use std::sync::{Arc, Mutex};

struct PoolSlot {
    pid: u32,
    threads: usize,
    pool: Arc<rayon::ThreadPool>,
}

static POOL: Mutex<Option<PoolSlot>> = Mutex::new(None);

/// Number of threads used when the caller does not ask for a count.
pub fn default_threads() -> usize {
    std::env::var("MTBERT_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// A pool with `threads` workers (0 means `default_threads()`), valid in this process.
pub fn pool(threads: usize) -> Arc<rayon::ThreadPool> {
    let threads = if threads == 0 { default_threads() } else { threads };
    let pid = std::process::id();
    // A poisoned lock only means another thread panicked while holding it;
    // the slot itself is still a valid Option, so keep going.
    let mut slot = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = slot.as_ref() {
        if s.pid == pid && s.threads == threads {
            return Arc::clone(&s.pool);
        }
        if s.pid != pid {
            // Inherited from the parent across fork(): its worker threads do not exist
            // here, and dropping it could wait on locks they held. Leak it instead.
            std::mem::forget(slot.take());
        }
    }
    let built = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("building a rayon thread pool"),
    );
    *slot = Some(PoolSlot { pid, threads, pool: Arc::clone(&built) });
    built
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_is_reused_for_same_thread_count() {
        let a = pool(2);
        let b = pool(2);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.current_num_threads(), 2);
        let c = pool(1);
        assert_eq!(c.current_num_threads(), 1);
    }
}
