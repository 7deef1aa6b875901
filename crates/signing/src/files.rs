//! Key files: the only I/O of the crate.
//!
//! - A secret key file holds one `cnnf-ed25519-secret <base64>` line
//!   ([`crate::SigningKey::to_text`]); it is created with mode 0600 and
//!   never overwritten.
//! - A public key file holds one or more `cnnf-ed25519-public <key-id>
//!   <base64>` lines ([`crate::PublicKey::to_line`]); an agent's trusted
//!   keys file is the same format, several lines during a key rotation.
//! - The public key of `<name>.key` is written beside it as `<name>.pub`
//!   ([`public_key_path`]).

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use crate::{KeyError, PublicKey, SigningKey};

/// A key file that cannot be read, written or used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The file's text is not what it should be.
    #[error("{path}: {source}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong, and on which line.
        source: KeyError,
    },
}

impl FileError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }

    /// True when the file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, FileError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

fn read(path: &Path) -> Result<String, FileError> {
    fs::read_to_string(path).map_err(|error| FileError::io(path, error))
}

/// Reads a secret key file.
pub fn read_signing_key(path: &Path) -> Result<SigningKey, FileError> {
    SigningKey::parse(&read(path)?).map_err(|source| FileError::Key {
        path: path.to_owned(),
        source,
    })
}

/// Reads a public (trusted) keys file: at least one key.
pub fn read_public_keys(path: &Path) -> Result<Vec<PublicKey>, FileError> {
    PublicKey::parse_many(&read(path)?).map_err(|source| FileError::Key {
        path: path.to_owned(),
        source,
    })
}

/// Where the public key of the secret key file `secret` goes: the same
/// name with the extension `.pub`.
pub fn public_key_path(secret: &Path) -> PathBuf {
    secret.with_extension("pub")
}

/// Writes `key` to the new file `path` (mode 0600, synced); an existing
/// file is never overwritten. The file appears whole or not at all: the
/// key is written to a temporary file first and linked to `path`, so two
/// processes generating at once end with one key that both read.
pub fn write_signing_key(path: &Path, key: &SigningKey) -> Result<(), FileError> {
    let dir = match path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        Some(dir) => {
            fs::create_dir_all(dir).map_err(|error| FileError::io(dir, error))?;
            dir.to_owned()
        }
        None => PathBuf::from("."),
    };
    let mut suffix = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut suffix);
    let temporary = dir.join(format!(
        ".table-key-{}.tmp",
        suffix.iter().map(|byte| format!("{byte:02x}")).collect::<String>()
    ));
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut file| {
            file.write_all(key.to_text().as_bytes())?;
            file.sync_all()
        })
        .and_then(|()| fs::hard_link(&temporary, path));
    let _ = fs::remove_file(&temporary);
    written.map_err(|error| FileError::io(path, error))
}

/// Writes the public key file of `key` at `path` (replacing it: it holds
/// nothing secret and is derived from the key).
pub fn write_public_key(path: &Path, key: &PublicKey) -> Result<(), FileError> {
    let text = format!(
        "# CNNF verdict-table public key {}: add this line to every agent's --table-keys file.\n{}\n",
        key.id(),
        key.to_line()
    );
    let mut suffix = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut suffix);
    let temporary = path.with_extension(format!(
        "pub.{}.tmp",
        suffix.iter().map(|byte| format!("{byte:02x}")).collect::<String>()
    ));
    fs::write(&temporary, text)
        .and_then(|()| fs::rename(&temporary, path))
        .map_err(|error| FileError::io(path, error))
}

/// Generates a key into the new file `secret` and its public key beside
/// it ([`public_key_path`]).
pub fn generate(secret: &Path) -> Result<SigningKey, FileError> {
    let key = SigningKey::generate();
    write_signing_key(secret, &key)?;
    write_public_key(&public_key_path(secret), key.public_key())?;
    Ok(key)
}

/// Reads the key at `secret`, or generates it there when the file does not
/// exist; true when generated. The public key file beside it is written
/// again when missing.
pub fn load_or_generate(secret: &Path) -> Result<(SigningKey, bool), FileError> {
    let existing = |key: SigningKey| -> Result<(SigningKey, bool), FileError> {
        let public = public_key_path(secret);
        if !public.exists() {
            write_public_key(&public, key.public_key())?;
        }
        Ok((key, false))
    };
    match read_signing_key(secret) {
        Ok(key) => existing(key),
        Err(error) if error.is_not_found() => match generate(secret) {
            Ok(key) => Ok((key, true)),
            // Another process generated it first: use that one.
            Err(FileError::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
                existing(read_signing_key(secret)?)
            }
            Err(error) => Err(error),
        },
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_generated_key_is_private_beside_its_public_key_and_loads_again() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("keys/table-signing.key");
        let (key, generated) = load_or_generate(&secret).unwrap();
        assert!(generated);
        let mode = fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let public = read_public_keys(&dir.path().join("keys/table-signing.pub")).unwrap();
        assert_eq!(public, vec![key.public_key().clone()]);

        let (again, generated) = load_or_generate(&secret).unwrap();
        assert!(!generated);
        assert_eq!(again.id(), key.id());
        assert!(
            write_signing_key(&secret, &SigningKey::generate()).is_err(),
            "never overwritten"
        );
    }

    #[test]
    fn a_bad_file_names_its_path_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trusted.pub");
        fs::write(&path, "# keys\ncnnf-ed25519-public x y z\n").unwrap();
        let error = read_public_keys(&path).unwrap_err().to_string();
        assert!(error.contains("trusted.pub") && error.contains("line 2"), "{error}");
        let missing = read_public_keys(&dir.path().join("absent.pub")).unwrap_err();
        assert!(missing.is_not_found());
        let error = read_signing_key(&path).unwrap_err().to_string();
        assert!(error.contains("line 2"), "{error}");
    }
}
