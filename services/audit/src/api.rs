//! The `cnnf.v1.Audits` gRPC API.
//!
//! Queries (`ListAudits`, `WhoHeld`, `StateAt`) answer from the committed
//! store. `Tail` subscribes to the published audit subjects (core NATS,
//! filtered by subject where it can, by field where it cannot), so it shows
//! exactly what integrations receive. `Replay` and `Simulate` read the log
//! back ([`crate::forensics`], [`crate::simulate`]); a replay builds its
//! projection in a fresh temporary directory under the service's data
//! directory, removed when the answer is built.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use cnnf_proto::v1::audits_server::Audits;
use cnnf_proto::v1::{
    envelope::Payload, Audit, AuditFilter, Envelope, ListAuditsRequest, ListAuditsResponse, ReplayRequest,
    ReplayResponse, SimulateRequest, SimulateResponse, StateAtRequest, StateAtResponse, TailRequest, WhoHeldRequest,
    WhoHeldResponse,
};
use cnnf_store::ProjectionStore;
use futures::{Stream, StreamExt};
use prost::Message as _;
use tonic::{Request, Response, Status};

use crate::audit::verdict_name;
use crate::forensics::{self, ForensicsError, ReplaySpec};
use crate::index::{self, Query, QueryError};
use crate::projection::AuditSettings;
use crate::simulate::{self, CandidateJson};

/// Largest replay answer.
pub const MAX_REPLAY_AUDITS: usize = 100_000;

/// The API over the audit store.
pub struct AuditsApi {
    store: Arc<dyn ProjectionStore>,
    js: jetstream::Context,
    settings: AuditSettings,
    scratch: PathBuf,
    lateness: Duration,
}

impl AuditsApi {
    /// An API answering from `store`, reading the log on `js`; replays
    /// build their stores under `scratch`.
    pub fn new(
        store: Arc<dyn ProjectionStore>,
        js: jetstream::Context,
        settings: AuditSettings,
        scratch: PathBuf,
        lateness: Duration,
    ) -> Self {
        Self {
            store,
            js,
            settings,
            scratch,
            lateness,
        }
    }

    fn lateness(&self, seconds: u32) -> Duration {
        if seconds == 0 {
            self.lateness
        } else {
            Duration::from_secs(u64::from(seconds))
        }
    }
}

fn internal(error: impl std::fmt::Display) -> Status {
    Status::internal(error.to_string())
}

fn forensic(error: ForensicsError) -> Status {
    match error {
        ForensicsError::Invalid(message) => Status::invalid_argument(message),
        ForensicsError::Nats(message) => Status::unavailable(format!("nats: {message}")),
        ForensicsError::Store(error) => internal(error),
    }
}

/// The subject that carries every audit `filter` can match.
pub fn tail_subject(filter: &AuditFilter) -> Result<String, Status> {
    let token = |what: &'static str, value: &str| -> Result<String, Status> {
        if value.is_empty() {
            return Ok("*".to_owned());
        }
        cnnf_core::subjects::Token::new(what, value)
            .map(|token| token.to_string())
            .map_err(|error| Status::invalid_argument(format!("filter.{what}: {error}")))
    };
    let verdict = if filter.verdict == 0 {
        "*".to_owned()
    } else {
        verdict_name(filter.verdict).to_owned()
    };
    Ok(format!(
        "cnnf.audit.v1.{}.{}.{verdict}",
        token("cluster", &filter.cluster)?,
        token("node", &filter.node)?
    ))
}

/// The stream `Tail` answers with.
pub type TailStream = Pin<Box<dyn Stream<Item = Result<Audit, Status>> + Send>>;

#[tonic::async_trait]
impl Audits for AuditsApi {
    async fn list_audits(&self, request: Request<ListAuditsRequest>) -> Result<Response<ListAuditsResponse>, Status> {
        let request = request.into_inner();
        let query = Query {
            from: request.from_unix_nanos,
            to: (request.to_unix_nanos != 0).then_some(request.to_unix_nanos),
            filter: request.filter.unwrap_or_default(),
            page_size: request.page_size as usize,
            page_token: request.page_token,
        };
        let store = Arc::clone(&self.store);
        let page = tokio::task::spawn_blocking(move || index::list(store.as_ref(), &query))
            .await
            .map_err(internal)?
            .map_err(|error| match error {
                QueryError::Store(error) => internal(error),
                other => Status::invalid_argument(other.to_string()),
            })?;
        Ok(Response::new(ListAuditsResponse {
            audits: page.audits,
            next_page_token: page.next_page_token,
        }))
    }

    type TailStream = TailStream;

    async fn tail(&self, request: Request<TailRequest>) -> Result<Response<Self::TailStream>, Status> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let subject = tail_subject(&filter)?;
        let subscriber = self
            .js
            .client()
            .subscribe(subject)
            .await
            .map_err(|error| Status::unavailable(format!("subscribing: {error}")))?;
        let stream = subscriber.filter_map(move |message| {
            let audit = match Envelope::decode(message.payload.as_ref()) {
                Ok(Envelope {
                    payload: Some(Payload::Audit(audit)),
                    ..
                }) if index::matches(&filter, &audit) => Some(Ok(audit)),
                _ => None,
            };
            std::future::ready(audit)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn replay(&self, request: Request<ReplayRequest>) -> Result<Response<ReplayResponse>, Status> {
        let request = request.into_inner();
        let max_audits = match request.max_audits {
            0 => forensics::DEFAULT_MAX_AUDITS,
            max => (max as usize).min(MAX_REPLAY_AUDITS),
        };
        let spec = ReplaySpec {
            from: request.from_unix_nanos,
            to: request.to_unix_nanos,
            lateness: self.lateness(request.lateness_seconds),
            filter: request.filter.unwrap_or_default(),
            max_audits,
        };
        std::fs::create_dir_all(&self.scratch).map_err(internal)?;
        let dir = tempfile::Builder::new()
            .prefix("replay-")
            .tempdir_in(&self.scratch)
            .map_err(internal)?;
        let outcome = forensics::replay(&self.js, self.settings, dir.path(), &spec)
            .await
            .map_err(forensic)?;
        Ok(Response::new(ReplayResponse {
            audits: outcome.audits,
            incidents: outcome.incidents,
            messages_read: outcome.messages_read,
            decisions: outcome.decisions,
            truncated: outcome.truncated,
            from_unix_nanos: outcome.from,
            to_unix_nanos: outcome.to,
        }))
    }

    async fn who_held(&self, request: Request<WhoHeldRequest>) -> Result<Response<WhoHeldResponse>, Status> {
        let request = request.into_inner();
        let store = Arc::clone(&self.store);
        let holdings = tokio::task::spawn_blocking(move || {
            forensics::who_held(store.as_ref(), &request.address, request.at_unix_nanos)
        })
        .await
        .map_err(internal)?
        .map_err(forensic)?;
        Ok(Response::new(WhoHeldResponse { holdings }))
    }

    async fn state_at(&self, request: Request<StateAtRequest>) -> Result<Response<StateAtResponse>, Status> {
        let at = request.into_inner().at_unix_nanos;
        let store = Arc::clone(&self.store);
        let state = tokio::task::spawn_blocking(move || forensics::state_at(store.as_ref(), at))
            .await
            .map_err(internal)?
            .map_err(forensic)?;
        Ok(Response::new(state))
    }

    async fn simulate(&self, request: Request<SimulateRequest>) -> Result<Response<SimulateResponse>, Status> {
        let request = request.into_inner();
        let candidate = match request.candidate {
            Some(table) => table,
            None if !request.candidate_json.is_empty() => CandidateJson::parse(&request.candidate_json)
                .map_err(|error| Status::invalid_argument(error.to_string()))?,
            None => return Err(Status::invalid_argument("candidate: required (or candidate_json)")),
        };
        let report = simulate::simulate(
            &self.js,
            candidate,
            request.from_unix_nanos,
            request.to_unix_nanos,
            self.lateness(request.lateness_seconds),
        )
        .await
        .map_err(forensic)?;
        Ok(Response::new(report))
    }
}
