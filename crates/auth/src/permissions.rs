//! Who may publish and subscribe to what.
//!
//! A node's user gets allow lists only: whatever is not on them is refused
//! by the server (NATS permissions deny what an allow list omits). So a node
//! publishes its own three event subjects, reads its own verdict key and
//! the identity map, and gets replies on its own inbox prefix; it cannot
//! publish for another node, write a KV key, read flows or policy, subscribe
//! to anything but its inbox, or create streams.
//!
//! The KV reads are JetStream API requests, named as async-nats 0.51 sends
//! them: stream info (`$JS.API.STREAM.INFO.<stream>`), direct get of the
//! last value of a key (`$JS.API.DIRECT.GET.<stream>.<key subject>`), an
//! ordered push consumer for a watch, created with a name so the filter
//! subject is part of the API subject
//! (`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`; the server refuses
//! a filter in the body that differs from it), its flow-control replies
//! (`$JS.FC.<stream>.>`) and the delete of a consumer the client replaces
//! after a gap (`$JS.API.CONSUMER.DELETE.<stream>.<name>`).

use cnnf_core::subjects::{self, Token};

/// The KV bucket of verdict tables (as `cnnf_bus::topology` names it).
pub const VERDICTS_BUCKET: &str = "cnnf-verdicts";
/// The KV bucket of the fleet's identities (as `cnnf_bus::topology` names it).
pub const IDENTITIES_BUCKET: &str = "cnnf-identities";

/// Allow lists of one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects it may publish on.
    pub publish: Vec<String>,
    /// Subjects it may subscribe to.
    pub subscribe: Vec<String>,
}

/// The inbox prefix of node `node` of `cluster`: replies to its requests
/// (publish acks, API answers, watch deliveries) arrive under it, and it
/// may subscribe to nothing else. Two tokens (`_INBOX_<cluster>.<node>`),
/// so no two nodes share a prefix (names cannot contain a dot).
pub fn node_inbox_prefix(cluster: &Token, node: &Token) -> String {
    format!("_INBOX_{cluster}.{node}")
}

/// The permissions of node `node` of `cluster`.
pub fn node(cluster: &Token, node: &Token) -> Permissions {
    let verdicts = format!("KV_{VERDICTS_BUCKET}");
    let identities = format!("KV_{IDENTITIES_BUCKET}");
    let own_key = format!("$KV.{VERDICTS_BUCKET}.{}", subjects::verdict_key(cluster, node));
    Permissions {
        publish: vec![
            subjects::workload(cluster, node),
            subjects::flow(cluster, node),
            subjects::heartbeat(cluster, node),
            // The verdict table: its own key only.
            format!("$JS.API.STREAM.INFO.{verdicts}"),
            format!("$JS.API.CONSUMER.CREATE.{verdicts}.*.{own_key}"),
            format!("$JS.API.CONSUMER.DELETE.{verdicts}.*"),
            format!("$JS.API.DIRECT.GET.{verdicts}.{own_key}"),
            format!("$JS.FC.{verdicts}.>"),
            // The identity map: all of it, read only.
            format!("$JS.API.STREAM.INFO.{identities}"),
            format!("$JS.API.CONSUMER.CREATE.{identities}.*.$KV.{IDENTITIES_BUCKET}.>"),
            format!("$JS.API.CONSUMER.DELETE.{identities}.*"),
            format!("$JS.API.DIRECT.GET.{identities}.$KV.{IDENTITIES_BUCKET}.>"),
            format!("$JS.FC.{identities}.>"),
        ],
        subscribe: vec![format!("{}.>", node_inbox_prefix(cluster, node))],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_publishes_only_its_own_subjects() {
        let (cluster, node) = (Token::new("c", "prod").unwrap(), Token::new("n", "web-1").unwrap());
        let permissions = super::node(&cluster, &node);
        assert!(permissions.publish.contains(&"cnnf.flow.prod.web-1".to_owned()));
        assert!(permissions
            .publish
            .contains(&"$JS.API.CONSUMER.CREATE.KV_cnnf-verdicts.*.$KV.cnnf-verdicts.prod.web-1".to_owned()));
        assert!(permissions
            .publish
            .iter()
            .all(|s| !s.starts_with("$KV.") && !s.contains("policy")));
        assert_eq!(permissions.subscribe, vec!["_INBOX_prod.web-1.>".to_owned()]);
    }
}
