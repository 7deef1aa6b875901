//! The `cnnf.v1.Models` gRPC API: queries answered from the committed
//! model set, and operator commands.
//!
//! A command is validated against the committed model (unknown image,
//! missing or bad arguments, a model in the wrong state, a connection that
//! was never learned: a gRPC error saying what, nothing published) and
//! then published as a `ModelEvent` on `cnnf.model.<image>`. The state
//! changes when the models runner applies it from the log, like any other
//! change. Its id is derived from the model's revision and the command, so
//! a retried command is stored once. The answer is the published event,
//! its `revision` set to the stream sequence JetStream stored it at.
//!
//! The lists are paged (`page_size`, `page_token`): a fleet's models and
//! one image's learned connections can be far more than one answer should
//! carry. A token names the last key returned, so a page continues after
//! it however the table changed in between.

use std::sync::Arc;

use async_nats::jetstream;
use async_nats::jetstream::message::PublishMessage;
use cnnf_core::subjects::Token;
use cnnf_proto::v1::models_server::Models;
use cnnf_proto::v1::{
    model_command, model_event, Envelope, GetModelRequest, LearnedConnection, ListLearnedConnectionsRequest,
    ListLearnedConnectionsResponse, ListModelsRequest, ListModelsResponse, ModelCommand, ModelEvent, ModelSummary,
    Side,
};
use cnnf_store::ProjectionStore;
use prost::Message as _;
use tonic::{Request, Response, Status};

use crate::store::{self, ImageRecord, ModelRecord};

/// Longest extension of learning one command may ask for: one year.
pub const MAX_EXTEND_SECONDS: i64 = 366 * 24 * 3600;
/// Actor of a command that names none.
pub const DEFAULT_ACTOR: &str = "operator";

/// The API over the modeler store.
pub struct ModelsApi {
    store: Arc<dyn ProjectionStore>,
    js: jetstream::Context,
    cluster: String,
    learning_period_seconds: u64,
    clock: crate::RunOptions,
}

impl ModelsApi {
    /// An API answering from `store` and publishing commands on `js`.
    pub fn new(
        store: Arc<dyn ProjectionStore>,
        js: jetstream::Context,
        cluster: String,
        learning_period_seconds: u64,
        clock: crate::RunOptions,
    ) -> Self {
        Self {
            store,
            js,
            cluster,
            learning_period_seconds,
            clock,
        }
    }

    fn model(&self, image_id: &str) -> Result<ModelRecord, Status> {
        if image_id.is_empty() {
            return Err(Status::invalid_argument("image_id: required"));
        }
        let bytes = self
            .store
            .get(store::MODELS, image_id.as_bytes())
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("image_id: no model for image {image_id:?}")))?;
        store::decode("model", &bytes).map_err(internal)
    }

    fn summary(&self, image_id: &str, record: &ModelRecord) -> Result<ModelSummary, Status> {
        let image = match self.store.get(store::IMAGES, image_id.as_bytes()).map_err(internal)? {
            Some(bytes) => store::decode::<ImageRecord>("image", &bytes).map_err(internal)?,
            None => ImageRecord::default(),
        };
        let containers = image.containers.len();
        Ok(ModelSummary {
            image_id: image_id.to_owned(),
            image_name: record.image_name.clone(),
            state: record.state,
            container_count: u32::try_from(containers).unwrap_or(u32::MAX),
            inbound_count: record.inbound_count,
            outbound_count: record.outbound_count,
            learning_ends_unix_nanos: record.learning_ends_unix_nanos,
            revision: record.revision,
            namespaces: image.running_namespaces(),
        })
    }

    /// Checks `command` against the committed model; the change to publish.
    fn validate(&self, command: &ModelCommand) -> Result<(model_event::Change, String), Status> {
        Token::new("image_id", &command.image_id).map_err(|error| Status::invalid_argument(error.to_string()))?;
        let record = self.model(&command.image_id)?;
        let kind = command.command.as_ref().ok_or_else(|| {
            Status::invalid_argument(
                "command: one of lock_now, extend_by_seconds, relearn, delete_connection is required",
            )
        })?;
        let not_learning = || {
            Status::failed_precondition(format!(
                "image {}: the model already enforces; relearn it to learn again",
                command.image_id
            ))
        };
        Ok(match kind {
            model_command::Command::LockNow(lock) => {
                if !lock {
                    return Err(Status::invalid_argument("lock_now: must be true"));
                }
                if !record.learning() {
                    return Err(not_learning());
                }
                (
                    model_event::Change::Locked(model_event::Locked {
                        reason: "operator".to_owned(),
                    }),
                    "lock".to_owned(),
                )
            }
            model_command::Command::ExtendBySeconds(seconds) => {
                if *seconds <= 0 || *seconds > MAX_EXTEND_SECONDS {
                    return Err(Status::invalid_argument(format!(
                        "extend_by_seconds: {seconds} is out of range 1..={MAX_EXTEND_SECONDS}"
                    )));
                }
                if !record.learning() {
                    return Err(not_learning());
                }
                let ends = record
                    .learning_ends_unix_nanos
                    .max(self.clock.now())
                    .saturating_add(seconds.saturating_mul(1_000_000_000));
                (
                    model_event::Change::Extended(model_event::LearningExtended {
                        learning_ends_unix_nanos: ends,
                    }),
                    format!("extend:{seconds}"),
                )
            }
            model_command::Command::Relearn(relearn) => {
                if !relearn {
                    return Err(Status::invalid_argument("relearn: must be true"));
                }
                let period = i64::try_from(self.learning_period_seconds)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(1_000_000_000);
                (
                    model_event::Change::Relearn(model_event::Relearn {
                        learning_ends_unix_nanos: self.clock.now().saturating_add(period),
                    }),
                    "relearn".to_owned(),
                )
            }
            model_command::Command::DeleteConnection(connection) => {
                if !store::valid_side(connection.side) {
                    return Err(Status::invalid_argument(
                        "delete_connection.side: SIDE_INBOUND or SIDE_OUTBOUND is required",
                    ));
                }
                let peer = connection
                    .peer
                    .as_ref()
                    .filter(|peer| !peer.id.is_empty())
                    .ok_or_else(|| {
                        Status::invalid_argument("delete_connection.peer: an identity with kind and id is required")
                    })?;
                let key = store::learned_key(&command.image_id, connection);
                let stored = self.store.get(store::LEARNED, &key).map_err(internal)?.ok_or_else(|| {
                    Status::not_found(format!(
                        "delete_connection: image {} has no learned {} connection with {:?} on port {} protocol {}",
                        command.image_id,
                        side_name(connection.side),
                        peer.id,
                        connection.port,
                        connection.protocol
                    ))
                })?;
                let stored: LearnedConnection = store::decode("learned connection", &stored).map_err(internal)?;
                (
                    model_event::Change::ConnectionDeleted(model_event::ConnectionDeleted {
                        connection: Some(stored),
                    }),
                    format!("delete:{}", hex(&key)),
                )
            }
        })
        .map(|(change, what)| {
            (
                change,
                format!("modeler-command:{}:{}:{what}", command.image_id, record.revision),
            )
        })
    }
}

fn side_name(side: i32) -> &'static str {
    if side == Side::Inbound as i32 {
        "inbound"
    } else {
        "outbound"
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn internal(error: impl std::fmt::Display) -> Status {
    tracing::error!(message = "Model query failed.", %error);
    Status::internal(format!("models: {error}"))
}

/// Answers of one page: `page_size` 0 takes this many.
pub const DEFAULT_PAGE_SIZE: usize = 1000;
/// Most entries in one page.
pub const MAX_PAGE_SIZE: usize = 10_000;

/// The page size a request asks for.
fn page_size(requested: u32) -> usize {
    match usize::try_from(requested).unwrap_or(MAX_PAGE_SIZE) {
        0 => DEFAULT_PAGE_SIZE,
        size => size.min(MAX_PAGE_SIZE),
    }
}

/// A page token: `<kind>:<hex of the last key returned>`. Opaque to
/// callers; the next page starts after that key, so entries written or
/// deleted meanwhile neither shift nor repeat the ones already listed.
fn page_token(kind: &str, last_key: &[u8]) -> String {
    format!("{kind}:{}", hex(last_key))
}

/// The key a page token names, checked to be a `kind` token under `prefix`.
fn page_start(kind: &str, token: &str, prefix: &[u8]) -> Result<Option<Vec<u8>>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || Status::invalid_argument("page_token: not a page token of this list (pass next_page_token unchanged)");
    let hex_key = token
        .strip_prefix(kind)
        .and_then(|rest| rest.strip_prefix(':'))
        .ok_or_else(bad)?;
    if hex_key.len() % 2 != 0 {
        return Err(bad());
    }
    let key = (0..hex_key.len())
        .step_by(2)
        .map(|at| {
            hex_key
                .get(at..at + 2)
                .and_then(|byte| u8::from_str_radix(byte, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)?;
    if !key.starts_with(prefix) {
        return Err(bad());
    }
    Ok(Some(key))
}

/// One page of `table` under `prefix` after the key of `token`: up to
/// `size` entries `keep` accepts (decoded by it), and the next token.
///
/// The store answers prefix scans from the start of the prefix only, so a
/// page costs a scan up to its end (cheap at the sizes one image or one
/// fleet's model table reach); the token still makes the pages stable.
fn page<T>(
    store: &dyn ProjectionStore,
    table: &'static str,
    prefix: &[u8],
    kind: &str,
    token: &str,
    size: usize,
    mut keep: impl FnMut(&[u8], &[u8]) -> Result<Option<T>, Status>,
) -> Result<(Vec<T>, String), Status> {
    let start = page_start(kind, token, prefix)?;
    let mut out = Vec::new();
    let mut last: Option<Vec<u8>> = None;
    for (key, value) in store.scan_prefix(table, prefix, usize::MAX).map_err(internal)? {
        if start.as_ref().is_some_and(|start| key <= *start) {
            continue;
        }
        let Some(item) = keep(&key, &value)? else {
            continue;
        };
        if out.len() == size {
            // One more matches: there is a next page.
            let next = last.map(|last| page_token(kind, &last)).unwrap_or_default();
            return Ok((out, next));
        }
        out.push(item);
        last = Some(key);
    }
    Ok((out, String::new()))
}

#[tonic::async_trait]
impl Models for ModelsApi {
    async fn list_models(&self, request: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        let request = request.into_inner();
        let (models, next_page_token) = page(
            self.store.as_ref(),
            store::MODELS,
            b"",
            "models",
            &request.page_token,
            page_size(request.page_size),
            |key, value| {
                let record: ModelRecord = store::decode("model", value).map_err(internal)?;
                self.summary(&String::from_utf8_lossy(key), &record).map(Some)
            },
        )?;
        Ok(Response::new(ListModelsResponse {
            models,
            next_page_token,
        }))
    }

    async fn get_model(&self, request: Request<GetModelRequest>) -> Result<Response<ModelSummary>, Status> {
        let image_id = request.into_inner().image_id;
        let record = self.model(&image_id)?;
        Ok(Response::new(self.summary(&image_id, &record)?))
    }

    async fn list_learned_connections(
        &self,
        request: Request<ListLearnedConnectionsRequest>,
    ) -> Result<Response<ListLearnedConnectionsResponse>, Status> {
        let request = request.into_inner();
        self.model(&request.image_id)?;
        if request.side != 0 && !store::valid_side(request.side) {
            return Err(Status::invalid_argument(format!(
                "side: {} is not a side",
                request.side
            )));
        }
        let (connections, next_page_token) = page(
            self.store.as_ref(),
            store::LEARNED,
            &store::image_prefix(&request.image_id),
            "learned",
            &request.page_token,
            page_size(request.page_size),
            |_, value| {
                let connection: LearnedConnection = store::decode("learned connection", value).map_err(internal)?;
                let keep = (request.side == 0 || connection.side == request.side)
                    && (request.port == 0 || connection.port == request.port)
                    && (request.peer_id.is_empty()
                        || connection.peer.as_ref().is_some_and(|peer| peer.id == request.peer_id));
                Ok(keep.then_some(connection))
            },
        )?;
        Ok(Response::new(ListLearnedConnectionsResponse {
            connections,
            next_page_token,
        }))
    }

    async fn command(&self, request: Request<ModelCommand>) -> Result<Response<ModelEvent>, Status> {
        let actor = cnnf_service::actor::acting(&request, &request.get_ref().actor);
        let command = request.into_inner();
        let (change, id) = self.validate(&command)?;
        let actor = if actor.is_empty() {
            DEFAULT_ACTOR.to_owned()
        } else {
            actor
        };
        let mut event = ModelEvent {
            image_id: command.image_id.clone(),
            revision: 0,
            actor,
            change: Some(change),
        };
        let time = self.clock.now();
        let message = crate::projection::model_envelope(&self.cluster, &id, time, event.clone())
            .map_err(|error| Status::invalid_argument(error.to_string()))?;
        debug_assert!(Envelope::decode(message.payload.as_slice()).is_ok());
        let ack = self
            .js
            .send_publish(
                message.subject.clone(),
                PublishMessage::build()
                    .payload(message.payload.into())
                    .message_id(&message.id),
            )
            .await
            .map_err(|error| Status::unavailable(format!("publishing the command: {error}")))?
            .await
            .map_err(|error| Status::unavailable(format!("publishing the command: {error}")))?;
        event.revision = ack.sequence;
        tracing::info!(message = "Model command published.", image = %command.image_id, id = %message.id, sequence = ack.sequence);
        Ok(Response::new(event))
    }
}
