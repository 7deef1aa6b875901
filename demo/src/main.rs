//! `cnnf-demo`: a storefront in network namespaces, protected by CNNF.
//!
//! `cnnf-demo up` builds the shop (front end, catalogue, carts, orders,
//! payment, shipping, user, their databases and a message queue), lists it
//! in the agent's inventory, drives its traffic until the models have
//! learned it, locks them, switches to prevent, and then plays an attacker
//! in the front end: a connection to the orders database and a network
//! scan, which must be blocked, audited and raise one incident. `cnnf-demo
//! down` removes every namespace, interface and process it made. The other
//! subcommands run inside the containers and are started by `up`.
//!
//! `scripts/up.sh` and `scripts/down.sh` start and stop CNNF around it.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use cnnf_demo::{lab, scenario, traffic};

#[derive(Debug, Parser)]
#[command(
    name = "cnnf-demo",
    version,
    about = "The CNNF storefront demo: learn, lock, enforce, attack"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct LabArgs {
    /// Prefix of every namespace and interface the demo creates.
    #[arg(long, env = "CNNF_DEMO_PREFIX", default_value = "cnnfd")]
    prefix: String,
    /// The demo's /24, by its network address.
    #[arg(long, env = "CNNF_DEMO_SUBNET", default_value = "10.213.7.0")]
    subnet: Ipv4Addr,
    /// The inventory file the agent watches (`--workloads inventory:<file>`).
    #[arg(long, env = "CNNF_DEMO_INVENTORY", default_value = ".cnnf/demo/inventory.json")]
    inventory: PathBuf,
    /// Where the demo keeps its process ids, logs and report.
    #[arg(long, env = "CNNF_DEMO_STATE_DIR", default_value = ".cnnf/demo")]
    state_dir: PathBuf,
}

// Parsed once per run: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Builds the storefront, lets CNNF learn it, enforces, and attacks it.
    Up {
        #[command(flatten)]
        lab: LabArgs,
        /// The operator gateway.
        #[arg(long, env = "CNNF_DEMO_GATEWAY", default_value = "http://127.0.0.1:9443")]
        gateway: String,
        /// An operator or admin token for the gateway.
        #[arg(long, env = "CNNF_DEMO_TOKEN")]
        token: String,
        /// NATS, for the verdict table and the incident subject.
        #[arg(long, env = "CNNF_NATS_URL", default_value = "nats://127.0.0.1:4222")]
        nats_url: String,
        /// NATS credentials (the services' creds file).
        #[arg(long, env = "CNNF_NATS_CREDS")]
        nats_creds: Option<PathBuf>,
        /// PEM file of the CAs of the NATS server's certificate.
        #[arg(long, env = "CNNF_NATS_CA")]
        nats_ca: Option<PathBuf>,
        /// The cluster the agent and services run as.
        #[arg(long, env = "CNNF_CLUSTER", default_value = "local")]
        cluster: String,
        /// The agent's node name.
        #[arg(long, env = "CNNF_NODE", default_value = "demo-node-1")]
        node: String,
        /// The agent's metrics endpoint.
        #[arg(
            long,
            env = "CNNF_DEMO_AGENT_METRICS",
            default_value = "http://127.0.0.1:9100/metrics"
        )]
        agent_metrics: String,
        /// Milliseconds between two rounds of each container's normal traffic.
        #[arg(long, default_value_t = 500)]
        traffic_interval_ms: u64,
        /// Longest wait of any one step, seconds.
        #[arg(long, default_value_t = 180)]
        step_timeout_seconds: u64,
        /// Ports the attacker's scan tries on every storefront address.
        #[arg(long, default_value = "1-1024,3306,5672,8079,27017")]
        scan_ports: String,
    },
    /// Removes every namespace, interface and process the demo created, and
    /// empties the agent's inventory.
    Down {
        #[command(flatten)]
        lab: LabArgs,
    },
    /// (inside a container) Answers every connection on a port.
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        name: String,
    },
    /// (inside a container) Connects to the given services, round after round.
    #[command(hide = true)]
    Drive {
        #[arg(long, value_delimiter = ',')]
        to: Vec<SocketAddr>,
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
    },
    /// (inside a container) One connection attempt, reported as JSON.
    #[command(hide = true)]
    Probe {
        target: SocketAddr,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() { 64 } else { 0 });
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("cnnf-demo: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Up {
            lab,
            gateway,
            token,
            nats_url,
            nats_creds,
            nats_ca,
            cluster,
            node,
            agent_metrics,
            traffic_interval_ms,
            step_timeout_seconds,
            scan_ports,
        } => {
            for (flag, path) in [("--nats-creds", &nats_creds), ("--nats-ca", &nats_ca)] {
                if let Some(path) = path {
                    if let Err(error) = std::fs::File::open(path) {
                        eprintln!("cnnf-demo: {flag} {}: cannot be read: {error}", path.display());
                        return Ok(ExitCode::from(64));
                    }
                }
            }
            let settings = scenario::Settings {
                lab: lab::Lab::new(&lab.prefix, lab.subnet)?,
                gateway,
                token,
                nats_url,
                nats: cnnf_bus::NatsOptions {
                    credentials: nats_creds,
                    ca: nats_ca,
                    ..Default::default()
                },
                cluster,
                node,
                agent_metrics,
                inventory: lab.inventory,
                state_dir: lab.state_dir,
                traffic_interval: Duration::from_millis(traffic_interval_ms),
                step_timeout: Duration::from_secs(step_timeout_seconds),
                scan_ports,
            };
            let runtime = tokio::runtime::Runtime::new()?;
            let report = runtime.block_on(scenario::up(&settings))?;
            scenario::print_report(&report);
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Command::Down { lab } => {
            lab::Lab::new(&lab.prefix, lab.subnet)?;
            scenario::clear_inventory(&lab.inventory)?;
            lab::destroy(&lab.prefix)?;
            let pids = lab.state_dir.join("pids");
            if pids.exists() {
                std::fs::remove_file(&pids)?;
            }
            println!(
                "==> the storefront is gone: no namespace, interface or process of prefix {}",
                lab.prefix
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { port, name } => {
            traffic::serve(port, &name)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Drive { to, interval_ms } => {
            traffic::drive(&to, Duration::from_millis(interval_ms))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Probe { target, timeout_ms } => {
            let result = traffic::probe(target, Duration::from_millis(timeout_ms));
            println!("{}", serde_json::to_string(&result)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
