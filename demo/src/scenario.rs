//! The demo's story, step by step, against a running CNNF: the storefront
//! comes up in its namespaces and is listed in the agent's inventory; its
//! traffic flows until every image's model has learned its connections;
//! the models are locked and the cluster switched to prevent; once the
//! agent holds that table, an attacker in the front end tries the orders
//! database and scans the network. Each step waits on what the system
//! reports (models, the verdict table in KV, the agent's table version, the
//! audit API, the incident subject), never on a fixed sleep, and gives up
//! with a message naming what it waited for.
//!
//! The operator calls go through the gateway with a bearer token, as
//! `cnnfctl` and Radar do.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use cnnf_core::subjects::{self, Token};
use cnnf_proto::v1::audits_client::AuditsClient;
use cnnf_proto::v1::models_client::ModelsClient;
use cnnf_proto::v1::policy_client::PolicyClient;
use cnnf_proto::v1::{
    envelope::Payload, incident, model_command, policy_event, AuditFilter, Envelope, GetPolicyRequest,
    ListAuditsRequest, ListModelsRequest, Mode, ModelCommand, ModelState, ModelSummary, PolicyCommand, PolicyEvent,
    Verdict, VerdictTable,
};
use futures::StreamExt as _;
use prost::Message as _;
use serde::Serialize;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::lab::Lab;
use crate::storefront::{self, image_id, Service, COMPROMISED, EDGES, SERVICES, TARGET_DATABASE};
use crate::traffic::ProbeResult;

/// Where the demo finds CNNF and how it runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The lab (prefix and subnet).
    pub lab: Lab,
    /// The operator gateway, `http://host:port`.
    pub gateway: String,
    /// An operator or admin token for the gateway.
    pub token: String,
    /// NATS, for the verdict table and the incident subject.
    pub nats_url: String,
    /// How to log in to NATS (creds, TLS).
    pub nats: cnnf_bus::NatsOptions,
    /// The cluster and node the agent runs as.
    pub cluster: String,
    /// The agent's node name.
    pub node: String,
    /// The agent's metrics endpoint, `http://host:port/metrics`.
    pub agent_metrics: String,
    /// The inventory file the agent watches.
    pub inventory: PathBuf,
    /// Where the demo keeps its own state (process ids, the report).
    pub state_dir: PathBuf,
    /// Milliseconds between two rounds of normal traffic per container.
    pub traffic_interval: Duration,
    /// The longest any one step may wait.
    pub step_timeout: Duration,
    /// Ports the attacker's scan probes on every storefront host.
    pub scan_ports: String,
}

/// One thing the attacker tried, what the demo expected and what happened.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Check {
    /// What was checked.
    pub what: String,
    /// What a protected storefront shows.
    pub expected: String,
    /// What was seen.
    pub observed: String,
    /// Whether the two agree.
    pub passed: bool,
}

/// What the demo reports at the end (also written as JSON to
/// `<state dir>/report.json`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Report {
    /// Each check, in the order made.
    pub checks: Vec<Check>,
    /// The verdict-table version the attack met.
    pub table_version: u64,
    /// Audits the attack produced (aggregated).
    pub audits: usize,
    /// Incidents raised for the compromised container's image.
    pub incidents: usize,
}

impl Report {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|check| check.passed)
    }
}

type Authed = InterceptedService<Channel, BearerToken>;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerToken(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

struct Clients {
    models: ModelsClient<Authed>,
    policy: PolicyClient<Authed>,
    audits: AuditsClient<Authed>,
}

fn say(message: impl AsRef<str>) {
    println!("==> {}", message.as_ref());
}

/// Writes the inventory the agent watches: one workload per service.
pub fn write_inventory(settings: &Settings) -> anyhow::Result<()> {
    let workloads: Vec<_> = SERVICES
        .iter()
        .enumerate()
        .map(|(index, service)| {
            serde_json::json!({
                "container_id": format!("{}-{}", settings.lab.namespace(service), index),
                "container_name": service.name,
                "image_id": image_id(service.image),
                "image_name": service.image,
                "addresses": [settings.lab.address_of(index).to_string()],
                "labels": {"app": "storefront", "service": service.name},
                "namespace": "storefront",
                "interface": settings.lab.host_veth(index),
            })
        })
        .collect();
    let text = serde_json::to_vec_pretty(&serde_json::json!({ "workloads": workloads }))?;
    if let Some(parent) = settings.inventory.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let temporary = settings.inventory.with_extension("tmp");
    std::fs::write(&temporary, text).with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, &settings.inventory)
        .with_context(|| format!("replacing {}", settings.inventory.display()))
}

/// Empties the inventory, so the agent stops and unqueues the demo's
/// workloads. A missing file stays missing.
pub fn clear_inventory(inventory: &std::path::Path) -> anyhow::Result<()> {
    if inventory.exists() {
        std::fs::write(inventory, br#"{"workloads": []}"#)
            .with_context(|| format!("emptying {}", inventory.display()))?;
    }
    Ok(())
}

fn address(settings: &Settings, service: &Service) -> SocketAddr {
    let index = storefront::index_of(service.name).expect("a storefront service");
    SocketAddr::from((settings.lab.address_of(index), service.port))
}

/// Starts the servers and the traffic drivers inside the namespaces,
/// detached; their process ids go to `<state dir>/pids`.
pub fn start_processes(settings: &Settings) -> anyhow::Result<()> {
    let me = std::env::current_exe().context("finding the cnnf-demo executable")?;
    let me = me.to_str().context("the cnnf-demo path is not UTF-8")?;
    let logs = settings.state_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut pids = Vec::new();
    let mut spawn = |service: &Service, role: &str, args: Vec<String>| -> anyhow::Result<()> {
        let log = std::fs::File::create(logs.join(format!("{}-{role}.log", service.name)))?;
        let mut command = settings.lab.command_in(service, me);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command
            .spawn()
            .with_context(|| format!("starting the {role} of {}", service.name))?;
        pids.push(child.id());
        Ok(())
    };
    for service in SERVICES {
        spawn(
            service,
            "server",
            vec![
                "serve".into(),
                "--port".into(),
                service.port.to_string(),
                "--name".into(),
                service.name.into(),
            ],
        )?;
    }
    for service in SERVICES {
        let targets = storefront::targets_of(service.name);
        if targets.is_empty() {
            continue;
        }
        let to: Vec<String> = targets
            .iter()
            .map(|target| address(settings, target).to_string())
            .collect();
        spawn(
            service,
            "traffic",
            vec![
                "drive".into(),
                "--to".into(),
                to.join(","),
                "--interval-ms".into(),
                settings.traffic_interval.as_millis().to_string(),
            ],
        )?;
    }
    let text: String = pids.iter().map(|pid| format!("{pid}\n")).collect();
    std::fs::write(settings.state_dir.join("pids"), text).context("writing the process ids")
}

async fn connect(settings: &Settings) -> anyhow::Result<Clients> {
    let channel = Channel::from_shared(settings.gateway.clone())
        .with_context(|| format!("--gateway {:?} is not a URL", settings.gateway))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to the gateway at {}", settings.gateway))?;
    let header = format!("Bearer {}", settings.token)
        .parse()
        .context("the token has characters a header cannot carry")?;
    let token = BearerToken(header);
    Ok(Clients {
        models: ModelsClient::with_interceptor(channel.clone(), token.clone()),
        policy: PolicyClient::with_interceptor(channel.clone(), token.clone()),
        audits: AuditsClient::with_interceptor(channel, token),
    })
}

/// Polls `probe` every 250 ms until it returns `Some`, or fails after the
/// step timeout with a message naming `what`.
async fn wait_for<T, F, Fut>(settings: &Settings, what: &str, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let started = Instant::now();
    let mut last_error = None;
    loop {
        match probe().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(error) => last_error = Some(error),
        }
        if started.elapsed() > settings.step_timeout {
            match last_error {
                Some(error) => bail!(
                    "gave up after {:?} waiting for {what}: {error:#}",
                    settings.step_timeout
                ),
                None => bail!("gave up after {:?} waiting for {what}", settings.step_timeout),
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn list_models(client: &mut ModelsClient<Authed>) -> anyhow::Result<BTreeMap<String, ModelSummary>> {
    let mut models = BTreeMap::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_models(ListModelsRequest {
                page_size: 1000,
                page_token: page_token.clone(),
            })
            .await
            .context("listing models")?
            .into_inner();
        models.extend(page.models.into_iter().map(|model| (model.image_id.clone(), model)));
        if page.next_page_token.is_empty() {
            return Ok(models);
        }
        page_token = page.next_page_token;
    }
}

/// The outbound connections (server image, port) each client image makes.
fn expected_outbound() -> BTreeMap<String, BTreeSet<(String, u16)>> {
    let mut expected: BTreeMap<String, BTreeSet<(String, u16)>> = BTreeMap::new();
    for (from, to) in EDGES {
        let from = storefront::service(from).expect("known service");
        let to = storefront::service(to).expect("known service");
        expected
            .entry(image_id(from.image))
            .or_default()
            .insert((image_id(to.image), to.port));
    }
    expected
}

fn storefront_images() -> BTreeSet<String> {
    SERVICES.iter().map(|service| image_id(service.image)).collect()
}

async fn learn_and_lock(settings: &Settings, clients: &mut Clients) -> anyhow::Result<()> {
    say("letting the models learn the storefront's traffic");
    let expected = expected_outbound();
    let images = storefront_images();
    wait_for(settings, "every storefront image to learn its connections", || {
        let mut client = clients.models.clone();
        let expected = expected.clone();
        let images = images.clone();
        async move {
            let models = list_models(&mut client).await?;
            let learned = images.iter().all(|image| {
                models.get(image).is_some_and(|model| {
                    let outbound = expected.get(image).map_or(0, BTreeSet::len) as u64;
                    model.outbound_count >= outbound
                })
            });
            Ok(learned.then_some(()))
        }
    })
    .await?;
    say("locking every model: from now on what they learned is what is allowed");
    for image in &images {
        clients
            .models
            .command(ModelCommand {
                image_id: image.clone(),
                actor: "cnnf-demo".into(),
                command: Some(model_command::Command::LockNow(true)),
            })
            .await
            .with_context(|| format!("locking the model of {image}"))?;
    }
    wait_for(settings, "every storefront model to enforce", || {
        let mut client = clients.models.clone();
        let images = images.clone();
        async move {
            let models = list_models(&mut client).await?;
            let enforcing = images.iter().all(|image| {
                models
                    .get(image)
                    .is_some_and(|model| model.state == ModelState::Enforcing as i32)
            });
            Ok(enforcing.then_some(()))
        }
    })
    .await
}

async fn switch_to_prevent(clients: &mut Clients) -> anyhow::Result<()> {
    say("switching the cluster to prevent: anything not learned is dropped and audited");
    let snapshot = clients
        .policy
        .get_policy(GetPolicyRequest {})
        .await
        .context("reading the policy")?
        .into_inner();
    clients
        .policy
        .apply(PolicyCommand {
            expected_revision: snapshot.revision,
            change: Some(PolicyEvent {
                actor: "cnnf-demo".into(),
                change: Some(policy_event::Change::ModeSet(policy_event::ModeSet {
                    mode: Mode::Prevent as i32,
                    host: false,
                })),
                ..PolicyEvent::default()
            }),
        })
        .await
        .context("setting the mode to prevent")?;
    Ok(())
}

/// Waits until the node's table in KV is in prevent with every storefront
/// model enforcing, then until the agent reports holding that version.
async fn wait_enforced(settings: &Settings, nats: &async_nats::Client) -> anyhow::Result<u64> {
    let js = async_nats::jetstream::new(nats.clone());
    let store = js
        .get_key_value(cnnf_bus::topology::VERDICTS_BUCKET)
        .await
        .context("opening the verdict-table bucket")?;
    let key = subjects::verdict_key(
        &Token::new("cluster", &settings.cluster)?,
        &Token::new("node", &settings.node)?,
    );
    let images = storefront_images();
    let version = wait_for(settings, "a prevent-mode verdict table with every model locked", || {
        let store = store.clone();
        let key = key.clone();
        let images = images.clone();
        async move {
            let Some(bytes) = store.get(&key).await.context("reading the verdict table")? else {
                return Ok(None);
            };
            // The value is the policy's signed table; the agent verifies
            // it, the demo only reads what was published.
            let table = cnnf_signing::unverified_table(&bytes).context("reading the signed verdict table")?;
            let table = VerdictTable::decode(table.as_slice()).context("decoding the verdict table")?;
            let enforcing: BTreeSet<String> = table
                .models
                .iter()
                .filter(|model| model.state == ModelState::Enforcing as i32)
                .map(|model| model.image_id.clone())
                .collect();
            let ready = table.mode == Mode::Prevent as i32 && images.is_subset(&enforcing);
            Ok(ready.then_some(table.version))
        }
    })
    .await?;
    say(format!("waiting for the agent to hold verdict table {version}"));
    wait_for(settings, "the agent to hold the prevent table", || {
        let url = settings.agent_metrics.clone();
        async move {
            let held = agent_table_version(&url).await?;
            Ok((held >= version).then_some(()))
        }
    })
    .await?;
    Ok(version)
}

/// `cnnf_agent_table_version` from the agent's metrics endpoint.
async fn agent_table_version(url: &str) -> anyhow::Result<u64> {
    let text = http_get(url).await?;
    text.lines()
        .find_map(|line| line.strip_prefix("cnnf_agent_table_version "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map(|value| value as u64)
        .with_context(|| format!("{url} does not report cnnf_agent_table_version"))
}

/// A plain HTTP/1.1 GET of `http://host:port/path`.
async fn http_get(url: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: only http:// is supported"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = tokio::net::TcpStream::connect(host)
        .await
        .with_context(|| format!("connecting to {host}"))?;
    stream
        .write_all(format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}

/// Runs `cnnf-demo probe` inside `from`'s namespace.
fn probe_from(settings: &Settings, from: &Service, target: SocketAddr) -> anyhow::Result<ProbeResult> {
    let me = std::env::current_exe()?;
    let output = settings
        .lab
        .command_in(from, me.to_str().context("the cnnf-demo path is not UTF-8")?)
        .args(["probe", &target.to_string(), "--timeout-ms", "3000"])
        .stdin(Stdio::null())
        .output()
        .context("running the probe")?;
    serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "the probe printed no result: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )
    })
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as i64)
}

async fn attack(settings: &Settings, clients: &mut Clients, nats: &async_nats::Client) -> anyhow::Result<Report> {
    let attacker = storefront::service(COMPROMISED).expect("known service");
    let database = storefront::service(TARGET_DATABASE).expect("known service");
    let catalogue = storefront::service("catalogue").expect("known service");
    let attacker_image = image_id(attacker.image);
    let incident_subject = format!("cnnf.incident.{}.>", settings.cluster);
    let mut incidents = nats
        .subscribe(incident_subject.clone())
        .await
        .with_context(|| format!("subscribing to {incident_subject}"))?;
    let since = now_nanos();
    let mut checks = Vec::new();

    say(format!(
        "the attacker holds {COMPROMISED}; first, the shop still works: {COMPROMISED} -> catalogue"
    ));
    let normal = probe_from(settings, attacker, address(settings, catalogue))?;
    checks.push(Check {
        what: format!("{COMPROMISED} -> catalogue:{} (learned)", catalogue.port),
        expected: "connected".into(),
        observed: describe(&normal),
        passed: normal.connected,
    });

    say(format!(
        "the attacker tries another service's database: {COMPROMISED} -> {TARGET_DATABASE}:{}",
        database.port
    ));
    let lateral = probe_from(settings, attacker, address(settings, database))?;
    checks.push(Check {
        what: format!("{COMPROMISED} -> {TARGET_DATABASE}:{} (never learned)", database.port),
        expected: "refused (SYN dropped)".into(),
        observed: describe(&lateral),
        passed: !lateral.connected,
    });

    let first = settings.lab.address_of(0);
    let last = settings.lab.address_of(SERVICES.len() - 1);
    let range = format!("{}-{}", first, last.octets()[3]);
    say(format!(
        "the attacker scans the network with nmap: {range}, ports {}",
        settings.scan_ports
    ));
    let scan = settings
        .lab
        .command_in(attacker, "nmap")
        .args([
            "-sT",
            "-Pn",
            "-n",
            "-T5",
            "--max-retries",
            "0",
            "--host-timeout",
            "60s",
            "-p",
            &settings.scan_ports,
            &range,
        ])
        .stdin(Stdio::null())
        .output()
        .context("running nmap (install the nmap package)")?;
    let scan_text = String::from_utf8_lossy(&scan.stdout);
    let open_ports = scan_text
        .lines()
        .filter(|line| line.contains("/tcp") && line.contains(" open "))
        .count();
    checks.push(Check {
        what: "nmap scan from the front end".into(),
        expected: "only the front end's learned peers answer".into(),
        observed: format!("{open_ports} open ports seen"),
        passed: scan.status.success() && open_ports <= storefront::targets_of(COMPROMISED).len() + 1,
    });

    say("waiting for the audit of the blocked database connection");
    let database_address = address(settings, database).ip().to_string();
    let audits = wait_for(settings, "an audit of the blocked database connection", || {
        let mut audits_client = clients.audits.clone();
        let attacker_image = attacker_image.clone();
        let database_address = database_address.clone();
        let port = u32::from(database.port);
        async move {
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = audits_client
                    .list_audits(ListAuditsRequest {
                        from_unix_nanos: since - 60_000_000_000,
                        to_unix_nanos: 0,
                        filter: Some(AuditFilter {
                            image_id: attacker_image.clone(),
                            verdict: Verdict::Prevent as i32,
                            ..AuditFilter::default()
                        }),
                        page_size: 1000,
                        page_token: page_token.clone(),
                    })
                    .await
                    .context("listing audits")?
                    .into_inner();
                all.extend(page.audits);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            let found = all.iter().any(|audit| {
                audit
                    .destination
                    .as_ref()
                    .is_some_and(|to| to.address == database_address && to.port == port)
            });
            Ok(found.then_some(all))
        }
    })
    .await;
    let (audit_count, audit_seen) = match &audits {
        Ok(all) => (
            all.len(),
            format!(
                "{} prevent audits from {COMPROMISED}, the database one among them",
                all.len()
            ),
        ),
        Err(error) => (0, format!("{error:#}")),
    };
    checks.push(Check {
        what: format!("audit of {COMPROMISED} -> {TARGET_DATABASE}"),
        expected: "a prevent audit naming both ends".into(),
        observed: audit_seen,
        passed: audits.is_ok(),
    });

    say("waiting for the port-scan incident");
    let deadline = Instant::now() + settings.step_timeout;
    let mut scan_incidents = 0usize;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline.into(), incidents.next()).await {
        let Ok(envelope) = Envelope::decode(message.payload) else {
            continue;
        };
        if let Some(Payload::Incident(incident)) = envelope.payload {
            if incident.kind == incident::Kind::PortScan as i32 && incident.image_id == attacker_image {
                scan_incidents += 1;
                say(format!("incident: {}", incident.summary));
                // Give a second incident for the same scan the chance to show.
                let settle = Instant::now() + Duration::from_secs(3);
                while let Ok(Some(message)) = tokio::time::timeout_at(settle.into(), incidents.next()).await {
                    if let Ok(Envelope {
                        payload: Some(Payload::Incident(other)),
                        ..
                    }) = Envelope::decode(message.payload)
                    {
                        if other.kind == incident::Kind::PortScan as i32 && other.image_id == attacker_image {
                            scan_incidents += 1;
                        }
                    }
                }
                break;
            }
        }
    }
    checks.push(Check {
        what: "port-scan incident".into(),
        expected: "exactly one, for the front end".into(),
        observed: format!("{scan_incidents}"),
        passed: scan_incidents == 1,
    });

    Ok(Report {
        checks,
        table_version: 0,
        audits: audit_count,
        incidents: scan_incidents,
    })
}

fn describe(result: &ProbeResult) -> String {
    match &result.error {
        None => format!("connected in {} ms", result.millis),
        Some(error) => format!("failed after {} ms: {error}", result.millis),
    }
}

/// The whole story: lab, inventory, traffic, learning, locking, prevent,
/// attack. Returns the report (also written to `<state dir>/report.json`).
pub async fn up(settings: &Settings) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&settings.state_dir)
        .with_context(|| format!("creating {}", settings.state_dir.display()))?;
    say(format!(
        "creating the storefront: {} containers in network namespaces",
        SERVICES.len()
    ));
    settings.lab.create()?;
    write_inventory(settings)?;
    start_processes(settings)?;
    let nats = cnnf_bus::connect_options("cnnf-demo", &settings.nats)
        .await?
        .connect(&settings.nats_url)
        .await
        .with_context(|| format!("connecting to NATS at {}", settings.nats_url))?;
    let mut clients = connect(settings).await?;
    learn_and_lock(settings, &mut clients).await?;
    switch_to_prevent(&mut clients).await?;
    let version = wait_enforced(settings, &nats).await?;
    let mut report = attack(settings, &mut clients, &nats).await?;
    report.table_version = version;
    let path = settings.state_dir.join("report.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(report)
}

/// Prints the report as a table.
pub fn print_report(report: &Report) {
    println!();
    println!("{:<45} {:<42} {:<6} observed", "check", "expected", "result");
    for check in &report.checks {
        println!(
            "{:<45} {:<42} {:<6} {}",
            check.what,
            check.expected,
            if check.passed { "ok" } else { "FAILED" },
            check.observed
        );
    }
}
