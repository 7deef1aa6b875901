//! The agent's own iptables chains, which send the SYNs of the node's
//! workload addresses to NFQUEUE.
//!
//! Layout, for IPv4 (`iptables-restore`) and IPv6 (`ip6tables-restore`)
//! alike: one chain per hook, `<prefix>-FWD`, `<prefix>-IN`, `<prefix>-OUT`,
//! each reached by exactly one jump at the top of `FORWARD`, `INPUT` or
//! `OUTPUT` in the `filter` table. For each workload address `A` a chain
//! holds two rules, `-s A` and `-d A`, each
//! `-p tcp --syn -m conntrack --ctstate NEW -j NFQUEUE` to the configured
//! queues (`--queue-balance a:b --queue-cpu-fanout`, or `--queue-num a` for
//! one queue), plus `--queue-bypass` when failing open. Established traffic
//! never matches, so it never leaves the kernel.
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
//! queue; without it, it drops them. Bypassed SYNs are not counted by the
//! queue (no queue instance exists then), but every queued or bypassed SYN
//! is counted by its rule: [`Chains::matched_syns`] minus the verdicts the
//! agent gave over the same period is the number bypassed (or dropped by a
//! full queue, which the queue counts itself).
//!
//! Restarts: [`Chains::install`] adopts chains that already exist (it does
//! not flush them, so a fail-closed node stays enforced while the agent
//! restarts) and adds a jump only where none exists, removing duplicates.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::process::{Command, Stdio};

/// Longest chain name iptables accepts.
pub const MAX_CHAIN_NAME: usize = 28;

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
}

impl ChainConfig {
    /// The name of the agent's chain for `hook`.
    pub fn chain_name(&self, hook: Hook) -> String {
        chain_name(&self.prefix, hook)
    }

    fn validate(&self) -> Result<(), ChainError> {
        let longest = Hook::ALL.iter().map(|h| self.chain_name(*h).len()).max().unwrap_or(0);
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
                MAX_CHAIN_NAME - 4
            )));
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
        restore(family, &commands)?;
    }
    Ok(())
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
}

impl Chains {
    /// Creates the chains that do not exist yet and one jump per configured
    /// hook, for IPv4 and IPv6; adopts existing chains without flushing them
    /// and without adding a second jump (extra jumps are removed). Chains of
    /// this prefix for hooks no longer configured are removed.
    pub fn install(config: ChainConfig) -> Result<Chains, ChainError> {
        config.validate()?;
        for family in Family::ALL {
            let saved = save(family, false)?;
            let mut commands = String::new();
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
        tracing::info!(message = "Chains installed.", prefix = %config.prefix, hooks = ?config.hooks, queues = ?config.queues, fail_open = config.fail_open);
        Ok(Chains {
            config,
            addresses: BTreeSet::new(),
        })
    }

    /// The configuration the chains were installed with.
    pub fn config(&self) -> &ChainConfig {
        &self.config
    }

    /// The addresses last set by [`Chains::set_addresses`].
    pub fn addresses(&self) -> &BTreeSet<IpAddr> {
        &self.addresses
    }

    /// The rule lines (`-A ...`) for `addresses` of one family, as given to
    /// `iptables-restore`.
    pub fn rules(&self, family: Family, addresses: &BTreeSet<IpAddr>) -> String {
        let target = self.config.target();
        let mut out = String::new();
        for hook in &self.config.hooks {
            let chain = self.config.chain_name(*hook);
            let _ = writeln!(out, ":{chain} - [0:0]");
            for address in addresses.iter().filter(|a| Family::of(a) == family) {
                let bits = if family == Family::Ipv4 { 32 } else { 128 };
                for direction in ["-s", "-d"] {
                    let _ = writeln!(
                        out,
                        "-A {chain} {direction} {address}/{bits} -p tcp --syn -m conntrack --ctstate NEW -j {target}"
                    );
                }
            }
        }
        out
    }

    /// Replaces the contents of every chain with the rules for `addresses`:
    /// one `--noflush` transaction per family (declaring a chain flushes it
    /// in the same transaction), so the chain never appears half-written.
    /// Idempotent: the same set gives the same rules, each exactly once.
    pub fn set_addresses(&mut self, addresses: &BTreeSet<IpAddr>) -> Result<(), ChainError> {
        for family in Family::ALL {
            restore(family, &self.rules(family, addresses))?;
        }
        tracing::info!(message = "Workload addresses enforced.", prefix = %self.config.prefix, addresses = addresses.len());
        self.addresses = addresses.clone();
        Ok(())
    }

    /// SYNs matched by the chains' rules (queued or bypassed) since they
    /// were last written, summed over both families and all hooks.
    pub fn matched_syns(&self) -> Result<u64, ChainError> {
        let mut total = 0;
        for family in Family::ALL {
            let saved = save(family, true)?;
            for hook in &self.config.hooks {
                let rule = format!("-A {} ", self.config.chain_name(*hook));
                total += saved
                    .lines()
                    .filter_map(|line| {
                        let (counters, rest) = line.split_once(' ')?;
                        if !rest.starts_with(&rule) {
                            return None;
                        }
                        let (packets, _) = counters.strip_prefix('[')?.split_once(':')?;
                        packets.parse::<u64>().ok()
                    })
                    .sum::<u64>();
            }
        }
        Ok(total)
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
        }
    }

    #[test]
    fn rules_cover_both_directions_of_each_address_of_the_family() {
        let chains = Chains {
            config: config(0..=1, true),
            addresses: BTreeSet::new(),
        };
        let addresses: BTreeSet<IpAddr> = ["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()].into();
        assert_eq!(
            chains.rules(Family::Ipv4, &addresses),
            ":CNNF-FWD - [0:0]\n\
             -A CNNF-FWD -s 10.0.0.1/32 -p tcp --syn -m conntrack --ctstate NEW -j NFQUEUE --queue-balance 0:1 --queue-cpu-fanout --queue-bypass\n\
             -A CNNF-FWD -d 10.0.0.1/32 -p tcp --syn -m conntrack --ctstate NEW -j NFQUEUE --queue-balance 0:1 --queue-cpu-fanout --queue-bypass\n"
        );
        let v6 = chains.rules(Family::Ipv6, &addresses);
        assert!(v6.contains("-s fd00::1/128") && v6.contains("-d fd00::1/128") && !v6.contains("10.0.0.1"));
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
        bad.hooks.clear();
        assert!(bad.validate().is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let empty = config(2..=1, false);
        assert!(empty.validate().is_err());
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
    }
}
