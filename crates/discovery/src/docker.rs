//! The Docker Engine API over its unix socket.
//!
//! Discovery lists the running containers (`GET /containers/json`, which
//! already carries image ID, image name, labels and every network's
//! addresses, so one request per snapshot) and follows
//! `GET /events` filtered to container and network events. A container
//! starting, dying or being destroyed, or one joining or leaving a network,
//! triggers a new snapshot (events arriving together are coalesced), and
//! [`diff`](crate::diff) against the previous snapshot yields the changes.
//! The event stream is opened before the first snapshot, so nothing that
//! happens in between is missed; a full snapshot is also taken every minute
//! as a safety net.
//!
//! When dockerd goes away (restart, upgrade), discovery reconnects with
//! exponential backoff (100 ms to 5 s) and diffs the first snapshot after
//! the reconnect against the last one before: containers that died in
//! between are stopped, the ones still running are not started twice.
//!
//! The client is hyper 1 over a tokio `UnixStream`: discovery needs two GET
//! requests, and hyper is already in the workspace through tonic and axum,
//! whereas a full Docker SDK (`bollard`) brings a large generated model and
//! its own dependency tree for the same two calls. Unversioned API paths are
//! used, which every daemon serves at its own version; the fields read have
//! been stable since API 1.21.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use cnnf_proto::v1::Workload;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::UnixStream;
use tokio::time::Instant;

use crate::{diff_with, labels_map, runtime_addresses, Backoff, Sink, K8S_POD_NAME, K8S_POD_NAMESPACE};

/// The largest `/containers/json` answer read.
const MAX_LIST_BYTES: usize = 64 * 1024 * 1024;
/// The longest line of the event stream accepted.
const MAX_EVENT_LINE: usize = 1024 * 1024;
/// Events within this window share one snapshot.
const COALESCE: Duration = Duration::from_millis(50);
/// A full snapshot at least this often, events or not.
const RESYNC: Duration = Duration::from_secs(60);
/// Time allowed for connecting and for a snapshot request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What went wrong talking to dockerd.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The socket could not be connected or the connection failed.
    #[error("docker socket {socket}: {source}")]
    Io {
        /// The socket.
        socket: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// HTTP failed (handshake, request or reading the answer).
    #[error("docker API {path}: {message}")]
    Http {
        /// The request path.
        path: String,
        /// What failed.
        message: String,
    },
    /// dockerd answered with an error status.
    #[error("docker API {path}: status {status}: {body}")]
    Status {
        /// The request path.
        path: String,
        /// The HTTP status.
        status: u16,
        /// The start of the answer.
        body: String,
    },
    /// The answer is not the JSON expected.
    #[error("docker API {path}: unexpected answer: {message}")]
    Decode {
        /// The request path.
        path: String,
        /// What did not match.
        message: String,
    },
    /// The request took longer than allowed.
    #[error("docker API {path}: no answer within {REQUEST_TIMEOUT:?}")]
    Timeout {
        /// The request path.
        path: String,
    },
}

/// A minimal Docker Engine API client: one HTTP/1.1 connection per request.
#[derive(Debug, Clone)]
pub struct DockerClient {
    socket: PathBuf,
}

impl DockerClient {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        DockerClient { socket: socket.into() }
    }

    /// Sends `GET path` and returns the answer's body once the status is 200.
    async fn get(&self, path: &str) -> Result<Incoming, DockerError> {
        let http = |message: String| DockerError::Http {
            path: path.to_string(),
            message,
        };
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| DockerError::Io {
                socket: self.socket.display().to_string(),
                source,
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(format!("handshake: {e}")))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(message = "Docker API connection ended.", %error);
            }
        });
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, "docker")
            .header(hyper::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| http(e.to_string()))?;
        let response = sender.send_request(request).await.map_err(|e| http(e.to_string()))?;
        let status = response.status();
        let body = response.into_body();
        if status != hyper::StatusCode::OK {
            let text = match Limited::new(body, 4096).collect().await {
                Ok(collected) => String::from_utf8_lossy(&collected.to_bytes()).trim().to_string(),
                Err(_) => String::new(),
            };
            return Err(DockerError::Status {
                path: path.to_string(),
                status: status.as_u16(),
                body: text.chars().take(300).collect(),
            });
        }
        Ok(body)
    }

    /// The running containers as workloads, sorted by container ID.
    pub async fn snapshot(&self) -> Result<Vec<Workload>, DockerError> {
        const PATH: &str = "/containers/json";
        let request = async {
            let body = self.get(PATH).await?;
            let bytes = Limited::new(body, MAX_LIST_BYTES)
                .collect()
                .await
                .map_err(|e| DockerError::Http {
                    path: PATH.to_string(),
                    message: format!("reading the answer: {e}"),
                })?
                .to_bytes();
            parse_containers(&bytes).map_err(|message| DockerError::Decode {
                path: PATH.to_string(),
                message,
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, request)
            .await
            .map_err(|_| DockerError::Timeout { path: PATH.to_string() })?
    }

    /// Opens the event stream of container and network events.
    async fn events(&self) -> Result<EventStream, DockerError> {
        // filters={"type":["container","network"]}, percent-encoded.
        const PATH: &str = "/events?filters=%7B%22type%22%3A%5B%22container%22%2C%22network%22%5D%7D";
        let body = tokio::time::timeout(REQUEST_TIMEOUT, self.get(PATH))
            .await
            .map_err(|_| DockerError::Timeout { path: PATH.to_string() })??;
        Ok(EventStream {
            body,
            buffer: BytesMut::new(),
        })
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerSummary {
    id: String,
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    image: String,
    #[serde(rename = "ImageID", default)]
    image_id: String,
    #[serde(default)]
    labels: Option<HashMap<String, String>>,
    #[serde(default)]
    network_settings: Option<NetworkSettings>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NetworkSettings {
    #[serde(default)]
    networks: Option<HashMap<String, Endpoint>>,
}

#[derive(Deserialize)]
struct Endpoint {
    #[serde(rename = "IPAddress", default)]
    ip_address: Option<String>,
    #[serde(rename = "GlobalIPv6Address", default)]
    global_ipv6_address: Option<String>,
}

/// Turns a `/containers/json` answer into workloads sorted by container ID.
/// Addresses are every network's IPv4 and global IPv6 address; the pod and
/// namespace come from the labels Kubernetes runtimes set, when present.
pub fn parse_containers(bytes: &[u8]) -> Result<Vec<Workload>, String> {
    let containers: Vec<ContainerSummary> = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let mut workloads: Vec<Workload> = containers
        .into_iter()
        .filter(|c| !c.id.is_empty())
        .map(|c| {
            let mut texts = Vec::new();
            if let Some(networks) = c.network_settings.as_ref().and_then(|n| n.networks.as_ref()) {
                for endpoint in networks.values() {
                    texts.extend(endpoint.ip_address.as_deref());
                    texts.extend(endpoint.global_ipv6_address.as_deref());
                }
            }
            let addresses = runtime_addresses(&c.id, texts);
            let labels = c.labels.unwrap_or_default();
            Workload {
                container_name: c
                    .names
                    .first()
                    .map(|n| n.trim_start_matches('/').to_string())
                    .unwrap_or_default(),
                image_id: c.image_id,
                image_name: c.image,
                addresses,
                namespace: labels.get(K8S_POD_NAMESPACE).cloned().unwrap_or_default(),
                pod: labels.get(K8S_POD_NAME).cloned().unwrap_or_default(),
                interface: String::new(),
                labels: labels_map(labels),
                container_id: c.id,
                cluster: String::new(),
                node: String::new(),
            }
        })
        .collect();
    workloads.sort_by(|a, b| a.container_id.cmp(&b.container_id));
    Ok(workloads)
}

/// One event of interest: which container, and the action.
#[derive(Debug, PartialEq, Eq)]
struct Event {
    container_id: String,
    action: String,
}

#[derive(Deserialize)]
struct RawEvent {
    #[serde(rename = "Type", default)]
    kind: String,
    #[serde(rename = "Action", default)]
    action: String,
    #[serde(rename = "Actor", default)]
    actor: Option<Actor>,
}

#[derive(Deserialize)]
struct Actor {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(rename = "Attributes", default)]
    attributes: HashMap<String, String>,
}

/// Parses one line of the event stream; `None` for events that change no
/// container's existence or addresses.
fn parse_event(line: &[u8]) -> Result<Option<Event>, String> {
    let raw: RawEvent = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    let actor = raw.actor.unwrap_or(Actor {
        id: String::new(),
        attributes: HashMap::new(),
    });
    let relevant = match raw.kind.as_str() {
        "container" => matches!(
            raw.action.as_str(),
            "start" | "die" | "destroy" | "kill" | "oom" | "pause" | "unpause" | "rename"
        ),
        "network" => matches!(raw.action.as_str(), "connect" | "disconnect"),
        _ => false,
    };
    if !relevant {
        return Ok(None);
    }
    let container_id = match raw.kind.as_str() {
        "network" => actor.attributes.get("container").cloned().unwrap_or_default(),
        _ => actor.id,
    };
    let action = match raw.action.as_str() {
        "die" if actor.attributes.get("exitCode").map(String::as_str) == Some("137") => "killed".to_string(),
        other => other.to_string(),
    };
    Ok(Some(Event { container_id, action }))
}

/// The newline-delimited JSON event stream.
struct EventStream {
    body: Incoming,
    buffer: BytesMut,
}

impl EventStream {
    /// The next complete line, or an error when the stream ends or breaks.
    /// Cancel-safe: a partial line stays buffered.
    async fn next_line(&mut self) -> Result<Bytes, String> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line = self.buffer.split_to(end + 1).freeze();
                let trimmed = line.slice(..end);
                if trimmed.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(trimmed);
            }
            if self.buffer.len() > MAX_EVENT_LINE {
                return Err(format!("event line longer than {MAX_EVENT_LINE} bytes"));
            }
            match self.body.frame().await {
                None => return Err("event stream ended".to_string()),
                Some(Err(e)) => return Err(format!("event stream failed: {e}")),
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            self.buffer.extend_from_slice(chunk);
                            let n = chunk.len();
                            data.advance(n);
                        }
                    }
                }
            }
        }
    }
}

/// The stop reason for a container that left the snapshot, from the last
/// event seen for it.
fn stop_reason(action: Option<&str>) -> String {
    match action {
        Some("killed") | Some("kill") => "killed",
        Some("oom") => "oom-killed",
        Some("destroy") => "deleted",
        Some("die") => "exited",
        _ => "gone",
    }
    .to_string()
}

pub(crate) async fn watch(socket: PathBuf, sink: Sink, shutdown: impl Future<Output = ()>) {
    let client = DockerClient::new(socket);
    let mut known: Vec<Workload> = Vec::new();
    let mut backoff = Backoff::new();
    tokio::pin!(shutdown);
    loop {
        let connected = tokio::select! {
            _ = &mut shutdown => return,
            result = follow(&client, &sink, &mut known, &mut backoff) => result,
        };
        match connected {
            Ok(Flow::Closed) => return,
            Ok(Flow::Reconnect(reason)) => {
                tracing::warn!(message = "Docker connection lost; reconnecting.", socket = %client.socket.display(), %reason);
            }
            Err(error) => {
                tracing::warn!(message = "Docker API unavailable; retrying.", %error);
            }
        }
        sink.metrics().reconnects.inc();
        let delay = backoff.next_delay();
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

enum Flow {
    /// The receiver of changes is gone.
    Closed,
    /// The event stream ended; connect again.
    Reconnect(String),
}

/// One connection's life: open the event stream, snapshot, then snapshot
/// again after events until the stream ends.
async fn follow(
    client: &DockerClient,
    sink: &Sink,
    known: &mut Vec<Workload>,
    backoff: &mut Backoff,
) -> Result<Flow, DockerError> {
    let mut events = client.events().await?;
    let mut last_action: HashMap<String, String> = HashMap::new();
    if resnapshot(client, sink, known, &mut last_action).await? {
        return Ok(Flow::Closed);
    }
    backoff.reset();
    tracing::info!(message = "Following Docker events.", socket = %client.socket.display(), containers = known.len());
    let mut due: Option<Instant> = None;
    let mut resync = Instant::now() + RESYNC;
    loop {
        let deadline = due.unwrap_or(resync).min(resync);
        tokio::select! {
            line = events.next_line() => {
                let line = match line {
                    Ok(line) => line,
                    Err(reason) => return Ok(Flow::Reconnect(reason)),
                };
                match parse_event(&line) {
                    Ok(Some(event)) => {
                        tracing::debug!(message = "Docker event.", container_id = %event.container_id, action = %event.action);
                        // Only what tells why a container stopped is kept;
                        // a network disconnect follows a kill, say.
                        if matches!(event.action.as_str(), "kill" | "killed" | "die" | "oom" | "destroy") {
                            last_action.insert(event.container_id, event.action);
                        }
                        due.get_or_insert_with(|| Instant::now() + COALESCE);
                    }
                    Ok(None) => {}
                    Err(error) => {
                        // Unknown shape: a snapshot settles whatever it was.
                        tracing::warn!(message = "Undecodable Docker event; taking a snapshot.", %error);
                        due.get_or_insert_with(|| Instant::now() + COALESCE);
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                due = None;
                resync = Instant::now() + RESYNC;
                match resnapshot(client, sink, known, &mut last_action).await {
                    Ok(true) => return Ok(Flow::Closed),
                    Ok(false) => {}
                    Err(error) => return Err(error),
                }
            }
        }
    }
}

/// Takes a snapshot, sends its diff against `known`, and makes it `known`.
/// Returns whether the receiver is gone.
async fn resnapshot(
    client: &DockerClient,
    sink: &Sink,
    known: &mut Vec<Workload>,
    last_action: &mut HashMap<String, String>,
) -> Result<bool, DockerError> {
    let current = client.snapshot().await.inspect_err(|_| {
        sink.metrics().snapshot_errors.inc();
    })?;
    let changes = diff_with(known, &current, |w| {
        stop_reason(last_action.get(&w.container_id).map(String::as_str))
    });
    last_action.clear();
    *known = current;
    Ok(sink.send(changes).await.is_err())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recorded from dockerd 20.10 (API 1.41), trimmed; the second container
    /// is a Kubernetes pod's with an IPv6 address on a second network.
    const LIST: &str = r#"[
      {"Id":"7f795a7f32dc","Names":["/t1"],"Image":"busybox:1","ImageID":"sha256:9eca",
       "Labels":{},"State":"running",
       "NetworkSettings":{"Networks":{"bridge":{"IPAddress":"172.17.0.2","GlobalIPv6Address":""}}}},
      {"Id":"0a1b","Names":["/k8s_web_web-7f_shop_uid_0"],"Image":"web:1","ImageID":"sha256:aaaa",
       "Labels":{"io.kubernetes.pod.name":"web-7f","io.kubernetes.pod.namespace":"shop"},
       "NetworkSettings":{"Networks":{
          "a":{"IPAddress":"10.1.0.5","GlobalIPv6Address":"FD00:0::5"},
          "b":{"IPAddress":"10.2.0.5","GlobalIPv6Address":null}}}},
      {"Id":"host1","Names":["/h"],"Image":"h","ImageID":"sha256:h","Labels":null,
       "NetworkSettings":{"Networks":{"host":{"IPAddress":"","GlobalIPv6Address":""}}}}
    ]"#;

    #[test]
    fn container_list_becomes_workloads() {
        let workloads = parse_containers(LIST.as_bytes()).unwrap();
        let ids: Vec<_> = workloads.iter().map(|w| w.container_id.as_str()).collect();
        assert_eq!(ids, vec!["0a1b", "7f795a7f32dc", "host1"]);
        let pod = &workloads[0];
        assert_eq!(pod.addresses, vec!["10.1.0.5", "10.2.0.5", "fd00::5"]);
        assert_eq!((pod.namespace.as_str(), pod.pod.as_str()), ("shop", "web-7f"));
        assert_eq!(pod.image_id, "sha256:aaaa");
        assert_eq!(pod.image_name, "web:1");
        let plain = &workloads[1];
        assert_eq!(plain.container_name, "t1");
        assert_eq!(plain.addresses, vec!["172.17.0.2"]);
        assert!(plain.namespace.is_empty() && plain.pod.is_empty());
        assert!(workloads[2].addresses.is_empty());
        assert!(parse_containers(b"{\"message\":\"x\"}").is_err());
        assert!(parse_containers(b"\xff").is_err());
    }

    #[test]
    fn events_of_interest_are_recognised() {
        let die = br#"{"status":"die","id":"c1","Type":"container","Action":"die",
            "Actor":{"ID":"c1","Attributes":{"exitCode":"0","image":"x"}},"time":1}"#;
        assert_eq!(
            parse_event(die).unwrap(),
            Some(Event {
                container_id: "c1".into(),
                action: "die".into()
            })
        );
        let killed = br#"{"Type":"container","Action":"die","Actor":{"ID":"c2","Attributes":{"exitCode":"137"}}}"#;
        assert_eq!(parse_event(killed).unwrap().unwrap().action, "killed");
        let connect = br#"{"Type":"network","Action":"connect","Actor":{"ID":"net","Attributes":{"container":"c3"}}}"#;
        assert_eq!(parse_event(connect).unwrap().unwrap().container_id, "c3");
        let exec = br#"{"Type":"container","Action":"exec_start: sh","Actor":{"ID":"c1"}}"#;
        assert_eq!(parse_event(exec).unwrap(), None);
        assert!(parse_event(b"not json").is_err());
        assert_eq!(stop_reason(Some("killed")), "killed");
        assert_eq!(stop_reason(Some("die")), "exited");
        assert_eq!(stop_reason(None), "gone");
    }
}
