//! The agent's configuration: flags or `CNNF_*` environment variables,
//! checked before anything starts (bad values exit with status 64).

use std::path::PathBuf;
use std::time::Duration;

use cnnf_core::subjects::Token;
use cnnf_discovery::Source;
use cnnf_service::CommonConfig;

use crate::dataplane::chains::Hook;
use crate::tables::Trust;

/// What happens to new connections of the node's workloads while no agent
/// reads the queues (stopped, crashed, restarting). A full queue is
/// [`QueueFull`]'s business.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailMode {
    /// The kernel lets SYNs through (`--queue-bypass`): workloads keep
    /// working, unchecked, while the agent is away. Also accepts queued
    /// packets the agent cannot decode.
    Open,
    /// The kernel drops SYNs nobody reads: nothing unchecked gets through,
    /// and no new connection succeeds while the agent is away. Also drops
    /// queued packets the agent cannot decode.
    Closed,
}

/// What the kernel does with a SYN when the agent's queue is full (the
/// agent is running but behind, e.g. under a SYN flood).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueFull {
    /// Drop it: nothing passes unchecked, new connections may time out.
    Drop,
    /// Accept it unchecked (the kernel's fail-open flag); counted in
    /// `cnnf_agent_syn_bypassed_total`.
    Accept,
    /// Accept while the table in force cannot drop anything (every mode
    /// disabled, or alert without prevent rules), drop as soon as it can:
    /// re-applied on every table change.
    Auto,
}

/// A netfilter hook, as the `--hooks` flag names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HookArg {
    /// The FORWARD chain.
    Forward,
    /// The INPUT chain.
    Input,
    /// The OUTPUT chain.
    Output,
}

/// Configuration of the agent.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "cnnf-agent", version, about = "CNNF node agent")]
pub struct Config {
    /// Settings every CNNF process shares. `--data-dir` is the agent's
    /// state directory: the last verdict table and the event spool.
    #[command(flatten)]
    pub common: CommonConfig,
    /// This node's name (default: the host name).
    #[arg(long, env = "CNNF_NODE")]
    pub node: Option<String>,
    /// Seconds between heartbeats.
    #[arg(long, env = "CNNF_HEARTBEAT_SECONDS", default_value_t = 5)]
    pub heartbeat_seconds: u64,
    /// Where the node's workloads come from: `inventory:<file>`,
    /// `docker:<socket>` or `cri:<socket>`. Without it the node has no
    /// workloads, and nothing is queued.
    #[arg(long, env = "CNNF_WORKLOADS")]
    pub workloads: Option<Source>,
    /// Run without iptables and NFQUEUE: discovery, tables and events only
    /// (hosts without netfilter, tests of the control plane).
    #[arg(long, env = "CNNF_NO_DATAPLANE")]
    pub no_dataplane: bool,
    /// Prefix of the agent's iptables chains (`<prefix>-...`); unique per
    /// agent on one host.
    #[arg(long, env = "CNNF_CHAIN_PREFIX", default_value = "CNNF")]
    pub chain_prefix: String,
    /// First NFQUEUE number the agent reads.
    #[arg(long, env = "CNNF_QUEUE_FIRST", default_value_t = 0)]
    pub queue_first: u16,
    /// Number of queues (one thread each; the kernel fans SYNs out by CPU).
    /// 0: one per core.
    #[arg(long, env = "CNNF_QUEUE_COUNT", default_value_t = 0)]
    pub queue_count: u16,
    /// Netfilter hooks to enforce at, comma-separated: `forward` (bridged
    /// or routed containers), `input` and `output` (host-network
    /// workloads).
    #[arg(
        long,
        env = "CNNF_HOOKS",
        value_enum,
        value_delimiter = ',',
        default_value = "forward,input,output"
    )]
    pub hooks: Vec<HookArg>,
    /// What the kernel does with SYNs while no agent reads the queues.
    #[arg(long, env = "CNNF_FAIL_MODE", value_enum, default_value_t = FailMode::Open)]
    pub fail_mode: FailMode,
    /// What the kernel does with a SYN while the agent's queue is full.
    #[arg(long, env = "CNNF_QUEUE_FULL", value_enum, default_value_t = QueueFull::Auto)]
    pub queue_full: QueueFull,
    /// New-connection SYNs per second one source address may send to the
    /// queues (iptables `hashlimit`, before the queue); the excess is
    /// dropped and counted in `cnnf_agent_syn_rate_limited_total`. 0: no
    /// limit.
    #[arg(long, env = "CNNF_SYN_RATE_PER_SOURCE", default_value_t = 1000)]
    pub syn_rate_per_source: u32,
    /// SYNs a source may send at once beyond its rate before the limit
    /// applies.
    #[arg(long, env = "CNNF_SYN_BURST_PER_SOURCE", default_value_t = 2000)]
    pub syn_burst_per_source: u32,
    /// Remove the agent's iptables chains (of `--chain-prefix`, IPv4 and
    /// IPv6) and exit, instead of running. A stopping agent leaves its
    /// chains in place so the node stays enforced across restarts; this is
    /// how a node is uninstalled.
    #[arg(long)]
    pub remove_chains: bool,
    /// Identical decisions within this many milliseconds become one event
    /// with a count.
    #[arg(long, env = "CNNF_AGGREGATION_MS", default_value_t = 1000)]
    pub aggregation_ms: u64,
    /// Capacity of the ring between verdict threads and the publisher;
    /// decisions beyond it are counted as overflowed.
    #[arg(long, env = "CNNF_RING_SIZE", default_value_t = 65_536)]
    pub ring_size: usize,
    /// Most distinct decisions one aggregation window keeps; the rest are
    /// counted as overflowed (bounds the event stream under a flood from
    /// many addresses).
    #[arg(long, env = "CNNF_MAX_DISTINCT", default_value_t = 65_536)]
    pub max_distinct: usize,
    /// Most decisions in one `DecisionBatch` message.
    #[arg(long, env = "CNNF_BATCH_DECISIONS", default_value_t = 1000)]
    pub batch_decisions: usize,
    /// File of the public keys whose signed verdict tables the agent
    /// enforces: one `cnnf-ed25519-public <key-id> <base64>` line per key,
    /// several during a key rotation. The policy service writes its key as
    /// `table-signing.pub` in its data directory. Required unless
    /// `--allow-unsigned-tables`.
    #[arg(long, env = "CNNF_TABLE_KEYS")]
    pub table_keys: Option<PathBuf>,
    /// For labs only: also take verdict tables nobody signed (and, without
    /// `--table-keys`, check no signature at all), so anyone able to write
    /// KV `cnnf-verdicts` can switch this node's enforcement off.
    #[arg(long, env = "CNNF_ALLOW_UNSIGNED_TABLES")]
    pub allow_unsigned_tables: bool,
}

impl Config {
    /// The node name, from the flag or the host name.
    pub fn node_name(&self) -> anyhow::Result<Token> {
        let name = match &self.node {
            Some(node) => node.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")?.trim().to_owned(),
        };
        Ok(Token::new("node", &name)?)
    }

    /// Checks what clap cannot; the message names the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.common.validate()?;
        if let Some(node) = &self.node {
            Token::new("node", node)?;
        }
        anyhow::ensure!(self.heartbeat_seconds > 0, "--heartbeat-seconds must be at least 1");
        anyhow::ensure!(
            (1..=60_000).contains(&self.aggregation_ms),
            "--aggregation-ms must be between 1 and 60000, got {}",
            self.aggregation_ms
        );
        anyhow::ensure!(
            (1..=16 * 1024 * 1024).contains(&self.ring_size),
            "--ring-size must be between 1 and 16777216, got {}",
            self.ring_size
        );
        anyhow::ensure!(!self.hooks.is_empty(), "--hooks must name at least one hook");
        anyhow::ensure!(self.max_distinct >= 1, "--max-distinct must be at least 1");
        anyhow::ensure!(
            (1..=4000).contains(&self.batch_decisions),
            "--batch-decisions must be between 1 and 4000 (a message holds at most 1 MiB), got {}",
            self.batch_decisions
        );
        anyhow::ensure!(
            !self.chain_prefix.is_empty()
                && self.chain_prefix.len() <= 16
                && self
                    .chain_prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "--chain-prefix must be 1 to 16 ASCII letters, digits, '-' or '_', got {:?}",
            self.chain_prefix
        );
        anyhow::ensure!(
            self.syn_rate_per_source <= crate::dataplane::chains::MAX_SYN_RATE,
            "--syn-rate-per-source must be at most {} (0: no limit), got {}",
            crate::dataplane::chains::MAX_SYN_RATE,
            self.syn_rate_per_source
        );
        anyhow::ensure!(
            self.syn_rate_per_source == 0 || (1..=1_000_000).contains(&self.syn_burst_per_source),
            "--syn-burst-per-source must be between 1 and 1000000 with a rate limit, got {}",
            self.syn_burst_per_source
        );
        let count = u32::from(self.queues().1);
        anyhow::ensure!(
            u32::from(self.queue_first) + count <= 65_536,
            "--queue-first {} with {count} queues runs past queue 65535",
            self.queue_first
        );
        // Removing the chains decides nothing, so it needs no trusted keys.
        if !self.remove_chains {
            self.table_trust()?;
        }
        Ok(())
    }

    /// Which verdict tables the agent takes, from `--table-keys` (read
    /// here) and `--allow-unsigned-tables`.
    pub fn table_trust(&self) -> anyhow::Result<Trust> {
        let keys = match &self.table_keys {
            Some(path) => {
                cnnf_signing::files::read_public_keys(path).map_err(|error| anyhow::anyhow!("--table-keys {error}"))?
            }
            None if self.allow_unsigned_tables => Vec::new(),
            None => anyhow::bail!(
                "--table-keys <file> is required: the public key of the policy service, whose signed verdict \
                 tables this agent enforces. The policy service writes it at its first start as table-signing.pub \
                 in its data directory (`cnnf-table-key public <secret key file>` prints it too). Only for a lab, \
                 --allow-unsigned-tables takes tables without checking who wrote them"
            ),
        };
        Ok(if self.allow_unsigned_tables {
            Trust::allow_unsigned(keys)
        } else {
            Trust::keys(keys)
        })
    }

    /// The queue range: first number and count (cores when 0).
    pub fn queues(&self) -> (u16, u16) {
        let count = if self.queue_count == 0 {
            std::thread::available_parallelism()
                .map(|cores| cores.get().min(1024) as u16)
                .unwrap_or(1)
        } else {
            self.queue_count
        };
        (self.queue_first, count)
    }

    /// The hooks, deduplicated, in the data plane's terms.
    pub fn hooks(&self) -> Vec<Hook> {
        let mut hooks: Vec<Hook> = self
            .hooks
            .iter()
            .map(|hook| match hook {
                HookArg::Forward => Hook::Forward,
                HookArg::Input => Hook::Input,
                HookArg::Output => Hook::Output,
            })
            .collect();
        hooks.sort();
        hooks.dedup();
        hooks
    }

    /// The aggregation window.
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.aggregation_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn parses_and_checks_flags() {
        let config = Config::try_parse_from([
            "cnnf-agent",
            "--node",
            "n1",
            "--workloads",
            "inventory:/tmp/x.json",
            "--queue-first",
            "100",
            "--queue-count",
            "2",
            "--fail-mode",
            "closed",
            "--allow-unsigned-tables",
        ])
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.queues(), (100, 2));
        assert_eq!(config.fail_mode, FailMode::Closed);
        assert!(matches!(config.workloads, Some(Source::Inventory(_))));

        assert!(Config::try_parse_from(["cnnf-agent", "--workloads", "podman:/x"]).is_err());
        assert!(Config::try_parse_from(["cnnf-agent", "--fail-mode", "maybe"]).is_err());
        let bad = Config::try_parse_from(["cnnf-agent", "--chain-prefix", "A B"]).unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("--chain-prefix"));
        let bad = Config::try_parse_from(["cnnf-agent", "--queue-first", "65535", "--queue-count", "2"]).unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("--queue-first"));
        let bad = Config::try_parse_from(["cnnf-agent", "--node", "a.b"]).unwrap();
        assert!(bad.validate().is_err());

        let defaults = Config::try_parse_from(["cnnf-agent", "--allow-unsigned-tables"]).unwrap();
        defaults.validate().unwrap();
        assert_eq!(defaults.queue_full, QueueFull::Auto);
        assert_eq!(
            (defaults.syn_rate_per_source, defaults.syn_burst_per_source),
            (1000, 2000)
        );
        assert!(!defaults.remove_chains);
        let set = Config::try_parse_from([
            "cnnf-agent",
            "--queue-full",
            "drop",
            "--syn-rate-per-source",
            "0",
            "--syn-burst-per-source",
            "0",
            "--remove-chains",
        ])
        .unwrap();
        set.validate().unwrap();
        assert_eq!(set.queue_full, QueueFull::Drop);
        assert!(set.remove_chains);
        assert!(Config::try_parse_from(["cnnf-agent", "--queue-full", "sometimes"]).is_err());
        let bad = Config::try_parse_from(["cnnf-agent", "--syn-burst-per-source", "0"]).unwrap();
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--syn-burst-per-source"));
        let bad = Config::try_parse_from(["cnnf-agent", "--syn-rate-per-source", "2000000"]).unwrap();
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--syn-rate-per-source"));
    }

    #[test]
    fn tables_need_trusted_keys_unless_unsigned_ones_are_allowed() {
        let error = Config::try_parse_from(["cnnf-agent"]).unwrap().validate().unwrap_err();
        assert!(error.to_string().contains("--table-keys <file> is required"), "{error}");
        assert!(error.to_string().contains("table-signing.pub"), "{error}");
        let lab = Config::try_parse_from(["cnnf-agent", "--allow-unsigned-tables"]).unwrap();
        assert!(lab.table_trust().unwrap().allows_unsigned());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trusted.pub");
        let key = cnnf_signing::SigningKey::from_seed(&[3; 32]);
        std::fs::write(&path, format!("{}\n", key.public_key().to_line())).unwrap();
        let config = Config::try_parse_from(["cnnf-agent", "--table-keys", path.to_str().unwrap()]).unwrap();
        config.validate().unwrap();
        let trust = config.table_trust().unwrap();
        assert!(!trust.allows_unsigned());
        assert_eq!(trust.trusted(), [key.public_key().clone()]);

        std::fs::write(&path, key.to_text()).unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(
            error.contains("--table-keys") && error.contains("secret key"),
            "{error}"
        );
        let missing = Config::try_parse_from(["cnnf-agent", "--table-keys", "/nonexistent/keys.pub"]).unwrap();
        assert!(missing
            .validate()
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/keys.pub"));
    }
}
