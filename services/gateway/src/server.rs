//! The listener, the routes and the gRPC pass-through.
//!
//! One port serves HTTP/1.1 and HTTP/2 (cleartext, or TLS when configured).
//! gRPC requests are recognised by their path (`/cnnf.v1.<Service>/...`),
//! authenticated, checked against the role table and forwarded over a
//! shared HTTP/2 client to the owning service; request and response bodies
//! (and trailers) stream through unchanged, so server streaming such as
//! `Audits/Tail` works. The caller's token is removed before forwarding and
//! the caller's name is passed as `x-cnnf-actor`.

use std::path::{Component, Path as FsPath, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use cnnf_service::grpc::upstream::{self, Upstream};
use http_body_util::BodyExt as _;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::transport::{Channel, Endpoint};
use tower::ServiceExt as _;

use crate::auth::{AuthError, Caller, Credentials, Role};
use crate::roles::{self, Service};
use crate::{api, radar, Settings, Upstreams};

/// Largest unary request the gateway buffers to look inside (`Policy/Apply`).
const MAX_PEEK_BYTES: usize = 4 << 20;

/// Longest a JSON API or Radar call to a service may take.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The subject CN of the connection's client certificate, if any.
#[derive(Debug, Clone, Default)]
pub struct ClientCn(pub Option<String>);

/// The gRPC services behind the gateway: where each is and the HTTP/2
/// client of the pass-through to it.
#[derive(Debug, Clone)]
pub struct Backends {
    /// Ingest.
    pub ingest: Backend,
    /// The modeler.
    pub modeler: Backend,
    /// Policy.
    pub policy: Backend,
    /// Audit.
    pub audit: Backend,
}

/// One service behind the gateway.
#[derive(Clone)]
pub struct Backend {
    /// Its address (`unix:`, `https://` or `http://`).
    pub upstream: Upstream,
    /// HTTP/2 client of the pass-through, connecting to that address only.
    client: Client<Upstream, Body>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

impl Backend {
    fn new(upstream: Upstream) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(upstream.clone());
        Self { upstream, client }
    }
}

impl Backends {
    /// The service owning `service`.
    pub fn of(&self, service: Service) -> &Backend {
        match service {
            Service::IdentityRegistry => &self.ingest,
            Service::Models => &self.modeler,
            Service::Policy => &self.policy,
            Service::Audits => &self.audit,
        }
    }
}

/// Lazily connected tonic channels to the services (for the JSON API and Radar).
#[derive(Debug, Clone)]
pub struct Channels {
    /// Ingest.
    pub ingest: Channel,
    /// Modeler.
    pub modeler: Channel,
    /// Policy.
    pub policy: Channel,
    /// Audit.
    pub audit: Channel,
}

/// Everything a request handler needs; cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    /// Tokens and client certificates in force.
    pub credentials: Credentials,
    /// Where the services are, and the pass-through's clients to them.
    pub backends: Arc<Backends>,
    /// Channels for the JSON API and Radar.
    pub channels: Channels,
    /// Radar graph building and change notifications.
    pub radar: radar::Radar,
    static_dir: Option<Arc<PathBuf>>,
}

fn channel(upstream: &Upstream) -> Channel {
    upstream.channel(
        Endpoint::from_static(upstream::ORIGIN)
            .connect_timeout(std::time::Duration::from_secs(3))
            .timeout(CALL_TIMEOUT),
    )
}

impl Gateway {
    /// A gateway for `config` with these credentials, in front of the
    /// services at `upstreams`; connects nothing yet.
    pub fn new(config: &Settings, upstreams: &Upstreams, credentials: Credentials) -> anyhow::Result<Self> {
        let resolved = upstreams.resolve()?;
        let channels = Channels {
            ingest: channel(&resolved.ingest),
            modeler: channel(&resolved.modeler),
            policy: channel(&resolved.policy),
            audit: channel(&resolved.audit),
        };
        let backends = Backends {
            ingest: Backend::new(resolved.ingest),
            modeler: Backend::new(resolved.modeler),
            policy: Backend::new(resolved.policy),
            audit: Backend::new(resolved.audit),
        };
        let radar = radar::Radar::new(
            channels.clone(),
            std::time::Duration::from_secs(config.radar_audit_window_seconds),
        );
        Ok(Self {
            credentials,
            backends: Arc::new(backends),
            channels,
            radar,
            static_dir: config.static_dir.clone().map(Arc::new),
        })
    }

    /// Authenticates a request and checks it may do what needs `needed`.
    pub fn authorize(&self, headers: &HeaderMap, cn: &ClientCn, needed: Role) -> Result<Caller, Denied> {
        let caller = self
            .credentials
            .authenticate(
                headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes),
                cn.0.as_deref(),
            )
            .map_err(Denied::Unauthenticated)?;
        if caller.role < needed {
            tracing::info!(message = "Call refused.", caller = %caller.name, role = %caller.role, needed = %needed);
            return Err(Denied::Forbidden { caller, needed });
        }
        Ok(caller)
    }

    /// The routes of the operator address.
    pub fn router(self) -> Router {
        Router::new()
            .route("/api/v1/radar", get(radar::get_graph))
            .route("/api/v1/radar/stream", get(radar::stream))
            .route("/api/v1/whoami", get(whoami))
            .route("/api/v1/models/{image}/learned", delete(api::delete_learned))
            .route("/api/v1/{service}/{method}", post(api::call))
            .fallback(fallback)
            .with_state(self)
    }
}

/// Why a call is refused before it reaches a service.
#[derive(Debug)]
pub enum Denied {
    /// No valid credentials.
    Unauthenticated(AuthError),
    /// Valid credentials, too small a role.
    Forbidden {
        /// Who called.
        caller: Caller,
        /// The role the call needs.
        needed: Role,
    },
}

impl Denied {
    /// The message returned to the caller.
    pub fn message(&self) -> String {
        match self {
            Denied::Unauthenticated(error) => format!("unauthenticated: {error}"),
            Denied::Forbidden { caller, needed } => format!(
                "permission denied: this call needs role {needed}; {} has role {}",
                caller.name, caller.role
            ),
        }
    }

    /// As a gRPC status.
    pub fn grpc(&self) -> tonic::Status {
        match self {
            Denied::Unauthenticated(_) => tonic::Status::unauthenticated(self.message()),
            Denied::Forbidden { .. } => tonic::Status::permission_denied(self.message()),
        }
    }

    /// As an HTTP answer with a JSON error body (401 or 403).
    pub fn http(&self) -> Response {
        let (status, code) = match self {
            Denied::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            Denied::Forbidden { .. } => (StatusCode::FORBIDDEN, "permission_denied"),
        };
        json_error(status, code, &self.message())
    }
}

/// A JSON error answer: `{"error": {"code": ..., "message": ...}}`.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    let mut response = (status, Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

/// `GET /api/v1/whoami`: the caller's name and role, for any valid
/// credentials. The Radar page uses it to offer only what the caller may do;
/// every call is still checked on its own.
async fn whoami(State(gateway): State<Gateway>, Extension(cn): Extension<ClientCn>, headers: HeaderMap) -> Response {
    match gateway.authorize(&headers, &cn, Role::Viewer) {
        Ok(caller) => Json(serde_json::json!({ "name": caller.name, "role": caller.role.to_string() })).into_response(),
        Err(denied) => denied.http(),
    }
}

fn grpc_error(status: tonic::Status) -> Response {
    status.into_http::<Body>()
}

async fn fallback(State(gateway): State<Gateway>, Extension(cn): Extension<ClientCn>, request: Request) -> Response {
    let path = request.uri().path().to_owned();
    if path.starts_with("/cnnf.v1.") || is_grpc(request.headers()) {
        return grpc_proxy(gateway, cn, request).await;
    }
    if request.method() != axum::http::Method::GET && request.method() != axum::http::Method::HEAD {
        return json_error(StatusCode::NOT_FOUND, "not_found", &format!("no route for {path}"));
    }
    static_file(gateway.static_dir.as_deref().map(PathBuf::as_path), &path).await
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

async fn grpc_proxy(gateway: Gateway, cn: ClientCn, request: Request) -> Response {
    let path = request.uri().path().to_owned();
    let Some((service, method)) = Service::from_grpc_path(&path) else {
        return grpc_error(tonic::Status::unimplemented(format!(
            "{path} is not served here: the gateway serves cnnf.v1.Policy, Models, Audits and IdentityRegistry"
        )));
    };
    let mut needed = roles::required_role(service, method);
    let (mut parts, body) = request.into_parts();
    // Authenticate before reading anything of the body.
    if let Err(denied) = gateway.authorize(&parts.headers, &cn, needed) {
        return grpc_error(denied.grpc());
    }
    let body = if service == Service::Policy && method == "Apply" {
        let bytes = match http_body_util::Limited::new(body, MAX_PEEK_BYTES).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) => {
                return grpc_error(tonic::Status::invalid_argument(format!(
                    "Policy/Apply request unreadable or over {MAX_PEEK_BYTES} bytes: {error}"
                )))
            }
        };
        match decode_unary::<cnnf_proto::v1::PolicyCommand>(&bytes) {
            Ok(command) => needed = roles::policy_apply_role(&command),
            Err(message) => return grpc_error(tonic::Status::invalid_argument(format!("Policy/Apply: {message}"))),
        }
        Body::from(bytes)
    } else {
        body
    };
    let caller = match gateway.authorize(&parts.headers, &cn, needed) {
        Ok(caller) => caller,
        Err(denied) => return grpc_error(denied.grpc()),
    };
    let backend = gateway.backends.of(service);
    let target = format!(
        "{}{}",
        upstream::ORIGIN,
        parts.uri.path_and_query().map(|pq| pq.as_str()).unwrap_or(&path)
    );
    parts.uri = match target.parse::<Uri>() {
        Ok(uri) => uri,
        Err(error) => return grpc_error(tonic::Status::internal(format!("backend URI {target:?}: {error}"))),
    };
    parts.version = axum::http::Version::HTTP_2;
    parts.headers.remove(header::AUTHORIZATION);
    parts.headers.remove(header::HOST);
    if let Ok(actor) = HeaderValue::from_str(&caller.name) {
        parts.headers.insert(cnnf_service::actor::ACTOR_HEADER, actor);
    }
    let upstream = &backend.upstream;
    tracing::debug!(message = "Forwarding gRPC call.", caller = %caller.name, %path, %upstream);
    match backend
        .client
        .request(axum::http::Request::from_parts(parts, body))
        .await
    {
        Ok(response) => response.map(Body::new),
        Err(error) => {
            let error = error_chain(&error);
            tracing::warn!(message = "Backend unreachable.", %path, %upstream, %error);
            grpc_error(tonic::Status::unavailable(format!(
                "{upstream} is unreachable: {error}"
            )))
        }
    }
}

/// An error and its causes on one line (hyper's own message alone says
/// only "client error (Connect)").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}

/// Decodes one uncompressed gRPC frame holding a `M`.
fn decode_unary<M: prost::Message + Default>(bytes: &[u8]) -> Result<M, String> {
    if bytes.len() < 5 {
        return Err("truncated gRPC frame".to_owned());
    }
    if bytes[0] != 0 {
        return Err("compressed requests are not accepted for this method".to_owned());
    }
    let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    let message = bytes.get(5..5 + len).ok_or("gRPC frame shorter than its length")?;
    if bytes.len() != 5 + len {
        return Err("more than one message in a unary request".to_owned());
    }
    M::decode(message).map_err(|error| format!("undecodable request: {error}"))
}

/// The page shown when no Radar page is installed.
const PLACEHOLDER: &str = "<!doctype html><html><head><meta charset=\"utf-8\"><title>CNNF</title></head>\
<body><h1>CNNF operator gateway</h1><p>The Radar page is not installed here yet. \
The graph is available as JSON at <code>/api/v1/radar</code> and as a live stream at \
<code>/api/v1/radar/stream</code> (bearer token needed).</p></body></html>";

fn content_type(path: &FsPath) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("wasm") => "application/wasm",
        _ => "application/octet-stream",
    }
}

async fn static_file(dir: Option<&FsPath>, path: &str) -> Response {
    let relative = path.trim_start_matches('/');
    let relative = if relative.is_empty() { "index.html" } else { relative };
    let relative = FsPath::new(relative);
    if relative.components().any(|c| !matches!(c, Component::Normal(_))) {
        return json_error(
            StatusCode::BAD_REQUEST,
            "bad_path",
            "path must not leave the page's directory",
        );
    }
    let Some(dir) = dir.filter(|dir| dir.is_dir()) else {
        if relative == FsPath::new("index.html") {
            return ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PLACEHOLDER).into_response();
        }
        return json_error(StatusCode::NOT_FOUND, "not_found", "no Radar page installed");
    };
    let file = dir.join(relative);
    match tokio::fs::read(&file).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, content_type(&file))], Bytes::from(bytes)).into_response(),
        Err(_) => json_error(StatusCode::NOT_FOUND, "not_found", &format!("{path} not found")),
    }
}

/// Accepts connections until `shutdown`; each connection gets HTTP/1.1 or
/// HTTP/2 as the client speaks (ALPN under TLS).
pub async fn serve(
    listener: tokio::net::TcpListener,
    gateway: Gateway,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let router = gateway.router();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(message = "Accept failed.", %error);
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let router = router.clone();
        let acceptor = acceptor.clone();
        connections.spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let result = match acceptor {
                None => {
                    let service = router.layer(Extension(ClientCn::default()));
                    let service = hyper_util::service::TowerToHyperService::new(
                        service
                            .map_request(|request: axum::http::Request<hyper::body::Incoming>| request.map(Body::new)),
                    );
                    builder.serve_connection(TokioIo::new(tcp), service).await
                }
                Some(acceptor) => {
                    let stream = match acceptor.accept(tcp).await {
                        Ok(stream) => stream,
                        Err(error) => {
                            tracing::debug!(message = "TLS handshake failed.", %peer, %error);
                            return;
                        }
                    };
                    let cn = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .and_then(|cert| crate::tls::subject_common_name(cert));
                    let service = router.layer(Extension(ClientCn(cn)));
                    let service = hyper_util::service::TowerToHyperService::new(
                        service
                            .map_request(|request: axum::http::Request<hyper::body::Incoming>| request.map(Body::new)),
                    );
                    builder.serve_connection(TokioIo::new(stream), service).await
                }
            };
            if let Err(error) = result {
                tracing::debug!(message = "Connection ended with an error.", %peer, %error);
            }
        });
    }
    connections.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn unary_frames_decode_and_bad_ones_are_refused() {
        let command = cnnf_proto::v1::PolicyCommand {
            expected_revision: 7,
            change: None,
        };
        let message = command.encode_to_vec();
        let mut frame = vec![0u8];
        frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
        frame.extend_from_slice(&message);
        assert_eq!(decode_unary::<cnnf_proto::v1::PolicyCommand>(&frame).unwrap(), command);
        assert!(decode_unary::<cnnf_proto::v1::PolicyCommand>(&frame[..3]).is_err());
        let mut long = frame.clone();
        long.push(0);
        assert!(decode_unary::<cnnf_proto::v1::PolicyCommand>(&long).is_err());
        frame[0] = 1;
        assert!(decode_unary::<cnnf_proto::v1::PolicyCommand>(&frame).is_err());
    }
}
