//! Guest contextualization in the standard guests already understand:
//! cloud-init's NoCloud data source, as a small FAT volume labelled `cidata`
//! holding `meta-data` (instance id, hostname, and the site, as
//! `virt8ra-site`) and `user-data` (the VM's user data, verbatim). Written
//! with mtools, so no mounting and no root privileges are needed.

use std::path::Path;

use super::{DriverError, GuestContext, Result};

/// The `meta-data` document (YAML).
pub fn meta_data(c: &GuestContext) -> String {
    let mut s = format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        yaml_str(&c.instance_id),
        yaml_str(&c.hostname)
    );
    if let Some(site) = &c.site {
        s.push_str(&format!("virt8ra-site: {}\n", yaml_str(site)));
    }
    s
}

/// A YAML scalar, quoted (names are restricted, but be safe).
fn yaml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Writes `seed.img` into `dir` for `c`, replacing any older one.
pub async fn write_seed(dir: &Path, c: &GuestContext) -> Result<()> {
    let io = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| DriverError::Io(what, e)
    };
    let work = dir.join("seed.d");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(io("create the seed directory"))?;
    std::fs::write(work.join("meta-data"), meta_data(c)).map_err(io("write meta-data"))?;
    let user = c
        .user_data
        .clone()
        .unwrap_or_else(|| "#cloud-config\n{}\n".to_string());
    std::fs::write(work.join("user-data"), user).map_err(io("write user-data"))?;
    let tmp = dir.join("seed.img.tmp");
    let _ = std::fs::remove_file(&tmp);
    let img = tmp.to_string_lossy().to_string();
    run(
        "mformat",
        &["-C", "-f", "1440", "-v", "cidata", "-i", &img, "::"],
    )
    .await?;
    for f in ["meta-data", "user-data"] {
        let src = work.join(f).to_string_lossy().to_string();
        run("mcopy", &["-i", &img, &src, &format!("::{f}")]).await?;
    }
    std::fs::rename(&tmp, dir.join("seed.img")).map_err(io("write seed.img"))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

async fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = tokio::process::Command::new(cmd)
        .args(args)
        .output()
        .await
        .map_err(|e| DriverError::Other(format!("cannot run {cmd} (install mtools): {e}")))?;
    if !out.status.success() {
        return Err(DriverError::Other(format!(
            "{cmd} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_data_names_the_instance_host_and_site() {
        let c = GuestContext {
            instance_id: "i-1".into(),
            hostname: "web-1".into(),
            site: Some("pl-gdansk".into()),
            user_data: None,
        };
        assert_eq!(
            meta_data(&c),
            "instance-id: \"i-1\"\nlocal-hostname: \"web-1\"\nvirt8ra-site: \"pl-gdansk\"\n"
        );
    }

    #[tokio::test]
    async fn the_seed_is_a_cidata_volume_with_both_files() {
        let d = tempfile::tempdir().unwrap();
        let c = GuestContext {
            instance_id: "i-1".into(),
            hostname: "web-1".into(),
            site: None,
            user_data: Some("#!/bin/sh\necho hi\n".into()),
        };
        write_seed(d.path(), &c).await.unwrap();
        let img = d.path().join("seed.img");
        let img = img.to_str().unwrap();
        let label = std::process::Command::new("mlabel")
            .args(["-s", "-i", img, "::"])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&label.stdout)
                .to_lowercase()
                .contains("cidata"),
            "{}",
            String::from_utf8_lossy(&label.stdout)
        );
        let ud = std::process::Command::new("mtype")
            .args(["-i", img, "::user-data"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&ud.stdout), "#!/bin/sh\necho hi\n");
    }
}
