//! A real CNNF control plane for `cnnfctl` to talk to: nats-server, the
//! four services and the gateway in-process (`cnnf_allinone::run`), with a
//! tokens file holding an admin, an operator and a viewer token; and a
//! runner of the real `cnnfctl` binary.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use cnnf_proto::v1 as pb;
use cnnf_service::{CommonConfig, Health};
use cnnf_testkit::NatsServer;
use sha2::Digest as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const BIN: &str = env!("CARGO_BIN_EXE_cnnfctl");
pub const ADMIN: &str = "admin-token-0f3a";
pub const OPERATOR: &str = "operator-token-7c21";
pub const VIEWER: &str = "viewer-token-55e9";
pub const CLUSTER: &str = "local";
pub const S: i64 = 1_000_000_000;
const WAIT: Duration = Duration::from_secs(90);

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub fn sha256_hex(text: &str) -> String {
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What one run of `cnnfctl` did.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// The stdout as JSON; fails the test with the whole output otherwise.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// Asserts the exit code, showing everything when it differs.
    #[track_caller]
    pub fn expect(self, code: i32) -> Self {
        assert_eq!(self.code, code, "unexpected exit code: {self:#?}");
        self
    }

    /// Asserts the exit code and that stderr mentions `text`.
    #[track_caller]
    pub fn fails(self, code: i32, text: &str) -> Self {
        assert_eq!(self.code, code, "unexpected exit code: {self:#?}");
        assert!(self.stderr.starts_with("cnnfctl: ") || code == 2, "{self:#?}");
        assert!(self.stderr.contains(text), "stderr lacks {text:?}: {self:#?}");
        self
    }
}

/// Runs `cnnfctl` against `server` with `token` (none: no token at all).
pub async fn ctl_at(server: &str, token: Option<&str>, args: &[&str]) -> Out {
    let mut command = tokio::process::Command::new(BIN);
    for (key, _) in std::env::vars() {
        if key.starts_with("CNNFCTL_") {
            command.env_remove(key);
        }
    }
    command.env("CNNFCTL_SERVER", server);
    if let Some(token) = token {
        command.env("CNNFCTL_TOKEN", token);
    }
    let output = command.args(args).output().await.unwrap();
    Out {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// Polls `check` (which runs `cnnfctl`) until it returns `Some`.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    cnnf_testkit::eventually_every(what, WAIT, Duration::from_millis(200), check).await
}

/// One running control plane.
pub struct Stack {
    pub nats: NatsServer,
    pub js: jetstream::Context,
    pub server: String,
    pub dir: tempfile::TempDir,
    /// The all-in-one's configuration (its sockets are where the services listen).
    pub config: cnnf_allinone::Config,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Stack {
    pub async fn start() -> Stack {
        let nats = NatsServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens.json");
        let file = serde_json::json!({
            "tokens": {
                sha256_hex(ADMIN): {"name": "alice", "role": "admin"},
                sha256_hex(OPERATOR): {"name": "oscar", "role": "operator"},
                sha256_hex(VIEWER): {"name": "vera", "role": "viewer"},
            }
        });
        std::fs::write(&tokens, serde_json::to_vec_pretty(&file).unwrap()).unwrap();
        let listen = free_addr();
        let config = cnnf_allinone::Config {
            common: CommonConfig {
                nats_url: nats.url(),
                cluster: CLUSTER.to_owned(),
                data_dir: dir.path().join("data"),
                http_addr: None,
                replicas: 1,
                nats_creds: None,
                nats_ca: None,
                nats_cert: None,
                nats_key: None,
            },
            gateway: cnnf_gateway::Settings {
                listen,
                tokens_file: Some(tokens),
                ..Default::default()
            },
            table_signing_key: None,
        };
        cnnf_service::init_logging();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(cnnf_allinone::run(config.clone(), Health::default(), async move {
            let _ = stopped.await;
        }));
        let js = cnnf_bus::jetstream(async_nats::connect(nats.url()).await.unwrap());
        let stack = Stack {
            nats,
            js,
            server: format!("http://{listen}"),
            dir,
            config,
            stop: Some(stop),
            task,
        };
        // Ready when every service answers through the gateway.
        eventually("the gateway and the services to answer", || async {
            assert!(!stack.task.is_finished(), "the control plane ended early");
            let policy = stack.ctl(Some(VIEWER), &["mode", "get"]).await.code == 0;
            let models = stack.ctl(Some(VIEWER), &["models", "list"]).await.code == 0;
            let audits = stack.ctl(Some(VIEWER), &["audits", "list"]).await.code == 0;
            (policy && models && audits).then_some(())
        })
        .await;
        stack
    }

    /// Runs `cnnfctl` against this stack.
    pub async fn ctl(&self, token: Option<&str>, args: &[&str]) -> Out {
        ctl_at(&self.server, token, args).await
    }

    /// Runs `cnnfctl --output json` and parses the answer (exit 0 expected).
    pub async fn json(&self, token: &str, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        self.ctl(Some(token), &all).await.expect(0).json()
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    /// Publishes an envelope on `subject` as an agent would.
    pub async fn publish(&self, subject: &str, envelope: pb::Envelope) {
        let publish = jetstream::message::PublishMessage::build()
            .payload(cnnf_core::envelope::encode(envelope.clone()).into())
            .message_id(&envelope.event_id);
        self.js
            .send_publish(subject.to_owned(), publish)
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// A container of `image` starts on `node` holding `address`.
    pub async fn start_workload(&self, node: &str, container: &str, image: &str, name: &str, address: &str, time: i64) {
        let workload = pb::Workload {
            container_id: container.into(),
            image_id: image.into(),
            image_name: name.into(),
            addresses: vec![address.into()],
            cluster: CLUSTER.into(),
            node: node.into(),
            ..Default::default()
        };
        let envelope = pb::Envelope {
            schema_version: cnnf_proto::SCHEMA_VERSION,
            event_id: format!("{node}:boot0:start:{container}"),
            cluster: CLUSTER.into(),
            node: node.into(),
            time_unix_nanos: time,
            payload: Some(pb::envelope::Payload::WorkloadStarted(pb::WorkloadStarted {
                workload: Some(workload),
            })),
            ..Default::default()
        };
        self.publish(&format!("cnnf.workload.{CLUSTER}.{node}"), envelope).await;
    }

    /// One decision batch from the agent of `node`.
    pub async fn publish_decisions(&self, node: &str, seq: u64, time: i64, decisions: Vec<pb::ConnectionDecision>) {
        let envelope = pb::Envelope {
            schema_version: cnnf_proto::SCHEMA_VERSION,
            event_id: cnnf_core::ids::agent_event(node, "boot1", seq),
            cluster: CLUSTER.into(),
            node: node.into(),
            time_unix_nanos: time,
            payload: Some(pb::envelope::Payload::Decisions(pb::DecisionBatch {
                decisions,
                overflow_count: 0,
            })),
            ..Default::default()
        };
        self.publish(&format!("cnnf.flow.{CLUSTER}.{node}"), envelope).await;
    }
}

pub fn now() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap()
}

pub fn image(id: &str, name: &str) -> pb::Identity {
    pb::Identity {
        kind: pb::IdentityKind::Image as i32,
        id: id.into(),
        name: name.into(),
        container_id: format!("{id}-container"),
        cluster: CLUSTER.into(),
        node: "n1".into(),
    }
}

pub fn unknown() -> pb::Identity {
    pb::Identity {
        kind: pb::IdentityKind::Unknown as i32,
        ..Default::default()
    }
}

/// One decision `source -> destination:port` with `verdict`, decided by `by`.
pub fn decision(
    source: (pb::Identity, &str),
    destination: (pb::Identity, &str),
    port: u32,
    verdict: pb::Verdict,
    by: pb::DecidedBy,
    time: i64,
) -> pb::ConnectionDecision {
    pb::ConnectionDecision {
        source: Some(pb::Endpoint {
            address: source.1.into(),
            port: 40_000,
            identity: Some(source.0),
        }),
        destination: Some(pb::Endpoint {
            address: destination.1.into(),
            port,
            identity: Some(destination.0),
        }),
        protocol: pb::Protocol::Tcp as i32,
        direction: pb::Direction::Egress as i32,
        verdict: verdict as i32,
        decided_by: Some(by),
        verdict_table_version: 1,
        mode: pb::Mode::Alert as i32,
        first_seen_unix_nanos: time,
        last_seen_unix_nanos: time,
        count: 1,
    }
}

pub fn by_mode() -> pb::DecidedBy {
    pb::DecidedBy {
        kind: pb::decided_by::Kind::Mode as i32,
        ..Default::default()
    }
}

pub fn by_model(image: &str) -> pb::DecidedBy {
    pb::DecidedBy {
        kind: pb::decided_by::Kind::Model as i32,
        model_image_id: image.into(),
        ..Default::default()
    }
}

/// Reads a file the test wrote or cnnfctl wrote.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Unix nanoseconds as RFC 3339, as a user would type a time.
pub fn format_time(nanos: i64) -> String {
    cnnf_ctl::timefmt::format_nanos(nanos)
}

/// PEM files of a test PKI: a CA, a server certificate for `localhost`,
/// a client certificate with common name `client_cn`, and a second CA
/// that signed nothing the server uses.
pub struct Pki {
    pub ca: std::path::PathBuf,
    pub other_ca: std::path::PathBuf,
    pub server_cert: std::path::PathBuf,
    pub server_key: std::path::PathBuf,
    pub client_cert: std::path::PathBuf,
    pub client_key: std::path::PathBuf,
}

pub fn write_pki(dir: &Path, client_cn: &str) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).unwrap();
        (params, key, cert)
    };
    let (ca_params, ca_key, ca_cert) = ca("cnnfctl test CA");
    let (_, _, other_cert) = ca("another CA");
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let server_key = KeyPair::generate().unwrap();
    let mut server_params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    client_params.distinguished_name.push(DnType::CommonName, client_cn);
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client_params.signed_by(&client_key, &issuer).unwrap();
    let pki = Pki {
        ca: dir.join("ca.pem"),
        other_ca: dir.join("other-ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    };
    std::fs::write(&pki.ca, ca_cert.pem()).unwrap();
    std::fs::write(&pki.other_ca, other_cert.pem()).unwrap();
    std::fs::write(&pki.server_cert, server_cert.pem()).unwrap();
    std::fs::write(&pki.server_key, server_key.serialize_pem()).unwrap();
    std::fs::write(&pki.client_cert, client_cert.pem()).unwrap();
    std::fs::write(&pki.client_key, client_key.serialize_pem()).unwrap();
    pki
}

impl Stack {
    /// A second gateway in front of the same services, speaking TLS only
    /// and accepting client certificates of the test CA; the client CN
    /// `ops-laptop` has role operator. Its `https://localhost:<port>` URL.
    pub async fn start_tls_gateway(&self, pki: &Pki) -> String {
        let tokens = self.path("tls-tokens.json");
        let file = serde_json::json!({
            "tokens": { sha256_hex(VIEWER): {"name": "vera", "role": "viewer"} },
            "client_certs": { "ops-laptop": {"name": "ops", "role": "operator"} }
        });
        std::fs::write(&tokens, serde_json::to_vec(&file).unwrap()).unwrap();
        let listen = free_addr();
        let config = cnnf_gateway::Config {
            common: self.config.common.clone(),
            gateway: cnnf_gateway::Settings {
                listen,
                tokens_file: Some(tokens),
                tls_cert: Some(pki.server_cert.clone()),
                tls_key: Some(pki.server_key.clone()),
                tls_client_ca: Some(pki.ca.clone()),
                ..self.config.gateway.clone()
            },
            upstreams: self.config.upstreams(),
        };
        // Runs until the test's runtime ends.
        tokio::spawn(cnnf_gateway::run(
            config,
            Health::default(),
            std::future::pending::<()>(),
        ));
        format!("https://localhost:{}", listen.port())
    }
}
