//! The agent's data directory is its owner's alone.
//!
//! It holds user data (a VM's user data in `desired.json`/`desired.log`
//! and its cloud-init seed, the VMs' disks, cached images) and the host's
//! credential, so
//! directories are 0700 and files 0600: the process's umask is 077 (set by
//! [`private_umask`] before anything is written; the QEMU processes the
//! agent starts inherit it and run as the same user, so they still read
//! and write everything), directories are made with an explicit 0700, and
//! an existing data directory from an older version is tightened with
//! everything in it when the agent starts ([`private_tree`]).

use std::path::Path;

/// Sets the process's umask to 077.
pub fn private_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Makes `dir` and its missing parents, mode 0700.
pub fn make_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// [`make_dir`], then clears the group and other bits of `dir` and of
/// everything under it (symbolic links are neither changed nor followed).
pub fn private_tree(dir: &Path) -> std::io::Result<()> {
    make_dir(dir)?;
    tighten(dir)
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn an_existing_tree_is_tightened() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path().join("agent");
        std::fs::create_dir_all(root.join("desired")).expect("mkdir");
        std::fs::write(root.join("desired.log"), b"x").expect("write");
        for p in ["", "desired", "desired.log"] {
            std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        private_tree(&root).expect("tighten");
        for p in ["", "desired", "desired.log"] {
            let m = std::fs::metadata(root.join(p))
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(m & 0o077, 0, "{p}: {m:o}");
        }
        make_dir(&root.join("new/deeper")).expect("make");
        let m = std::fs::metadata(root.join("new/deeper"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(m & 0o777, 0o700);
    }
}
