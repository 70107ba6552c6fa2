//! capsule installed like a node: `shim/install.sh` (what `make install`
//! runs) into a private DESTDIR, and containerd started the way an init
//! system starts it, with nothing but `PATH=/usr/sbin:/usr/bin:/sbin:/bin`
//! (no HOME, so no ~/.cargo/bin; no CAPSULE_CONFIG). The configuration names
//! virtiofsd by its bare name, so the shim must find the Rust virtiofsd the
//! install put in `<prefix>/libexec/capsule`, next to the `<prefix>/bin` it
//! runs from, and never QEMU's legacy C virtiofsd in /usr/lib/qemu (Debian
//! 12 ships it; it fails every pod with `fuse: unknown option(s):
//! --shared-dir=…`). Nothing system-wide is installed: the prefix is
//! private, so containerd runs the shim by its absolute path (a node's
//! /usr/local/bin is on its init PATH; this minimal PATH has no private
//! entry to put it on).
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use capsule_tests::{text, workspace_root, CapsuleOptions, Env, SERVICE_PATH};

#[test]
fn ctr_run_with_an_installed_capsule_under_a_service_managers_environment() -> Result<()> {
    // Fails naming what is missing before anything is installed.
    capsule_tests::require_ready();
    let root = tempfile::Builder::new()
        .prefix("cap-node-")
        .tempdir_in("/tmp")?;
    let o = Command::new(workspace_root().join("shim/install.sh"))
        .current_dir(workspace_root())
        .args(["--profile", "debug", "--destdir"])
        .arg(root.path())
        .output()
        .context("running shim/install.sh")?;
    ensure!(o.status.success(), "shim/install.sh: {}", text(&o));
    let prefix = root.path().join("usr/local");
    let shim = prefix.join("bin/containerd-shim-capsule-v2");
    let virtiofsd = prefix.join("libexec/capsule/virtiofsd");
    ensure!(
        shim.is_file() && virtiofsd.is_file(),
        "install.sh installed no shim or virtiofsd under {}",
        prefix.display()
    );

    let mut env = Env::start_with(CapsuleOptions {
        service_env: true,
        virtiofsd: Some("virtiofsd".into()),
        guest_dir: Some(prefix.join("share/capsule")),
        ..Default::default()
    })?;
    env.runtime = shim.display().to_string();

    // containerd's environment is the minimal one.
    let pid = env.containerd_pid().context("containerd is not running")?;
    let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
    let vars: Vec<String> = environ
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    ensure!(
        vars.contains(&format!("PATH={SERVICE_PATH}"))
            && !vars
                .iter()
                .any(|v| v.starts_with("HOME=") || v.starts_with("CAPSULE_")),
        "containerd's environment: {vars:?}"
    );
    let cfg = env.config_path.display().to_string();
    let cfg_text = std::fs::read_to_string(&env.config_path)?;
    ensure!(cfg_text.contains("path = \"virtiofsd\""), "{cfg_text}");

    // `capsule check`, as an admin on that node would run it.
    let o = Command::new(prefix.join("bin/capsule"))
        .env_clear()
        .env("PATH", SERVICE_PATH)
        .args(["--config", &cfg, "check"])
        .output()?;
    let check = String::from_utf8_lossy(&o.stdout).into_owned();
    let ok_line = format!("ok    virtiofsd: {} (virtiofsd ", virtiofsd.display());
    ensure!(check.contains(&ok_line), "capsule check:\n{check}");
    // capsule's virtiofsd build (scripts/virtiofsd/), which caches failed
    // lookups, is the one installed.
    ensure!(
        check.contains("negative lookups cached)"),
        "capsule check:\n{check}"
    );
    eprintln!("capsule check (virtiofsd lines):");
    for l in check.lines().filter(|l| l.contains("virtiofsd")) {
        eprintln!("  {l}");
    }

    let o = env.run(
        &["--rm", "--runtime-config-path", &cfg],
        "n1",
        &["sh", "-c", "echo from an installed node"],
    )?;
    ensure!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("from an installed node"),
        "{}\n{}",
        text(&o),
        env.containerd_log_tail()
    );
    // The shim started the installed virtiofsd (its exit is logged with
    // the program path).
    let log = std::fs::read_to_string(env.dir.path().join("containerd.log"))?;
    let started: Vec<PathBuf> = log
        .lines()
        .filter(|l| l.contains("msg=\"process exited\""))
        .filter_map(|l| l.split("program=").nth(1))
        .filter_map(|p| p.split_whitespace().next())
        .map(PathBuf::from)
        .filter(|p| p.file_name().is_some_and(|n| n == "virtiofsd"))
        .collect();
    ensure!(
        started == [virtiofsd.clone()],
        "virtiofsd processes: {started:?}, wanted {}",
        virtiofsd.display()
    );
    env.assert_clean(Duration::from_secs(60))
}
