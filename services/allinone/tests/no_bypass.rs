//! Nobody reaches a service's gRPC API around the gateway.
//!
//! - A real policy service on TCP with mutual TLS: a client without a
//!   certificate, or with one of another CA, is refused in the handshake
//!   (so an `x-cnnf-actor` header it sends is never read); the gateway, with
//!   its client certificate, makes real calls through.
//! - The all-in-one process: its only TCP listeners are the gateway and
//!   `/metrics`; the services are on Unix sockets of mode 0600 that another
//!   user cannot connect to, while the gateway answers API calls.

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cnnf_proto::v1 as pb;
use cnnf_proto::v1::policy_client::PolicyClient;
use cnnf_service::grpc::upstream::{client_tls, Upstream};
use cnnf_service::Health;
use cnnf_testkit::NatsServer;
use sha2::Digest as _;

const BIN: &str = env!("CARGO_BIN_EXE_cnnf-allinone");
const CLUSTER: &str = "local";
const ADMIN: &str = "admin-token-5b1e";
const WAIT: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn sha256_hex(text: &str) -> String {
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A tokens file with one admin, `ada`.
fn write_tokens(path: &Path) {
    let file = serde_json::json!({ "tokens": { sha256_hex(ADMIN): {"name": "ada", "role": "admin"} } });
    std::fs::write(path, file.to_string()).unwrap();
}

/// PEM files: the CA, the service's server certificate (for `localhost`),
/// the gateway's client certificate of that CA, and a client certificate
/// of another CA.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    gateway_cert: PathBuf,
    gateway_key: PathBuf,
    stranger_cert: PathBuf,
    stranger_key: PathBuf,
}

fn write_pki(dir: &Path) -> Pki {
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
        (Issuer::new(params, key), cert)
    };
    let (issuer, ca_cert) = ca("cnnf services CA");
    let (other_issuer, _) = ca("another CA");
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let server_key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();
    let client = |cn: &str, issuer: &Issuer<'_, KeyPair>| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        (params.signed_by(&key, issuer).unwrap().pem(), key.serialize_pem())
    };
    let (gateway_cert, gateway_key) = client("cnnf-gateway", &issuer);
    let (stranger_cert, stranger_key) = client("cnnf-gateway", &other_issuer);
    Pki {
        ca: write("ca.pem", ca_cert.pem()),
        server_cert: write("server.pem", server_cert.pem()),
        server_key: write("server.key", server_key.serialize_pem()),
        gateway_cert: write("gateway.pem", gateway_cert),
        gateway_key: write("gateway.key", gateway_key),
        stranger_cert: write("stranger.pem", stranger_cert),
        stranger_key: write("stranger.key", stranger_key),
    }
}

fn set_mode(mode: pb::Mode, expected_revision: u64, claimed_actor: &str) -> pb::PolicyCommand {
    pb::PolicyCommand {
        expected_revision,
        change: Some(pb::PolicyEvent {
            revision: 0,
            actor: claimed_actor.into(),
            change: Some(pb::policy_event::Change::ModeSet(pb::policy_event::ModeSet {
                mode: mode as i32,
                host: false,
            })),
        }),
    }
}

fn with_header<T>(message: T, name: &'static str, value: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(name, value.parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_on_tcp_serves_only_clients_with_a_certificate_of_its_ca() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let port = free_port();
    let path = |p: &Path| p.display().to_string();
    let config = <cnnf_policy::Config as clap::Parser>::try_parse_from([
        "cnnf-policy".to_owned(),
        format!("--nats-url={}", nats.url()),
        format!("--cluster={CLUSTER}"),
        format!("--data-dir={}", dir.path().join("policy").display()),
        format!("--grpc-addr=127.0.0.1:{port}"),
        format!("--grpc-tls-cert={}", path(&pki.server_cert)),
        format!("--grpc-tls-key={}", path(&pki.server_key)),
        format!("--grpc-client-ca={}", path(&pki.ca)),
    ])
    .unwrap();
    let health = Health::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let policy = tokio::spawn(cnnf_policy::run(config, health.clone(), async move {
        let _ = stopped.await;
    }));

    // The gateway in front of it, with its client certificate.
    let tokens = dir.path().join("tokens.json");
    write_tokens(&tokens);
    let nowhere = |name: &str| format!("unix:{}", dir.path().join(name).display());
    let gateway_config = cnnf_gateway::Config {
        common: cnnf_service::CommonConfig {
            nats_url: nats.url(),
            cluster: CLUSTER.to_owned(),
            data_dir: dir.path().join("gateway"),
            http_addr: None,
            replicas: 1,
            nats_creds: None,
            nats_ca: None,
            nats_cert: None,
            nats_key: None,
        },
        gateway: cnnf_gateway::Settings {
            tokens_file: Some(tokens),
            ..Default::default()
        },
        upstreams: cnnf_gateway::Upstreams {
            ingest_addr: nowhere("ingest.sock"),
            modeler_addr: nowhere("modeler.sock"),
            policy_addr: format!("https://localhost:{port}"),
            audit_addr: nowhere("audit.sock"),
            upstream_ca: Some(pki.ca.clone()),
            upstream_cert: Some(pki.gateway_cert.clone()),
            upstream_key: Some(pki.gateway_key.clone()),
            grpc_insecure: false,
        },
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway_addr = listener.local_addr().unwrap();
    tokio::spawn(cnnf_gateway::run_on(
        listener,
        gateway_config,
        Health::default(),
        std::future::pending::<()>(),
    ));
    let gateway = Upstream::parse("gateway", &format!("http://{gateway_addr}"), None, true).unwrap();
    let mut through_gateway = PolicyClient::new(gateway.default_channel());
    let bearer = format!("Bearer {ADMIN}");

    // A real write and a real read through the gateway.
    let revision = cnnf_testkit::eventually("the policy service to answer through the gateway", WAIT, || {
        let mut client = through_gateway.clone();
        let bearer = bearer.clone();
        let ended = policy.is_finished();
        async move {
            assert!(!ended, "the policy service ended early");
            let request = with_header(pb::GetPolicyRequest {}, "authorization", &bearer);
            client.get_policy(request).await.ok().map(|r| r.into_inner().revision)
        }
    })
    .await;
    let written = through_gateway
        .apply(with_header(
            set_mode(pb::Mode::Alert, revision, "ada"),
            "authorization",
            &bearer,
        ))
        .await
        .expect("the gateway's call with its client certificate goes through")
        .into_inner();
    assert!(written.revision > revision);
    let read = |client: &PolicyClient<tonic::transport::Channel>| {
        let request = with_header(pb::GetPolicyRequest {}, "authorization", &bearer);
        let mut client = client.clone();
        async move { client.get_policy(request).await.unwrap().into_inner() }
    };
    let snapshot = cnnf_testkit::eventually("the mode change to be applied", WAIT, || {
        let read = read(&through_gateway);
        async move { Some(read.await).filter(|s| s.revision >= written.revision) }
    })
    .await;
    assert_eq!(snapshot.mode, pb::Mode::Alert as i32);

    // Direct callers that claim to be an admin through the actor header.
    let https = format!("https://localhost:{port}");
    let no_cert = client_tls(&pki.ca, None).unwrap();
    let other_ca = client_tls(&pki.ca, Some((&pki.stranger_cert, &pki.stranger_key))).unwrap();
    for (who, tls) in [("no certificate", no_cert), ("another CA's certificate", other_ca)] {
        let upstream = Upstream::parse("direct", &https, Some(&tls), false).unwrap();
        // The handshake itself fails, before any request.
        let refused = tokio::time::timeout(WAIT, async {
            let mut stream = upstream.connect().await?;
            // TLS 1.3 reports a refused client certificate on the first read.
            let mut byte = [0u8; 1];
            tokio::io::AsyncReadExt::read(&mut stream, &mut byte).await
        })
        .await
        .unwrap();
        let error = refused.expect_err(who);
        assert!(error.to_string().contains("alert"), "{who}: {error}");
        let mut direct = PolicyClient::new(upstream.default_channel());
        let spoof = with_header(
            set_mode(pb::Mode::Prevent, snapshot.revision, "ada"),
            cnnf_service::actor::ACTOR_HEADER,
            "ada",
        );
        let status = direct.apply(spoof).await.expect_err(who);
        // Reported as the transport failing (which code depends on when
        // the alert arrives), never as an answer of the service.
        assert!(
            matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
            ),
            "{who}: {status:?}"
        );
    }
    // And one without TLS at all.
    let plain = Upstream::parse("direct", &format!("http://127.0.0.1:{port}"), None, true).unwrap();
    let spoof = with_header(
        set_mode(pb::Mode::Prevent, snapshot.revision, "ada"),
        cnnf_service::actor::ACTOR_HEADER,
        "ada",
    );
    let status = PolicyClient::new(plain.default_channel())
        .apply(spoof)
        .await
        .expect_err("plain");
    assert_ne!(status.code(), tonic::Code::Ok);
    // Nothing of them reached the policy.
    let after = read(&through_gateway).await;
    assert_eq!(
        (after.revision, after.mode),
        (snapshot.revision, pb::Mode::Alert as i32)
    );

    let _ = stop.send(());
    tokio::time::timeout(WAIT, policy).await.unwrap().unwrap().unwrap();
}

/// One HTTP/1.1 request: (status code, body).
fn http(addr: &str, method: &str, path: &str, token: &str, body: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, response.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned()))
}

/// The TCP ports process `pid` listens on (its sockets in `/proc/net/tcp{,6}`).
fn tcp_listen_ports(pid: u32) -> BTreeSet<u16> {
    let inodes: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(target.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut ports = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap().lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is field 1 (hex ip:port), st field 3 (0A: LISTEN), inode field 9.
            if fields.len() > 9 && fields[3] == "0A" && inodes.contains(fields[9]) {
                let port = fields[1].rsplit(':').next().unwrap();
                ports.insert(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports
}

/// Connects to the Unix socket at `path` with Python, as `uid` (and gid);
/// Ok when connected, Err(what Python said) otherwise.
fn python_connect(path: &Path, uid: u32) -> Result<(), String> {
    let output = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])",
        ])
        .arg(path)
        .uid(uid)
        .gid(uid)
        .current_dir("/")
        .output()
        .unwrap();
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_allinone_serves_the_services_only_on_owner_only_unix_sockets() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Directories anyone may traverse, so that only the sockets' own mode
    // keeps other users out.
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("grpc")).unwrap();
    for open in [dir.path(), data.as_path(), data.join("grpc").as_path()] {
        std::fs::set_permissions(open, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let tokens = dir.path().join("tokens.json");
    write_tokens(&tokens);
    let (http_port, gateway_port) = (free_port(), free_port());
    let http_addr = format!("127.0.0.1:{http_port}");
    let gateway_addr = format!("127.0.0.1:{gateway_port}");
    let mut child = Command::new(BIN)
        .env("CNNF_NATS_URL", nats.url())
        .env("CNNF_HTTP_ADDR", &http_addr)
        .env("CNNF_DATA_DIR", &data)
        .env("CNNF_GATEWAY_LISTEN", &gateway_addr)
        .env("CNNF_GATEWAY_TOKENS_FILE", &tokens)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();

    // The gateway answers a real API call, served by the policy service
    // behind it.
    let body = cnnf_testkit::eventually("the gateway to answer GetPolicy", WAIT, || {
        let gateway_addr = gateway_addr.clone();
        let exited = child.try_wait().unwrap();
        async move {
            assert!(exited.is_none(), "the all-in-one exited: {exited:?}");
            match http(&gateway_addr, "POST", "/api/v1/Policy/GetPolicy", ADMIN, "{}") {
                Some((200, body)) => Some(body),
                _ => None,
            }
        }
    })
    .await;
    let snapshot: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(snapshot.is_object(), "{body}");

    // TCP: only the gateway and /metrics.
    let ports = tcp_listen_ports(pid);
    assert_eq!(
        ports,
        BTreeSet::from([http_port, gateway_port]),
        "TCP listeners of the all-in-one"
    );

    // gRPC: four Unix sockets, mode 0600, owned by this user.
    let sockets: Vec<PathBuf> = cnnf_allinone::SERVICES
        .iter()
        .map(|service| data.join("grpc").join(format!("{service}.sock")))
        .collect();
    let listening = std::fs::read_to_string("/proc/net/unix").unwrap();
    for socket in &sockets {
        let meta = std::fs::metadata(socket).unwrap_or_else(|e| panic!("{}: {e}", socket.display()));
        assert!(meta.file_type().is_socket(), "{}", socket.display());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{}", socket.display());
        assert!(
            listening
                .lines()
                .any(|line| line.ends_with(&socket.display().to_string())),
            "{} is not a listening socket",
            socket.display()
        );
        // Its owner connects; another user is refused by the kernel.
        python_connect(socket, 0).unwrap_or_else(|e| panic!("root cannot connect to {}: {e}", socket.display()));
        let refused = python_connect(socket, 65534).expect_err("nobody connected to a service socket");
        assert!(refused.contains("PermissionError"), "{}: {refused}", socket.display());
    }

    Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    let status = cnnf_testkit::eventually("the all-in-one to stop", Duration::from_secs(15), || {
        let exited = child.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert!(status.success(), "exit status {status}");
    for socket in &sockets {
        assert!(!socket.exists(), "{} left behind", socket.display());
    }
}
