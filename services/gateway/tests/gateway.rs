//! The gateway against a real nats-server and in-process gRPC backends.
//!
//! The backends here are small tonic servers of `cnnf.v1.Models`, `Policy`
//! and `Audits` written in this test: they answer from fixed data and
//! record every call they receive. The subject under test is the gateway's
//! authentication, authorization, proxying and Radar assembly, not the
//! services (which have their own tests); the gateway crate must not depend
//! on service crates, and recording fakes let each test prove that a
//! refused call never reached a backend.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cnnf_proto::v1 as pb;
use cnnf_proto::v1::audits_client::AuditsClient;
use cnnf_proto::v1::models_client::ModelsClient;
use cnnf_proto::v1::policy_client::PolicyClient;
use cnnf_service::grpc::{GrpcAddr, ServerTls};
use cnnf_service::{CommonConfig, Health};
use cnnf_testkit::NatsServer;
use futures::Stream;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::{Code, Request, Response, Status};

const VIEWER: &str = "viewer-token-1";
const OPERATOR: &str = "operator-token-2";
const ADMIN: &str = "admin-token-3";
const CLIENT_CN: &str = "ops-workstation";

/// Recording fake of the Models, Policy and Audits services.
#[derive(Clone, Default)]
struct Fake {
    calls: Arc<Mutex<Vec<String>>>,
    models: Arc<Mutex<Vec<pb::ModelSummary>>>,
    learned: Arc<Mutex<HashMap<String, Vec<pb::LearnedConnection>>>>,
    policy: Arc<Mutex<pb::PolicySnapshot>>,
    audits: Arc<Mutex<Vec<pb::Audit>>>,
    actors: Arc<Mutex<Vec<String>>>,
}

impl Fake {
    fn record<T>(&self, name: &str, request: &Request<T>) {
        self.calls.lock().unwrap().push(name.to_owned());
        if let Some(actor) = request.metadata().get("x-cnnf-actor") {
            self.actors
                .lock()
                .unwrap()
                .push(actor.to_str().unwrap_or("?").to_owned());
        }
        assert!(
            request.metadata().get("authorization").is_none(),
            "the gateway must not forward the caller's token"
        );
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl pb::models_server::Models for Fake {
    async fn list_models(&self, r: Request<pb::ListModelsRequest>) -> Result<Response<pb::ListModelsResponse>, Status> {
        self.record("ListModels", &r);
        Ok(Response::new(pb::ListModelsResponse {
            models: self.models.lock().unwrap().clone(),
            next_page_token: String::new(),
        }))
    }
    async fn get_model(&self, r: Request<pb::GetModelRequest>) -> Result<Response<pb::ModelSummary>, Status> {
        self.record("GetModel", &r);
        let id = r.into_inner().image_id;
        let models = self.models.lock().unwrap();
        models
            .iter()
            .find(|m| m.image_id == id)
            .cloned()
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no model {id}")))
    }
    async fn list_learned_connections(
        &self,
        r: Request<pb::ListLearnedConnectionsRequest>,
    ) -> Result<Response<pb::ListLearnedConnectionsResponse>, Status> {
        self.record("ListLearnedConnections", &r);
        let id = r.into_inner().image_id;
        Ok(Response::new(pb::ListLearnedConnectionsResponse {
            connections: self.learned.lock().unwrap().get(&id).cloned().unwrap_or_default(),
            next_page_token: String::new(),
        }))
    }
    async fn command(&self, r: Request<pb::ModelCommand>) -> Result<Response<pb::ModelEvent>, Status> {
        self.record("Command", &r);
        let command = r.into_inner();
        Ok(Response::new(pb::ModelEvent {
            image_id: command.image_id,
            revision: 42,
            actor: command.actor,
            change: None,
        }))
    }
}

#[tonic::async_trait]
impl pb::policy_server::Policy for Fake {
    async fn apply(&self, r: Request<pb::PolicyCommand>) -> Result<Response<pb::PolicyCommandResult>, Status> {
        self.record("Apply", &r);
        Ok(Response::new(pb::PolicyCommandResult {
            revision: r.into_inner().expected_revision + 1,
            conflicts: vec![],
        }))
    }
    async fn export(&self, r: Request<pb::ExportRequest>) -> Result<Response<pb::ExportResponse>, Status> {
        self.record("Export", &r);
        Ok(Response::new(pb::ExportResponse {
            document: b"{}".to_vec(),
            revision: 1,
        }))
    }
    async fn import(&self, r: Request<pb::ImportRequest>) -> Result<Response<pb::PolicyCommandResult>, Status> {
        self.record("Import", &r);
        Ok(Response::new(pb::PolicyCommandResult {
            revision: 9,
            conflicts: vec![],
        }))
    }
    async fn get_policy(&self, r: Request<pb::GetPolicyRequest>) -> Result<Response<pb::PolicySnapshot>, Status> {
        self.record("GetPolicy", &r);
        Ok(Response::new(self.policy.lock().unwrap().clone()))
    }
}

type AuditStream = Pin<Box<dyn Stream<Item = Result<pb::Audit, Status>> + Send>>;

#[tonic::async_trait]
impl pb::audits_server::Audits for Fake {
    async fn list_audits(&self, r: Request<pb::ListAuditsRequest>) -> Result<Response<pb::ListAuditsResponse>, Status> {
        self.record("ListAudits", &r);
        Ok(Response::new(pb::ListAuditsResponse {
            audits: self.audits.lock().unwrap().clone(),
            next_page_token: String::new(),
        }))
    }
    type TailStream = AuditStream;
    async fn tail(&self, r: Request<pb::TailRequest>) -> Result<Response<AuditStream>, Status> {
        self.record("Tail", &r);
        let audits: Vec<Result<pb::Audit, Status>> = (0..3)
            .map(|i| {
                Ok(pb::Audit {
                    audit_id: format!("a{i}"),
                    count: i + 1,
                    ..Default::default()
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(audits))))
    }
    async fn replay(&self, r: Request<pb::ReplayRequest>) -> Result<Response<pb::ReplayResponse>, Status> {
        self.record("Replay", &r);
        Ok(Response::new(pb::ReplayResponse::default()))
    }
    async fn who_held(&self, r: Request<pb::WhoHeldRequest>) -> Result<Response<pb::WhoHeldResponse>, Status> {
        self.record("WhoHeld", &r);
        Ok(Response::new(pb::WhoHeldResponse::default()))
    }
    async fn state_at(&self, r: Request<pb::StateAtRequest>) -> Result<Response<pb::StateAtResponse>, Status> {
        self.record("StateAt", &r);
        Ok(Response::new(pb::StateAtResponse::default()))
    }
    async fn simulate(&self, r: Request<pb::SimulateRequest>) -> Result<Response<pb::SimulateResponse>, Status> {
        self.record("Simulate", &r);
        Ok(Response::new(pb::SimulateResponse::default()))
    }
}

/// Serves the fake on `addr` the way the services serve their API
/// (`cnnf_service::grpc::Listener`); returns the address bound.
async fn serve_fake(fake: Fake, addr: &GrpcAddr, tls: &ServerTls) -> GrpcAddr {
    let listener = cnnf_service::grpc::Listener::bind(addr, tls).await.unwrap();
    let bound = listener.addr().clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::models_server::ModelsServer::new(fake.clone()))
            .add_service(pb::policy_server::PolicyServer::new(fake.clone()))
            .add_service(pb::audits_server::AuditsServer::new(fake))
            .serve_with_incoming(listener.incoming()),
    );
    bound
}

/// The fake on a Unix socket in `dir`; its `unix:` address.
async fn start_fake(fake: Fake, dir: &Path) -> String {
    let addr = GrpcAddr::Unix(dir.join("fake.sock"));
    serve_fake(fake, &addr, &ServerTls::default()).await.to_string()
}

fn tokens_json() -> String {
    let hash = cnnf_gateway::auth::token_hash;
    serde_json::json!({
        "tokens": {
            hash(VIEWER): {"name": "vera", "role": "viewer"},
            hash(OPERATOR): {"name": "otto", "role": "operator"},
            hash(ADMIN): {"name": "ada", "role": "admin"},
        },
        "client_certs": { CLIENT_CN: {"name": "workstation", "role": "operator"} }
    })
    .to_string()
}

struct Harness {
    nats: NatsServer,
    fake: Fake,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

struct Tls {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    ca: std::path::PathBuf,
}

async fn start_gateway(fake: Fake, audit_down: bool, tls: Option<&dyn Fn(&Path) -> Tls>) -> Harness {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let backend = start_fake(fake.clone(), dir.path()).await;
    let tokens = dir.path().join("tokens.json");
    std::fs::write(&tokens, tokens_json()).unwrap();
    let mut common = <CommonOnly as clap::Parser>::parse_from(["gateway-test"]).common;
    common.nats_url = nats.url();
    let mut config = cnnf_gateway::Config::new(common);
    config.gateway.tokens_file = Some(tokens);
    config.upstreams.modeler_addr = backend.clone();
    config.upstreams.policy_addr = backend.clone();
    config.upstreams.audit_addr = if audit_down {
        // A socket nothing listens on.
        format!("unix:{}", dir.path().join("nothing.sock").display())
    } else {
        backend.clone()
    };
    config.upstreams.ingest_addr = backend;
    if let Some(make) = tls {
        let files = make(dir.path());
        config.gateway.tls_cert = Some(files.cert);
        config.gateway.tls_key = Some(files.key);
        config.gateway.tls_client_ca = Some(files.ca);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let health = Health::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(cnnf_gateway::run_on(listener, config, health.clone(), async move {
        let _ = stopped.await;
    }));
    // Ready once the Radar subscription is in place.
    for _ in 0..500 {
        if health.not_ready().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        health.not_ready().is_empty(),
        "gateway not ready: {:?}",
        health.not_ready()
    );
    Harness {
        nats,
        fake,
        addr,
        _dir: dir,
        _stop: stop,
    }
}

/// Only to build a `CommonConfig` with its defaults.
#[derive(clap::Parser)]
struct CommonOnly {
    #[command(flatten)]
    common: CommonConfig,
}

impl Harness {
    async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// An HTTP/1.1 call; returns the status and the JSON body.
    async fn http(&self, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, serde_json::Value) {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header("content-type", "application/json");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = client
            .request(request.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, json)
    }
}

fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn rule_put() -> pb::PolicyCommand {
    pb::PolicyCommand {
        expected_revision: 3,
        change: Some(pb::PolicyEvent {
            change: Some(pb::policy_event::Change::RulePut(pb::policy_event::RulePut {
                rule: Some(pb::Rule {
                    id: "r1".into(),
                    source: "web".into(),
                    ..Default::default()
                }),
            })),
            ..Default::default()
        }),
    }
}

fn mode_set() -> pb::PolicyCommand {
    pb::PolicyCommand {
        expected_revision: 3,
        change: Some(pb::PolicyEvent {
            change: Some(pb::policy_event::Change::ModeSet(pb::policy_event::ModeSet {
                mode: pb::Mode::Prevent as i32,
                host: false,
            })),
            ..Default::default()
        }),
    }
}

fn delete_connection() -> pb::ModelCommand {
    pb::ModelCommand {
        image_id: "sha256:web".into(),
        actor: String::new(),
        command: Some(pb::model_command::Command::LockNow(true)),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_viewer_reads_everything_and_changes_nothing() {
    let fake = Fake::default();
    fake.models.lock().unwrap().push(pb::ModelSummary {
        image_id: "sha256:web".into(),
        image_name: "web:1".into(),
        ..Default::default()
    });
    let h = start_gateway(fake, false, None).await;
    let channel = h.channel().await;
    let mut models = ModelsClient::new(channel.clone());
    let mut policy = PolicyClient::new(channel.clone());

    // Reads through gRPC and JSON.
    let listed = models
        .list_models(authed(pb::ListModelsRequest::default(), VIEWER))
        .await
        .unwrap();
    assert_eq!(listed.into_inner().models[0].image_name, "web:1");
    let (status, body) = h.http("POST", "/api/v1/Models/ListModels", Some(VIEWER), "{}").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["models"][0]["imageName"], "web:1");
    let (status, body) = h
        .http(
            "POST",
            "/api/v1/Models/GetModel",
            Some(VIEWER),
            r#"{"image_id":"sha256:web"}"#,
        )
        .await;
    assert_eq!((status, body["imageId"].as_str()), (200, Some("sha256:web")));
    let (status, _) = h.http("POST", "/api/v1/Policy/Export", Some(VIEWER), "").await;
    assert_eq!(status, 200);
    let (status, _) = h.http("GET", "/api/v1/radar", Some(VIEWER), "").await;
    assert_eq!(status, 200);
    let before = h.fake.calls();

    // Every write is refused, through gRPC ...
    let refused = models.command(authed(delete_connection(), VIEWER)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("operator"), "{}", refused.message());
    let refused = policy.apply(authed(rule_put(), VIEWER)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let refused = policy.apply(authed(mode_set(), VIEWER)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let refused = policy
        .import(authed(pb::ImportRequest::default(), VIEWER))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("admin"), "{}", refused.message());

    // ... and through the JSON API.
    for (path, body) in [
        ("/api/v1/Models/Command", r#"{"imageId":"sha256:web","lockNow":true}"#),
        (
            "/api/v1/Policy/Apply",
            r#"{"expectedRevision":"3","change":{"rulePut":{"rule":{"id":"r1"}}}}"#,
        ),
        ("/api/v1/Policy/Import", r#"{"document":""}"#),
    ] {
        let (status, json) = h.http("POST", path, Some(VIEWER), body).await;
        assert_eq!(status, 403, "{path}: {json}");
        assert_eq!(json["error"]["code"], "permission_denied", "{path}: {json}");
    }
    let (status, json) = h
        .http(
            "DELETE",
            "/api/v1/models/sha256:web/learned",
            Some(VIEWER),
            r#"{"side":"SIDE_INBOUND","peer":{"kind":"IDENTITY_KIND_IMAGE","id":"sha256:db"},"port":5432,"protocol":"PROTOCOL_TCP"}"#,
        )
        .await;
    assert_eq!(status, 403, "{json}");

    // The backends never saw any of it.
    assert_eq!(h.fake.calls(), before);
    assert!(h.fake.actors.lock().unwrap().iter().all(|a| a == "vera"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_commands_models_but_cannot_import_or_change_modes() {
    let h = start_gateway(Fake::default(), false, None).await;
    let channel = h.channel().await;
    let mut models = ModelsClient::new(channel.clone());
    let mut policy = PolicyClient::new(channel.clone());

    let event = models.command(authed(delete_connection(), OPERATOR)).await.unwrap();
    assert_eq!(event.into_inner().revision, 42);
    let (status, json) = h
        .http(
            "POST",
            "/api/v1/Models/Command",
            Some(OPERATOR),
            r#"{"imageId":"sha256:web","lockNow":true}"#,
        )
        .await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["actor"], "otto", "the JSON API fills the actor from the token");
    let (status, json) = h
        .http(
            "DELETE",
            "/api/v1/models/sha256:web/learned",
            Some(OPERATOR),
            r#"{"side":"SIDE_INBOUND","peer":{"kind":"IDENTITY_KIND_IMAGE","id":"sha256:db"},"port":5432,"protocol":"PROTOCOL_TCP"}"#,
        )
        .await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["imageId"], "sha256:web");
    let result = policy.apply(authed(rule_put(), OPERATOR)).await.unwrap();
    assert_eq!(result.into_inner().revision, 4);
    assert_eq!(h.fake.calls(), ["Command", "Command", "Command", "Apply"]);

    let refused = policy.apply(authed(mode_set(), OPERATOR)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("admin"), "{}", refused.message());
    let refused = policy
        .import(authed(pb::ImportRequest::default(), OPERATOR))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let (status, _) = h.http("POST", "/api/v1/Policy/Import", Some(OPERATOR), "{}").await;
    assert_eq!(status, 403);
    let (status, _) = h
        .http(
            "POST",
            "/api/v1/Policy/Apply",
            Some(OPERATOR),
            r#"{"change":{"modeSet":{"mode":"MODE_PREVENT"}}}"#,
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(
        h.fake.calls(),
        ["Command", "Command", "Command", "Apply"],
        "refused calls reached no backend"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_imports_and_changes_modes() {
    let h = start_gateway(Fake::default(), false, None).await;
    let mut policy = PolicyClient::new(h.channel().await);
    let result = policy
        .import(authed(
            pb::ImportRequest {
                expected_revision: 8,
                document: b"{}".to_vec(),
                actor: "ada".into(),
            },
            ADMIN,
        ))
        .await
        .unwrap();
    assert_eq!(result.into_inner().revision, 9);
    policy.apply(authed(mode_set(), ADMIN)).await.unwrap();
    let (status, json) = h
        .http(
            "POST",
            "/api/v1/Policy/Apply",
            Some(ADMIN),
            r#"{"expectedRevision":"3","change":{"modeSet":{"mode":"MODE_PREVENT"}}}"#,
        )
        .await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["revision"], "4");
    let (status, _) = h
        .http("POST", "/api/v1/Policy/Import", Some(ADMIN), r#"{"document":"e30="}"#)
        .await;
    assert_eq!(status, 200);
    assert_eq!(h.fake.calls(), ["Import", "Apply", "Apply", "Import"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_or_bad_credentials_are_refused_before_any_backend() {
    let h = start_gateway(Fake::default(), false, None).await;
    let mut models = ModelsClient::new(h.channel().await);
    let refused = models.list_models(pb::ListModelsRequest::default()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let refused = models
        .list_models(authed(pb::ListModelsRequest::default(), "not-a-token"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let refused = models
        .command(authed(delete_connection(), "not-a-token"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    for token in [None, Some("not-a-token")] {
        for (method, path) in [
            ("POST", "/api/v1/Models/ListModels"),
            ("POST", "/api/v1/Models/Command"),
            ("GET", "/api/v1/radar"),
            ("GET", "/api/v1/radar/stream"),
        ] {
            let (status, json) = h.http(method, path, token, "{}").await;
            assert_eq!(status, 401, "{method} {path} with {token:?}: {json}");
            assert_eq!(json["error"]["code"], "unauthenticated");
        }
    }
    assert!(h.fake.calls().is_empty(), "{:?}", h.fake.calls());
    // The page is public, and says it is not installed yet.
    let (status, body) = h.http("GET", "/", None, "").await;
    assert_eq!(status, 200);
    assert!(body.as_str().unwrap().contains("not installed"));
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_tail_streams_through() {
    let h = start_gateway(Fake::default(), false, None).await;
    let mut audits = AuditsClient::new(h.channel().await);
    let mut stream = audits
        .tail(authed(pb::TailRequest::default(), VIEWER))
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    while let Some(audit) = stream.message().await.unwrap() {
        ids.push(audit.audit_id);
    }
    assert_eq!(ids, ["a0", "a1", "a2"]);
    assert_eq!(h.fake.calls(), ["Tail"]);
}

fn image(id: &str, cluster: &str) -> pb::Identity {
    pb::Identity {
        kind: pb::IdentityKind::Image as i32,
        id: id.into(),
        name: format!("{id}:1"),
        cluster: cluster.into(),
        ..Default::default()
    }
}

fn radar_fake() -> Fake {
    let fake = Fake::default();
    fake.models.lock().unwrap().extend([
        pb::ModelSummary {
            image_id: "web".into(),
            image_name: "web:1".into(),
            state: pb::ModelState::Learning as i32,
            container_count: 3,
            ..Default::default()
        },
        pb::ModelSummary {
            image_id: "db".into(),
            image_name: "db:1".into(),
            state: pb::ModelState::Enforcing as i32,
            container_count: 1,
            ..Default::default()
        },
    ]);
    fake.learned.lock().unwrap().insert(
        "db".into(),
        vec![pb::LearnedConnection {
            side: pb::Side::Inbound as i32,
            peer: Some(image("web", "prod")),
            port: 5432,
            protocol: pb::Protocol::Tcp as i32,
            first_seen_unix_nanos: 1_000_000_000,
            last_seen_unix_nanos: 5_000_000_000,
            count: 17,
        }],
    );
    fake.learned.lock().unwrap().insert(
        "web".into(),
        vec![pb::LearnedConnection {
            side: pb::Side::Outbound as i32,
            peer: Some(pb::Identity {
                kind: pb::IdentityKind::NetworkObject as i32,
                id: "dns".into(),
                name: "dns".into(),
                ..Default::default()
            }),
            port: 53,
            protocol: pb::Protocol::Udp as i32,
            count: 4,
            ..Default::default()
        }],
    );
    *fake.policy.lock().unwrap() = pb::PolicySnapshot {
        revision: 5,
        objects: vec![
            pb::NetworkObject {
                name: "web".into(),
                kind: pb::network_object::Kind::Image as i32,
                image_id: "web".into(),
                image_name: "web:1".into(),
                ..Default::default()
            },
            pb::NetworkObject {
                name: "internet".into(),
                kind: pb::network_object::Kind::Subnet as i32,
                cidrs: vec!["0.0.0.0/0".into()],
                ..Default::default()
            },
        ],
        rules: vec![pb::Rule {
            id: "r-web-out".into(),
            source: "web".into(),
            destinations: vec![pb::RuleDestination {
                object: "internet".into(),
                ports: vec![pb::PortRange { first: 443, last: 0 }],
                protocol: pb::Protocol::Tcp as i32,
                effect: pb::RuleEffect::Alert as i32,
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    fake.audits.lock().unwrap().push(pb::Audit {
        audit_id: "x".into(),
        first_seen_unix_nanos: 6_000_000_000,
        last_seen_unix_nanos: 7_000_000_000,
        count: 2,
        source: Some(pb::Endpoint {
            identity: Some(image("web", "prod")),
            ..Default::default()
        }),
        destination: Some(pb::Endpoint {
            port: 6379,
            identity: Some(image("db", "prod")),
            ..Default::default()
        }),
        protocol: pb::Protocol::Tcp as i32,
        verdict: pb::Verdict::Prevent as i32,
        decided_by: "model:db".into(),
        ..Default::default()
    });
    fake
}

#[tokio::test(flavor = "multi_thread")]
async fn radar_json_has_the_right_nodes_edges_and_colours() {
    let h = start_gateway(radar_fake(), false, None).await;
    let (status, graph) = h.http("GET", "/api/v1/radar", Some(VIEWER), "").await;
    assert_eq!(status, 200, "{graph}");
    let graph: cnnf_gateway::radar::Graph = serde_json::from_value(graph).unwrap();
    assert!(graph.warnings.is_empty(), "{:?}", graph.warnings);
    let node = |id: &str| {
        graph
            .nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    };
    let web = node("image:web");
    assert_eq!(
        (web.kind.as_str(), web.containers, web.state.as_str()),
        ("image", 3, "learning")
    );
    assert_eq!(web.cluster, "prod");
    let db = node("image:db");
    assert_eq!((db.containers, db.state.as_str()), (1, "enforcing"));
    assert_eq!(node("object:internet").kind, "object");
    assert_eq!(node("object:dns").kind, "object");
    assert_eq!(graph.nodes.len(), 4, "{:?}", graph.nodes);

    let edge = |id: &str| {
        graph
            .edges
            .iter()
            .find(|e| e.id == id)
            .unwrap_or_else(|| panic!("no edge {id}"))
    };
    // Learned into an enforcing model: solid, green; an audit adds a blocked port.
    let web_db = edge("learned:image:web->image:db");
    assert_eq!(web_db.kind, "learned");
    assert_eq!(web_db.decided_by, "model:db");
    let status_of = |e: &cnnf_gateway::radar::Edge, port: u32| {
        e.ports
            .iter()
            .find(|p| p.port == port)
            .map(|p| p.status.clone())
            .unwrap()
    };
    assert_eq!(status_of(web_db, 5432), "allowed");
    assert_eq!(status_of(web_db, 6379), "blocked");
    assert_eq!(web_db.recent.len(), 1);
    assert_eq!(web_db.recent[0].verdict, "prevent");
    assert_eq!((web_db.first_seen, web_db.last_seen), (1000, 7000));
    assert_eq!(web_db.learned_by.as_ref().unwrap().image_id, "db");
    // Learned by a learning model: gray.
    let web_dns = edge("learned:image:web->object:dns");
    assert_eq!(status_of(web_dns, 53), "observed");
    // The rule: dotted, alerting port yellow, from the image the object names.
    let rule = edge("rule:r-web-out:internet");
    assert_eq!((rule.kind.as_str(), rule.source.as_str()), ("rule", "image:web"));
    assert_eq!(status_of(rule, 443), "alerted");
    assert_eq!(rule.decided_by, "rule:r-web-out");

    // Filters.
    let (_, only_db) = h.http("GET", "/api/v1/radar?search=DB", Some(VIEWER), "").await;
    let only_db: cnnf_gateway::radar::Graph = serde_json::from_value(only_db).unwrap();
    let ids: Vec<&str> = only_db.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids, ["image:db", "image:web"]);
    let (_, prod) = h.http("GET", "/api/v1/radar?cluster=prod", Some(VIEWER), "").await;
    assert_eq!(prod["nodes"].as_array().unwrap().len(), 2);
    let (status, _) = h.http("GET", "/api/v1/radar?view=sideways", Some(VIEWER), "").await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn radar_with_a_service_down_is_partial_and_says_so() {
    let h = start_gateway(radar_fake(), true, None).await;
    let (status, graph) = h.http("GET", "/api/v1/radar", Some(VIEWER), "").await;
    assert_eq!(status, 200, "{graph}");
    let graph: cnnf_gateway::radar::Graph = serde_json::from_value(graph).unwrap();
    assert_eq!(graph.warnings.len(), 1, "{:?}", graph.warnings);
    assert!(
        graph.warnings[0].starts_with("audits unavailable"),
        "{:?}",
        graph.warnings
    );
    assert!(graph.edges.iter().any(|e| e.id == "learned:image:web->image:db"));
    assert!(graph
        .edges
        .iter()
        .all(|e| e.ports.iter().all(|p| p.status != "blocked")));
}

/// Reads SSE events from a streaming body until one `graph` event is complete.
async fn next_graph(body: &mut hyper::body::Incoming, buffer: &mut String) -> cnnf_gateway::radar::Graph {
    loop {
        if let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if event.lines().any(|l| l == "event: graph") {
                let data: String = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                    .collect();
                return serde_json::from_str(&data).unwrap();
            }
            continue;
        }
        let frame = tokio::time::timeout(Duration::from_secs(30), body.frame())
            .await
            .expect("no SSE event within 30 s")
            .expect("stream ended")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            buffer.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stream_pushes_a_new_graph_after_a_model_change_on_nats() {
    let h = start_gateway(radar_fake(), false, None).await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(
            hyper::Request::get(format!("http://{}/api/v1/radar/stream", h.addr))
                .header("authorization", format!("Bearer {VIEWER}"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let mut buffer = String::new();
    let first = next_graph(&mut body, &mut buffer).await;
    assert!(first.nodes.iter().all(|n| n.id != "image:cache"));

    h.fake.models.lock().unwrap().push(pb::ModelSummary {
        image_id: "cache".into(),
        image_name: "cache:7".into(),
        state: pb::ModelState::Learning as i32,
        container_count: 2,
        ..Default::default()
    });
    let nats = async_nats::connect(h.nats.url()).await.unwrap();
    nats.publish("cnnf.model.cache", Bytes::from_static(b"changed"))
        .await
        .unwrap();
    nats.flush().await.unwrap();
    let second = next_graph(&mut body, &mut buffer).await;
    let cache = second
        .nodes
        .iter()
        .find(|n| n.id == "image:cache")
        .expect("new model in the pushed graph");
    assert_eq!((cache.containers, cache.state.as_str()), (2, "learning"));
}

/// A certificate and its key, PEM.
type PemPair = (String, String);

/// The client side of the test PKI.
struct Pki {
    known: PemPair,
    stranger: PemPair,
    ca: String,
}

fn write_pki(dir: &Path, client_cn: &str) -> (Tls, PemPair, PemPair) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "cnnf test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_params(&ca_params, &ca_key);

    let server_key = KeyPair::generate().unwrap();
    let mut server_params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();

    let client = |cn: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let files = Tls {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        ca: dir.join("ca.pem"),
    };
    std::fs::write(&files.cert, server_cert.pem()).unwrap();
    std::fs::write(&files.key, server_key.serialize_pem()).unwrap();
    std::fs::write(&files.ca, ca_cert.pem()).unwrap();
    std::fs::write(dir.join("ca-for-client.pem"), ca_cert.pem()).unwrap();
    (files, client(client_cn), client("stranger"))
}

/// One HTTP/1.1 request over TLS, with an optional client certificate.
async fn tls_call(
    addr: SocketAddr,
    ca_pem: &str,
    client: Option<&PemPair>,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = sender
        .send_request(
            hyper::Request::post(path)
                .header("host", "localhost")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_owned())))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_maps_to_its_role() {
    let pki: Arc<Mutex<Option<Pki>>> = Arc::default();
    let sink = Arc::clone(&pki);
    let make = move |dir: &Path| {
        let (files, known, stranger) = write_pki(dir, CLIENT_CN);
        let ca = std::fs::read_to_string(&files.ca).unwrap();
        *sink.lock().unwrap() = Some(Pki { known, stranger, ca });
        files
    };
    let h = start_gateway(Fake::default(), false, Some(&make)).await;
    let Pki { known, stranger, ca } = pki.lock().unwrap().take().unwrap();

    // The certificate's CN is an operator: model commands pass, imports do not.
    let (status, json) = tls_call(
        h.addr,
        &ca,
        Some(&known),
        "/api/v1/Models/Command",
        r#"{"imageId":"web","lockNow":true}"#,
    )
    .await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["actor"], "workstation");
    let (status, json) = tls_call(h.addr, &ca, Some(&known), "/api/v1/Policy/Import", "{}").await;
    assert_eq!(status, 403, "{json}");
    // A certificate of the same CA whose CN is not listed, and no certificate at all.
    let (status, json) = tls_call(h.addr, &ca, Some(&stranger), "/api/v1/Models/ListModels", "{}").await;
    assert_eq!(status, 401, "{json}");
    assert!(json["error"]["message"].as_str().unwrap().contains("stranger"));
    let (status, _) = tls_call(h.addr, &ca, None, "/api/v1/Models/ListModels", "{}").await;
    assert_eq!(status, 401);
    assert_eq!(h.fake.calls(), ["Command"]);
}

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_cnnf-gateway");

fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `cnnf-gateway` binary with these flags (and no `CNNF_*` variables
/// of the test's environment).
fn gateway_command(args: &[String]) -> std::process::Command {
    let mut command = std::process::Command::new(GATEWAY_BIN);
    for (key, _) in std::env::vars() {
        if key.starts_with("CNNF_") {
            command.env_remove(key);
        }
    }
    command.args(args);
    command
}

/// Starts the gateway with `args` and waits for its `/ready` on `http_addr`.
async fn start_ready(args: &[String], http_addr: &str) -> std::process::Child {
    let mut child = gateway_command(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ready = cnnf_testkit::eventually("the gateway to be ready", Duration::from_secs(30), || {
        let exited = child.try_wait().unwrap();
        let http_addr = http_addr.to_owned();
        async move {
            assert!(exited.is_none(), "the gateway exited: {exited:?}");
            let mut stream = tokio::net::TcpStream::connect(&http_addr).await.ok()?;
            let request = format!("GET /ready HTTP/1.1\r\nHost: {http_addr}\r\nConnection: close\r\n\r\n");
            tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
                .await
                .ok()?;
            let mut response = String::new();
            tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut response)
                .await
                .ok()?;
            response.starts_with("HTTP/1.1 200").then_some(())
        }
    });
    ready.await;
    child
}

fn stop(mut child: std::process::Child) {
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_non_loopback_listen_address_needs_tls_or_insecure_listen() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("0.0.0.0:{}", free_port());
    let http_addr = format!("127.0.0.1:{}", free_port());
    let base = vec![
        format!("--nats-url={}", nats.url()),
        format!("--http-addr={http_addr}"),
        format!("--listen={listen}"),
    ];

    // Without TLS: refused, exit status 64, the flags named.
    let output = gateway_command(&base).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(&format!("--listen {listen} is not a loopback address")),
        "{stderr}"
    );
    for flag in ["--tls-cert", "--tls-key", "--insecure-listen"] {
        assert!(stderr.contains(flag), "{flag}: {stderr}");
    }

    // A service address in the clear without --grpc-insecure: refused too.
    let mut clear = base.clone();
    clear.push("--insecure-listen".to_owned());
    clear.push("--policy-addr=http://127.0.0.1:9203".to_owned());
    let output = gateway_command(&clear).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("--policy-addr") && stderr.contains("--grpc-insecure"),
        "{stderr}"
    );

    // With TLS it starts, and speaks TLS there.
    let (files, _, _) = write_pki(dir.path(), CLIENT_CN);
    let mut tls = base.clone();
    tls.push(format!("--tls-cert={}", files.cert.display()));
    tls.push(format!("--tls-key={}", files.key.display()));
    let child = start_ready(&tls, &http_addr).await;
    let port: u16 = listen.rsplit(':').next().unwrap().parse().unwrap();
    let ca = std::fs::read_to_string(&files.ca).unwrap();
    let (status, _) = tls_call(
        SocketAddr::from(([127, 0, 0, 1], port)),
        &ca,
        None,
        "/api/v1/Models/ListModels",
        "{}",
    )
    .await;
    assert_eq!(status, 401, "a TLS answer without credentials");
    stop(child);

    // And in the clear only when told to.
    let mut insecure = base;
    insecure.push("--insecure-listen".to_owned());
    stop(start_ready(&insecure, &http_addr).await);
}

/// Writes a PEM pair to `<dir>/<name>.pem` and `<dir>/<name>.key`.
fn write_pair(dir: &Path, name: &str, (cert, key): &PemPair) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    (cert_path, key_path)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_on_mutual_tls_answers_the_gateway_and_refuses_other_clients() {
    use cnnf_service::grpc::upstream::{client_tls, Upstream};
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (files, gateway_pair, _) = write_pki(dir.path(), "cnnf-gateway");
    let (gateway_cert, gateway_key) = write_pair(dir.path(), "gateway", &gateway_pair);
    // The same CN, signed by another CA.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let (_, foreign_pair, _) = write_pki(&other, "cnnf-gateway");
    let (foreign_cert, foreign_key) = write_pair(dir.path(), "foreign", &foreign_pair);

    // The backend on TCP, with the services' listener and mutual TLS.
    let fake = Fake::default();
    let tls = ServerTls::mutual(&files.cert, &files.key, &files.ca);
    let GrpcAddr::Tcp(backend) = serve_fake(fake.clone(), &"127.0.0.1:0".parse().unwrap(), &tls).await else {
        panic!("a TCP address was bound");
    };
    let https = format!("https://localhost:{}", backend.port());

    let tokens = dir.path().join("tokens.json");
    std::fs::write(&tokens, tokens_json()).unwrap();
    let mut common = <CommonOnly as clap::Parser>::parse_from(["gateway-test"]).common;
    common.nats_url = nats.url();
    let mut config = cnnf_gateway::Config::new(common);
    config.gateway.tokens_file = Some(tokens);
    config.upstreams = cnnf_gateway::Upstreams {
        ingest_addr: https.clone(),
        modeler_addr: https.clone(),
        policy_addr: https.clone(),
        audit_addr: https.clone(),
        upstream_ca: Some(files.ca.clone()),
        upstream_cert: Some(gateway_cert),
        upstream_key: Some(gateway_key),
        grpc_insecure: false,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(cnnf_gateway::run_on(listener, config, Health::default(), async move {
        let _ = stopped.await;
    }));
    let h = Harness {
        nats,
        fake,
        addr,
        _dir: dir,
        _stop: stop,
    };

    // Through the gateway: the gRPC pass-through and the JSON API.
    let mut models = ModelsClient::new(h.channel().await);
    models
        .list_models(authed(pb::ListModelsRequest::default(), VIEWER))
        .await
        .expect("the pass-through reaches the backend over mutual TLS");
    let (status, json) = h.http("POST", "/api/v1/Policy/GetPolicy", Some(VIEWER), "{}").await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(h.fake.calls(), ["ListModels", "GetPolicy"]);

    // Directly, claiming to be an admin: refused in the handshake.
    let no_cert = client_tls(&files.ca, None).unwrap();
    let foreign = client_tls(&files.ca, Some((&foreign_cert, &foreign_key))).unwrap();
    for (who, tls) in [("no certificate", no_cert), ("another CA's certificate", foreign)] {
        let direct = Upstream::parse("direct", &https, Some(&tls), false).unwrap();
        // TLS 1.3: the server's verdict on the client certificate arrives
        // as an alert on the client's first read.
        let refused = async {
            let mut stream = direct.connect().await?;
            tokio::io::AsyncReadExt::read(&mut stream, &mut [0u8; 1]).await
        };
        let error = tokio::time::timeout(Duration::from_secs(10), refused)
            .await
            .unwrap()
            .expect_err(who);
        assert!(error.to_string().contains("alert"), "{who}: {error}");
        let mut request = Request::new(pb::ListModelsRequest::default());
        request
            .metadata_mut()
            .insert(cnnf_service::actor::ACTOR_HEADER, "ada".parse().unwrap());
        let status = ModelsClient::new(direct.default_channel())
            .list_models(request)
            .await
            .expect_err(who);
        assert!(
            matches!(status.code(), Code::Unavailable | Code::Cancelled | Code::Unknown),
            "{who}: {status:?}"
        );
    }
    let plain = Upstream::parse("direct", &format!("http://{backend}"), None, true).unwrap();
    let status = ModelsClient::new(plain.default_channel())
        .list_models(pb::ListModelsRequest::default())
        .await
        .expect_err("a client without TLS");
    assert_ne!(status.code(), Code::Ok);
    assert_eq!(
        h.fake.calls(),
        ["ListModels", "GetPolicy"],
        "nothing else reached the backend"
    );
}
