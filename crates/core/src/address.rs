//! Addresses: one canonical text form per address, and its key in the KV
//! bucket `cnnf-identities` (written by ingest, read by every agent).
//!
//! Agents may spell one address several ways (`FD00::1`, `fd00:0::1`,
//! `::ffff:10.0.0.1` for an IPv4 address seen through a dual-stack
//! socket). The registry parses every address and keeps the canonical form
//! (`std::net::IpAddr::to_canonical` and its `Display`: IPv4 dotted quad,
//! IPv6 compressed lower case), so that one address is one key everywhere.
//!
//! KV keys may only hold `[-/_=.a-zA-Z0-9]`. IPv4 text fits as it is
//! (`10.0.0.1`); IPv6 text has `:`, which becomes `_` (`fd00::1` is key
//! `fd00__1`). No address contains `_`, so the encoding is reversible.

use std::net::IpAddr;

/// A text that is not an IPv4 or IPv6 address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not an IPv4 or IPv6 address")]
pub struct InvalidAddress {
    /// The rejected text (cut to 64 characters).
    pub value: String,
}

/// The canonical text form of `text`, or why it is not an address.
pub fn canonical(text: &str) -> Result<String, InvalidAddress> {
    let ip: IpAddr = text.parse().map_err(|_| InvalidAddress {
        value: text.chars().take(64).collect(),
    })?;
    Ok(ip.to_canonical().to_string())
}

/// The KV key of a canonical address: `:` becomes `_`.
pub fn kv_key(canonical: &str) -> String {
    canonical.replace(':', "_")
}

/// The canonical address a KV key stands for, if it is one.
pub fn from_kv_key(key: &str) -> Option<String> {
    canonical(&key.replace('_', ":")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_has_one_canonical_form() {
        assert_eq!(canonical("10.0.0.1").unwrap(), "10.0.0.1");
        assert_eq!(canonical("FD00:0:0::1").unwrap(), "fd00::1");
        assert_eq!(canonical("::ffff:10.0.0.1").unwrap(), "10.0.0.1");
        for bad in [
            "",
            "10.0.0",
            "10.0.0.256",
            "fd00::1%eth0",
            " 10.0.0.1",
            "host.example",
            "10.0.0.1/24",
        ] {
            assert!(canonical(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn kv_keys_are_legal_and_reversible() {
        for text in ["10.0.0.1", "fd00::1", "::", "2001:db8:85a3::8a2e:370:7334", "::1"] {
            let address = canonical(text).unwrap();
            let key = kv_key(&address);
            assert!(
                key.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '/' | '_' | '=' | '.')),
                "{key}"
            );
            assert!(!key.starts_with('.') && !key.ends_with('.'));
            assert_eq!(from_kv_key(&key).as_deref(), Some(address.as_str()));
        }
        assert_eq!(kv_key("fd00::1"), "fd00__1");
        assert_eq!(from_kv_key("not-an-address"), None);
    }
}
