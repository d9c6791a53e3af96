//! Files that survive a crash: written whole or not at all, and their
//! directory entries on disk before anything acts on them.
//!
//! A leaf module (it imports nothing of the agent): the desired-state log,
//! the per-VM state, the mover's markers and the QEMU driver's migration
//! records all write this way.

use std::path::Path;

/// Writes a file atomically and durably (temp file, fsync, rename).
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    let _ = sync_dir(path);
    Ok(())
}

/// Makes the directory entry of `file` durable (fsync of its directory).
pub fn sync_dir(file: &Path) -> std::io::Result<()> {
    match file.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}
