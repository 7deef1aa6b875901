//! The verdict table as the agent holds it: built once per published
//! table, off the hot path, then shared read-only by every verdict thread.
//!
//! First cut: it validates the table, indexes network objects for address
//! resolution, and decides through the reference evaluator. The indexed
//! form (hash lookups, flat in the number of rules and learned connections)
//! replaces the body of [`CompiledTable::decide`] without changing its
//! signature.

use std::net::IpAddr;

use ipnet::IpNet;

use super::{reference, Connection, Decision};
use crate::proto::{network_object::Kind as ObjectKind, VerdictTable};

/// Why a published table cannot be used; the agent keeps its previous one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    /// A subnet object holds something that is neither a CIDR nor an address.
    #[error("object {object:?}: {value:?} is not a CIDR or an address")]
    BadCidr {
        /// The object's name.
        object: String,
        /// The offending entry.
        value: String,
    },
    /// Two objects share a name.
    #[error("object {0:?} is declared twice")]
    DuplicateObject(String),
}

/// A verdict table ready for decisions.
#[derive(Debug, Clone)]
pub struct CompiledTable {
    table: VerdictTable,
    /// Subnet objects, most specific prefix first (ties: declaration order).
    subnets: Vec<(IpNet, usize)>,
}

impl CompiledTable {
    /// Validates and indexes `table`.
    pub fn build(table: VerdictTable) -> Result<Self, TableError> {
        let mut names = std::collections::HashSet::new();
        let mut subnets = Vec::new();
        for (index, object) in table.objects.iter().enumerate() {
            if !names.insert(object.name.as_str()) {
                return Err(TableError::DuplicateObject(object.name.clone()));
            }
            if object.kind != ObjectKind::Subnet as i32 {
                continue;
            }
            for cidr in &object.cidrs {
                let net = reference::parse_cidr(cidr).ok_or_else(|| TableError::BadCidr {
                    object: object.name.clone(),
                    value: cidr.clone(),
                })?;
                subnets.push((net, index));
            }
        }
        subnets.sort_by_key(|(net, index)| (std::cmp::Reverse(net.prefix_len()), *index));
        Ok(Self { table, subnets })
    }

    /// The table a fresh agent enforces before any table arrives: no
    /// objects, no rules, no models, every mode disabled (observe and
    /// learn; nothing dropped). Version 0.
    pub fn empty() -> Self {
        Self::build(VerdictTable::default()).expect("the empty table is valid")
    }

    /// The table's version; every decision event carries it.
    pub fn version(&self) -> u64 {
        self.table.version
    }

    /// The table this was built from.
    pub fn table(&self) -> &VerdictTable {
        &self.table
    }

    /// The network object `address` belongs to by longest-prefix match.
    pub fn resolve_object(&self, address: IpAddr) -> Option<&str> {
        self.subnets
            .iter()
            .find(|(net, _)| net.contains(&address))
            .map(|(_, index)| self.table.objects[*index].name.as_str())
    }

    /// Decides `connection`; identical to [`reference::decide`].
    pub fn decide(&self, connection: &Connection<'_>) -> Decision<'_> {
        reference::decide(&self.table, connection)
    }
}
