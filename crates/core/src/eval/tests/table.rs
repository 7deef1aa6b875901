//! Address resolution (longest-prefix match) and table validation.

use super::*;
use crate::eval::TableError;

fn objects(objects: Vec<NetworkObject>) -> CompiledTable {
    let mut table = table(proto::Mode::Alert);
    table.objects = objects;
    CompiledTable::build(table).unwrap()
}

#[test]
fn the_most_specific_ipv4_prefix_wins() {
    let table = objects(vec![
        subnet("everything", &["0.0.0.0/0"]),
        subnet("corp", &["10.0.0.0/8"]),
        subnet("data", &["10.2.0.0/16", "172.16.0.0/12"]),
        subnet("db-vip", &["10.2.0.7"]),
        host_app("ssh", "sshd"),
    ]);
    let resolve = |address: &str| table.resolve_object(ip(address));
    assert_eq!(resolve("10.2.0.7"), Some("db-vip"));
    assert_eq!(resolve("10.2.0.8"), Some("data"));
    assert_eq!(resolve("172.31.255.255"), Some("data"));
    assert_eq!(resolve("172.32.0.0"), Some("everything"));
    assert_eq!(resolve("10.200.0.1"), Some("corp"));
    assert_eq!(resolve("192.0.2.1"), Some("everything"));
    // An IPv4 prefix never holds an IPv6 address, mapped or not.
    assert_eq!(resolve("::ffff:10.2.0.7"), None);
    assert_eq!(resolve("fd00::1"), None);
}

#[test]
fn the_most_specific_ipv6_prefix_wins_and_single_addresses_are_host_prefixes() {
    let table = objects(vec![
        subnet("ula", &["fd00::/8"]),
        subnet("site", &["fd00:1::/32"]),
        subnet("gateway", &["fd00:1::1", "2001:db8::/128"]),
        subnet("default", &["::/0"]),
    ]);
    let resolve = |address: &str| table.resolve_object(ip(address));
    assert_eq!(resolve("fd00:1::1"), Some("gateway"));
    assert_eq!(resolve("fd00:1::2"), Some("site"));
    assert_eq!(resolve("fd00:2::1"), Some("ula"));
    assert_eq!(resolve("2001:db8::"), Some("gateway"));
    assert_eq!(resolve("2001:db8::1"), Some("default"));
    assert_eq!(resolve("10.0.0.1"), None);
}

#[test]
fn equal_prefixes_resolve_to_the_object_declared_first() {
    // Host bits are ignored: 10.1.2.3/16 is 10.1.0.0/16.
    let table = objects(vec![
        subnet("a", &["192.0.2.0/24"]),
        subnet("b", &["10.1.2.3/16", "192.0.2.0/24"]),
        subnet("c", &["10.1.0.0/16"]),
    ]);
    assert_eq!(table.resolve_object(ip("192.0.2.9")), Some("a"));
    assert_eq!(table.resolve_object(ip("10.1.9.9")), Some("b"));
    let empty = CompiledTable::empty();
    assert_eq!(empty.resolve_object(ip("10.1.9.9")), None);
    assert_eq!(empty.version(), 0);
}

#[test]
fn only_subnet_objects_resolve_addresses() {
    // A non-subnet object's cidrs are not read (nor validated).
    let mut image = image_object("web", "sha-web");
    image.cidrs = vec!["10.0.0.0/8".into(), "not a cidr".into()];
    let table = objects(vec![image, subnet("none", &[])]);
    assert_eq!(table.resolve_object(ip("10.0.0.1")), None);
}

#[test]
fn a_subnet_entry_that_is_neither_cidr_nor_address_is_rejected() {
    for bad in ["10.0.0.0/33", "10.0.0", "fd00::/129", "", "host.example"] {
        let mut table = table(proto::Mode::Alert);
        table.objects = vec![subnet("ok", &["10.0.0.0/8"]), subnet("broken", &["10.1.0.0/16", bad])];
        assert_eq!(
            CompiledTable::build(table).unwrap_err(),
            TableError::BadCidr {
                object: "broken".into(),
                value: bad.into()
            }
        );
    }
}

#[test]
fn an_object_declared_twice_is_rejected() {
    let mut table = table(proto::Mode::Alert);
    table.objects = vec![
        image_object("web", "sha-web"),
        subnet("data", &["10.2.0.0/16"]),
        host_app("web", "nginx"),
    ];
    let error = CompiledTable::build(table).unwrap_err();
    assert_eq!(error, TableError::DuplicateObject("web".into()));
    assert_eq!(error.to_string(), "object \"web\" is declared twice");
}

#[test]
fn the_compiled_table_keeps_the_table_and_its_version() {
    let mut source = table(proto::Mode::Prevent);
    source.objects = vec![subnet("data", &["10.2.0.0/16"])];
    let compiled = CompiledTable::build(source.clone()).unwrap();
    assert_eq!(compiled.version(), 7);
    assert_eq!(compiled.table(), &source);
    assert!(compiled.index_heap_bytes() > 0);
}

#[test]
fn identities_interned_in_another_table_are_looked_up_again() {
    let web = image("sha-web", "web:1");
    let db = image("sha-db", "db:1");
    let connection = connection(&web, "10.0.0.1", &db, "10.0.0.2", 5432, Scope::Egress);
    // Prevent mode, web's model enforcing; only the second table's model
    // knows web → db:5432.
    let with_model = |outbound| {
        let mut table = table(proto::Mode::Prevent);
        table.models = vec![model("sha-web", proto::ModelState::Enforcing, vec![], outbound)];
        CompiledTable::build(table).unwrap()
    };
    let unknown = with_model(vec![]);
    let knowing = with_model(vec![learned(&db, 5432)]);
    let (source, destination) = (unknown.intern(&web), unknown.intern(&db));
    assert!(source.is_for(&unknown) && source.is_for(&unknown.clone()));
    assert!(!source.is_for(&knowing));
    assert_eq!(
        unknown.decide_interned(&connection, &source, &destination).verdict,
        proto::Verdict::Prevent
    );
    // Stale internings: the answer is the other table's, as without them.
    assert_eq!(
        knowing.decide_interned(&connection, &source, &destination),
        knowing.decide(&connection)
    );
    assert_eq!(knowing.decide(&connection).verdict, proto::Verdict::Allow);
}
