//! Tests of the test kit itself: real nats-server processes and real network
//! namespaces (needs root, `ip`, and `nats-server` >= 2.10).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use cnnf_testkit::netns::{link_exists, netns_exists};
use cnnf_testkit::{Lab, NatsCluster, NatsServer};

/// Publishes with retries (a cluster may be electing a stream leader).
async fn publish_retrying(js: &jetstream::Context, subject: &'static str, payload: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = async {
            js.publish(subject, payload.to_string().into())
                .await?
                .await
                .map_err(async_nats::Error::from)
        };
        match tokio::time::timeout(Duration::from_secs(3), attempt).await {
            Ok(Ok(ack)) => return ack.sequence,
            Ok(Err(e)) if Instant::now() < deadline => eprintln!("publish failed, retrying: {e}"),
            Err(_) if Instant::now() < deadline => eprintln!("publish timed out, retrying"),
            other => panic!("publish to {subject} kept failing: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn nats_server_keeps_its_stream_across_restart() {
    let mut server = NatsServer::start().await;
    assert!(server.is_running());
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));

    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let stream = js
        .create_stream(stream::Config {
            name: "KIT".into(),
            subjects: vec!["kit.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 1..=50u64 {
        let seq = publish_retrying(&js, "kit.a", &format!("hello-{i}")).await;
        assert_eq!(seq, i);
    }
    let msg = stream.get_raw_message(1).await.unwrap();
    assert_eq!(&msg.payload[..], b"hello-1");
    drop(client);

    server.stop().await;
    assert!(!server.is_running());
    assert!(async_nats::connect(server.url()).await.is_err());
    assert!(server.store_dir().join("jetstream").is_dir());

    server.restart().await;
    assert!(server.is_running());
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    let mut stream = js.get_stream("KIT").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 50);
    let msg = stream.get_raw_message(50).await.unwrap();
    assert_eq!(&msg.payload[..], b"hello-50");
    assert_eq!(publish_retrying(&js, "kit.b", "after").await, 51);
}

#[tokio::test]
async fn nats_cluster_survives_losing_a_node() {
    let mut cluster = NatsCluster::start(3).await;
    assert_eq!(cluster.urls().len(), 3);
    assert_eq!(cluster.url().split(',').count(), 3);

    let client = async_nats::connect(cluster.urls()).await.unwrap();
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: "KITR".into(),
        subjects: vec!["kitr.>".into()],
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(publish_retrying(&js, "kitr.a", "one").await, 1);

    cluster.stop_node(2).await;
    assert!(!cluster.node(2).is_running());
    assert_eq!(publish_retrying(&js, "kitr.a", "two").await, 2);

    cluster.restart_node(2).await;
    assert!(cluster.node(2).is_running());
    assert_eq!(publish_retrying(&js, "kitr.a", "three").await, 3);
    let mut stream = js.get_stream("KITR").await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.state.messages, 3);
    assert_eq!(info.config.num_replicas, 3);
}

#[test]
fn lab_containers_talk_through_the_bridge() {
    let lab = Lab::new(2).unwrap();
    let (net, prefix) = lab.subnet();
    assert_eq!(prefix, 24);
    assert_eq!(lab.bridge_ip().octets()[..3], net.octets()[..3]);
    assert_eq!(lab.container(0).ip().octets()[3], 11);
    assert_eq!(lab.container(1).ip().octets()[3], 12);
    assert!(link_exists(lab.bridge_name()));
    assert!(link_exists(lab.container(0).host_veth()));
    assert!(lab.bridge_name().len() <= 15 && lab.container(1).host_veth().len() <= 15);

    // `exec` runs inside the namespace.
    let out = lab
        .container(1)
        .exec("ip", &["-4", "-o", "addr", "show", "dev", "eth0"])
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&lab.container(1).ip().to_string()));

    // TCP from container 0 to a listener in container 1.
    let server = lab.container(1).tcp_listen(8080).unwrap();
    let dst = SocketAddrV4::new(lab.container(1).ip(), 8080);
    assert_eq!(server.addr(), dst);
    let took = lab.container(0).tcp_connect(dst, Duration::from_secs(5)).unwrap();
    assert!(took < Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.accepted() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(server.accepted(), 1);

    // Echo through a socket opened inside container 0 with `run_in`.
    let echoed = lab
        .container(0)
        .run_in(move || -> std::io::Result<Vec<u8>> {
            let mut s = TcpStream::connect_timeout(&dst.into(), Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"ping")?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf)?;
            Ok(buf.to_vec())
        })
        .unwrap()
        .unwrap();
    assert_eq!(echoed, b"ping");

    // A closed port is refused, not hung.
    let closed = SocketAddrV4::new(lab.container(1).ip(), 8081);
    assert!(lab.container(0).tcp_connect(closed, Duration::from_secs(5)).is_err());

    // `run_in` really is in another network namespace.
    let host_ns = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let inner_ns = lab
        .container(0)
        .run_in(|| std::fs::read_link("/proc/thread-self/ns/net").unwrap())
        .unwrap();
    assert_ne!(host_ns, inner_ns);

    // A spawned process is killed when its guard drops.
    let mut guard = lab.container(0).spawn("sleep", &["30"]).unwrap();
    assert!(guard.is_running());
    let pid = guard.id();
    drop(guard);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

#[test]
fn dropped_lab_leaves_nothing_behind() {
    let mut lab = Lab::new(2).unwrap();
    let added = lab.add_container().unwrap().clone();
    assert_eq!(added.ip().octets()[3], 13);
    assert_eq!(lab.containers().len(), 3);
    // The new container is reachable like the others.
    let server = lab.container(0).tcp_listen(0).unwrap();
    added.tcp_connect(server.addr(), Duration::from_secs(5)).unwrap();
    drop(server);

    let bridge = lab.bridge_name().to_string();
    let names: Vec<String> = lab.containers().iter().map(|c| c.name().to_string()).collect();
    let veths: Vec<String> = lab.containers().iter().map(|c| c.host_veth().to_string()).collect();
    let lock = format!("{}/subnet-{}.lock", cnnf_testkit::netns::LOCK_DIR, lab.index());
    assert!(names.iter().all(|n| netns_exists(n)));
    assert!(std::path::Path::new(&lock).exists());
    drop(lab);

    let netns_list = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for n in &names {
        assert!(!netns_list
            .lines()
            .any(|l| l.split_whitespace().next() == Some(n.as_str())));
    }
    let bridge_show = std::process::Command::new("ip")
        .args(["link", "show", &bridge])
        .output()
        .unwrap();
    assert!(!bridge_show.status.success(), "bridge {bridge} still exists");
    for v in &veths {
        assert!(!link_exists(v), "veth {v} still exists");
    }
    assert!(!std::path::Path::new(&lock).exists());
}

#[test]
fn labs_created_at_once_are_disjoint() {
    let handles: Vec<_> = (0..2).map(|_| std::thread::spawn(|| Lab::new(1).unwrap())).collect();
    let labs: Vec<Lab> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_ne!(labs[0].subnet(), labs[1].subnet());
    assert_ne!(labs[0].bridge_ip(), labs[1].bridge_ip());
    assert_ne!(labs[0].bridge_name(), labs[1].bridge_name());
    assert_ne!(labs[0].container(0).name(), labs[1].container(0).name());
    assert_ne!(labs[0].container(0).host_veth(), labs[1].container(0).host_veth());
    assert_ne!(labs[0].container(0).ip(), labs[1].container(0).ip());
}
