//! Disk images treated as hostile, for the control plane and the agents.
//!
//! An image from outside (an upload, a URL, a remote catalog, a VM import
//! bundle, an agent's download, a disk staged by another host) can be built
//! to make qemu read other files: a VMDK descriptor's extents, a qcow2's
//! backing or external data file, a VHD/VHDX parent. `qemu-img convert`
//! would copy such a file (the admin token, say) into a stored image. So:
//!
//! 1. the format comes from the file's own bytes ([`sniff`]), never from
//!    its name or qemu's probe, and every qemu-img call names it (`-f`) and
//!    opens the file through the `file` protocol with backing files off;
//! 2. anything that refers to another file is refused, from the headers
//!    (before qemu sees the file) and again from `qemu-img info`'s view of
//!    the whole structure;
//! 3. `qemu-img check` must pass, and the virtual size must be within the
//!    limit;
//! 4. every qemu-img runs in a Landlock sandbox ([`sandbox`]) that can read
//!    only the input and write only the output, so a case the checks miss
//!    still cannot read a host file;
//! 5. a converted image is inspected again before it is stored.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod sandbox;
pub mod sniff;

#[cfg(test)]
mod tests;

/// What to do about an image that names other files.
pub const HOW_TO_FIX: &str =
    "upload a self-contained image; convert it first with qemu-img convert -O qcow2 IN OUT";

/// The default limit on an image's virtual size (4 TiB).
pub const DEFAULT_MAX_VIRTUAL_SIZE: u64 = 4096 << 30;

/// Time limits for qemu-img on one image.
const INFO_LIMIT: Duration = Duration::from_secs(60);
const CHECK_LIMIT: Duration = Duration::from_secs(600);
const CONVERT_LIMIT: Duration = Duration::from_secs(6 * 3600);

/// Image formats accepted on import (everything is stored as qcow2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Qcow2,
    Raw,
    Vmdk,
    /// VHD (qemu calls it `vpc`).
    Vpc,
    Vhdx,
}

impl Format {
    /// qemu's name for the format.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
            Format::Vmdk => "vmdk",
            Format::Vpc => "vpc",
            Format::Vhdx => "vhdx",
        }
    }

    /// The format's name for people.
    pub fn describe(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
            Format::Vmdk => "VMDK",
            Format::Vpc => "VHD",
            Format::Vhdx => "VHDX",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image is refused; the message says why and what to do (a 400
    /// for whoever sent it).
    #[error("{0}")]
    Refused(String),
    /// Something on this machine failed (qemu-img missing, I/O).
    #[error("{0}")]
    Internal(String),
}

/// What an image may be.
#[derive(Debug, Clone)]
pub struct Policy {
    pub formats: Vec<Format>,
    /// Whether a qcow2 may name a backing file: only a disk staged by
    /// another host, whose backing name is replaced with this host's copy
    /// of the base image (never followed) before it is used.
    pub allow_backing: bool,
    pub max_virtual_size: u64,
}

impl Policy {
    /// An image brought in from outside: any accepted format.
    pub fn import(max_virtual_size: u64) -> Policy {
        Policy {
            formats: vec![
                Format::Qcow2,
                Format::Raw,
                Format::Vmdk,
                Format::Vpc,
                Format::Vhdx,
            ],
            allow_backing: false,
            max_virtual_size,
        }
    }

    /// An image as the control plane stores it: a self-contained qcow2.
    pub fn stored(max_virtual_size: u64) -> Policy {
        Policy {
            formats: vec![Format::Qcow2],
            allow_backing: false,
            max_virtual_size,
        }
    }

    /// A disk staged by another host (cold migration): a qcow2 whose only
    /// reference may be a backing file, which is never opened.
    pub fn staged() -> Policy {
        Policy {
            formats: vec![Format::Qcow2],
            allow_backing: true,
            max_virtual_size: u64::MAX,
        }
    }

    fn check_size(&self, size: u64) -> Result<(), ImageError> {
        if size > self.max_virtual_size {
            return Err(ImageError::Refused(format!(
                "the image's virtual size, {} GiB ({size} bytes), is over this control plane's limit of {} GiB (--max-image-virtual-size-gib)",
                size.div_ceil(1 << 30),
                self.max_virtual_size >> 30
            )));
        }
        Ok(())
    }
}

/// What the inspection found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    pub format: Format,
    pub virtual_size: u64,
    /// A staged disk's backing file name (never followed).
    pub has_backing: bool,
}

/// Whether qemu-img runs confined (the kernel has Landlock).
pub fn sandboxed() -> bool {
    sandbox::landlock_abi() > 0
}

/// The file as qemu-img must open it: through the `file` protocol (no
/// protocol prefix is parsed from the name) with backing files off.
fn spec(path: &Path) -> String {
    let v = serde_json::json!({
        "file": {"driver": "file", "filename": path.to_string_lossy()},
        "backing": null,
    });
    format!("json:{v}")
}

fn absolute(path: &Path) -> Result<PathBuf, ImageError> {
    std::fs::canonicalize(path)
        .map_err(|e| ImageError::Internal(format!("locate {}: {e}", path.display())))
}

/// qemu-img's complaint, without this machine's path in it.
fn stderr_of(out: &std::process::Output, path: &Path) -> String {
    String::from_utf8_lossy(&out.stderr)
        .trim()
        .replace(&spec(path), "the image")
        .replace(&*path.to_string_lossy(), "the image")
}

/// Inspects the image at `path` under `policy`: the format from its bytes,
/// no reference to another file, `qemu-img check` passes, the virtual size
/// within the limit.
pub async fn inspect(path: &Path, policy: &Policy) -> Result<Inspection, ImageError> {
    let path = absolute(path)?;
    let (p, pol) = (path.clone(), policy.clone());
    let sniffed = tokio::task::spawn_blocking(move || sniff::sniff(&p, &pol))
        .await
        .map_err(|e| ImageError::Internal(format!("inspect: {e}")))??;
    let virtual_size = info(&path, sniffed.format, policy).await?;
    check(&path, sniffed.format).await?;
    Ok(Inspection {
        format: sniffed.format,
        virtual_size,
        has_backing: sniffed.backing,
    })
}

/// Keys of `qemu-img info` that name a backing file.
const BACKING_KEYS: &[&str] = &[
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "backing-image",
];

/// `qemu-img info` on the structure; returns the virtual size.
async fn info(path: &Path, format: Format, policy: &Policy) -> Result<u64, ImageError> {
    // -U: an agent's cached image may be open read-only by running VMs;
    // inspecting it must not fail (and delete it) over their lock.
    let args = [
        "info",
        "-U",
        "--output=json",
        "-f",
        format.qemu_name(),
        &spec(path),
    ];
    let access = sandbox::Access {
        read: &[path],
        write: &[],
    };
    let out = sandbox::qemu_img(&args, &access, INFO_LIMIT).await?;
    if !out.status.success() {
        return Err(ImageError::Refused(format!(
            "not a readable disk image ({}): {}",
            format.describe(),
            stderr_of(&out, path)
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| ImageError::Internal(format!("qemu-img info output: {e}")))?;
    judge_info(&v, path, format, policy)
}

/// The refusals `qemu-img info`'s answer calls for; the virtual size.
fn judge_info(
    v: &serde_json::Value,
    path: &Path,
    format: Format,
    policy: &Policy,
) -> Result<u64, ImageError> {
    let external = |what: String| {
        ImageError::Refused(format!(
            "the image refers to another file ({what}): {HOW_TO_FIX}"
        ))
    };
    if v["format"].as_str() != Some(format.qemu_name()) {
        return Err(ImageError::Refused(format!(
            "qemu-img does not read the file as {}",
            format.describe()
        )));
    }
    if !policy.allow_backing {
        if let Some(k) = BACKING_KEYS.iter().find(|k| v.get(**k).is_some()) {
            return Err(external(format!("{k} {}", v[*k])));
        }
    }
    if v["encrypted"].as_bool() == Some(true) {
        return Err(ImageError::Refused(
            "the image is encrypted: upload an unencrypted image".into(),
        ));
    }
    let data = &v["format-specific"]["data"];
    for k in ["data-file", "data-file-raw"] {
        if data.get(k).is_some() {
            return Err(external(format!("qcow2 {k} {}", data[k])));
        }
    }
    if data.get("encrypt").is_some() {
        return Err(ImageError::Refused(
            "the image is encrypted: upload an unencrypted image".into(),
        ));
    }
    if data["corrupt"].as_bool() == Some(true) {
        return Err(ImageError::Refused(
            "the image is marked corrupt: repair it (qemu-img check -r all) or convert it first"
                .into(),
        ));
    }
    if format == Format::Vmdk {
        let t = data["create-type"].as_str().unwrap_or("");
        if t != "monolithicSparse" && t != "streamOptimized" {
            return Err(external(format!("VMDK of createType {t:?}")));
        }
        let me = path.to_string_lossy();
        let extents = data["extents"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        for e in extents {
            let f = e["filename"].as_str().unwrap_or("");
            if f != me {
                return Err(external(format!("VMDK extent {f:?}")));
            }
        }
    }
    let mut rest = v.clone();
    if let Some(o) = rest.as_object_mut() {
        o.remove("filename");
    }
    if rest.to_string().contains("json:") {
        return Err(external("a json: file name".into()));
    }
    let size = v["virtual-size"].as_u64().ok_or_else(|| {
        ImageError::Refused("qemu-img reports no virtual size for the image".into())
    })?;
    policy.check_size(size)?;
    Ok(size)
}

/// `qemu-img check`: errors refuse the image; leaked clusters (wasted
/// space) and formats without checks pass.
async fn check(path: &Path, format: Format) -> Result<(), ImageError> {
    let args = ["check", "-q", "-U", "-f", format.qemu_name(), &spec(path)];
    let access = sandbox::Access {
        read: &[path],
        write: &[],
    };
    let out = sandbox::qemu_img(&args, &access, CHECK_LIMIT).await?;
    match out.status.code() {
        Some(0) | Some(3) | Some(63) => Ok(()),
        Some(2) => Err(ImageError::Refused(format!(
            "the image is damaged: qemu-img check found errors ({}); repair it (qemu-img check -r all) or upload it again",
            first_line(&out)
        ))),
        _ => Err(ImageError::Refused(format!(
            "the image cannot be checked: {}",
            stderr_of(&out, path)
        ))),
    }
}

fn first_line(out: &std::process::Output) -> String {
    let all = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    all.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no details")
        .to_string()
}

/// Converts the inspected image at `input` to a qcow2 at `out` (sandboxed:
/// qemu-img reads `input` and writes `out`, nothing else) and inspects the
/// result as a stored image. `out` is created here; on failure it is
/// removed.
pub async fn convert_to_qcow2(
    input: &Path,
    inspected: &Inspection,
    out: &Path,
    max_virtual_size: u64,
) -> Result<Inspection, ImageError> {
    let r = convert_and_inspect(input, inspected.format, out, max_virtual_size).await;
    if r.is_err() {
        let _ = std::fs::remove_file(out);
    }
    r
}

async fn convert_and_inspect(
    input: &Path,
    format: Format,
    out: &Path,
    max_virtual_size: u64,
) -> Result<Inspection, ImageError> {
    convert(input, format, out).await?;
    inspect(out, &Policy::stored(max_virtual_size)).await
}

/// The sandboxed `qemu-img convert -f FORMAT -O qcow2`, without checks.
async fn convert(input: &Path, format: Format, out: &Path) -> Result<(), ImageError> {
    let input = absolute(input)?;
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(out)
            .map_err(|e| ImageError::Internal(format!("create {}: {e}", out.display())))?;
    }
    let out = absolute(out)?;
    let out_s = out.to_string_lossy().to_string();
    let args = [
        "convert",
        "-q",
        "-f",
        format.qemu_name(),
        &spec(&input),
        "-O",
        "qcow2",
        &out_s,
    ];
    let access = sandbox::Access {
        read: &[&input],
        write: &[&out],
    };
    let o = sandbox::qemu_img(&args, &access, CONVERT_LIMIT).await?;
    if !o.status.success() {
        return Err(ImageError::Refused(format!(
            "cannot convert the {} image: {}",
            format.describe(),
            stderr_of(&o, &input).replace(&out_s, "the output")
        )));
    }
    Ok(())
}
