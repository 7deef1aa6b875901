//! The policy service against a real nats-server and real RocksDB stores:
//! every line of the decision order through compile and evaluate, conflict
//! warnings, export → import into a fresh system → export byte for byte,
//! two concurrent writers losing no update, invalid imports changing
//! nothing, a restart that reconciles the verdict bucket, and every table
//! in it signed by the service's key (re-signed after a key change).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use clap::Parser as _;
use cnnf_core::eval::{CompiledTable, Connection, DecidedBy, Identity, Scope};
use cnnf_policy::Config;
use cnnf_proto::v1::envelope::Payload;
use cnnf_proto::v1::network_object::Kind as ObjectKind;
use cnnf_proto::v1::policy_client::PolicyClient;
use cnnf_proto::v1::{
    model_event, policy_event, Envelope, ExportRequest, GetPolicyRequest, IdentityKind, ImportRequest,
    LearnedConnection, Mode, ModelEvent, NetworkObject, PolicyCommand, PolicyCommandResult, PolicyEvent,
    PolicySnapshot, PortRange, Protocol, Rule, RuleDestination, RuleEffect, Side, Verdict, VerdictTable, Workload,
    WorkloadStarted,
};
use cnnf_service::Health;
use cnnf_store::ProjectionStore;
use cnnf_testkit::NatsServer;
use prost::Message as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const CLUSTER: &str = "c";
const WAIT: Duration = Duration::from_secs(60);
const WEB: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000eb0";
const DB: &str = "sha256:00000000000000000000000000000000000000000000000000000000000000db";
const API: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000a91";
const NEW: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000e37";

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Polls `check` until it returns `Some`, or fails with `what`.
async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    cnnf_testkit::eventually(what, WAIT, check).await
}

fn open_store(dir: &Path) -> Arc<dyn ProjectionStore> {
    Arc::new(cnnf_policy::open_store(dir).unwrap())
}

/// The key test services sign with (fixed, so a restarted service signs
/// as before).
fn signing_key() -> cnnf_signing::SigningKey {
    cnnf_signing::SigningKey::from_seed(&[7; 32])
}

/// One running policy service.
struct Service {
    grpc: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
    /// Holds the key file of [`signing_key`].
    _keys: tempfile::TempDir,
}

impl Service {
    /// Starts the service signing with [`signing_key`].
    async fn start(server: &NatsServer, store: Arc<dyn ProjectionStore>) -> Self {
        Self::start_signing(server, store, &signing_key()).await
    }

    /// Starts the service signing with `key`.
    async fn start_signing(
        server: &NatsServer,
        store: Arc<dyn ProjectionStore>,
        key: &cnnf_signing::SigningKey,
    ) -> Self {
        let keys = tempfile::tempdir().unwrap();
        let path = keys.path().join("table-signing.key");
        cnnf_signing::files::write_signing_key(&path, key).unwrap();
        Self::start_with(server, store, &["--table-signing-key", path.to_str().unwrap()], keys).await
    }

    /// Starts the service with `extra` flags.
    async fn start_with(
        server: &NatsServer,
        store: Arc<dyn ProjectionStore>,
        extra: &[&str],
        keys: tempfile::TempDir,
    ) -> Self {
        let grpc = free_addr();
        let url = server.url();
        let grpc_text = grpc.to_string();
        let mut args = vec![
            "cnnf-policy",
            "--nats-url",
            &url,
            "--cluster",
            CLUSTER,
            "--grpc-addr",
            &grpc_text,
            "--grpc-insecure",
        ];
        args.extend_from_slice(extra);
        let config = Config::try_parse_from(args).unwrap();
        cnnf_service::init_logging();
        let health = Health::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(cnnf_policy::run_with_store(
            config,
            store,
            health.clone(),
            cnnf_policy::RunOptions::default(),
            async move {
                let _ = stopped.await;
            },
        ));
        let service = Self {
            grpc,
            stop: Some(stop),
            task,
            _keys: keys,
        };
        eventually("the service to be ready", || async {
            assert!(!service.task.is_finished(), "the service ended early");
            (health.not_ready().is_empty() && PolicyClient::connect(format!("http://{}", service.grpc)).await.is_ok())
                .then_some(())
        })
        .await;
        service
    }

    async fn client(&self) -> PolicyClient<tonic::transport::Channel> {
        PolicyClient::connect(format!("http://{}", self.grpc)).await.unwrap()
    }

    async fn snapshot(&self) -> PolicySnapshot {
        self.client()
            .await
            .get_policy(GetPolicyRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// Applies `change` at the current revision, retrying on conflicts.
    /// Applies `change` at the current revision (retrying on a conflict)
    /// and waits until the service reads its own write.
    async fn apply(&self, change: policy_event::Change) -> Result<PolicyCommandResult, tonic::Status> {
        loop {
            let revision = self.snapshot().await.revision;
            match self.apply_at(revision, change.clone()).await {
                Err(status) if status.code() == tonic::Code::Aborted => continue,
                Ok(result) => {
                    self.at(result.revision).await;
                    return Ok(result);
                }
                other => return other,
            }
        }
    }

    async fn apply_at(
        &self,
        revision: u64,
        change: policy_event::Change,
    ) -> Result<PolicyCommandResult, tonic::Status> {
        self.client()
            .await
            .apply(PolicyCommand {
                expected_revision: revision,
                change: Some(PolicyEvent {
                    revision: 0,
                    actor: "alice".into(),
                    change: Some(change),
                }),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Waits until the store applied `revision`.
    async fn at(&self, revision: u64) {
        eventually("the policy to reach the revision", || async {
            (self.snapshot().await.revision >= revision).then_some(())
        })
        .await;
    }

    async fn export(&self, rule_id: &str, format: &str) -> Vec<u8> {
        self.client()
            .await
            .export(ExportRequest {
                rule_id: rule_id.into(),
                format: format.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .document
    }

    async fn import(&self, document: &[u8]) -> Result<PolicyCommandResult, tonic::Status> {
        let revision = self.snapshot().await.revision;
        self.client()
            .await
            .import(ImportRequest {
                expected_revision: revision,
                document: document.to_vec(),
                actor: "bob".into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap().unwrap();
    }
}

async fn jetstream_of(server: &NatsServer) -> jetstream::Context {
    cnnf_bus::jetstream(
        cnnf_bus::connect(&server.url(), "test", &cnnf_bus::NatsOptions::default())
            .await
            .unwrap(),
    )
}

async fn publish(js: &jetstream::Context, subject: String, envelope: Envelope) {
    let publish = jetstream::message::PublishMessage::build()
        .payload(cnnf_core::envelope::encode(envelope.clone()).into())
        .message_id(&envelope.event_id);
    js.send_publish(subject, publish).await.unwrap().await.unwrap();
}

fn envelope(node: &str, id: String, payload: Payload) -> Envelope {
    Envelope {
        schema_version: cnnf_proto::SCHEMA_VERSION,
        event_id: id,
        cluster: CLUSTER.into(),
        node: node.into(),
        time_unix_nanos: 1_700_000_000_000_000_000,
        payload: Some(payload),
        ..Default::default()
    }
}

async fn start_workload(js: &jetstream::Context, node: &str, container: &str, image: &str, address: &str) {
    let workload = Workload {
        container_id: container.into(),
        image_id: image.into(),
        image_name: format!("registry/{container}:1"),
        addresses: vec![address.into()],
        labels: [("app".to_owned(), container.to_owned())].into_iter().collect(),
        cluster: CLUSTER.into(),
        node: node.into(),
        namespace: "shop".into(),
        ..Default::default()
    };
    let payload = Payload::WorkloadStarted(WorkloadStarted {
        workload: Some(workload),
    });
    publish(
        js,
        format!("cnnf.workload.{CLUSTER}.{node}"),
        envelope(node, format!("{node}:boot:{container}"), payload),
    )
    .await;
}

async fn model_event(js: &jetstream::Context, image: &str, id: &str, change: model_event::Change) {
    let event = ModelEvent {
        image_id: image.into(),
        revision: 0,
        actor: "learning".into(),
        change: Some(change),
    };
    publish(
        js,
        format!("cnnf.model.{image}"),
        envelope("", format!("test:{image}:{id}"), Payload::Model(event)),
    )
    .await;
}

fn peer(kind: IdentityKind, id: &str) -> cnnf_proto::v1::Identity {
    cnnf_proto::v1::Identity {
        kind: kind as i32,
        id: id.into(),
        ..Default::default()
    }
}

fn learned(side: Side, peer_image: &str, port: u32) -> LearnedConnection {
    LearnedConnection {
        side: side as i32,
        peer: Some(peer(IdentityKind::Image, peer_image)),
        port,
        protocol: Protocol::Tcp as i32,
        count: 3,
        ..Default::default()
    }
}

/// A model that learned `connections` and then locked.
async fn enforcing_model(js: &jetstream::Context, image: &str, connections: Vec<LearnedConnection>) {
    model_event(
        js,
        image,
        "created",
        model_event::Change::Created(model_event::Created {
            image_name: format!("{image}-name"),
            learning_ends_unix_nanos: 0,
        }),
    )
    .await;
    model_event(
        js,
        image,
        "learned",
        model_event::Change::Learned(model_event::Learned { connections }),
    )
    .await;
    model_event(
        js,
        image,
        "locked",
        model_event::Change::Locked(model_event::Locked {
            reason: "operator".into(),
        }),
    )
    .await;
}

fn image_object(name: &str, id: &str) -> policy_event::Change {
    policy_event::Change::ObjectPut(policy_event::ObjectPut {
        object: Some(NetworkObject {
            name: name.into(),
            kind: ObjectKind::Image as i32,
            image_id: id.into(),
            ..Default::default()
        }),
    })
}

fn subnet_object(name: &str, cidr: &str) -> policy_event::Change {
    policy_event::Change::ObjectPut(policy_event::ObjectPut {
        object: Some(NetworkObject {
            name: name.into(),
            kind: ObjectKind::Subnet as i32,
            cidrs: vec![cidr.into()],
            ..Default::default()
        }),
    })
}

fn destination(object: &str, first: u32, last: u32, effect: RuleEffect) -> RuleDestination {
    RuleDestination {
        object: object.into(),
        ports: vec![PortRange { first, last }],
        protocol: Protocol::Tcp as i32,
        effect: effect as i32,
    }
}

fn rule(
    id: &str,
    source: &str,
    destinations: Vec<RuleDestination>,
    allow_learned: bool,
    effect: RuleEffect,
) -> policy_event::Change {
    policy_event::Change::RulePut(policy_event::RulePut {
        rule: Some(Rule {
            id: id.into(),
            source: source.into(),
            destinations,
            allow_learned,
            effect: effect as i32,
            ..Default::default()
        }),
    })
}

fn mode(mode: Mode) -> policy_event::Change {
    policy_event::Change::ModeSet(policy_event::ModeSet {
        mode: mode as i32,
        host: false,
    })
}

async fn bucket(js: &jetstream::Context) -> kv::Store {
    js.get_key_value(cnnf_bus::topology::VERDICTS_BUCKET).await.unwrap()
}

/// Waits for node `node`'s table to satisfy `check` and to verify with the
/// public key of [`signing_key`]; returns it built.
async fn table_where(
    bucket: &kv::Store,
    node: &str,
    what: &str,
    check: impl Fn(&VerdictTable) -> bool,
) -> CompiledTable {
    table_signed_where(bucket, node, what, &signing_key().public_key().clone(), check).await
}

/// [`table_where`], verifying with `trusted`.
async fn table_signed_where(
    bucket: &kv::Store,
    node: &str,
    what: &str,
    trusted: &cnnf_signing::PublicKey,
    check: impl Fn(&VerdictTable) -> bool,
) -> CompiledTable {
    let key = format!("{CLUSTER}.{node}");
    let table = eventually(what, || async {
        let value = bucket.get(&key).await.unwrap()?;
        // Only a value that verifies counts (an unsigned one put by a test
        // is waited past).
        let opened = cnnf_signing::open(value.as_ref(), std::slice::from_ref(trusted)).ok()?;
        let table = VerdictTable::decode(opened.table.as_slice()).unwrap();
        check(&table).then_some(table)
    })
    .await;
    CompiledTable::build(table).unwrap()
}

fn image(id: &str) -> Identity {
    Identity::Image {
        id: id.into(),
        name: format!("{id}-name"),
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// Decides `source@sa → destination@da:port` (TCP) as a node hosting both.
fn decide<'t>(
    table: &'t CompiledTable,
    source: &Identity,
    sa: &str,
    destination: &Identity,
    da: &str,
    port: u16,
    scope: Scope,
) -> (Verdict, DecidedBy<'t>) {
    let decision = table.decide(&Connection {
        source,
        source_address: ip(sa),
        destination,
        destination_address: ip(da),
        port,
        protocol: Protocol::Tcp,
        scope,
    });
    (decision.verdict, decision.decided_by)
}

/// Every line of SPEC.md section 4's decision order, through the policy
/// API, the model and workload streams, the compiler, the KV bucket and
/// `CompiledTable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_of_the_decision_order_through_compile_and_evaluate() {
    let server = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let service = Service::start(&server, open_store(dir.path())).await;
    let js = jetstream_of(&server).await;
    let bucket = bucket(&js).await;

    // n1 runs web (10.1.0.5), db (10.2.0.7, inside subnet dbnet) and api; n2 runs only `new`.
    start_workload(&js, "n1", "web", WEB, "10.1.0.5").await;
    start_workload(&js, "n1", "db", DB, "10.2.0.7").await;
    start_workload(&js, "n1", "api", API, "10.1.0.9").await;
    start_workload(&js, "n2", "new", NEW, "10.3.0.1").await;
    // web and db enforce; api learns; `new` has no model.
    enforcing_model(
        &js,
        WEB,
        vec![learned(Side::Outbound, DB, 6379), learned(Side::Inbound, DB, 8080)],
    )
    .await;
    enforcing_model(
        &js,
        DB,
        vec![learned(Side::Inbound, WEB, 6379), learned(Side::Outbound, WEB, 8080)],
    )
    .await;
    model_event(
        &js,
        API,
        "created",
        model_event::Change::Created(model_event::Created::default()),
    )
    .await;

    // mode disabled -> allow; learn where learning; record (gray)
    let table = table_where(&bucket, "n1", "n1's table with both models", |t| {
        t.models.len() == 3 && t.models.iter().filter(|m| m.state == 2).count() == 2
    })
    .await;
    assert_eq!(
        decide(&table, &image(WEB), "10.1.0.5", &image(DB), "10.2.0.7", 22, Scope::Both),
        (Verdict::Observe, DecidedBy::Mode),
        "mode disabled"
    );
    // Only what the node's workloads need: n2's table has no model of web or db.
    let n2 = table_where(&bucket, "n2", "n2's table", |_| true).await;
    assert!(n2.table().models.iter().all(|m| m.image_id != WEB && m.image_id != DB));

    for change in [
        image_object("web", WEB),
        image_object("db", DB),
        image_object("api", API),
        subnet_object("dbnet", "10.2.0.0/16"),
    ] {
        service.apply(change).await.unwrap();
    }
    // r-web: allows db:80; prevents dbnet 5432-5433; learned fallback; else prevent.
    let written = service
        .apply(rule(
            "r-web",
            "web",
            vec![
                destination("db", 80, 0, RuleEffect::Unspecified),
                destination("dbnet", 5432, 5433, RuleEffect::Prevent),
            ],
            true,
            RuleEffect::Prevent,
        ))
        .await
        .unwrap();
    assert!(written.conflicts.is_empty(), "{:?}", written.conflicts);
    // A second rule of web allowing db:5432, which the subnet deny overrides:
    // the conflict is reported when it is written, naming both rules.
    let written = service
        .apply(rule(
            "r-web-db",
            "web",
            vec![destination("db", 5432, 0, RuleEffect::Unspecified)],
            false,
            RuleEffect::Alert,
        ))
        .await
        .unwrap();
    assert_eq!(
        written.conflicts,
        vec![
            "rule \"r-web\" prevents tcp port 5432 of \"dbnet\", which rule \"r-web-db\" allows to image \"db\" whose containers sit inside that subnet: the prevent wins"
                .to_owned()
        ]
    );
    let revision = service.apply(mode(Mode::Alert)).await.unwrap().revision;
    service.at(revision).await;
    let table = table_where(&bucket, "n1", "n1's table in alert mode", |t| {
        t.policy_revision >= revision && t.mode == Mode::Alert as i32
    })
    .await;
    assert_eq!(table.table().rules.len(), 2);

    // resolve S and D to identities
    assert_eq!(table.resolve_object(ip("10.2.0.7")), Some("dbnet"));
    // a subnet rule of S alerts/prevents D -> that effect
    assert_eq!(
        decide(
            &table,
            &image(WEB),
            "10.1.0.5",
            &image(DB),
            "10.2.0.7",
            5432,
            Scope::Both
        ),
        (Verdict::Prevent, DecidedBy::Rule("r-web")),
        "subnet prevent beats the allow of r-web-db"
    );
    // a rule with source S exists: D:port among its destinations -> allow
    assert_eq!(
        decide(&table, &image(WEB), "10.1.0.5", &image(DB), "10.2.0.7", 80, Scope::Both),
        (Verdict::Allow, DecidedBy::Rule("r-web")),
    );
    // rule allows learned and known -> allow
    assert_eq!(
        decide(
            &table,
            &image(WEB),
            "10.1.0.5",
            &image(DB),
            "10.2.0.7",
            6379,
            Scope::Both
        ),
        (Verdict::Allow, DecidedBy::Rule("r-web")),
    );
    // otherwise -> the rule's effect (prevent, the strongest of web's rules)
    assert_eq!(
        decide(&table, &image(WEB), "10.1.0.5", &image(DB), "10.2.0.7", 22, Scope::Both),
        (Verdict::Prevent, DecidedBy::Rule("r-web")),
    );
    // no rule for S: known -> allow (db's model knows db -> web:8080)
    assert_eq!(
        decide(
            &table,
            &image(DB),
            "10.2.0.7",
            &image(WEB),
            "10.1.0.5",
            8080,
            Scope::Both
        ),
        (Verdict::Allow, DecidedBy::Model(DB)),
    );
    // ... learning sides learn (api learns)
    assert_eq!(
        decide(
            &table,
            &image(API),
            "10.1.0.9",
            &image(DB),
            "10.2.0.7",
            9999,
            Scope::Egress
        ),
        (Verdict::Learn, DecidedBy::Model(API)),
    );
    // otherwise -> the global mode: alert
    assert_eq!(
        decide(
            &table,
            &image(DB),
            "10.2.0.7",
            &image(WEB),
            "10.1.0.5",
            9999,
            Scope::Both
        ),
        (Verdict::Alert, DecidedBy::Mode),
    );
    // ... and prevent
    let revision = service.apply(mode(Mode::Prevent)).await.unwrap().revision;
    let table = table_where(&bucket, "n1", "n1's table in prevent mode", |t| {
        t.policy_revision >= revision
    })
    .await;
    assert_eq!(
        decide(
            &table,
            &image(DB),
            "10.2.0.7",
            &image(WEB),
            "10.1.0.5",
            9999,
            Scope::Both
        ),
        (Verdict::Prevent, DecidedBy::Mode),
    );

    // A disabled rule takes no part: without r-web, web has only r-web-db (alert).
    let mut disabled = match rule("r-web", "web", vec![], true, RuleEffect::Prevent) {
        policy_event::Change::RulePut(put) => put.rule.unwrap(),
        _ => unreachable!(),
    };
    disabled.disabled = true;
    disabled.destinations = vec![destination("db", 80, 0, RuleEffect::Unspecified)];
    let revision = service
        .apply(policy_event::Change::RulePut(policy_event::RulePut {
            rule: Some(disabled),
        }))
        .await
        .unwrap()
        .revision;
    let table = table_where(&bucket, "n1", "n1's table without r-web", |t| {
        t.policy_revision >= revision
    })
    .await;
    assert_eq!(
        decide(&table, &image(WEB), "10.1.0.5", &image(DB), "10.2.0.7", 22, Scope::Both),
        (Verdict::Alert, DecidedBy::Rule("r-web-db")),
    );

    // A model change recompiles the nodes running the image, and versions grow.
    let before = table.version();
    model_event(
        &js,
        DB,
        "relearn",
        model_event::Change::Relearn(model_event::Relearn::default()),
    )
    .await;
    let table = table_where(&bucket, "n1", "db learning again", |t| {
        t.models
            .iter()
            .any(|m| m.image_id == DB && m.state == 1 && m.inbound.is_empty())
    })
    .await;
    assert!(table.version() > before);

    // Invalid writes are refused with their path; nothing is published.
    let error = service
        .apply(rule(
            "bad",
            "nobody",
            vec![destination("db", 70_000, 0, RuleEffect::Unspecified)],
            false,
            RuleEffect::Alert,
        ))
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert!(
        error.message().contains("rule.source: no object named \"nobody\""),
        "{}",
        error.message()
    );
    assert!(
        error
            .message()
            .contains("rule.destinations[0].ports[0].first: 70000 is not a port"),
        "{}",
        error.message()
    );
    let error = service
        .apply(policy_event::Change::ObjectDeleted(policy_event::ObjectDeleted {
            name: "db".into(),
        }))
        .await
        .unwrap_err();
    assert!(error.message().contains("used by rules"), "{}", error.message());

    // A restart reconciles: nothing to publish, the bucket keeps the same table.
    let kv_before = bucket.entry(format!("{CLUSTER}.n1")).await.unwrap().unwrap().revision;
    service.stop().await;
    let service = Service::start(&server, open_store(dir.path())).await;
    let _ = service.snapshot().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kv_after = bucket.entry(format!("{CLUSTER}.n1")).await.unwrap().unwrap().revision;
    assert_eq!(
        kv_before, kv_after,
        "an unchanged table is not republished after a restart"
    );
    let version = table_where(&bucket, "n1", "n1's table", |_| true).await.version();
    service.stop().await;

    // A new signing key (a rotation): the restart re-signs every table in
    // the bucket with it, at the same version.
    let rotated = cnnf_signing::SigningKey::from_seed(&[8; 32]);
    let service = Service::start_signing(&server, open_store(dir.path()), &rotated).await;
    let table = table_signed_where(
        &bucket,
        "n1",
        "n1's table signed by the new key",
        rotated.public_key(),
        |_| true,
    )
    .await;
    assert_eq!(table.version(), version, "re-signed, not recompiled");
    let value = bucket.get(format!("{CLUSTER}.n1")).await.unwrap().unwrap();
    assert_eq!(
        cnnf_signing::open(value.as_ref(), &[signing_key().public_key().clone()])
            .unwrap_err()
            .code(),
        "unknown-key",
        "the old key no longer signs"
    );
    service.stop().await;
}

/// Without `--table-signing-key` the service generates its key in the data
/// directory at first start, with the public key beside it, and every
/// table it puts verifies with that public key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_start_generates_the_key_whose_public_half_verifies_every_table() {
    let server = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let service = Service::start_with(
        &server,
        open_store(dir.path()),
        &["--data-dir", data.path().to_str().unwrap()],
        tempfile::tempdir().unwrap(),
    )
    .await;
    let secret = data.path().join(cnnf_policy::SIGNING_KEY_FILE);
    let public = cnnf_signing::files::read_public_keys(&data.path().join("table-signing.pub")).unwrap();
    assert_eq!(
        public,
        vec![cnnf_signing::files::read_signing_key(&secret)
            .unwrap()
            .public_key()
            .clone()]
    );
    let js = jetstream_of(&server).await;
    start_workload(&js, "n1", "web", WEB, "10.1.0.5").await;
    let table = table_signed_where(&bucket(&js).await, "n1", "n1's table", &public[0], |_| true).await;
    assert_eq!(table.table().node, "n1");
    // An unsigned table written by someone else is not taken for the
    // policy's: at the next start it is replaced by a signed one.
    let bucket = bucket(&js).await;
    let plain = table.table().encode_to_vec();
    bucket.put(format!("{CLUSTER}.n1"), plain.into()).await.unwrap();
    service.stop().await;
    let service = Service::start_with(
        &server,
        open_store(dir.path()),
        &["--data-dir", data.path().to_str().unwrap()],
        tempfile::tempdir().unwrap(),
    )
    .await;
    table_signed_where(&bucket, "n1", "n1's table signed again", &public[0], |_| true).await;
    service.stop().await;
}

/// Two operators write at once: each retries on conflict; no update is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_writers_lose_no_update() {
    let server = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let service = Arc::new(Service::start(&server, open_store(dir.path())).await);
    service.apply(image_object("web", WEB)).await.unwrap();
    let written = service.apply(image_object("db", DB)).await.unwrap();
    service.at(written.revision).await;

    // Both read the same revision; the second write is refused, not lost.
    let base = service.snapshot().await.revision;
    let first = service
        .apply_at(base, rule("first", "web", vec![], false, RuleEffect::Alert))
        .await
        .unwrap();
    assert!(first.revision > base);
    let stale = service
        .apply_at(base, rule("second", "web", vec![], false, RuleEffect::Alert))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::Aborted, "{}", stale.message());
    assert!(stale.message().contains("stale"), "{}", stale.message());

    // Two writers racing, 25 rules each, retrying on conflict.
    let mut writers = Vec::new();
    for writer in ["a", "b"] {
        let service = Arc::clone(&service);
        writers.push(tokio::spawn(async move {
            let mut conflicts = 0u32;
            for n in 0..25 {
                loop {
                    let revision = service.snapshot().await.revision;
                    let change = rule(
                        &format!("{writer}-{n}"),
                        "web",
                        vec![destination("db", 1000 + n, 0, RuleEffect::Unspecified)],
                        false,
                        RuleEffect::Alert,
                    );
                    match service.apply_at(revision, change).await {
                        Ok(_) => break,
                        Err(status) if status.code() == tonic::Code::Aborted => conflicts += 1,
                        Err(status) => panic!("{status}"),
                    }
                }
            }
            conflicts
        }));
    }
    let mut conflicts = 0;
    for writer in writers {
        conflicts += writer.await.unwrap();
    }
    let last = service.snapshot().await.revision;
    service.at(last).await;
    let policy = service.snapshot().await;
    let ids: Vec<&str> = policy.rules.iter().map(|rule| rule.id.as_str()).collect();
    for writer in ["a", "b"] {
        for n in 0..25 {
            let id = format!("{writer}-{n}");
            assert!(
                ids.contains(&id.as_str()),
                "{id} was lost ({conflicts} conflicts retried)"
            );
        }
    }
    assert!(ids.contains(&"first") && !ids.contains(&"second"));
    assert_eq!(policy.rules.len(), 51);
    Arc::try_unwrap(service).ok().unwrap().stop().await;
}

fn sample_policy_changes() -> Vec<policy_event::Change> {
    vec![
        image_object("web", WEB),
        image_object("db", DB),
        subnet_object("dbnet", "10.2.0.0/16"),
        policy_event::Change::ObjectPut(policy_event::ObjectPut {
            object: Some(NetworkObject {
                name: "sshd".into(),
                kind: ObjectKind::HostApp as i32,
                host_app: "sshd.service".into(),
                description: "the SSH daemon".into(),
                ..Default::default()
            }),
        }),
        rule(
            "r-web",
            "web",
            vec![
                destination("db", 5432, 0, RuleEffect::Unspecified),
                destination("dbnet", 1, 1024, RuleEffect::Alert),
            ],
            true,
            RuleEffect::Prevent,
        ),
        policy_event::Change::RulePut(policy_event::RulePut {
            rule: Some(Rule {
                id: "h-ssh".into(),
                source: "sshd".into(),
                destinations: vec![destination("dbnet", 22, 0, RuleEffect::Unspecified)],
                effect: RuleEffect::Alert as i32,
                host: true,
                disabled: true,
                description: "ssh to the db net".into(),
                ..Default::default()
            }),
        }),
        mode(Mode::Alert),
    ]
}

/// Export → import into a second, fresh system → export: the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_import_export_is_byte_identical() {
    let server = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let first = Service::start(&server, open_store(dir.path())).await;
    let js = jetstream_of(&server).await;
    start_workload(&js, "n1", "web", WEB, "10.1.0.5").await;
    start_workload(&js, "n1", "db", DB, "10.2.0.7").await;
    enforcing_model(&js, WEB, vec![learned(Side::Outbound, DB, 5432)]).await;
    enforcing_model(&js, DB, vec![learned(Side::Inbound, WEB, 5432)]).await;
    for change in sample_policy_changes() {
        first.apply(change).await.unwrap();
    }
    let exported = eventually("the learned connections in the export", || async {
        let document = first.export("", "json").await;
        let text = String::from_utf8(document.clone()).unwrap();
        (text.contains("\"learned\"") && text.matches("\"port\": 5432").count() == 2).then_some(document)
    })
    .await;
    let text = String::from_utf8(exported.clone()).unwrap();
    assert!(
        text.starts_with("{\n  \"schema\": \"cnnf.policy/v1\",\n  \"kind\": \"policy\""),
        "{text}"
    );
    assert!(text.contains("\"enabled\": false"), "{text}");

    // A second, fresh system: its own NATS server and store.
    let server2 = NatsServer::start().await;
    let dir2 = tempfile::tempdir().unwrap();
    let second = Service::start(&server2, open_store(dir2.path())).await;
    let imported = second.import(&exported).await.unwrap();
    second.at(imported.revision).await;
    let again = second.export("", "json").await;
    assert_eq!(String::from_utf8(again).unwrap(), text);

    // A single rule travels the same way.
    let one = first.export("r-web", "json").await;
    second
        .apply(policy_event::Change::RuleDeleted(policy_event::RuleDeleted {
            id: "r-web".into(),
        }))
        .await
        .unwrap();
    let result = second.import(&one).await.unwrap();
    second.at(result.revision).await;
    assert_eq!(second.export("r-web", "json").await, one);
    assert_eq!(second.export("", "json").await, exported);

    // The learned policy as Kubernetes NetworkPolicy.
    let yaml = String::from_utf8(first.export("", "kubernetes").await).unwrap();
    assert_eq!(yaml.matches("kind: NetworkPolicy").count(), 2, "{yaml}");
    assert!(yaml.contains("\"app\": \"web\""), "{yaml}");
    assert!(yaml.contains("namespace: \"shop\""), "{yaml}");
    assert!(yaml.contains("port: 5432"), "{yaml}");
    first.stop().await;
    second.stop().await;
}

/// Invalid imports leave the policy exactly as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_imports_change_nothing() {
    let server = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let service = Service::start(&server, open_store(dir.path())).await;
    for change in sample_policy_changes() {
        service.apply(change).await.unwrap();
    }
    let before = service.export("", "json").await;
    let revision = service.snapshot().await.revision;
    let good = String::from_utf8(before.clone()).unwrap();

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "bad CIDR",
            good.replace("10.2.0.0/16", "10.2.0.0/33"),
            "$.objects[1].cidrs[0]: \"10.2.0.0/33\" is not a CIDR or an address",
        ),
        (
            "unknown object",
            good.replace("\"object\": \"db\"", "\"object\": \"nowhere\""),
            "$.rules[1].destinations[0].object: no object named \"nowhere\"",
        ),
        (
            "wrong type",
            good.replace("\"allow_learned\": true", "\"allow_learned\": \"yes\""),
            "$.rules[1].allow_learned: invalid type: string \"yes\", expected a boolean",
        ),
        ("truncated", good[..good.len() / 2].to_owned(), "EOF while parsing"),
        (
            "duplicate name",
            good.replace("\"name\": \"web\"", "\"name\": \"db\""),
            "$.objects[3].name: \"db\" is declared twice (first at objects[0])",
        ),
        (
            "port out of range",
            good.replace("\"first\": 5432", "\"first\": 70000"),
            "$.rules[1].destinations[0].ports[0].first: 70000 is not a port",
        ),
        (
            "wrong schema",
            good.replace("cnnf.policy/v1", "cnnf.policy/v9"),
            "$.schema",
        ),
    ];
    for (what, document, expected) in cases {
        let error = service.import(document.as_bytes()).await.unwrap_err();
        assert_eq!(
            error.code(),
            tonic::Code::InvalidArgument,
            "{what}: {}",
            error.message()
        );
        assert!(error.message().contains(expected), "{what}: {}", error.message());
        assert_eq!(service.snapshot().await.revision, revision, "{what}");
        assert_eq!(service.export("", "json").await, before, "{what}");
    }
    // Several problems at once are all reported.
    let many = good
        .replace("10.2.0.0/16", "not-a-net")
        .replace("\"first\": 5432", "\"first\": 0")
        .replace("\"source\": \"web\"", "\"source\": \"ghost\"");
    let error = service.import(many.as_bytes()).await.unwrap_err();
    assert_eq!(error.message().lines().count(), 3, "{}", error.message());
    assert_eq!(service.export("", "json").await, before);
    service.stop().await;
}
