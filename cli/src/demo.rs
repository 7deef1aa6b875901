//! A small demo fleet, published as an agent would: two nodes, a web
//! image, an API image and a database image, their workloads starting, and
//! the connections between them (plus one odd one to port 23).

use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use cnnf_bus::{OutgoingMessage, Publisher, PublisherConfig};
use cnnf_core::subjects::{self, Token};
use cnnf_proto::v1::{
    envelope::Payload, ConnectionDecision, DecisionBatch, Direction, Endpoint, Envelope, Identity, IdentityKind, Mode,
    Protocol, Verdict, Workload, WorkloadStarted,
};

struct DemoWorkload {
    node: &'static str,
    container: &'static str,
    image_id: &'static str,
    image_name: &'static str,
    address: &'static str,
}

const FLEET: &[DemoWorkload] = &[
    DemoWorkload {
        node: "demo-node-1",
        container: "web-1",
        image_id: "sha256:0a1e5c0ffee0000000000000000000000000000000000000000000000000001",
        image_name: "demo/web:1.0",
        address: "10.244.1.10",
    },
    DemoWorkload {
        node: "demo-node-1",
        container: "api-1",
        image_id: "sha256:0a1e5c0ffee0000000000000000000000000000000000000000000000000002",
        image_name: "demo/api:1.0",
        address: "10.244.1.11",
    },
    DemoWorkload {
        node: "demo-node-2",
        container: "db-1",
        image_id: "sha256:0a1e5c0ffee0000000000000000000000000000000000000000000000000003",
        image_name: "demo/db:1.0",
        address: "10.244.2.10",
    },
];

/// (source index, destination index, port)
const CONNECTIONS: &[(usize, usize, u32)] = &[(0, 1, 8080), (1, 2, 27017), (0, 2, 23)];

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as i64)
        .unwrap_or(0)
}

fn endpoint(workload: &DemoWorkload, cluster: &str, port: u32) -> Endpoint {
    Endpoint {
        address: workload.address.to_owned(),
        port,
        identity: Some(Identity {
            kind: IdentityKind::Image as i32,
            id: workload.image_id.to_owned(),
            name: workload.image_name.to_owned(),
            container_id: workload.container.to_owned(),
            cluster: cluster.to_owned(),
            node: workload.node.to_owned(),
        }),
    }
}

/// Publishes the demo fleet under a fresh boot id.
pub async fn publish(js: jetstream::Context, cluster: &str) -> anyhow::Result<()> {
    let cluster_token = Token::new("cluster", cluster)?;
    let boot = format!("demo{}", now_nanos());
    let mut publisher = Publisher::new(js, PublisherConfig::default());
    let mut sequence = 0u64;
    let mut send = |node: &str, subject: String, payload: Payload| {
        sequence += 1;
        let id = cnnf_core::ids::agent_event(node, &boot, sequence);
        let envelope = Envelope {
            event_id: id.clone(),
            cluster: cluster.to_owned(),
            node: node.to_owned(),
            time_unix_nanos: now_nanos(),
            payload: Some(payload),
            ..Default::default()
        };
        OutgoingMessage::new(subject, id, cnnf_core::envelope::encode(envelope))
    };
    let mut messages = Vec::new();
    for workload in FLEET {
        let node = Token::new("node", workload.node)?;
        messages.push(send(
            workload.node,
            subjects::workload(&cluster_token, &node),
            Payload::WorkloadStarted(WorkloadStarted {
                workload: Some(Workload {
                    container_id: workload.container.to_owned(),
                    container_name: workload.container.to_owned(),
                    image_id: workload.image_id.to_owned(),
                    image_name: workload.image_name.to_owned(),
                    addresses: vec![workload.address.to_owned()],
                    cluster: cluster.to_owned(),
                    node: workload.node.to_owned(),
                    ..Default::default()
                }),
            }),
        ));
    }
    for &(from, to, port) in CONNECTIONS {
        let (source, destination) = (&FLEET[from], &FLEET[to]);
        let node = Token::new("node", source.node)?;
        let now = now_nanos();
        messages.push(send(
            source.node,
            subjects::flow(&cluster_token, &node),
            Payload::Decisions(DecisionBatch {
                decisions: vec![ConnectionDecision {
                    source: Some(endpoint(source, cluster, 40000 + port)),
                    destination: Some(endpoint(destination, cluster, port)),
                    protocol: Protocol::Tcp as i32,
                    direction: Direction::Egress as i32,
                    verdict: Verdict::Observe as i32,
                    mode: Mode::Disabled as i32,
                    first_seen_unix_nanos: now,
                    last_seen_unix_nanos: now,
                    count: 1,
                    ..Default::default()
                }],
                overflow_count: 0,
            }),
        ));
    }
    let count = messages.len();
    for message in messages {
        publisher.publish(message).await?;
    }
    publisher.flush().await?;
    println!(
        "published {count} demo events ({} workloads, {} connections)",
        FLEET.len(),
        CONNECTIONS.len()
    );
    Ok(())
}
