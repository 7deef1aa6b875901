//! The CRI source against a stand-in runtime: a tonic server of the CRI
//! `runtime.v1.RuntimeService` on a unix socket, serving data the test sets.
//!
//! A real containerd with its CRI plugin and CNI networking is too heavy for
//! this machine and CI; the stand-in speaks the same gRPC API over the same
//! transport, and honours the state filters discovery sends.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cnnf_discovery::cri::api;
use cnnf_discovery::cri::api::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use cnnf_discovery::{watch_with_metrics, Change, DiscoveryMetrics, Source};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use super::{eventually, next_change, started_id};

#[derive(Default)]
struct State {
    sandboxes: Vec<api::PodSandboxStatus>,
    containers: Vec<api::ContainerStatus>,
    /// Which sandbox each container is in.
    sandbox_of: HashMap<String, String>,
    /// ContainerStatus calls per container.
    status_calls: HashMap<String, usize>,
}

#[derive(Clone, Default)]
struct FakeRuntime(Arc<Mutex<State>>);

#[tonic::async_trait]
impl RuntimeService for FakeRuntime {
    async fn pod_sandbox_status(
        &self,
        request: Request<api::PodSandboxStatusRequest>,
    ) -> Result<Response<api::PodSandboxStatusResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        let state = self.0.lock().unwrap();
        let status = state.sandboxes.iter().find(|s| s.id == id).cloned();
        let status = status.ok_or_else(|| Status::not_found(format!("sandbox {id}")))?;
        Ok(Response::new(api::PodSandboxStatusResponse { status: Some(status) }))
    }

    async fn list_pod_sandbox(
        &self,
        request: Request<api::ListPodSandboxRequest>,
    ) -> Result<Response<api::ListPodSandboxResponse>, Status> {
        let wanted = request.into_inner().filter.and_then(|f| f.state).map(|s| s.state);
        let state = self.0.lock().unwrap();
        let items = state
            .sandboxes
            .iter()
            .filter(|s| wanted.is_none_or(|w| s.state == w))
            .map(|s| api::PodSandbox {
                id: s.id.clone(),
                metadata: s.metadata.clone(),
                state: s.state,
                ..Default::default()
            })
            .collect();
        Ok(Response::new(api::ListPodSandboxResponse { items }))
    }

    async fn container_status(
        &self,
        request: Request<api::ContainerStatusRequest>,
    ) -> Result<Response<api::ContainerStatusResponse>, Status> {
        let id = request.into_inner().container_id;
        let mut state = self.0.lock().unwrap();
        *state.status_calls.entry(id.clone()).or_default() += 1;
        let status = state.containers.iter().find(|c| c.id == id).cloned();
        let status = status.ok_or_else(|| Status::not_found(format!("container {id}")))?;
        Ok(Response::new(api::ContainerStatusResponse { status: Some(status) }))
    }

    async fn list_containers(
        &self,
        request: Request<api::ListContainersRequest>,
    ) -> Result<Response<api::ListContainersResponse>, Status> {
        let wanted = request.into_inner().filter.and_then(|f| f.state).map(|s| s.state);
        let state = self.0.lock().unwrap();
        let containers = state
            .containers
            .iter()
            .filter(|c| wanted.is_none_or(|w| c.state == w))
            .map(|c| api::Container {
                id: c.id.clone(),
                pod_sandbox_id: state.sandbox_of[&c.id].clone(),
                metadata: c.metadata.clone(),
                // What containerd lists: the image by ID, the ID as image_ref.
                image: Some(api::ImageSpec {
                    image: c.image_id.clone(),
                    ..Default::default()
                }),
                image_ref: c.image_id.clone(),
                state: c.state,
                labels: c.labels.clone(),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(api::ListContainersResponse { containers }))
    }
}

impl FakeRuntime {
    fn add_sandbox(&self, id: &str, name: &str, ips: &[&str], host_network: bool, ready: bool) {
        let network_mode = if host_network {
            api::NamespaceMode::Node
        } else {
            api::NamespaceMode::Pod
        };
        let state = if ready {
            api::PodSandboxState::SandboxReady
        } else {
            api::PodSandboxState::SandboxNotready
        };
        self.0.lock().unwrap().sandboxes.push(api::PodSandboxStatus {
            id: id.into(),
            metadata: Some(api::PodSandboxMetadata {
                name: name.into(),
                namespace: "shop".into(),
                uid: format!("uid-{id}"),
                attempt: 0,
            }),
            state: state as i32,
            network: Some(api::PodSandboxNetworkStatus {
                ip: ips.first().map(|s| s.to_string()).unwrap_or_default(),
                additional_ips: ips[1.min(ips.len())..]
                    .iter()
                    .map(|ip| api::PodIp { ip: ip.to_string() })
                    .collect(),
            }),
            linux: Some(api::LinuxPodSandboxStatus {
                namespaces: Some(api::Namespace {
                    options: Some(api::NamespaceOption {
                        network: network_mode as i32,
                        ..Default::default()
                    }),
                }),
            }),
            ..Default::default()
        });
    }

    fn add_container(&self, id: &str, sandbox: &str, image: &str, running: bool) {
        let state = if running {
            api::ContainerState::ContainerRunning
        } else {
            api::ContainerState::ContainerExited
        };
        let mut inner = self.0.lock().unwrap();
        inner.sandbox_of.insert(id.into(), sandbox.into());
        inner.containers.push(api::ContainerStatus {
            id: id.into(),
            metadata: Some(api::ContainerMetadata {
                name: format!("{id}-name"),
                attempt: 0,
            }),
            state: state as i32,
            image: Some(api::ImageSpec {
                image: format!("{image}:1"),
                user_specified_image: format!("registry.example/{image}:1"),
                ..Default::default()
            }),
            image_ref: format!("registry.example/{image}@sha256:repo-{image}"),
            image_id: format!("sha256:{image}"),
            labels: [("io.kubernetes.container.name".to_string(), format!("{id}-name"))].into(),
            ..Default::default()
        });
    }

    fn exit(&self, id: &str, reason: &str, exit_code: i32) {
        let mut inner = self.0.lock().unwrap();
        let container = inner.containers.iter_mut().find(|c| c.id == id).unwrap();
        container.state = api::ContainerState::ContainerExited as i32;
        container.reason = reason.into();
        container.exit_code = exit_code;
    }

    fn remove(&self, id: &str) {
        self.0.lock().unwrap().containers.retain(|c| c.id != id);
    }

    fn status_calls(&self, id: &str) -> usize {
        self.0.lock().unwrap().status_calls.get(id).copied().unwrap_or(0)
    }
}

/// Serves `runtime` on `socket` until the returned sender is used or dropped.
fn serve(runtime: FakeRuntime, socket: &Path) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(RuntimeServiceServer::new(runtime))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (stop, task)
}

fn stopped(change: Change) -> (String, String) {
    match change {
        Change::Stopped { workload, reason } => (workload.container_id, reason),
        Change::Started(w) => panic!("expected a stop, got the start of {}", w.container_id),
    }
}

#[tokio::test]
async fn cri_runtime_containers_start_stop_and_survive_a_runtime_restart() {
    let dir = tempfile::tempdir().unwrap();
    let socket: PathBuf = dir.path().join("containerd.sock");
    let runtime = FakeRuntime::default();
    runtime.add_sandbox("p1", "web-1", &["10.88.0.5", "FD00::5"], false, true);
    runtime.add_sandbox("p2", "agent-1", &["192.0.2.1"], true, true);
    runtime.add_sandbox("p3", "starting-1", &["10.88.0.7"], false, false);
    runtime.add_container("c1", "p1", "web", true);
    runtime.add_container("c2", "p2", "agent", true);
    runtime.add_container("c3", "p3", "late", true);
    runtime.add_container("c4", "p1", "init", false);
    let (server_stop, server) = serve(runtime.clone(), &socket);

    let (tx, mut changes) = mpsc::channel(64);
    let (stop, stopped_signal) = oneshot::channel::<()>();
    let metrics = DiscoveryMetrics::default();
    let task = tokio::spawn(watch_with_metrics(
        Source::Cri { socket: socket.clone() },
        tx,
        async move {
            let _ = stopped_signal.await;
        },
        metrics.clone(),
    ));

    // Present at start: running containers of ready pods only (c3's pod is
    // not ready, c4 has exited).
    let Change::Started(c1) = next_change(&mut changes).await else {
        panic!("expected c1 started")
    };
    let Change::Started(c2) = next_change(&mut changes).await else {
        panic!("expected c2 started")
    };
    assert_eq!(c1.container_id, "c1");
    assert_eq!(c1.container_name, "c1-name");
    assert_eq!(c1.image_id, "sha256:web");
    assert_eq!(c1.image_name, "registry.example/web:1");
    assert_eq!(c1.addresses, vec!["10.88.0.5", "fd00::5"]);
    assert_eq!((c1.namespace.as_str(), c1.pod.as_str()), ("shop", "web-1"));
    assert_eq!(
        c1.labels.get("io.kubernetes.container.name").map(String::as_str),
        Some("c1-name")
    );
    assert_eq!(c2.container_id, "c2");
    assert!(
        c2.addresses.is_empty(),
        "a host-network pod does not own the node's address"
    );

    // A new container in a running pod.
    runtime.add_container("c5", "p1", "sidecar", true);
    assert_eq!(started_id(&next_change(&mut changes).await), "c5");

    // Exited (OOM-killed), then deleted.
    runtime.exit("c1", "OOMKilled", 137);
    assert_eq!(
        stopped(next_change(&mut changes).await),
        ("c1".into(), "oom-killed".into())
    );
    runtime.remove("c5");
    assert_eq!(
        stopped(next_change(&mut changes).await),
        ("c5".into(), "deleted".into())
    );

    // The runtime goes away: errors are counted, nothing is stopped. While
    // it is away c6 starts; once it is back, only c6 is new.
    server_stop.send(()).unwrap();
    server.await.unwrap();
    eventually("polls fail while the runtime is away", || {
        metrics.snapshot_errors.get() >= 2
    })
    .await;
    runtime.add_container("c6", "p1", "worker", true);
    let (server_stop, server) = serve(runtime.clone(), &socket);
    assert_eq!(started_id(&next_change(&mut changes).await), "c6");
    assert_eq!(metrics.reconnects.get(), 1);

    // What does not change over a container's life was asked once.
    assert_eq!(runtime.status_calls("c2"), 1);

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    assert!(changes.recv().await.is_none(), "no change beyond the expected ones");
    server_stop.send(()).unwrap();
    server.await.unwrap();
}
