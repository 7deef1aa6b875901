//! The command line of `cnnfctl`: global options and every subcommand,
//! with the help text a new user reads first.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use cnnf_proto::v1 as pb;

use crate::timefmt;

/// The exit codes, shown at the end of `cnnfctl --help`.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  any other failure
  2  bad arguments (also usage errors), or a request the server refused as invalid
  3  not found (object, rule, model, learned connection, file)
  4  unauthenticated, or the token's role may not do this
  5  conflict: the policy changed since it was read, the thing already exists,
     or the model's state does not allow the command
  6  the gateway (or a service behind it) cannot be reached

Errors are one line on stderr: `cnnfctl: <what failed>: <why>`.";

/// The operator CLI of CNNF.
#[derive(Debug, Parser)]
#[command(
    name = "cnnfctl",
    version,
    about = "Operate CNNF: mode, network objects, rules, models, policy files, audits and forensics",
    long_about = "Operate CNNF through its operator gateway: set the mode, manage network objects and \
                  rules, lock or relearn models, export and import the policy, and search, tail, replay \
                  and simulate audits.\n\nEvery call goes to one address (--server) with a bearer token \
                  (--token or --token-file); the token's role (viewer, operator, admin) decides what it may do.",
    after_help = EXIT_CODES
)]
pub struct Cli {
    /// Options every command takes.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct Global {
    /// The operator gateway: http://host:port, or https://host:port with --ca-cert.
    #[arg(long, global = true, env = "CNNFCTL_SERVER", default_value = "http://127.0.0.1:9443")]
    pub server: String,
    /// Bearer token sent with every call.
    #[arg(long, global = true, env = "CNNFCTL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the bearer token (surrounding blanks ignored); wins over --token.
    #[arg(long, global = true, env = "CNNFCTL_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the gateway's certificate (https only).
    #[arg(long, global = true, env = "CNNFCTL_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs --client-key.
    #[arg(long, global = true, env = "CNNFCTL_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long, global = true, env = "CNNFCTL_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
    /// table: aligned columns for people; json: one JSON document for scripts
    /// (proto3 JSON field names; `audits tail` prints one document per line).
    #[arg(long, global = true, env = "CNNFCTL_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// JSON (proto3 JSON mapping).
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show or set the firewall mode (container mode, or host mode with --host).
    #[command(subcommand)]
    Mode(ModeCommand),
    /// Network objects: named images, subnets and host apps that rules refer to.
    #[command(subcommand)]
    Objects(ObjectsCommand),
    /// Rules: a source object, allowed destinations, and what happens to the rest.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Models: what each image learned; lock, extend or restart learning.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Learned connections of one model: list them, delete one.
    #[command(subcommand)]
    Learned(LearnedCommand),
    /// Export or import the whole policy (or one rule) as a file.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Search stored audits (alerts and prevents), or follow them live.
    #[command(subcommand)]
    Audits(AuditsCommand),
    /// Rebuild the audits of a time range from the recorded decisions.
    #[command(after_help = "Example:\n  cnnfctl replay --since 2h --until 1h --image sha256:1f2e...")]
    Replay(ReplayArgs),
    /// What a candidate policy (verdict table JSON) would have decided on recorded traffic.
    #[command(
        after_help = "Example:\n  cnnfctl simulate --candidate candidate.json --since 7d\n\n\
                            The candidate is the verdict-table JSON described in the integrations guide."
    )]
    Simulate(SimulateArgs),
    /// Which workload held an address at an instant.
    #[command(after_help = "Example:\n  cnnfctl who-held 10.1.2.3 --at 2026-01-31T14:02:00Z")]
    WhoHeld(WhoHeldArgs),
    /// The policy and the model states in force at an instant.
    #[command(after_help = "Example:\n  cnnfctl state-at 2026-01-31T14:02:00Z\n  cnnfctl state-at 1h")]
    StateAt(StateAtArgs),
    /// Print a shell completion script.
    #[command(
        after_help = "Example:\n  cnnfctl completions bash > /etc/bash_completion.d/cnnfctl\n  \
                            cnnfctl completions zsh > \"${fpath[1]}/_cnnfctl\"\n  \
                            cnnfctl completions fish > ~/.config/fish/completions/cnnfctl.fish"
    )]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `mode` subcommands.
#[derive(Debug, Subcommand)]
pub enum ModeCommand {
    /// Show the container mode and the host mode.
    Get,
    /// Set the container mode (or the host mode with --host). Needs role admin.
    #[command(
        after_help = "Modes:\n  learn    (also `disabled`) learn and observe; nothing is blocked or audited\n  \
                            alert    anomalous connections are allowed and audited\n  \
                            prevent  anomalous connections are dropped and audited\n\n\
                            Example:\n  cnnfctl mode set alert\n  cnnfctl mode set prevent --host"
    )]
    Set {
        /// The new mode.
        #[arg(value_enum)]
        mode: ModeArg,
        /// Set the host mode (host apps) instead of the container mode.
        #[arg(long)]
        host: bool,
        /// Write only if the policy is still at this revision (else exit 5).
        #[arg(long)]
        revision: Option<u64>,
    },
}

/// Modes as typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Learn and observe only (the product default, `disabled`).
    #[value(alias = "disabled")]
    Learn,
    /// Allow and audit anomalous connections.
    Alert,
    /// Drop and audit anomalous connections.
    Prevent,
}

impl ModeArg {
    /// The protobuf mode.
    pub fn proto(self) -> pb::Mode {
        match self {
            ModeArg::Learn => pb::Mode::Disabled,
            ModeArg::Alert => pb::Mode::Alert,
            ModeArg::Prevent => pb::Mode::Prevent,
        }
    }
}

/// The kind-specific fields of a network object; exactly one kind.
#[derive(Debug, Clone, Args)]
#[group(id = "kind", multiple = false)]
pub struct ObjectKindArgs {
    /// An image object: all containers of this image ID (digest).
    #[arg(long)]
    pub image_id: Option<String>,
    /// An image object by name: `repo:tag`, or a prefix ending in `*`.
    #[arg(long)]
    pub image_name: Option<String>,
    /// A subnet object: CIDRs or single addresses (repeat, or comma-separate).
    #[arg(long = "cidr", value_delimiter = ',')]
    pub cidrs: Vec<String>,
    /// A host-app object: the systemd unit.
    #[arg(long)]
    pub host_app: Option<String>,
}

/// `objects` subcommands.
#[derive(Debug, Subcommand)]
pub enum ObjectsCommand {
    /// List network objects.
    List,
    /// Show one network object.
    Show {
        /// The object's name.
        name: String,
    },
    /// Create a network object (exit 5 if the name exists). Needs role operator.
    #[command(after_help = "Examples:\n  cnnfctl objects create db --image-id sha256:1f2e...\n  \
                            cnnfctl objects create web --image-name 'registry.example/web*'\n  \
                            cnnfctl objects create office --cidr 192.0.2.0/24 --cidr 198.51.100.7\n  \
                            cnnfctl objects create sshd --host-app sshd.service --description 'the SSH daemon'")]
    Create {
        /// Unique name of the object.
        name: String,
        /// What the object is.
        #[command(flatten)]
        kind: ObjectKindArgs,
        /// Free text.
        #[arg(long)]
        description: Option<String>,
        /// Write only if the policy is still at this revision (else exit 5).
        #[arg(long)]
        revision: Option<u64>,
    },
    /// Change a network object (exit 3 if it does not exist). Needs role operator.
    #[command(after_help = "Example:\n  cnnfctl objects update office --cidr 192.0.2.0/24,203.0.113.0/24")]
    Update {
        /// The object's name.
        name: String,
        /// A new kind and value (replaces the old ones).
        #[command(flatten)]
        kind: ObjectKindArgs,
        /// A new description.
        #[arg(long)]
        description: Option<String>,
        /// Write only if the policy is still at this revision (else exit 5).
        #[arg(long)]
        revision: Option<u64>,
    },
    /// Delete a network object (exit 3 if it does not exist). Needs role operator.
    Delete {
        /// The object's name.
        name: String,
        /// Write only if the policy is still at this revision (else exit 5).
        #[arg(long)]
        revision: Option<u64>,
    },
}

/// Protocols as typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProtocolArg {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP.
    Icmp,
    /// Any protocol.
    Any,
}

impl ProtocolArg {
    /// The protobuf protocol.
    pub fn proto(self) -> pb::Protocol {
        match self {
            ProtocolArg::Tcp => pb::Protocol::Tcp,
            ProtocolArg::Udp => pb::Protocol::Udp,
            ProtocolArg::Icmp => pb::Protocol::Icmp,
            ProtocolArg::Any => pb::Protocol::Any,
        }
    }
}

/// What a destination does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ActionArg {
    /// The destination is allowed.
    Allow,
    /// Traffic to it is allowed and audited, even where another rule allows it.
    Alert,
    /// Traffic to it is dropped and audited, even where another rule allows it.
    Prevent,
}

/// What happens to the rest of a rule source's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EffectArg {
    /// Allowed and audited.
    Alert,
    /// Dropped and audited.
    Prevent,
}

impl EffectArg {
    /// The protobuf effect.
    pub fn proto(self) -> pb::RuleEffect {
        match self {
            EffectArg::Alert => pb::RuleEffect::Alert,
            EffectArg::Prevent => pb::RuleEffect::Prevent,
        }
    }
}

/// Destination flags shared by `rules create` and `rules update`.
#[derive(Debug, Clone, Args)]
pub struct DestinationArgs {
    /// A destination object (name, or the image ID / name / unit of an object); repeat for several.
    #[arg(long = "to")]
    pub to: Vec<String>,
    /// Ports of the destinations: 5432, 8000-8080; repeat or comma-separate (default: every port).
    #[arg(long = "port", value_delimiter = ',', value_parser = parse_port_range)]
    pub ports: Vec<pb::PortRange>,
    /// Protocol of the destinations.
    #[arg(long, value_enum, default_value_t = ProtocolArg::Tcp)]
    pub protocol: ProtocolArg,
    /// What the destinations get: allow, or alert/prevent even where another rule allows.
    #[arg(long, value_enum, default_value_t = ActionArg::Allow)]
    pub action: ActionArg,
}

/// `rules` subcommands.
#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// List rules.
    List,
    /// Show one rule.
    Show {
        /// The rule's id.
        id: String,
    },
    /// Create a rule (exit 5 if the id exists). Needs role operator.
    #[command(after_help = "Examples:\n  \
        cnnfctl rules create --id web-db --from web --to db --port 5432 --action allow --effect prevent\n  \
        cnnfctl rules create --from web --to office --port 1-1024 --protocol any --action prevent --allow-learned\n\n\
        The source and destinations are object names (an image ID, image name or unit that\n\
        exactly one object holds works too). Without --id the rule gets one made of its parts.")]
    Create {
        /// The rule's id (default: made from source, destination and ports).
        #[arg(long)]
        id: Option<String>,
        /// The source object.
        #[arg(long)]
        from: String,
        /// The destinations.
        #[command(flatten)]
        destinations: DestinationArgs,
        /// Allow what the source's model learned before applying --effect.
        #[arg(long)]
        allow_learned: bool,
        /// What happens to the rest of the source's traffic.
        #[arg(long, value_enum, default_value_t = EffectArg::Alert)]
        effect: EffectArg,
        /// Keep the rule but take no part in decisions.
        #[arg(long)]
        disabled: bool,
        /// Free text.
        #[arg(long)]
        description: Option<String>,
        /// Write only if the policy is still at this revision (else exit 5).
        #[arg(long)]
        revision: Option<u64>,
    },
    /// Change a rule (exit 3 if it does not exist); --to replaces all destinations. Needs role operator.
    #[command(after_help = "Examples:\n  cnnfctl rules update web-db --effect alert\n  \
                            cnnfctl rules update web-db --to db --port 5432,5433 --action allow\n  \
                            cnnfctl rules update web-db --enabled false")]
    Update {
        /// The rule's id.
        id: String,
        /// A new source object.
        #[arg(long)]
        from: Option<String>,
        /// New destinations (given --to replaces all of them).
        #[command(flatten)]
        destinations: DestinationArgs,
        /// Allow learned connections (true or false).
        #[arg(long)]
        allow_learned: Option<bool>,
        /// A new fallback effect.
        #[arg(long, value_enum)]
        effect: Option<EffectArg>,
        /// Enable or disable the rule (true or false).
        #[arg(long)]
        enabled: Option<bool>,
        /// A new description.
        #[arg(long)]
        description: Option<String>,
        /// Write only if the policy is still at this revision (else exit 5).
        #[arg(long)]
        revision: Option<u64>,
    },
    /// Delete a rule (exit 3 if it does not exist). Needs role operator.
    Delete {
        /// The rule's id.
        id: String,
        /// Write only if the policy is still at this revision (else exit 5).
        #[arg(long)]
        revision: Option<u64>,
    },
}

/// `models` subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// List models with their state and counts.
    List,
    /// Show one model.
    Show {
        /// Image ID (or an image name exactly one model has).
        image: String,
    },
    /// End learning now: the model enforces. Needs role operator.
    Lock {
        /// Image ID (or an image name exactly one model has).
        image: String,
    },
    /// Learn longer. Needs role operator.
    #[command(after_help = "Example:\n  cnnfctl models extend sha256:1f2e... --by 1h")]
    Extend {
        /// Image ID (or an image name exactly one model has).
        image: String,
        /// How much longer: 90s, 15m, 2h, 7d.
        #[arg(long, value_parser = parse_positive_duration)]
        by: i64,
    },
    /// Forget everything learned and learn again. Needs role operator.
    Relearn {
        /// Image ID (or an image name exactly one model has).
        image: String,
    },
}

/// Sides as typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SideArg {
    /// What the image's containers are reached on, and from whom.
    Inbound,
    /// What the image's containers reach.
    Outbound,
}

impl SideArg {
    /// The protobuf side.
    pub fn proto(self) -> pb::Side {
        match self {
            SideArg::Inbound => pb::Side::Inbound,
            SideArg::Outbound => pb::Side::Outbound,
        }
    }
}

/// `learned` subcommands.
#[derive(Debug, Subcommand)]
pub enum LearnedCommand {
    /// List the learned connections of a model.
    List {
        /// Image ID (or an image name exactly one model has).
        image: String,
        /// Only this side.
        #[arg(long, value_enum)]
        side: Option<SideArg>,
        /// Only this port.
        #[arg(long)]
        port: Option<u16>,
        /// Only this peer (image ID, unit or object name).
        #[arg(long)]
        peer: Option<String>,
    },
    /// Delete one learned connection (exit 3 if there is none). Needs role operator.
    #[command(
        after_help = "Example:\n  cnnfctl learned delete sha256:1f2e... --side outbound --peer sha256:9a8b... --port 5432"
    )]
    Delete {
        /// Image ID (or an image name exactly one model has).
        image: String,
        /// The other end: image ID, unit or object name.
        #[arg(long)]
        peer: String,
        /// The port.
        #[arg(long)]
        port: u16,
        /// The model's side.
        #[arg(long, value_enum)]
        side: SideArg,
        /// The protocol, when the same peer and port were learned with several.
        #[arg(long, value_enum)]
        protocol: Option<ProtocolArg>,
    },
}

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// The policy document (schema cnnf.policy/v1).
    Json,
    /// Kubernetes NetworkPolicy YAML of the learned policy.
    Kubernetes,
}

/// `policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Write the policy document (or one rule, or Kubernetes NetworkPolicies) to stdout or a file.
    #[command(after_help = "Examples:\n  cnnfctl policy export -o policy.json\n  \
                            cnnfctl policy export --rule web-db > web-db.json\n  \
                            cnnfctl policy export --format kubernetes -o netpol.yaml")]
    Export {
        /// Export only this rule.
        #[arg(long)]
        rule: Option<String>,
        /// The format.
        #[arg(long, value_enum, default_value_t = ExportFormat::Json)]
        format: ExportFormat,
        /// Write to this file instead of stdout.
        #[arg(short = 'o', long = "out")]
        out: Option<PathBuf>,
    },
    /// Import a policy document: a whole policy REPLACES objects, rules and modes
    /// (needs role admin); a rule document adds or replaces that rule.
    #[command(
        after_help = "Examples:\n  cnnfctl policy import policy.json\n  cnnfctl policy import --rule web-db.json"
    )]
    Import {
        /// The document (cnnf.policy/v1 JSON); `-` reads stdin.
        file: PathBuf,
        /// Refuse the file unless it is a single-rule document (a safety net).
        #[arg(long)]
        rule: bool,
        /// Write only if the policy is still at this revision (else exit 5).
        #[arg(long)]
        revision: Option<u64>,
    },
}

/// Verdicts audits carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VerdictArg {
    /// Allowed and audited.
    Alert,
    /// Dropped and audited.
    Prevent,
    /// The container was stopped.
    Block,
}

/// Filters shared by the audit commands.
#[derive(Debug, Clone, Args)]
pub struct AuditFilterArgs {
    /// Audits where this image ID is the source or the destination.
    #[arg(long)]
    pub image: Option<String>,
    /// Audits of this node.
    #[arg(long)]
    pub node: Option<String>,
    /// Audits of this cluster.
    #[arg(long)]
    pub cluster: Option<String>,
    /// Audits with this verdict.
    #[arg(long, value_enum)]
    pub verdict: Option<VerdictArg>,
    /// Audits decided by this rule id.
    #[arg(long, conflicts_with = "decided_by")]
    pub rule: Option<String>,
    /// Audits decided by this: rule:<id>, model:<image-id>, mode or default.
    #[arg(long)]
    pub decided_by: Option<String>,
}

impl AuditFilterArgs {
    /// The protobuf filter.
    pub fn proto(&self) -> pb::AuditFilter {
        pb::AuditFilter {
            image_id: self.image.clone().unwrap_or_default(),
            node: self.node.clone().unwrap_or_default(),
            verdict: match self.verdict {
                None => pb::Verdict::Unspecified,
                Some(VerdictArg::Alert) => pb::Verdict::Alert,
                Some(VerdictArg::Prevent) => pb::Verdict::Prevent,
                Some(VerdictArg::Block) => pb::Verdict::Block,
            } as i32,
            decided_by: match (&self.rule, &self.decided_by) {
                (Some(rule), _) => format!("rule:{rule}"),
                (None, Some(by)) => by.clone(),
                (None, None) => String::new(),
            },
            cluster: self.cluster.clone().unwrap_or_default(),
        }
    }
}

/// `audits` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditsCommand {
    /// Stored audits first seen in a time range, oldest first.
    #[command(
        after_help = "Times are RFC 3339 (2026-01-31T14:02:00Z), `now`, or how long ago (15m, 2h, 7d).\n\n\
                            Examples:\n  cnnfctl audits list --since 15m --verdict prevent\n  \
                            cnnfctl audits list --since 2026-01-31T00:00:00Z --until 2026-02-01T00:00:00Z --all\n  \
                            cnnfctl audits list --since 1d --limit 50 --page-token <token from the last page>"
    )]
    List {
        /// Start of the range (first seen at or after).
        #[arg(long, value_parser = timefmt::parse_time, default_value = "1h")]
        since: i64,
        /// End of the range (first seen before); default: no end.
        #[arg(long, value_parser = timefmt::parse_time)]
        until: Option<i64>,
        /// The filters.
        #[command(flatten)]
        filter: AuditFilterArgs,
        /// At most this many audits per page (1 to 1000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// Continue after a previous page (its next page token).
        #[arg(long, conflicts_with = "all")]
        page_token: Option<String>,
        /// Fetch every page.
        #[arg(long)]
        all: bool,
    },
    /// Follow audits as they are published (until Ctrl-C, or --count).
    #[command(
        after_help = "Examples:\n  cnnfctl audits tail --verdict prevent\n  cnnfctl audits tail --count 1 --output json"
    )]
    Tail {
        /// The filters.
        #[command(flatten)]
        filter: AuditFilterArgs,
        /// Stop after this many audits.
        #[arg(long)]
        count: Option<u64>,
    },
}

/// `replay` arguments.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Start of the range of decision times.
    #[arg(long, value_parser = timefmt::parse_time)]
    pub since: i64,
    /// End of the range (default: now).
    #[arg(long, value_parser = timefmt::parse_time)]
    pub until: Option<i64>,
    /// The filters.
    #[command(flatten)]
    pub filter: AuditFilterArgs,
    /// At most this many audits (0: the service's default).
    #[arg(long, default_value_t = 0)]
    pub max_audits: u32,
}

/// `simulate` arguments.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// The candidate verdict table (JSON).
    #[arg(long)]
    pub candidate: PathBuf,
    /// Start of the range of recorded decisions.
    #[arg(long, value_parser = timefmt::parse_time)]
    pub since: i64,
    /// End of the range (default: now).
    #[arg(long, value_parser = timefmt::parse_time)]
    pub until: Option<i64>,
}

/// `who-held` arguments.
#[derive(Debug, Args)]
pub struct WhoHeldArgs {
    /// The IPv4 or IPv6 address.
    pub address: String,
    /// The instant (default: now).
    #[arg(long, value_parser = timefmt::parse_time)]
    pub at: Option<i64>,
}

/// `state-at` arguments.
#[derive(Debug, Args)]
pub struct StateAtArgs {
    /// The instant: RFC 3339, `now`, or how long ago (1h).
    #[arg(value_parser = timefmt::parse_time)]
    pub at: i64,
}

/// Parses `5432` or `8000-8080` into a port range.
pub fn parse_port_range(text: &str) -> Result<pb::PortRange, String> {
    let port = |part: &str| -> Result<u32, String> {
        match part.trim().parse::<u32>() {
            Ok(port) if (1..=65535).contains(&port) => Ok(port),
            _ => Err(format!("{part:?} is not a port (1 to 65535)")),
        }
    };
    match text.split_once('-') {
        None => Ok(pb::PortRange {
            first: port(text)?,
            last: 0,
        }),
        Some((first, last)) => {
            let (first, last) = (port(first)?, port(last)?);
            if last < first {
                return Err(format!("{text:?}: the range ends before it starts"));
            }
            Ok(pb::PortRange { first, last })
        }
    }
}

fn parse_positive_duration(text: &str) -> Result<i64, String> {
    match timefmt::parse_duration(text)? {
        0 => Err("the duration must be more than 0".to_owned()),
        seconds => Ok(seconds),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn port_ranges() {
        assert_eq!(parse_port_range("5432"), Ok(pb::PortRange { first: 5432, last: 0 }));
        assert_eq!(
            parse_port_range("8000-8080"),
            Ok(pb::PortRange {
                first: 8000,
                last: 8080
            })
        );
        assert!(parse_port_range("0").unwrap_err().contains("not a port"));
        assert!(parse_port_range("70000").unwrap_err().contains("not a port"));
        assert!(parse_port_range("90-80").unwrap_err().contains("ends before"));
        assert!(parse_port_range("http").is_err());
    }
}
