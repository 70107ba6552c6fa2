//! The end-to-end prerequisites ([`Ready`]): the built guest, the selected
//! containerd, the host tools, virtiofsd, the shim binaries and the test
//! image.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};

use crate::image::build_image;
use crate::{target_dir, workspace_root, Containerd};

/// Everything the end-to-end tests need. Panics (the tests fail, never
/// skip) naming what is missing and how to get it.
pub fn require_ready() -> &'static Ready {
    static READY: OnceLock<std::result::Result<Ready, String>> = OnceLock::new();
    match READY.get_or_init(|| ready().map_err(|e| format!("{e:#}"))) {
        Ok(r) => r,
        Err(e) => panic!("end-to-end prerequisites missing: {e}"),
    }
}

#[derive(Debug)]
pub struct Ready {
    pub shim: PathBuf,
    pub capsule: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub virtiofsd: PathBuf,
    pub image_tar: PathBuf,
    /// The image's filesystem, unpacked (for `ctr run --config`).
    pub rootfs_dir: PathBuf,
    /// The containerd of `CAPSULE_CONTAINERD`.
    pub containerd: &'static Containerd,
}

fn which(name: &str, extra: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().cloned())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn ready() -> Result<Ready> {
    let guest = std::env::var_os("CAPSULE_GUEST_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("guest"));
    // capsule's kernel boots as the uncompressed ELF (PVH), as installed;
    // Debian's fallback has only its bzImage.
    let kernel = Some(guest.join("vmlinux"))
        .filter(|k| k.is_file())
        .unwrap_or_else(|| guest.join("vmlinuz"));
    let initramfs = guest.join("initramfs.img");
    if !kernel.is_file() {
        bail!(
            "{} is missing: build the guest with `make guest`",
            kernel.display()
        );
    }
    if !initramfs.is_file() {
        bail!(
            "{} (the guest image with the agent as /init) is missing: build it with agent/build-static.sh",
            initramfs.display()
        );
    }
    let containerd = Containerd::selected()?;
    for tool in [
        "qemu-system-x86_64",
        "losetup",
        "script",
        "tar",
        "sha256sum",
    ] {
        which(tool, &[])
            .ok_or_else(|| anyhow!("{tool} not found in PATH (scripts/install-deps.sh)"))?;
    }
    // capsule's own lookup: a virtiofsd it can drive (not QEMU's C one).
    let virtiofsd = capsule_shim::config::find_virtiofsd(Path::new("virtiofsd"), false);
    let virtiofsd = match virtiofsd.found {
        Some(v) => v.path,
        None => bail!("{}", virtiofsd.error(Path::new("virtiofsd"))),
    };
    // The shim binaries: built here, as `cargo test -p capsule-tests` builds
    // only the library of capsule-shim.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["build", "-p", "capsule-shim", "--bins"])
        .status()
        .context("running cargo build -p capsule-shim --bins")?;
    if !st.success() {
        bail!("cargo build -p capsule-shim --bins failed");
    }
    let bin = target_dir().join("debug");
    let image_tar = build_image().context("building the busybox test image")?;
    let rootfs_dir = image_tar.with_file_name("rootfs");
    Ok(Ready {
        rootfs_dir,
        shim: bin.join("containerd-shim-capsule-v2"),
        capsule: bin.join("capsule"),
        kernel,
        initramfs,
        virtiofsd,
        image_tar,
        containerd,
    })
}

/// The shim and CLI: the debug build, or (`release`) what `make install`
/// ships, built by `shim/build-dist.sh` (static, size-optimised), once per
/// process.
pub fn shim_binaries(release: bool) -> Result<(PathBuf, PathBuf)> {
    static DIST: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    if !release {
        let r = require_ready();
        return Ok((r.shim.clone(), r.capsule.clone()));
    }
    let dir = DIST
        .get_or_init(|| {
            let o = Command::new(workspace_root().join("shim/build-dist.sh"))
                .stderr(Stdio::inherit())
                .output()
                .map_err(|e| format!("running shim/build-dist.sh: {e}"))?;
            if !o.status.success() {
                return Err("shim/build-dist.sh failed".into());
            }
            let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
            Ok(workspace_root().join(out))
        })
        .clone()
        .map_err(|e| anyhow!(e))?;
    Ok((dir.join("containerd-shim-capsule-v2"), dir.join("capsule")))
}
