//! SSH keys made in-process: each instance's Dropbear host key (ed25519,
//! in Dropbear's own file format, microseconds each instead of one
//! `dropbearkey` process per instance) and nifty's client key pair.

use std::path::Path;

use ssh_key::private::{Ed25519Keypair, KeypairData};
use ssh_key::{LineEnding, PrivateKey};

use crate::disk::write_atomic;
use crate::{Error, Result};

/// An ed25519 host key.
pub struct HostKey(Ed25519Keypair);

impl HostKey {
    /// A fresh random key from the OS's generator.
    pub fn generate() -> HostKey {
        HostKey(Ed25519Keypair::random(&mut rand::rngs::OsRng))
    }

    /// Dropbear's private key file: SSH string `"ssh-ed25519"`, then an SSH
    /// string of the 32-byte seed followed by the 32-byte public key.
    pub fn dropbear_private(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(83);
        put_string(&mut out, b"ssh-ed25519");
        let mut secret = [0u8; 64];
        secret[..32].copy_from_slice(&self.0.private.to_bytes());
        secret[32..].copy_from_slice(self.0.public.as_ref());
        put_string(&mut out, &secret);
        out
    }

    /// The public key as an OpenSSH `known_hosts`/`authorized_keys` entry.
    pub fn openssh_public(&self) -> String {
        ssh_key::PublicKey::from(self.0.public)
            .to_openssh()
            .unwrap_or_default()
    }
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// Returns nifty's client public key, creating the pair under `path` (and
/// `path.pub`) the first time. The private key is OpenSSH format, mode 600.
pub fn ensure_client_key(path: &Path) -> Result<String> {
    let pub_path = path.with_extension("pub");
    if path.exists() {
        return std::fs::read_to_string(&pub_path)
            .map(|s| s.trim().to_string())
            .map_err(Error::io("read", pub_path));
    }
    let pair = Ed25519Keypair::random(&mut rand::rngs::OsRng);
    let key = PrivateKey::new(KeypairData::Ed25519(pair), "nifty")
        .map_err(|e| Error::Host(format!("cannot make the client key: {e}")))?;
    let private = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| Error::Host(format!("cannot encode the client key: {e}")))?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| Error::Host(format!("cannot encode the client key: {e}")))?;
    // Each file appears whole; the private key last: its presence means
    // the pair is complete.
    write_atomic(&pub_path, format!("{public}\n").as_bytes(), 0o644)?;
    write_atomic(path, private.as_bytes(), 0o600)?;
    Ok(public)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropbear_format() {
        let k = HostKey::generate();
        let b = k.dropbear_private();
        assert_eq!(b.len(), 4 + 11 + 4 + 64);
        assert_eq!(&b[..15], b"\0\0\0\x0bssh-ed25519");
        assert_eq!(&b[15..19], &[0, 0, 0, 64]);
        // The public half in the file is the one OpenSSH sees.
        let pubkey = ssh_key::PublicKey::from_openssh(&k.openssh_public()).unwrap();
        let ed = pubkey.key_data().ed25519().unwrap();
        assert_eq!(&b[51..], ed.as_ref());
        assert_ne!(b, HostKey::generate().dropbear_private());
    }

    #[test]
    fn client_key_is_made_once() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("id_ed25519");
        let a = ensure_client_key(&p).unwrap();
        assert!(a.starts_with("ssh-ed25519 "));
        assert_eq!(ensure_client_key(&p).unwrap(), a);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
