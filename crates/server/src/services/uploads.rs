//! Bytes that clients send the control plane: an image upload (received
//! whole into a temporary file, then ingested), and the staged disks of
//! cold migrations and exports (received in resumable chunks, see
//! [`crate::services::staging`]), with the rules of who may send and who
//! may fetch a staged disk.
//!
//! The HTTP layer hands over the body as a stream of chunks and the
//! caller's identity; what is accepted, and where it goes, is decided here.

use std::collections::BTreeMap;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use virt8ra_api::{validate, Image, MigrationMode, MigrationPhase};

use crate::error::{ApiError, ApiResult, Kind};
use crate::services::images::{check_new, ingest, Meta, TempFile};
use crate::services::staging::{self, staging_path, ChunkError};
use crate::state::Ctx;

/// What an upload says of the image besides its bytes.
pub struct ImageUpload {
    pub name: String,
    /// Guest architecture (default x86_64).
    pub arch: Option<String>,
    /// Labels, `KEY=VALUE` pairs separated by commas.
    pub labels: Option<String>,
    pub version: Option<String>,
    /// The owning project; none: public.
    pub project: Option<String>,
}

/// `KEY=VALUE,KEY=VALUE` as labels, checked.
fn parse_labels(labels: Option<&str>) -> ApiResult<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for pair in labels.iter().flat_map(|l| l.split(',')) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(ApiError::Invalid(format!(
                "label {pair:?} must be KEY=VALUE"
            )));
        };
        out.insert(k.to_string(), v.to_string());
    }
    validate::labels(&out).map_err(ApiError::Invalid)?;
    Ok(out)
}

/// Receives an uploaded image and ingests it. The metadata is checked
/// before a byte is written; an empty or interrupted upload stores nothing.
pub async fn upload_image<S, E>(app: &Ctx, q: ImageUpload, body: S) -> ApiResult<Image>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let arch = check_new(app, &q.name, q.arch.as_deref(), q.version.as_deref()).await?;
    let labels = parse_labels(q.labels.as_deref())?;
    let id = uuid::Uuid::new_v4().to_string();
    let upload = app.images_dir.join(format!("upload-{id}"));
    let _upload_guard = TempFile(Some(upload.clone()));
    let (received, source_sha256) = receive(&upload, body).await?;
    if received == 0 {
        return Err(ApiError::Invalid("the upload is empty".into()));
    }
    ingest(
        app,
        &upload,
        Meta {
            id,
            name: q.name,
            arch,
            version: q.version,
            provenance: "upload".into(),
            source_sha256: Some(source_sha256),
            labels,
            project: q.project,
        },
    )
    .await
}

/// Writes `body` to a new file at `path`, durably: its size and sha256.
async fn receive<S, E>(path: &std::path::Path, mut body: S) -> ApiResult<(u64, String)>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut f = tokio::fs::File::create(path)
        .await
        .map_err(|e| ApiError::Internal(format!("create {}: {e}", path.display())))?;
    let mut received: u64 = 0;
    let mut hash = Sha256::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::Invalid(format!("upload interrupted: {e}")))?;
        received += chunk.len() as u64;
        hash.update(&chunk);
        f.write_all(&chunk)
            .await
            .map_err(|e| ApiError::Internal(format!("write upload: {e}")))?;
    }
    f.sync_all()
        .await
        .map_err(|e| ApiError::Internal(format!("sync upload: {e}")))?;
    Ok((received, hex::encode(hash.finalize())))
}

/// Where a chunk goes: staged disk `key`, from byte `offset`.
pub struct Chunk<'a> {
    pub key: &'a str,
    pub offset: u64,
}

/// Stores one chunk of a staged disk from host `host_id`, which must be
/// the one expected to send it; returns the bytes staged after it.
/// `content` is the HTTP layer's verdict on the body's type, reported only
/// once the sender is known to be the expected one.
pub async fn stage_chunk<S, E>(
    app: &Ctx,
    host_id: &str,
    at: Chunk<'_>,
    content: ApiResult<()>,
    body: S,
) -> ApiResult<u64>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let Chunk { key, offset } = at;
    may_upload(app, host_id, key).await?;
    content?;
    let path = staging_path(app, key);
    staging::write_chunk(&app.staging, &path, offset, body)
        .await
        .map_err(|e| match e {
            ChunkError::Offset { .. } => ApiError::Conflict(e.to_string()),
            ChunkError::Interrupted(_) => ApiError::Invalid(e.to_string()),
            ChunkError::Io { .. } => ApiError::Internal(e.to_string()),
        })
}

/// The bytes staged of `key` so far. A host (`Some(host_id)`) asks to
/// resume its own upload or a download it may make; the admin (`None`)
/// may ask about any.
pub async fn staged_bytes(app: &Ctx, host: Option<&str>, key: &str) -> ApiResult<u64> {
    staging_key(key)?;
    if let Some(host_id) = host {
        if may_upload(app, host_id, key).await.is_err() {
            may_download(app, host_id, key)?;
        }
    }
    let path = staging_path(app, key);
    Ok(staging::staged_size(&app.staging, &path).await)
}

/// Opens staged disk `key` for the admin (`None`) or the host that may
/// fetch it.
pub async fn open_staged(app: &Ctx, host: Option<&str>, key: &str) -> ApiResult<tokio::fs::File> {
    staging_key(key)?;
    if let Some(host_id) = host {
        may_download(app, host_id, key)?;
    }
    let path = staging_path(app, key);
    tokio::fs::File::open(&path)
        .await
        .map_err(|_| ApiError::not_found(Kind::StagedDisk, key))
}

/// Whether `host_id` may upload to staging area `key`: the source host of
/// an active migration, or the host of an export's VM.
async fn may_upload(app: &Ctx, host_id: &str, key: &str) -> ApiResult<()> {
    let (id, _) = staging_key(key)?;
    let mig = app.migrations.active().into_iter().find(|m| m.id == id);
    if let Some(m) = mig {
        if m.source.host_id == host_id && m.phase == MigrationPhase::Transferring {
            return Ok(());
        }
    } else if let Some(e) = app
        .migrations
        .active_exports()
        .into_iter()
        .find(|e| e.id == id)
    {
        let vm = app.store.get_vm(&e.vm_id).await?;
        if vm.status.host_id.as_deref() == Some(host_id) {
            return Ok(());
        }
    }
    Err(ApiError::Forbidden(format!(
        "no upload of {key} is expected from this host"
    )))
}

/// Whether `host_id` may download staged disk `key`: only the target host
/// of an active cold migration once the disk is staged and verified (phase
/// `preparing_target`, when the target is told where to fetch it). An
/// export's staged disk is read by the admin (`vm export`), never by a
/// host; and no other host reads anyone's disk.
fn may_download(app: &Ctx, host_id: &str, key: &str) -> ApiResult<()> {
    let (id, _) = staging_key(key)?;
    let fetching = app.migrations.active().into_iter().any(|m| {
        m.id == id
            && m.target.host_id == host_id
            && m.mode == MigrationMode::Cold
            && m.phase == MigrationPhase::PreparingTarget
    });
    if fetching {
        return Ok(());
    }
    Err(ApiError::Forbidden(format!(
        "staged disk {key} is not for this host: only the target of its migration fetches it"
    )))
}

/// A staging key: a migration's or export's id, or `ID.N` for data disk N
/// of a cold migration. Anything else is not found.
pub fn staging_key(key: &str) -> ApiResult<(&str, Option<usize>)> {
    let (id, disk) = match key.split_once('.') {
        None => (key, None),
        Some((id, suffix)) => match suffix.parse::<usize>() {
            // Canonical digits only, so one disk has one key.
            Ok(n) if n < validate::MAX_DATA_DISKS && n.to_string() == suffix => (id, Some(n)),
            _ => return Err(ApiError::not_found(Kind::StagedDisk, key)),
        },
    };
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(ApiError::not_found(Kind::StagedDisk, key));
    }
    Ok((id, disk))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_key_value_pairs() {
        let l = parse_labels(Some("a=1,b=x")).unwrap();
        assert_eq!(l.get("a").map(String::as_str), Some("1"));
        assert_eq!(l.len(), 2);
        assert!(parse_labels(None).unwrap().is_empty());
        let e = parse_labels(Some("a=1,oops")).unwrap_err();
        assert_eq!(e.to_string(), "label \"oops\" must be KEY=VALUE");
    }

    #[test]
    fn staging_keys_are_an_id_or_id_dot_disk() {
        let id = "6f1c2d3e-0000-4000-8000-000000000001";
        assert_eq!(staging_key(id).unwrap(), (id, None));
        assert_eq!(staging_key(&format!("{id}.1")).unwrap(), (id, Some(1)));
        for bad in [
            format!("{id}.01"),
            format!("{id}.x"),
            "../../etc/passwd".to_string(),
        ] {
            let e = staging_key(&bad).unwrap_err();
            assert!(e.is_not_found(Kind::StagedDisk), "{bad}: {e:?}");
        }
    }
}
