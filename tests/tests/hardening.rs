//! A live sandbox's state is private and its helpers are confined: every
//! directory under the state directory is 0700 and every file, log and
//! socket 0600 (mount points of the container's filesystems excepted: they
//! show the mounted filesystem); QEMU runs under its seccomp sandbox with
//! CAP_IPC_LOCK as its only capability, and virtiofsd in its own mount
//! namespace.
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use capsule_tests::{text, Env};

fn walk(dir: &Path, dev: u64, out: &mut Vec<(PathBuf, std::fs::Metadata)>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        let m = std::fs::symlink_metadata(&p)?;
        if m.dev() != dev {
            // A mount point (the container's rootfs, a bind mount): the
            // mounted filesystem's own modes.
            continue;
        }
        out.push((p.clone(), m.clone()));
        if m.is_dir() {
            walk(&p, dev, out)?;
        }
    }
    Ok(())
}

fn status_field(pid: u32, field: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
}

#[test]
fn a_live_sandbox_is_private_and_its_helpers_confined() -> Result<()> {
    let env = Env::start()?;
    let o = env.run(&["-d"], "perm1", &["sleep", "600"])?;
    ensure!(o.status.success(), "{}", text(&o));
    let dir = env.sandbox_dir("perm1");
    capsule_tests::wait_for("the sandbox record", Duration::from_secs(120), || {
        env.sandbox_record("perm1")
            .filter(|r| r["qemu"]["pid"].is_u64())
    })?;

    let mut bad = Vec::new();
    for d in [
        env.state_dir.clone(),
        env.state_dir.join("sandboxes"),
        dir.clone(),
    ] {
        let mode = std::fs::metadata(&d)?.mode() & 0o7777;
        if mode != 0o700 {
            bad.push(format!("{} is {mode:o}, not 700", d.display()));
        }
    }
    let mut all = Vec::new();
    walk(&dir, std::fs::metadata(&dir)?.dev(), &mut all)?;
    let mut kinds = std::collections::BTreeSet::new();
    for (p, m) in &all {
        let mode = m.mode() & 0o7777;
        let ft = m.file_type();
        let (kind, want) = if ft.is_dir() {
            ("directory", 0o700)
        } else if ft.is_socket() {
            ("socket", 0o600)
        } else if ft.is_file() {
            ("file", 0o600)
        } else if ft.is_symlink() {
            bad.push(format!("{} is a symlink", p.display()));
            continue;
        } else {
            ("other", 0o600)
        };
        kinds.insert(kind);
        if mode != want {
            bad.push(format!("{kind} {} is {mode:o}, not {want:o}", p.display()));
        }
    }
    ensure!(bad.is_empty(), "not private:\n{}", bad.join("\n"));
    for want in ["directory", "socket", "file"] {
        ensure!(kinds.contains(want), "no {want} was checked: {kinds:?}");
    }
    for name in [
        "sandbox.json",
        "devices.json",
        "vm/qmp.sock",
        "vm/agent.sock",
        "vm/console.log",
        "virtiofsd.sock",
        "virtiofsd.log",
    ] {
        ensure!(
            all.iter().any(|(p, _)| p == &dir.join(name)),
            "{name} was not among the checked paths"
        );
    }

    // QEMU under its seccomp filter; virtiofsd in a mount namespace of its
    // own.
    let rec = env.sandbox_record("perm1").context("sandbox.json")?;
    let qemu = rec["qemu"]["pid"].as_u64().context("QEMU pid")? as u32;
    ensure!(
        status_field(qemu, "Seccomp").as_deref() == Some("2"),
        "QEMU's Seccomp is {:?}",
        status_field(qemu, "Seccomp")
    );
    // QEMU keeps CAP_IPC_LOCK (VFIO pins guest memory) and nothing else,
    // although it runs as root.
    for field in ["CapEff", "CapPrm", "CapBnd"] {
        let v = status_field(qemu, field).unwrap_or_default();
        ensure!(
            u64::from_str_radix(&v, 16).ok() == Some(1 << 14),
            "QEMU's {field} is {v:?}, not CAP_IPC_LOCK alone (0000000000004000)"
        );
    }
    for field in ["CapInh", "CapAmb"] {
        let v = status_field(qemu, field).unwrap_or_default();
        ensure!(
            u64::from_str_radix(&v, 16).ok() == Some(0),
            "QEMU's {field} is {v:?}"
        );
    }
    let vfs = rec["virtiofsd"]["pid"].as_u64().context("virtiofsd pid")? as u32;
    let ns = |pid: String| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    // virtiofsd (or the child it serves from) in a mount namespace of its
    // own.
    let children: Vec<u32> = std::fs::read_to_string(format!("/proc/{vfs}/task/{vfs}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect();
    let host = ns("self".into());
    ensure!(
        std::iter::once(vfs)
            .chain(children.iter().copied())
            .any(|p| ns(p.to_string()).is_some_and(|n| Some(n) != host)),
        "virtiofsd (pid {vfs}, children {children:?}) shares the host's mount namespace"
    );
    env.remove("perm1");
    env.assert_clean(Duration::from_secs(60))?;
    Ok(())
}
