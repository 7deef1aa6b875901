//! `cnnf auth init` and `cnnf nodes enroll|list|revoke` against a real
//! nats-server in operator mode: a revoked node is cut off at once and
//! cannot log in again, also after a server restart.

use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::Event;
use cnnf_testkit::{NatsServer, ServerOptions};
use tokio::sync::mpsc;

/// Runs `cnnf` with `args`: exit code, stdout, stderr.
async fn cnnf(args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_cnnf"))
        .args(args)
        .env_remove("CNNF_NATS_CREDS")
        .output()
        .await
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Connects with `creds` under node n1's inbox prefix; the client's events.
async fn connect_node(
    server: &NatsServer,
    creds: &Path,
) -> Result<(async_nats::Client, mpsc::UnboundedReceiver<Event>), async_nats::ConnectError> {
    let (events_tx, events) = mpsc::unbounded_channel();
    let options = cnnf_bus::NatsOptions {
        credentials: Some(creds.to_owned()),
        inbox_prefix: Some("_INBOX_prod.n1".into()),
        ..Default::default()
    };
    let client = cnnf_bus::connect_options("node", &options)
        .await
        .unwrap()
        .event_callback(move |event| {
            let events_tx = events_tx.clone();
            async move {
                let _ = events_tx.send(event);
            }
        })
        .connect(server.url())
        .await?;
    Ok((client, events))
}

#[tokio::test]
async fn a_revoked_node_is_disconnected_and_refused() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("auth");
    let creds = temp.path().join("n1.creds");

    let (code, out, err) = cnnf(&["auth", "init", "--dir", text(&dir)]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("created"), "{out}");
    let (code, out, _) = cnnf(&["auth", "init", "--dir", text(&dir)]).await;
    assert_eq!(code, 0);
    assert!(out.contains("nothing changed"), "{out}");
    let (code, out, err) = cnnf(&[
        "nodes",
        "enroll",
        "--auth-dir",
        text(&dir),
        "--cluster",
        "prod",
        "--node",
        "n1",
        "--out",
        text(&creds),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("enrolled node n1 of cluster prod"), "{out}");

    // Bad usage: what and where, status 64.
    let (code, _, err) = cnnf(&[
        "nodes",
        "enroll",
        "--auth-dir",
        text(&dir),
        "--cluster",
        "prod",
        "--node",
        "a.b",
        "--out",
        text(&creds),
    ])
    .await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("node \"a.b\""), "{err}");
    let missing = temp.path().join("nowhere");
    let (code, _, err) = cnnf(&["nodes", "list", "--auth-dir", text(&missing)]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains(text(&missing)) && err.contains("cnnf auth init"), "{err}");
    let (code, _, err) = cnnf(&["nodes", "revoke", "--auth-dir", text(&dir), "--cluster", "prod"]).await;
    assert_eq!(code, 64, "{err}");
    let (code, _, err) = cnnf(&["--nats-creds", text(&missing), "status"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--nats-creds"), "{err}");
    // Enrolling an enrolled node again is refused (revoke first).
    let (code, _, err) = cnnf(&[
        "nodes",
        "enroll",
        "--auth-dir",
        text(&dir),
        "--cluster",
        "prod",
        "--node",
        "n1",
        "--out",
        text(&creds),
    ])
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("already enrolled"), "{err}");

    let mut server = NatsServer::start_with(ServerOptions {
        include: Some(dir.join("nats-auth.conf")),
        ..Default::default()
    })
    .await;
    let (node, mut events) = connect_node(&server, &creds).await.unwrap();
    node.publish("cnnf.heartbeat.prod.n1", "alive".into()).await.unwrap();
    node.flush().await.unwrap();
    // The services' creds work for the CLI's own commands.
    let services = dir.join("services.creds");
    let (code, out, err) = cnnf(&["--nats-url", &server.url(), "--nats-creds", text(&services), "status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("STREAM"), "{out}");

    let started = Instant::now();
    let (code, out, err) = cnnf(&[
        "--nats-url",
        &server.url(),
        "nodes",
        "revoke",
        "--auth-dir",
        text(&dir),
        "--cluster",
        "prod",
        "--node",
        "n1",
    ])
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("pushed the account"), "{out}");
    let disconnected = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = events.recv().await {
            if matches!(event, Event::Disconnected | Event::Closed) {
                return;
            }
        }
    })
    .await;
    assert!(
        disconnected.is_ok(),
        "the revoked node was not disconnected within 10 s"
    );
    println!(
        "revocation to disconnect: {:?} (including the cnnf process)",
        started.elapsed()
    );
    drop(node);

    // It cannot log in again, now or after a restart of the server.
    assert!(connect_node(&server, &creds).await.is_err());
    server.restart().await;
    assert!(connect_node(&server, &creds).await.is_err());
    let (code, out, _) = cnnf(&["nodes", "list", "--auth-dir", text(&dir)]).await;
    assert_eq!(code, 0);
    let line = out.lines().find(|line| line.contains(" n1 ")).unwrap();
    assert!(line.starts_with("prod"), "{out}");
    assert!(!line.trim_end().ends_with('-'), "n1 shows as revoked: {out}");

    // Enrolled again: new creds that work.
    let (code, _, err) = cnnf(&[
        "nodes",
        "enroll",
        "--auth-dir",
        text(&dir),
        "--cluster",
        "prod",
        "--node",
        "n1",
        "--out",
        text(&creds),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let (node, _) = connect_node(&server, &creds).await.unwrap();
    node.flush().await.unwrap();
}
