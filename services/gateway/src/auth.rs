//! Who is calling and what they may do.
//!
//! Operators authenticate with a bearer token (`Authorization: Bearer
//! <token>`) or, when the gateway serves TLS with a client CA, with a
//! client certificate whose subject common name (CN) is listed. Both map to
//! a name and one of three [`Role`]s through the tokens file. The file holds
//! only SHA-256 hashes of tokens, so a leaked file grants nothing, and the
//! gateway never logs a token. The file is re-read when it changes (polled)
//! and on SIGHUP; a file that fails to parse leaves the previous set in
//! force.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// What a caller may do; each role includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads, lists, tails, exports and simulations.
    Viewer,
    /// Also model commands and policy changes to objects and rules.
    Operator,
    /// Also policy imports and mode changes.
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        })
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The name the tokens file gives the caller (used as the actor of changes).
    pub name: String,
    /// What the caller may do.
    pub role: Role,
}

/// Why a request is not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Neither a bearer token nor a client certificate came with the request.
    #[error("no credentials: send `Authorization: Bearer <token>` or a client certificate")]
    Missing,
    /// The `Authorization` header is not `Bearer <token>`.
    #[error("malformed Authorization header: expected `Bearer <token>`")]
    Malformed,
    /// The token is not in the tokens file.
    #[error("unknown or revoked token")]
    UnknownToken,
    /// The client certificate's CN is not in the tokens file.
    #[error("client certificate CN {0:?} is not authorized")]
    UnknownCertificate(String),
}

/// One entry of the tokens file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The caller's name.
    pub name: String,
    /// The caller's role.
    pub role: Role,
}

/// The tokens file: `{"tokens": {"<sha256 hex of token>": {"name", "role"}},
/// "client_certs": {"<certificate CN>": {"name", "role"}}}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    /// Token hashes (lowercase SHA-256 hex of the token's bytes).
    #[serde(default)]
    pub tokens: HashMap<String, Entry>,
    /// Client certificate subject common names.
    #[serde(default)]
    pub client_certs: HashMap<String, Entry>,
}

/// Errors reading the tokens file.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// The file could not be read.
    #[error("reading tokens file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("tokens file {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and where.
        message: String,
    },
}

impl TokensFile {
    /// Parses and checks a tokens file's text; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, TokensError> {
        let invalid = |message: String| TokensError::Invalid {
            path: path.to_owned(),
            message,
        };
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let mut file: TokensFile = serde_path_to_error::deserialize(&mut deserializer)
            .map_err(|error| invalid(format!("at {}: {}", error.path(), error.inner())))?;
        let mut normalized = HashMap::with_capacity(file.tokens.len());
        for (hash, entry) in file.tokens.drain() {
            let lower = hash.to_ascii_lowercase();
            if lower.len() != 64 || !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(format!(
                    "token of {:?}: the key must be the 64-hex-digit SHA-256 of the token, not the token",
                    entry.name
                )));
            }
            normalized.insert(lower, entry);
        }
        file.tokens = normalized;
        Ok(file)
    }

    /// Reads and parses a tokens file.
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }
}

/// The lowercase SHA-256 hex of a token, as the tokens file keys it.
pub fn token_hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// The credentials currently in force, shared by every connection.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    current: Arc<RwLock<Arc<TokensFile>>>,
    path: Option<PathBuf>,
}

impl Credentials {
    /// Credentials read from `path` (none at all when `None`: every call is
    /// then refused as unauthenticated).
    pub fn open(path: Option<PathBuf>) -> Result<Self, TokensError> {
        let file = match &path {
            Some(path) => TokensFile::load(path)?,
            None => TokensFile::default(),
        };
        Ok(Self {
            current: Arc::new(RwLock::new(Arc::new(file))),
            path,
        })
    }

    /// Credentials from an already parsed file (never reloaded).
    pub fn fixed(file: TokensFile) -> Self {
        Self {
            current: Arc::new(RwLock::new(Arc::new(file))),
            path: None,
        }
    }

    /// Re-reads the file; on error the previous credentials stay in force.
    pub fn reload(&self) -> Result<(), TokensError> {
        let Some(path) = &self.path else { return Ok(()) };
        let file = TokensFile::load(path)?;
        let (tokens, certs) = (file.tokens.len(), file.client_certs.len());
        *self.current.write().expect("credentials lock poisoned") = Arc::new(file);
        tracing::info!(message = "Tokens file loaded.", path = %path.display(), tokens, client_certs = certs);
        Ok(())
    }

    /// Reloads on SIGHUP and whenever the file's modification time changes
    /// (checked every `poll`), until the task is dropped.
    pub async fn watch(self, poll: Duration) {
        let Some(path) = self.path.clone() else { return };
        let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let mut seen: Option<SystemTime> = modified(&path);
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut ticker = tokio::time::interval(poll);
        loop {
            let forced = tokio::select! {
                _ = ticker.tick() => false,
                Some(()) = async { match hangup.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => true,
            };
            let now = modified(&path);
            if !forced && now == seen {
                continue;
            }
            seen = now;
            if let Err(error) = self.reload() {
                tracing::error!(message = "Tokens file not reloaded; the previous one stays in force.", %error);
            }
        }
    }

    /// Authenticates a request from its `Authorization` header value and
    /// the client certificate CN of its connection. A bearer token wins over
    /// a certificate.
    pub fn authenticate(&self, authorization: Option<&[u8]>, client_cn: Option<&str>) -> Result<Caller, AuthError> {
        let file = Arc::clone(&self.current.read().expect("credentials lock poisoned"));
        if let Some(header) = authorization {
            let header = std::str::from_utf8(header).map_err(|_| AuthError::Malformed)?;
            let (scheme, token) = header.trim().split_once(' ').ok_or(AuthError::Malformed)?;
            let token = token.trim();
            if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
                return Err(AuthError::Malformed);
            }
            let entry = file.tokens.get(&token_hash(token)).ok_or(AuthError::UnknownToken)?;
            return Ok(Caller {
                name: entry.name.clone(),
                role: entry.role,
            });
        }
        if let Some(cn) = client_cn {
            let entry = file
                .client_certs
                .get(cn)
                .ok_or_else(|| AuthError::UnknownCertificate(cn.to_owned()))?;
            return Ok(Caller {
                name: entry.name.clone(),
                role: entry.role,
            });
        }
        Err(AuthError::Missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials() -> Credentials {
        let text = format!(
            r#"{{"tokens": {{"{}": {{"name": "vera", "role": "viewer"}}}},
                "client_certs": {{"ops-box": {{"name": "ops", "role": "operator"}}}}}}"#,
            token_hash("secret-v")
        );
        Credentials::fixed(TokensFile::parse(Path::new("t.json"), &text).unwrap())
    }

    #[test]
    fn bearer_and_certificate_map_to_roles() {
        let creds = credentials();
        let caller = creds.authenticate(Some(b"Bearer secret-v"), None).unwrap();
        assert_eq!(caller.role, Role::Viewer);
        assert_eq!(caller.name, "vera");
        assert_eq!(creds.authenticate(None, Some("ops-box")).unwrap().role, Role::Operator);
        assert_eq!(
            creds.authenticate(Some(b"Bearer nope"), None),
            Err(AuthError::UnknownToken)
        );
        assert_eq!(creds.authenticate(Some(b"Basic abc"), None), Err(AuthError::Malformed));
        assert_eq!(creds.authenticate(None, None), Err(AuthError::Missing));
        assert!(matches!(
            creds.authenticate(None, Some("stranger")),
            Err(AuthError::UnknownCertificate(_))
        ));
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
    }

    #[test]
    fn reload_takes_a_new_file_and_keeps_the_old_one_when_broken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let file = |token: &str, role: &str| {
            format!(
                r#"{{"tokens": {{"{}": {{"name": "n", "role": "{role}"}}}}}}"#,
                token_hash(token)
            )
        };
        std::fs::write(&path, file("one", "viewer")).unwrap();
        let creds = Credentials::open(Some(path.clone())).unwrap();
        assert_eq!(
            creds.authenticate(Some(b"Bearer one"), None).unwrap().role,
            Role::Viewer
        );
        std::fs::write(&path, file("two", "admin")).unwrap();
        creds.reload().unwrap();
        assert_eq!(
            creds.authenticate(Some(b"Bearer one"), None),
            Err(AuthError::UnknownToken)
        );
        assert_eq!(creds.authenticate(Some(b"Bearer two"), None).unwrap().role, Role::Admin);
        std::fs::write(&path, "{not json").unwrap();
        assert!(creds.reload().is_err());
        assert_eq!(creds.authenticate(Some(b"Bearer two"), None).unwrap().role, Role::Admin);
    }

    #[test]
    fn a_plain_token_as_key_is_refused_with_the_name() {
        let error = TokensFile::parse(
            Path::new("t.json"),
            r#"{"tokens": {"secret": {"name": "bob", "role": "admin"}}}"#,
        )
        .unwrap_err();
        assert!(error.to_string().contains("\"bob\""), "{error}");
        let error = TokensFile::parse(
            Path::new("t.json"),
            r#"{"tokens": {}, "client_certs": {"x": {"name": "n", "role": "root"}}}"#,
        )
        .unwrap_err();
        assert!(error.to_string().contains("client_certs.x.role"), "{error}");
    }
}
