//! The locks of staged disk files (see `services::staging`): one per file
//! being written, so that two writers of one file never interleave.
//!
//! Held by the control plane's state, not in a process-wide static: two
//! control planes in one process (the in-process tests run several) each
//! have their own, as two processes would. Entries live only while a
//! writer holds or waits for them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// One lock per staged file, by path.
#[derive(Default)]
pub struct StagingLocks {
    by_path: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds the lock of one staged file; drops its entry when the last
/// holder goes.
pub struct Held<'a> {
    locks: &'a StagingLocks,
    path: PathBuf,
    lock: Arc<tokio::sync::Mutex<()>>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl StagingLocks {
    /// Waits for, then holds, the lock of `path`.
    pub async fn hold(&self, path: &Path) -> Held<'_> {
        let lock = self
            .by_path
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(path.to_path_buf())
            .or_default()
            .clone();
        let guard = lock.clone().lock_owned().await;
        Held {
            locks: self,
            path: path.to_path_buf(),
            lock,
            _guard: guard,
        }
    }

    /// How many files have a lock entry (held or waited for).
    pub fn len(&self) -> usize {
        self.by_path.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut m = self.locks.by_path.lock().unwrap_or_else(|p| p.into_inner());
        // Ours, the map's, and the guard's: nobody else waits for it.
        if Arc::strong_count(&self.lock) <= 3 {
            m.remove(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// One file's lock is exclusive within one registry, and two
    /// registries (two control planes in one process) do not share it.
    #[tokio::test]
    async fn a_lock_is_per_file_and_per_registry() {
        let (a, b) = (StagingLocks::default(), StagingLocks::default());
        let p = Path::new("/tmp/staging/m.qcow2");
        let held = a.hold(p).await;
        let again = tokio::time::timeout(Duration::from_millis(50), a.hold(p)).await;
        assert!(again.is_err(), "a second holder of one file did not wait");
        let other = tokio::time::timeout(Duration::from_millis(50), b.hold(p)).await;
        assert!(other.is_ok(), "another registry's lock of the path waited");
        drop(other);
        assert_eq!((a.len(), b.len()), (1, 0));
        drop(held);
        assert!(a.is_empty(), "a lock entry leaked");
    }
}
