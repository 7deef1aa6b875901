//! The Docker source against a real dockerd that the test starts on its own
//! socket and directories.
//!
//! Needs root, `dockerd` and the `docker` CLI (Debian: `docker.io`), and a
//! static busybox (Debian: `busybox-static`) to make an image from without
//! a registry. The daemon is started with `--iptables=false
//! --ip6tables=false --ip-forward=false --bridge=none`, so it leaves the
//! host's firewall and forwarding alone; its containers live on a
//! test-made bridge network. Without these the test says so and passes
//! without checking anything, unless `CNNF_REQUIRE_DOCKER=1` is set, which
//! makes a missing requirement a failure (CI sets it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cnnf_discovery::{watch_with_metrics, Change, DiscoveryMetrics, Source};
use tokio::sync::{mpsc, oneshot};

use super::{eventually, next_change, started_id, PATIENCE};

const IMAGE: &str = "cnnf-test-busybox:1";
const NETWORK: &str = "cnnf-test";

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// A statically linked busybox, or why there is none.
fn static_busybox() -> Result<PathBuf, String> {
    for candidate in ["/bin/busybox", "/usr/bin/busybox"] {
        let path = Path::new(candidate);
        if let Ok(bytes) = std::fs::read(path) {
            if bytes.windows(9).any(|w| w == b"/ld-linux") {
                return Err(format!("{candidate} is dynamically linked; install busybox-static"));
            }
            return Ok(path.to_path_buf());
        }
    }
    Err("no busybox; install busybox-static".into())
}

fn requirements() -> Result<PathBuf, String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0");
    if !root {
        return Err("not root".into());
    }
    for program in ["dockerd", "docker", "tar"] {
        if !on_path(program) {
            return Err(format!("{program} not found; install docker.io"));
        }
    }
    static_busybox()
}

/// A dockerd of the test's own, stopped and cleaned up on drop.
struct Daemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
    bridge: String,
}

impl Daemon {
    fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("cnnf-dockerd").tempdir().unwrap();
        Daemon {
            dir,
            child: None,
            bridge: format!("cnnfd{}", std::process::id() % 100_000),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    fn start(&mut self) {
        let root = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join("dockerd.log"))
            .unwrap();
        let child = Command::new("dockerd")
            .arg(format!("--host=unix://{}", self.socket().display()))
            .arg(format!("--data-root={}", root.join("data").display()))
            .arg(format!("--exec-root={}", root.join("exec").display()))
            .arg(format!("--pidfile={}", root.join("dockerd.pid").display()))
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--bridge=none",
                "--shutdown-timeout=1",
            ])
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = std::time::Instant::now() + PATIENCE;
        while !self.docker_ok(&["version"]) {
            assert!(
                std::time::Instant::now() < deadline,
                "dockerd did not come up; see {}",
                root.join("dockerd.log").display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("docker");
        command
            .env("DOCKER_HOST", format!("unix://{}", self.socket().display()))
            .args(args);
        command
    }

    fn docker_ok(&self, args: &[&str]) -> bool {
        self.command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn docker(&self, args: &[&str]) -> String {
        let output = self.command(args).output().unwrap();
        assert!(
            output.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_string()
    }

    /// A busybox image made without a registry, and its ID.
    fn import_image(&self, busybox: &Path) -> String {
        let rootfs = self.dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::copy(busybox, rootfs.join("bin/busybox")).unwrap();
        for applet in ["sh", "sleep"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        let tarball = self.dir.path().join("rootfs.tar");
        let status = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tarball)
            .arg(".")
            .status()
            .unwrap();
        assert!(status.success());
        self.docker(&["import", tarball.to_str().unwrap(), IMAGE]);
        self.docker(&["image", "inspect", "-f", "{{.Id}}", IMAGE])
    }

    fn run(&self, name: &str, labels: &[&str]) -> String {
        let mut args = vec!["run", "-d", "--name", name, "--network", NETWORK];
        for label in labels {
            args.extend(["--label", label]);
        }
        args.extend([IMAGE, "sleep", "1000"]);
        self.docker(&args)
    }

    /// The addresses dockerd reports for a container, canonical and sorted.
    fn addresses(&self, name: &str) -> Vec<String> {
        let text = self.docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{.GlobalIPv6Address}} {{end}}",
            name,
        ]);
        let mut addresses: Vec<String> = text
            .split_whitespace()
            .map(|a| cnnf_core::address::canonical(a).unwrap())
            .collect();
        addresses.sort();
        addresses
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.command(&["rm", "-f", "c1", "c2", "c3", "c4"]).output();
        }
        self.stop();
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
    }
}

fn stopped(change: Change) -> (String, String) {
    match change {
        Change::Stopped { workload, reason } => (workload.container_id, reason),
        Change::Started(w) => panic!("expected a stop, got the start of {}", w.container_id),
    }
}

#[tokio::test]
async fn docker_containers_start_stop_and_survive_a_daemon_restart() {
    let busybox = match requirements() {
        Ok(busybox) => busybox,
        Err(why) if std::env::var("CNNF_REQUIRE_DOCKER").as_deref() != Ok("1") => {
            eprintln!("SKIPPED docker discovery test: {why} (set CNNF_REQUIRE_DOCKER=1 to fail instead)");
            return;
        }
        Err(why) => panic!("docker discovery test cannot run: {why}"),
    };
    let mut daemon = Daemon::new();
    daemon.start();
    daemon.docker(&[
        "network",
        "create",
        "--driver=bridge",
        "--ipv6",
        "--subnet=fd42:c0de:1::/64",
        "-o",
        &format!("com.docker.network.bridge.name={}", daemon.bridge),
        NETWORK,
    ]);
    let image_id = daemon.import_image(&busybox);
    let c1 = daemon.run(
        "c1",
        &[
            "io.kubernetes.pod.name=web-1",
            "io.kubernetes.pod.namespace=shop",
            "tier=web",
        ],
    );

    let (tx, mut changes) = mpsc::channel(64);
    let (stop, stopped_signal) = oneshot::channel::<()>();
    let metrics = DiscoveryMetrics::default();
    let task = tokio::spawn(watch_with_metrics(
        Source::Docker {
            socket: daemon.socket(),
        },
        tx,
        async move {
            let _ = stopped_signal.await;
        },
        metrics.clone(),
    ));

    // Present at start.
    let first = next_change(&mut changes).await;
    let Change::Started(w) = first else { panic!("{first:?}") };
    assert_eq!(w.container_id, c1);
    assert_eq!(w.container_name, "c1");
    assert_eq!(w.image_id, image_id);
    assert_eq!(w.image_name, IMAGE);
    let addresses = daemon.addresses("c1");
    assert_eq!(addresses.len(), 2, "an IPv4 and a global IPv6 address: {addresses:?}");
    assert_eq!(w.addresses, addresses);
    assert_eq!((w.namespace.as_str(), w.pod.as_str()), ("shop", "web-1"));
    assert_eq!(w.labels.get("tier").map(String::as_str), Some("web"));

    // Started while watching.
    let c2 = daemon.run("c2", &[]);
    let change = next_change(&mut changes).await;
    assert_eq!(started_id(&change), c2);

    // Killed, then removed.
    daemon.docker(&["kill", "c1"]);
    assert_eq!(
        stopped(next_change(&mut changes).await),
        (c1.clone(), "killed".to_string())
    );
    daemon.docker(&["rm", "-f", "c2"]);
    let (id, reason) = stopped(next_change(&mut changes).await);
    assert_eq!(id, c2);
    assert!(reason == "deleted" || reason == "killed", "{reason}");

    // dockerd restarts; c3 dies with it (no restart policy). The watcher
    // reconnects and reports c3 stopped, once, and then follows events again.
    // Whether the stop is seen in dockerd's last events before it exits
    // (killed) or only in the first snapshot after the restart (gone)
    // depends on the daemon's shutdown order.
    let c3 = daemon.run("c3", &[]);
    assert_eq!(started_id(&next_change(&mut changes).await), c3);
    daemon.stop();
    eventually("the lost connection is noticed", || metrics.reconnects.get() >= 1).await;
    daemon.start();
    let (id, reason) = stopped(next_change(&mut changes).await);
    assert_eq!(id, c3);
    assert!(["gone", "killed", "exited"].contains(&reason.as_str()), "{reason}");
    let c4 = daemon.run("c4", &[]);
    assert_eq!(started_id(&next_change(&mut changes).await), c4);

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    assert!(changes.recv().await.is_none(), "no change beyond the expected ones");
}
