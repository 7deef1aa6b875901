//! An auth directory: everything `cnnf auth init` makes and `cnnf nodes`
//! changes.
//!
//! ```text
//! operator.nk  system-account.nk  cnnf-account.nk   seeds (mode 0600)
//! operator.jwt system-account.jwt cnnf-account.jwt  the signed JWTs
//! services.creds                                   the services' user (CNNF account, unrestricted)
//! system.creds                                     a system-account user, to push account updates
//! nodes.json                                       every enrolment: cluster, node, user key, issued, revoked
//! nats-auth.conf                                   nats-server include: operator, system account,
//!                                                  full resolver (jwt/), preload of both accounts
//! jwt/                                             the resolver's store (nats-server writes it)
//! ```
//!
//! Every file is written whole to a temporary name and renamed, so a crash
//! leaves the old version or the new one.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use cnnf_core::subjects::Token;
use nkeys::KeyPair;
use serde::{Deserialize, Serialize};

use crate::jwt::{self, Account, AccountLimits, Operator, User};
use crate::{creds, now_seconds, permissions, AuthError};

/// Name of the `CNNF` account (its JWT's `name`).
pub const ACCOUNT_NAME: &str = "CNNF";
/// Name of the system account.
pub const SYSTEM_ACCOUNT_NAME: &str = "SYS";
/// The nats-server include file in the directory.
pub const INCLUDE_FILE: &str = "nats-auth.conf";
/// The services' creds file in the directory.
pub const SERVICES_CREDS: &str = "services.creds";
/// The system user's creds file in the directory.
pub const SYSTEM_CREDS: &str = "system.creds";

const OPERATOR_SEED: &str = "operator.nk";
const SYSTEM_SEED: &str = "system-account.nk";
const ACCOUNT_SEED: &str = "cnnf-account.nk";
const OPERATOR_JWT: &str = "operator.jwt";
const SYSTEM_JWT: &str = "system-account.jwt";
const ACCOUNT_JWT: &str = "cnnf-account.jwt";
const STATE: &str = "nodes.json";
const RESOLVER_DIR: &str = "jwt";

/// One node's credentials, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolment {
    /// Cluster of the node.
    pub cluster: String,
    /// The node.
    pub node: String,
    /// Public key of its user (`U...`).
    pub user: String,
    /// When its user JWT was issued (seconds since the epoch).
    pub issued: u64,
    /// When it was revoked, if it was.
    pub revoked: Option<u64>,
}

/// What `nodes.json` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    /// Issue time of the current `CNNF` account JWT: a new one must be
    /// later, or servers keep the one they have.
    account_issued: u64,
    nodes: Vec<Enrolment>,
}

/// An initialised auth directory.
pub struct AuthDir {
    path: PathBuf,
    operator: KeyPair,
    system: KeyPair,
    account: KeyPair,
    state: State,
}

impl std::fmt::Debug for AuthDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthDir")
            .field("path", &self.path)
            .field("operator", &self.operator.public_key())
            .field("account", &self.account.public_key())
            .finish_non_exhaustive()
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> AuthError + '_ {
    move |source| AuthError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `bytes` to `path` through a temporary file, with `mode`.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AuthError> {
    let temporary = path.with_extension("tmp");
    {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temporary)
            .map_err(io_error(&temporary))?;
        file.write_all(bytes).map_err(io_error(&temporary))?;
        file.sync_all().map_err(io_error(&temporary))?;
    }
    fs::rename(&temporary, path).map_err(io_error(path))
}

fn read_seed(path: &Path) -> Result<KeyPair, AuthError> {
    let text = fs::read_to_string(path).map_err(io_error(path))?;
    KeyPair::from_seed(text.trim()).map_err(|error| AuthError::Malformed {
        path: path.to_owned(),
        reason: format!("not an nkey seed: {error}"),
    })
}

fn seed_of(key: &KeyPair) -> Result<String, AuthError> {
    key.seed().map_err(|error| AuthError::Key(error.to_string()))
}

impl AuthDir {
    /// Makes a new auth directory at `path` (created if missing), or opens
    /// the one already there; the flag says whether it was made now.
    pub fn init(path: &Path) -> Result<(AuthDir, bool), AuthError> {
        if path.join(OPERATOR_SEED).exists() {
            return Ok((AuthDir::open(path)?, false));
        }
        fs::create_dir_all(path.join(RESOLVER_DIR)).map_err(io_error(path))?;
        let path = path.canonicalize().map_err(io_error(path))?;
        let dir = AuthDir {
            operator: KeyPair::new_operator(),
            system: KeyPair::new_account(),
            account: KeyPair::new_account(),
            state: State::default(),
            path,
        };
        let now = now_seconds();
        let operator_jwt = jwt::encode(
            &dir.operator.public_key(),
            "CNNF",
            now,
            &Operator::new(dir.system.public_key()),
            &dir.operator,
        )?;
        write_file(&dir.path.join(OPERATOR_JWT), operator_jwt.as_bytes(), 0o644)?;
        let system_jwt = jwt::encode(
            &dir.system.public_key(),
            SYSTEM_ACCOUNT_NAME,
            now,
            &Account::new(AccountLimits::unlimited_without_jetstream()),
            &dir.operator,
        )?;
        write_file(&dir.path.join(SYSTEM_JWT), system_jwt.as_bytes(), 0o644)?;
        let services = KeyPair::new_user();
        let services_jwt = jwt::encode(
            &services.public_key(),
            "cnnf-services",
            now,
            &User::new(None),
            &dir.account,
        )?;
        write_file(
            &dir.path.join(SERVICES_CREDS),
            creds::format(&services_jwt, &services)?.as_bytes(),
            0o600,
        )?;
        let system_user = KeyPair::new_user();
        let system_user_jwt = jwt::encode(
            &system_user.public_key(),
            "cnnf-system",
            now,
            &User::new(None),
            &dir.system,
        )?;
        write_file(
            &dir.path.join(SYSTEM_CREDS),
            creds::format(&system_user_jwt, &system_user)?.as_bytes(),
            0o600,
        )?;
        // Seeds last: their presence marks the directory as initialised.
        write_file(&dir.path.join(SYSTEM_SEED), seed_of(&dir.system)?.as_bytes(), 0o600)?;
        write_file(&dir.path.join(ACCOUNT_SEED), seed_of(&dir.account)?.as_bytes(), 0o600)?;
        let mut dir = dir;
        dir.resign_account(now)?;
        write_file(&dir.path.join(OPERATOR_SEED), seed_of(&dir.operator)?.as_bytes(), 0o600)?;
        Ok((dir, true))
    }

    /// Opens the auth directory at `path`.
    pub fn open(path: &Path) -> Result<AuthDir, AuthError> {
        if !path.join(OPERATOR_SEED).exists() {
            return Err(AuthError::NotInitialised(path.display().to_string()));
        }
        let path = path.canonicalize().map_err(io_error(path))?;
        let state_path = path.join(STATE);
        let state = match fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|error| AuthError::Malformed {
                path: state_path.clone(),
                reason: error.to_string(),
            })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(source) => {
                return Err(AuthError::Io {
                    path: state_path,
                    source,
                })
            }
        };
        Ok(AuthDir {
            operator: read_seed(&path.join(OPERATOR_SEED))?,
            system: read_seed(&path.join(SYSTEM_SEED))?,
            account: read_seed(&path.join(ACCOUNT_SEED))?,
            state,
            path,
        })
    }

    /// The directory (absolute).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The operator's public key.
    pub fn operator_key(&self) -> String {
        self.operator.public_key()
    }

    /// The `CNNF` account's public key.
    pub fn account_key(&self) -> String {
        self.account.public_key()
    }

    /// The system account's public key.
    pub fn system_account_key(&self) -> String {
        self.system.public_key()
    }

    /// The nats-server include file.
    pub fn include_file(&self) -> PathBuf {
        self.path.join(INCLUDE_FILE)
    }

    /// The services' creds file.
    pub fn services_creds(&self) -> PathBuf {
        self.path.join(SERVICES_CREDS)
    }

    /// The system user's creds file (for `$SYS.REQ.CLAIMS.UPDATE`).
    pub fn system_creds(&self) -> PathBuf {
        self.path.join(SYSTEM_CREDS)
    }

    /// The current `CNNF` account JWT.
    pub fn account_jwt(&self) -> Result<String, AuthError> {
        let path = self.path.join(ACCOUNT_JWT);
        fs::read_to_string(&path)
            .map(|text| text.trim().to_owned())
            .map_err(io_error(&path))
    }

    /// Every enrolment, oldest first.
    pub fn nodes(&self) -> &[Enrolment] {
        &self.state.nodes
    }

    /// Issues credentials for node `node` of `cluster`, writes them to
    /// `out` (mode 0600) and records the enrolment. A node already enrolled
    /// and not revoked is refused.
    pub fn enroll(&mut self, cluster: &str, node: &str, out: &Path) -> Result<Enrolment, AuthError> {
        let cluster_token = Token::new("cluster", cluster)?;
        let node_token = Token::new("node", node)?;
        if let Some(active) = self
            .state
            .nodes
            .iter()
            .find(|e| e.cluster == cluster && e.node == node && e.revoked.is_none())
        {
            return Err(AuthError::AlreadyEnrolled {
                cluster: cluster.to_owned(),
                node: node.to_owned(),
                user: active.user.clone(),
            });
        }
        let user = KeyPair::new_user();
        let issued = now_seconds();
        let permissions = permissions::node(&cluster_token, &node_token);
        let user_jwt = jwt::encode(
            &user.public_key(),
            &format!("cnnf-agent {cluster}.{node}"),
            issued,
            &User::new(Some(&permissions)),
            &self.account,
        )?;
        write_file(out, creds::format(&user_jwt, &user)?.as_bytes(), 0o600)?;
        let enrolment = Enrolment {
            cluster: cluster.to_owned(),
            node: node.to_owned(),
            user: user.public_key(),
            issued,
            revoked: None,
        };
        self.state.nodes.push(enrolment.clone());
        self.save_state()?;
        Ok(enrolment)
    }

    /// Revokes node `node` of `cluster`: its user goes into the account
    /// JWT's revocations, the account JWT is signed again and the include
    /// file's preload updated. Returns the new account JWT, to push to
    /// running servers. Revoking a revoked node signs the same revocations
    /// again (so a failed push can be retried).
    pub fn revoke(&mut self, cluster: &str, node: &str) -> Result<String, AuthError> {
        let now = now_seconds();
        let mut found = false;
        for enrolment in &mut self.state.nodes {
            if enrolment.cluster == cluster && enrolment.node == node {
                found = true;
                // A revocation covers JWTs issued at or before its time.
                enrolment.revoked.get_or_insert(now.max(enrolment.issued));
            }
        }
        if !found {
            return Err(AuthError::NotEnrolled {
                cluster: cluster.to_owned(),
                node: node.to_owned(),
                dir: self.path.display().to_string(),
            });
        }
        self.resign_account(now)
    }

    /// Signs the `CNNF` account JWT again with the recorded revocations,
    /// later than the last one, and rewrites the include file.
    fn resign_account(&mut self, now: u64) -> Result<String, AuthError> {
        let mut account = Account::new(AccountLimits::unlimited_with_jetstream());
        for enrolment in &self.state.nodes {
            if let Some(revoked) = enrolment.revoked {
                account.revocations.insert(enrolment.user.clone(), revoked);
            }
        }
        let issued = if self.state.account_issued == 0 {
            now
        } else {
            now.max(self.state.account_issued + 1)
        };
        let account_jwt = jwt::encode(
            &self.account.public_key(),
            ACCOUNT_NAME,
            issued,
            &account,
            &self.operator,
        )?;
        write_file(&self.path.join(ACCOUNT_JWT), account_jwt.as_bytes(), 0o644)?;
        self.state.account_issued = issued;
        self.save_state()?;
        self.write_include(&account_jwt)?;
        Ok(account_jwt)
    }

    fn write_include(&self, account_jwt: &str) -> Result<(), AuthError> {
        let system_path = self.path.join(SYSTEM_JWT);
        let system_jwt = fs::read_to_string(&system_path).map_err(io_error(&system_path))?;
        let text = format!(
            "# nats-server settings of this CNNF installation, written by `cnnf auth init`\n\
             # and `cnnf nodes revoke`: include it from the server's configuration.\n\
             # Operator mode: clients log in with creds files signed by the CNNF account.\n\
             operator: \"{operator}\"\n\
             system_account: \"{system}\"\n\
             resolver: {{\n  type: full\n  dir: \"{resolver}\"\n  allow_delete: false\n  interval: \"2m\"\n  timeout: \"1.9s\"\n}}\n\
             resolver_preload: {{\n  # {SYSTEM_ACCOUNT_NAME}\n  {system}: \"{system_jwt}\"\n  # {ACCOUNT_NAME}\n  {account}: \"{account_jwt}\"\n}}\n",
            operator = self.path.join(OPERATOR_JWT).display(),
            system = self.system.public_key(),
            resolver = self.path.join(RESOLVER_DIR).display(),
            system_jwt = system_jwt.trim(),
            account = self.account.public_key(),
        );
        write_file(&self.include_file(), text.as_bytes(), 0o644)
    }

    fn save_state(&self) -> Result<(), AuthError> {
        let bytes = serde_json::to_vec_pretty(&self.state).map_err(|error| AuthError::Jwt(error.to_string()))?;
        write_file(&self.path.join(STATE), &bytes, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrol_list_and_revoke() {
        let temp = tempfile::tempdir().unwrap();
        let (mut dir, created) = AuthDir::init(temp.path()).unwrap();
        assert!(created);
        let (_, created) = AuthDir::init(temp.path()).unwrap();
        assert!(!created, "a second init keeps the keys");
        let out = temp.path().join("n1.creds");
        let enrolment = dir.enroll("prod", "n1", &out).unwrap();
        let text = fs::read_to_string(&out).unwrap();
        let claims = jwt::decode(creds::jwt_of(&text).unwrap()).unwrap();
        assert_eq!(claims["sub"], enrolment.user);
        assert_eq!(claims["iss"], dir.account_key());
        assert!(matches!(
            dir.enroll("prod", "n1", &out),
            Err(AuthError::AlreadyEnrolled { .. })
        ));
        assert!(matches!(dir.enroll("prod", "a.b", &out), Err(AuthError::Name(_))));

        let before = dir.state.account_issued;
        let account_jwt = dir.revoke("prod", "n1").unwrap();
        let claims = jwt::decode(&account_jwt).unwrap();
        assert!(claims["nats"]["revocations"][&enrolment.user].as_u64().unwrap() >= enrolment.issued);
        assert!(claims["iat"].as_u64().unwrap() > before);
        let include = fs::read_to_string(dir.include_file()).unwrap();
        assert!(include.contains(&account_jwt));

        let reopened = AuthDir::open(temp.path()).unwrap();
        assert_eq!(reopened.nodes().len(), 1);
        assert!(reopened.nodes()[0].revoked.is_some());
        assert!(matches!(
            AuthDir::open(&temp.path().join("nothing")),
            Err(AuthError::NotInitialised(_))
        ));
        assert!(matches!(dir.revoke("prod", "n9"), Err(AuthError::NotEnrolled { .. })));
        // Enrolled again after the revocation: a new user.
        let again = dir.enroll("prod", "n1", &out).unwrap();
        assert_ne!(again.user, enrolment.user);
    }
}
