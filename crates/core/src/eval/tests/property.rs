//! The law: the compiled table decides every connection exactly as the
//! reference does (verdict and what decided it, rule id included).
//!
//! Tables are small and drawn from small pools of ids, names, units,
//! CIDRs and ports, and connections mostly from the same pools, so that
//! rules, subnets and learned connections actually match; a second test
//! counts the paths taken to prove it. Every enum also takes values the
//! schema does not define.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

use super::*;

const IMAGE_IDS: &[&str] = &["sha-a", "sha-b", "sha-c", ""];
const IMAGE_NAMES: &[&str] = &["web:1", "web:2", "db:1", "webx", ""];
const PATTERNS: &[&str] = &["web:1", "web*", "*", "db:1", "w*", "web:1*", "x*"];
const UNITS: &[&str] = &["sshd", "nginx", ""];
const OBJECTS: &[&str] = &["o0", "o1", "o2", "o3", "o4", "o5", "o6", "o7"];
const CIDRS: &[&str] = &[
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.1.2.3",
    "10.1.2.3/32",
    "0.0.0.0/0",
    "fd00::/8",
    "fd00::1",
    "::/0",
];
const ADDRESSES: &[&str] = &[
    "10.1.2.3",
    "10.1.2.4",
    "10.9.0.1",
    "192.168.1.1",
    "fd00::1",
    "fd00::2",
    "fe80::1",
];
const PORTS: &[u32] = &[0, 22, 80, 443, 8080, 65535];

fn one<T: Clone + std::fmt::Debug + 'static>(pool: &'static [T]) -> impl Strategy<Value = T> {
    prop::sample::select(pool)
}

fn owned(pool: &'static [&'static str]) -> impl Strategy<Value = String> {
    one(pool).prop_map(str::to_owned)
}

/// An enum value: mostly defined ones, sometimes one past the end.
fn enum_value(defined: i32) -> impl Strategy<Value = i32> {
    prop_oneof![8 => 0..defined, 1 => Just(defined + 3)]
}

fn mode() -> impl Strategy<Value = i32> {
    prop_oneof![1 => Just(0), 1 => Just(1), 12 => Just(2), 12 => Just(3), 1 => Just(9)]
}

/// An object named `name`: the first names are mostly images and host
/// apps (rule sources), the others mostly subnets.
fn object(index: usize, name: &'static str) -> impl Strategy<Value = NetworkObject> {
    let kind = if index < 4 {
        prop_oneof![6 => Just(1), 1 => Just(2), 2 => Just(3), 1 => Just(0), 1 => Just(7)].boxed()
    } else {
        prop_oneof![2 => Just(1), 4 => Just(2), 1 => Just(3), 1 => Just(0), 1 => Just(7)].boxed()
    };
    (
        kind,
        prop_oneof![1 => owned(IMAGE_IDS), 1 => Just(String::new())],
        owned(PATTERNS),
        prop::collection::vec(owned(CIDRS), 0..3),
        owned(UNITS),
    )
        .prop_map(move |(kind, image_id, image_name, cidrs, host_app)| NetworkObject {
            name: name.to_owned(),
            kind,
            image_id,
            image_name,
            cidrs,
            host_app,
            ..Default::default()
        })
}

fn object_name() -> impl Strategy<Value = String> {
    prop_oneof![10 => owned(OBJECTS), 1 => Just("missing".to_owned())]
}

fn port_range() -> impl Strategy<Value = PortRange> {
    let bound = prop_oneof![one(PORTS), Just(70000u32)];
    (bound.clone(), prop_oneof![2 => Just(0u32), 3 => bound]).prop_map(|(first, last)| PortRange { first, last })
}

fn destination() -> impl Strategy<Value = RuleDestination> {
    (
        object_name(),
        prop::collection::vec(port_range(), 0..3),
        enum_value(5),
        prop_oneof![3 => Just(0), 2 => Just(1), 2 => Just(2), 1 => Just(5)],
    )
        .prop_map(|(object, ports, protocol, effect)| RuleDestination {
            object,
            ports,
            protocol,
            effect,
        })
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        // "unique" becomes the rule's position; "dup" stays, shared.
        prop_oneof![4 => Just("unique".to_owned()), 1 => Just("dup".to_owned())],
        prop_oneof![4 => owned(&OBJECTS[..4]), 1 => object_name()],
        prop::collection::vec(destination(), 0..4),
        any::<bool>(),
        enum_value(3),
        prop::bool::weighted(0.15),
    )
        .prop_map(|(id, source, destinations, allow_learned, effect, disabled)| Rule {
            id,
            source,
            destinations,
            allow_learned,
            effect,
            disabled,
            ..Default::default()
        })
}

fn peer() -> impl Strategy<Value = Option<proto::Identity>> {
    let peer = |kind: i32, id: &'static [&'static str]| {
        owned(id).prop_map(move |id| {
            Some(proto::Identity {
                kind,
                id,
                ..Default::default()
            })
        })
    };
    prop_oneof![
        6 => peer(1, IMAGE_IDS),
        2 => peer(2, UNITS),
        2 => peer(3, OBJECTS),
        1 => peer(4, IMAGE_IDS),
        1 => (enum_value(5), owned(IMAGE_IDS))
            .prop_map(|(kind, id)| Some(proto::Identity { kind, id, ..Default::default() })),
        1 => Just(None),
    ]
}

fn learned_connection() -> impl Strategy<Value = LearnedConnection> {
    (peer(), prop_oneof![8 => one(PORTS), 1 => Just(70000u32)], enum_value(5)).prop_map(|(peer, port, protocol)| {
        LearnedConnection {
            peer,
            port,
            protocol,
            ..Default::default()
        }
    })
}

fn compiled_model() -> impl Strategy<Value = CompiledModel> {
    (
        owned(IMAGE_IDS),
        prop_oneof![2 => Just(1), 6 => Just(2), 1 => Just(0), 1 => Just(7)],
        prop::collection::vec(learned_connection(), 0..8),
        prop::collection::vec(learned_connection(), 0..8),
    )
        .prop_map(|(image_id, state, inbound, outbound)| CompiledModel {
            image_id,
            state,
            inbound,
            outbound,
        })
}

fn verdict_table() -> impl Strategy<Value = VerdictTable> {
    let objects = OBJECTS
        .iter()
        .enumerate()
        .map(|(index, name)| prop::option::weighted(0.85, object(index, name)))
        .collect::<Vec<_>>();
    (
        mode(),
        mode(),
        objects,
        prop::collection::vec(rule(), 0..9),
        prop::collection::vec(compiled_model(), 2..8),
    )
        .prop_map(|(mode, host_mode, objects, rules, models)| VerdictTable {
            mode,
            host_mode,
            objects: objects.into_iter().flatten().collect(),
            rules: rules
                .into_iter()
                .enumerate()
                .map(|(index, mut rule)| {
                    if rule.id == "unique" {
                        rule.id = format!("r{index}");
                    }
                    rule
                })
                .collect(),
            models,
            ..Default::default()
        })
}

fn identity() -> impl Strategy<Value = Identity> {
    prop_oneof![
        12 => (prop_oneof![8 => owned(IMAGE_IDS), 1 => Just("sha-z".to_owned())], owned(IMAGE_NAMES))
            .prop_map(|(id, name)| Identity::Image { id, name }),
        2 => prop_oneof![owned(UNITS), Just("cron".to_owned())].prop_map(|unit| Identity::HostApp { unit }),
        1 => owned(OBJECTS).prop_map(|name| Identity::Object { name }),
        1 => Just(Identity::Unknown),
    ]
}

/// A connection that owns its identities.
#[derive(Clone, Debug)]
struct Case {
    source: Identity,
    destination: Identity,
    source_address: IpAddr,
    destination_address: IpAddr,
    port: u16,
    protocol: proto::Protocol,
    scope: Scope,
}

impl Case {
    fn connection(&self) -> Connection<'_> {
        Connection {
            source: &self.source,
            source_address: self.source_address,
            destination: &self.destination,
            destination_address: self.destination_address,
            port: self.port,
            protocol: self.protocol,
            scope: self.scope,
        }
    }
}

fn case() -> impl Strategy<Value = Case> {
    let address = || one(ADDRESSES).prop_map(ip);
    let port = prop_oneof![6 => one(PORTS).prop_map(|port| port as u16), 1 => Just(81u16), 1 => any::<u16>()];
    (
        identity(),
        identity(),
        address(),
        address(),
        port,
        prop_oneof![
            Just(proto::Protocol::Unspecified),
            Just(proto::Protocol::Tcp),
            Just(proto::Protocol::Tcp),
            Just(proto::Protocol::Udp),
            Just(proto::Protocol::Icmp),
            Just(proto::Protocol::Any),
        ],
        prop_oneof![Just(Scope::Egress), Just(Scope::Ingress), Just(Scope::Both)],
    )
        .prop_map(
            |(source, destination, source_address, destination_address, port, protocol, scope)| Case {
                source,
                destination,
                source_address,
                destination_address,
                port,
                protocol,
                scope,
            },
        )
}

fn table_and_cases() -> impl Strategy<Value = (VerdictTable, Vec<Case>)> {
    (verdict_table(), prop::collection::vec(case(), 32))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn compiled_decides_like_the_reference((table, cases) in table_and_cases()) {
        let compiled = CompiledTable::build(table.clone()).unwrap();
        for case in &cases {
            let connection = case.connection();
            let expected = reference::decide(&table, &connection);
            prop_assert_eq!(compiled.decide(&connection), expected, "{:?}", case);
            // The same with both ends interned (the agent's path).
            let source = compiled.intern(connection.source);
            let destination = compiled.intern(connection.destination);
            prop_assert_eq!(
                compiled.decide_interned(&connection, &source, &destination),
                expected,
                "interned: {:?}",
                case
            );
        }
    }

    #[test]
    fn resolve_object_is_the_longest_prefix_first_declared(
        (table, cases) in table_and_cases(),
    ) {
        let compiled = CompiledTable::build(table.clone()).unwrap();
        for case in &cases {
            let address = case.destination_address;
            // The naive reading: every subnet entry, longest first, then
            // declaration order.
            let expected = table
                .objects
                .iter()
                .filter(|object| object.kind == proto::network_object::Kind::Subnet as i32)
                .flat_map(|object| object.cidrs.iter().map(move |cidr| (object, cidr)))
                .filter_map(|(object, cidr)| {
                    let net = reference::parse_cidr(cidr).unwrap();
                    net.contains(&address).then_some((net.prefix_len(), object.name.as_str()))
                })
                .fold(None::<(u8, &str)>, |best, (len, name)| match best {
                    Some((held, _)) if held >= len => best,
                    _ => Some((len, name)),
                })
                .map(|(_, name)| name);
            prop_assert_eq!(compiled.resolve_object(address), expected);
        }
    }
}

/// The generated cases take every path of the decision often enough for
/// the law above to mean something.
#[test]
fn generated_cases_reach_every_path() {
    let mut runner = TestRunner::deterministic();
    let strategy = table_and_cases();
    let mut total = 0usize;
    let mut counts = std::collections::HashMap::<&str, usize>::new();
    for _ in 0..400 {
        let (table, cases) = strategy.new_tree(&mut runner).unwrap().current();
        let mut allowing_only = table.clone();
        for rule in &mut allowing_only.rules {
            rule.destinations.retain(|destination| destination.effect == 0);
        }
        for case in &cases {
            let connection = case.connection();
            let decision = reference::decide(&table, &connection);
            total += 1;
            let path = match decision.decided_by {
                DecidedBy::Rule(_) => match decision.verdict {
                    proto::Verdict::Allow | proto::Verdict::Learn => "rule allows",
                    // Would it differ without the denying destinations?
                    _ if reference::decide(&allowing_only, &connection) != decision => "destination denies",
                    _ => "rule effect",
                },
                DecidedBy::Model(_) => "model knows",
                DecidedBy::Default => "nothing checks",
                DecidedBy::Mode if decision.verdict == proto::Verdict::Observe => "disabled",
                DecidedBy::Mode => "mode",
            };
            *counts.entry(path).or_default() += 1;
            if matches!(decision.verdict, proto::Verdict::Learn) {
                *counts.entry("learn").or_default() += 1;
            }
        }
    }
    eprintln!("paths over {total} decisions: {counts:?}");
    let share = |path: &str| counts.get(path).copied().unwrap_or(0) as f64 / total as f64;
    for (path, least) in [
        ("rule allows", 0.03),
        ("rule effect", 0.05),
        ("destination denies", 0.005),
        ("model knows", 0.06),
        ("nothing checks", 0.1),
        ("disabled", 0.05),
        ("mode", 0.1),
        ("learn", 0.1),
    ] {
        assert!(
            share(path) >= least,
            "{path}: {:.4} of {total} ({counts:?})",
            share(path)
        );
    }
}
