//! The all-in-one process against a real nats-server: it declares the
//! topology, reports ready, serves metrics, stops cleanly on SIGTERM, and
//! refuses bad configuration with exit status 64 and a message.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cnnf_testkit::NatsServer;

const BIN: &str = env!("CARGO_BIN_EXE_cnnf-allinone");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP GET: (status code, body).
fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Some((status, body))
}

#[tokio::test]
async fn allinone_declares_the_topology_reports_ready_and_stops_on_sigterm() {
    let server = NatsServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(BIN)
        .env("CNNF_NATS_URL", server.url())
        .env("CNNF_HTTP_ADDR", &addr)
        .env("CNNF_DATA_DIR", data.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let started = Instant::now();
    loop {
        if let Some((200, body)) = get(&addr, "/ready") {
            assert_eq!(body.trim(), "ready");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "never became ready");
        assert!(child.try_wait().unwrap().is_none(), "exited before becoming ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The policy service generated its table-signing key at start, the
    // public key beside it for the agents.
    let public = data.path().join("policy/table-signing.pub");
    let keys = cnnf_signing::files::read_public_keys(&public).unwrap();
    let secret = cnnf_signing::files::read_signing_key(&data.path().join("policy/table-signing.key")).unwrap();
    assert_eq!(keys, vec![secret.public_key().clone()]);
    let (status, metrics) = get(&addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(metrics.contains("# EOF"), "not an OpenMetrics exposition: {metrics}");

    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    for stream in cnnf_bus::topology::streams(&Default::default()) {
        js.get_stream(&stream.name)
            .await
            .unwrap_or_else(|_| panic!("{} missing", stream.name));
    }

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
}

#[test]
fn bad_configuration_exits_64_and_says_what_is_wrong() {
    let output = Command::new(BIN).env("CNNF_CLUSTER", "prod.eu").output().unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cluster \"prod.eu\""), "{stderr}");
    assert!(stderr.contains("'.' separates subject tokens"), "{stderr}");

    let output = Command::new(BIN).args(["--replicas", "many"]).output().unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--replicas"));

    let output = Command::new(BIN).arg("--help").output().unwrap();
    assert_eq!(output.status.code(), Some(0));
}

#[test]
fn a_missing_table_signing_key_is_bad_configuration() {
    let data = tempfile::tempdir().unwrap();
    let output = Command::new(BIN)
        .env("CNNF_DATA_DIR", data.path())
        .env("CNNF_TABLE_SIGNING_KEY", data.path().join("absent.key"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--table-signing-key") && stderr.contains("absent.key"),
        "{stderr}"
    );
}
