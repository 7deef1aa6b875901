//! The demo end to end, small: a real nats-server, every service and the
//! gateway (the all-in-one runner), a real agent enforcing through
//! iptables and NFQUEUE, and the `cnnf-demo` binary building the storefront
//! in network namespaces, learning, locking, switching to prevent and
//! attacking. Checks every verdict the attacker meets, then that the stop
//! command and the agent's exit leave no namespace, interface, process or
//! chain behind.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use clap::Parser as _;
use cnnf_demo::scenario::Report;
use cnnf_service::Health;
use cnnf_testkit::NatsServer;
use sha2::Digest as _;

const BIN: &str = env!("CARGO_BIN_EXE_cnnf-demo");
const TOKEN: &str = "demo-test-admin-token";
const PREFIX: &str = "cnnfdt";
const SUBNET: &str = "10.213.9.0";
const CHAIN_PREFIX: &str = "CNDEMO";
const NODE: &str = "demo-test-node";

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn chains_left() -> Vec<String> {
    let mut left = Vec::new();
    for table in ["filter", "mangle", "raw"] {
        let output = Command::new("iptables-save").args(["-t", table]).output().unwrap();
        left.extend(
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .filter(|line| line.contains(CHAIN_PREFIX))
                .map(str::to_owned),
        );
    }
    left
}

fn alive(pid: u32) -> bool {
    // A zombie is not running anything: only count live processes.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.split(") ").nth(1).unwrap_or_default().starts_with('Z'))
        .unwrap_or(false)
}

async fn wait_http_ok(addr: SocketAddr, path: &str) {
    cnnf_testkit::eventually(&format!("{path} on {addr}"), Duration::from_secs(60), || async move {
        let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
            return None;
        };
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response).await;
        response.starts_with("HTTP/1.1 200").then_some(())
    })
    .await;
}

fn write_tokens(path: &Path) {
    let hash = format!("{:x}", sha2::Sha256::digest(TOKEN.as_bytes()));
    let text = serde_json::json!({"tokens": {hash: {"name": "demo", "role": "admin"}}});
    std::fs::write(path, text.to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_demo_blocks_audits_and_reports_the_attacker_and_the_stop_command_leaves_nothing() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("demo");
    let inventory = state.join("inventory.json");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(&inventory, br#"{"workloads": []}"#).unwrap();
    let tokens = dir.path().join("tokens.json");
    write_tokens(&tokens);

    // The control plane: every service and the gateway.
    let gateway = free_addr();
    let services_http = free_addr();
    let config = cnnf_allinone::Config::try_parse_from([
        "cnnf-allinone".to_owned(),
        format!("--nats-url={}", nats.url()),
        format!("--data-dir={}", dir.path().join("services").display()),
        format!("--http-addr={services_http}"),
        format!("--listen={gateway}"),
        format!("--tokens-file={}", tokens.display()),
    ])
    .unwrap();
    let (stop_services, services_stopped) = tokio::sync::oneshot::channel::<()>();
    let services_health = Health::default();
    let services = tokio::spawn(cnnf_allinone::run(config, services_health.clone(), async move {
        let _ = services_stopped.await;
    }));
    tokio::spawn(services_health.serve(services_http, std::future::pending()));
    wait_http_ok(services_http, "/ready").await;

    // The agent, enforcing through its own chains and queue.
    let agent_http = free_addr();
    let agent_config = cnnf_agent::Config::try_parse_from([
        "cnnf-agent".to_owned(),
        format!("--nats-url={}", nats.url()),
        format!("--node={NODE}"),
        format!("--data-dir={}", dir.path().join("agent").display()),
        format!("--workloads=inventory:{}", inventory.display()),
        format!("--chain-prefix={CHAIN_PREFIX}"),
        "--queue-first=3600".to_owned(),
        "--queue-count=1".to_owned(),
        "--aggregation-ms=200".to_owned(),
        // The public key the policy service generated at its first start.
        format!(
            "--table-keys={}",
            dir.path().join("services/policy/table-signing.pub").display()
        ),
    ])
    .unwrap();
    let agent_removal = agent_config.clone();
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent_health = Health::default();
    let agent = tokio::spawn(cnnf_agent::run(agent_config, agent_health.clone(), async move {
        let _ = agent_stopped.await;
    }));
    tokio::spawn(agent_health.serve(agent_http, std::future::pending()));
    wait_http_ok(agent_http, "/ready").await;

    let lab_args = [
        format!("--prefix={PREFIX}"),
        format!("--subnet={SUBNET}"),
        format!("--inventory={}", inventory.display()),
        format!("--state-dir={}", state.display()),
    ];
    let up = tokio::task::spawn_blocking({
        let lab_args = lab_args.clone();
        let nats_url = nats.url();
        move || {
            Command::new(BIN)
                .arg("up")
                .args(&lab_args)
                .args([
                    format!("--gateway=http://{gateway}"),
                    format!("--token={TOKEN}"),
                    format!("--nats-url={nats_url}"),
                    format!("--node={NODE}"),
                    format!("--agent-metrics=http://{agent_http}/metrics"),
                    "--traffic-interval-ms=200".to_owned(),
                    "--step-timeout-seconds=120".to_owned(),
                    // More distinct ports than the scan detector's threshold (20).
                    "--scan-ports=1-40,80,3306,5672,8079,27017".to_owned(),
                ])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    println!("{}", String::from_utf8_lossy(&up.stdout));
    eprintln!("{}", String::from_utf8_lossy(&up.stderr));
    let pids: Vec<u32> = std::fs::read_to_string(state.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|pid| pid.parse().ok())
        .collect();

    // Whatever happened, take the demo down before asserting on it.
    let down = Command::new(BIN).arg("down").args(&lab_args).output().unwrap();
    let _ = stop_agent.send(());
    agent.await.unwrap().unwrap();
    // A stopped agent keeps its chains (the node stays enforced across a
    // restart); taking the demo down removes them explicitly, as
    // scripts/down.sh does with `cnnf-agent --remove-chains`.
    let kept = chains_left();
    let removed = cnnf_agent::uninstall(&agent_removal);
    let _ = stop_services.send(());
    services.await.unwrap().unwrap();

    assert!(up.status.success(), "cnnf-demo up failed: {:?}", up.status);
    let report: Report = serde_json::from_slice(&std::fs::read(state.join("report.json")).unwrap()).unwrap();
    for check in &report.checks {
        assert!(
            check.passed,
            "{} expected {} but saw {}",
            check.what, check.expected, check.observed
        );
    }
    let names: Vec<&str> = report.checks.iter().map(|check| check.what.as_str()).collect();
    assert_eq!(names.len(), 5, "{names:?}");
    assert!(names
        .iter()
        .any(|name| name.contains("orders-db:27017 (never learned)")));
    assert_eq!(report.incidents, 1, "one scan, one incident");
    // The scan probed 45 ports on 11 addresses; aggregation after the
    // incident keeps the audits fewer than the probes.
    assert!(
        report.audits >= 1 && report.audits < 45 * 11,
        "{} audits",
        report.audits
    );
    assert!(report.table_version > 0);

    assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
    assert_eq!(cnnf_demo::lab::namespaces(PREFIX).unwrap(), Vec::<String>::new());
    assert_eq!(cnnf_demo::lab::links(PREFIX).unwrap(), Vec::<String>::new());
    assert!(!pids.is_empty());
    let running: Vec<u32> = pids.into_iter().filter(|pid| alive(*pid)).collect();
    assert!(running.is_empty(), "demo processes still running: {running:?}");
    assert!(!kept.is_empty(), "a stopped agent keeps its chains");
    removed.unwrap();
    assert_eq!(chains_left(), Vec::<String>::new(), "--remove-chains left a chain");
    assert_eq!(
        std::fs::read_to_string(&inventory).unwrap().trim(),
        r#"{"workloads": []}"#
    );
}
