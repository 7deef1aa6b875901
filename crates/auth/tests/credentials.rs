//! The credentials against a real nats-server in operator mode: what a
//! node's creds allow and refuse, and TLS.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::{Event, ServerError};
use cnnf_auth::AuthDir;
use cnnf_bus::NatsOptions;
use cnnf_testkit::{NatsServer, ServerOptions};
use futures::StreamExt as _;
use tokio::sync::mpsc;

const CLUSTER: &str = "prod";

struct Setup {
    _temp: tempfile::TempDir,
    dir: AuthDir,
    server: NatsServer,
    services: jetstream::Context,
}

/// An auth directory, nats-server including its file, and the services
/// connected with their creds and the topology declared.
async fn setup() -> Setup {
    let temp = tempfile::tempdir().unwrap();
    let (dir, created) = AuthDir::init(&temp.path().join("auth")).unwrap();
    assert!(created);
    let server = NatsServer::start_with(ServerOptions {
        include: Some(dir.include_file()),
        ..Default::default()
    })
    .await;
    let services = connect(&server, dir.services_creds(), None).await.0;
    let js = cnnf_bus::jetstream(services);
    cnnf_bus::topology::ensure(&js, &cnnf_bus::TopologyConfig::default())
        .await
        .unwrap();
    Setup {
        _temp: temp,
        dir,
        server,
        services: js,
    }
}

/// A client with `creds` (and an inbox prefix), and the events it sees.
async fn connect(
    server: &NatsServer,
    creds: std::path::PathBuf,
    inbox_prefix: Option<String>,
) -> (async_nats::Client, mpsc::UnboundedReceiver<Event>) {
    let (events_tx, events) = mpsc::unbounded_channel();
    let options = NatsOptions {
        credentials: Some(creds),
        inbox_prefix,
        ..Default::default()
    };
    let client = cnnf_bus::connect_options("test", &options)
        .await
        .unwrap()
        .event_callback(move |event| {
            let events_tx = events_tx.clone();
            async move {
                let _ = events_tx.send(event);
            }
        })
        .connect(server.url())
        .await
        .unwrap();
    (client, events)
}

/// Waits for the server to report a permission violation naming `subject`.
async fn violation(events: &mut mpsc::UnboundedReceiver<Event>, kind: &str, subject: &str) {
    let expected = format!("Permissions Violation for {kind} to \"{subject}\"");
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = events.recv().await {
            if let Event::ServerError(ServerError::Other(message)) = &event {
                if message.contains(&expected) {
                    return true;
                }
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "no violation {expected:?} reported");
}

fn token(value: &str) -> cnnf_core::subjects::Token {
    cnnf_core::subjects::Token::new("test", value).unwrap()
}

#[tokio::test]
async fn a_node_does_exactly_what_its_permissions_allow() {
    let mut setup = setup().await;
    let creds = setup._temp.path().join("n1.creds");
    setup.dir.enroll(CLUSTER, "n1", &creds).unwrap();
    let prefix = cnnf_auth::permissions::node_inbox_prefix(&token(CLUSTER), &token("n1"));
    let (node, mut events) = connect(&setup.server, creds, Some(prefix)).await;
    let js = cnnf_bus::jetstream(node.clone());

    // The services see every flow subject of the cluster.
    let services = setup.services.client();
    let mut flows = services.subscribe(format!("cnnf.flow.{CLUSTER}.>")).await.unwrap();
    services.flush().await.unwrap();

    // Another node's subject: refused.
    node.publish(format!("cnnf.flow.{CLUSTER}.n2"), "forged".into())
        .await
        .unwrap();
    node.flush().await.unwrap();
    violation(&mut events, "Publish", &format!("cnnf.flow.{CLUSTER}.n2")).await;
    // Its own: stored (acked by JetStream) and seen by the services, and
    // it is the first flow they see: the forged one never got through
    // (one connection's messages arrive in order).
    let ack = js
        .publish(format!("cnnf.flow.{CLUSTER}.n1"), "own".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.stream, cnnf_bus::topology::FLOWS);
    let first = tokio::time::timeout(Duration::from_secs(10), flows.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.subject.as_str(), format!("cnnf.flow.{CLUSTER}.n1"));
    assert_eq!(first.payload.as_ref(), b"own");

    // Its own verdict key: not writable.
    let own_key = format!("$KV.cnnf-verdicts.{CLUSTER}.n1");
    node.publish(own_key.clone(), "allow everything".into()).await.unwrap();
    node.flush().await.unwrap();
    violation(&mut events, "Publish", &own_key).await;
    // Policy: not writable.
    node.publish(format!("cnnf.policy.{CLUSTER}.mode"), "off".into())
        .await
        .unwrap();
    node.flush().await.unwrap();
    violation(&mut events, "Publish", &format!("cnnf.policy.{CLUSTER}.mode")).await;

    // Flows: not readable, neither by subscription nor by a consumer.
    let _sub = node.subscribe("cnnf.flow.>").await.unwrap();
    node.flush().await.unwrap();
    violation(&mut events, "Subscription", "cnnf.flow.>").await;
    let quick = jetstream::context::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(node.clone());
    assert!(quick
        .create_consumer_on_stream(
            jetstream::consumer::pull::Config {
                name: Some("steal".into()),
                ..Default::default()
            },
            cnnf_bus::topology::FLOWS,
        )
        .await
        .is_err());
    violation(&mut events, "Publish", "$JS.API.CONSUMER.CREATE.CNNF_FLOWS.steal").await;
    // No stream creation.
    assert!(quick
        .create_stream(jetstream::stream::Config {
            name: "MINE".into(),
            subjects: vec!["mine.>".into()],
            ..Default::default()
        })
        .await
        .is_err());
    violation(&mut events, "Publish", "$JS.API.STREAM.CREATE.MINE").await;
    // Another node's verdicts: no watch.
    assert!(
        cnnf_bus::kv::watch(&quick, "cnnf-verdicts", &format!("{CLUSTER}.n2"), "peek")
            .await
            .is_err()
    );
    violation(
        &mut events,
        "Publish",
        &format!("$JS.API.CONSUMER.CREATE.KV_cnnf-verdicts.peek.$KV.cnnf-verdicts.{CLUSTER}.n2"),
    )
    .await;

    // Its own verdict key and the identities: readable, live.
    let verdicts = setup.services.get_key_value("cnnf-verdicts").await.unwrap();
    verdicts.put(format!("{CLUSTER}.n1"), "table-1".into()).await.unwrap();
    verdicts.put(format!("{CLUSTER}.n2"), "other".into()).await.unwrap();
    let identities = setup.services.get_key_value("cnnf-identities").await.unwrap();
    identities.put("10.0.0.1", "web".into()).await.unwrap();
    let mut table = cnnf_bus::kv::watch(&js, "cnnf-verdicts", &format!("{CLUSTER}.n1"), "own-1")
        .await
        .unwrap();
    let entry = table.next().await.unwrap().unwrap();
    assert_eq!(entry.value.as_ref(), b"table-1");
    verdicts.put(format!("{CLUSTER}.n1"), "table-2".into()).await.unwrap();
    let entry = tokio::time::timeout(Duration::from_secs(10), table.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(entry.value.as_ref(), b"table-2");
    let mut map = cnnf_bus::kv::watch(&js, "cnnf-identities", ">", "ids-1").await.unwrap();
    let entry = map.next().await.unwrap().unwrap();
    assert_eq!((entry.key.as_str(), entry.value.as_ref()), ("10.0.0.1", &b"web"[..]));
    // And a direct get of its own key.
    let own = js.get_key_value("cnnf-verdicts").await.unwrap();
    assert_eq!(
        own.get(format!("{CLUSTER}.n1")).await.unwrap().unwrap().as_ref(),
        b"table-2"
    );
    // The server logs what it refused (the agent's test relies on it). The
    // wording differs between server versions ("Permissions Violation for
    // Publish to \"s\"", "Publish Violation - Subject \"s\""); both name
    // a violation and the quoted subject on one line.
    let log = std::fs::read_to_string(setup.server.log_path()).unwrap();
    assert!(
        log.lines()
            .any(|line| line.contains("Violation") && line.contains("\"cnnf.flow.prod.n2\"")),
        "the server's log has no violation for cnnf.flow.prod.n2:\n{}",
        log.lines()
            .filter(|line| line.contains("Violation"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test]
async fn tls_needs_the_ca_and_verified_clients_their_certificate() {
    let server = NatsServer::start_with(ServerOptions {
        tls: true,
        ..Default::default()
    })
    .await;
    let tls = server.tls().unwrap().clone();
    let with_ca = NatsOptions {
        ca: Some(tls.ca.clone()),
        ..Default::default()
    };
    let client = cnnf_bus::connect_options("test", &with_ca)
        .await
        .unwrap()
        .connect(server.url())
        .await
        .unwrap();
    client.publish("hello", "tls".into()).await.unwrap();
    client.flush().await.unwrap();
    let refused = cnnf_bus::connect_options("test", &NatsOptions::default())
        .await
        .unwrap()
        .connect(server.url())
        .await;
    assert!(refused.is_err(), "a client without the CA must not connect");

    let verifying = NatsServer::start_with(ServerOptions {
        tls: true,
        verify_clients: true,
        ..Default::default()
    })
    .await;
    let tls = verifying.tls().unwrap().clone();
    let no_cert = NatsOptions {
        ca: Some(tls.ca.clone()),
        ..Default::default()
    };
    assert!(cnnf_bus::connect_options("test", &no_cert)
        .await
        .unwrap()
        .connect(verifying.url())
        .await
        .is_err());
    let with_cert = NatsOptions {
        ca: Some(tls.ca.clone()),
        cert: Some(tls.client_cert.clone()),
        key: Some(tls.client_key.clone()),
        ..Default::default()
    };
    let client = cnnf_bus::connect_options("test", &with_cert)
        .await
        .unwrap()
        .connect(verifying.url())
        .await
        .unwrap();
    client.flush().await.unwrap();
    assert!(matches!(
        cnnf_bus::connect_options(
            "test",
            &NatsOptions {
                cert: Some(tls.client_cert),
                ..Default::default()
            }
        )
        .await,
        Err(cnnf_bus::ConnectError::HalfClientCertificate)
    ));
}
