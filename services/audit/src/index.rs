//! Queries over the audit index: a time range, filters, pages.
//!
//! Every audit is indexed once per dimension (time, node, verdict, rule,
//! cluster, and each image at either end) under
//! `<dimension> <value> 0 <minute> <first seen> <audit number>`. A query
//! walks the most selective dimension its filter names (rule, image, node,
//! verdict, cluster, else time) minute by minute, from the dimension's
//! oldest entry (one seek) to the newest minute holding any audit, and
//! checks the remaining conditions on the audit.
//! The store offers prefix scans only, so a page token (the hex of the last
//! entry's `<minute> <first seen> <number>`) resumes by skipping that
//! minute's earlier entries: the cost of a page is bounded by the audits of
//! one minute of the chosen dimension, not by the size of the index.

use cnnf_proto::v1::{Audit, AuditFilter, IdentityKind};
use cnnf_store::{ProjectionStore, StoreError};

use crate::audit::verdict_name;
use crate::store::{self, time_bytes, time_from_bytes, AuditNumber, AuditRecord, Dimension, INDEX_SUFFIX_LEN};

/// Default page size.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page size.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Why a query failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The page token was not made by this service.
    #[error("page_token: not a token this service issued ({0})")]
    BadToken(&'static str),
    /// The range is empty or reversed.
    #[error("range: from ({from}) must be before to ({to})")]
    BadRange {
        /// Start.
        from: i64,
        /// End.
        to: i64,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One page request.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Audits first seen at or after this time.
    pub from: i64,
    /// ... and before this one (`None`: no end).
    pub to: Option<i64>,
    /// Conditions.
    pub filter: AuditFilter,
    /// Most audits returned.
    pub page_size: usize,
    /// Token of the previous page.
    pub page_token: String,
}

/// One page of audits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Page {
    /// By first seen time, then number.
    pub audits: Vec<Audit>,
    /// Token of the next page; empty when there is nothing more.
    pub next_page_token: String,
}

/// True when `audit` meets every condition of `filter`.
pub fn matches(filter: &AuditFilter, audit: &Audit) -> bool {
    let image_matches = || {
        [audit.source.as_ref(), audit.destination.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|endpoint| endpoint.identity.as_ref())
            .any(|identity| identity.kind == IdentityKind::Image as i32 && identity.id == filter.image_id)
    };
    (filter.cluster.is_empty() || filter.cluster == audit.cluster)
        && (filter.node.is_empty() || filter.node == audit.node)
        && (filter.verdict == 0 || filter.verdict == audit.verdict)
        && (filter.decided_by.is_empty() || filter.decided_by == audit.decided_by)
        && (filter.image_id.is_empty() || image_matches())
}

fn dimension_of(filter: &AuditFilter) -> (Dimension, String) {
    if !filter.decided_by.is_empty() {
        (Dimension::Rule, filter.decided_by.clone())
    } else if !filter.image_id.is_empty() {
        (Dimension::Image, filter.image_id.clone())
    } else if !filter.node.is_empty() {
        (Dimension::Node, filter.node.clone())
    } else if filter.verdict != 0 {
        (Dimension::Verdict, verdict_name(filter.verdict).to_owned())
    } else if !filter.cluster.is_empty() {
        (Dimension::Cluster, filter.cluster.clone())
    } else {
        (Dimension::Time, String::new())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&text[at..at + 2], 16).ok())
        .collect()
}

fn read_bound(store: &dyn ProjectionStore, key: &[u8]) -> Result<Option<i64>, StoreError> {
    store
        .get(store::STATE, key)?
        .map(|bytes| {
            bytes
                .as_slice()
                .try_into()
                .map(i64::from_be_bytes)
                .map_err(|_| StoreError::Engine("stored time bound is corrupt".into()))
        })
        .transpose()
}

/// Every index key of `audit` created at `time` under `number`: one per
/// dimension, and one per distinct image at either end. The flows fold
/// writes them when it creates the audit; retention deletes them with it.
pub fn entries(audit: &Audit, time: i64, number: AuditNumber) -> Vec<Vec<u8>> {
    let mut entries = vec![
        (Dimension::Time, String::new()),
        (Dimension::Node, audit.node.clone()),
        (Dimension::Verdict, verdict_name(audit.verdict).to_owned()),
        (Dimension::Rule, audit.decided_by.clone()),
        (Dimension::Cluster, audit.cluster.clone()),
    ];
    let mut images: Vec<&str> = Vec::new();
    for endpoint in [audit.source.as_ref(), audit.destination.as_ref()]
        .into_iter()
        .flatten()
    {
        if let Some(identity) = &endpoint.identity {
            if identity.kind == IdentityKind::Image as i32
                && !identity.id.is_empty()
                && !images.contains(&identity.id.as_str())
            {
                images.push(&identity.id);
            }
        }
    }
    entries.extend(images.into_iter().map(|image| (Dimension::Image, image.to_owned())));
    entries
        .into_iter()
        .map(|(dimension, value)| store::index_key(dimension, &value, time, number))
        .collect()
}

/// Reads an audit by number.
pub fn audit(store: &dyn ProjectionStore, number: AuditNumber) -> Result<Option<Audit>, StoreError> {
    match store.get(store::RECORDS, &number.encode())? {
        None => Ok(None),
        Some(bytes) => Ok(store::decode::<AuditRecord>("audit", &bytes)?.audit),
    }
}

/// One page of the audits `query` asks for.
pub fn list(store: &dyn ProjectionStore, query: &Query) -> Result<Page, QueryError> {
    let to = query.to.unwrap_or(i64::MAX);
    if to <= query.from {
        return Err(QueryError::BadRange { from: query.from, to });
    }
    let page_size = match query.page_size {
        0 => DEFAULT_PAGE_SIZE,
        size => size.min(MAX_PAGE_SIZE),
    };
    let after = if query.page_token.is_empty() {
        None
    } else {
        let bytes = unhex(&query.page_token).ok_or(QueryError::BadToken("not hex"))?;
        if bytes.len() != INDEX_SUFFIX_LEN {
            return Err(QueryError::BadToken("wrong length"));
        }
        Some(bytes)
    };
    let (dimension, value) = dimension_of(&query.filter);
    let prefix = store::index_prefix(dimension, &value);
    // From the dimension's oldest entry (one seek: retention removes old
    // entries, and a rare value starts late) to the newest minute of all.
    let Some(last) = read_bound(store, store::STATE_LAST_MINUTE)? else {
        return Ok(Page::default());
    };
    let Some((oldest, _)) = store.scan_prefix(store::INDEX, &prefix, 1)?.into_iter().next() else {
        return Ok(Page::default());
    };
    let first = oldest
        .get(prefix.len()..prefix.len() + 8)
        .and_then(|bytes| bytes.try_into().ok())
        .map(time_from_bytes)
        .ok_or_else(|| StoreError::Engine("stored index key is corrupt".into()))?;
    let mut start = store::minute_of(query.from).max(first);
    if let Some(after) = &after {
        let token_minute = time_from_bytes(
            after[..8]
                .try_into()
                .map_err(|_| QueryError::BadToken("wrong length"))?,
        );
        start = start.max(token_minute);
    }
    let end = store::minute_of(to.saturating_sub(1)).min(last);
    let mut page = Page::default();
    let mut minute = start;
    while minute <= end {
        let mut minute_prefix = prefix.clone();
        minute_prefix.extend_from_slice(&time_bytes(minute));
        for (key, _) in store.scan_prefix(store::INDEX, &minute_prefix, usize::MAX)? {
            let suffix = &key[prefix.len()..];
            if suffix.len() != INDEX_SUFFIX_LEN {
                return Err(StoreError::Engine("stored index key is corrupt".into()).into());
            }
            if after.as_deref().is_some_and(|after| suffix <= after) {
                continue;
            }
            let first_seen = time_from_bytes(suffix[8..16].try_into().map_err(|_| QueryError::BadToken("length"))?);
            if first_seen < query.from || first_seen >= to {
                continue;
            }
            let number = AuditNumber::decode(&suffix[16..])
                .ok_or_else(|| StoreError::Engine("stored index key is corrupt".into()))?;
            let Some(audit) = audit(store, number)? else {
                continue;
            };
            if !matches(&query.filter, &audit) {
                continue;
            }
            page.audits.push(audit);
            if page.audits.len() == page_size {
                page.next_page_token = hex(suffix);
                return Ok(page);
            }
        }
        minute += 1;
    }
    Ok(page)
}

#[cfg(test)]
mod tests {
    use cnnf_proto::v1::{Endpoint, Identity, Verdict};

    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(unhex(&hex(&bytes)), Some(bytes.to_vec()));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("é0"), None);
    }

    #[test]
    fn filters_match_either_end_image_and_exact_fields() {
        let audit = Audit {
            cluster: "c".into(),
            node: "n1".into(),
            verdict: Verdict::Alert as i32,
            decided_by: "rule:r1".into(),
            destination: Some(Endpoint {
                identity: Some(Identity {
                    kind: IdentityKind::Image as i32,
                    id: "sha256:db".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut filter = AuditFilter::default();
        assert!(matches(&filter, &audit));
        filter.image_id = "sha256:db".into();
        assert!(matches(&filter, &audit));
        filter.node = "n2".into();
        assert!(!matches(&filter, &audit));
        let filter = AuditFilter {
            verdict: Verdict::Prevent as i32,
            ..Default::default()
        };
        assert!(!matches(&filter, &audit));
        assert_eq!(dimension_of(&filter).0, Dimension::Verdict);
    }
}
