//! Which containerd the CRI suite drives, and its configuration with the CRI
//! plugin enabled (runc the default runtime, capsule a second handler).
//!
//! `CAPSULE_CONTAINERD=1.6|1.7|2.1` (default 1.6: Debian 12's, from PATH);
//! 1.7 and 2.1 come from `$CAPSULE_CONTAINERD_CACHE` (default
//! `/var/cache/capsule/containerd`)`/<major.minor>/usr/bin`, which
//! scripts/install-deps.sh fills. `CAPSULE_CRI_SANDBOXER=shim` makes the
//! capsule handler use the Sandbox API (`sandboxer = "shim"`, 2.x only).
use std::path::Path;

use anyhow::{bail, Result};

use crate::containerd::common_config;
pub use crate::containerd::Containerd;

pub const SANDBOXER_ENV: &str = "CAPSULE_CRI_SANDBOXER";

/// The runtime handler names the suite configures.
pub const RUNC_HANDLER: &str = "runc";
pub const CAPSULE_HANDLER: &str = "capsule";

/// How the capsule handler's pods are made (containerd 2.x).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sandboxer {
    /// A pause container (the default, and the only mode of 1.x).
    PodSandbox,
    /// The shim serves the Sandbox API.
    Shim,
}

impl Sandboxer {
    pub fn from_env() -> Result<Self> {
        match std::env::var(SANDBOXER_ENV).unwrap_or_default().as_str() {
            "" | "podsandbox" => Ok(Sandboxer::PodSandbox),
            "shim" => Ok(Sandboxer::Shim),
            o => bail!("{SANDBOXER_ENV}={o:?}: expected podsandbox or shim"),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Sandboxer::PodSandbox => "podsandbox",
            Sandboxer::Shim => "shim",
        }
    }
}

/// What the configuration names.
pub struct ConfigInput<'a> {
    pub dir: &'a Path,
    pub sandbox_image: &'a str,
    pub capsule_config: &'a Path,
    pub cni_conf_dir: &'a Path,
    pub cni_bin_dir: &'a Path,
    pub cdi_dir: &'a Path,
    pub sandboxer: Sandboxer,
}

/// Plugins that would touch the host beyond the private directories, or
/// that the suite does not use.
const DISABLED: &[&str] = &[
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.internal.v1.opt",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.nri.v1.nri",
];

/// The capsule handler's options table (its configuration file). In shim
/// mode the handler has no options, as CRI then creates the tasks with
/// `WithTaskAPIEndpoint`, which works only on runc's option type (containerd
/// fails "can't unmarshal type runtimeoptions.v1.Options to output
/// containerd.runc.v1.Options"): the shim reads `$CAPSULE_CONFIG` instead
/// (see [`capsule_config_env`]).
fn capsule_options(rt: &str, i: &ConfigInput) -> String {
    match i.sandboxer {
        Sandboxer::PodSandbox => format!(
            "      [{rt}.containerd.runtimes.{CAPSULE_HANDLER}.options]\n        ConfigPath = \"{}\"\n",
            i.capsule_config.display()
        ),
        Sandboxer::Shim => String::new(),
    }
}

/// containerd's environment for the capsule configuration in shim mode.
pub fn capsule_config_env(
    sandboxer: Sandboxer,
    capsule_config: &Path,
) -> Option<(&'static str, &Path)> {
    (sandboxer == Sandboxer::Shim).then_some(("CAPSULE_CONFIG", capsule_config))
}

/// A private daemon's configuration with the CRI plugin: its own root,
/// state, sockets, CNI and CDI directories under `i.dir`; network
/// namespaces under its state dir; AppArmor off (it would load a profile
/// into the host kernel); oom_score_adj kept at or above containerd's own
/// (lowering it needs CAP_SYS_RESOURCE, which CI sandboxes may lack: the
/// pause container's -998 fails runc).
pub fn cri_config(containerd: &Containerd, i: &ConfigInput) -> String {
    if containerd.version.is_2x() {
        config_v3(i)
    } else {
        config_v2(i)
    }
}

fn config_v2(i: &ConfigInput) -> String {
    let cri = r#"plugins."io.containerd.grpc.v1.cri""#;
    format!(
        r#"{common}
[{cri}]
  sandbox_image = "{pause}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [{cri}.cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "{runc}"
    [{cri}.containerd.runtimes.{runc}]
      runtime_type = "io.containerd.runc.v2"
    [{cri}.containerd.runtimes.{capsule}]
      runtime_type = "io.containerd.capsule.v2"
      [{cri}.containerd.runtimes.{capsule}.options]
        ConfigPath = "{capsule_config}"
"#,
        common = common_config(2, i.dir, DISABLED),
        pause = i.sandbox_image,
        cni_bin = i.cni_bin_dir.display(),
        cni_conf = i.cni_conf_dir.display(),
        runc = RUNC_HANDLER,
        capsule = CAPSULE_HANDLER,
        capsule_config = i.capsule_config.display(),
    )
}

fn config_v3(i: &ConfigInput) -> String {
    let images = r#"plugins."io.containerd.cri.v1.images""#;
    let rt = r#"plugins."io.containerd.cri.v1.runtime""#;
    format!(
        r#"{common}
[{images}]
  snapshotter = "overlayfs"
  [{images}.pinned_images]
    sandbox = "{pause}"
[{rt}]
  disable_apparmor = true
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  enable_cdi = true
  cdi_spec_dirs = ["{cdi}"]
  [{rt}.cni]
    bin_dirs = ["{cni_bin}"]
    conf_dir = "{cni_conf}"
    max_conf_num = 1
  [{rt}.containerd]
    default_runtime_name = "{runc}"
    [{rt}.containerd.runtimes.{runc}]
      runtime_type = "io.containerd.runc.v2"
      sandboxer = "podsandbox"
    [{rt}.containerd.runtimes.{capsule}]
      runtime_type = "io.containerd.capsule.v2"
      sandboxer = "{sandboxer}"
{options}[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#,
        common = common_config(3, i.dir, DISABLED),
        pause = i.sandbox_image,
        cdi = i.cdi_dir.display(),
        cni_bin = i.cni_bin_dir.display(),
        cni_conf = i.cni_conf_dir.display(),
        runc = RUNC_HANDLER,
        capsule = CAPSULE_HANDLER,
        sandboxer = i.sandboxer.as_str(),
        options = capsule_options(rt, i),
    )
}
