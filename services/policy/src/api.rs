//! The `cnnf.v1.Policy` gRPC API: writes with optimistic concurrency,
//! export and import, and the committed policy.
//!
//! The policy revision is the `CNNF_POLICY` stream sequence of the last
//! event on this cluster's policy subjects (`cnnf.policy.<cluster>.*`). A
//! write names the revision it was based on (`expected_revision`; 0 for a
//! policy nothing was ever written to). The API waits until the store has
//! applied that revision, checks the change against the policy *at* that
//! revision (every problem, with its path: `INVALID_ARGUMENT`), computes
//! the conflicts it causes (warnings), and publishes it with JetStream's
//! `Nats-Expected-Last-Subject-Sequence` = the revision, over the subject
//! filter `cnnf.policy.<cluster>.*` (header
//! `Nats-Expected-Last-Subject-Sequence-Subject`, nats-server 2.11+). If
//! anything was written in between, JetStream refuses it and the caller
//! gets `ABORTED` with the current revision: re-read, re-check, retry. So
//! two operators writing at once never lose an update. The answer carries
//! the new revision (the stored sequence) and the conflict warnings.
//!
//! A write's `Nats-Msg-Id` is derived from its base revision and content,
//! so a retried identical write is stored once.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self};
use async_nats::HeaderMap;
use cnnf_core::eval::image_name_matches;
use cnnf_core::subjects::{self, Token};
use cnnf_proto::v1::envelope::Payload;
use cnnf_proto::v1::network_object::Kind as ObjectKind;
use cnnf_proto::v1::policy_server::Policy as PolicyService;
use cnnf_proto::v1::{
    policy_event, Envelope, ExportRequest, ExportResponse, GetPolicyRequest, ImportRequest, NetworkObject,
    PolicyCommand, PolicyCommandResult, PolicyEvent, PolicySnapshot, Workload,
};
use cnnf_store::{applied_sequence, ProjectionStore, StoreError};
use prost::Message as _;
use tonic::{Request, Response, Status};

use crate::compile;
use crate::conflicts;
use crate::document::{self, Parsed, PodInfo};
use crate::policy::{describe, Policy};
use crate::service::POLICY_DURABLE;
use crate::store;

/// Actor of a write that names none.
pub const DEFAULT_ACTOR: &str = "operator";
/// Header naming the subject filter of the expected-sequence check.
pub const EXPECTED_SUBJECT_HEADER: &str = "Nats-Expected-Last-Subject-Sequence-Subject";
/// How long a write waits for the store to reach its base revision.
const CATCH_UP: Duration = Duration::from_secs(10);

/// The API over the policy store.
pub struct PolicyApi {
    store: Arc<dyn ProjectionStore>,
    js: jetstream::Context,
    cluster: Token,
}

fn internal(error: impl std::fmt::Display) -> Status {
    Status::internal(error.to_string())
}

/// The committed policy and its revision.
pub fn snapshot(store: &dyn ProjectionStore) -> Result<(u64, Policy), StoreError> {
    let revision = applied_sequence(store, POLICY_DURABLE)?;
    let policy = compile::load_policy(store)?;
    Ok((revision, policy))
}

/// The addresses running containers of an image object hold.
pub fn placement(store: &dyn ProjectionStore) -> Result<Vec<Workload>, StoreError> {
    store
        .scan_prefix(store::CONTAINERS, b"", usize::MAX)?
        .into_iter()
        .map(|(_, value)| store::decode("workload", &value))
        .collect()
}

fn addresses_of(workloads: &[Workload], object: &NetworkObject) -> Vec<IpAddr> {
    if object.kind != ObjectKind::Image as i32 {
        return Vec::new();
    }
    workloads
        .iter()
        .filter(|workload| {
            if object.image_id.is_empty() {
                !object.image_name.is_empty() && image_name_matches(&object.image_name, &workload.image_name)
            } else {
                object.image_id == workload.image_id
            }
        })
        .flat_map(|workload| workload.addresses.iter().filter_map(|text| text.parse::<IpAddr>().ok()))
        .collect()
}

fn kind_token(change: &policy_event::Change) -> &'static str {
    match change {
        policy_event::Change::ObjectPut(_) | policy_event::Change::ObjectDeleted(_) => "object",
        policy_event::Change::RulePut(_) | policy_event::Change::RuleDeleted(_) => "rule",
        policy_event::Change::ModeSet(_) => "mode",
        policy_event::Change::Imported(_) => "import",
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x100_0000_01b3)
    })
}

impl PolicyApi {
    /// An API answering from `store` and publishing on `js` for `cluster`.
    pub fn new(store: Arc<dyn ProjectionStore>, js: jetstream::Context, cluster: Token) -> Self {
        Self { store, js, cluster }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&dyn ProjectionStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Status> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || work(store.as_ref()))
            .await
            .map_err(internal)?
            .map_err(internal)
    }

    /// The policy at exactly `expected`, waiting for the store to apply it.
    async fn at_revision(&self, expected: u64) -> Result<Policy, Status> {
        let started = Instant::now();
        loop {
            let (revision, policy) = self.blocking(snapshot).await?;
            if revision == expected {
                return Ok(policy);
            }
            if revision > expected {
                return Err(Status::aborted(format!(
                    "expected_revision {expected} is stale: the policy is at revision {revision}; read it again and retry"
                )));
            }
            if started.elapsed() > CATCH_UP {
                return Err(Status::aborted(format!(
                    "expected_revision {expected} is ahead of the policy (at revision {revision})"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Checks, finds conflicts, publishes; the new revision and warnings.
    async fn write(
        &self,
        expected: u64,
        actor: &str,
        change: policy_event::Change,
        path_prefix: Option<&str>,
    ) -> Result<PolicyCommandResult, Status> {
        let policy = self.at_revision(expected).await?;
        policy.check(&change).map_err(|problems| {
            let problems: Vec<_> = match path_prefix {
                Some(prefix) => problems.into_iter().map(|problem| problem.under(prefix)).collect(),
                None => problems,
            };
            Status::invalid_argument(describe(&problems))
        })?;
        let mut after = policy.clone();
        after.apply(&change);
        let changed: Vec<String> = match &change {
            policy_event::Change::RulePut(put) => put.rule.iter().map(|rule| rule.id.clone()).collect(),
            policy_event::Change::ObjectPut(put) => put
                .object
                .iter()
                .flat_map(|object| {
                    after
                        .rules
                        .values()
                        .filter(|rule| crate::policy::names_object(rule, &object.name))
                        .map(|rule| rule.id.clone())
                })
                .collect(),
            policy_event::Change::Imported(_) => after.rules.keys().cloned().collect(),
            _ => Vec::new(),
        };
        let warnings = if changed.is_empty() {
            Vec::new()
        } else {
            let workloads = self.blocking(placement).await?;
            let ids: Vec<&str> = changed.iter().map(String::as_str).collect();
            conflicts::conflicts(&after, &ids, &|object| addresses_of(&workloads, object))
        };
        let revision = self.publish(expected, actor, change).await?;
        Ok(PolicyCommandResult {
            revision,
            conflicts: warnings,
        })
    }

    async fn publish(&self, expected: u64, actor: &str, change: policy_event::Change) -> Result<u64, Status> {
        let kind = kind_token(&change);
        let event = PolicyEvent {
            revision: 0,
            actor: if actor.is_empty() {
                DEFAULT_ACTOR.to_owned()
            } else {
                actor.to_owned()
            },
            change: Some(change),
        };
        let digest = fnv(&PolicyEvent {
            actor: event.actor.clone(),
            ..event.clone()
        }
        .encode_to_vec());
        let id = format!("policy-api:{}:{expected}:{digest:016x}", self.cluster);
        let envelope = Envelope {
            schema_version: cnnf_proto::SCHEMA_VERSION,
            event_id: id.clone(),
            cluster: self.cluster.as_str().to_owned(),
            node: String::new(),
            time_unix_nanos: crate::now(),
            payload: Some(Payload::Policy(event)),
            ..Envelope::default()
        };
        let payload = cnnf_core::envelope::encode(envelope);
        if payload.len() > cnnf_core::envelope::DEFAULT_MAX_MESSAGE_BYTES {
            return Err(Status::invalid_argument(format!(
                "the change encodes to {} bytes; a policy event holds at most {} bytes",
                payload.len(),
                cnnf_core::envelope::DEFAULT_MAX_MESSAGE_BYTES
            )));
        }
        let subject = subjects::policy(&self.cluster, &Token::new("kind", kind).map_err(internal)?);
        let mut headers = HeaderMap::new();
        headers.insert(
            EXPECTED_SUBJECT_HEADER,
            format!("cnnf.policy.{}.*", self.cluster).as_str(),
        );
        let message = PublishMessage::build()
            .payload(payload.into())
            .message_id(&id)
            .headers(headers)
            .expected_last_subject_sequence(expected);
        let ack = self
            .js
            .send_publish(subject, message)
            .await
            .map_err(|error| Status::unavailable(format!("publishing the change: {error}")))?
            .await
            .map_err(|error| match error.kind() {
                PublishErrorKind::WrongLastSequence => Status::aborted(format!(
                    "expected_revision {expected} is stale: the policy changed meanwhile; read it again and retry"
                )),
                _ => Status::unavailable(format!("publishing the change: {error}")),
            })?;
        tracing::info!(message = "Policy change published.", kind, id = %id, revision = ack.sequence, expected);
        Ok(ack.sequence)
    }
}

#[tonic::async_trait]
impl PolicyService for PolicyApi {
    async fn apply(&self, request: Request<PolicyCommand>) -> Result<Response<PolicyCommandResult>, Status> {
        let actor = cnnf_service::actor::acting(
            &request,
            request.get_ref().change.as_ref().map_or("", |event| &event.actor),
        );
        let command = request.into_inner();
        let Some(event) = command.change else {
            return Err(Status::invalid_argument("change: required"));
        };
        let Some(change) = event.change else {
            return Err(Status::invalid_argument("change.change: required"));
        };
        let result = self.write(command.expected_revision, &actor, change, None).await?;
        Ok(Response::new(result))
    }

    async fn export(&self, request: Request<ExportRequest>) -> Result<Response<ExportResponse>, Status> {
        let request = request.into_inner();
        let (revision, policy, learned, pods) = self
            .blocking(|store| {
                let (revision, policy) = snapshot(store)?;
                let learned = compile::all_learned(store, &policy)?;
                let mut pods = BTreeMap::new();
                for (key, value) in store.scan_prefix(store::IMAGES, b"", usize::MAX)? {
                    let workload: Workload = store::decode("workload", &value)?;
                    pods.insert(
                        String::from_utf8_lossy(&key).into_owned(),
                        PodInfo {
                            image_name: workload.image_name,
                            labels: workload.labels.into_iter().collect(),
                            namespace: workload.namespace,
                        },
                    );
                }
                Ok((revision, policy, learned, pods))
            })
            .await?;
        let document = match request.format.as_str() {
            "" | "json" => {
                if request.rule_id.is_empty() {
                    document::export_policy(&policy, &learned)
                } else {
                    let rule = policy
                        .rules
                        .get(&request.rule_id)
                        .ok_or_else(|| Status::not_found(format!("rule_id: no rule {:?}", request.rule_id)))?;
                    document::export_rule(rule)
                }
            }
            "kubernetes" => {
                if !request.rule_id.is_empty() {
                    return Err(Status::invalid_argument(
                        "rule_id: the kubernetes format exports the whole learned policy only",
                    ));
                }
                document::kubernetes(&learned, &policy.objects, &pods).into_bytes()
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "format: {other:?} is not a format (json, kubernetes)"
                )))
            }
        };
        Ok(Response::new(ExportResponse { document, revision }))
    }

    async fn import(&self, request: Request<ImportRequest>) -> Result<Response<PolicyCommandResult>, Status> {
        let actor = cnnf_service::actor::acting(&request, &request.get_ref().actor);
        let request = request.into_inner();
        let change = match document::parse(&request.document) {
            Ok(Parsed::Policy(imported)) => policy_event::Change::Imported(imported),
            Ok(Parsed::Rule(rule)) => policy_event::Change::RulePut(policy_event::RulePut { rule: Some(rule) }),
            Err(error) => return Err(Status::invalid_argument(error.to_string())),
        };
        let result = self.write(request.expected_revision, &actor, change, Some("$")).await?;
        Ok(Response::new(result))
    }

    async fn get_policy(&self, _request: Request<GetPolicyRequest>) -> Result<Response<PolicySnapshot>, Status> {
        let (revision, policy) = self.blocking(snapshot).await?;
        Ok(Response::new(PolicySnapshot {
            revision,
            objects: policy.objects.into_values().collect(),
            rules: policy.rules.into_values().collect(),
            mode: policy.mode,
            host_mode: policy.host_mode,
        }))
    }
}
