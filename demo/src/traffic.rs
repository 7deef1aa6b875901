//! What runs inside the demo's containers: a server that answers every
//! connection with one line, a driver that keeps connecting to the
//! services a container normally uses, and a one-shot probe the attacker
//! uses. Each is a `cnnf-demo` subcommand started with `ip netns exec`, so
//! its sockets live in the container's namespace.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

/// Accepts connections on `port` forever; each gets `name` and a newline.
pub fn serve(port: u16, name: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("listening on port {port}"))?;
    let greeting = format!("{name}\n");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.write_all(greeting.as_bytes());
    }
    Ok(())
}

/// Connects to every target in turn, every `interval`, forever, reading
/// the server's line each time. Failures are counted on stderr and do not
/// stop the driver (enforcement may refuse some).
pub fn drive(targets: &[SocketAddr], interval: Duration) -> anyhow::Result<()> {
    anyhow::ensure!(!targets.is_empty(), "--to: give at least one address");
    loop {
        for target in targets {
            if let Err(error) = exchange(*target, Duration::from_secs(2)) {
                eprintln!("cnnf-demo drive: {target}: {error}");
            }
        }
        std::thread::sleep(interval);
    }
}

/// What one probe saw.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ProbeResult {
    /// The address tried.
    pub target: String,
    /// Whether the TCP handshake completed.
    pub connected: bool,
    /// The error when it did not (a dropped SYN shows as a timeout).
    pub error: Option<String>,
    /// Milliseconds until the answer or the error.
    pub millis: u64,
}

/// Tries one connection to `target` and reports what happened.
pub fn probe(target: SocketAddr, timeout: Duration) -> ProbeResult {
    let started = Instant::now();
    let outcome = exchange(target, timeout);
    ProbeResult {
        target: target.to_string(),
        connected: outcome.is_ok(),
        error: outcome.err().map(|error| error.to_string()),
        millis: started.elapsed().as_millis() as u64,
    }
}

fn exchange(target: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = [0u8; 64];
    let _ = stream.read(&mut line)?;
    Ok(())
}
