//! Signed verdict tables: the policy service signs every table it puts in
//! KV `cnnf-verdicts` with an ed25519 key, and agents enforce only tables
//! whose signature verifies against a key they trust. Without it, anyone
//! able to write the bucket could switch a node's enforcement off.
//!
//! - A [`SigningKey`] signs the encoded `VerdictTable` bytes into a
//!   `SignedVerdictTable` ([`SigningKey::sign_table`]). The signature
//!   covers [`TABLE_DOMAIN`] followed by the table bytes, so a signature
//!   the same key made over anything else never verifies as a table.
//! - A [`PublicKey`] carries its [`KeyId`] (derived from the key itself),
//!   which names the signer inside every signed table, so an agent holding
//!   several trusted keys (a rotation) knows which one to check.
//! - [`open`] (or [`decode`] then [`verify`]) turns the bytes of a KV value
//!   back into table bytes, or says why not ([`VerifyError`]: unsigned,
//!   unknown key, bad signature, malformed).
//! - Keys are text, one per line ([`SigningKey::to_text`],
//!   [`PublicKey::to_line`]); [`files`] reads and writes key files, the
//!   only I/O of this crate.
//!
//! Must never depend on NATS, storage or any service: the agent, the
//! policy service and the tools all link it.

#![forbid(unsafe_code)]

pub mod files;

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use cnnf_proto::v1::{SignedVerdictTable, VerdictTable};
use ed25519_dalek::Signer as _;
use prost::Message as _;
use sha2::{Digest as _, Sha256};

/// What precedes the table bytes in the signed message: a signature over
/// anything else (another CNNF value, a message of another protocol) never
/// verifies as a verdict table.
pub const TABLE_DOMAIN: &[u8] = b"cnnf.v1.VerdictTable\0";

/// First word of a secret key line.
pub const SECRET_TAG: &str = "cnnf-ed25519-secret";

/// First word of a public key line.
pub const PUBLIC_TAG: &str = "cnnf-ed25519-public";

/// The id of a public key: the first 8 bytes of SHA-256 of its 32 bytes,
/// in lowercase hex (16 characters).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    fn of(key: &ed25519_dalek::VerifyingKey) -> Self {
        let digest = Sha256::digest(key.as_bytes());
        Self(digest[..8].iter().map(|byte| format!("{byte:02x}")).collect())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A key line or key text that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct KeyError {
    /// 1-based line of the text (0: the text as a whole).
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

impl KeyError {
    fn at(line: usize, reason: impl Into<String>) -> Self {
        Self {
            line,
            reason: reason.into(),
        }
    }
}

/// A public key agents trust, with its id.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: ed25519_dalek::VerifyingKey,
    id: KeyId,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublicKey").field("id", &self.id).finish()
    }
}

impl PublicKey {
    /// The key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        let key =
            ed25519_dalek::VerifyingKey::from_bytes(bytes).map_err(|_| KeyError::at(0, "not an ed25519 public key"))?;
        if key.is_weak() {
            return Err(KeyError::at(0, "a weak ed25519 public key (small order)"));
        }
        Ok(Self {
            id: KeyId::of(&key),
            key,
        })
    }

    /// The key's id.
    pub fn id(&self) -> &KeyId {
        &self.id
    }

    /// The key's 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The key as one line: `cnnf-ed25519-public <key-id> <base64>`.
    pub fn to_line(&self) -> String {
        format!("{PUBLIC_TAG} {} {}", self.id, BASE64.encode(self.key.as_bytes()))
    }

    /// Parses the text of a trusted-keys file: one key per line as
    /// [`PublicKey::to_line`] writes it; blank lines and lines starting
    /// with `#` are ignored. The id on each line must be the key's own (a
    /// damaged or mixed-up line is refused). At least one key; a key listed
    /// twice counts once.
    pub fn parse_many(text: &str) -> Result<Vec<PublicKey>, KeyError> {
        let mut keys: Vec<PublicKey> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            // The tag first: a secret key's line has two words, and saying
            // it is a secret key helps more than counting its words.
            let tag = fields.first().copied().unwrap_or_default();
            if tag != PUBLIC_TAG {
                let hint = if tag == SECRET_TAG {
                    " (this is a secret key: give agents the public key file)"
                } else {
                    ""
                };
                return Err(KeyError::at(
                    number,
                    format!("expected `{PUBLIC_TAG}`, got `{tag}`{hint}"),
                ));
            }
            let [_, id, encoded] = fields[..] else {
                return Err(KeyError::at(
                    number,
                    format!("expected `{PUBLIC_TAG} <key-id> <base64>`, got {} words", fields.len()),
                ));
            };
            let bytes = decode_32(encoded).map_err(|reason| KeyError::at(number, reason))?;
            let key = PublicKey::from_bytes(&bytes).map_err(|error| KeyError::at(number, error.reason))?;
            if key.id.as_str() != id {
                return Err(KeyError::at(
                    number,
                    format!("the line names key id {id} but the key's id is {}", key.id),
                ));
            }
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        if keys.is_empty() {
            return Err(KeyError::at(0, format!("no `{PUBLIC_TAG}` line")));
        }
        Ok(keys)
    }
}

/// The policy service's secret key. Its `Debug` shows the id only.
#[derive(Clone)]
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
    public: PublicKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey").field("id", &self.public.id).finish()
    }
}

impl SigningKey {
    /// A new random key (from the operating system's generator).
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
        Self::from_seed(&seed)
    }

    /// The key of a 32-byte ed25519 seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let key = ed25519_dalek::SigningKey::from_bytes(seed);
        let verifying = key.verifying_key();
        Self {
            public: PublicKey {
                id: KeyId::of(&verifying),
                key: verifying,
            },
            key,
        }
    }

    /// The public half, for agents.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// The key's id.
    pub fn id(&self) -> &KeyId {
        &self.public.id
    }

    /// The secret key file's text: a comment naming the key, then
    /// `cnnf-ed25519-secret <base64 of the 32-byte seed>`.
    pub fn to_text(&self) -> String {
        format!(
            "# CNNF verdict-table signing key {}: secret, readable by the policy service only.\n{SECRET_TAG} {}\n",
            self.public.id,
            BASE64.encode(self.key.to_bytes())
        )
    }

    /// Parses [`SigningKey::to_text`]: exactly one key line; blank lines
    /// and `#` comments are ignored.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let mut found = None;
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if found.is_some() {
                return Err(KeyError::at(number, "a second key line (one secret key per file)"));
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [tag, encoded] = fields[..] else {
                return Err(KeyError::at(
                    number,
                    format!("expected `{SECRET_TAG} <base64>`, got {} words", fields.len()),
                ));
            };
            if tag != SECRET_TAG {
                return Err(KeyError::at(number, format!("expected `{SECRET_TAG}`, got `{tag}`")));
            }
            let seed = decode_32(encoded).map_err(|reason| KeyError::at(number, reason))?;
            found = Some(Self::from_seed(&seed));
        }
        found.ok_or_else(|| KeyError::at(0, format!("no `{SECRET_TAG}` line")))
    }

    /// Signs encoded `VerdictTable` bytes.
    pub fn sign_table(&self, table: &[u8]) -> SignedVerdictTable {
        let signature = self.key.sign(&message(table));
        SignedVerdictTable {
            table: table.to_vec(),
            key_id: self.public.id.to_string(),
            signature: signature.to_bytes().to_vec(),
        }
    }

    /// Signs and encodes: the bytes of a KV value.
    pub fn sign_table_bytes(&self, table: &[u8]) -> Vec<u8> {
        self.sign_table(table).encode_to_vec()
    }
}

/// Why a value is not a table to enforce.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A plain `VerdictTable`, or a signed table without a signature.
    #[error("the table is not signed")]
    Unsigned,
    /// Signed by a key that is not among the trusted ones.
    #[error("signed by key {key_id}, which is not a trusted key")]
    UnknownKey {
        /// The id the table names.
        key_id: String,
    },
    /// The signature does not verify with the key it names (the table was
    /// changed after signing, or signed by another key under this id).
    #[error("the signature of key {key_id} does not verify")]
    BadSignature {
        /// The id the table names.
        key_id: String,
    },
    /// Neither a signed table nor a table.
    #[error("not a signed verdict table: {0}")]
    Malformed(String),
}

impl VerifyError {
    /// Short code for metrics and logs: `unsigned`, `unknown-key`,
    /// `signature` or `malformed`.
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::Unsigned => "unsigned",
            VerifyError::UnknownKey { .. } => "unknown-key",
            VerifyError::BadSignature { .. } => "signature",
            VerifyError::Malformed(_) => "malformed",
        }
    }
}

/// Decodes a KV value into a signed table, without verifying it. A plain
/// `VerdictTable` (what an unsigned writer puts) and a signed table with no
/// signature are [`VerifyError::Unsigned`].
pub fn decode(bytes: &[u8]) -> Result<SignedVerdictTable, VerifyError> {
    match SignedVerdictTable::decode(bytes) {
        Ok(signed) if signed.signature.is_empty() && signed.key_id.is_empty() => Err(VerifyError::Unsigned),
        Ok(signed) => Ok(signed),
        Err(error) => {
            if VerdictTable::decode(bytes).is_ok() {
                Err(VerifyError::Unsigned)
            } else {
                Err(VerifyError::Malformed(error.to_string()))
            }
        }
    }
}

/// Checks `signed` against the `trusted` keys: the table bytes when the
/// key it names is trusted and its signature verifies.
pub fn verify<'a>(signed: &'a SignedVerdictTable, trusted: &[PublicKey]) -> Result<&'a [u8], VerifyError> {
    if signed.signature.is_empty() && signed.key_id.is_empty() {
        return Err(VerifyError::Unsigned);
    }
    let key = trusted
        .iter()
        .find(|key| key.id.as_str() == signed.key_id)
        .ok_or_else(|| VerifyError::UnknownKey {
            key_id: signed.key_id.clone(),
        })?;
    let bad = || VerifyError::BadSignature {
        key_id: signed.key_id.clone(),
    };
    let signature = ed25519_dalek::Signature::from_slice(&signed.signature).map_err(|_| bad())?;
    // Strict: also refuses weak keys and non-canonical signatures.
    key.key
        .verify_strict(&message(&signed.table), &signature)
        .map_err(|_| bad())?;
    Ok(&signed.table)
}

/// A verified table: its bytes and who signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The encoded `VerdictTable`.
    pub table: Vec<u8>,
    /// The key that signed it.
    pub key_id: KeyId,
}

/// Decodes and verifies a KV value ([`decode`], then [`verify`]).
pub fn open(bytes: &[u8], trusted: &[PublicKey]) -> Result<Opened, VerifyError> {
    let signed = decode(bytes)?;
    verify(&signed, trusted)?;
    Ok(Opened {
        table: signed.table,
        key_id: KeyId(signed.key_id),
    })
}

/// The table bytes of a KV value without checking the signature: for
/// tools that only read what the policy published (the demo, load tests),
/// never for enforcing. A plain table is returned as it is.
pub fn unverified_table(bytes: &[u8]) -> Result<Vec<u8>, VerifyError> {
    match decode(bytes) {
        Ok(signed) => Ok(signed.table),
        Err(VerifyError::Unsigned) => match SignedVerdictTable::decode(bytes) {
            // A signed table without a signature still carries its table.
            Ok(signed) if !signed.table.is_empty() => Ok(signed.table),
            _ => Ok(bytes.to_vec()),
        },
        Err(error) => Err(error),
    }
}

fn message(table: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(TABLE_DOMAIN.len() + table.len());
    message.extend_from_slice(TABLE_DOMAIN);
    message.extend_from_slice(table);
    message
}

fn decode_32(encoded: &str) -> Result<[u8; 32], String> {
    let bytes = BASE64
        .decode(encoded)
        .map_err(|error| format!("the key is not base64: {error}"))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| format!("the key is {} bytes, not 32", bytes.len()))
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use ed25519_dalek::Signer as _;
    use prost::Message as _;

    use super::*;

    fn table(version: u64) -> Vec<u8> {
        VerdictTable {
            version,
            cluster: "prod".into(),
            node: "n1".into(),
            mode: 3,
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_seed(&[seed; 32])
    }

    #[test]
    fn a_signed_table_opens_with_its_key_and_returns_the_same_bytes() {
        let signer = key(1);
        let bytes = table(7);
        let value = signer.sign_table_bytes(&bytes);
        let opened = open(&value, &[key(2).public_key().clone(), signer.public_key().clone()]).unwrap();
        assert_eq!(opened.table, bytes);
        assert_eq!(&opened.key_id, signer.id());
        assert_eq!(unverified_table(&value).unwrap(), bytes);
    }

    #[test]
    fn changing_any_byte_breaks_the_signature() {
        let signer = key(1);
        let trusted = [signer.public_key().clone()];
        let signed = signer.sign_table(&table(7));
        for index in 0..signed.table.len() {
            let mut tampered = signed.clone();
            tampered.table[index] ^= 0x01;
            assert_eq!(
                verify(&tampered, &trusted).unwrap_err(),
                VerifyError::BadSignature {
                    key_id: signer.id().to_string()
                },
                "table byte {index}"
            );
        }
        for index in 0..signed.signature.len() {
            let mut tampered = signed.clone();
            tampered.signature[index] ^= 0x80;
            assert_eq!(
                verify(&tampered, &trusted).unwrap_err().code(),
                "signature",
                "signature byte {index}"
            );
        }
        // Every byte of the encoded value: a change is refused, whatever it
        // breaks (the wrapper, the key id, the table or the signature).
        let value = signed.encode_to_vec();
        for index in 0..value.len() {
            let mut tampered = value.clone();
            tampered[index] ^= 0x01;
            assert!(open(&tampered, &trusted).is_err(), "value byte {index}");
        }
        let mut short = signed.clone();
        short.signature.truncate(63);
        assert_eq!(verify(&short, &trusted).unwrap_err().code(), "signature");
    }

    #[test]
    fn another_key_is_refused_as_unknown_or_as_a_bad_signature() {
        let trusted = [key(1).public_key().clone()];
        let other = key(2);
        let value = other.sign_table_bytes(&table(7));
        assert_eq!(
            open(&value, &trusted).unwrap_err(),
            VerifyError::UnknownKey {
                key_id: other.id().to_string()
            }
        );
        // Signed by another key but claiming the trusted key's id.
        let mut forged = other.sign_table(&table(7));
        forged.key_id = key(1).id().to_string();
        assert_eq!(verify(&forged, &trusted).unwrap_err().code(), "signature");
        // No trusted key at all.
        assert_eq!(open(&value, &[]).unwrap_err().code(), "unknown-key");
    }

    #[test]
    fn unsigned_and_malformed_values_are_told_apart() {
        let trusted = [key(1).public_key().clone()];
        assert_eq!(open(&table(7), &trusted).unwrap_err(), VerifyError::Unsigned);
        let bare = SignedVerdictTable {
            table: table(7),
            ..Default::default()
        };
        assert_eq!(
            open(&bare.encode_to_vec(), &trusted).unwrap_err(),
            VerifyError::Unsigned
        );
        assert_eq!(verify(&bare, &trusted).unwrap_err(), VerifyError::Unsigned);
        assert_eq!(unverified_table(&table(7)).unwrap(), table(7));
        assert_eq!(unverified_table(&bare.encode_to_vec()).unwrap(), table(7));
        let garbage = b"\xff\xff\xff\xff";
        assert_eq!(open(garbage, &trusted).unwrap_err().code(), "malformed");
    }

    #[test]
    fn a_signature_over_the_bare_bytes_does_not_verify_as_a_table() {
        // The same key signing the table bytes without the domain prefix
        // (as another protocol might) produces nothing a table check takes.
        let signer = key(1);
        let bytes = table(7);
        let signed = SignedVerdictTable {
            table: bytes.clone(),
            key_id: signer.id().to_string(),
            signature: signer.key.sign(&bytes).to_bytes().to_vec(),
        };
        assert_eq!(
            verify(&signed, &[signer.public_key().clone()]).unwrap_err().code(),
            "signature"
        );
    }

    #[test]
    fn keys_round_trip_through_their_text() {
        let signer = key(9);
        let parsed = SigningKey::parse(&signer.to_text()).unwrap();
        assert_eq!(parsed.id(), signer.id());
        assert_eq!(parsed.key.to_bytes(), signer.key.to_bytes());
        assert!(!format!("{signer:?}").contains(&BASE64.encode(signer.key.to_bytes())));

        let text = format!(
            "# two keys: a rotation\n{}\n\n{}\n{}\n",
            key(1).public_key().to_line(),
            key(2).public_key().to_line(),
            key(1).public_key().to_line()
        );
        let keys = PublicKey::parse_many(&text).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].id(), key(1).id());
        assert_eq!(keys[1].id(), key(2).id());
        assert_eq!(signer.id().as_str().len(), 16);
    }

    #[test]
    fn bad_key_text_says_which_line_and_why() {
        let line = key(1).public_key().to_line();
        let wrong_id = line.replace(key(1).id().as_str(), key(2).id().as_str());
        let error = PublicKey::parse_many(&format!("# c\n{wrong_id}\n")).unwrap_err();
        assert_eq!(error.line, 2);
        assert!(error.reason.contains("key id"), "{error}");
        let error = PublicKey::parse_many(&key(1).to_text()).unwrap_err();
        assert!(error.reason.contains("secret key"), "{error}");
        let error = PublicKey::parse_many("# nothing\n").unwrap_err();
        assert_eq!(error.line, 0);
        let error = PublicKey::parse_many(&format!("{PUBLIC_TAG} abc AAAA\n")).unwrap_err();
        assert!(error.reason.contains("not 32"), "{error}");
        let error = PublicKey::parse_many(&format!("{PUBLIC_TAG} abc !!!\n")).unwrap_err();
        assert!(error.reason.contains("base64"), "{error}");
        let error = SigningKey::parse(&format!("{}{}", key(1).to_text(), key(2).to_text())).unwrap_err();
        assert!(error.reason.contains("second"), "{error}");
        assert!(SigningKey::parse(&line).is_err());
        assert!(SigningKey::parse("").is_err());
    }
}
