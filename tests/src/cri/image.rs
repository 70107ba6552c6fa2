//! The suite's two images, built locally (no registry): one OCI layout
//! tarball holding a busybox image (`sh` by default) and a pause image
//! (`sleep infinity`, the sandbox image), sharing one layer: the e2e
//! harness's busybox-static rootfs plus the files the security-context
//! cases mask or make read-only.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};

pub const BUSYBOX: &str = "capsule.test/cri/busybox:latest";
pub const PAUSE: &str = "capsule.test/cri/pause:latest";

fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

/// The image tarball, built once per process under `target/cri/`.
pub fn image_tar() -> Result<&'static Path> {
    static TAR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    TAR.get_or_init(|| build().map_err(|e| format!("building the CRI test images: {e:#}")))
        .as_ref()
        .map(|p| p.as_path())
        .map_err(|e| anyhow!("{e}"))
}

fn build() -> Result<PathBuf> {
    let ready = crate::require_ready();
    let out = crate::fresh_image_dir(&crate::target_dir().join("cri"));
    std::fs::create_dir_all(&out)?;
    let root = out.join("rootfs");
    run(Command::new("cp")
        .arg("-a")
        .arg(&ready.rootfs_dir)
        .arg(&root))?;
    for d in [
        "opt/masked",
        "opt/ro",
        "opt/rw",
        "mnt/private",
        "mnt/slave",
        "mnt/bidir",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::write(root.join("opt/masked/file"), "masked-secret\n")?;
    std::fs::write(root.join("etc/masked-file"), "masked-secret\n")?;
    std::fs::write(root.join("opt/ro/file"), "ro\n")?;
    // /tmp writable by the run_as_user cases.
    run(Command::new("chmod").arg("1777").arg(root.join("tmp")))?;
    crate::image::layout_tarball(
        &out,
        &root,
        &[
            (
                BUSYBOX,
                serde_json::json!({"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"}),
            ),
            (
                PAUSE,
                serde_json::json!({"Env": ["PATH=/bin"], "Entrypoint": ["/bin/sleep", "infinity"], "WorkingDir": "/"}),
            ),
        ],
        "images.tar",
    )
}
