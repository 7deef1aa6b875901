//! NATS subject names, in one place.
//!
//! Every event names its cluster and node in its subject, so a consumer can
//! filter by either and NATS permissions can restrict an agent to its own
//! node's subjects. Tokens are checked: a cluster or node name that could
//! escape its position in a subject (a `.`, a wildcard, whitespace) is
//! rejected instead of silently publishing somewhere else.

use std::fmt;

/// Prefix of every CNNF subject.
pub const ROOT: &str = "cnnf";

/// A name that may stand as one token of a subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(String);

/// A name that cannot be a subject token, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} cannot be used in a subject: {reason}")]
pub struct InvalidToken {
    /// What the name was for ("cluster", "node", ...).
    pub what: &'static str,
    /// The rejected value.
    pub value: String,
    /// Why it was rejected.
    pub reason: &'static str,
}

impl Token {
    /// Checks `value` as a subject token for `what` (used in the error).
    pub fn new(what: &'static str, value: &str) -> Result<Self, InvalidToken> {
        let reject = |reason| InvalidToken {
            what,
            value: value.to_owned(),
            reason,
        };
        if value.is_empty() {
            return Err(reject("it is empty"));
        }
        if value.len() > 128 {
            return Err(reject("it is longer than 128 bytes"));
        }
        if let Some(bad) = value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':' | '=' | '@')))
        {
            return Err(match bad {
                '.' => reject("'.' separates subject tokens"),
                '*' | '>' => reject("'*' and '>' are subject wildcards"),
                c if c.is_whitespace() => reject("whitespace is not allowed"),
                _ => reject("only ASCII letters, digits and - _ : = @ are allowed"),
            });
        }
        Ok(Self(value.to_owned()))
    }

    /// The token text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `cnnf.workload.<cluster>.<node>`: workload started/stopped, by agents.
pub fn workload(cluster: &Token, node: &Token) -> String {
    format!("{ROOT}.workload.{cluster}.{node}")
}

/// `cnnf.flow.<cluster>.<node>`: connection decisions, by agents.
pub fn flow(cluster: &Token, node: &Token) -> String {
    format!("{ROOT}.flow.{cluster}.{node}")
}

/// `cnnf.heartbeat.<cluster>.<node>`: agent liveness.
pub fn heartbeat(cluster: &Token, node: &Token) -> String {
    format!("{ROOT}.heartbeat.{cluster}.{node}")
}

/// `cnnf.policy.<cluster>.<kind>`: policy changes.
pub fn policy(cluster: &Token, kind: &Token) -> String {
    format!("{ROOT}.policy.{cluster}.{kind}")
}

/// `cnnf.model.<image-id>`: model changes. Image digests contain `:`
/// (`sha256:...`), which is a legal token character.
pub fn model(image_id: &Token) -> String {
    format!("{ROOT}.model.{image_id}")
}

/// `cnnf.audit.v1.<cluster>.<node>.<verdict>`: audits for integrations.
pub fn audit(cluster: &Token, node: &Token, verdict: &Token) -> String {
    format!("{ROOT}.audit.v1.{cluster}.{node}.{verdict}")
}

/// `cnnf.incident.<cluster>.<kind>`: incidents.
pub fn incident(cluster: &Token, kind: &Token) -> String {
    format!("{ROOT}.incident.{cluster}.{kind}")
}

/// Key of a node's compiled verdict table in KV bucket `cnnf-verdicts`:
/// `<cluster>.<node>`.
pub fn verdict_key(cluster: &Token, node: &Token) -> String {
    format!("{cluster}.{node}")
}

/// `cnnf.dlq.<consumer>`: messages a consumer quarantined.
pub fn dead_letter(consumer: &Token) -> String {
    format!("{ROOT}.dlq.{consumer}")
}

/// The `(cluster, node)` named by an agent subject
/// (`cnnf.<kind>.<cluster>.<node>`), if it is one.
pub fn agent_origin(subject: &str) -> Option<(&str, &str)> {
    let mut parts = subject.split('.');
    let (Some(ROOT), Some(kind), Some(cluster), Some(node), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    matches!(kind, "workload" | "flow" | "heartbeat").then_some((cluster, node))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(value: &str) -> Token {
        Token::new("test", value).unwrap()
    }

    #[test]
    fn builds_subjects() {
        assert_eq!(workload(&t("prod"), &t("node-1")), "cnnf.workload.prod.node-1");
        assert_eq!(model(&t("sha256:ab12")), "cnnf.model.sha256:ab12");
        assert_eq!(
            audit(&t("prod"), &t("n1"), &t("prevent")),
            "cnnf.audit.v1.prod.n1.prevent"
        );
    }

    #[test]
    fn rejects_tokens_that_escape_their_place() {
        for bad in ["", "a.b", "*", "a>", "a b", "é"] {
            let error = Token::new("node", bad).unwrap_err();
            assert_eq!(error.what, "node");
            assert!(error.to_string().contains("cannot be used in a subject"));
        }
    }

    #[test]
    fn reads_the_origin_of_agent_subjects() {
        assert_eq!(agent_origin("cnnf.flow.prod.n1"), Some(("prod", "n1")));
        assert_eq!(agent_origin("cnnf.workload.prod.n1"), Some(("prod", "n1")));
        assert_eq!(agent_origin("cnnf.policy.prod.rule"), None);
        assert_eq!(agent_origin("cnnf.flow.prod.n1.extra"), None);
        assert_eq!(agent_origin("other.flow.prod.n1"), None);
    }
}
