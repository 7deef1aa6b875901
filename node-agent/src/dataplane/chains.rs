//! The agent's own iptables chains, which send the SYNs of the node's
//! workloads to NFQUEUE, rate-limited per source.
//!
//! Layout, for IPv4 (`iptables-restore`) and IPv6 (`ip6tables-restore`)
//! alike, all in the `filter` table:
//!
//! - one chain per hook, `<prefix>-FWD`, `<prefix>-IN`, `<prefix>-OUT`, each
//!   reached by exactly one jump at the top of `FORWARD`, `INPUT` or
//!   `OUTPUT`. For each workload address `A` it holds two rules, `-s A` and
//!   `-d A`; `FWD` and `IN` also hold, for each workload's host-side
//!   interface `I`, `-i I` (routed veths) and `-m physdev --physdev-in I`
//!   (bridge ports), so a SYN a workload sends from an address nobody told
//!   the agent about is queued all the same. Every rule is
//!   `-p tcp --syn -m conntrack --ctstate NEW -j <prefix>-SYN`.
//! - `<prefix>-SYN`, which every queued SYN passes: first a `hashlimit`
//!   rule per source address (`--hashlimit-above R/sec --hashlimit-burst B
//!   --hashlimit-mode srcip -j DROP`, left out when the rate is 0), so one
//!   workload flooding SYNs cannot fill the queue for the others; then the
//!   `NFQUEUE` rule to the configured queues (`--queue-balance a:b
//!   --queue-cpu-fanout`, or `--queue-num a` for one queue), plus
//!   `--queue-bypass` when failing open.
//!
//! Established traffic never matches, so it never leaves the kernel.
//!
//! Why `iptables-restore --noflush`: one process per change instead of one
//! per rule (the `iptables` crate costs ~7 ms a rule), and the kernel swaps
//! the whole chain contents in one transaction, so a reconcile never opens a
//! window in which a workload is not enforced. The commands are whatever
//! `iptables-restore` the host uses; nft and legacy backends must not be
//! mixed on one host.
//!
//! Fail-open or fail-closed is the `fail_open` setting: with
//! `--queue-bypass` the kernel accepts SYNs while no agent listens on the
//! queue; without it, it drops them. Neither is counted by a queue (no
//! queue instance exists then), but the rules of `<prefix>-SYN` count every
//! SYN they see ([`Chains::counters`]): the rate-limit rule the SYNs it
//! dropped, the NFQUEUE rule every SYN handed to the queues. The hook
//! chains are rewritten on every reconcile (their counters restart), the
//! `SYN` chain only at [`Chains::install`], so its counters run for as long
//! as the chains are installed.
//!
//! Restarts: [`Chains::install`] adopts hook chains that already exist (it
//! does not flush them, so the node stays enforced while the agent
//! restarts) and adds a jump only where none exists, removing duplicates.
//! Nothing removes the chains but [`Chains::remove`] or [`remove_prefix`]
//! (the agent's `--remove-chains`): an agent that stops leaves them, so
//! with fail-closed no SYN passes unchecked while it is away.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::process::{Command, Stdio};

/// Longest chain name iptables accepts.
pub const MAX_CHAIN_NAME: usize = 28;

/// Longest interface name the kernel (and so iptables) accepts.
pub const MAX_INTERFACE_NAME: usize = 15;

/// Longest `--hashlimit-name` the kernel accepts.
const MAX_HASHLIMIT_NAME: usize = 15;

/// Highest per-source SYN rate `hashlimit` takes (per second).
pub const MAX_SYN_RATE: u32 = 1_000_000;

/// Suffix of the chain every queued SYN passes (rate limit, then NFQUEUE).
const SYN_SUFFIX: &str = "SYN";

/// A netfilter hook the agent enforces at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// Traffic routed or bridged through the host: containers on a bridge
    /// or routed veths.
    Forward,
    /// Traffic to the host's own sockets (host-network workloads as servers).
    Input,
    /// Traffic from the host's own sockets (host-network workloads as clients).
    Output,
}

impl Hook {
    /// Every hook.
    pub const ALL: [Hook; 3] = [Hook::Forward, Hook::Input, Hook::Output];

    /// The built-in chain of the `filter` table this hook jumps from.
    pub fn builtin_chain(self) -> &'static str {
        match self {
            Hook::Forward => "FORWARD",
            Hook::Input => "INPUT",
            Hook::Output => "OUTPUT",
        }
    }

    /// The suffix of the agent's chain for this hook.
    pub fn suffix(self) -> &'static str {
        match self {
            Hook::Forward => "FWD",
            Hook::Input => "IN",
            Hook::Output => "OUT",
        }
    }
}

/// IPv4 or IPv6: which pair of iptables commands applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// `iptables-save` / `iptables-restore`.
    Ipv4,
    /// `ip6tables-save` / `ip6tables-restore`.
    Ipv6,
}

impl Family {
    /// Both families.
    pub const ALL: [Family; 2] = [Family::Ipv4, Family::Ipv6];

    /// The command that prints the rules.
    pub fn save_command(self) -> &'static str {
        match self {
            Family::Ipv4 => "iptables-save",
            Family::Ipv6 => "ip6tables-save",
        }
    }

    /// The command that lists one chain with its counters.
    pub fn list_command(self) -> &'static str {
        match self {
            Family::Ipv4 => "iptables",
            Family::Ipv6 => "ip6tables",
        }
    }

    /// The command that applies a batch of rules.
    pub fn restore_command(self) -> &'static str {
        match self {
            Family::Ipv4 => "iptables-restore",
            Family::Ipv6 => "ip6tables-restore",
        }
    }

    fn of(address: &IpAddr) -> Family {
        match address {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }
}

/// What the agent's chains look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainConfig {
    /// Start of every chain name (`<prefix>-FWD`, ...): letters, digits,
    /// `_` and `-`, at most 24 characters. One agent per prefix.
    pub prefix: String,
    /// The queues SYNs are balanced over; the same range as the
    /// [`QueueConfig`](super::queue::QueueConfig)'s.
    pub queues: RangeInclusive<u16>,
    /// Accept SYNs while no agent listens on the queues (`--queue-bypass`);
    /// otherwise the kernel drops them.
    pub fail_open: bool,
    /// The hooks to enforce at.
    pub hooks: Vec<Hook>,
    /// New-connection SYNs per second one source address may send to the
    /// queues; beyond it (and its burst) they are dropped before the queue.
    /// 0: no limit.
    pub syn_rate_per_source: u32,
    /// SYNs a source may send at once above its rate before the limit
    /// applies (at least 1 when the rate is set).
    pub syn_burst_per_source: u32,
}

/// What the rules of the `SYN` chain counted, summed over both families.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChainCounters {
    /// SYNs the NFQUEUE rule handed to the queues (queued, or bypassed or
    /// dropped by the kernel when no agent reads the queue).
    pub queued: u64,
    /// SYNs the per-source rate limit dropped.
    pub rate_limited: u64,
}

impl ChainConfig {
    /// The name of the agent's chain for `hook`.
    pub fn chain_name(&self, hook: Hook) -> String {
        chain_name(&self.prefix, hook)
    }

    /// The name of the chain every queued SYN passes.
    pub fn syn_chain_name(&self) -> String {
        syn_chain_name(&self.prefix)
    }

    fn validate(&self) -> Result<(), ChainError> {
        let longest = self.syn_chain_name().len();
        if self.prefix.is_empty()
            || longest > MAX_CHAIN_NAME
            || !self
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ChainError::Config(format!(
                "chain prefix {:?} must be 1 to {} letters, digits, '_' or '-'",
                self.prefix,
                MAX_CHAIN_NAME - 1 - SYN_SUFFIX.len()
            )));
        }
        if self.syn_rate_per_source > MAX_SYN_RATE {
            return Err(ChainError::Config(format!(
                "SYN rate per source {} is above the most hashlimit takes, {MAX_SYN_RATE}/s",
                self.syn_rate_per_source
            )));
        }
        if self.syn_rate_per_source > 0 && self.syn_burst_per_source == 0 {
            return Err(ChainError::Config(
                "a SYN rate limit needs a burst of at least 1".into(),
            ));
        }
        if self.queues.is_empty() {
            return Err(ChainError::Config(format!("empty queue range {:?}", self.queues)));
        }
        if self.hooks.is_empty() {
            return Err(ChainError::Config("no hooks to enforce at".into()));
        }
        Ok(())
    }

    /// The NFQUEUE target of every rule.
    fn target(&self) -> String {
        let mut target = if self.queues.start() == self.queues.end() {
            format!("NFQUEUE --queue-num {}", self.queues.start())
        } else {
            format!(
                "NFQUEUE --queue-balance {}:{} --queue-cpu-fanout",
                self.queues.start(),
                self.queues.end()
            )
        };
        if self.fail_open {
            target.push_str(" --queue-bypass");
        }
        target
    }

    /// The whole `SYN` chain: declaration (which flushes it in the same
    /// transaction), rate limit, NFQUEUE.
    pub fn syn_chain(&self) -> String {
        let chain = self.syn_chain_name();
        let mut out = format!(":{chain} - [0:0]\n");
        if self.syn_rate_per_source > 0 {
            let _ = writeln!(
                out,
                "-A {chain} -m hashlimit --hashlimit-above {}/sec --hashlimit-burst {} --hashlimit-mode srcip --hashlimit-name {} -j DROP",
                self.syn_rate_per_source,
                self.syn_burst_per_source,
                hashlimit_name(&self.prefix)
            );
        }
        let _ = writeln!(out, "-A {chain} -j {}", self.target());
        out
    }
}

/// The `hashlimit` table name of `prefix`: `<prefix>-syn` when that fits
/// the kernel's 15 characters, else the prefix cut short and a hash of it
/// (so two long prefixes do not share one table).
fn hashlimit_name(prefix: &str) -> String {
    let plain = format!("{prefix}-syn");
    if plain.len() <= MAX_HASHLIMIT_NAME {
        return plain;
    }
    // FNV-1a: stable across builds and platforms.
    let hash = prefix.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    let head: String = prefix.chars().take(MAX_HASHLIMIT_NAME - 9).collect();
    format!("{head}-{hash:08x}")
}

/// Whether `name` can be written into an iptables rule as an interface:
/// 1 to 15 letters, digits, `_`, `-`, `.` or `@` (no spaces or newlines
/// that would break the `iptables-restore` script).
pub fn valid_interface(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_INTERFACE_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@'))
}

/// Why the chains could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The configuration cannot work.
    #[error("invalid chain configuration: {0}")]
    Config(String),
    /// A command could not be started.
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command.
        command: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A command failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// Runs `program args` with `input` on stdin; returns stdout.
fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, ChainError> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ChainError::Spawn {
            command: command.clone(),
            source,
        })?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(input.as_bytes()).map_err(|source| ChainError::Spawn {
            command: command.clone(),
            source,
        })?;
    }
    let output = child.wait_with_output().map_err(|source| ChainError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !output.status.success() {
        return Err(ChainError::Command {
            command,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The `filter` table as `<family>-save` prints it.
fn save(family: Family, counters: bool) -> Result<String, ChainError> {
    let args: &[&str] = if counters {
        &["-c", "-t", "filter"]
    } else {
        &["-t", "filter"]
    };
    run(family.save_command(), args, None)
}

/// Applies `commands` (lines for the `filter` table) in one transaction.
fn restore(family: Family, commands: &str) -> Result<(), ChainError> {
    if commands.is_empty() {
        return Ok(());
    }
    let script = format!("*filter\n{commands}COMMIT\n");
    tracing::debug!(message = "Applying rules.", command = family.restore_command(), script = %script);
    run(family.restore_command(), &["--noflush"], Some(&script)).map(drop)
}

/// What `<family>-save` shows of one hook's chain.
struct Present {
    chain_exists: bool,
    jumps: usize,
}

fn present(saved: &str, hook: Hook, chain: &str) -> Present {
    let declaration = format!(":{chain} ");
    let jump = format!("-A {} -j {chain}", hook.builtin_chain());
    Present {
        chain_exists: saved.lines().any(|l| l.starts_with(&declaration)),
        jumps: saved.lines().filter(|l| l.trim_end() == jump).count(),
    }
}

/// The name of the chain of `prefix` for `hook`.
fn chain_name(prefix: &str, hook: Hook) -> String {
    format!("{prefix}-{}", hook.suffix())
}

/// The name of the `SYN` chain of `prefix`.
fn syn_chain_name(prefix: &str) -> String {
    format!("{prefix}-{SYN_SUFFIX}")
}

/// Whether `saved` declares `chain`.
fn declares(saved: &str, chain: &str) -> bool {
    let declaration = format!(":{chain} ");
    saved.lines().any(|l| l.starts_with(&declaration))
}

/// Removes every jump and chain of `prefix` (for every hook), for IPv4 and
/// IPv6, as far as they exist. [`Chains::remove`] does this for chains it
/// installed; a caller holding no [`Chains`] (a test cleaning up after an
/// agent it ran and lost) calls this.
pub fn remove_prefix(prefix: &str) -> Result<(), ChainError> {
    for family in Family::ALL {
        let saved = save(family, false)?;
        let mut commands = String::new();
        for hook in Hook::ALL {
            removal(&saved, hook, &chain_name(prefix, hook), &mut commands);
        }
        // Last: the hook chains that jump to it are gone by now.
        let syn = syn_chain_name(prefix);
        if declares(&saved, &syn) {
            let _ = writeln!(commands, "-F {syn}\n-X {syn}");
        }
        restore(family, &commands)?;
    }
    Ok(())
}

/// Reads what the `SYN` chain of `prefix` counted (both families), whether
/// or not this process installed it; zeros where it does not exist. Lists
/// that one chain (`iptables -L <chain> -n -v -x`), not the whole table, so
/// a host with a large rule set pays little for the agent's sampling.
pub fn counters_of(prefix: &str) -> Result<ChainCounters, ChainError> {
    let chain = syn_chain_name(prefix);
    let mut total = ChainCounters::default();
    for family in Family::ALL {
        let listed = match run(
            family.list_command(),
            &["-t", "filter", "-L", &chain, "-n", "-v", "-x"],
            None,
        ) {
            Ok(listed) => listed,
            Err(ChainError::Command { stderr, .. }) if stderr.contains("No chain") => continue,
            Err(error) => return Err(error),
        };
        let counted = parse_counters(&listed);
        total.queued += counted.queued;
        total.rate_limited += counted.rate_limited;
    }
    Ok(total)
}

/// Sums the packet counters of a chain as `iptables -L <chain> -n -v -x`
/// prints it (`pkts bytes target ...` per rule, after two header lines):
/// NFQUEUE rules as queued, DROP rules as rate-limited.
fn parse_counters(listed: &str) -> ChainCounters {
    let mut total = ChainCounters::default();
    for line in listed.lines().skip(2) {
        let mut fields = line.split_whitespace();
        let (Some(packets), Some(_bytes), Some(target)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let Ok(packets) = packets.parse::<u64>() else {
            continue;
        };
        match target {
            "NFQUEUE" => total.queued += packets,
            "DROP" => total.rate_limited += packets,
            _ => {}
        }
    }
    total
}

/// Commands that remove a hook's jumps and chain, as far as they exist.
fn removal(saved: &str, hook: Hook, chain: &str, out: &mut String) {
    let found = present(saved, hook, chain);
    for _ in 0..found.jumps {
        let _ = writeln!(out, "-D {} -j {chain}", hook.builtin_chain());
    }
    if found.chain_exists {
        let _ = writeln!(out, "-F {chain}\n-X {chain}");
    }
}

/// The agent's chains, installed. Call [`Chains::remove`] to take them out;
/// dropping leaves them in place (so a fail-closed node stays enforced
/// while the agent restarts).
#[derive(Debug)]
pub struct Chains {
    config: ChainConfig,
    addresses: BTreeSet<IpAddr>,
    interfaces: BTreeSet<String>,
}

impl Chains {
    /// Creates the chains that do not exist yet and one jump per configured
    /// hook, for IPv4 and IPv6; adopts existing hook chains without flushing
    /// them and without adding a second jump (extra jumps are removed).
    /// Chains of this prefix for hooks no longer configured are removed.
    /// The `SYN` chain is written anew (in the same transaction), so a
    /// changed fail mode or rate limit applies at once.
    pub fn install(config: ChainConfig) -> Result<Chains, ChainError> {
        config.validate()?;
        for family in Family::ALL {
            let saved = save(family, false)?;
            let mut commands = config.syn_chain();
            for hook in Hook::ALL {
                let chain = config.chain_name(hook);
                if !config.hooks.contains(&hook) {
                    removal(&saved, hook, &chain, &mut commands);
                    continue;
                }
                let found = present(&saved, hook, &chain);
                if !found.chain_exists {
                    let _ = writeln!(commands, ":{chain} - [0:0]");
                }
                if found.jumps == 0 {
                    let _ = writeln!(commands, "-I {} 1 -j {chain}", hook.builtin_chain());
                }
                for _ in 1..found.jumps.max(1) {
                    let _ = writeln!(commands, "-D {} -j {chain}", hook.builtin_chain());
                }
            }
            restore(family, &commands)?;
        }
        tracing::info!(
            message = "Chains installed.",
            prefix = %config.prefix,
            hooks = ?config.hooks,
            queues = ?config.queues,
            fail_open = config.fail_open,
            syn_rate_per_source = config.syn_rate_per_source,
            syn_burst_per_source = config.syn_burst_per_source
        );
        Ok(Chains {
            config,
            addresses: BTreeSet::new(),
            interfaces: BTreeSet::new(),
        })
    }

    /// The configuration the chains were installed with.
    pub fn config(&self) -> &ChainConfig {
        &self.config
    }

    /// The addresses last set by [`Chains::set_addresses`] or
    /// [`Chains::set_workloads`].
    pub fn addresses(&self) -> &BTreeSet<IpAddr> {
        &self.addresses
    }

    /// The interfaces last set by [`Chains::set_workloads`].
    pub fn interfaces(&self) -> &BTreeSet<String> {
        &self.interfaces
    }

    /// The rule lines (`-A ...`) of the hook chains for `addresses` of one
    /// family and for workload `interfaces` (invalid names are left out:
    /// see [`valid_interface`]), as given to `iptables-restore`.
    pub fn rules(&self, family: Family, addresses: &BTreeSet<IpAddr>, interfaces: &BTreeSet<String>) -> String {
        let syn = self.config.syn_chain_name();
        let new_syn = format!("-p tcp --syn -m conntrack --ctstate NEW -j {syn}");
        let mut out = String::new();
        for hook in &self.config.hooks {
            let chain = self.config.chain_name(*hook);
            let _ = writeln!(out, ":{chain} - [0:0]");
            for address in addresses.iter().filter(|a| Family::of(a) == family) {
                let bits = if family == Family::Ipv4 { 32 } else { 128 };
                for direction in ["-s", "-d"] {
                    let _ = writeln!(out, "-A {chain} {direction} {address}/{bits} {new_syn}");
                }
            }
            // Packets arrive on an interface only at FORWARD and INPUT.
            if *hook == Hook::Output {
                continue;
            }
            for interface in interfaces.iter().filter(|name| valid_interface(name)) {
                let _ = writeln!(out, "-A {chain} -i {interface} {new_syn}");
                let _ = writeln!(out, "-A {chain} -m physdev --physdev-in {interface} {new_syn}");
            }
        }
        out
    }

    /// Replaces the contents of every hook chain with the rules for
    /// `addresses` (and no interfaces): see [`Chains::set_workloads`].
    pub fn set_addresses(&mut self, addresses: &BTreeSet<IpAddr>) -> Result<(), ChainError> {
        self.set_workloads(addresses, &BTreeSet::new())
    }

    /// Replaces the contents of every hook chain with the rules for
    /// `addresses` and workload `interfaces`: one `--noflush` transaction
    /// per family (declaring a chain flushes it in the same transaction),
    /// so the chain never appears half-written. Idempotent: the same sets
    /// give the same rules, each exactly once. The `SYN` chain and its
    /// counters are left alone.
    pub fn set_workloads(
        &mut self,
        addresses: &BTreeSet<IpAddr>,
        interfaces: &BTreeSet<String>,
    ) -> Result<(), ChainError> {
        for family in Family::ALL {
            restore(family, &self.rules(family, addresses, interfaces))?;
        }
        let skipped = interfaces.iter().filter(|name| !valid_interface(name)).count();
        if skipped > 0 {
            tracing::warn!(message = "Interface names iptables cannot take were left out.", skipped);
        }
        tracing::info!(
            message = "Workload addresses enforced.",
            prefix = %self.config.prefix,
            addresses = addresses.len(),
            interfaces = interfaces.len() - skipped
        );
        self.addresses = addresses.clone();
        self.interfaces = interfaces.clone();
        Ok(())
    }

    /// What the `SYN` chain counted since [`Chains::install`] wrote it.
    pub fn counters(&self) -> Result<ChainCounters, ChainError> {
        counters_of(&self.config.prefix)
    }

    /// SYNs handed to the queues (queued, or bypassed or dropped by the
    /// kernel while no agent read them) since [`Chains::install`].
    pub fn matched_syns(&self) -> Result<u64, ChainError> {
        Ok(self.counters()?.queued)
    }

    /// Removes every jump and chain of this prefix (for every hook, also
    /// ones not configured), for IPv4 and IPv6.
    pub fn remove(self) -> Result<(), ChainError> {
        remove_prefix(&self.config.prefix)?;
        tracing::info!(message = "Chains removed.", prefix = %self.config.prefix);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(queues: RangeInclusive<u16>, fail_open: bool) -> ChainConfig {
        ChainConfig {
            prefix: "CNNF".into(),
            queues,
            fail_open,
            hooks: vec![Hook::Forward],
            syn_rate_per_source: 0,
            syn_burst_per_source: 0,
        }
    }

    fn chains(config: ChainConfig) -> Chains {
        Chains {
            config,
            addresses: BTreeSet::new(),
            interfaces: BTreeSet::new(),
        }
    }

    #[test]
    fn rules_cover_both_directions_of_each_address_of_the_family() {
        let chains = chains(config(0..=1, true));
        let addresses: BTreeSet<IpAddr> = ["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()].into();
        assert_eq!(
            chains.rules(Family::Ipv4, &addresses, &BTreeSet::new()),
            ":CNNF-FWD - [0:0]\n\
             -A CNNF-FWD -s 10.0.0.1/32 -p tcp --syn -m conntrack --ctstate NEW -j CNNF-SYN\n\
             -A CNNF-FWD -d 10.0.0.1/32 -p tcp --syn -m conntrack --ctstate NEW -j CNNF-SYN\n"
        );
        let v6 = chains.rules(Family::Ipv6, &addresses, &BTreeSet::new());
        assert!(v6.contains("-s fd00::1/128") && v6.contains("-d fd00::1/128") && !v6.contains("10.0.0.1"));
    }

    #[test]
    fn workload_interfaces_are_queued_at_forward_and_input_whatever_the_address() {
        let mut config = config(0..=0, false);
        config.hooks = vec![Hook::Forward, Hook::Input, Hook::Output];
        let chains = chains(config);
        let interfaces: BTreeSet<String> = ["vethab1".to_owned(), "bad name".to_owned()].into();
        let rules = chains.rules(Family::Ipv6, &BTreeSet::new(), &interfaces);
        assert_eq!(
            rules,
            ":CNNF-FWD - [0:0]\n\
             -A CNNF-FWD -i vethab1 -p tcp --syn -m conntrack --ctstate NEW -j CNNF-SYN\n\
             -A CNNF-FWD -m physdev --physdev-in vethab1 -p tcp --syn -m conntrack --ctstate NEW -j CNNF-SYN\n\
             :CNNF-IN - [0:0]\n\
             -A CNNF-IN -i vethab1 -p tcp --syn -m conntrack --ctstate NEW -j CNNF-SYN\n\
             -A CNNF-IN -m physdev --physdev-in vethab1 -p tcp --syn -m conntrack --ctstate NEW -j CNNF-SYN\n\
             :CNNF-OUT - [0:0]\n",
            "the same for both families; OUTPUT has no in-interface; a name iptables cannot take is left out"
        );
        assert_eq!(rules, chains.rules(Family::Ipv4, &BTreeSet::new(), &interfaces));
    }

    #[test]
    fn the_syn_chain_rate_limits_per_source_then_queues() {
        let mut limited = config(0..=1, true);
        limited.syn_rate_per_source = 500;
        limited.syn_burst_per_source = 800;
        assert_eq!(
            limited.syn_chain(),
            ":CNNF-SYN - [0:0]\n\
             -A CNNF-SYN -m hashlimit --hashlimit-above 500/sec --hashlimit-burst 800 --hashlimit-mode srcip --hashlimit-name CNNF-syn -j DROP\n\
             -A CNNF-SYN -j NFQUEUE --queue-balance 0:1 --queue-cpu-fanout --queue-bypass\n"
        );
        assert_eq!(
            config(3..=3, false).syn_chain(),
            ":CNNF-SYN - [0:0]\n-A CNNF-SYN -j NFQUEUE --queue-num 3\n",
            "rate 0: no limit; fail-closed: no bypass"
        );
    }

    #[test]
    fn hashlimit_names_fit_the_kernel_and_stay_distinct() {
        assert_eq!(hashlimit_name("CT12"), "CT12-syn");
        let long = hashlimit_name("CNNF-NODE-PREFIX-A");
        let other = hashlimit_name("CNNF-NODE-PREFIX-B");
        assert!(long.len() <= MAX_HASHLIMIT_NAME && other.len() <= MAX_HASHLIMIT_NAME);
        assert_ne!(long, other);
        assert_eq!(long, hashlimit_name("CNNF-NODE-PREFIX-A"), "stable");
    }

    #[test]
    fn one_queue_uses_queue_num_and_fail_closed_has_no_bypass() {
        assert_eq!(config(7..=7, false).target(), "NFQUEUE --queue-num 7");
    }

    #[test]
    fn bad_configurations_are_refused() {
        let mut bad = config(0..=0, false);
        bad.prefix = "has space".into();
        assert!(matches!(bad.validate(), Err(ChainError::Config(_))));
        bad.prefix = "X".repeat(25);
        assert!(bad.validate().is_err());
        bad.prefix = "X".repeat(24);
        assert!(bad.validate().is_ok());
        bad.syn_rate_per_source = 10;
        assert!(bad.validate().is_err(), "a rate without a burst");
        bad.syn_burst_per_source = 10;
        assert!(bad.validate().is_ok());
        bad.syn_rate_per_source = MAX_SYN_RATE + 1;
        assert!(bad.validate().is_err());
        bad.syn_rate_per_source = 0;
        bad.hooks.clear();
        assert!(bad.validate().is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let empty = config(2..=1, false);
        assert!(empty.validate().is_err());
    }

    #[test]
    fn interface_names_are_checked_before_they_reach_a_script() {
        assert!(valid_interface("cnv12h3") && valid_interface("eth0.100") && valid_interface("veth@if4"));
        assert!(!valid_interface(""));
        assert!(!valid_interface("a\n-A FORWARD -j ACCEPT"));
        assert!(!valid_interface("x y"));
        assert!(!valid_interface(&"v".repeat(16)));
    }

    #[test]
    fn counters_are_read_from_the_listed_chain() {
        let listed = "Chain CNNF-SYN (3 references)\n\
            \x20   pkts      bytes target     prot opt in     out     source               destination\n\
            \x20      7      420 DROP       all  --  *      *       0.0.0.0/0            0.0.0.0/0            limit: above 10/sec burst 20 mode srcip\n\
            \x20      9      540 NFQUEUE    all  --  *      *       0.0.0.0/0            0.0.0.0/0            NFQUEUE num 3 bypass\n\
            garbage\n";
        assert_eq!(
            parse_counters(listed),
            ChainCounters {
                queued: 9,
                rate_limited: 7
            }
        );
        assert_eq!(parse_counters(""), ChainCounters::default());
    }

    #[test]
    fn jumps_and_chains_are_found_in_saved_rules() {
        let saved = ":FORWARD ACCEPT [0:0]\n:CNNF-FWD - [0:0]\n-A FORWARD -j CNNF-FWD\n-A FORWARD -j CNNF-FWD\n-A FORWARD -j CNNF-FWD2\n";
        let found = present(saved, Hook::Forward, "CNNF-FWD");
        assert!(found.chain_exists);
        assert_eq!(found.jumps, 2);
        let mut out = String::new();
        removal(saved, Hook::Forward, "CNNF-FWD", &mut out);
        assert_eq!(
            out,
            "-D FORWARD -j CNNF-FWD\n-D FORWARD -j CNNF-FWD\n-F CNNF-FWD\n-X CNNF-FWD\n"
        );
        assert!(!present(saved, Hook::Input, "CNNF-IN").chain_exists);
        assert!(declares(saved, "CNNF-FWD") && !declares(saved, "CNNF-SYN"));
    }
}
