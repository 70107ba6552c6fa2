//! Which containerd the end-to-end tests run, where its binaries are, the
//! private configuration each generation takes, and the check of its log.
//!
//! `CAPSULE_CONTAINERD=1.6|1.7|2.1` picks the version (default 1.6, Debian
//! 12's own, from PATH). 1.7 (trixie) and 2.1 (sid) come from the cache
//! `scripts/install-deps.sh` fills: `$CAPSULE_CONTAINERD_CACHE` (default
//! `/var/cache/capsule/containerd`)`/<major.minor>/usr/bin/{containerd,ctr}`.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};

/// Selects the containerd version.
pub const VERSION_ENV: &str = "CAPSULE_CONTAINERD";
/// Overrides where install-deps.sh unpacked containerd 1.7 and 2.x.
pub const CACHE_ENV: &str = "CAPSULE_CONTAINERD_CACHE";
pub const DEFAULT_CACHE: &str = "/var/cache/capsule/containerd";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Debian 12's containerd 1.6 (from PATH).
    V1_6,
    /// containerd 1.7 from trixie.
    V1_7,
    /// containerd 2.1 from sid.
    V2_1,
}

impl Version {
    pub const ALL: [Version; 3] = [Version::V1_6, Version::V1_7, Version::V2_1];

    pub fn parse(s: &str) -> Result<Version> {
        match s.trim() {
            "" | "1.6" => Ok(Version::V1_6),
            "1.7" => Ok(Version::V1_7),
            "2" | "2.1" => Ok(Version::V2_1),
            other => bail!("{VERSION_ENV}={other:?}: expected 1.6, 1.7 or 2.1"),
        }
    }

    /// From `$CAPSULE_CONTAINERD` (1.6 when unset).
    pub fn from_env() -> Result<Version> {
        Version::parse(&std::env::var(VERSION_ENV).unwrap_or_default())
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1_6 => "1.6",
            Version::V1_7 => "1.7",
            Version::V2_1 => "2.1",
        }
    }

    /// containerd 2.x (config `version = 3`, task API v3 available).
    pub fn is_2x(self) -> bool {
        self == Version::V2_1
    }
}

/// One containerd installation.
#[derive(Debug, Clone)]
pub struct Containerd {
    pub version: Version,
    pub containerd: PathBuf,
    pub ctr: PathBuf,
    /// `containerd --version`.
    pub version_line: String,
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl Containerd {
    /// Finds the binaries of `version` and checks they are that version.
    pub fn find(version: Version) -> Result<Containerd> {
        let (containerd, ctr) = match version {
            Version::V1_6 => (
                on_path("containerd")
                    .ok_or_else(|| anyhow!("containerd not in PATH (scripts/install-deps.sh)"))?,
                on_path("ctr")
                    .ok_or_else(|| anyhow!("ctr not in PATH (scripts/install-deps.sh)"))?,
            ),
            _ => {
                let cache = std::env::var_os(CACHE_ENV)
                    .map(PathBuf::from)
                    .unwrap_or_else(|| DEFAULT_CACHE.into());
                let bin = cache.join(version.as_str()).join("usr/bin");
                (bin.join("containerd"), bin.join("ctr"))
            }
        };
        for b in [&containerd, &ctr] {
            if !b.is_file() {
                bail!(
                    "containerd {}: {} is missing (scripts/install-deps.sh fetches it)",
                    version.as_str(),
                    b.display()
                );
            }
        }
        let out = Command::new(&containerd)
            .arg("--version")
            .output()
            .with_context(|| format!("running {} --version", containerd.display()))?;
        let version_line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // "containerd github.com/containerd/containerd[/v2] 1.7.24~ds1 …"
        let reported = version_line.split_whitespace().nth(2).unwrap_or_default();
        if !reported.starts_with(&format!("{}.", version.as_str())) {
            bail!(
                "{} reports {version_line:?}, not containerd {}",
                containerd.display(),
                version.as_str()
            );
        }
        Ok(Containerd {
            version,
            containerd,
            ctr,
            version_line,
        })
    }

    /// The containerd of `$CAPSULE_CONTAINERD`, resolved once per process.
    pub fn selected() -> Result<&'static Containerd> {
        static SELECTED: OnceLock<std::result::Result<Containerd, String>> = OnceLock::new();
        SELECTED
            .get_or_init(|| {
                Version::from_env()
                    .and_then(Containerd::find)
                    .map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map_err(|e| anyhow!("{e}"))
    }

    /// A private daemon's configuration: its own root, state, sockets under
    /// `dir`; CRI and everything that would touch the host beyond that
    /// (NRI's socket, /opt plugins, tracing) disabled.
    pub fn config(&self, dir: &Path) -> String {
        let (version, disabled): (u32, &[&str]) = match self.version {
            Version::V1_6 | Version::V1_7 => (
                2,
                &[
                    "io.containerd.grpc.v1.cri",
                    "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.internal.v1.opt",
                    "io.containerd.tracing.processor.v1.otlp",
                    "io.containerd.nri.v1.nri",
                ],
            ),
            // 2.x splits CRI into three plugins and moves the pause-container
            // sandbox controller out of it; aufs is gone; NRI is on by
            // default (it would listen on /var/run/nri/nri.sock).
            Version::V2_1 => (
                3,
                &[
                    "io.containerd.grpc.v1.cri",
                    "io.containerd.cri.v1.images",
                    "io.containerd.cri.v1.runtime",
                    "io.containerd.podsandbox.controller.v1.podsandbox",
                    "io.containerd.grpc.v1.sandbox-controllers",
                    "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.internal.v1.opt",
                    "io.containerd.tracing.processor.v1.otlp",
                    "io.containerd.nri.v1.nri",
                ],
            ),
        };
        common_config(version, dir, disabled)
    }
}

/// containerd's own spurious error lines, which say nothing about the shim.
///
/// The part of a private daemon's configuration every test shares: config
/// `version`, its own root, state and sockets under `dir`, debug logging,
/// the `disabled` plugins.
pub fn common_config(version: u32, dir: &Path, disabled: &[&str]) -> String {
    let disabled = disabled
        .iter()
        .map(|p| format!("{p:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"version = {version}
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [{disabled}]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = "{d}/debug.sock"
  level = "debug"
[metrics]
  address = ""
"#,
        d = dir.display()
    )
}

/// When containerd drops a shim whose task failed to create or whose
/// process died ("cleaning up dead shim"), it closes the shim's log fifo
/// itself (`onCloseWithShimLog`) and then logs its copier's read of the file
/// it closed: `msg="copy shim log" error="read /proc/self/fd/N: file already
/// closed"` (Go's `os.ErrClosed`). `checkCopyShimLogError` hides it only once
/// the context of the `start` call is done, which it is not on that path.
/// Seen with 1.6.20 and 2.1.9 alike, in the tests that make a create fail or
/// kill a shim; never in a clean run.
fn containerd_noise(line: &str) -> bool {
    line.contains("msg=\"copy shim log\"") && line.contains("file already closed")
}

/// Lines of a containerd log at `level=error` that concern capsule: they name
/// capsule, its runtime or a shim. Lines containing one of `allowed` (errors a
/// test provokes on purpose) and containerd's own noise are left out.
pub fn error_lines(log: &str, allowed: &[String]) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("level=error"))
        .filter(|l| {
            let lower = l.to_ascii_lowercase();
            lower.contains("capsule") || lower.contains("shim")
        })
        .filter(|l| !containerd_noise(l))
        .filter(|l| !allowed.iter().any(|a| l.contains(a.as_str())))
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(Version::parse("").unwrap(), Version::V1_6);
        assert_eq!(Version::parse("1.7").unwrap(), Version::V1_7);
        assert_eq!(Version::parse("2").unwrap(), Version::V2_1);
        assert!(Version::parse("1.5").is_err());
        for v in Version::ALL {
            assert_eq!(Version::parse(v.as_str()).unwrap(), v);
        }
    }

    #[test]
    fn error_lines_concern_capsule_only() {
        let log = "time=\"t\" level=error msg=\"copy shim log\" error=\"read /proc/self/fd/15: file already closed\"\n\
                   time=\"t\" level=error msg=\"copy shim log\" error=\"x\"\n\
                   time=\"t\" level=error msg=\"failed to load plugin\" id=io.containerd.x\n\
                   time=\"t\" level=info msg=\"capsule is fine\"\n\
                   time=\"t\" level=error msg=\"failed to start shim\" runtime=io.containerd.capsule.v2\n";
        assert_eq!(error_lines(log, &[]).len(), 2);
        assert_eq!(error_lines(log, &["copy shim log".into()]).len(), 1);
    }

    #[test]
    fn configs_match_the_generation() {
        let c = |version| Containerd {
            version,
            containerd: "/x".into(),
            ctr: "/y".into(),
            version_line: String::new(),
        };
        let d = Path::new("/tmp/d");
        let v1 = c(Version::V1_6).config(d);
        assert!(v1.starts_with("version = 2\n"), "{v1}");
        let v2 = c(Version::V2_1).config(d);
        assert!(v2.starts_with("version = 3\n"), "{v2}");
        assert!(v2.contains("\"io.containerd.cri.v1.runtime\""), "{v2}");
        for text in [v1, v2] {
            let parsed: toml::Table = text.parse().unwrap();
            assert_eq!(
                parsed["grpc"]["address"].as_str(),
                Some("/tmp/d/containerd.sock")
            );
        }
    }
}
