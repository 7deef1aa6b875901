//! JSON over HTTP: every unary method of the four services as
//! `POST /api/v1/<Service>/<Method>` with the request message in proto3
//! JSON (an empty body is the empty message), answered with the response
//! message in proto3 JSON. Also `DELETE /api/v1/models/<image>/learned`,
//! the Radar page's "delete this learned edge".
//!
//! Errors are `{"error": {"code", "message"}}` with 400 (bad JSON), 401,
//! 403, 404 (unknown method), 409 (revision moved), 503 (service down) or
//! the status the service's gRPC code maps to.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use cnnf_proto::v1::audits_client::AuditsClient;
use cnnf_proto::v1::identity_registry_client::IdentityRegistryClient;
use cnnf_proto::v1::models_client::ModelsClient;
use cnnf_proto::v1::policy_client::PolicyClient;
use cnnf_proto::v1::{self as pb, model_command};

use crate::auth::Caller;
use crate::roles::{self, Service};
use crate::server::{json_error, ClientCn, Gateway};

/// A request body that is not the expected message (answered with 400).
#[derive(Debug)]
pub struct BadRequest(String);

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        json_error(StatusCode::BAD_REQUEST, "invalid_argument", &self.0)
    }
}

/// Parses a request body as proto3 JSON (empty: the default message).
fn parse<M: serde::de::DeserializeOwned + Default>(what: &str, body: &Bytes) -> Result<M, BadRequest> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(M::default());
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer)
        .map_err(|error| BadRequest(format!("{what}: invalid JSON at {}: {}", error.path(), error.inner())))
}

/// The HTTP answer for a gRPC status from a service.
pub fn status_response(status: &tonic::Status) -> Response {
    use tonic::Code;
    let http = match status.code() {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::BAD_GATEWAY,
    };
    let code = format!("{:?}", status.code()).to_ascii_lowercase();
    json_error(http, &code, status.message())
}

fn answer<M: serde::Serialize>(result: Result<tonic::Response<M>, tonic::Status>) -> Response {
    match result {
        Ok(response) => Json(response.into_inner()).into_response(),
        Err(status) => status_response(&status),
    }
}

fn request<M>(caller: &Caller, message: M) -> tonic::Request<M> {
    let mut request = tonic::Request::new(message);
    if let Ok(actor) = caller.name.parse() {
        request.metadata_mut().insert(cnnf_service::actor::ACTOR_HEADER, actor);
    }
    request
}

macro_rules! unary {
    ($client:expr, $method:ident, $ty:ty, $what:expr, $body:expr, $caller:expr) => {{
        let message: $ty = match parse($what, $body) {
            Ok(message) => message,
            Err(error) => return error.into_response(),
        };
        answer($client.$method(request($caller, message)).await)
    }};
}

/// `POST /api/v1/<Service>/<Method>`.
pub async fn call(
    State(gateway): State<Gateway>,
    Extension(cn): Extension<ClientCn>,
    Path((service_name, method)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let what = format!("{service_name}/{method}");
    let Some(service) = Service::from_name(&service_name) else {
        return json_error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("unknown service {service_name:?}: use IdentityRegistry, Models, Policy or Audits"),
        );
    };
    let needed = roles::required_role(service, &method);
    let caller = match gateway.authorize(&headers, &cn, needed) {
        Ok(caller) => caller,
        Err(denied) => return denied.http(),
    };
    let channels = &gateway.channels;
    match (service, method.as_str()) {
        (Service::IdentityRegistry, "LookupAddress") => {
            let mut client = IdentityRegistryClient::new(channels.ingest.clone());
            unary!(client, lookup_address, pb::LookupAddressRequest, &what, &body, &caller)
        }
        (Service::IdentityRegistry, "AddressesOfImage") => {
            let mut client = IdentityRegistryClient::new(channels.ingest.clone());
            unary!(
                client,
                addresses_of_image,
                pb::AddressesOfImageRequest,
                &what,
                &body,
                &caller
            )
        }
        (Service::Models, "ListModels") => {
            let mut client = ModelsClient::new(channels.modeler.clone());
            unary!(client, list_models, pb::ListModelsRequest, &what, &body, &caller)
        }
        (Service::Models, "GetModel") => {
            let mut client = ModelsClient::new(channels.modeler.clone());
            unary!(client, get_model, pb::GetModelRequest, &what, &body, &caller)
        }
        (Service::Models, "ListLearnedConnections") => {
            let mut client = ModelsClient::new(channels.modeler.clone());
            unary!(
                client,
                list_learned_connections,
                pb::ListLearnedConnectionsRequest,
                &what,
                &body,
                &caller
            )
        }
        (Service::Models, "Command") => {
            let mut command: pb::ModelCommand = match parse(&what, &body) {
                Ok(command) => command,
                Err(error) => return error.into_response(),
            };
            if command.actor.is_empty() {
                command.actor = caller.name.clone();
            }
            let mut client = ModelsClient::new(channels.modeler.clone());
            answer(client.command(request(&caller, command)).await)
        }
        (Service::Policy, "Apply") => {
            let mut command: pb::PolicyCommand = match parse(&what, &body) {
                Ok(command) => command,
                Err(error) => return error.into_response(),
            };
            // Mode changes need more than the method's base role.
            if let Err(denied) = gateway.authorize(&headers, &cn, roles::policy_apply_role(&command)) {
                return denied.http();
            }
            if let Some(event) = command.change.as_mut() {
                if event.actor.is_empty() {
                    event.actor = caller.name.clone();
                }
            }
            let mut client = PolicyClient::new(channels.policy.clone());
            answer(client.apply(request(&caller, command)).await)
        }
        (Service::Policy, "Export") => {
            let mut client = PolicyClient::new(channels.policy.clone());
            unary!(client, export, pb::ExportRequest, &what, &body, &caller)
        }
        (Service::Policy, "Import") => {
            let mut import: pb::ImportRequest = match parse(&what, &body) {
                Ok(import) => import,
                Err(error) => return error.into_response(),
            };
            if import.actor.is_empty() {
                import.actor = caller.name.clone();
            }
            let mut client = PolicyClient::new(channels.policy.clone());
            answer(client.import(request(&caller, import)).await)
        }
        (Service::Policy, "GetPolicy") => {
            let mut client = PolicyClient::new(channels.policy.clone());
            unary!(client, get_policy, pb::GetPolicyRequest, &what, &body, &caller)
        }
        (Service::Audits, "ListAudits") => {
            let mut client = AuditsClient::new(channels.audit.clone());
            unary!(client, list_audits, pb::ListAuditsRequest, &what, &body, &caller)
        }
        (Service::Audits, "Replay") => {
            let mut client = AuditsClient::new(channels.audit.clone());
            unary!(client, replay, pb::ReplayRequest, &what, &body, &caller)
        }
        (Service::Audits, "WhoHeld") => {
            let mut client = AuditsClient::new(channels.audit.clone());
            unary!(client, who_held, pb::WhoHeldRequest, &what, &body, &caller)
        }
        (Service::Audits, "StateAt") => {
            let mut client = AuditsClient::new(channels.audit.clone());
            unary!(client, state_at, pb::StateAtRequest, &what, &body, &caller)
        }
        (Service::Audits, "Simulate") => {
            let mut client = AuditsClient::new(channels.audit.clone());
            unary!(client, simulate, pb::SimulateRequest, &what, &body, &caller)
        }
        (Service::Audits, "Tail") => json_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "Audits/Tail streams: use gRPC, or GET /api/v1/radar/stream for live updates",
        ),
        _ => json_error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("{what} is not a unary method of the JSON API"),
        ),
    }
}

/// `DELETE /api/v1/models/<image>/learned` with a learned connection (proto3
/// JSON of `LearnedConnection`: side, peer, port, protocol) as the body:
/// deletes it from the image's model (`Models/Command`, operator role) and
/// answers with the resulting `ModelEvent`.
pub async fn delete_learned(
    State(gateway): State<Gateway>,
    Extension(cn): Extension<ClientCn>,
    Path(image): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let caller = match gateway.authorize(&headers, &cn, roles::required_role(Service::Models, "Command")) {
        Ok(caller) => caller,
        Err(denied) => return denied.http(),
    };
    let connection: pb::LearnedConnection = match parse("learned connection", &body) {
        Ok(connection) => connection,
        Err(error) => return error.into_response(),
    };
    if connection.peer.is_none() {
        return json_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "learned connection: `peer` is missing (`side`, `peer`, `port` and `protocol` name the connection)",
        );
    }
    let command = pb::ModelCommand {
        image_id: image,
        actor: caller.name.clone(),
        command: Some(model_command::Command::DeleteConnection(connection)),
    };
    let mut client = ModelsClient::new(gateway.channels.modeler.clone());
    answer(client.command(request(&caller, command)).await)
}
