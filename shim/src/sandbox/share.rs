//! A container's files in the sandbox share: its rootfs (mounted in the
//! bundle, bind-mounted to `shared/<cid>/rootfs`) and the sources of its
//! bind mounts (bind-mounted to `shared/<cid>/mounts/<n>-<name>`, the spec
//! rewritten to those share-relative paths, which the agent resolves under
//! its share mount).
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

use super::{ContainerRequest, SharedRootfs};
use crate::error::{Error, Result};
use crate::mount;

fn is_bind(m: &oci_spec::runtime::Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

fn is_read_only(m: &oci_spec::runtime::Mount) -> bool {
    m.options()
        .as_ref()
        .is_some_and(|o| o.iter().any(|x| x == "ro"))
}

/// Mounts and shares the container's filesystem; all or nothing.
pub fn prepare(shared_dir: &Path, c: &ContainerRequest) -> Result<SharedRootfs> {
    let rootfs = c.bundle.join("rootfs");
    let mut out = SharedRootfs {
        guest_rootfs: format!("{}/rootfs", c.id),
        spec: c.spec.clone(),
        share_mounts: Vec::new(),
        rootfs_mounted: false,
    };
    let result = (|| -> Result<()> {
        // With rootfs mounts the shim mounts them on `bundle/rootfs`;
        // without (`ctr run --rootfs`, `--config`), the spec's root path is
        // the rootfs as it is.
        let source = if !c.rootfs.is_empty() {
            mount::mount_rootfs(&c.rootfs, &rootfs)?;
            out.rootfs_mounted = true;
            rootfs.clone()
        } else {
            let root = c
                .spec
                .root()
                .as_ref()
                .map(|r| r.path().clone())
                .unwrap_or_else(|| PathBuf::from("rootfs"));
            let root = if root.is_absolute() {
                root
            } else {
                c.bundle.join(root)
            };
            if !root.is_dir() {
                return Err(Error::invalid(format!(
                    "container {}: no rootfs mounts were given and the spec's root {} is not a directory",
                    c.id,
                    root.display()
                )));
            }
            root
        };
        let read_only = c
            .spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false);
        let cdir = shared_dir.join(&c.id);
        let rel = Path::new(&c.id).join("rootfs");
        mount::bind_below(
            shared_dir,
            &rel,
            &source,
            read_only,
            mount::Propagation::FromHost,
        )?;
        out.share_mounts.push(shared_dir.join(rel));
        share_bind_mounts(shared_dir, &cdir, &c.id, &mut out)?;
        Ok(())
    })();
    if let Err(e) = result {
        if let Err(u) = release(shared_dir, &c.id, &c.bundle, out.rootfs_mounted) {
            return Err(e.note(format!("undoing the mounts failed too: {u}")));
        }
        return Err(e);
    }
    Ok(out)
}

fn share_bind_mounts(
    shared_dir: &Path,
    cdir: &Path,
    cid: &str,
    out: &mut SharedRootfs,
) -> Result<()> {
    let Some(mounts) = out.spec.mounts().clone() else {
        return Ok(());
    };
    let mut rewritten = mounts.clone();
    for (i, m) in mounts.iter().enumerate() {
        if !is_bind(m) {
            continue;
        }
        let Some(src) = m.source().as_ref().filter(|s| s.is_absolute()) else {
            continue;
        };
        let meta = std::fs::metadata(src).map_err(|e| {
            crate::error::io(
                format!(
                    "container {cid}: bind mount source {} (for {})",
                    src.display(),
                    m.destination().display()
                ),
                e,
            )
        })?;
        if !meta.is_dir() && !meta.is_file() {
            return Err(Error::invalid(format!(
                "container {cid}: bind mount source {} is neither a file nor a directory; it cannot be shared into the VM",
                src.display()
            )));
        }
        let base = src
            .file_name()
            .map(|b| b.to_string_lossy().into_owned())
            .unwrap_or_else(|| "root".into());
        let name = format!("{i}-{base}");
        let rel = Path::new(cid).join("mounts").join(&name);
        let propagation = if m
            .options()
            .iter()
            .flatten()
            .any(|o| o == "rprivate" || o == "private")
        {
            mount::Propagation::Private
        } else {
            mount::Propagation::FromHost
        };
        mount::bind_below(shared_dir, &rel, src, is_read_only(m), propagation)?;
        out.share_mounts.push(cdir.join("mounts").join(&name));
        rewritten[i].set_source(Some(PathBuf::from(format!("{cid}/mounts/{name}"))));
    }
    out.spec.set_mounts(Some(rewritten));
    Ok(())
}

/// Unmounts the container's share entries and (if the shim mounted it) its
/// bundle rootfs; removes `shared/<cid>`. Idempotent.
pub fn release(shared_dir: &Path, cid: &str, bundle: &Path, rootfs_mounted: bool) -> Result<()> {
    let cdir = shared_dir.join(cid);
    let mut errors = mount::unmount_under(&cdir);
    if errors.is_empty()
        && cdir.exists()
        && mount::mounts_under(&mount::mount_points(), &cdir).is_empty()
    {
        if let Err(e) = std::fs::remove_dir_all(&cdir) {
            errors.push(format!("removing {}: {e}", cdir.display()));
        }
    }
    if rootfs_mounted {
        errors.extend(mount::unmount_under(&bundle.join("rootfs")));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Error::internal(format!(
            "container {cid}: {}",
            errors.join("; ")
        )))
    }
}

/// The spec as the agent gets it: the JSON encoding.
pub fn spec_json(spec: &Spec) -> Result<Vec<u8>> {
    serde_json::to_vec(spec).map_err(|e| Error::internal(format!("encoding the OCI spec: {e}")))
}
