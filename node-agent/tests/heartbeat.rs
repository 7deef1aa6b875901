//! The agent's heartbeats reach JetStream with ids `<node>:<boot>:<seq>`.

use std::time::Duration;

use async_nats::jetstream;
use cnnf_proto::v1::{envelope::Payload, Envelope};
use cnnf_testkit::NatsServer;
use futures::StreamExt;
use prost::Message;

#[tokio::test]
async fn agent_publishes_numbered_heartbeats_on_its_own_subject() {
    let server = NatsServer::start().await;
    let js = jetstream::new(async_nats::connect(server.url()).await.unwrap());
    cnnf_bus::topology::ensure(&js, &Default::default()).await.unwrap();

    let state = tempfile::tempdir().unwrap();
    let config = <cnnf_agent::Config as clap::Parser>::try_parse_from([
        "cnnf-agent",
        "--no-dataplane",
        "--data-dir",
        state.path().to_str().unwrap(),
        "--nats-url",
        &server.url(),
        "--cluster",
        "prod",
        "--node",
        "node-7",
        "--heartbeat-seconds",
        "1",
        // No table is ever published here.
        "--allow-unsigned-tables",
    ])
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(cnnf_agent::run(config, Default::default(), async {
        let _ = stopped.await;
    }));

    let stream = js.get_stream(cnnf_bus::topology::HEARTBEATS).await.unwrap();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut boot = None;
    for expected in 1..=2u64 {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("no heartbeat")
            .unwrap()
            .unwrap();
        assert_eq!(message.subject.as_str(), "cnnf.heartbeat.prod.node-7");
        let envelope = Envelope::decode(message.payload.as_ref()).unwrap();
        let Some(Payload::NodeHeartbeat(heartbeat)) = envelope.payload else {
            panic!("not a heartbeat");
        };
        assert_eq!(heartbeat.sequence, expected);
        assert_eq!(envelope.event_id, format!("node-7:{}:{expected}", heartbeat.boot_id));
        let msg_id = message
            .headers
            .as_ref()
            .unwrap()
            .get("Nats-Msg-Id")
            .unwrap()
            .to_string();
        assert_eq!(msg_id, envelope.event_id);
        assert_eq!(*boot.get_or_insert(heartbeat.boot_id.clone()), heartbeat.boot_id);
    }
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
}
