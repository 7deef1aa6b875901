//! A CRI runtime (containerd, CRI-O) over gRPC on its unix socket.
//!
//! The Kubernetes Container Runtime Interface is what the kubelet itself
//! uses, so every Kubernetes node has it. Discovery polls it every second:
//! the CRI event stream (`GetContainerEvents`) is recent and not offered by
//! every runtime, and two cheap list calls per second cost little. Each poll
//! lists the ready pod sandboxes and the running containers; a sandbox's
//! addresses (`PodSandboxStatus`) and a container's image and labels
//! (`ContainerStatus`) do not change over their lives, so they are asked
//! once per sandbox and container and cached. The snapshot is then diffed
//! against the previous one.
//!
//! A container's addresses are its pod's. Pods on the host's network
//! (`hostNetwork`) report the node's own address; they get no address,
//! since the node's address is not theirs alone. The image ID is the
//! runtime's image ID (`image_id`, or `image_ref` on runtimes older than
//! that field), the image name the one the container was started with.
//!
//! The schema is `proto/runtime/v1/runtime.proto`: the messages and field
//! numbers of the CRI API `runtime.v1` that discovery reads, nothing else.
//! When the runtime is unreachable, polls back off (100 ms to 5 s) and the
//! last snapshot stays in force; nothing is stopped until the runtime says
//! so.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use cnnf_proto::v1::Workload;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Code;

use crate::{diff_with, labels_map, runtime_addresses, Backoff, Sink, K8S_POD_NAME, K8S_POD_NAMESPACE};

/// The generated CRI `runtime.v1` client and server (the server is used by
/// tests that stand in for a runtime).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod api {
    tonic::include_proto!("runtime.v1");
}

use api::runtime_service_client::RuntimeServiceClient;

/// How often the runtime is polled.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Time allowed for one RPC.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// A channel to a CRI runtime on `socket`; it connects on first use and
/// reconnects by itself after the runtime restarts.
pub fn channel(socket: PathBuf) -> Channel {
    Endpoint::from_static("http://localhost")
        .timeout(RPC_TIMEOUT)
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
}

#[derive(Debug, Clone)]
struct Pod {
    name: String,
    namespace: String,
    addresses: Vec<String>,
}

#[derive(Debug, Clone)]
struct Container {
    name: String,
    image_id: String,
    image_name: String,
    labels: HashMap<String, String>,
}

/// Takes snapshots of a CRI runtime's running containers, caching what does
/// not change over a sandbox's or container's life.
#[derive(Debug, Clone)]
pub struct CriClient {
    client: RuntimeServiceClient<Channel>,
    pods: HashMap<String, Pod>,
    containers: HashMap<String, Container>,
}

impl CriClient {
    /// A client of the runtime listening on `socket` (connects lazily).
    pub fn new(socket: PathBuf) -> Self {
        CriClient {
            client: RuntimeServiceClient::new(channel(socket)),
            pods: HashMap::new(),
            containers: HashMap::new(),
        }
    }

    /// The running containers of ready pods as workloads, sorted by
    /// container ID.
    pub async fn snapshot(&mut self) -> Result<Vec<Workload>, tonic::Status> {
        let sandboxes = self
            .client
            .list_pod_sandbox(api::ListPodSandboxRequest {
                filter: Some(api::PodSandboxFilter {
                    state: Some(api::PodSandboxStateValue {
                        state: api::PodSandboxState::SandboxReady as i32,
                    }),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .items;
        let mut pods = HashMap::with_capacity(sandboxes.len());
        for sandbox in sandboxes {
            if let Some(pod) = self.pods.remove(&sandbox.id) {
                pods.insert(sandbox.id, pod);
                continue;
            }
            let status = match self
                .client
                .pod_sandbox_status(api::PodSandboxStatusRequest {
                    pod_sandbox_id: sandbox.id.clone(),
                    verbose: false,
                })
                .await
            {
                Ok(response) => response.into_inner().status.unwrap_or_default(),
                // Removed between the list and the question.
                Err(status) if status.code() == Code::NotFound => continue,
                Err(status) => return Err(status),
            };
            pods.insert(sandbox.id.clone(), pod_of(&sandbox, &status));
        }
        self.pods = pods;

        let listed = self
            .client
            .list_containers(api::ListContainersRequest {
                filter: Some(api::ContainerFilter {
                    state: Some(api::ContainerStateValue {
                        state: api::ContainerState::ContainerRunning as i32,
                    }),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .containers;
        let mut containers = HashMap::with_capacity(listed.len());
        let mut workloads = Vec::with_capacity(listed.len());
        for listed in listed {
            // A container whose sandbox is not (yet) ready is picked up by a
            // later poll, once its addresses are known.
            let Some(pod) = self.pods.get(&listed.pod_sandbox_id) else {
                tracing::debug!(message = "Container of a pod not ready; later.", container_id = %listed.id);
                continue;
            };
            let container = match self.containers.remove(&listed.id) {
                Some(container) => container,
                None => match self
                    .client
                    .container_status(api::ContainerStatusRequest {
                        container_id: listed.id.clone(),
                        verbose: false,
                    })
                    .await
                {
                    Ok(response) => container_of(&listed, &response.into_inner().status.unwrap_or_default()),
                    Err(status) if status.code() == Code::NotFound => continue,
                    Err(status) => return Err(status),
                },
            };
            workloads.push(Workload {
                container_id: listed.id.clone(),
                container_name: container.name.clone(),
                image_id: container.image_id.clone(),
                image_name: container.image_name.clone(),
                addresses: pod.addresses.clone(),
                labels: container.labels.clone(),
                namespace: if pod.namespace.is_empty() {
                    container.labels.get(K8S_POD_NAMESPACE).cloned().unwrap_or_default()
                } else {
                    pod.namespace.clone()
                },
                pod: if pod.name.is_empty() {
                    container.labels.get(K8S_POD_NAME).cloned().unwrap_or_default()
                } else {
                    pod.name.clone()
                },
                interface: String::new(),
                cluster: String::new(),
                node: String::new(),
            });
            containers.insert(listed.id, container);
        }
        self.containers = containers;
        workloads.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        Ok(workloads)
    }

    /// Why a container left the running set, as the runtime tells it.
    pub async fn stop_reason(&mut self, container_id: &str) -> String {
        let status = self
            .client
            .container_status(api::ContainerStatusRequest {
                container_id: container_id.to_string(),
                verbose: false,
            })
            .await;
        match status {
            Ok(response) => {
                let status = response.into_inner().status.unwrap_or_default();
                if status.reason == "OOMKilled" {
                    "oom-killed".to_string()
                } else if status.exit_code == 137 {
                    "killed".to_string()
                } else {
                    "exited".to_string()
                }
            }
            Err(status) if status.code() == Code::NotFound => "deleted".to_string(),
            Err(_) => "gone".to_string(),
        }
    }
}

fn pod_of(sandbox: &api::PodSandbox, status: &api::PodSandboxStatus) -> Pod {
    let metadata = status
        .metadata
        .clone()
        .or_else(|| sandbox.metadata.clone())
        .unwrap_or_default();
    let host_network = status
        .linux
        .as_ref()
        .and_then(|l| l.namespaces.as_ref())
        .and_then(|n| n.options.as_ref())
        .is_some_and(|o| o.network == api::NamespaceMode::Node as i32);
    let addresses = match (&status.network, host_network) {
        (Some(network), false) => runtime_addresses(
            &sandbox.id,
            std::iter::once(network.ip.as_str()).chain(network.additional_ips.iter().map(|p| p.ip.as_str())),
        ),
        _ => Vec::new(),
    };
    Pod {
        name: metadata.name,
        namespace: metadata.namespace,
        addresses,
    }
}

fn container_of(listed: &api::Container, status: &api::ContainerStatus) -> Container {
    let first = |candidates: &[&str]| {
        candidates
            .iter()
            .find(|c| !c.is_empty())
            .map(|c| c.to_string())
            .unwrap_or_default()
    };
    let status_image = status.image.clone().unwrap_or_default();
    let listed_image = listed.image.clone().unwrap_or_default();
    let labels = if status.labels.is_empty() {
        &listed.labels
    } else {
        &status.labels
    };
    Container {
        name: first(&[
            status.metadata.as_ref().map_or("", |m| m.name.as_str()),
            listed.metadata.as_ref().map_or("", |m| m.name.as_str()),
        ]),
        image_id: first(&[&status.image_id, &listed.image_id, &listed.image_ref, &status.image_ref]),
        image_name: first(&[
            &status_image.user_specified_image,
            &status_image.image,
            &listed_image.user_specified_image,
            &listed_image.image,
        ]),
        labels: labels_map(labels.clone()),
    }
}

pub(crate) async fn watch(socket: PathBuf, sink: Sink, shutdown: impl Future<Output = ()>) {
    tracing::info!(message = "Polling the CRI runtime.", socket = %socket.display());
    let mut cri = CriClient::new(socket.clone());
    let mut known: Vec<Workload> = Vec::new();
    let mut backoff = Backoff::new();
    let mut failing = false;
    tokio::pin!(shutdown);
    loop {
        let delay = tokio::select! {
            _ = &mut shutdown => return,
            result = cri.snapshot() => match result {
                Ok(current) => {
                    if failing {
                        tracing::info!(message = "CRI runtime reachable again.", socket = %socket.display());
                        failing = false;
                    }
                    backoff.reset();
                    let mut reasons = HashMap::new();
                    for gone in known.iter().filter(|w| !current.iter().any(|c| c.container_id == w.container_id)) {
                        reasons.insert(gone.container_id.clone(), cri.stop_reason(&gone.container_id).await);
                    }
                    let changes = diff_with(&known, &current, |w| {
                        reasons.remove(&w.container_id).unwrap_or_else(|| "gone".to_string())
                    });
                    known = current;
                    if sink.send(changes).await.is_err() {
                        return;
                    }
                    POLL_INTERVAL
                }
                Err(status) => {
                    sink.metrics().snapshot_errors.inc();
                    if !failing {
                        sink.metrics().reconnects.inc();
                        tracing::warn!(message = "CRI runtime unavailable; retrying.", socket = %socket.display(), code = ?status.code(), error = %status.message());
                        failing = true;
                    }
                    backoff.next_delay()
                }
            },
        };
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
