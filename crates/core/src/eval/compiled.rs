//! The verdict table as the agent holds it: built once per published
//! table, off the hot path, then shared read-only by every verdict thread.
//!
//! A decision must cost the same with ten rules or ten thousand, and with
//! a million learned connections (DESIGN.md: verdict lookup ≤ 200 ns p99,
//! flat as rules grow). So the build turns the table into hash lookups and
//! the decision never scans rules, objects or models:
//!
//! - **Classes.** Every image or host-app object matches identities by one
//!   key: an image ID, an exact image name, an image-name prefix (a name
//!   ending in `*`) or a unit. Objects with the same key are one class; a
//!   subnet object is a class of its own. An identity belongs to at most
//!   one ID class, one name class, one unit class, and the prefix classes
//!   of its name's prefixes (one lookup per distinct prefix length).
//! - **Rules by source class.** For each class, the first enabled rule,
//!   the first with a prevent effect and the first allowing learned
//!   connections, by table order, because the reference reports the first.
//! - **Destinations by (source class, destination class).** Each pair maps
//!   ports and protocol to the first rule per destination effect
//!   ([`ports::PortTable`]). A decision looks up every pair of the source's
//!   and the destination's classes (usually one by one or two) and keeps
//!   the lowest rule per effect: all the reference needs to pick the deny,
//!   allow, allow-learned or fallback rule it would have picked.
//! - **Subnets** by prefix length ([`prefix::PrefixIndex`]): one for
//!   [`CompiledTable::resolve_object`] over every subnet object, one for
//!   the subnet objects rules name as destinations.
//! - **Learned connections** in one open-addressed set of packed `u64` keys
//!   (model, peer, side, protocol, port; [`learned::LearnedSet`]), with
//!   every identity string interned once.
//! - **Interned identities.** What a decision looks up about one end (its
//!   image entry, its classes, its learned-peer key) depends only on the
//!   identity and the table, so a caller that sees the same identities
//!   again and again (the agent: one per container) can look them up once
//!   per table ([`CompiledTable::intern`]) and decide with integers only
//!   ([`CompiledTable::decide_interned`]): no string is hashed or compared
//!   on that path, which saves the lookups' cache misses in a large table.
//!
//! Where the specification is silent the reference evaluator decides; the
//! property test in this module's tests holds the two to equal decisions,
//! rule ids included.

mod learned;
mod ports;
mod prefix;

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use foldhash::{HashMap, HashMapExt};

use self::learned::LearnedSet;
use self::ports::{Destination, PortTable, ALERT, ALLOW, NONE, PREVENT};
use self::prefix::{PrefixBuilder, PrefixIndex};
use super::{effective_mode, reference, Connection, DecidedBy, Decision, Identity};
use crate::proto::{self, network_object::Kind as ObjectKind, VerdictTable};

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
    /// The table holds more of something than the packed index can key.
    #[error("the table holds {count} {what}; at most {limit} are supported")]
    TooLarge {
        /// What overflowed: "models" or "learned peers".
        what: &'static str,
        /// How many the table holds.
        count: usize,
        /// The most supported.
        limit: usize,
    },
}

/// Bits of a learned-connection key: model, peer, side, protocol, port.
const MODEL_BITS: u32 = 22;
const PEER_BITS: u32 = 23;
/// The peer key of every unknown identity.
const UNKNOWN_PEER: u32 = 0;

/// Tells tables apart for [`InternedIdentity`]: every build takes the next.
static NEXT_TABLE_ID: AtomicU64 = AtomicU64::new(1);

/// What one image ID is in the table.
#[derive(Clone, Copy, Debug)]
struct ImageEntry {
    /// The class of objects naming this image ID, or [`NONE`].
    class: u32,
    /// Index of the image's (first) model in the table, or [`NONE`].
    model: u32,
    /// Whether that model enforces.
    enforcing: bool,
    /// The image as a learned peer, or [`NONE`].
    peer: u32,
}

/// What one host-app unit is in the table.
#[derive(Clone, Copy, Debug)]
struct UnitEntry {
    /// The class of objects naming this unit, or [`NONE`].
    class: u32,
    /// The unit as a learned peer, or [`NONE`].
    peer: u32,
}

/// The rules whose source is one class, and whether it is a destination.
#[derive(Clone, Copy, Debug)]
struct Class {
    /// The first enabled rule, or [`NONE`] when the class has no rules.
    first: u32,
    /// The first rule whose own effect is prevent.
    prevent: u32,
    /// The first rule allowing learned connections.
    allow_learned: u32,
    /// Whether any rule of this class names a destination that can match.
    has_destinations: bool,
    /// Whether some rule names this class as a destination.
    is_destination: bool,
}

impl Class {
    const EMPTY: Class = Class {
        first: NONE,
        prevent: NONE,
        allow_learned: NONE,
        has_destinations: false,
        is_destination: false,
    };

    fn merge(&mut self, other: &Class) {
        self.first = self.first.min(other.first);
        self.prevent = self.prevent.min(other.prevent);
        self.allow_learned = self.allow_learned.min(other.allow_learned);
    }
}

/// What the build groups objects by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum ClassKey {
    ImageId(String),
    ImageName(String),
    ImagePrefix(String),
    Unit(String),
    Subnet(usize),
}

impl ClassKey {
    /// The key an object matches by, or none when it matches nothing
    /// (mirrors `reference::identity_matches` and `destination_matches`).
    fn of(index: usize, object: &proto::NetworkObject) -> Option<Self> {
        match ObjectKind::try_from(object.kind) {
            Ok(ObjectKind::Image) if !object.image_id.is_empty() => Some(Self::ImageId(object.image_id.clone())),
            Ok(ObjectKind::Image) if !object.image_name.is_empty() => Some(match object.image_name.strip_suffix('*') {
                Some(prefix) => Self::ImagePrefix(prefix.to_owned()),
                None => Self::ImageName(object.image_name.clone()),
            }),
            Ok(ObjectKind::HostApp) if !object.host_app.is_empty() => Some(Self::Unit(object.host_app.clone())),
            Ok(ObjectKind::Subnet) => Some(Self::Subnet(index)),
            _ => None,
        }
    }
}

/// A few class ids, on the stack unless there are many.
struct ClassSet {
    inline: [u32; 8],
    len: usize,
    spill: Vec<u32>,
}

impl ClassSet {
    fn new() -> Self {
        Self {
            inline: [0; 8],
            len: 0,
            spill: Vec::new(),
        }
    }

    fn push(&mut self, class: u32) {
        if self.len < self.inline.len() {
            self.inline[self.len] = class;
            self.len += 1;
        } else {
            self.spill.push(class);
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.inline[..self.len]
            .iter()
            .copied()
            .chain(self.spill.iter().copied())
    }
}

/// An identity looked up once in one [`CompiledTable`]: everything a
/// decision needs of one end, as integers. Made by
/// [`CompiledTable::intern`]; valid for that table only (a clone of it
/// included), which [`CompiledTable::decide_interned`] checks.
#[derive(Clone, Debug)]
pub struct InternedIdentity {
    /// The id of the table it was interned in.
    table: u64,
    /// The identity's image entry (images only).
    image: Option<ImageEntry>,
    /// Every class the identity belongs to.
    classes: Box<[u32]>,
    /// The learned-peer key, or [`NONE`].
    peer: u32,
}

impl InternedIdentity {
    /// True when this was interned in `table` (or a clone of it).
    pub fn is_for(&self, table: &CompiledTable) -> bool {
        self.table == table.id
    }
}

/// One end of a connection as a decision reads it: looked up on demand in
/// the table ([`Lookup`]) or read from an [`InternedIdentity`].
trait End {
    /// The end's image entry (images the table knows only).
    fn image(&self) -> Option<&ImageEntry>;
    /// Calls `visit` with every class the end belongs to.
    fn classes(&self, table: &CompiledTable, visit: impl FnMut(u32));
    /// The end's learned-peer key, or [`NONE`].
    fn peer(&self, table: &CompiledTable) -> u32;
}

/// An end looked up in the table as the decision needs it.
struct Lookup<'a> {
    identity: &'a Identity,
    image: Option<&'a ImageEntry>,
}

impl End for Lookup<'_> {
    #[inline]
    fn image(&self) -> Option<&ImageEntry> {
        self.image
    }

    #[inline]
    fn classes(&self, table: &CompiledTable, visit: impl FnMut(u32)) {
        table.classes_of(self.identity, self.image, visit);
    }

    #[inline]
    fn peer(&self, table: &CompiledTable) -> u32 {
        table.peer_of(self.identity, self.image)
    }
}

impl End for InternedIdentity {
    #[inline]
    fn image(&self) -> Option<&ImageEntry> {
        self.image.as_ref()
    }

    #[inline]
    fn classes(&self, _table: &CompiledTable, mut visit: impl FnMut(u32)) {
        for class in self.classes.iter() {
            visit(*class);
        }
    }

    #[inline]
    fn peer(&self, _table: &CompiledTable) -> u32 {
        self.peer
    }
}

/// A verdict table ready for decisions.
#[derive(Clone)]
pub struct CompiledTable {
    /// Tells this table (and its clones) apart from every other build.
    id: u64,
    table: VerdictTable,
    /// Container mode and host mode, unspecified read as disabled.
    mode: proto::Mode,
    host_mode: proto::Mode,
    /// Image IDs named by objects, models or learned peers.
    images: HashMap<Box<str>, ImageEntry>,
    /// Exact image names of objects → class.
    names: HashMap<Box<str>, u32>,
    /// Image-name prefixes of objects (`name*`) → class.
    prefixes: HashMap<Box<[u8]>, u32>,
    /// The distinct lengths of `prefixes`, ascending.
    prefix_lengths: Box<[usize]>,
    /// Host-app units named by objects or learned peers.
    units: HashMap<Box<str>, UnitEntry>,
    /// Network-object names as learned peers.
    object_peers: HashMap<Box<str>, u32>,
    /// Per class id.
    classes: Box<[Class]>,
    /// (source class, destination class) → ports to first rules.
    pairs: HashMap<u64, PortTable>,
    /// Subnets named as destinations → their classes.
    destination_subnets: PrefixIndex<Box<[u32]>>,
    /// Every subnet → the first object declaring it.
    subnets: PrefixIndex<u32>,
    /// Packed learned connections of the first model of each image.
    learned: LearnedSet,
}

impl fmt::Debug for CompiledTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledTable")
            .field("version", &self.table.version)
            .field("objects", &self.table.objects.len())
            .field("rules", &self.table.rules.len())
            .field("models", &self.table.models.len())
            .field("learned", &self.learned.len())
            .finish_non_exhaustive()
    }
}

/// Interns learned peers while building.
struct Peers {
    next: u32,
}

impl Peers {
    fn next(&mut self) -> Result<u32, TableError> {
        if self.next >= 1 << PEER_BITS {
            return Err(TableError::TooLarge {
                what: "learned peers",
                count: self.next as usize + 1,
                limit: (1 << PEER_BITS) - 1,
            });
        }
        self.next += 1;
        Ok(self.next - 1)
    }
}

/// Interning state of the build.
struct Builder {
    images: HashMap<Box<str>, ImageEntry>,
    units: HashMap<Box<str>, UnitEntry>,
    object_peers: HashMap<Box<str>, u32>,
    peers: Peers,
}

impl ImageEntry {
    const EMPTY: ImageEntry = ImageEntry {
        class: NONE,
        model: NONE,
        enforcing: false,
        peer: NONE,
    };
}

impl UnitEntry {
    const EMPTY: UnitEntry = UnitEntry {
        class: NONE,
        peer: NONE,
    };
}

/// The value of `key` in `map`, inserted as `empty` when absent.
fn intern<'m, V>(map: &'m mut HashMap<Box<str>, V>, key: &str, empty: V) -> &'m mut V {
    if !map.contains_key(key) {
        map.insert(key.into(), empty);
    }
    map.get_mut(key).expect("inserted above")
}

impl Builder {
    /// The peer key of a learned peer (kind and id, as `Identity::is_peer`
    /// compares them).
    fn peer(&mut self, peer: &proto::Identity) -> Result<u32, TableError> {
        let kind = proto::IdentityKind::try_from(peer.kind).unwrap_or(proto::IdentityKind::Unknown);
        let slot = match kind {
            proto::IdentityKind::Image => &mut intern(&mut self.images, &peer.id, ImageEntry::EMPTY).peer,
            proto::IdentityKind::HostApp => &mut intern(&mut self.units, &peer.id, UnitEntry::EMPTY).peer,
            proto::IdentityKind::NetworkObject => intern(&mut self.object_peers, &peer.id, NONE),
            proto::IdentityKind::Unknown | proto::IdentityKind::Unspecified => return Ok(UNKNOWN_PEER),
        };
        if *slot == NONE {
            *slot = self.peers.next()?;
        }
        Ok(*slot)
    }
}

/// The 2-bit code of a protocol as learned connections compare it:
/// unspecified (and, for learned entries, unknown) reads as TCP.
fn learned_protocol(protocol: proto::Protocol) -> u64 {
    match protocol {
        proto::Protocol::Unspecified | proto::Protocol::Tcp => 0,
        proto::Protocol::Udp => 1,
        proto::Protocol::Icmp => 2,
        proto::Protocol::Any => 3,
    }
}

fn learned_key(model: u32, peer: u32, side: proto::Side, protocol: proto::Protocol, port: u16) -> u64 {
    let inbound = u64::from(side == proto::Side::Inbound);
    (u64::from(model) << (64 - MODEL_BITS))
        | (u64::from(peer) << (64 - MODEL_BITS - PEER_BITS))
        | (inbound << 18)
        | (learned_protocol(protocol) << 16)
        | u64::from(port)
}

fn pair_key(source: u32, destination: u32) -> u64 {
    (u64::from(source) << 32) | u64::from(destination)
}

/// Estimated heap bytes of a hash map or set with `capacity` entries of
/// `entry` bytes (hashbrown: buckets of 7/8 load, a control byte each).
fn table_bytes(capacity: usize, entry: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    let buckets = if capacity < 8 {
        if capacity < 4 {
            4
        } else {
            8
        }
    } else {
        (capacity * 8 / 7).next_power_of_two()
    };
    buckets * (entry + 1) + 16
}

fn map_bytes<K, V>(map: &HashMap<K, V>) -> usize {
    table_bytes(map.capacity(), std::mem::size_of::<(K, V)>())
}

impl CompiledTable {
    /// Validates and indexes `table`.
    pub fn build(table: VerdictTable) -> Result<Self, TableError> {
        if table.models.len() >= 1 << MODEL_BITS {
            return Err(TableError::TooLarge {
                what: "models",
                count: table.models.len(),
                limit: (1 << MODEL_BITS) - 1,
            });
        }
        let mut builder = Builder {
            images: HashMap::new(),
            units: HashMap::new(),
            object_peers: HashMap::new(),
            peers: Peers { next: UNKNOWN_PEER + 1 },
        };

        // Objects: names, subnets, classes.
        let mut object_classes: HashMap<&str, u32> = HashMap::with_capacity(table.objects.len());
        let mut class_ids: HashMap<ClassKey, u32> = HashMap::new();
        let mut names = HashMap::new();
        let mut prefixes: HashMap<Box<[u8]>, u32> = HashMap::new();
        let mut subnets = PrefixBuilder::new();
        let mut subnet_nets: HashMap<u32, Vec<ipnet::IpNet>> = HashMap::new();
        for (index, object) in table.objects.iter().enumerate() {
            if object_classes.contains_key(object.name.as_str()) {
                return Err(TableError::DuplicateObject(object.name.clone()));
            }
            let Some(key) = ClassKey::of(index, object) else {
                object_classes.insert(&object.name, NONE);
                continue;
            };
            let next = class_ids.len() as u32;
            let class = *class_ids.entry(key.clone()).or_insert(next);
            object_classes.insert(&object.name, class);
            match key {
                ClassKey::ImageId(id) => intern(&mut builder.images, &id, ImageEntry::EMPTY).class = class,
                ClassKey::ImageName(name) => {
                    names.insert(Box::<str>::from(name), class);
                }
                ClassKey::ImagePrefix(prefix) => {
                    prefixes.insert(prefix.into_bytes().into_boxed_slice(), class);
                }
                ClassKey::Unit(unit) => intern(&mut builder.units, &unit, UnitEntry::EMPTY).class = class,
                ClassKey::Subnet(_) => {
                    let mut nets = Vec::with_capacity(object.cidrs.len());
                    for cidr in &object.cidrs {
                        let net = reference::parse_cidr(cidr).ok_or_else(|| TableError::BadCidr {
                            object: object.name.clone(),
                            value: cidr.clone(),
                        })?;
                        let first = subnets.entry(net, || index as u32);
                        *first = (*first).min(index as u32);
                        nets.push(net);
                    }
                    subnet_nets.insert(class, nets);
                }
            }
        }
        let mut classes = vec![Class::EMPTY; class_ids.len()];
        drop(class_ids);

        // Rules: per source class, the first rules; per class pair, the
        // destinations.
        let mut destinations: HashMap<u64, Vec<Destination>> = HashMap::new();
        for (index, rule) in table.rules.iter().enumerate() {
            if rule.disabled {
                continue;
            }
            let Some(&source) = object_classes.get(rule.source.as_str()) else {
                continue; // a missing source object matches nothing
            };
            if source == NONE || subnet_nets.contains_key(&source) {
                continue; // subnets and unmatchable objects are no source
            }
            let index = index as u32;
            let class = &mut classes[source as usize];
            class.first = class.first.min(index);
            if reference::effect_of(rule.effect) == proto::RuleEffect::Prevent {
                class.prevent = class.prevent.min(index);
            }
            if rule.allow_learned {
                class.allow_learned = class.allow_learned.min(index);
            }
            for destination in &rule.destinations {
                let Some(&target) = object_classes.get(destination.object.as_str()) else {
                    continue;
                };
                let ranges = ports::port_ranges(&destination.ports);
                if target == NONE || ranges.is_empty() {
                    continue;
                }
                classes[source as usize].has_destinations = true;
                classes[target as usize].is_destination = true;
                destinations
                    .entry(pair_key(source, target))
                    .or_default()
                    .push(Destination {
                        ranges,
                        protocol: ports::protocol_class(destination.protocol),
                        effect: match reference::effect_of(destination.effect) {
                            proto::RuleEffect::Unspecified => ALLOW,
                            proto::RuleEffect::Alert => ALERT,
                            proto::RuleEffect::Prevent => PREVENT,
                        },
                        rule: index,
                    });
            }
        }
        drop(object_classes);
        let mut pairs = HashMap::with_capacity(destinations.len());
        for (key, list) in destinations {
            pairs.insert(key, PortTable::build(&list));
        }
        let mut per_net: HashMap<ipnet::IpNet, Vec<u32>> = HashMap::new();
        for (class, nets) in &subnet_nets {
            if classes[*class as usize].is_destination {
                for net in nets {
                    let list = per_net.entry(*net).or_default();
                    if !list.contains(class) {
                        list.push(*class);
                    }
                }
            }
        }
        let mut destination_subnets = PrefixBuilder::new();
        for (net, mut list) in per_net {
            list.sort_unstable();
            *destination_subnets.entry(net, || Box::<[u32]>::from([])) = list.into_boxed_slice();
        }
        let destination_subnets = destination_subnets.build();

        // Models and learned connections: the first model of an image ID
        // is its model, as the reference finds it.
        let total: usize = table
            .models
            .iter()
            .map(|model| model.inbound.len() + model.outbound.len())
            .sum();
        let mut learned = LearnedSet::with_capacity(total);
        for (index, model) in table.models.iter().enumerate() {
            let entry = intern(&mut builder.images, &model.image_id, ImageEntry::EMPTY);
            if entry.model != NONE {
                continue;
            }
            entry.model = index as u32;
            entry.enforcing = model.state == proto::ModelState::Enforcing as i32;
            let sides = [
                (proto::Side::Inbound, &model.inbound),
                (proto::Side::Outbound, &model.outbound),
            ];
            for (side, list) in sides {
                for connection in list {
                    let (Some(peer), Ok(port)) = (&connection.peer, u16::try_from(connection.port)) else {
                        continue; // no peer, or a port no connection has
                    };
                    let peer = builder.peer(peer)?;
                    let protocol = proto::Protocol::try_from(connection.protocol).unwrap_or(proto::Protocol::Tcp);
                    learned.insert(learned_key(index as u32, peer, side, protocol, port));
                }
            }
        }

        let mut prefix_lengths: Vec<usize> = prefixes.keys().map(|prefix| prefix.len()).collect();
        prefix_lengths.sort_unstable();
        prefix_lengths.dedup();
        let Builder {
            mut images,
            mut units,
            mut object_peers,
            ..
        } = builder;
        images.shrink_to_fit();
        units.shrink_to_fit();
        object_peers.shrink_to_fit();
        names.shrink_to_fit();
        prefixes.shrink_to_fit();
        // The learned connections now live in the index only: keeping the
        // protobuf copies too would double the agent's largest structure.
        let mut table = table;
        for model in &mut table.models {
            model.inbound = Vec::new();
            model.outbound = Vec::new();
        }
        Ok(Self {
            id: NEXT_TABLE_ID.fetch_add(1, Ordering::Relaxed),
            mode: effective_mode(table.mode),
            host_mode: effective_mode(table.host_mode),
            table,
            images,
            names,
            prefixes,
            prefix_lengths: prefix_lengths.into_boxed_slice(),
            units,
            object_peers,
            classes: classes.into_boxed_slice(),
            pairs,
            destination_subnets,
            subnets: subnets.build(),
            learned,
        })
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

    /// The table this was built from, without the models' learned
    /// connections (those live only in the index; a caller that needs them
    /// keeps the encoded table it received).
    pub fn table(&self) -> &VerdictTable {
        &self.table
    }

    /// The network object `address` belongs to by longest-prefix match
    /// (ties: the object declared first).
    pub fn resolve_object(&self, address: IpAddr) -> Option<&str> {
        self.subnets
            .longest(address)
            .map(|index| self.table.objects[*index as usize].name.as_str())
    }

    /// An estimate of the heap bytes the index holds beside the table
    /// itself (which [`CompiledTable::table`] returns): hash tables by
    /// capacity, interned strings by length. For sizing and benchmarks.
    pub fn index_heap_bytes(&self) -> usize {
        map_bytes(&self.images)
            + self.images.keys().map(|key| key.len()).sum::<usize>()
            + map_bytes(&self.names)
            + self.names.keys().map(|key| key.len()).sum::<usize>()
            + map_bytes(&self.prefixes)
            + self.prefixes.keys().map(|key| key.len()).sum::<usize>()
            + std::mem::size_of_val(&*self.prefix_lengths)
            + map_bytes(&self.units)
            + self.units.keys().map(|key| key.len()).sum::<usize>()
            + map_bytes(&self.object_peers)
            + self.object_peers.keys().map(|key| key.len()).sum::<usize>()
            + std::mem::size_of_val(&*self.classes)
            + map_bytes(&self.pairs)
            + self.pairs.values().map(PortTable::heap_bytes).sum::<usize>()
            + self
                .destination_subnets
                .heap_bytes(|classes| std::mem::size_of_val(&**classes))
            + self.subnets.heap_bytes(|_| 0)
            + self.learned.heap_bytes()
    }

    /// The mode in force for `connection`: the host mode for host traffic,
    /// else the container mode, unset read as disabled.
    pub fn mode_for(&self, connection: &Connection<'_>) -> proto::Mode {
        if connection.is_host_traffic() {
            self.host_mode
        } else {
            self.mode
        }
    }

    /// Decides `connection`; identical to [`reference::decide`].
    pub fn decide(&self, connection: &Connection<'_>) -> Decision<'_> {
        let source = Lookup {
            identity: connection.source,
            image: self.image_entry(connection.source),
        };
        let destination = Lookup {
            identity: connection.destination,
            image: self.image_entry(connection.destination),
        };
        self.decide_ends(connection, &source, &destination)
    }

    /// Looks `identity` up once, for [`CompiledTable::decide_interned`].
    /// Costs a few hash lookups; worth it for an identity decided for more
    /// than once under this table.
    pub fn intern(&self, identity: &Identity) -> InternedIdentity {
        let image = self.image_entry(identity);
        let mut classes = Vec::new();
        self.classes_of(identity, image, |class| classes.push(class));
        InternedIdentity {
            table: self.id,
            image: image.copied(),
            classes: classes.into_boxed_slice(),
            peer: self.peer_of(identity, image),
        }
    }

    /// Decides `connection` like [`CompiledTable::decide`], with its ends
    /// interned: `source` must be `connection.source` interned, and
    /// `destination` `connection.destination`. Ends interned in another
    /// table are looked up again (the answer stays right, only slower).
    pub fn decide_interned(
        &self,
        connection: &Connection<'_>,
        source: &InternedIdentity,
        destination: &InternedIdentity,
    ) -> Decision<'_> {
        if !source.is_for(self) || !destination.is_for(self) {
            return self.decide(connection);
        }
        self.decide_ends(connection, source, destination)
    }

    /// The decision, with the ends' lookups behind [`End`].
    #[inline]
    fn decide_ends<E: End>(&self, connection: &Connection<'_>, source: &E, destination: &E) -> Decision<'_> {
        let mode = self.mode_for(connection);
        if mode == proto::Mode::Disabled {
            return Decision {
                verdict: proto::Verdict::Observe,
                decided_by: DecidedBy::Mode,
            };
        }

        // The rules of the source: every class it belongs to.
        let mut rules = Class::EMPTY;
        let mut sources = ClassSet::new();
        source.classes(self, |class| {
            let info = &self.classes[class as usize];
            if info.first != NONE {
                rules.merge(info);
                if info.has_destinations {
                    sources.push(class);
                }
            }
        });

        if rules.first == NONE {
            // No rule for S: known (learning sides learn) -> allow;
            // otherwise the global mode.
            return match self.known(connection, source, destination) {
                Some(verdict) => Decision {
                    verdict,
                    decided_by: self.model_of(connection, source.image(), destination.image()),
                },
                None => Decision {
                    verdict: if mode == proto::Mode::Prevent {
                        proto::Verdict::Prevent
                    } else {
                        proto::Verdict::Alert
                    },
                    decided_by: DecidedBy::Mode,
                },
            };
        }

        // First rule per destination effect over every (source class,
        // destination class) pair.
        let mut first = [NONE; 3];
        if !sources.is_empty() {
            let mut targets = ClassSet::new();
            destination.classes(self, |class| {
                if self.classes[class as usize].is_destination {
                    targets.push(class);
                }
            });
            self.destination_subnets
                .each(connection.destination_address, |classes| {
                    for class in classes.iter() {
                        targets.push(*class);
                    }
                    true
                });
            for source in sources.iter() {
                for target in targets.iter() {
                    if let Some(ports) = self.pairs.get(&pair_key(source, target)) {
                        let found = ports.lookup(connection.port, connection.protocol);
                        for (held, new) in first.iter_mut().zip(found) {
                            *held = (*held).min(new);
                        }
                    }
                }
            }
        }

        let rule = |index: u32| DecidedBy::Rule(self.table.rules[index as usize].id.as_str());
        // A rule of S alerts/prevents D -> that effect (prevent first).
        if first[PREVENT] != NONE {
            return Decision {
                verdict: proto::Verdict::Prevent,
                decided_by: rule(first[PREVENT]),
            };
        }
        if first[ALERT] != NONE {
            return Decision {
                verdict: proto::Verdict::Alert,
                decided_by: rule(first[ALERT]),
            };
        }
        // D:port among its destinations -> allow.
        if first[ALLOW] != NONE {
            return Decision {
                verdict: proto::Verdict::Allow,
                decided_by: rule(first[ALLOW]),
            };
        }
        // Rule allows learned and known -> allow (learn where learning).
        if rules.allow_learned != NONE {
            if let Some(verdict) = self.known(connection, source, destination) {
                return Decision {
                    verdict,
                    decided_by: rule(rules.allow_learned),
                };
            }
        }
        // Otherwise the rule's effect: the first preventing rule, else the
        // first rule (which then alerts).
        if rules.prevent != NONE {
            Decision {
                verdict: proto::Verdict::Prevent,
                decided_by: rule(rules.prevent),
            }
        } else {
            Decision {
                verdict: proto::Verdict::Alert,
                decided_by: rule(rules.first),
            }
        }
    }

    /// The entry of an image identity's ID.
    #[inline]
    fn image_entry(&self, identity: &Identity) -> Option<&ImageEntry> {
        match identity {
            Identity::Image { id, .. } => self.images.get(id.as_str()),
            _ => None,
        }
    }

    /// Calls `visit` with every identity class `identity` belongs to.
    #[inline]
    fn classes_of(&self, identity: &Identity, image: Option<&ImageEntry>, mut visit: impl FnMut(u32)) {
        match identity {
            Identity::Image { name, .. } => {
                if let Some(entry) = image {
                    if entry.class != NONE {
                        visit(entry.class);
                    }
                }
                if !self.names.is_empty() {
                    if let Some(class) = self.names.get(name.as_str()) {
                        visit(*class);
                    }
                }
                for &length in self.prefix_lengths.iter() {
                    let Some(prefix) = name.as_bytes().get(..length) else {
                        break;
                    };
                    if let Some(class) = self.prefixes.get(prefix) {
                        visit(*class);
                    }
                }
            }
            Identity::HostApp { unit } => {
                if let Some(entry) = self.units.get(unit.as_str()) {
                    if entry.class != NONE {
                        visit(entry.class);
                    }
                }
            }
            Identity::Object { .. } | Identity::Unknown => {}
        }
    }

    /// The peer key of `identity` as learned connections name it, or
    /// [`NONE`] when no learned connection names it.
    #[inline]
    fn peer_of(&self, identity: &Identity, image: Option<&ImageEntry>) -> u32 {
        match identity {
            Identity::Image { .. } => image.map_or(NONE, |entry| entry.peer),
            Identity::HostApp { unit } => self.units.get(unit.as_str()).map_or(NONE, |entry| entry.peer),
            Identity::Object { name } => self.object_peers.get(name.as_str()).copied().unwrap_or(NONE),
            Identity::Unknown => UNKNOWN_PEER,
        }
    }

    /// Whether the checked sides know the connection (see the reference).
    fn known<E: End>(&self, connection: &Connection<'_>, source: &E, destination: &E) -> Option<proto::Verdict> {
        let mut learning = false;
        let sides = [
            (
                connection.scope.checks_source(),
                connection.source,
                source,
                destination,
                proto::Side::Outbound,
            ),
            (
                connection.scope.checks_destination(),
                connection.destination,
                destination,
                source,
                proto::Side::Inbound,
            ),
        ];
        for (checked, owner, owner_end, peer_end, side) in sides {
            if !checked || !matches!(owner, Identity::Image { .. }) {
                continue; // only images have models
            }
            let Some(entry) = owner_end.image().filter(|entry| entry.model != NONE) else {
                learning = true; // an image new to the fleet is learning
                continue;
            };
            if !entry.enforcing {
                learning = true;
                continue;
            }
            let peer = peer_end.peer(self);
            if peer == NONE
                || !self.learned.contains(learned_key(
                    entry.model,
                    peer,
                    side,
                    connection.protocol,
                    connection.port,
                ))
            {
                return None;
            }
        }
        Some(if learning {
            proto::Verdict::Learn
        } else {
            proto::Verdict::Allow
        })
    }

    /// The model that names a known connection: the subject's, if an image.
    fn model_of(
        &self,
        connection: &Connection<'_>,
        source_image: Option<&ImageEntry>,
        destination_image: Option<&ImageEntry>,
    ) -> DecidedBy<'_> {
        let (subject, image) = match connection.scope {
            super::Scope::Ingress => (connection.destination, destination_image),
            super::Scope::Egress | super::Scope::Both => (connection.source, source_image),
        };
        match (subject, image) {
            (Identity::Image { .. }, Some(entry)) if entry.model != NONE => {
                DecidedBy::Model(self.table.models[entry.model as usize].image_id.as_str())
            }
            _ => DecidedBy::Default,
        }
    }
}
