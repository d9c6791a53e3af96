//! Keys as WireGuard writes them: x25519, 32 bytes, standard base64 (44
//! characters). Keys are generated on the host that uses them and the
//! private key never leaves it: the file is created mode 0600 and a file
//! that others can read is refused, as ssh refuses such a key.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand::RngCore;

pub use boringtun::x25519::{PublicKey, StaticSecret};

use crate::Error;

fn decode32(s: &str) -> Result<[u8; 32], String> {
    let bytes = STANDARD
        .decode(s.trim())
        .map_err(|_| "is not base64".to_string())?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| format!("is {} bytes, not 32", bytes.len()))
}

/// Parses a public key in WireGuard's base64.
pub fn parse_public(s: &str) -> Result<PublicKey, String> {
    decode32(s).map(PublicKey::from).map_err(|m| {
        format!("public key {s:?} {m} (want 32 bytes in base64, as `wg pubkey` prints)")
    })
}

/// A public key in WireGuard's base64.
pub fn encode_public(key: &PublicKey) -> String {
    STANDARD.encode(key.as_bytes())
}

/// Reads a private key file: base64, mode 0600 or stricter.
pub fn read_private(path: &Path) -> Result<StaticSecret, Error> {
    let what = path.display();
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::Config(format!("private key file {what}: {e}")))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(Error::Config(format!(
            "private key file {what} is readable by others (mode {:o}); chmod 0600 it",
            meta.permissions().mode() & 0o777
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("private key file {what}: {e}")))?;
    decode32(&text)
        .map(StaticSecret::from)
        .map_err(|m| Error::Config(format!("private key file {what} {m}")))
}

/// Creates a new private key file (mode 0600; an existing file is never
/// overwritten) and returns the public key.
pub fn generate(path: &Path) -> Result<PublicKey, Error> {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let secret = StaticSecret::from(bytes);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::Config(format!("cannot create key file {}: {e}", path.display())))?;
    writeln!(f, "{}", STANDARD.encode(secret.to_bytes()))
        .map_err(|e| Error::Config(format!("cannot write key file {}: {e}", path.display())))?;
    Ok(PublicKey::from(&secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_round_trips_and_is_private() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("k");
        let public = generate(&path).expect("generate");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let secret = read_private(&path).expect("read");
        assert_eq!(PublicKey::from(&secret), public);
        let text = encode_public(&public);
        assert_eq!(text.len(), 44);
        assert_eq!(parse_public(&text).expect("parse"), public);
        assert!(
            generate(&path).is_err(),
            "an existing key file is never overwritten"
        );
    }

    #[test]
    fn bad_keys_say_why() {
        assert!(parse_public("AAAA")
            .unwrap_err()
            .contains("3 bytes, not 32"));
        assert!(parse_public("not base64!")
            .unwrap_err()
            .contains("not base64"));
    }
}
