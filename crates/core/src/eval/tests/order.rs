//! One test per line of the decision order (SPEC.md section 4) and per
//! chosen semantics (module docs), each through both evaluators.

use super::*;
use crate::proto::{Mode, ModelState, Protocol, RuleEffect, Verdict};

const WEB: &str = "10.1.0.5";
const DB: &str = "10.2.0.7";
const CACHE: &str = "10.2.0.8";
const OUTSIDE: &str = "192.0.2.1";

fn web() -> Identity {
    image("sha-web", "shop/web:1")
}
fn db() -> Identity {
    image("sha-db", "shop/db:1")
}
fn cache() -> Identity {
    image("sha-cache", "shop/cache:1")
}

/// Objects for web, db, cache, the data subnet (db and cache inside) and
/// sshd; web and db enforcing models that know web → db:5432 and
/// web → cache:6379 (cache's inbound side knows web too).
fn shop(mode: Mode) -> VerdictTable {
    let mut table = table(mode);
    table.objects = vec![
        image_object("web", "sha-web"),
        image_object("db", "sha-db"),
        image_object("cache", "sha-cache"),
        subnet("data", &["10.2.0.0/16"]),
        host_app("ssh", "sshd"),
    ];
    table.models = vec![
        model(
            "sha-web",
            ModelState::Enforcing,
            vec![],
            vec![learned(&db(), 5432), learned(&cache(), 6379)],
        ),
        model("sha-db", ModelState::Enforcing, vec![learned(&web(), 5432)], vec![]),
        model("sha-cache", ModelState::Enforcing, vec![learned(&web(), 6379)], vec![]),
    ];
    table
}

#[test]
fn mode_disabled_observes_whatever_the_rules_say() {
    for mode in [Mode::Disabled, Mode::Unspecified] {
        let mut table = shop(mode);
        table.rules = vec![{
            let mut rule = rule("r1", "web", RuleEffect::Prevent);
            rule.destinations = vec![deny("data", &[], RuleEffect::Prevent)];
            rule
        }];
        let (web, db) = (web(), db());
        let unknown = connection(&web, WEB, &db, DB, 23, Scope::Egress);
        assert_decides(&table, &unknown, Verdict::Observe, DecidedBy::Mode);
    }
    // An unknown mode value reads as disabled too.
    let mut table = shop(Mode::Alert);
    table.mode = 42;
    let (web, db) = (web(), db());
    let unknown = connection(&web, WEB, &db, DB, 23, Scope::Egress);
    assert_decides(&table, &unknown, Verdict::Observe, DecidedBy::Mode);
}

#[test]
fn subnet_rule_that_prevents_beats_a_rule_allowing_the_image_inside() {
    let mut table = shop(Mode::Alert);
    let mut allowing = rule("allow-db", "web", RuleEffect::Alert);
    allowing.destinations = vec![allow("db", &[(5432, 0)])];
    let mut denying = rule("no-data", "web", RuleEffect::Alert);
    denying.destinations = vec![deny("data", &[(5000, 6000)], RuleEffect::Prevent)];
    table.rules = vec![allowing, denying];
    let (web, db) = (web(), db());
    let to_db = connection(&web, WEB, &db, DB, 5432, Scope::Egress);
    assert_decides(&table, &to_db, Verdict::Prevent, DecidedBy::Rule("no-data"));

    // Outside the denied ports the allowing rule holds.
    let mut table = table.clone();
    table.rules[1].destinations[0].ports = vec![PortRange { first: 22, last: 0 }];
    assert_decides(&table, &to_db, Verdict::Allow, DecidedBy::Rule("allow-db"));
}

#[test]
fn prevent_beats_alert_among_denying_destinations_and_the_first_rule_names_it() {
    let mut table = shop(Mode::Alert);
    let mut alerting = rule("alerting", "web", RuleEffect::Alert);
    alerting.destinations = vec![deny("data", &[], RuleEffect::Alert)];
    let mut preventing = rule("preventing", "web", RuleEffect::Alert);
    preventing.destinations = vec![deny("db", &[], RuleEffect::Prevent)];
    let mut preventing_too = rule("preventing-too", "web", RuleEffect::Alert);
    preventing_too.destinations = vec![deny("data", &[], RuleEffect::Prevent)];
    table.rules = vec![alerting.clone(), preventing, preventing_too];
    let (web, db, cache) = (web(), db(), cache());
    let to_db = connection(&web, WEB, &db, DB, 5432, Scope::Egress);
    assert_decides(&table, &to_db, Verdict::Prevent, DecidedBy::Rule("preventing"));
    // cache is in the subnet but not db: the later subnet rule prevents.
    let to_cache = connection(&web, WEB, &cache, CACHE, 6379, Scope::Egress);
    assert_decides(&table, &to_cache, Verdict::Prevent, DecidedBy::Rule("preventing-too"));
    // Alerts alone: the first alerting rule.
    table.rules = vec![alerting.clone(), alerting];
    table.rules[1].id = "second".into();
    assert_decides(&table, &to_cache, Verdict::Alert, DecidedBy::Rule("alerting"));
}

#[test]
fn an_allowed_destination_allows_even_an_unknown_connection_in_prevent() {
    let mut table = shop(Mode::Prevent);
    let mut rule = rule("web-out", "web", RuleEffect::Prevent);
    rule.destinations = vec![allow("db", &[(22, 0), (8000, 8100)]), allow("data", &[(9000, 0)])];
    table.rules = vec![rule];
    let (web, db, cache) = (web(), db(), cache());
    for port in [22, 8000, 8050, 8100] {
        let to_db = connection(&web, WEB, &db, DB, port, Scope::Both);
        assert_decides(&table, &to_db, Verdict::Allow, DecidedBy::Rule("web-out"));
    }
    // A subnet destination allows by address.
    let to_cache = connection(&web, WEB, &cache, CACHE, 9000, Scope::Egress);
    assert_decides(&table, &to_cache, Verdict::Allow, DecidedBy::Rule("web-out"));
    // Not among the destinations (port, protocol): the rule's effect.
    let other_port = connection(&web, WEB, &db, DB, 8101, Scope::Egress);
    assert_decides(&table, &other_port, Verdict::Prevent, DecidedBy::Rule("web-out"));
    let mut udp = connection(&web, WEB, &db, DB, 22, Scope::Egress);
    udp.protocol = Protocol::Udp;
    assert_decides(&table, &udp, Verdict::Prevent, DecidedBy::Rule("web-out"));
}

#[test]
fn allow_learned_allows_known_connections_and_learns_where_learning() {
    let mut table = shop(Mode::Prevent);
    let mut rule = rule("web-learned", "web", RuleEffect::Prevent);
    rule.allow_learned = true;
    table.rules = vec![rule];
    let (web, db) = (web(), db());
    let known = connection(&web, WEB, &db, DB, 5432, Scope::Both);
    assert_decides(&table, &known, Verdict::Allow, DecidedBy::Rule("web-learned"));
    let unknown = connection(&web, WEB, &db, DB, 5433, Scope::Both);
    assert_decides(&table, &unknown, Verdict::Prevent, DecidedBy::Rule("web-learned"));

    // A learning destination side: known, and learned.
    table.models[1].state = ModelState::Learning as i32;
    assert_decides(&table, &known, Verdict::Learn, DecidedBy::Rule("web-learned"));
    // The enforcing source must still know it.
    let new_port = connection(&web, WEB, &db, DB, 5999, Scope::Both);
    assert_decides(&table, &new_port, Verdict::Prevent, DecidedBy::Rule("web-learned"));
    // Without allow_learned, a known connection gets the effect.
    table.rules[0].allow_learned = false;
    assert_decides(&table, &known, Verdict::Prevent, DecidedBy::Rule("web-learned"));
}

#[test]
fn the_rule_effect_applies_to_the_rest_of_the_sources_traffic() {
    let (web, db) = (web(), db());
    let unknown = connection(&web, WEB, &db, DB, 23, Scope::Egress);
    for (effect, verdict) in [
        (RuleEffect::Alert, Verdict::Alert),
        (RuleEffect::Prevent, Verdict::Prevent),
        // Unspecified or unknown fallbacks alert.
        (RuleEffect::Unspecified, Verdict::Alert),
    ] {
        for mode in [Mode::Alert, Mode::Prevent] {
            let mut table = shop(mode);
            table.rules = vec![rule("fallback", "web", effect)];
            assert_decides(&table, &unknown, verdict, DecidedBy::Rule("fallback"));
        }
    }
    let mut table = shop(Mode::Alert);
    table.rules = vec![rule("fallback", "web", RuleEffect::Alert)];
    table.rules[0].effect = 9;
    assert_decides(&table, &unknown, Verdict::Alert, DecidedBy::Rule("fallback"));
    // Several rules: the first preventing one, else the first.
    table.rules = vec![
        rule("a1", "web", RuleEffect::Alert),
        rule("p1", "web", RuleEffect::Prevent),
        rule("p2", "web", RuleEffect::Prevent),
    ];
    assert_decides(&table, &unknown, Verdict::Prevent, DecidedBy::Rule("p1"));
    table.rules.remove(2);
    table.rules.remove(1);
    table.rules.push(rule("a2", "web", RuleEffect::Alert));
    assert_decides(&table, &unknown, Verdict::Alert, DecidedBy::Rule("a1"));
    // Even a known connection, when no rule allows learned ones.
    let known = connection(&web, WEB, &db, DB, 5432, Scope::Egress);
    assert_decides(&table, &known, Verdict::Alert, DecidedBy::Rule("a1"));
}

#[test]
fn disabled_rules_and_rules_of_missing_objects_take_no_part() {
    let mut table = shop(Mode::Prevent);
    let mut disabled = rule("off", "web", RuleEffect::Prevent);
    disabled.disabled = true;
    let mut missing_source = rule("ghost", "nobody", RuleEffect::Prevent);
    missing_source.destinations = vec![allow("db", &[])];
    let mut missing_destination = rule("dangling", "db", RuleEffect::Alert);
    missing_destination.destinations = vec![allow("nowhere", &[]), deny("nothing", &[], RuleEffect::Prevent)];
    table.rules = vec![disabled, missing_source, missing_destination];
    let (web, db) = (web(), db());
    // web has no enabled rule: the model decides.
    let known = connection(&web, WEB, &db, DB, 5432, Scope::Egress);
    assert_decides(&table, &known, Verdict::Allow, DecidedBy::Model("sha-web"));
    // db's rule has only destinations that match nothing: its effect.
    let from_db = connection(&db, DB, &web, WEB, 80, Scope::Egress);
    assert_decides(&table, &from_db, Verdict::Alert, DecidedBy::Rule("dangling"));
}

#[test]
fn a_known_connection_with_no_rule_is_allowed_by_the_model() {
    let table = shop(Mode::Prevent);
    let (web, db) = (web(), db());
    let known = connection(&web, WEB, &db, DB, 5432, Scope::Both);
    assert_decides(&table, &known, Verdict::Allow, DecidedBy::Model("sha-web"));
    let ingress = connection(&web, WEB, &db, DB, 5432, Scope::Ingress);
    assert_decides(&table, &ingress, Verdict::Allow, DecidedBy::Model("sha-db"));

    // A learning side learns; an image with no model is learning.
    let mut learning = table.clone();
    learning.models[0].state = ModelState::Learning as i32;
    let new = connection(&web, WEB, &db, DB, 9999, Scope::Egress);
    assert_decides(&learning, &new, Verdict::Learn, DecidedBy::Model("sha-web"));
    let fresh = image("sha-new", "shop/new:1");
    let from_fresh = connection(&fresh, WEB, &db, DB, 9999, Scope::Egress);
    assert_decides(&table, &from_fresh, Verdict::Learn, DecidedBy::Default);
}

#[test]
fn an_unknown_connection_with_no_rule_gets_the_global_mode() {
    let (web, db) = (web(), db());
    let unknown = connection(&web, WEB, &db, DB, 23, Scope::Egress);
    assert_decides(&shop(Mode::Alert), &unknown, Verdict::Alert, DecidedBy::Mode);
    assert_decides(&shop(Mode::Prevent), &unknown, Verdict::Prevent, DecidedBy::Mode);
    // The learned protocol counts: 5432 was learned over TCP, not UDP.
    let mut udp = connection(&web, WEB, &db, DB, 5432, Scope::Egress);
    udp.protocol = Protocol::Udp;
    assert_decides(&shop(Mode::Prevent), &udp, Verdict::Prevent, DecidedBy::Mode);
    // An unspecified protocol reads as TCP for learned connections.
    udp.protocol = Protocol::Unspecified;
    assert_decides(&shop(Mode::Prevent), &udp, Verdict::Allow, DecidedBy::Model("sha-web"));
}

#[test]
fn host_traffic_follows_the_host_mode_and_container_traffic_the_mode() {
    let mut table = shop(Mode::Prevent);
    table.host_mode = Mode::Disabled as i32;
    let (sshd, web) = (app("sshd"), web());
    let from_host = connection(&sshd, "10.0.0.1", &web, WEB, 80, Scope::Egress);
    assert_decides(&table, &from_host, Verdict::Observe, DecidedBy::Mode);
    // Ingress into a host app: the destination is the subject.
    let into_host = connection(&web, WEB, &sshd, "10.0.0.1", 22, Scope::Ingress);
    assert_decides(&table, &into_host, Verdict::Observe, DecidedBy::Mode);
    // The container side of the same pair follows the container mode.
    let into_web = connection(&sshd, "10.0.0.1", &web, WEB, 80, Scope::Ingress);
    assert_decides(&table, &into_web, Verdict::Prevent, DecidedBy::Mode);

    // Host rules: app → subnet, in the host mode.
    table.host_mode = Mode::Alert as i32;
    table.mode = Mode::Disabled as i32;
    let mut host_rule = rule("ssh-out", "ssh", RuleEffect::Prevent);
    host_rule.host = true;
    host_rule.destinations = vec![allow("data", &[(5432, 0)])];
    table.rules = vec![host_rule];
    let db = db();
    let to_db = connection(&sshd, "10.0.0.1", &db, DB, 5432, Scope::Egress);
    assert_decides(&table, &to_db, Verdict::Allow, DecidedBy::Rule("ssh-out"));
    let elsewhere = connection(&sshd, "10.0.0.1", &db, OUTSIDE, 5432, Scope::Egress);
    assert_decides(&table, &elsewhere, Verdict::Prevent, DecidedBy::Rule("ssh-out"));
    // A host app has no model: with no rule, nothing checks it.
    let other = app("cron");
    let from_cron = connection(&other, "10.0.0.1", &db, DB, 1, Scope::Egress);
    assert_decides(&table, &from_cron, Verdict::Allow, DecidedBy::Default);
}

#[test]
fn a_node_checks_only_the_sides_it_hosts() {
    let mut table = shop(Mode::Prevent);
    // db's inbound side does not know web on 6000; web's outbound does.
    table.models[0].outbound.push(learned(&db(), 6000));
    let (web, db) = (web(), db());
    let egress = connection(&web, WEB, &db, DB, 6000, Scope::Egress);
    assert_decides(&table, &egress, Verdict::Allow, DecidedBy::Model("sha-web"));
    let ingress = connection(&web, WEB, &db, DB, 6000, Scope::Ingress);
    assert_decides(&table, &ingress, Verdict::Prevent, DecidedBy::Mode);
    let both = connection(&web, WEB, &db, DB, 6000, Scope::Both);
    assert_decides(&table, &both, Verdict::Prevent, DecidedBy::Mode);

    // A learning destination cannot teach an enforcing source: still
    // unknown on the source's side.
    table.models[1].state = ModelState::Learning as i32;
    let new_port = connection(&web, WEB, &db, DB, 7000, Scope::Both);
    assert_decides(&table, &new_port, Verdict::Prevent, DecidedBy::Mode);
    // Known to the enforcing source, the learning destination learns.
    assert_decides(&table, &both, Verdict::Learn, DecidedBy::Model("sha-web"));
    let ingress_new = connection(&web, WEB, &db, DB, 7000, Scope::Ingress);
    assert_decides(&table, &ingress_new, Verdict::Learn, DecidedBy::Model("sha-db"));
}

#[test]
fn unknown_and_object_peers_are_learned_by_kind() {
    let mut table = shop(Mode::Prevent);
    let outside = Identity::Object {
        name: "payments".into(),
    };
    table.objects.push(subnet("payments", &["192.0.2.0/24"]));
    table.models[0].outbound.push(learned(&outside, 443));
    table.models[1].inbound.push(learned(&Identity::Unknown, 5432));
    let (web, db) = (web(), db());
    let to_payments = connection(&web, WEB, &outside, OUTSIDE, 443, Scope::Egress);
    assert_decides(&table, &to_payments, Verdict::Allow, DecidedBy::Model("sha-web"));
    let to_unknown = connection(&web, WEB, &Identity::Unknown, OUTSIDE, 443, Scope::Egress);
    assert_decides(&table, &to_unknown, Verdict::Prevent, DecidedBy::Mode);
    let from_unknown = connection(&Identity::Unknown, OUTSIDE, &db, DB, 5432, Scope::Ingress);
    assert_decides(&table, &from_unknown, Verdict::Allow, DecidedBy::Model("sha-db"));
}

#[test]
fn image_objects_match_by_id_by_name_and_by_name_prefix() {
    let mut table = shop(Mode::Alert);
    table.objects.push(image_name_object("any-web", "shop/web:*"));
    table.objects.push(image_name_object("db-1", "shop/db:1"));
    let mut by_prefix = rule("by-prefix", "any-web", RuleEffect::Prevent);
    by_prefix.destinations = vec![allow("db-1", &[(5432, 0)])];
    table.rules = vec![by_prefix];
    let (web, db) = (web(), db());
    let web2 = image("sha-web2", "shop/web:2");
    let to_db = connection(&web2, WEB, &db, DB, 5432, Scope::Egress);
    assert_decides(&table, &to_db, Verdict::Allow, DecidedBy::Rule("by-prefix"));
    let other_port = connection(&web, WEB, &db, DB, 80, Scope::Egress);
    assert_decides(&table, &other_port, Verdict::Prevent, DecidedBy::Rule("by-prefix"));
    // db:2 is not db-1 by name.
    let db2 = image("sha-db", "shop/db:2");
    let to_db2 = connection(&web, WEB, &db2, DB, 5432, Scope::Egress);
    assert_decides(&table, &to_db2, Verdict::Prevent, DecidedBy::Rule("by-prefix"));
    // Not shop/web: no rule, the model and mode decide.
    let to_web = connection(&db, DB, &web, WEB, 80, Scope::Egress);
    assert_decides(&table, &to_web, Verdict::Alert, DecidedBy::Mode);
}

#[test]
fn port_ranges_and_protocols_read_as_specified() {
    let mut table = shop(Mode::Alert);
    let mut rule = rule("ports", "web", RuleEffect::Prevent);
    let mut udp_only = allow("db", &[(53, 0)]);
    udp_only.protocol = Protocol::Udp as i32;
    let mut any = allow("db", &[(100, 200)]);
    any.protocol = Protocol::Any as i32;
    let mut unspecified = allow("db", &[(300, 0)]);
    unspecified.protocol = Protocol::Unspecified as i32;
    // last < first: an empty range; last 0: just first; 0..0: port 0.
    rule.destinations = vec![
        udp_only,
        any,
        unspecified,
        allow("db", &[(500, 400)]),
        allow("db", &[(0, 0)]),
    ];
    table.rules = vec![rule];
    let (web, db) = (web(), db());
    let at = |port: u16, protocol: Protocol| {
        let mut c = connection(&web, WEB, &db, DB, port, Scope::Egress);
        c.protocol = protocol;
        c
    };
    let allowed = [
        (53, Protocol::Udp),
        (100, Protocol::Tcp),
        (200, Protocol::Icmp),
        (150, Protocol::Unspecified),
        (300, Protocol::Any),
        (0, Protocol::Tcp),
    ];
    for (port, protocol) in allowed {
        assert_decides(&table, &at(port, protocol), Verdict::Allow, DecidedBy::Rule("ports"));
    }
    // A TCP destination does not admit an unspecified-protocol connection.
    let refused = [
        (53, Protocol::Tcp),
        (201, Protocol::Tcp),
        (450, Protocol::Tcp),
        (0, Protocol::Unspecified),
        (301, Protocol::Udp),
    ];
    for (port, protocol) in refused {
        assert_decides(&table, &at(port, protocol), Verdict::Prevent, DecidedBy::Rule("ports"));
    }
}

#[test]
fn unknown_destination_effects_restrict_rather_than_allow() {
    let mut table = shop(Mode::Alert);
    let mut rule = rule("newer", "web", RuleEffect::Alert);
    let mut future = deny("db", &[], RuleEffect::Prevent);
    future.effect = 7;
    rule.destinations = vec![allow("db", &[]), future];
    table.rules = vec![rule];
    let (web, db) = (web(), db());
    let to_db = connection(&web, WEB, &db, DB, 5432, Scope::Egress);
    assert_decides(&table, &to_db, Verdict::Alert, DecidedBy::Rule("newer"));
}

#[test]
fn the_first_model_of_an_image_is_its_model() {
    let mut table = shop(Mode::Prevent);
    table
        .models
        .insert(0, model("sha-web", ModelState::Learning, vec![], vec![]));
    let (web, db) = (web(), db());
    let unknown = connection(&web, WEB, &db, DB, 23, Scope::Egress);
    assert_decides(&table, &unknown, Verdict::Learn, DecidedBy::Model("sha-web"));
    table.models.swap(0, 1);
    assert_decides(&table, &unknown, Verdict::Prevent, DecidedBy::Mode);
}
