//! The data plane against the real kernel: iptables chains, NFQUEUE and
//! network namespaces standing in for containers (root needed).
//!
//! Tests run in parallel with each other and with other test binaries, so
//! each one claims a block of queue numbers and a chain prefix of its own
//! through an exclusive `flock` (like the testkit's lab subnets), and its
//! rules match only its own lab's addresses.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::net::{IpAddr, SocketAddrV4};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cnnf_agent::dataplane::{
    ChainConfig, Chains, Decider, Hook, QueueConfig, QueueError, QueueOptions, QueueSet, Syn, Verdict,
};
use cnnf_testkit::netns::{Lab, LOCK_DIR};

/// Number of blocks of queue numbers (one per concurrently running test).
const BLOCKS: u16 = 200;
/// Queue numbers per block.
const QUEUES_PER_BLOCK: u16 = 4;
/// First queue number used by these tests.
const FIRST_QUEUE: u16 = 30000;
/// A connect to a dropped port gives up after this long.
const SHORT: Duration = Duration::from_millis(1500);
/// A connect that should succeed may take this long on a loaded machine.
const PATIENT: Duration = Duration::from_secs(10);

/// A claim on queue numbers and a chain prefix, held by an exclusive
/// `flock`; removes this prefix's chains on drop, and on claiming removes
/// whatever a dead previous holder left.
struct Claim {
    block: u16,
    _lock: File,
}

impl Claim {
    fn acquire() -> Claim {
        fs::create_dir_all(LOCK_DIR).unwrap();
        let start = (std::process::id() as u16).wrapping_mul(7) % BLOCKS;
        for offset in 0..BLOCKS {
            let block = (start + offset) % BLOCKS;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(format!("{LOCK_DIR}/nfqueue-{block}.lock"))
                .unwrap();
            if file.try_lock().is_ok() {
                let claim = Claim { block, _lock: file };
                claim.cleanup();
                return claim;
            }
        }
        panic!("all {BLOCKS} NFQUEUE test blocks are in use (locks in {LOCK_DIR})");
    }

    /// The chain prefix of this claim (fixed width, so no prefix is
    /// another's prefix).
    fn prefix(&self) -> String {
        format!("CNT{:03}Q", self.block)
    }

    fn queues(&self, count: u16) -> RangeInclusive<u16> {
        assert!((1..=QUEUES_PER_BLOCK).contains(&count));
        let first = FIRST_QUEUE + self.block * QUEUES_PER_BLOCK;
        first..=first + count - 1
    }

    fn chain_config(&self, queues: u16, fail_open: bool, hooks: Vec<Hook>) -> ChainConfig {
        ChainConfig {
            prefix: self.prefix(),
            queues: self.queues(queues),
            fail_open,
            hooks,
            // The raw data plane, unlimited (the agent's own tests cover the
            // rate limit).
            syn_rate_per_source: 0,
            syn_burst_per_source: 0,
        }
    }

    fn queue_config(&self, queues: u16) -> QueueConfig {
        QueueConfig {
            queues: self.queues(queues),
            max_len: 4096,
            copy_range: 128,
            recv_buffer_bytes: 1 << 20,
        }
    }

    fn cleanup(&self) {
        let config = self.chain_config(1, true, vec![Hook::Forward]);
        Chains::install(config).unwrap().remove().unwrap();
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Drops SYNs to one port, accepts the rest, and counts what it saw.
struct PortDecider {
    drop_port: u16,
    decided: AtomicU64,
}

impl PortDecider {
    fn new(drop_port: u16) -> Arc<PortDecider> {
        Arc::new(PortDecider {
            drop_port,
            decided: AtomicU64::new(0),
        })
    }
}

impl Decider for PortDecider {
    fn decide(&self, syn: &Syn) -> Verdict {
        self.decided.fetch_add(1, Ordering::Relaxed);
        if syn.destination_port == self.drop_port {
            Verdict::Drop
        } else {
            Verdict::Accept
        }
    }
}

fn save(command: &str) -> String {
    let output = std::process::Command::new(command)
        .args(["-t", "filter"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{command} failed");
    String::from_utf8(output.stdout).unwrap()
}

fn count_lines(saved: &str, starting: &str) -> usize {
    saved.lines().filter(|l| l.starts_with(starting)).count()
}

fn addresses(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn decider_drops_one_port_and_accepts_the_others() {
    let claim = Claim::acquire();
    let lab = Lab::new(2).unwrap();
    let (client, server) = (lab.container(0), lab.container(1));
    let allowed = server.tcp_listen(0).unwrap();
    let denied = server.tcp_listen(0).unwrap();

    let mut chains = Chains::install(claim.chain_config(2, false, vec![Hook::Forward])).unwrap();
    chains.set_addresses(&[IpAddr::V4(server.ip())].into()).unwrap();
    let decider = PortDecider::new(denied.port());
    let queues = QueueSet::start(claim.queue_config(2), decider.clone()).unwrap();

    client
        .tcp_connect(SocketAddrV4::new(server.ip(), allowed.port()), PATIENT)
        .expect("the allowed port connects");
    let refused = client.tcp_connect(SocketAddrV4::new(server.ip(), denied.port()), SHORT);
    assert!(refused.is_err(), "the denied port must not connect: {refused:?}");

    let total = queues.stats().total();
    assert!(total.accepted >= 1, "{total:?}");
    assert!(total.dropped >= 1, "{total:?}");
    assert_eq!(total.packets, total.accepted + total.dropped);
    assert_eq!(total.undecodable, 0);
    assert_eq!(total.packets, decider.decided.load(Ordering::Relaxed));
    let kernel = total.kernel.expect("the kernel lists the bound queues");
    assert!(kernel.id_sequence >= total.packets, "{kernel:?} vs {total:?}");
    assert_eq!(kernel.queue_dropped + kernel.user_dropped, 0);
    // A queued SYN is matched by a rule; what was decided was matched.
    assert!(chains.matched_syns().unwrap() >= total.packets);
    assert_eq!(allowed.accepted(), 1);
    assert_eq!(denied.accepted(), 0);

    queues.stop();
    chains.remove().unwrap();
}

#[test]
fn set_addresses_reconciles_and_install_adopts() {
    let claim = Claim::acquire();
    let prefix = claim.prefix();
    let hooks = vec![Hook::Forward, Hook::Input, Hook::Output];
    let mut chains = Chains::install(claim.chain_config(1, true, hooks.clone())).unwrap();

    let first = addresses(&["198.51.100.7", "2001:db8::7"]);
    chains.set_addresses(&first).unwrap();
    chains.set_addresses(&first).unwrap(); // idempotent
    for suffix in ["FWD", "IN", "OUT"] {
        let chain = format!("{prefix}-{suffix}");
        let v4 = save("iptables-save");
        let v6 = save("ip6tables-save");
        for direction in ["-s", "-d"] {
            assert_eq!(
                count_lines(&v4, &format!("-A {chain} {direction} 198.51.100.7/32 ")),
                1,
                "{v4}"
            );
            assert_eq!(
                count_lines(&v6, &format!("-A {chain} {direction} 2001:db8::7/128 ")),
                1,
                "{v6}"
            );
        }
        assert_eq!(count_lines(&v4, &format!("-A {chain} ")), 2, "{v4}");
        assert_eq!(count_lines(&v6, &format!("-A {chain} ")), 2, "{v6}");
        assert!(v4.contains("--queue-bypass"));
    }

    // Add one address, remove another.
    chains
        .set_addresses(&addresses(&["198.51.100.8", "2001:db8::7"]))
        .unwrap();
    let v4 = save("iptables-save");
    assert_eq!(count_lines(&v4, &format!("-A {prefix}-FWD -s 198.51.100.8/32 ")), 1);
    assert_eq!(count_lines(&v4, &format!("-A {prefix}-FWD -d 198.51.100.8/32 ")), 1);
    assert!(!v4.contains("198.51.100.7"), "{v4}");
    assert_eq!(count_lines(&save("ip6tables-save"), &format!("-A {prefix}-FWD ")), 2);

    // A restarted agent adopts: no second jump, rules kept until it
    // reconciles.
    drop(chains);
    let adopted = Chains::install(claim.chain_config(1, true, hooks)).unwrap();
    for saved in [save("iptables-save"), save("ip6tables-save")] {
        for (builtin, suffix) in [("FORWARD", "FWD"), ("INPUT", "IN"), ("OUTPUT", "OUT")] {
            assert_eq!(
                count_lines(&saved, &format!("-A {builtin} -j {prefix}-{suffix}")),
                1,
                "{saved}"
            );
        }
        assert_eq!(count_lines(&saved, &format!("-A {prefix}-FWD ")), 2, "{saved}");
    }

    // Dropping a hook from the configuration removes its chain and jump.
    drop(adopted);
    let fewer = Chains::install(claim.chain_config(1, true, vec![Hook::Forward])).unwrap();
    let v4 = save("iptables-save");
    assert!(
        !v4.contains(&format!("{prefix}-IN")) && !v4.contains(&format!("{prefix}-OUT")),
        "{v4}"
    );
    assert_eq!(count_lines(&v4, &format!("-A FORWARD -j {prefix}-FWD")), 1);

    fewer.remove().unwrap();
    for saved in [save("iptables-save"), save("ip6tables-save")] {
        assert!(!saved.contains(&prefix), "{saved}");
    }
}

#[test]
fn without_an_agent_fail_open_connects_and_fail_closed_does_not() {
    let claim = Claim::acquire();
    let lab = Lab::new(2).unwrap();
    let (client, server) = (lab.container(0), lab.container(1));
    let listener = server.tcp_listen(0).unwrap();
    let target = SocketAddrV4::new(server.ip(), listener.port());
    let workload: BTreeSet<IpAddr> = [IpAddr::V4(server.ip())].into();

    let mut open = Chains::install(claim.chain_config(1, true, vec![Hook::Forward])).unwrap();
    open.set_addresses(&workload).unwrap();
    client
        .tcp_connect(target, PATIENT)
        .expect("fail-open lets the SYN through");
    // The bypassed SYN is counted by its rule, not by any queue.
    assert!(open.matched_syns().unwrap() >= 1);
    open.remove().unwrap();

    let mut closed = Chains::install(claim.chain_config(1, false, vec![Hook::Forward])).unwrap();
    closed.set_addresses(&workload).unwrap();
    let result = client.tcp_connect(target, SHORT);
    assert!(result.is_err(), "fail-closed must drop the SYN: {result:?}");
    assert!(closed.matched_syns().unwrap() >= 1);
    closed.remove().unwrap();
    assert_eq!(listener.accepted(), 1);
}

#[test]
fn a_queue_is_bound_once_and_free_again_after_stop() {
    let claim = Claim::acquire();
    let decider = PortDecider::new(0);
    let first = QueueSet::start(claim.queue_config(2), decider.clone()).unwrap();
    assert_eq!(first.queues(), claim.queues(2).collect::<Vec<_>>());
    let busy = QueueSet::start(claim.queue_config(1), decider.clone());
    assert!(matches!(busy, Err(QueueError::Bind { .. })), "{busy:?}");
    first.stop();
    let again = QueueSet::start_with(
        claim.queue_config(2),
        QueueOptions {
            fail_open_when_full: true,
            ..QueueOptions::default()
        },
        decider,
    )
    .unwrap();
    let stats = again.stats();
    assert_eq!(stats.queues.len(), 2);
    assert!(stats.queues.iter().all(|q| q.kernel.is_some()), "{stats:?}");
    again.stop();
}

#[test]
fn a_syn_flood_is_decided_and_the_agent_keeps_serving() {
    let claim = Claim::acquire();
    let lab = Lab::new(2).unwrap();
    let (attacker, server) = (lab.container(0), lab.container(1));
    let listener = server.tcp_listen(0).unwrap();
    let target = SocketAddrV4::new(server.ip(), listener.port());

    let mut chains = Chains::install(claim.chain_config(2, false, vec![Hook::Forward])).unwrap();
    chains.set_addresses(&[IpAddr::V4(server.ip())].into()).unwrap();
    let decider = PortDecider::new(0);
    let queues = QueueSet::start(claim.queue_config(2), decider.clone()).unwrap();

    let output = attacker
        .exec(
            "timeout",
            &[
                "3",
                "hping3",
                "--flood",
                "-q",
                "-S",
                "-p",
                &listener.port().to_string(),
                &server.ip().to_string(),
            ],
        )
        .expect("hping3 (Debian package hping3) must be installed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("No such file") && !stderr.contains("not found"),
        "hping3 is missing: {stderr}"
    );

    let during = queues.stats().total();
    eprintln!("after the flood: {during:?}");
    assert!(during.packets > 100, "the flood was decided: {during:?}");
    assert_eq!(during.undecodable, 0);
    let kernel = during.kernel.expect("kernel counters");
    // Everything the kernel queued was decided or dropped by the kernel
    // and counted (a few may still be in flight).
    assert!(kernel.id_sequence >= during.packets, "{kernel:?}");

    client_connects_after_flood(attacker, target);
    let after = queues.stats().total();
    assert!(after.packets > during.packets, "the connect was decided too");
    queues.stop();
    chains.remove().unwrap();
}

fn client_connects_after_flood(client: &cnnf_testkit::netns::FakeContainer, target: SocketAddrV4) {
    client
        .tcp_connect(target, PATIENT)
        .expect("a normal connect succeeds after the flood");
}
