//! The agent binary logged in with a node's own creds (operator-mode
//! nats-server): those permissions are enough for everything it does.

use std::process::{Child, Command};
use std::time::Duration;

use async_nats::jetstream;
use cnnf_auth::AuthDir;
use cnnf_proto::v1::{envelope::Payload, Envelope, VerdictTable};
use cnnf_testkit::{eventually_every, NatsServer, ServerOptions};
use futures::StreamExt as _;
use prost::Message as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const PATIENCE: Duration = Duration::from_secs(20);

/// Kills the agent if the test fails before it stops it.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn metrics(port: u16) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    Some(text)
}

async fn first_on(js: &jetstream::Context, stream: &str, subject: &str) -> Envelope {
    let consumer = js
        .get_stream(stream)
        .await
        .unwrap()
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subject.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    let message = tokio::time::timeout(PATIENCE, consumer.messages().await.unwrap().next())
        .await
        .unwrap_or_else(|_| panic!("nothing on {subject}"))
        .unwrap()
        .unwrap();
    Envelope::decode(message.payload.as_ref()).unwrap()
}

#[tokio::test]
async fn an_agent_with_node_credentials_publishes_and_follows_its_table() {
    let temp = tempfile::tempdir().unwrap();
    let (mut dir, _) = AuthDir::init(&temp.path().join("auth")).unwrap();
    let server = NatsServer::start_with(ServerOptions {
        include: Some(dir.include_file()),
        ..Default::default()
    })
    .await;
    let services = cnnf_bus::connect_options(
        "services",
        &cnnf_bus::NatsOptions {
            credentials: Some(dir.services_creds()),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .connect(server.url())
    .await
    .unwrap();
    let js = cnnf_bus::jetstream(services);
    cnnf_bus::topology::ensure(&js, &Default::default()).await.unwrap();
    // Signed like the policy service signs it; the agent trusts that key.
    let signer = cnnf_signing::SigningKey::generate();
    let trusted = temp.path().join("table-signing.pub");
    std::fs::write(&trusted, format!("{}\n", signer.public_key().to_line())).unwrap();
    let table = VerdictTable {
        version: 7,
        cluster: "prod".into(),
        node: "n1".into(),
        ..Default::default()
    };
    js.get_key_value(cnnf_bus::topology::VERDICTS_BUCKET)
        .await
        .unwrap()
        .put("prod.n1", signer.sign_table_bytes(&table.encode_to_vec()).into())
        .await
        .unwrap();

    let creds = temp.path().join("n1.creds");
    dir.enroll("prod", "n1", &creds).unwrap();
    let inventory = temp.path().join("inventory.json");
    std::fs::write(
        &inventory,
        r#"{"workloads": [{"container_id": "web-1", "container_name": "web",
            "image_id": "sha256:0a1e5c0ffee0000000000000000000000000000000000000000000000000001",
            "image_name": "demo/web:1.0", "addresses": ["10.244.1.10"]}]}"#,
    )
    .unwrap();
    let http_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_cnnf-agent"))
            .args([
                "--no-dataplane",
                "--cluster",
                "prod",
                "--node",
                "n1",
                "--heartbeat-seconds",
                "1",
            ])
            .arg("--nats-url")
            .arg(server.url())
            .arg("--nats-creds")
            .arg(&creds)
            .arg("--table-keys")
            .arg(&trusted)
            .arg("--data-dir")
            .arg(temp.path().join("state"))
            .arg("--workloads")
            .arg(format!("inventory:{}", inventory.display()))
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{http_port}"))
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
    );

    // It receives its table (watch on its own key, under its own inbox).
    eventually_every(
        "the agent's table version 7",
        PATIENCE,
        Duration::from_millis(100),
        || async {
            let page = metrics(http_port).await?;
            (cnnf_service::metric_value(&page, "cnnf_agent_table_version") == Some(7.0)).then_some(())
        },
    )
    .await;
    // Its spooled events and its heartbeats are stored.
    let started = first_on(&js, cnnf_bus::topology::WORKLOADS, "cnnf.workload.prod.n1").await;
    assert!(matches!(started.payload, Some(Payload::WorkloadStarted(_))));
    assert_eq!(started.node, "n1");
    let heartbeat = first_on(&js, cnnf_bus::topology::HEARTBEATS, "cnnf.heartbeat.prod.n1").await;
    assert!(matches!(heartbeat.payload, Some(Payload::NodeHeartbeat(_))));
    // A new table reaches it too.
    let newer = VerdictTable { version: 8, ..table };
    js.get_key_value(cnnf_bus::topology::VERDICTS_BUCKET)
        .await
        .unwrap()
        .put("prod.n1", signer.sign_table_bytes(&newer.encode_to_vec()).into())
        .await
        .unwrap();
    eventually_every(
        "the agent's table version 8",
        PATIENCE,
        Duration::from_millis(100),
        || async {
            let page = metrics(http_port).await?;
            (cnnf_service::metric_value(&page, "cnnf_agent_table_version") == Some(8.0)).then_some(())
        },
    )
    .await;
    // None of that needed anything its permissions refuse.
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert!(
        !log.lines().any(|line| line.contains("Violation")),
        "the agent hit its permissions:\n{}",
        server.log_tail()
    );
}
