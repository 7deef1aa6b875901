//! NATS JWTs (the v2 claims nats-server reads), signed with nkeys.
//!
//! A JWT is `base64url(header) . base64url(claims) . base64url(signature)`,
//! without padding; the header is always `{"typ":"JWT","alg":"ed25519-nkey"}`
//! and the signature is the issuer's ed25519 signature of the first two
//! parts. The claims name the subject (`sub`, the public key the JWT is
//! about), the issuer (`iss`), the issue time (`iat`, seconds), an id
//! (`jti`, the base32 SHA-256 of the claims without it) and, under `nats`,
//! what kind of entity it is and its settings.

use std::collections::BTreeMap;

use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use nkeys::KeyPair;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::permissions::Permissions;
use crate::AuthError;

const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

/// The claims format version nats-server 2.2 and later read.
const VERSION: u8 = 2;

/// The `nats` claims of an operator.
#[derive(Debug, Clone, Serialize)]
pub struct Operator {
    /// The account that manages the servers (`$SYS` requests).
    pub system_account: String,
    #[serde(rename = "type")]
    kind: &'static str,
    version: u8,
}

impl Operator {
    /// An operator whose system account is `system_account`.
    pub fn new(system_account: String) -> Self {
        Self {
            system_account,
            kind: "operator",
            version: VERSION,
        }
    }
}

/// Account limits; `-1` is unlimited. JetStream is on when the storage
/// limits are not zero.
#[derive(Debug, Clone, Serialize)]
pub struct AccountLimits {
    subs: i64,
    data: i64,
    payload: i64,
    imports: i64,
    exports: i64,
    wildcards: bool,
    conn: i64,
    leaf: i64,
    mem_storage: i64,
    disk_storage: i64,
    streams: i64,
    consumer: i64,
}

impl AccountLimits {
    /// No limit, and JetStream with no limit (the `CNNF` account: the
    /// streams carry their own limits).
    pub fn unlimited_with_jetstream() -> Self {
        jetstream(-1)
    }

    /// No limit, and no JetStream (the system account must not have it).
    pub fn unlimited_without_jetstream() -> Self {
        jetstream(0)
    }
}

/// The limits with JetStream storage set to `storage` (0: off, -1: on).
fn jetstream(storage: i64) -> AccountLimits {
    AccountLimits {
        subs: -1,
        data: -1,
        payload: -1,
        imports: -1,
        exports: -1,
        wildcards: true,
        conn: -1,
        leaf: -1,
        mem_storage: storage,
        disk_storage: storage,
        streams: storage,
        consumer: storage,
    }
}

/// The `nats` claims of an account.
#[derive(Debug, Clone, Serialize)]
pub struct Account {
    limits: AccountLimits,
    /// Revoked users: public key → time; a user JWT issued at or before
    /// that time is refused, and its connections are closed.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub revocations: BTreeMap<String, u64>,
    #[serde(rename = "type")]
    kind: &'static str,
    version: u8,
}

impl Account {
    /// An account with `limits` and no revocation.
    pub fn new(limits: AccountLimits) -> Self {
        Self {
            limits,
            revocations: BTreeMap::new(),
            kind: "account",
            version: VERSION,
        }
    }
}

/// An allow list of subjects.
#[derive(Debug, Clone, Serialize)]
struct Allow {
    allow: Vec<String>,
}

/// The `nats` claims of a user.
#[derive(Debug, Clone, Serialize)]
pub struct User {
    #[serde(rename = "pub", skip_serializing_if = "Option::is_none")]
    publish: Option<Allow>,
    #[serde(rename = "sub", skip_serializing_if = "Option::is_none")]
    subscribe: Option<Allow>,
    subs: i64,
    data: i64,
    payload: i64,
    #[serde(rename = "type")]
    kind: &'static str,
    version: u8,
}

impl User {
    /// A user allowed exactly `permissions` (`None`: everything in its
    /// account).
    pub fn new(permissions: Option<&Permissions>) -> Self {
        Self {
            publish: permissions.map(|p| Allow {
                allow: p.publish.clone(),
            }),
            subscribe: permissions.map(|p| Allow {
                allow: p.subscribe.clone(),
            }),
            subs: -1,
            data: -1,
            payload: -1,
            kind: "user",
            version: VERSION,
        }
    }
}

/// Encodes and signs a JWT about `subject` (a public key) named `name`,
/// issued at `issued_at` (seconds since the epoch), with `nats` claims,
/// signed by `issuer`.
pub fn encode<T: Serialize>(
    subject: &str,
    name: &str,
    issued_at: u64,
    nats: &T,
    issuer: &KeyPair,
) -> Result<String, AuthError> {
    let nats = serde_json::to_value(nats).map_err(|error| AuthError::Jwt(error.to_string()))?;
    let mut claims = serde_json::Map::new();
    claims.insert("iat".into(), issued_at.into());
    claims.insert("iss".into(), issuer.public_key().into());
    claims.insert("name".into(), name.into());
    claims.insert("sub".into(), subject.into());
    claims.insert("nats".into(), nats);
    let without_id = serde_json::to_string(&claims).map_err(|error| AuthError::Jwt(error.to_string()))?;
    let id = BASE32_NOPAD.encode(&Sha256::digest(without_id.as_bytes()));
    claims.insert("jti".into(), id.into());
    let body = serde_json::to_string(&claims).map_err(|error| AuthError::Jwt(error.to_string()))?;
    let signed = format!(
        "{}.{}",
        BASE64URL_NOPAD.encode(HEADER.as_bytes()),
        BASE64URL_NOPAD.encode(body.as_bytes())
    );
    let signature = issuer
        .sign(signed.as_bytes())
        .map_err(|error| AuthError::Key(error.to_string()))?;
    Ok(format!("{signed}.{}", BASE64URL_NOPAD.encode(&signature)))
}

/// Checks a JWT's header and its issuer's signature, and returns its
/// claims.
pub fn decode(jwt: &str) -> Result<serde_json::Value, AuthError> {
    let bad = |why: &str| AuthError::Jwt(why.to_owned());
    let mut parts = jwt.trim().split('.');
    let (Some(header), Some(body), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("not three dot-separated parts"));
    };
    let header = BASE64URL_NOPAD
        .decode(header.as_bytes())
        .map_err(|_| bad("the header is not base64url"))?;
    let header: serde_json::Value = serde_json::from_slice(&header).map_err(|_| bad("the header is not JSON"))?;
    if header.get("alg").and_then(|alg| alg.as_str()) != Some("ed25519-nkey") {
        return Err(bad("the algorithm is not ed25519-nkey"));
    }
    let claims = BASE64URL_NOPAD
        .decode(body.as_bytes())
        .map_err(|_| bad("the claims are not base64url"))?;
    let claims: serde_json::Value = serde_json::from_slice(&claims).map_err(|_| bad("the claims are not JSON"))?;
    let issuer = claims
        .get("iss")
        .and_then(|iss| iss.as_str())
        .ok_or_else(|| bad("no issuer"))?;
    let key = KeyPair::from_public_key(issuer).map_err(|error| AuthError::Key(error.to_string()))?;
    let signature = BASE64URL_NOPAD
        .decode(signature.as_bytes())
        .map_err(|_| bad("the signature is not base64url"))?;
    let signed_len = jwt.trim().len() - jwt.trim().rsplit('.').next().map_or(0, str::len) - 1;
    key.verify(&jwt.trim().as_bytes()[..signed_len], &signature)
        .map_err(|_| bad("the signature does not verify"))?;
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_jwt_decodes_and_verifies() {
        let operator = KeyPair::new_operator();
        let account = KeyPair::new_account();
        let jwt = encode(
            &account.public_key(),
            "CNNF",
            1_700_000_000,
            &Account::new(AccountLimits::unlimited_with_jetstream()),
            &operator,
        )
        .unwrap();
        let claims = decode(&jwt).unwrap();
        assert_eq!(claims["iss"], operator.public_key());
        assert_eq!(claims["sub"], account.public_key());
        assert_eq!(claims["nats"]["type"], "account");
        assert_eq!(claims["nats"]["version"], 2);
        assert_eq!(claims["nats"]["limits"]["disk_storage"], -1);
        assert!(claims["nats"].get("revocations").is_none());

        let mut tampered: Vec<&str> = jwt.split('.').collect();
        let other = encode(&account.public_key(), "X", 1, &Operator::new("A".into()), &operator).unwrap();
        tampered[1] = other.split('.').nth(1).unwrap();
        assert!(decode(&tampered.join(".")).is_err());
        assert!(decode("a.b").is_err());
    }
}
