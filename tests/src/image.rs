//! The busybox test image: an OCI image layout tarball built by hand from
//! the host's busybox-static, and the blob helpers the CRI suite's image
//! shares.
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Result};

use crate::{target_dir, IMAGE};

pub(crate) fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    let s = String::from_utf8_lossy(&out.stdout);
    s.split_whitespace()
        .next()
        .map(String::from)
        .ok_or_else(|| anyhow!("sha256sum {}: no output", path.display()))
}

pub(crate) fn blob(dir: &Path, bytes: &[u8]) -> Result<(String, u64)> {
    let tmp = dir.join("blob.tmp");
    std::fs::write(&tmp, bytes)?;
    let d = sha256(&tmp)?;
    std::fs::rename(&tmp, dir.join("blobs/sha256").join(&d))?;
    Ok((format!("sha256:{d}"), bytes.len() as u64))
}

/// `base/image-<our pid>`, emptied, after removing the image directories
/// of earlier test processes that are gone.
/// The tarball of the layer `root` at `layer`: sorted names, owner and
/// group 0, so the same tree gives the same digest.
pub(crate) fn tar_layer(root: &Path, layer: &Path) -> Result<()> {
    let st = Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-C",
        ])
        .arg(root)
        .arg("-cf")
        .arg(layer)
        .arg(".")
        .status()?;
    if !st.success() {
        bail!("tar of the layer {} failed: {st}", root.display());
    }
    Ok(())
}

pub(crate) fn fresh_image_dir(base: &Path) -> PathBuf {
    if let Ok(d) = std::fs::read_dir(base) {
        for e in d.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("image-")
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let out = base.join(format!("image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    out
}

/// An OCI image layout tarball with one layer: busybox-static and its
/// applet links. Built once per test process.
pub(crate) fn build_image() -> Result<PathBuf> {
    let out = fresh_image_dir(&target_dir().join("e2e"));
    let root = out.join("rootfs");
    for d in [
        "bin", "dev", "proc", "sys", "tmp", "etc", "root", "run", "mnt",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("busybox not found (apt-get install busybox-static)"))?;
    std::fs::copy(&busybox, root.join("bin/busybox"))?;
    std::fs::set_permissions(
        root.join("bin/busybox"),
        std::fs::Permissions::from_mode(0o755),
    )?;
    let list = Command::new(&busybox).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" {
            continue;
        }
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(root.join("etc/group"), "root:x:0:\n")?;
    layout_tarball(
        &out,
        &root,
        &[(
            IMAGE,
            serde_json::json!({"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"}),
        )],
        "image.tar",
    )
}

/// An OCI image layout under `out/layout` with one layer, the tree `root`,
/// and one image per `(name, config)` sharing it, packed as `out/<tarball>`
/// for `ctr images import`.
pub(crate) fn layout_tarball(
    out: &Path,
    root: &Path,
    images: &[(&str, serde_json::Value)],
    tarball: &str,
) -> Result<PathBuf> {
    let layout = out.join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256"))?;
    let layer = out.join("layer.tar");
    tar_layer(root, &layer)?;
    let (layer_digest, layer_size) = blob(&layout, &std::fs::read(&layer)?)?;
    let mut manifests = Vec::new();
    for (name, config) in images {
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
    let tarball = out.join(tarball);
    let st = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tarball)
        .args(["oci-layout", "index.json", "blobs"])
        .status()?;
    if !st.success() {
        bail!("tar of the image layout {} failed: {st}", layout.display());
    }
    Ok(tarball)
}
