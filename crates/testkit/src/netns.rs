//! Real Linux network namespaces standing in for containers.
//!
//! A [`Lab`] is one Linux bridge plus N network namespaces ("fake
//! containers") on one private /24, each attached by a veth pair. It needs
//! root, `ip` (iproute2) and the `br_netfilter` module.
//!
//! Labs are safe across processes: each one takes an exclusive `flock` on
//! `/run/cnnf-testkit/subnet-<k>.lock` for its subnet `10.199.<k>.0/24`
//! (k in 0..=255), and all its names embed `k`:
//! bridge `cnb<k>`, host-side veths `cnv<k>h<j>`, namespaces `cnnf-<k>-<j>`.
//! A lock left by a dead process is free again (the kernel drops `flock`s with
//! the process), and whatever that process left behind is deleted before the
//! subnet is reused.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sched::CloneFlags;

/// Directory holding the cross-process subnet locks.
pub const LOCK_DIR: &str = "/run/cnnf-testkit";
/// The first two octets of every lab subnet: labs use `10.199.<k>.0/24`.
const NET_PREFIX: [u8; 2] = [10, 199];
/// Number of lab subnets (`k` in `0..SUBNETS`).
const SUBNETS: usize = 256;
/// Last octet of the first container's address.
const FIRST_HOST: u8 = 11;
/// Most containers one lab can hold (`.11` to `.254`).
const MAX_CONTAINERS: usize = 254 - FIRST_HOST as usize + 1;
const BRIDGE_NF_SYSCTL: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

fn cmdline(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command to completion; an error names the command and its stderr.
fn run(program: &str, args: &[&str]) -> io::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("`{}` could not be started: {e}", cmdline(program, args)),
            )
        })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`{}` failed ({}): {}",
            cmdline(program, args),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`run`], but for cleanup: failures are only logged.
fn run_quiet(program: &str, args: &[&str]) {
    if let Err(e) = run(program, args) {
        tracing::debug!("cleanup: {e}");
    }
}

/// Names of all network namespaces (`ip netns list`).
fn netns_names() -> io::Result<Vec<String>> {
    Ok(run("ip", &["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Names of all links in the host namespace (`ip -o link show`).
fn link_names() -> io::Result<Vec<String>> {
    Ok(run("ip", &["-o", "link", "show"])?
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect())
}

/// Whether a network namespace with this name exists.
pub fn netns_exists(name: &str) -> bool {
    netns_names().is_ok_and(|names| names.iter().any(|n| n == name))
}

/// Whether a link (interface) with this name exists in the host namespace.
pub fn link_exists(name: &str) -> bool {
    link_names().is_ok_and(|names| names.iter().any(|n| n == name))
}

/// Kills every process still running inside a namespace (except ourselves).
fn kill_netns_pids(ns: &str) {
    let me = std::process::id().to_string();
    if let Ok(pids) = run("ip", &["netns", "pids", ns]) {
        for pid in pids.split_whitespace().filter(|p| *p != me) {
            run_quiet("kill", &["-KILL", pid]);
        }
    }
}

fn bridge_name(k: u8) -> String {
    format!("cnb{k}")
}
fn netns_name(k: u8, j: usize) -> String {
    format!("cnnf-{k}-{j}")
}
fn host_veth_name(k: u8, j: usize) -> String {
    format!("cnv{k}h{j}")
}

/// Deletes whatever a previous owner of subnet `k` left behind.
fn cleanup_subnet(k: u8) -> io::Result<()> {
    let ns_prefix = format!("cnnf-{k}-");
    for ns in netns_names()? {
        if ns.starts_with(&ns_prefix) {
            tracing::info!(netns = %ns, "deleting leftover namespace");
            kill_netns_pids(&ns);
            run_quiet("ip", &["netns", "del", &ns]);
        }
    }
    let veth_prefix = format!("cnv{k}h");
    let bridge = bridge_name(k);
    for link in link_names()? {
        if link == bridge || link.starts_with(&veth_prefix) {
            tracing::info!(link = %link, "deleting leftover link");
            run_quiet("ip", &["link", "del", &link]);
        }
    }
    Ok(())
}

/// Makes bridged traffic traverse the host's iptables (FORWARD chain).
fn enable_bridge_nf() -> io::Result<()> {
    if fs::metadata(BRIDGE_NF_SYSCTL).is_err() {
        run("modprobe", &["br_netfilter"])?;
    }
    if fs::read_to_string(BRIDGE_NF_SYSCTL).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    fs::write(BRIDGE_NF_SYSCTL, "1")
        .map_err(|e| io::Error::new(e.kind(), format!("cannot write {BRIDGE_NF_SYSCTL}: {e}")))
}

/// An exclusive, cross-process claim on one lab subnet.
#[derive(Debug)]
struct SubnetLock {
    index: u8,
    path: PathBuf,
    file: Option<File>,
}

impl SubnetLock {
    fn acquire() -> io::Result<SubnetLock> {
        fs::create_dir_all(LOCK_DIR).map_err(|e| io::Error::new(e.kind(), format!("cannot create {LOCK_DIR}: {e}")))?;
        // Start at a per-process pseudo-random index to avoid contention.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as usize)
            .unwrap_or(0);
        let start = (std::process::id() as usize).wrapping_mul(31).wrapping_add(nanos) % SUBNETS;
        for off in 0..SUBNETS {
            let k = ((start + off) % SUBNETS) as u8;
            if let Some(lock) = Self::try_lock(k)? {
                return Ok(lock);
            }
        }
        Err(io::Error::other(format!(
            "all {SUBNETS} lab subnets {}.{}.0.0/16 are in use (locks in {LOCK_DIR})",
            NET_PREFIX[0], NET_PREFIX[1]
        )))
    }

    fn try_lock(k: u8) -> io::Result<Option<SubnetLock>> {
        let path = PathBuf::from(format!("{LOCK_DIR}/subnet-{k}.lock"));
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(fs::TryLockError::WouldBlock) => return Ok(None),
                Err(fs::TryLockError::Error(e)) => {
                    return Err(io::Error::new(e.kind(), format!("cannot lock {}: {e}", path.display())))
                }
            }
            // The previous owner unlinks the file before unlocking it; if we
            // locked such an unlinked file, try again with a fresh one.
            let ours = file.metadata()?;
            match fs::metadata(&path) {
                Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => {}
                _ => continue,
            }
            file.set_len(0)?;
            writeln!(file, "{}", std::process::id())?;
            return Ok(Some(SubnetLock {
                index: k,
                path,
                file: Some(file),
            }));
        }
    }
}

impl Drop for SubnetLock {
    fn drop(&mut self) {
        // Unlink while still holding the lock, then unlock by closing.
        let _ = fs::remove_file(&self.path);
        drop(self.file.take());
    }
}

/// One bridge plus N network namespaces ("fake containers") on one private
/// /24: the bridge has `.1`, containers get `.11`, `.12`, ...
///
/// Dropping the lab kills what still runs in its namespaces and deletes the
/// namespaces, veths and bridge.
#[derive(Debug)]
pub struct Lab {
    containers: Vec<FakeContainer>,
    bridge: String,
    bridge_created: bool,
    lock: SubnetLock,
}

impl Lab {
    /// Creates a bridge with a unique name on a unique private /24 (the bridge
    /// gets `.1`) and `n` namespaces, each attached by a veth pair with
    /// addresses `.11`, `.12`, ..., loopback up and a default route via the
    /// bridge. Also sets `net.bridge.bridge-nf-call-iptables=1` so the host's
    /// FORWARD chain sees traffic between them.
    pub fn new(n: usize) -> io::Result<Lab> {
        if n > MAX_CONTAINERS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a lab holds at most {MAX_CONTAINERS} containers, {n} requested"),
            ));
        }
        enable_bridge_nf()?;
        let lock = SubnetLock::acquire()?;
        let k = lock.index;
        cleanup_subnet(k)?;
        let mut lab = Lab {
            containers: Vec::with_capacity(n),
            bridge: bridge_name(k),
            bridge_created: false,
            lock,
        };
        let cidr = format!("{}/24", lab.bridge_ip());
        run("ip", &["link", "add", "name", &lab.bridge, "type", "bridge"])?;
        lab.bridge_created = true;
        run("ip", &["addr", "add", &cidr, "dev", &lab.bridge])?;
        run("ip", &["link", "set", &lab.bridge, "up"])?;
        for _ in 0..n {
            lab.add_container()?;
        }
        Ok(lab)
    }

    /// The subnet index `k` (the lab uses `10.199.<k>.0/24`).
    pub fn index(&self) -> u8 {
        self.lock.index
    }

    /// All containers, in creation order.
    pub fn containers(&self) -> &[FakeContainer] {
        &self.containers
    }

    /// Container `i` (panics if out of range).
    pub fn container(&self, i: usize) -> &FakeContainer {
        &self.containers[i]
    }

    /// The bridge's interface name.
    pub fn bridge_name(&self) -> &str {
        &self.bridge
    }

    /// The bridge's address (`.1` of the subnet), the containers' gateway.
    pub fn bridge_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(NET_PREFIX[0], NET_PREFIX[1], self.lock.index, 1)
    }

    /// The lab's network address and prefix length, e.g. `(10.199.7.0, 24)`.
    pub fn subnet(&self) -> (Ipv4Addr, u8) {
        (Ipv4Addr::new(NET_PREFIX[0], NET_PREFIX[1], self.lock.index, 0), 24)
    }

    /// Adds one more namespace to the lab (a new container appears) and
    /// returns it.
    pub fn add_container(&mut self) -> io::Result<&FakeContainer> {
        let j = self.containers.len();
        if j >= MAX_CONTAINERS {
            return Err(io::Error::other(format!(
                "lab {} is full ({MAX_CONTAINERS} containers)",
                self.bridge
            )));
        }
        let k = self.lock.index;
        let c = FakeContainer {
            name: netns_name(k, j),
            ip: Ipv4Addr::new(NET_PREFIX[0], NET_PREFIX[1], k, FIRST_HOST + j as u8),
            host_veth: host_veth_name(k, j),
        };
        if let Err(e) = self.plumb(&c) {
            c.destroy();
            return Err(e);
        }
        self.containers.push(c);
        Ok(&self.containers[j])
    }

    fn plumb(&self, c: &FakeContainer) -> io::Result<()> {
        let ns = c.name.as_str();
        let addr = format!("{}/24", c.ip);
        let gw = self.bridge_ip().to_string();
        run("ip", &["netns", "add", ns])?;
        run(
            "ip",
            &[
                "link",
                "add",
                &c.host_veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            ],
        )?;
        run("ip", &["link", "set", &c.host_veth, "master", &self.bridge, "up"])?;
        run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        run("ip", &["-n", ns, "addr", "add", &addr, "dev", "eth0"])?;
        run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
        run("ip", &["-n", ns, "route", "add", "default", "via", &gw])?;
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &self.containers {
            c.destroy();
        }
        if self.bridge_created {
            run_quiet("ip", &["link", "del", &self.bridge]);
        }
        // `lock` is released after this, when the fields drop.
    }
}

/// A network namespace in a [`Lab`], standing in for a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeContainer {
    name: String,
    ip: Ipv4Addr,
    host_veth: String,
}

impl FakeContainer {
    /// The network namespace name (as in `ip netns list`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The container's address on the lab bridge.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The host-side end of the container's veth pair (a bridge port).
    pub fn host_veth(&self) -> &str {
        &self.host_veth
    }

    /// The namespace's bind-mount path, `/run/netns/<name>`.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// A `Command` running `program args` inside the namespace
    /// (`ip netns exec <ns> program args`), to configure and run as you like.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]).args(args);
        cmd
    }

    /// Runs a command inside the namespace and returns its output, whatever
    /// its exit status (an error only if it could not be run at all).
    pub fn exec(&self, program: &str, args: &[&str]) -> io::Result<Output> {
        self.command(program, args).stdin(Stdio::null()).output().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "`ip netns exec {} {}` could not be started: {e}",
                    self.name,
                    cmdline(program, args)
                ),
            )
        })
    }

    /// Spawns a long-running command inside the namespace (stdin closed,
    /// stdout/stderr inherited); the returned guard kills it on drop.
    pub fn spawn(&self, program: &str, args: &[&str]) -> io::Result<ChildGuard> {
        let child = self.command(program, args).stdin(Stdio::null()).spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "`ip netns exec {} {}` could not be spawned: {e}",
                    self.name,
                    cmdline(program, args)
                ),
            )
        })?;
        Ok(ChildGuard::new(child))
    }

    /// Runs `f` on a fresh OS thread that has entered this namespace (setns),
    /// so it can open real sockets inside it; returns `f`'s result. Sockets
    /// keep their namespace after the thread ends. A panic in `f` is
    /// propagated.
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
        let path = self.netns_path();
        let ns =
            File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))?;
        let handle =
            std::thread::Builder::new()
                .name(format!("netns-{}", self.name))
                .spawn(move || -> io::Result<T> {
                    nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| {
                        io::Error::new(
                            io::Error::from(e).kind(),
                            format!("setns({}) failed: {e}", path.display()),
                        )
                    })?;
                    drop(ns);
                    Ok(f())
                })?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Listens on `(ip, port)` inside the namespace (`port` 0 picks one) and
    /// serves connections in background threads: each is echoed until the
    /// peer closes. Stops on drop.
    pub fn tcp_listen(&self, port: u16) -> io::Result<TcpServerGuard> {
        let ip = self.ip;
        let listener = self.run_in(move || TcpListener::bind((ip, port)))??;
        TcpServerGuard::serve(listener)
    }

    /// One TCP connect from inside the namespace to `dst`, with a timeout.
    /// Returns how long the handshake took; an error if refused or timed out.
    pub fn tcp_connect(&self, dst: SocketAddrV4, timeout: Duration) -> io::Result<Duration> {
        self.run_in(move || {
            let start = Instant::now();
            let stream = TcpStream::connect_timeout(&SocketAddr::V4(dst), timeout)?;
            let took = start.elapsed();
            drop(stream);
            Ok(took)
        })?
    }

    fn destroy(&self) {
        kill_netns_pids(&self.name);
        // Deleting the host end destroys the pair at once; the namespace
        // itself may linger in the kernel while sockets still reference it.
        if link_exists(&self.host_veth) {
            run_quiet("ip", &["link", "del", &self.host_veth]);
        }
        run_quiet("ip", &["netns", "del", &self.name]);
    }
}

/// A child process that is killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    /// Guards an already spawned child (e.g. from [`FakeContainer::command`]).
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard { child: Some(child) }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The underlying child, e.g. to take piped stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child already reaped")
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the process now and returns its exit status.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| io::Error::other("child already reaped"))?;
        let _ = child.kill();
        child.wait()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A TCP echo server bound inside a namespace; stops on drop.
#[derive(Debug)]
pub struct TcpServerGuard {
    addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl TcpServerGuard {
    fn serve(listener: TcpListener) -> io::Result<TcpServerGuard> {
        let addr = match listener.local_addr()? {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(a) => return Err(io::Error::other(format!("unexpected IPv6 listener {a}"))),
        };
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let thread = {
            let stop = Arc::clone(&stop);
            let accepted = Arc::clone(&accepted);
            std::thread::Builder::new()
                .name(format!("tcp-echo-{addr}"))
                .spawn(move || accept_loop(listener, stop, accepted))?
        };
        Ok(TcpServerGuard {
            addr,
            stop,
            accepted,
            thread: Some(thread),
        })
    }

    /// The address it listens on (inside the namespace).
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How many connections were accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TcpServerGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, stop: Arc<AtomicBool>, accepted: Arc<AtomicUsize>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                accepted.fetch_add(1, Ordering::SeqCst);
                let stop = Arc::clone(&stop);
                if let Ok(h) = std::thread::Builder::new()
                    .name("tcp-echo-conn".into())
                    .spawn(move || echo(stream, &stop))
                {
                    conns.push(h);
                }
                conns.retain(|h| !h.is_finished());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!("tcp echo accept failed: {e}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    for h in conns {
        let _ = h.join();
    }
}

fn echo(mut stream: TcpStream, stop: &AtomicBool) {
    use std::io::Read as _;
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(Duration::from_millis(50))).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}
