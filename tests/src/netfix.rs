//! Network fixtures for tests and benchmarks: network namespaces made by
//! the caller (the "node", pods), veth pairs between them, commands run
//! inside them. Everything is removed on drop; no traffic leaves them.
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{ensure, Result};

use crate::{run_with_timeout, text};

/// `sh -c cmd`, with a 60 s deadline.
pub fn sh(cmd: &str) -> Result<Output> {
    run_with_timeout(
        {
            let mut c = Command::new("sh");
            c.args(["-c", cmd]);
            c
        },
        Duration::from_secs(60),
    )
}

pub fn sh_ok(cmd: &str) -> Result<String> {
    let o = sh(cmd)?;
    ensure!(o.status.success(), "`{cmd}` failed: {}", text(&o));
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// A network namespace made by the test, deleted on drop.
pub struct Netns {
    pub name: String,
    pub path: PathBuf,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Self> {
        let name = format!("capnet-{tag}-{}", std::process::id());
        let _ = sh(&format!("ip netns del {name} 2>/dev/null"));
        sh_ok(&format!("ip netns add {name}"))?;
        sh_ok(&format!("ip -n {name} link set lo up"))?;
        Ok(Self {
            path: PathBuf::from(format!("/run/netns/{name}")),
            name,
        })
    }

    /// `cmd` in this namespace (through nsenter, like containerd's).
    pub fn sh(&self, cmd: &str) -> Result<String> {
        sh_ok(&format!(
            "nsenter --net={} sh -c '{cmd}'",
            self.path.display()
        ))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&format!("ip netns del {}", self.name));
    }
}

/// A pod namespace with one veth to the node (what CNI makes), owned by the
/// test: it must outlive every failure.
pub struct PodNs {
    pub ns: Netns,
    pub node_end: String,
}

impl PodNs {
    /// A pod namespace `tag` with `eth0` (10.<n>.0.2/24, `mtu`) whose peer
    /// in `node` has 10.<n>.0.1/24.
    pub fn new(tag: &str, node: &Netns, mtu: u32, n: u8) -> Result<Self> {
        let ns = Netns::new(tag)?;
        let node_end = format!("vn{n}x{}", std::process::id() % 10000);
        sh_ok(&format!(
            "ip link add {node_end} netns {node} mtu {mtu} type veth peer name eth0 netns {pod} mtu {mtu}",
            node = node.name,
            pod = ns.name
        ))?;
        sh_ok(&format!(
            "ip -n {} addr add 10.{n}.0.2/24 dev eth0",
            ns.name
        ))?;
        sh_ok(&format!("ip -n {} link set eth0 up", ns.name))?;
        sh_ok(&format!(
            "ip -n {} addr add 10.{n}.0.1/24 dev {node_end}",
            node.name
        ))?;
        sh_ok(&format!("ip -n {} link set {node_end} up", node.name))?;
        Ok(Self { ns, node_end })
    }

    /// The pod side as CNI left it: eth0 present, no tap, no ingress qdisc
    /// or filter of capsule's.
    pub fn assert_untouched(&self) -> Result<()> {
        let links = self.ns.sh("ip -o link show")?;
        ensure!(links.contains("eth0"), "the pod's link is gone: {links}");
        ensure!(!links.contains("cap_"), "a tap is left: {links}");
        let qdisc = self.ns.sh("tc qdisc show dev eth0")?;
        ensure!(
            !qdisc.contains("ingress"),
            "an ingress qdisc is left: {qdisc}"
        );
        let filters = self
            .ns
            .sh("tc filter show dev eth0 ingress 2>/dev/null || true")?;
        ensure!(filters.trim().is_empty(), "a filter is left: {filters}");
        Ok(())
    }
}
