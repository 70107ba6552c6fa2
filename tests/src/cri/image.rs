//! The suite's two images, built locally (no registry): one OCI layout
//! tarball holding a busybox image (`sh` by default) and a pause image
//! (`sleep infinity`, the sandbox image), sharing one layer: the e2e
//! harness's busybox-static rootfs plus the files the security-context
//! cases mask or make read-only.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};

use crate::blob;

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
    let layout = out.join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256"))?;
    let layer = out.join("layer.tar");
    crate::image::tar_layer(&root, &layer)?;
    let (layer_digest, layer_size) = blob(&layout, &std::fs::read(&layer)?)?;
    let mut manifests = Vec::new();
    for (name, config) in [
        (
            BUSYBOX,
            serde_json::json!({"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"}),
        ),
        (
            PAUSE,
            serde_json::json!({"Env": ["PATH=/bin"], "Entrypoint": ["/bin/sleep", "infinity"], "WorkingDir": "/"}),
        ),
    ] {
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        });
        let (config_digest, config_size) = blob(&layout, &serde_json::to_vec(&config)?)?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}],
        });
        let (digest, size) = blob(&layout, &serde_json::to_vec(&manifest)?)?;
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": "latest"
            }
        }));
    }
    let index = serde_json::json!({"schemaVersion": 2, "manifests": manifests});
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let tarball = out.join("images.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tarball)
        .args(["oci-layout", "index.json", "blobs"]))?;
    Ok(tarball)
}
