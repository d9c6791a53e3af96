//! Staged disks: the files that carry a cold migration's or an export's
//! disks through the control plane, written by resumable chunked uploads.
//!
//! An upload is a series of `PUT ?offset=N` requests; each must start where
//! the staged file ends. Two writers of one file must never interleave: the
//! same job's retry whose first attempt is still being read (the client gave
//! up, the server did not yet notice), or a job restarted on the source
//! while its first run's last request is in flight. Appending from both
//! corrupted the file under load (`bench scale`: 6–17 of 200 cold
//! migrations ended "the uploaded disk is corrupt" or "offset 0 but N bytes
//! are staged"). So every write of a file, and every read of its size, holds
//! that file's lock, and a chunk that does not arrive whole is cut off
//! again: the staged size is always the end of the last whole chunk, and a
//! writer that asks for it waits for the one under way. The locks are the
//! control plane's ([`StagingLocks`], in its state), one per file.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use crate::registry::staging::StagingLocks;
use crate::state::Ctx;

/// Why a chunk was not stored.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The chunk does not start where the staged file ends.
    #[error("offset {offset} but {have} bytes are staged; resume from {have}")]
    Offset { offset: u64, have: u64 },
    /// The client stopped sending before the chunk's end; nothing of it
    /// was kept.
    #[error("upload interrupted: {0}")]
    Interrupted(String),
    /// The control plane could not write the file.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ChunkError + 'a {
    move |source| ChunkError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

async fn size_of(path: &Path) -> u64 {
    tokio::fs::metadata(path)
        .await
        .map(|m| m.len())
        .unwrap_or(0)
}

/// The staged file of `key`: a migration's or export's id (its boot disk),
/// or `ID.N` (data disk N of a cold migration).
pub fn staging_path(app: &Ctx, key: &str) -> PathBuf {
    app.data_dir.join("staging").join(format!("{key}.qcow2"))
}

/// The bytes staged in `path`, once no chunk is being written to it.
pub async fn staged_size(locks: &StagingLocks, path: &Path) -> u64 {
    let _held = locks.hold(path).await;
    size_of(path).await
}

/// Appends the chunk `body`, which starts at `offset`, to `path`, durably;
/// returns the staged size after it. Refuses a chunk that does not start at
/// the staged size, and keeps nothing of a chunk that does not arrive
/// whole.
pub async fn write_chunk<S, E>(
    locks: &StagingLocks,
    path: &Path,
    offset: u64,
    body: S,
) -> Result<u64, ChunkError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let _held = locks.hold(path).await;
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(io("create", dir))?;
    }
    let have = size_of(path).await;
    if offset != have {
        return Err(ChunkError::Offset { offset, have });
    }
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .await
        .map_err(io("open", path))?;
    f.seek(std::io::SeekFrom::Start(have))
        .await
        .map_err(io("seek", path))?;
    match copy_body(&mut f, path, body).await {
        Ok(n) => {
            f.sync_all().await.map_err(io("sync", path))?;
            Ok(have + n)
        }
        Err(e) => {
            // Cut the partial chunk off: the next writer starts at `have`.
            f.set_len(have).await.map_err(io("truncate", path))?;
            Err(e)
        }
    }
}

async fn copy_body<S, E>(
    f: &mut tokio::fs::File,
    path: &Path,
    mut body: S,
) -> Result<u64, ChunkError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut n = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ChunkError::Interrupted(e.to_string()))?;
        f.write_all(&chunk).await.map_err(io("write", path))?;
        n += chunk.len() as u64;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;
    use std::sync::Arc;
    use std::time::Duration;

    fn chunk(b: &'static [u8]) -> Result<Bytes, String> {
        Ok(Bytes::from_static(b))
    }

    #[tokio::test]
    async fn chunks_append_in_order_and_a_wrong_offset_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let locks = StagingLocks::default();
        let p = dir.path().join("staging/m.qcow2");
        assert_eq!(
            write_chunk(&locks, &p, 0, stream::iter([chunk(b"abc")]))
                .await
                .unwrap(),
            3
        );
        let e = write_chunk(&locks, &p, 0, stream::iter([chunk(b"abc")]))
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "offset 0 but 3 bytes are staged; resume from 3"
        );
        assert!(write_chunk(&locks, &p, 9, stream::iter([chunk(b"x")]))
            .await
            .is_err());
        assert_eq!(
            write_chunk(&locks, &p, 3, stream::iter([chunk(b"de")]))
                .await
                .unwrap(),
            5
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"abcde");
        assert_eq!(staged_size(&locks, &p).await, 5);
    }

    #[tokio::test]
    async fn an_interrupted_chunk_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let locks = StagingLocks::default();
        let p = dir.path().join("m.qcow2");
        write_chunk(&locks, &p, 0, stream::iter([chunk(b"abc")]))
            .await
            .unwrap();
        let broken = stream::iter([chunk(b"half"), Err("connection reset".to_string())]);
        let e = write_chunk(&locks, &p, 3, broken).await.unwrap_err();
        assert!(matches!(e, ChunkError::Interrupted(_)), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
    }

    /// Two writers of one file: the second waits for the first, then finds
    /// the size the first left, instead of both appending at once.
    #[tokio::test]
    async fn a_second_writer_waits_and_sees_the_first_writers_size() {
        let dir = tempfile::tempdir().unwrap();
        let locks = StagingLocks::default();
        let p = dir.path().join("m.qcow2");
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, String>>(4);
        let slow = tokio_stream_from(rx);
        let locks = Arc::new(locks);
        let (l1, l2, l3) = (locks.clone(), locks.clone(), locks.clone());
        let p1 = p.clone();
        let first = tokio::spawn(async move { write_chunk(&l1, &p1, 0, slow).await });
        tx.send(chunk(b"one")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let p2 = p.clone();
        let second =
            tokio::spawn(
                async move { write_chunk(&l2, &p2, 0, stream::iter([chunk(b"two")])).await },
            );
        let p3 = p.clone();
        let size = tokio::spawn(async move { staged_size(&l3, &p3).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished() && !size.is_finished(), "did not wait");
        tx.send(chunk(b"more")).await.unwrap();
        drop(tx);
        assert_eq!(first.await.unwrap().unwrap(), 7);
        let e = second.await.unwrap().unwrap_err();
        assert!(
            matches!(e, ChunkError::Offset { offset: 0, have: 7 }),
            "{e}"
        );
        assert_eq!(size.await.unwrap(), 7);
        assert_eq!(std::fs::read(&p).unwrap(), b"onemore");
        assert!(locks.is_empty(), "a lock entry leaked");
    }

    fn tokio_stream_from(
        mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
    ) -> impl Stream<Item = Result<Bytes, String>> + Unpin {
        Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}
