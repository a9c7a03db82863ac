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

/// The most worker threads a call may ask for. Far above the core count of today's
/// machines (so never the limit for real work), and low enough that starting them is
/// quick: an unbounded count (say 100000) would spend minutes creating OS threads.
pub const MAX_THREADS: usize = 1024;

/// `threads` (0 = the default count) as a worker count, or an error message naming
/// `what` when it exceeds [`MAX_THREADS`].
pub fn checked_threads(threads: usize, what: &str) -> Result<usize, String> {
    if threads > MAX_THREADS {
        return Err(format!(
            "{what} must be at most {MAX_THREADS} (0: all cores), got {threads}"
        ));
    }
    Ok(if threads == 0 {
        default_threads()
    } else {
        threads
    })
}

/// Number of threads used when the caller does not ask for a count:
/// `MTBERT_NUM_THREADS` when set to a count in `1..=MAX_THREADS` (larger values are
/// capped at `MAX_THREADS`), else the available parallelism.
pub fn default_threads() -> usize {
    std::env::var("MTBERT_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .min(MAX_THREADS)
}

/// A pool with `threads` workers (0 means `default_threads()`; counts above
/// [`MAX_THREADS`] are capped there, callers check with [`checked_threads`] first),
/// valid in this process.
pub fn pool(threads: usize) -> Arc<rayon::ThreadPool> {
    let threads = if threads == 0 {
        default_threads()
    } else {
        threads.min(MAX_THREADS)
    };
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
    *slot = Some(PoolSlot {
        pid,
        threads,
        pool: Arc::clone(&built),
    });
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

    #[test]
    fn thread_counts_are_bounded() {
        assert_eq!(checked_threads(3, "num_threads"), Ok(3));
        assert!(checked_threads(0, "num_threads").unwrap() >= 1);
        assert_eq!(checked_threads(MAX_THREADS, "n"), Ok(MAX_THREADS));
        let err = checked_threads(MAX_THREADS + 1, "num_threads").unwrap_err();
        assert!(err.contains("num_threads must be at most 1024"), "{err}");
        assert!(checked_threads(usize::MAX, "n").is_err());
        assert!(default_threads() <= MAX_THREADS);
    }
}
