//! Radar: the fleet as a graph of images, host apps and network objects.
//!
//! The graph is assembled on demand from the services' gRPC APIs: models
//! and their learned connections (Models), objects and rules (Policy), and
//! recent alerts and prevents (Audits). A service that is down leaves its
//! part out and adds a `warnings` entry, so the page still shows what is
//! known. Changes announced on NATS (`cnnf.model.>`, `cnnf.policy.>`,
//! `cnnf.audit.v1.>`) make `/api/v1/radar/stream` push the graph again, at
//! most twice a second per client; one build is shared by all clients.
//!
//! A change is announced on NATS as the services apply it, so a graph built
//! right after an announcement may predate it (a model command is published
//! before the modeler's runner commits it). The graph is therefore built
//! once more [`SETTLE`] after the last announcement, and a client gets a
//! push only when its graph differs from the one it was sent last.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use cnnf_proto::v1 as pb;
use cnnf_proto::v1::audits_client::AuditsClient;
use cnnf_proto::v1::models_client::ModelsClient;
use cnnf_proto::v1::policy_client::PolicyClient;
use futures::{StreamExt as _, TryStreamExt as _};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex};

use crate::auth::Role;
use crate::server::{json_error, Channels, ClientCn, Gateway};

/// Least time between two pushes of the graph to one client.
pub const THROTTLE: Duration = Duration::from_millis(500);
/// After the last change announced, the graph is built once more this much
/// later, to catch changes the services applied after announcing them.
pub const SETTLE: Duration = Duration::from_secs(2);
/// Most learned-connection pages read per model (of 1000 each).
const MAX_PAGES: usize = 10;
/// Most recent verdicts kept per edge.
const MAX_RECENT: usize = 10;

/// A node of the graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// `image:<image-id>`, `host_app:<unit>`, `object:<name>` or `unknown:<name>`.
    pub id: String,
    /// `image`, `host_app`, `object` or `unknown`.
    pub kind: String,
    /// Human name.
    pub name: String,
    /// Running containers (images only).
    pub containers: u32,
    /// `learning`, `enforcing` (images with a model) or `none`.
    pub state: String,
    /// Cluster, when known.
    pub cluster: String,
    /// Namespaces, when known.
    pub namespaces: Vec<String>,
}

/// One port of an edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    /// Port number (0 for ICMP or any).
    pub port: u32,
    /// `tcp`, `udp`, `icmp`, `any`.
    pub protocol: String,
    /// `allowed` (green), `alerted` (yellow), `blocked` (orange), `observed` (gray).
    pub status: String,
}

/// A recent verdict on an edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recent {
    /// Last seen, Unix milliseconds.
    pub time: i64,
    /// `alert`, `prevent` or `block`.
    pub verdict: String,
    /// Connections it stands for.
    pub count: u64,
}

/// An edge of the graph, from source to destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Edge {
    /// Stable id: `learned:<src>-><dst>`, `rule:<rule-id>:<object>`, `audit:<src>-><dst>`.
    pub id: String,
    /// Source node id.
    pub source: String,
    /// Destination node id.
    pub target: String,
    /// `learned` (solid), `rule` (dotted) or `audit` (seen only in audits).
    pub kind: String,
    /// Ports, by number and protocol.
    pub ports: Vec<Port>,
    /// Connections counted.
    pub count: u64,
    /// First seen, Unix milliseconds (0: unknown).
    pub first_seen: i64,
    /// Last seen, Unix milliseconds (0: unknown).
    pub last_seen: i64,
    /// `model:<image-id>`, `rule:<id>`, or the deciding entry of the last audit.
    pub decided_by: String,
    /// Recent alerts and prevents, newest first.
    pub recent: Vec<Recent>,
    /// For learned edges: the image whose model holds it and the side, as
    /// `DELETE /api/v1/models/<image>/learned` needs them.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub learned_by: Option<LearnedBy>,
    /// For learned edges: every learned connection the edge stands for
    /// (both sides, every port), so deleting the edge deletes them all.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub learned: Vec<LearnedRef>,
}

/// One learned connection of an edge, as `DELETE /api/v1/models/<image_id>/learned` takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnedRef {
    /// The image whose model holds the connection.
    pub image_id: String,
    /// The request body naming it (proto3 JSON of `LearnedConnection`:
    /// `side`, `peer`, `port`, `protocol`).
    pub connection: serde_json::Value,
}

/// Where a learned edge can be deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnedBy {
    /// The image whose model holds the connection.
    pub image_id: String,
    /// `SIDE_INBOUND` or `SIDE_OUTBOUND`, as in the model.
    pub side: String,
    /// The peer identity (proto3 JSON of `Identity`).
    pub peer: serde_json::Value,
}

/// The graph as served.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    /// Nodes, by id.
    pub nodes: Vec<Node>,
    /// Edges, by id.
    pub edges: Vec<Edge>,
    /// Parts missing because a service did not answer.
    pub warnings: Vec<String>,
}

/// Query parameters of the Radar endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RadarQuery {
    /// `container` (default) or `host`.
    pub view: Option<String>,
    /// Only nodes of this cluster.
    pub cluster: Option<String>,
    /// Only nodes running in this namespace, with their direct peers.
    pub namespace: Option<String>,
    /// Only nodes whose name or id contains this (case-insensitive), with their neighbours.
    pub search: Option<String>,
    /// The bearer token, for clients that cannot send headers (EventSource).
    pub access_token: Option<String>,
}

/// A graph and the change generation it was built at.
type Built = (u64, Arc<Graph>);

/// Radar's shared state: service channels, the change counter and the last build.
#[derive(Clone)]
pub struct Radar {
    channels: Channels,
    audit_window: Duration,
    changes: Arc<watch::Sender<u64>>,
    cache: Arc<Mutex<Option<Built>>>,
}

fn unix_ms(nanos: i64) -> i64 {
    nanos / 1_000_000
}

fn protocol_name(protocol: i32) -> &'static str {
    match pb::Protocol::try_from(protocol) {
        Ok(pb::Protocol::Tcp) => "tcp",
        Ok(pb::Protocol::Udp) => "udp",
        Ok(pb::Protocol::Icmp) => "icmp",
        Ok(pb::Protocol::Any) => "any",
        _ => "unspecified",
    }
}

/// Port status, ordered by how much it matters: the strongest wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Status {
    Observed,
    Allowed,
    Alerted,
    Blocked,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Observed => "observed",
            Status::Allowed => "allowed",
            Status::Alerted => "alerted",
            Status::Blocked => "blocked",
        }
    }
}

#[derive(Default)]
struct EdgeAcc {
    source: String,
    target: String,
    kind: &'static str,
    ports: BTreeMap<(u32, &'static str), (Status, u64)>,
    first_seen: i64,
    last_seen: i64,
    decided_by: String,
    recent: Vec<Recent>,
    learned_by: Option<LearnedBy>,
    learned: Vec<LearnedRef>,
}

/// What the services answered, the input of [`assemble`].
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// Models and their learned connections.
    pub models: Vec<(pb::ModelSummary, Vec<pb::LearnedConnection>)>,
    /// The committed policy.
    pub policy: Option<pb::PolicySnapshot>,
    /// Recent audits.
    pub audits: Vec<pb::Audit>,
    /// What could not be read.
    pub warnings: Vec<String>,
}

#[derive(Default)]
struct Builder {
    nodes: BTreeMap<String, Node>,
    edges: BTreeMap<String, EdgeAcc>,
}

impl Builder {
    fn node(&mut self, id: String, kind: &str, name: &str, cluster: &str) -> String {
        let node = self.nodes.entry(id.clone()).or_insert_with(|| Node {
            id: id.clone(),
            kind: kind.to_owned(),
            name: if name.is_empty() { id.clone() } else { name.to_owned() },
            containers: 0,
            state: "none".to_owned(),
            cluster: String::new(),
            namespaces: Vec::new(),
        });
        if node.cluster.is_empty() && !cluster.is_empty() {
            node.cluster = cluster.to_owned();
        }
        id
    }

    fn identity(&mut self, identity: Option<&pb::Identity>) -> String {
        let default = pb::Identity::default();
        let identity = identity.unwrap_or(&default);
        let label = if identity.id.is_empty() {
            &identity.name
        } else {
            &identity.id
        };
        let (id, kind) = match pb::IdentityKind::try_from(identity.kind) {
            Ok(pb::IdentityKind::Image) => (format!("image:{label}"), "image"),
            Ok(pb::IdentityKind::HostApp) => (format!("host_app:{label}"), "host_app"),
            Ok(pb::IdentityKind::NetworkObject) => (format!("object:{label}"), "object"),
            _ => ("unknown".to_owned(), "unknown"),
        };
        let name = if kind == "unknown" {
            "unknown"
        } else {
            identity.name.as_str()
        };
        self.node(id, kind, name, &identity.cluster)
    }

    fn edge(&mut self, id: String, kind: &'static str, source: &str, target: &str) -> &mut EdgeAcc {
        self.edges.entry(id).or_insert_with(|| EdgeAcc {
            source: source.to_owned(),
            target: target.to_owned(),
            kind,
            ..Default::default()
        })
    }

    /// The node an object stands for: its image or host app when the
    /// object names one, else the object itself.
    fn object(&mut self, objects: &BTreeMap<&str, &pb::NetworkObject>, name: &str) -> String {
        match objects.get(name) {
            Some(object) if object.kind == pb::network_object::Kind::Image as i32 && !object.image_id.is_empty() => {
                let label = if object.image_name.is_empty() {
                    &object.name
                } else {
                    &object.image_name
                };
                self.node(format!("image:{}", object.image_id), "image", label, "")
            }
            Some(object) if object.kind == pb::network_object::Kind::HostApp as i32 && !object.host_app.is_empty() => {
                self.node(
                    format!("host_app:{}", object.host_app),
                    "host_app",
                    &object.host_app,
                    "",
                )
            }
            _ => self.node(format!("object:{name}"), "object", name, ""),
        }
    }
}

fn identity_json(identity: Option<&pb::Identity>) -> serde_json::Value {
    serde_json::to_value(identity.cloned().unwrap_or_default()).unwrap_or(serde_json::Value::Null)
}

/// What names a learned connection (side, peer, port, protocol), in proto3 JSON.
fn learned_key_json(connection: &pb::LearnedConnection) -> serde_json::Value {
    let key = pb::LearnedConnection {
        side: connection.side,
        peer: connection.peer.clone(),
        port: connection.port,
        protocol: connection.protocol,
        ..Default::default()
    };
    serde_json::to_value(key).unwrap_or(serde_json::Value::Null)
}

/// Builds the full graph from what the services answered.
pub fn assemble(sources: &Sources) -> Graph {
    let mut b = Builder::default();
    let mut states = BTreeMap::new();
    for (model, _) in &sources.models {
        let id = b.node(format!("image:{}", model.image_id), "image", &model.image_name, "");
        let state = match pb::ModelState::try_from(model.state) {
            Ok(pb::ModelState::Learning) => "learning",
            Ok(pb::ModelState::Enforcing) => "enforcing",
            _ => "none",
        };
        if let Some(node) = b.nodes.get_mut(&id) {
            node.containers = model.container_count;
            node.state = state.to_owned();
            node.namespaces = model.namespaces.clone();
        }
        states.insert(model.image_id.clone(), state);
    }
    for (model, connections) in &sources.models {
        let me = format!("image:{}", model.image_id);
        let enforcing = states.get(&model.image_id) == Some(&"enforcing");
        for connection in connections {
            let peer = b.identity(connection.peer.as_ref());
            let inbound = connection.side == pb::Side::Inbound as i32;
            let (source, target) = if inbound {
                (peer, me.clone())
            } else {
                (me.clone(), peer)
            };
            let edge = b.edge(format!("learned:{source}->{target}"), "learned", &source, &target);
            let status = if enforcing { Status::Allowed } else { Status::Observed };
            let port = edge
                .ports
                .entry((connection.port, protocol_name(connection.protocol)))
                .or_insert((status, 0));
            port.0 = port.0.max(status);
            port.1 = port.1.max(connection.count);
            let first = unix_ms(connection.first_seen_unix_nanos);
            if first > 0 && (edge.first_seen == 0 || first < edge.first_seen) {
                edge.first_seen = first;
            }
            edge.last_seen = edge.last_seen.max(unix_ms(connection.last_seen_unix_nanos));
            edge.learned.push(LearnedRef {
                image_id: model.image_id.clone(),
                connection: learned_key_json(connection),
            });
            if edge.decided_by.is_empty() || inbound {
                edge.decided_by = format!("model:{}", model.image_id);
                edge.learned_by = Some(LearnedBy {
                    image_id: model.image_id.clone(),
                    side: if inbound { "SIDE_INBOUND" } else { "SIDE_OUTBOUND" }.to_owned(),
                    peer: identity_json(connection.peer.as_ref()),
                });
            }
        }
    }
    if let Some(policy) = &sources.policy {
        let objects: BTreeMap<&str, &pb::NetworkObject> = policy.objects.iter().map(|o| (o.name.as_str(), o)).collect();
        for object in &policy.objects {
            b.object(&objects, &object.name);
        }
        for rule in policy.rules.iter().filter(|rule| !rule.disabled) {
            let source = b.object(&objects, &rule.source);
            for destination in &rule.destinations {
                let target = b.object(&objects, &destination.object);
                let status = match pb::RuleEffect::try_from(destination.effect) {
                    Ok(pb::RuleEffect::Alert) => Status::Alerted,
                    Ok(pb::RuleEffect::Prevent) => Status::Blocked,
                    _ => Status::Allowed,
                };
                let edge = b.edge(
                    format!("rule:{}:{}", rule.id, destination.object),
                    "rule",
                    &source,
                    &target,
                );
                edge.decided_by = format!("rule:{}", rule.id);
                let protocol = protocol_name(destination.protocol);
                if destination.ports.is_empty() {
                    edge.ports.insert((0, protocol), (status, 0));
                }
                for range in &destination.ports {
                    edge.ports.insert((range.first, protocol), (status, 0));
                    if range.last > range.first {
                        edge.ports.insert((range.last, protocol), (status, 0));
                    }
                }
            }
        }
    }
    let mut audits: Vec<&pb::Audit> = sources.audits.iter().collect();
    audits.sort_by_key(|audit| std::cmp::Reverse(audit.last_seen_unix_nanos));
    for audit in audits {
        let status = match pb::Verdict::try_from(audit.verdict) {
            Ok(pb::Verdict::Alert) => (Status::Alerted, "alert"),
            Ok(pb::Verdict::Prevent) => (Status::Blocked, "prevent"),
            Ok(pb::Verdict::Block) => (Status::Blocked, "block"),
            _ => continue,
        };
        let source = b.identity(audit.source.as_ref().and_then(|e| e.identity.as_ref()));
        let target = b.identity(audit.destination.as_ref().and_then(|e| e.identity.as_ref()));
        let learned = format!("learned:{source}->{target}");
        let id = if b.edges.contains_key(&learned) {
            learned
        } else if let Some((id, _)) = b
            .edges
            .iter()
            .find(|(_, e)| e.kind == "rule" && e.source == source && e.target == target)
        {
            id.clone()
        } else {
            format!("audit:{source}->{target}")
        };
        let edge = b.edge(id, "audit", &source, &target);
        let port = audit.destination.as_ref().map_or(0, |e| e.port);
        let entry = edge
            .ports
            .entry((port, protocol_name(audit.protocol)))
            .or_insert((status.0, 0));
        entry.0 = entry.0.max(status.0);
        entry.1 += audit.count;
        if edge.kind == "audit" && edge.decided_by.is_empty() {
            edge.decided_by = audit.decided_by.clone();
        }
        edge.last_seen = edge.last_seen.max(unix_ms(audit.last_seen_unix_nanos));
        let first = unix_ms(audit.first_seen_unix_nanos);
        if first > 0 && (edge.first_seen == 0 || first < edge.first_seen) {
            edge.first_seen = first;
        }
        if edge.recent.len() < MAX_RECENT {
            edge.recent.push(Recent {
                time: unix_ms(audit.last_seen_unix_nanos),
                verdict: status.1.to_owned(),
                count: audit.count,
            });
        }
    }
    Graph {
        nodes: b.nodes.into_values().collect(),
        edges: b
            .edges
            .into_iter()
            .map(|(id, e)| Edge {
                id,
                source: e.source,
                target: e.target,
                kind: e.kind.to_owned(),
                count: e.ports.values().map(|(_, count)| count).sum(),
                ports: e
                    .ports
                    .into_iter()
                    .map(|((port, protocol), (status, _))| Port {
                        port,
                        protocol: protocol.to_owned(),
                        status: status.name().to_owned(),
                    })
                    .collect(),
                first_seen: e.first_seen,
                last_seen: e.last_seen,
                decided_by: e.decided_by,
                recent: e.recent,
                learned_by: e.learned_by,
                learned: e.learned,
            })
            .collect(),
        warnings: sources.warnings.clone(),
    }
}

/// Errors in Radar query parameters.
#[derive(Debug, thiserror::Error)]
#[error("view must be `container` or `host`, got {0:?}")]
pub struct BadView(String);

/// Keeps what a query asks for: the view's node kinds and a cluster; then,
/// for a namespace, the nodes running in it with their direct peers (who
/// talks to the namespace is what an operator looks for); then, for a
/// search, the matching nodes with their direct neighbours.
pub fn filter(graph: &Graph, query: &RadarQuery) -> Result<Graph, BadView> {
    let host = match query.view.as_deref() {
        None | Some("" | "container") => false,
        Some("host") => true,
        Some(other) => return Err(BadView(other.to_owned())),
    };
    let nonempty = |v: &Option<String>| v.as_deref().filter(|s| !s.is_empty()).map(str::to_owned);
    let (cluster, namespace, search) = (
        nonempty(&query.cluster),
        nonempty(&query.namespace),
        nonempty(&query.search).map(|s| s.to_lowercase()),
    );
    let mut keep: BTreeSet<&str> = graph
        .nodes
        .iter()
        .filter(|n| if host { n.kind != "image" } else { n.kind != "host_app" })
        .filter(|n| cluster.as_ref().is_none_or(|c| &n.cluster == c))
        .map(|n| n.id.as_str())
        .collect();
    if let Some(namespace) = &namespace {
        let members = graph
            .nodes
            .iter()
            .filter(|n| keep.contains(n.id.as_str()) && n.namespaces.contains(namespace))
            .map(|n| n.id.as_str())
            .collect();
        keep = with_neighbours(graph, members, &keep);
    }
    if let Some(search) = &search {
        let hits = graph
            .nodes
            .iter()
            .filter(|n| keep.contains(n.id.as_str()))
            .filter(|n| n.name.to_lowercase().contains(search) || n.id.to_lowercase().contains(search))
            .map(|n| n.id.as_str())
            .collect();
        keep = with_neighbours(graph, hits, &keep);
    }
    Ok(Graph {
        nodes: graph
            .nodes
            .iter()
            .filter(|n| keep.contains(n.id.as_str()))
            .cloned()
            .collect(),
        edges: graph
            .edges
            .iter()
            .filter(|e| keep.contains(e.source.as_str()) && keep.contains(e.target.as_str()))
            .cloned()
            .collect(),
        warnings: graph.warnings.clone(),
    })
}

/// `hits` and the nodes of `within` one edge away from one of them.
fn with_neighbours<'g>(graph: &'g Graph, hits: BTreeSet<&'g str>, within: &BTreeSet<&'g str>) -> BTreeSet<&'g str> {
    let mut out = hits.clone();
    for edge in &graph.edges {
        if hits.contains(edge.source.as_str()) && within.contains(edge.target.as_str()) {
            out.insert(&edge.target);
        }
        if hits.contains(edge.target.as_str()) && within.contains(edge.source.as_str()) {
            out.insert(&edge.source);
        }
    }
    out
}

impl Radar {
    /// Radar over these channels, looking `audit_window` back for audits.
    pub fn new(channels: Channels, audit_window: Duration) -> Self {
        Self {
            channels,
            audit_window,
            changes: Arc::new(watch::channel(0).0),
            cache: Arc::new(Mutex::new(None)),
        }
    }

    /// Records that something the graph shows changed.
    pub fn notify(&self) {
        self.changes.send_modify(|generation| *generation += 1);
    }

    async fn fetch_models(&self) -> Result<Vec<(pb::ModelSummary, Vec<pb::LearnedConnection>)>, tonic::Status> {
        let mut client = ModelsClient::new(self.channels.modeler.clone());
        let mut models = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = client
                .list_models(pb::ListModelsRequest {
                    page_size: 1000,
                    page_token: page_token.clone(),
                })
                .await?
                .into_inner();
            models.extend(page.models);
            if page.next_page_token.is_empty() || page.next_page_token == page_token {
                break;
            }
            page_token = page.next_page_token;
        }
        futures::stream::iter(models.into_iter().map(|model| {
            let mut client = client.clone();
            async move {
                let mut connections = Vec::new();
                let mut page_token = String::new();
                for _ in 0..MAX_PAGES {
                    let page = client
                        .list_learned_connections(pb::ListLearnedConnectionsRequest {
                            image_id: model.image_id.clone(),
                            page_size: 1000,
                            page_token: page_token.clone(),
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    connections.extend(page.connections);
                    if page.next_page_token.is_empty() || page.next_page_token == page_token {
                        break;
                    }
                    page_token = page.next_page_token;
                }
                Ok::<_, tonic::Status>((model, connections))
            }
        }))
        .buffer_unordered(8)
        .try_collect()
        .await
    }

    async fn fetch(&self) -> Sources {
        let audits = async {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            let from = now.saturating_sub(self.audit_window);
            AuditsClient::new(self.channels.audit.clone())
                .list_audits(pb::ListAuditsRequest {
                    from_unix_nanos: i64::try_from(from.as_nanos()).unwrap_or(i64::MAX),
                    page_size: 1000,
                    ..Default::default()
                })
                .await
                .map(|answer| answer.into_inner().audits)
        };
        let policy = async {
            PolicyClient::new(self.channels.policy.clone())
                .get_policy(pb::GetPolicyRequest {})
                .await
                .map(tonic::Response::into_inner)
        };
        let (models, policy, audits) = tokio::join!(self.fetch_models(), policy, audits);
        let mut sources = Sources::default();
        match models {
            Ok(models) => sources.models = models,
            Err(status) => sources
                .warnings
                .push(format!("models unavailable: {}", status.message())),
        }
        match policy {
            Ok(policy) => sources.policy = Some(policy),
            Err(status) => sources
                .warnings
                .push(format!("policy unavailable: {}", status.message())),
        }
        match audits {
            Ok(audits) => sources.audits = audits,
            Err(status) => sources
                .warnings
                .push(format!("audits unavailable: {}", status.message())),
        }
        for warning in &sources.warnings {
            tracing::warn!(message = "Radar graph is partial.", warning = %warning);
        }
        sources
    }

    /// The full graph, freshly built.
    pub async fn build(&self) -> Arc<Graph> {
        let mut cache = self.cache.lock().await;
        let generation = *self.changes.borrow();
        let graph = Arc::new(assemble(&self.fetch().await));
        *cache = graph.warnings.is_empty().then(|| (generation, Arc::clone(&graph)));
        graph
    }

    /// The full graph at the current change generation, built once for
    /// all clients.
    pub async fn current(&self) -> Arc<Graph> {
        let mut cache = self.cache.lock().await;
        let generation = *self.changes.borrow();
        if let Some((built, graph)) = cache.as_ref() {
            if *built == generation {
                return Arc::clone(graph);
            }
        }
        let graph = Arc::new(assemble(&self.fetch().await));
        *cache = graph.warnings.is_empty().then(|| (generation, Arc::clone(&graph)));
        graph
    }
}

/// Subscribes to the subjects that change the graph and bumps the change
/// counter on each message; retries the connection until NATS answers.
pub async fn watch_changes(
    nats_url: String,
    nats: cnnf_bus::NatsOptions,
    radar: Radar,
    ready: cnnf_service::Readiness,
) {
    let client = match cnnf_bus::connect(&nats_url, crate::NAME, &nats).await {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(message = "Radar cannot reach NATS; the stream will not update.", %error);
            return;
        }
    };
    let mut subscriptions = Vec::new();
    for subject in ["cnnf.model.>", "cnnf.policy.>", "cnnf.audit.v1.>"] {
        match client.subscribe(subject).await {
            Ok(subscription) => subscriptions.push(subscription),
            Err(error) => {
                tracing::error!(message = "Radar cannot subscribe; the stream will not update.", subject, %error);
                return;
            }
        }
    }
    if let Err(error) = client.flush().await {
        tracing::warn!(message = "NATS flush failed.", %error);
    }
    ready.set(true);
    let mut messages = futures::stream::select_all(subscriptions);
    let mut settle: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            message = messages.next() => {
                if message.is_none() {
                    break;
                }
                radar.notify();
                settle = Some(tokio::time::Instant::now() + SETTLE);
            }
            () = tokio::time::sleep_until(settle.unwrap_or_else(tokio::time::Instant::now)), if settle.is_some() => {
                settle = None;
                radar.notify();
            }
        }
    }
}

fn with_query_token(headers: &HeaderMap, query: &RadarQuery) -> HeaderMap {
    let mut headers = headers.clone();
    if !headers.contains_key(header::AUTHORIZATION) {
        if let Some(token) = &query.access_token {
            if let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}")) {
                headers.insert(header::AUTHORIZATION, value);
            }
        }
    }
    headers
}

/// `GET /api/v1/radar`: the graph, filtered (viewer role).
pub async fn get_graph(
    State(gateway): State<Gateway>,
    Extension(cn): Extension<ClientCn>,
    Query(query): Query<RadarQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(denied) = gateway.authorize(&with_query_token(&headers, &query), &cn, Role::Viewer) {
        return denied.http();
    }
    let graph = gateway.radar.build().await;
    match filter(&graph, &query) {
        Ok(graph) => Json(graph).into_response(),
        Err(error) => json_error(StatusCode::BAD_REQUEST, "invalid_argument", &error.to_string()),
    }
}

/// `GET /api/v1/radar/stream`: Server-Sent Events, a `graph` event with the
/// filtered graph on connect and after every change (viewer role).
pub async fn stream(
    State(gateway): State<Gateway>,
    Extension(cn): Extension<ClientCn>,
    Query(query): Query<RadarQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(denied) = gateway.authorize(&with_query_token(&headers, &query), &cn, Role::Viewer) {
        return denied.http();
    }
    if let Err(error) = filter(&Graph::default(), &query) {
        return json_error(StatusCode::BAD_REQUEST, "invalid_argument", &error.to_string());
    }
    let radar = gateway.radar.clone();
    let changes = radar.changes.subscribe();
    let events = futures::stream::unfold(
        (radar, changes, query, None::<Graph>),
        |(radar, mut changes, query, last)| async move {
            let mut first = last.is_none();
            let graph = loop {
                if !first {
                    changes.changed().await.ok()?;
                    // Let a burst of changes settle into one push.
                    tokio::time::sleep(THROTTLE).await;
                }
                first = false;
                changes.borrow_and_update();
                let graph = radar.current().await;
                let graph = filter(&graph, &query).unwrap_or_default();
                // Nothing this client sees changed: no push.
                if last.as_ref() != Some(&graph) {
                    break graph;
                }
            };
            let event = Event::default()
                .event("graph")
                .json_data(&graph)
                .unwrap_or_else(|_| Event::default().event("error").data("graph not serializable"));
            Some((Ok::<_, Infallible>(event), (radar, changes, query, Some(graph))))
        },
    );
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id: &str) -> pb::Identity {
        pb::Identity {
            kind: pb::IdentityKind::Image as i32,
            id: id.into(),
            name: format!("{id}-name"),
            cluster: "c1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn both_sides_of_a_learned_connection_make_one_edge() {
        let inbound = pb::LearnedConnection {
            side: pb::Side::Inbound as i32,
            peer: Some(image("web")),
            port: 5432,
            protocol: pb::Protocol::Tcp as i32,
            count: 3,
            ..Default::default()
        };
        let outbound = pb::LearnedConnection {
            side: pb::Side::Outbound as i32,
            peer: Some(image("db")),
            ..inbound.clone()
        };
        let model = |id: &str, state: pb::ModelState| pb::ModelSummary {
            image_id: id.into(),
            image_name: format!("{id}-name"),
            state: state as i32,
            container_count: 2,
            ..Default::default()
        };
        let sources = Sources {
            models: vec![
                (model("db", pb::ModelState::Enforcing), vec![inbound]),
                (model("web", pb::ModelState::Learning), vec![outbound]),
            ],
            ..Default::default()
        };
        let graph = assemble(&sources);
        assert_eq!(graph.nodes.len(), 2);
        assert_eq!(graph.edges.len(), 1);
        let edge = &graph.edges[0];
        assert_eq!((edge.source.as_str(), edge.target.as_str()), ("image:web", "image:db"));
        assert_eq!(edge.ports[0].status, "allowed");
        assert_eq!(edge.count, 3);
        assert_eq!(edge.decided_by, "model:db");
        let learned: Vec<(&str, &serde_json::Value)> = edge
            .learned
            .iter()
            .map(|l| (l.image_id.as_str(), &l.connection["side"]))
            .collect();
        assert_eq!(
            learned,
            [
                ("db", &serde_json::json!("SIDE_INBOUND")),
                ("web", &serde_json::json!("SIDE_OUTBOUND"))
            ],
            "both sides are listed for deletion"
        );
        let body = &edge.learned[0].connection;
        assert_eq!(
            (&body["port"], &body["protocol"]),
            (&serde_json::json!(5432), &serde_json::json!("PROTOCOL_TCP"))
        );
        assert_eq!(body["peer"]["id"], "web");
        assert!(body.get("count").is_none(), "only what names the connection: {body}");
        let host = filter(
            &graph,
            &RadarQuery {
                view: Some("host".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(host.nodes.is_empty() && host.edges.is_empty());
        let search = filter(
            &graph,
            &RadarQuery {
                search: Some("WEB".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(search.nodes.len(), 2, "a hit keeps its neighbours");
        assert!(filter(
            &graph,
            &RadarQuery {
                view: Some("x".into()),
                ..Default::default()
            }
        )
        .is_err());
    }

    #[test]
    fn a_namespace_keeps_its_images_and_their_direct_peers() {
        let model = |id: &str, namespaces: &[&str], peers: &[&str]| {
            let summary = pb::ModelSummary {
                image_id: id.into(),
                image_name: format!("{id}-name"),
                state: pb::ModelState::Learning as i32,
                container_count: 1,
                namespaces: namespaces.iter().map(|n| (*n).to_owned()).collect(),
                ..Default::default()
            };
            let learned = peers
                .iter()
                .map(|peer| pb::LearnedConnection {
                    side: pb::Side::Outbound as i32,
                    peer: Some(image(peer)),
                    port: 80,
                    protocol: pb::Protocol::Tcp as i32,
                    count: 1,
                    ..Default::default()
                })
                .collect();
            (summary, learned)
        };
        // web (shop) -> db (shop); cache (ops) -> db; batch (ops) -> queue (ops).
        let sources = Sources {
            models: vec![
                model("web", &["shop"], &["db"]),
                model("db", &["shop", "shared"], &[]),
                model("cache", &["ops"], &["db"]),
                model("batch", &["ops"], &["queue"]),
                model("queue", &["ops"], &[]),
            ],
            ..Default::default()
        };
        let graph = assemble(&sources);
        let in_namespace = |namespace: &str| {
            let graph = filter(
                &graph,
                &RadarQuery {
                    namespace: Some(namespace.into()),
                    ..Default::default()
                },
            )
            .unwrap();
            let nodes: Vec<String> = graph.nodes.iter().map(|n| n.id.clone()).collect();
            (nodes, graph.edges.len())
        };
        assert_eq!(
            in_namespace("shop"),
            (vec!["image:cache".into(), "image:db".into(), "image:web".into()], 2),
            "shop's images and cache, which talks to shop's db"
        );
        assert_eq!(
            in_namespace("ops"),
            (
                vec![
                    "image:batch".into(),
                    "image:cache".into(),
                    "image:db".into(),
                    "image:queue".into()
                ],
                2
            ),
        );
        assert_eq!(in_namespace("nowhere"), (vec![], 0));
        let node = graph.nodes.iter().find(|n| n.id == "image:db").unwrap();
        assert_eq!(node.namespaces, ["shop", "shared"]);
    }
}
