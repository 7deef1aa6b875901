//! The Radar page in a real browser against the real services: the
//! all-in-one process (ingest, modeler, policy, audit, gateway serving the
//! built page) on a real nats-server, fed workload and decision events the
//! way agents publish them. Then `web/radar/tests/e2e.mjs` drives Debian's
//! headless Chromium through Playwright: the learned edge is solid with a
//! green port label, the alerted port yellow, the blocked port orange; the
//! edge dialog shows the details and deletes the learned edge, which leaves
//! the graph through the live stream without a reload; a viewer is refused
//! and the edge stays; an operator rule is dotted; the namespace filter
//! keeps a namespace's images and their direct peers. Screenshots are kept
//! as test artifacts.
//!
//! Needs the page built and its tools installed (`ensure_web` in
//! `scripts/common.sh`); without them the test fails saying so.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use clap::Parser as _;
use cnnf_proto::v1::{
    decided_by, envelope::Payload, ConnectionDecision, DecidedBy, DecisionBatch, Direction, Endpoint, Envelope,
    Identity, IdentityKind, Mode, Protocol, Verdict, Workload, WorkloadStarted,
};
use cnnf_testkit::NatsServer;
use sha2::Digest as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const CLUSTER: &str = "prod";
const NODE: &str = "n1";
const ADMIN: &str = "radar-test-admin-3f9c2a";
const VIEWER: &str = "radar-test-viewer-8b17d4";
const WEB: &str = "sha256:0aeb01";
const DB: &str = "sha256:0db002";
const CACHE: &str = "sha256:0cac03";
const BATCH: &str = "sha256:0ba704";
const WAIT: Duration = Duration::from_secs(90);

fn free_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web/radar")
}

/// Where screenshots go: `$CNNF_ARTIFACTS_DIR/radar`, else `<target dir>/artifacts/radar`.
fn screenshot_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CNNF_ARTIFACTS_DIR") {
        return PathBuf::from(dir).join("radar");
    }
    // The test binary is <target>/<profile>/deps/radar_page-<hash>.
    let exe = std::env::current_exe().unwrap();
    let target = exe
        .ancestors()
        .nth(3)
        .expect("the test binary sits in <target>/<profile>/deps");
    target.join("artifacts/radar")
}

fn now_nanos() -> i64 {
    i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()).unwrap()
}

/// One HTTP/1.1 call: (status, body as JSON, or `null` when it is not JSON);
/// status 0 when nothing listens yet.
async fn http(addr: &str, method: &str, path: &str, token: &str, body: &str) -> (u16, serde_json::Value) {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return (0, serde_json::Value::Null);
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, serde_json::from_str(&body).unwrap_or(serde_json::Value::Null))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

async fn radar(addr: &str) -> serde_json::Value {
    let (status, graph) = http(addr, "GET", "/api/v1/radar", ADMIN, "").await;
    assert_eq!(status, 200, "{graph}");
    graph
}

fn edge<'a>(graph: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    graph["edges"].as_array()?.iter().find(|e| e["id"] == id)
}

fn port_status(edge: &serde_json::Value, port: u64) -> Option<&str> {
    edge["ports"].as_array()?.iter().find(|p| p["port"] == port)?["status"].as_str()
}

async fn publish(js: &jetstream::Context, subject: &str, id: String, payload: Payload) {
    let envelope = Envelope {
        schema_version: cnnf_proto::SCHEMA_VERSION,
        event_id: id.clone(),
        cluster: CLUSTER.into(),
        node: NODE.into(),
        time_unix_nanos: now_nanos(),
        payload: Some(payload),
        ..Default::default()
    };
    let message = jetstream::message::PublishMessage::build()
        .payload(cnnf_core::envelope::encode(envelope).into())
        .message_id(&id);
    js.send_publish(subject.to_owned(), message)
        .await
        .unwrap()
        .await
        .unwrap();
}

fn image(id: &str, name: &str) -> Identity {
    Identity {
        kind: IdentityKind::Image as i32,
        id: id.into(),
        name: name.into(),
        cluster: CLUSTER.into(),
        ..Default::default()
    }
}

/// Starts a container of `image_id` at `address` in Kubernetes namespace `namespace`.
async fn start_container(
    js: &jetstream::Context,
    container: &str,
    image_id: &str,
    name: &str,
    address: &str,
    namespace: &str,
) {
    let workload = Workload {
        container_id: container.into(),
        image_id: image_id.into(),
        image_name: name.into(),
        addresses: vec![address.into()],
        cluster: CLUSTER.into(),
        node: NODE.into(),
        namespace: namespace.into(),
        ..Default::default()
    };
    let payload = Payload::WorkloadStarted(WorkloadStarted {
        workload: Some(workload),
    });
    publish(
        js,
        &format!("cnnf.workload.{CLUSTER}.{NODE}"),
        format!("{NODE}:boot:start:{container}"),
        payload,
    )
    .await;
}

/// One decision of an agent: `source` to `destination:port` with `verdict`.
async fn decide(
    js: &jetstream::Context,
    id: &str,
    source: Identity,
    destination: Identity,
    port: u32,
    verdict: Verdict,
) {
    let by = if verdict == Verdict::Learn {
        DecidedBy {
            kind: decided_by::Kind::Model as i32,
            model_image_id: destination.id.clone(),
            ..Default::default()
        }
    } else {
        DecidedBy {
            kind: decided_by::Kind::Mode as i32,
            ..Default::default()
        }
    };
    let time = now_nanos();
    let decision = ConnectionDecision {
        source: Some(Endpoint {
            address: "10.9.0.1".into(),
            port: 40_000,
            identity: Some(source),
        }),
        destination: Some(Endpoint {
            address: "10.9.0.2".into(),
            port,
            identity: Some(destination),
        }),
        protocol: Protocol::Tcp as i32,
        direction: Direction::Egress as i32,
        verdict: verdict as i32,
        decided_by: Some(by),
        verdict_table_version: 1,
        mode: Mode::Prevent as i32,
        first_seen_unix_nanos: time,
        last_seen_unix_nanos: time,
        count: 3,
    };
    let payload = Payload::Decisions(DecisionBatch {
        decisions: vec![decision],
        overflow_count: 0,
    });
    publish(
        js,
        &format!("cnnf.flow.{CLUSTER}.{NODE}"),
        format!("{NODE}:boot:flow:{id}"),
        payload,
    )
    .await;
}

/// Applies one policy change through the gateway's JSON API on top of
/// `revision`; the policy's revision after it.
async fn apply_policy(addr: &str, revision: &str, change: serde_json::Value) -> String {
    let body = serde_json::json!({"expectedRevision": revision, "change": change});
    let (status, answer) = http(addr, "POST", "/api/v1/Policy/Apply", ADMIN, &body.to_string()).await;
    assert_eq!(status, 200, "{body}: {answer}");
    answer["revision"]
        .as_str()
        .expect("the answer names the new revision")
        .to_owned()
}

fn sha256_hex(token: &str) -> String {
    use std::fmt::Write as _;
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .fold(String::new(), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_radar_page_shows_colours_deletes_a_learned_edge_live_and_refuses_a_viewer() {
    let web = web_dir();
    let dist = web.join("dist/index.html");
    for (needed, what) in [
        (web.join("node_modules/playwright-core"), "the page's npm packages"),
        (dist.clone(), "the built page"),
        (PathBuf::from("/usr/bin/chromium"), "Debian's chromium"),
    ] {
        assert!(
            needed.exists(),
            "{what} missing ({}): run the setup first, `bash -c '. scripts/common.sh && ensure_web'` \
             (scripts/up.sh and scripts/test.sh do it)",
            needed.display()
        );
    }

    let server = NatsServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let tokens = data.path().join("tokens.json");
    let tokens_json = serde_json::json!({
        "tokens": {
            sha256_hex(ADMIN): {"name": "ada", "role": "admin"},
            sha256_hex(VIEWER): {"name": "vera", "role": "viewer"},
        }
    });
    std::fs::write(&tokens, tokens_json.to_string()).unwrap();
    let gateway = free_addr();
    let url = server.url();
    let http_addr = free_addr();
    let data_dir = data.path().join("data");
    let static_dir = web.join("dist");
    let config = cnnf_allinone::Config::try_parse_from([
        "cnnf-allinone",
        "--nats-url",
        &url,
        "--cluster",
        CLUSTER,
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--http-addr",
        &http_addr,
        "--listen",
        &gateway,
        "--tokens-file",
        tokens.to_str().unwrap(),
        "--static-dir",
        static_dir.to_str().unwrap(),
    ])
    .unwrap();
    cnnf_service::init_logging();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let services = tokio::spawn(cnnf_allinone::run(
        config,
        cnnf_service::Health::default(),
        async move {
            let _ = stopped.await;
        },
    ));

    cnnf_testkit::eventually("the gateway to answer", WAIT, || async {
        assert!(!services.is_finished(), "the services ended early");
        let (status, me) = http(&gateway, "GET", "/api/v1/whoami", ADMIN, "").await;
        (status == 200 && me["role"] == "admin").then_some(())
    })
    .await;
    let (status, me) = http(&gateway, "GET", "/api/v1/whoami", VIEWER, "").await;
    assert_eq!((status, me["role"].as_str()), (200, Some("viewer")));

    // The fleet: web (2 containers) talks to db, both in namespace shop;
    // cache and batch in ops; batch stays learning.
    let js = cnnf_bus::jetstream(async_nats::connect(server.url()).await.unwrap());
    // The services declare the streams as they start; the test may be first.
    cnnf_bus::topology::ensure(&js, &Default::default()).await.unwrap();
    start_container(&js, "web-1", WEB, "web:1.4", "10.9.0.1", "shop").await;
    start_container(&js, "web-2", WEB, "web:1.4", "10.9.0.11", "shop").await;
    start_container(&js, "db-1", DB, "postgres:16", "10.9.0.2", "shop").await;
    start_container(&js, "cache-1", CACHE, "redis:7", "10.9.0.3", "ops").await;
    start_container(&js, "batch-1", BATCH, "batch:2", "10.9.0.4", "ops").await;
    decide(
        &js,
        "learn",
        image(WEB, "web:1.4"),
        image(DB, "postgres:16"),
        5432,
        Verdict::Learn,
    )
    .await;
    let learned_id = format!("learned:image:{WEB}->image:{DB}");
    cnnf_testkit::eventually("the learned edge on the radar", WAIT, || async {
        let graph = radar(&gateway).await;
        let learned = edge(&graph, &learned_id)?;
        (learned["learned"].as_array()?.len() == 2).then_some(())
    })
    .await;

    // Lock three models: the learned edge is now allowed (green).
    for image in [WEB, DB, CACHE] {
        let (status, answer) = http(
            &gateway,
            "POST",
            "/api/v1/Models/Command",
            ADMIN,
            &serde_json::json!({"imageId": image, "lockNow": true}).to_string(),
        )
        .await;
        assert_eq!(status, 200, "locking {image}: {answer}");
    }
    cnnf_testkit::eventually("the learned edge allowed", WAIT, || async {
        let graph = radar(&gateway).await;
        (port_status(edge(&graph, &learned_id)?, 5432)? == "allowed").then_some(())
    })
    .await;

    // An alert and a prevent between enforcing images.
    decide(
        &js,
        "alert",
        image(WEB, "web:1.4"),
        image(CACHE, "redis:7"),
        6379,
        Verdict::Alert,
    )
    .await;
    decide(
        &js,
        "prevent",
        image(CACHE, "redis:7"),
        image(DB, "postgres:16"),
        22,
        Verdict::Prevent,
    )
    .await;
    let (alerted_id, blocked_id) = (
        format!("audit:image:{WEB}->image:{CACHE}"),
        format!("audit:image:{CACHE}->image:{DB}"),
    );
    cnnf_testkit::eventually("the alerted and blocked edges", WAIT, || async {
        let graph = radar(&gateway).await;
        let alerted = port_status(edge(&graph, &alerted_id)?, 6379)? == "alerted";
        let blocked = port_status(edge(&graph, &blocked_id)?, 22)? == "blocked";
        (alerted && blocked).then_some(())
    })
    .await;
    // An operator rule: batch may reach the payments API subnet on 443.
    let revision = apply_policy(
        &gateway,
        "0",
        serde_json::json!({"objectPut": {"object": {"name": "batch", "kind": "KIND_IMAGE", "imageId": BATCH}}}),
    )
    .await;
    let revision = apply_policy(
        &gateway,
        &revision,
        serde_json::json!({"objectPut": {"object": {
            "name": "payments-api", "kind": "KIND_SUBNET", "cidrs": ["10.20.0.0/16"]}}}),
    )
    .await;
    apply_policy(
        &gateway,
        &revision,
        serde_json::json!({"rulePut": {"rule": {
            "id": "batch-to-payments", "source": "batch", "effect": "RULE_EFFECT_ALERT",
            "destinations": [{"object": "payments-api", "ports": [{"first": 443, "last": 443}],
                              "protocol": "PROTOCOL_TCP"}]}}}),
    )
    .await;
    let rule_id = "rule:batch-to-payments:payments-api";
    let graph = cnnf_testkit::eventually("the rule edge and the namespaces", WAIT, || async {
        let graph = radar(&gateway).await;
        let rule = edge(&graph, rule_id)?;
        let namespaces_known = graph["nodes"]
            .as_array()?
            .iter()
            .any(|n| n["id"] == format!("image:{BATCH}") && n["namespaces"] == serde_json::json!(["ops"]));
        (rule["source"] == format!("image:{BATCH}") && namespaces_known).then_some(graph)
    })
    .await;
    let state_of = |id: &str| {
        graph["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == format!("image:{id}"))
            .map(|n| {
                (
                    n["state"].as_str().unwrap().to_owned(),
                    n["containers"].as_u64().unwrap(),
                )
            })
    };
    assert_eq!(state_of(WEB), Some(("enforcing".to_owned(), 2)));
    assert_eq!(state_of(BATCH), Some(("learning".to_owned(), 1)));

    // The browser.
    let shots = screenshot_dir();
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();
    let output = tokio::process::Command::new("node")
        .arg(web.join("tests/e2e.mjs"))
        .current_dir(&web)
        .env("URL", format!("http://{gateway}"))
        .env("ADMIN_TOKEN", ADMIN)
        .env("VIEWER_TOKEN", VIEWER)
        .env("SCREENSHOT_DIR", &shots)
        .env("LEARNED_EDGE", &learned_id)
        .env("ALERTED_EDGE", &alerted_id)
        .env("BLOCKED_EDGE", &blocked_id)
        .env("RULE_EDGE", rule_id)
        // After the learned edge is deleted, shop is web and db, with cache,
        // which talks to both; batch and the payments API are left out.
        .env("NAMESPACE", "shop")
        .env("NAMESPACE_NODES", format!("image:{WEB},image:{DB},image:{CACHE}"))
        .output()
        .await
        .expect("node runs (install Node.js 20.19 or newer)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("--- e2e.mjs stdout ---\n{stdout}\n--- e2e.mjs stderr ---\n{stderr}");
    assert!(
        output.status.success(),
        "e2e.mjs failed ({}):\n{stdout}\n{stderr}",
        output.status
    );

    let pngs: Vec<String> = std::fs::read_dir(&shots)
        .unwrap()
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".png"))
        .collect();
    for expected in ["graph.png", "viewer-refused.png", "edge-dialog.png", "after-delete.png"] {
        assert!(
            pngs.iter().any(|name| name == expected),
            "{expected} not in {}: {pngs:?}",
            shots.display()
        );
    }
    println!("screenshots in {}: {pngs:?}", shots.display());

    // What the page did is what the services hold: the learned edge is gone,
    // the audit edges stay.
    let graph = radar(&gateway).await;
    assert!(edge(&graph, &learned_id).is_none(), "the learned edge is still served");
    assert!(edge(&graph, &alerted_id).is_some() && edge(&graph, &blocked_id).is_some());

    stop.send(()).unwrap();
    tokio::time::timeout(WAIT, services).await.unwrap().unwrap().unwrap();
}
