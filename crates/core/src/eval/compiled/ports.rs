//! The destinations one source class has towards one destination class,
//! as a map from port to the first rule of each effect.
//!
//! A pair of classes may carry any number of destinations (every rule of
//! the source naming the destination, each with its own ports, protocol
//! and effect). Scanning them would make a decision linear in the rules;
//! instead the port space is cut at every range boundary into intervals,
//! and each interval holds, per protocol class and effect, the lowest rule
//! index whose destination covers it. A lookup is one binary search over
//! the (usually one or two) intervals.

use crate::proto;

/// No rule.
pub(super) const NONE: u32 = u32::MAX;

/// Effect slots: a destination allows, alerts or prevents.
pub(super) const ALLOW: usize = 0;
/// See [`ALLOW`].
pub(super) const ALERT: usize = 1;
/// See [`ALLOW`].
pub(super) const PREVENT: usize = 2;
const EFFECTS: usize = 3;

/// Protocol classes of a destination: any protocol (unspecified, `any` or
/// unknown), then TCP, UDP and ICMP by their wire values.
const PROTOCOLS: usize = 4;
const WILD: usize = 0;

/// One destination of a rule, as the builder collects it.
pub(super) struct Destination {
    /// Inclusive, non-empty port ranges.
    pub ranges: Vec<(u16, u16)>,
    /// Protocol class (see [`protocol_class`]).
    pub protocol: usize,
    /// Effect slot.
    pub effect: usize,
    /// The rule's index in the table.
    pub rule: u32,
}

/// The protocol class a destination's protocol admits.
pub(super) fn protocol_class(protocol: i32) -> usize {
    match proto::Protocol::try_from(protocol) {
        Ok(proto::Protocol::Tcp) => 1,
        Ok(proto::Protocol::Udp) => 2,
        Ok(proto::Protocol::Icmp) => 3,
        _ => WILD,
    }
}

/// The ranges a destination's port list admits, as `ports_admit` reads
/// them: none means every port, `last` 0 means `first`, a range with
/// `last` below `first` or beyond the port space admits nothing.
pub(super) fn port_ranges(ranges: &[proto::PortRange]) -> Vec<(u16, u16)> {
    if ranges.is_empty() {
        return vec![(0, u16::MAX)];
    }
    ranges
        .iter()
        .filter_map(|range| {
            let last = if range.last == 0 { range.first } else { range.last };
            let first = u16::try_from(range.first).ok()?;
            let last = u16::try_from(last).unwrap_or(u16::MAX);
            (first <= last).then_some((first, last))
        })
        .collect()
}

/// Port intervals of one class pair, with the first rule per protocol
/// class and effect.
#[derive(Clone, Debug)]
pub(super) struct PortTable {
    /// Start of each interval, ascending, the first 0; an interval ends
    /// where the next starts.
    starts: Box<[u16]>,
    /// Per interval, `[protocol class * EFFECTS + effect]` → lowest rule.
    rules: Box<[[u32; PROTOCOLS * EFFECTS]]>,
}

impl PortTable {
    /// Builds the table of `destinations` (in any order).
    pub fn build(destinations: &[Destination]) -> Self {
        let mut starts = vec![0u16];
        for destination in destinations {
            for &(first, last) in &destination.ranges {
                starts.push(first);
                if let Some(next) = last.checked_add(1) {
                    starts.push(next);
                }
            }
        }
        starts.sort_unstable();
        starts.dedup();
        let mut rules = vec![[NONE; PROTOCOLS * EFFECTS]; starts.len()];

        // Paint each slot in ascending rule order; an interval keeps the
        // first rule that reaches it, and a skip list ("next unpainted
        // interval") keeps the whole build near linear.
        let mut order: Vec<&Destination> = destinations.iter().collect();
        order.sort_by_key(|destination| destination.rule);
        let mut next: Vec<Vec<usize>> = vec![(0..=starts.len()).collect(); PROTOCOLS * EFFECTS];
        for destination in order {
            let slot = destination.protocol * EFFECTS + destination.effect;
            let next = &mut next[slot];
            for &(first, last) in &destination.ranges {
                let from = starts.partition_point(|start| *start < first);
                let to = starts.partition_point(|start| *start <= last);
                let mut interval = unpainted(next, from);
                while interval < to {
                    rules[interval][slot] = destination.rule;
                    next[interval] = interval + 1;
                    interval = unpainted(next, interval + 1);
                }
            }
        }
        Self {
            starts: starts.into_boxed_slice(),
            rules: rules.into_boxed_slice(),
        }
    }

    /// The first rule per effect slot whose destination admits `port` and
    /// `protocol`.
    #[inline]
    pub fn lookup(&self, port: u16, protocol: proto::Protocol) -> [u32; EFFECTS] {
        let interval = self.starts.partition_point(|start| *start <= port) - 1;
        let row = &self.rules[interval];
        let specific = match protocol {
            proto::Protocol::Tcp => 1,
            proto::Protocol::Udp => 2,
            proto::Protocol::Icmp => 3,
            proto::Protocol::Unspecified | proto::Protocol::Any => WILD,
        };
        let mut found = [NONE; EFFECTS];
        for (effect, slot) in found.iter_mut().enumerate() {
            *slot = row[WILD * EFFECTS + effect].min(row[specific * EFFECTS + effect]);
        }
        found
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.starts) + std::mem::size_of_val(&*self.rules)
    }
}

/// The first unpainted interval at or after `from` (path halving).
fn unpainted(next: &mut [usize], mut from: usize) -> usize {
    while next[from] != from {
        next[from] = next[next[from]];
        from = next[from];
    }
    from
}
