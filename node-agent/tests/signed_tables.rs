//! Signed verdict tables, control plane only (`--no-dataplane`): a real
//! agent against a real nats-server takes a table signed by its trusted key,
//! refuses unsigned, foreign-key and other-node tables (each counted by
//! reason, the last good table staying), reloads the signed table it
//! persisted, and will not start without trusted keys.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream;
use cnnf_proto::v1::{Mode, VerdictTable};
use cnnf_service::Health;
use cnnf_signing::SigningKey;
use cnnf_testkit::NatsServer;
use prost::Message as _;

const CLUSTER: &str = "prod";
const NODE: &str = "node-s1";
const PATIENCE: Duration = Duration::from_secs(30);

fn table(version: u64, node: &str, mode: Mode) -> Vec<u8> {
    VerdictTable {
        version,
        cluster: CLUSTER.into(),
        node: node.into(),
        mode: mode as i32,
        ..Default::default()
    }
    .encode_to_vec()
}

fn config(nats: &NatsServer, state: &Path, keys: &Path) -> cnnf_agent::Config {
    <cnnf_agent::Config as clap::Parser>::try_parse_from([
        "cnnf-agent",
        "--no-dataplane",
        "--nats-url",
        &nats.url(),
        "--cluster",
        CLUSTER,
        "--node",
        NODE,
        "--data-dir",
        state.to_str().unwrap(),
        "--table-keys",
        keys.to_str().unwrap(),
    ])
    .unwrap()
}

struct Agent {
    health: Health,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Agent {
    fn start(config: cnnf_agent::Config) -> Self {
        let health = Health::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(cnnf_agent::run(config, health.clone(), async {
            let _ = stopped.await;
        }));
        Self { health, stop, task }
    }

    fn metric(&self, name: &str) -> f64 {
        self.health.metric(name).unwrap_or(0.0)
    }

    fn version(&self) -> f64 {
        self.metric("cnnf_agent_table_version")
    }

    fn rejects(&self, reason: &str) -> f64 {
        self.metric(&format!("cnnf_agent_table_rejects_total{{reason=\"{reason}\"}}"))
    }

    /// Waits until `done` holds of this agent's metrics.
    async fn wait(&self, what: &str, done: impl Fn(&Agent) -> bool) {
        cnnf_testkit::eventually(what, PATIENCE, || async { done(self).then_some(()) }).await;
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("agent stops")
            .unwrap()
            .unwrap();
    }
}

fn write_keys(path: &PathBuf, keys: &[&SigningKey]) {
    let text: String = keys
        .iter()
        .map(|key| format!("{}\n", key.public_key().to_line()))
        .collect();
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_tables_signed_by_a_trusted_key_for_this_node_are_enforced() {
    let nats = NatsServer::start().await;
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    cnnf_bus::topology::ensure(&js, &Default::default()).await.unwrap();
    let kv = js.get_key_value(cnnf_bus::topology::VERDICTS_BUCKET).await.unwrap();
    let key = format!("{CLUSTER}.{NODE}");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let keys = dir.path().join("trusted.pub");
    let policy = SigningKey::generate();
    let intruder = SigningKey::generate();
    write_keys(&keys, &[&policy]);

    let agent = Agent::start(config(&nats, &state, &keys));
    kv.put(&key, policy.sign_table_bytes(&table(5, NODE, Mode::Prevent)).into())
        .await
        .unwrap();
    agent
        .wait("the signed table in force", |agent| agent.version() == 5.0)
        .await;

    // Each bad value is refused for its own reason, the last good table
    // staying in force. Every one is newer than the table in force, so only
    // its signature or its node keeps it out.
    let refusals: [(&str, Vec<u8>); 4] = [
        ("unsigned", table(10, NODE, Mode::Disabled)),
        (
            "unknown-key",
            intruder.sign_table_bytes(&table(11, NODE, Mode::Disabled)),
        ),
        ("signature", {
            let mut forged = intruder.sign_table(&table(12, NODE, Mode::Disabled));
            forged.key_id = policy.id().to_string();
            forged.encode_to_vec()
        }),
        (
            "wrong-node",
            policy.sign_table_bytes(&table(13, "node-other", Mode::Disabled)),
        ),
    ];
    for (reason, value) in refusals {
        let before = agent.rejects(reason);
        kv.put(&key, value.into()).await.unwrap();
        agent
            .wait(&format!("a {reason} rejection"), |agent| {
                agent.rejects(reason) == before + 1.0
            })
            .await;
        assert_eq!(agent.version(), 5.0, "after the {reason} value");
    }
    assert_eq!(agent.metric("cnnf_agent_table_rejects_total{reason=\"decode\"}"), 0.0);
    agent.stop().await;

    // The persisted file is the signed value, verified again at start: the
    // restarted agent enforces version 5 from the file alone.
    let persisted = std::fs::read(state.join(cnnf_agent::tables::TABLE_FILE)).unwrap();
    let opened = cnnf_signing::open(&persisted, &[policy.public_key().clone()]).unwrap();
    assert_eq!(VerdictTable::decode(opened.table.as_slice()).unwrap().version, 5);
    drop(nats);
    // A NATS server without the bucket: only the file can say version 5.
    let empty_nats = NatsServer::start().await;
    let restarted = Agent::start(config(&empty_nats, &state, &keys));
    restarted
        .wait("the persisted table in force", |agent| agent.version() == 5.0)
        .await;
    assert_eq!(restarted.rejects("unsigned") + restarted.rejects("signature"), 0.0);
    restarted.stop().await;

    // Trusting another key only, the same file is refused at load: the
    // safe default (version 0) until a table that verifies arrives.
    write_keys(&keys, &[&intruder]);
    let distrusting = Agent::start(config(&empty_nats, &state, &keys));
    distrusting
        .wait("the persisted table refused", |agent| {
            agent.rejects("unknown-key") == 1.0
        })
        .await;
    assert_eq!(distrusting.version(), 0.0);
    distrusting.stop().await;
}

#[test]
fn without_trusted_keys_the_agent_refuses_to_start_with_status_64() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_cnnf-agent"))
        .args(["--no-dataplane", "--node", "n1", "--data-dir"])
        .arg(dir.path())
        .env_remove("CNNF_TABLE_KEYS")
        .env_remove("CNNF_ALLOW_UNSIGNED_TABLES")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--table-keys") && stderr.contains("table-signing.pub"),
        "{stderr}"
    );

    let keys = dir.path().join("trusted.pub");
    std::fs::write(&keys, "cnnf-ed25519-public 0000 AAAA\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_cnnf-agent"))
        .args(["--no-dataplane", "--node", "n1", "--table-keys"])
        .arg(&keys)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("trusted.pub"));
}
