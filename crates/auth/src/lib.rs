//! `cnnf-auth`: the NATS credentials of a CNNF installation.
//!
//! NATS decentralized auth: an **operator** key signs the **accounts**
//! (a system account, through which the server is managed, and the `CNNF`
//! account holding every stream and bucket); the `CNNF` account key signs
//! one **user** per node agent and one for the services. A user JWT carries
//! its permissions, so the server needs no user list: it trusts what the
//! operator and the account signed, and an account JWT pushed to a running
//! server (with a `revocations` entry) cuts off a node at once.
//!
//! - [`jwt`]: the JWT encoding of operator, account and user claims, signed
//!   with nkeys (ed25519).
//! - [`permissions`]: what one node and the services may publish and
//!   subscribe to.
//! - [`creds`]: the `.creds` file format clients log in with.
//! - [`dir`]: an auth directory on disk: keys, JWTs, enrolled nodes, the
//!   nats-server include file.
//!
//! The JWTs are encoded here rather than with the `nats-io-jwt` crate
//! (0.1): that crate regenerates its sources from a JSON schema in its build
//! script, writing into its own source directory (which breaks on a
//! read-only or vendored registry) and pulling a code generator (typify,
//! schemars, syn) into every build, and its signing panics where an error
//! is wanted. The format is small (base64url JSON header and claims, an
//! ed25519 signature), and the tests check it against nats-server itself.
//!
//! No NATS client, no storage engine, no service crate: the CLI, the tests
//! and the agent's tests use it alike.

#![forbid(unsafe_code)]

pub mod creds;
pub mod dir;
pub mod jwt;
pub mod permissions;

pub use dir::{AuthDir, Enrolment};
pub use permissions::Permissions;

use std::path::PathBuf;

/// What went wrong with credentials, and where.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file did not hold what it should.
    #[error("{path}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An nkey could not be created, read or used.
    #[error("nkey: {0}")]
    Key(String),
    /// A JWT did not decode or verify.
    #[error("JWT: {0}")]
    Jwt(String),
    /// The directory holds no credentials yet.
    #[error("{0}: no CNNF credentials here (run `cnnf auth init --dir {0}` first)")]
    NotInitialised(String),
    /// A cluster or node name cannot stand in a subject.
    #[error(transparent)]
    Name(#[from] cnnf_core::subjects::InvalidToken),
    /// The node already has valid credentials.
    #[error(
        "node {node} of cluster {cluster} is already enrolled (user {user}); revoke it first to issue new credentials"
    )]
    AlreadyEnrolled {
        /// Cluster.
        cluster: String,
        /// Node.
        node: String,
        /// Its user public key.
        user: String,
    },
    /// The node was never enrolled.
    #[error("node {node} of cluster {cluster} is not enrolled in {dir}")]
    NotEnrolled {
        /// Cluster.
        cluster: String,
        /// Node.
        node: String,
        /// The auth directory.
        dir: String,
    },
}

/// Seconds since the Unix epoch, now.
pub(crate) fn now_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// `seconds` since the epoch as an RFC 3339 UTC time (`2026-12-03T12:00:00Z`).
pub fn format_time(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let rest = seconds % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_format_as_rfc3339() {
        assert_eq!(super::format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::format_time(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::format_time(1_796_299_199), "2026-12-03T11:59:59Z");
    }
}
