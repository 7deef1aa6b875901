//! The demo's "containers": one Linux network namespace per storefront
//! service, each on a veth pair attached to one bridge, on one /24.
//!
//! Every name the demo creates starts with its prefix (namespaces
//! `<prefix>-<service>`, bridge `<prefix>br`, host-side veths
//! `<prefix>h<n>`), so [`destroy`] can find and remove everything a run left
//! behind, even when the run that made it crashed. Bridged traffic must
//! cross iptables for the agent to see it, so the lab turns on
//! `br_netfilter`.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

use crate::storefront::{Service, FIRST_HOST, SERVICES};

const BRIDGE_NF_SYSCTL: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// The demo network: its prefix and subnet.
#[derive(Debug, Clone)]
pub struct Lab {
    prefix: String,
    subnet: Ipv4Addr,
}

impl Lab {
    /// Describes the lab with `prefix` on `subnet` (a /24, given by its
    /// network address); creates nothing.
    pub fn new(prefix: &str, subnet: Ipv4Addr) -> anyhow::Result<Lab> {
        // Interface names are at most 15 bytes: `<prefix>h<nnn>` must fit.
        if prefix.is_empty()
            || prefix.len() > 8
            || !prefix.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            bail!("--prefix {prefix:?}: use 1 to 8 lowercase letters or digits");
        }
        if subnet.octets()[3] != 0 {
            bail!("--subnet {subnet}: give the network address of a /24 (last octet 0)");
        }
        Ok(Lab {
            prefix: prefix.to_owned(),
            subnet,
        })
    }

    /// The namespace of `service`.
    pub fn namespace(&self, service: &Service) -> String {
        format!("{}-{}", self.prefix, service.name)
    }

    /// The address of the n-th service.
    pub fn address_of(&self, index: usize) -> Ipv4Addr {
        let [a, b, c, _] = self.subnet.octets();
        Ipv4Addr::new(a, b, c, FIRST_HOST + index as u8)
    }

    /// The bridge's (gateway's) address.
    pub fn gateway(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.subnet.octets();
        Ipv4Addr::new(a, b, c, 1)
    }

    fn bridge(&self) -> String {
        format!("{}br", self.prefix)
    }

    /// The host-side veth of service `index` (the inventory's `interface`).
    pub fn host_veth(&self, index: usize) -> String {
        format!("{}h{}", self.prefix, index)
    }

    /// Creates the bridge and one namespace per service. Whatever an
    /// earlier run with this prefix left is removed first.
    pub fn create(&self) -> anyhow::Result<()> {
        destroy(&self.prefix)?;
        enable_bridge_netfilter()?;
        let bridge = self.bridge();
        run("ip", &["link", "add", "name", &bridge, "type", "bridge"])?;
        run(
            "ip",
            &["addr", "add", &format!("{}/24", self.gateway()), "dev", &bridge],
        )?;
        run("ip", &["link", "set", &bridge, "up"])?;
        for (index, service) in SERVICES.iter().enumerate() {
            let namespace = self.namespace(service);
            let host_veth = self.host_veth(index);
            run("ip", &["netns", "add", &namespace])?;
            run(
                "ip",
                &[
                    "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns", &namespace,
                ],
            )?;
            run("ip", &["link", "set", &host_veth, "master", &bridge, "up"])?;
            let address = format!("{}/24", self.address_of(index));
            run("ip", &["-n", &namespace, "link", "set", "lo", "up"])?;
            run("ip", &["-n", &namespace, "addr", "add", &address, "dev", "eth0"])?;
            run("ip", &["-n", &namespace, "link", "set", "eth0", "up"])?;
            run(
                "ip",
                &[
                    "-n",
                    &namespace,
                    "route",
                    "add",
                    "default",
                    "via",
                    &self.gateway().to_string(),
                ],
            )?;
        }
        Ok(())
    }

    /// A command that runs `program` inside `service`'s namespace.
    pub fn command_in(&self, service: &Service, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.namespace(service), program]);
        command
    }
}

/// Names of the namespaces that start with `<prefix>-`.
pub fn namespaces(prefix: &str) -> anyhow::Result<Vec<String>> {
    let listing = run("ip", &["netns", "list"])?;
    let start = format!("{prefix}-");
    Ok(listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(&start))
        .map(str::to_owned)
        .collect())
}

/// Names of the network interfaces that start with `prefix` (the bridge and
/// the host-side veths).
pub fn links(prefix: &str) -> anyhow::Result<Vec<String>> {
    let listing = run("ip", &["-o", "link", "show"])?;
    let bridge = format!("{prefix}br");
    let veth = format!("{prefix}h");
    Ok(listing
        .lines()
        .filter_map(|line| line.split(':').nth(1))
        .map(|name| name.trim().split('@').next().unwrap_or_default().to_owned())
        .filter(|name| *name == bridge || name.strip_prefix(&veth).is_some_and(|n| n.parse::<u16>().is_ok()))
        .collect())
}

/// Processes running inside the namespaces of `prefix`.
pub fn processes(prefix: &str) -> anyhow::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for namespace in namespaces(prefix)? {
        let listing = run("ip", &["netns", "pids", &namespace]).unwrap_or_default();
        pids.extend(listing.split_whitespace().filter_map(|pid| pid.parse::<u32>().ok()));
    }
    Ok(pids)
}

/// Kills every process inside the namespaces of `prefix`, then removes the
/// namespaces, the veths and the bridge. Removing nothing is not an error.
pub fn destroy(prefix: &str) -> anyhow::Result<()> {
    for pid in processes(prefix)? {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
    for namespace in namespaces(prefix)? {
        run("ip", &["netns", "del", &namespace])?;
    }
    for link in links(prefix)? {
        // Deleting a namespace deletes its veth peer, and with it the host
        // side; only what is still there is deleted here.
        let _ = run("ip", &["link", "del", &link]);
    }
    let left = links(prefix)?;
    if !left.is_empty() {
        bail!("could not delete the interfaces {left:?}");
    }
    Ok(())
}

fn enable_bridge_netfilter() -> anyhow::Result<()> {
    if std::fs::metadata(BRIDGE_NF_SYSCTL).is_err() {
        run("modprobe", &["br_netfilter"]).context("the agent sees bridged traffic only with br_netfilter")?;
    }
    std::fs::write(BRIDGE_NF_SYSCTL, "1").with_context(|| format!("writing 1 to {BRIDGE_NF_SYSCTL}"))
}

/// Runs a command to completion and returns its standard output; an error
/// names the command and what it printed.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting `{program} {}`", args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
