//! Deterministic event ids, sent as `Nats-Msg-Id` so that JetStream drops
//! a resent copy of an event inside its duplicate window.
//!
//! An id must be the same every time the *same* event is sent and differ
//! between events. Agents number their events per boot
//! (`<node>:<boot>:<seq>`); services derive the id of what they publish
//! from the input that caused it (`<producer>:<stream>:<seq>`), so a
//! service that crashes and reprocesses an input republishes under the
//! same id.

use std::fmt::Write;

/// Id of an agent event: `<node>:<boot>:<seq>`.
pub fn agent_event(node: &str, boot_id: &str, sequence: u64) -> String {
    format!("{node}:{boot_id}:{sequence}")
}

/// Id of an event a service derived from stream message `sequence`:
/// `<producer>:<stream>:<sequence>[:<part>]` (`part` numbers the outputs of
/// one input, when there are several).
pub fn derived(producer: &str, stream: &str, sequence: u64, part: Option<u32>) -> String {
    let mut id = format!("{producer}:{stream}:{sequence}");
    if let Some(part) = part {
        let _ = write!(id, ":{part}");
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_distinct() {
        assert_eq!(agent_event("n1", "b7", 3), "n1:b7:3");
        assert_eq!(agent_event("n1", "b7", 3), agent_event("n1", "b7", 3));
        assert_ne!(agent_event("n1", "b7", 3), agent_event("n1", "b8", 3));
        assert_eq!(derived("audit", "CNNF_FLOWS", 9, None), "audit:CNNF_FLOWS:9");
        assert_eq!(derived("audit", "CNNF_FLOWS", 9, Some(2)), "audit:CNNF_FLOWS:9:2");
    }
}
