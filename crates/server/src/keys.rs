//! The control plane's own secrets on disk, and the permissions of its data
//! directory.
//!
//! Both keys are loaded, or made, once when the control plane opens its
//! data directory: a key made lazily in a request raced with concurrent
//! requests (one answered 500 naming the data directory, one signed with a
//! key that was never saved). A key file that is unreadable or corrupt
//! stops the start with a message for the operator; requests never see
//! a path.
//!
//! - `catalog.key`: the ed25519 key this control plane signs its catalog
//!   with (hex of the 32-byte secret).
//! - `site.key`: 32 random bytes (hex) from which each site's shared secret
//!   is derived ([`site_secret`]). The control plane gives the secret to
//!   every agent of the site over its channel; the agents' image services
//!   serve only requests that present it, so a cached image is served to
//!   the hosts of its site and to nobody else.
//!
//! The data directory holds user data (VMs' user data in the database and
//! its WAL, staged disks, images), so it is the owner's alone: directories
//! 0700 and files 0600. The process's umask (077, set by [`private_umask`])
//! covers everything made later, and [`private_dir`] tightens a directory
//! made by an older version, with everything in it.

use std::path::Path;

use anyhow::Context;
use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};

/// The catalog signing key in `data_dir`, made now if there is none.
pub fn catalog_key(data_dir: &Path) -> anyhow::Result<SigningKey> {
    Ok(SigningKey::from_bytes(&load_or_create(
        &data_dir.join("catalog.key"),
    )?))
}

/// The key site secrets are derived from, made now if there is none.
pub fn site_key(data_dir: &Path) -> anyhow::Result<[u8; 32]> {
    load_or_create(&data_dir.join("site.key"))
}

/// 32 secret bytes kept as hex in `path` (mode 0600). Only called while the
/// control plane starts, before it serves anything.
fn load_or_create(path: &Path) -> anyhow::Result<[u8; 32]> {
    match std::fs::read_to_string(path) {
        Ok(text) => hex::decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .with_context(|| {
                format!(
                    "{} is corrupt: it must hold 64 hex digits (remove it to make a new key)",
                    path.display()
                )
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
            crate::keys::write_secret(path, &hex::encode(secret))?;
            Ok(secret)
        }
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// The shared secret of the site with id `site_id`: HMAC-SHA256 of the id
/// under `key`, as hex. The same for every agent of the site, different
/// for every site, and not computable without `site.key`.
pub fn site_secret(key: &[u8; 32], site_id: &str) -> String {
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(key);
    let pad = |b: u8| block.iter().map(|k| k ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(site_id.as_bytes())
        .finalize();
    let outer = Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    hex::encode(outer)
}

/// Sets the process's umask to 077: every file and directory the control
/// plane (or the agent, and the QEMU processes it starts, which run as the
/// same user) makes from now on is its owner's alone.
pub fn private_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Makes `dir` (and its parents) if missing, mode 0700; an existing one
/// (from an older version, or made by hand) is tightened with everything
/// in it: no group or other permission bits anywhere.
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create {}", dir.display()))?;
    tighten(dir).with_context(|| format!("restrict the permissions under {}", dir.display()))
}

/// Clears the group and other bits of `path` and, for a directory, of
/// everything under it. Symbolic links are left alone (and not followed).
fn tighten(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let md = std::fs::symlink_metadata(path)?;
    if md.file_type().is_symlink() {
        return Ok(());
    }
    let mode = md.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7700))?;
    }
    if md.is_dir() {
        for entry in std::fs::read_dir(path)? {
            tighten(&entry?.path())?;
        }
    }
    Ok(())
}

/// Writes a secret readable by the owner only (mode 0600), durably and
/// atomically (a reader sees the old file or the new one).
pub fn write_secret(path: &Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    // A leftover temporary file may have a wider mode: start afresh.
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("write {}", tmp.display()))?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p)
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn keys_are_made_once_and_kept() {
        let d = tempfile::tempdir().expect("tempdir");
        let a = catalog_key(d.path()).expect("make");
        let b = catalog_key(d.path()).expect("load");
        assert_eq!(a.to_bytes(), b.to_bytes());
        assert_eq!(mode(&d.path().join("catalog.key")), 0o600);
        assert_eq!(
            site_key(d.path()).expect("make"),
            site_key(d.path()).expect("load")
        );
        std::fs::write(d.path().join("catalog.key"), "not hex").expect("write");
        let e = catalog_key(d.path()).expect_err("corrupt");
        assert!(format!("{e:#}").contains("64 hex digits"), "{e:#}");
    }

    #[test]
    fn site_secrets_differ_by_site_and_key() {
        let k1 = [1u8; 32];
        let k2 = [2u8; 32];
        assert_eq!(site_secret(&k1, "a"), site_secret(&k1, "a"));
        assert_ne!(site_secret(&k1, "a"), site_secret(&k1, "b"));
        assert_ne!(site_secret(&k1, "a"), site_secret(&k2, "a"));
        // HMAC-SHA256, as Python's `hmac.new(bytes([1] * 32), b"a",
        // hashlib.sha256).hexdigest()` computes it.
        assert_eq!(
            site_secret(&k1, "a"),
            "8fed454e4af2e38d7a0c4f0345a12d8ca418554236df19d57b6a239c212bd8ea"
        );
    }

    #[test]
    fn an_existing_data_directory_is_tightened_with_everything_in_it() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path().join("data");
        std::fs::create_dir_all(root.join("images")).expect("mkdir");
        std::fs::write(root.join("virt8ra.db"), b"x").expect("write");
        std::fs::write(root.join("images/a.qcow2"), b"x").expect("write");
        for p in ["", "images", "virt8ra.db", "images/a.qcow2"] {
            std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        std::os::unix::fs::symlink("/etc/hostname", root.join("link")).expect("symlink");
        private_dir(&root).expect("private");
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("images")), 0o700);
        assert_eq!(mode(&root.join("virt8ra.db")), 0o700 & 0o755);
        assert_eq!(mode(&root.join("images/a.qcow2")), 0o700);
        // The link's target is not touched.
        assert_ne!(mode(Path::new("/etc/hostname")) & 0o044, 0);
        let fresh = d.path().join("fresh/deeper");
        private_dir(&fresh).expect("fresh");
        assert_eq!(mode(&fresh), 0o700);
    }
}
