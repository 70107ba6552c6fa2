//! Test helpers (feature `test-utils`, root): named network namespaces made
//! with `ip`, deleted on drop, and a command runner that panics with the
//! command's output. Shared by this crate's tests and the agent's VM tests.
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::netns::Netns;
use crate::types::MacAddr;

/// Runs a command, panics with its output when it fails; returns stdout.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether a command succeeds (for "is it gone" checks).
pub fn ok(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A named network namespace (`/run/netns/<prefix>-<pid>-<n>-<tag>`) with
/// `lo` up, deleted on drop.
pub struct TestNs {
    pub name: String,
    pub path: PathBuf,
}

impl TestNs {
    pub fn new(prefix: &str, tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        sh("ip", &["netns", "add", &name]);
        let ns = Self {
            path: PathBuf::from("/run/netns").join(&name),
            name,
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> args...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        sh("ip", &a)
    }

    /// `tc -n <ns> args...`
    pub fn tc(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        sh("tc", &a)
    }

    pub fn has_link(&self, name: &str) -> bool {
        ok("ip", &["-n", &self.name, "link", "show", "dev", name])
    }

    /// The MAC address of `link`.
    pub fn mac(&self, link: &str) -> MacAddr {
        let out = self.ip(&["-o", "link", "show", "dev", link]);
        let mac = out
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or_else(|| panic!("no MAC in {out}"));
        mac.parse()
            .unwrap_or_else(|e| panic!("MAC of {link}: {e:?}"))
    }

    pub fn open(&self) -> Netns {
        Netns::open(&self.path).unwrap_or_else(|e| panic!("{}: {e}", self.path.display()))
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
