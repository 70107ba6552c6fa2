//! Finding a virtiofsd capsule can drive.
//!
//! capsule drives the Rust virtiofsd: `--fd=… --shared-dir=…
//! --sandbox=… --cache=… --announce-submounts` (`sandbox::virtiofsd::args`).
//! QEMU's legacy C virtiofsd, which Debian 12 ships as
//! `/usr/lib/qemu/virtiofsd`, takes `-o source=…` instead and exits with
//! `fuse: unknown option(s): --shared-dir=…`. A containerd started by an
//! init system has no `~/.cargo/bin` in its PATH, so a lookup that took the
//! first file named `virtiofsd` would land on the C one and fail every pod.
//! So each candidate is probed: its `--help` must offer every flag capsule
//! passes; the others are skipped, and the reason is reported (the shim's
//! log, `capsule check`).
//!
//! `make install` (shim/install.sh) puts the Rust virtiofsd where the lookup
//! looks first: `<prefix>/libexec/capsule/virtiofsd`, next to the
//! `<prefix>/bin` the shim runs from (`/usr/local/libexec/capsule/virtiofsd`
//! by default).
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The flags of capsule's virtiofsd command line.
pub const VIRTIOFSD_FLAGS: &[&str] = &[
    "--fd",
    "--shared-dir",
    "--sandbox",
    "--cache",
    "--announce-submounts",
];

/// The optional flag of capsule's virtiofsd build (scripts/virtiofsd/):
/// how long the guest may cache a failed lookup. Stock virtiofsd answers a
/// lookup of a missing name with ENOENT, which the guest kernel never
/// caches, so every open or stat of a missing file (glibc's
/// `/etc/localtime` on each `localtime`, PATH and library searches) is a
/// round trip to the host. Passed when the binary offers it.
pub const NEGATIVE_TIMEOUT_FLAG: &str = "--negative-timeout";

/// Where `make install` puts virtiofsd, under the install prefix.
pub const VIRTIOFSD_LIBEXEC: &str = "libexec/capsule";

/// The default install prefix (shim/install.sh).
pub const DEFAULT_PREFIX: &str = "/usr/local";

/// How long `virtiofsd --help` / `--version` may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A virtiofsd capsule can drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Virtiofsd {
    pub path: PathBuf,
    /// Its `--version` line.
    pub version: String,
    /// Whether it offers [`NEGATIVE_TIMEOUT_FLAG`].
    pub negative_timeout: bool,
}

/// A file named like virtiofsd that the lookup passed over, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// What a lookup found, and what it skipped on the way.
#[derive(Debug, Clone, Default)]
pub struct VirtiofsdLookup {
    pub found: Option<Virtiofsd>,
    pub skipped: Vec<Skipped>,
}

/// The install prefix capsule runs from: `<prefix>` when this executable is
/// `<prefix>/bin/<name>`.
fn own_prefix() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?;
    (bin.file_name()? == "bin").then(|| bin.parent().map(Path::to_path_buf))?
}

/// Where a bare virtiofsd name is looked for, in order: the libexec
/// directory of the prefix capsule runs from, that of the default prefix,
/// PATH, then the usual install locations.
pub fn virtiofsd_locations() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = Vec::new();
    if let Some(prefix) = own_prefix() {
        v.push(prefix.join(VIRTIOFSD_LIBEXEC));
    }
    v.push(Path::new(DEFAULT_PREFIX).join(VIRTIOFSD_LIBEXEC));
    v.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    v.extend(
        ["/usr/local/bin", "/usr/libexec", "/usr/lib/qemu"]
            .into_iter()
            .map(PathBuf::from),
    );
    if let Some(home) = std::env::var_os("HOME") {
        v.push(PathBuf::from(home).join(".cargo/bin"));
    }
    v.push("/root/.cargo/bin".into());
    v
}

/// The files `bin` may be: itself when it has a `/`, else every existing
/// `<location>/<bin>`, each real file once.
pub fn virtiofsd_candidates(bin: &Path) -> Vec<PathBuf> {
    if bin.components().count() > 1 || bin.is_absolute() {
        return vec![bin.to_path_buf()];
    }
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for p in virtiofsd_locations().into_iter().map(|d| d.join(bin)) {
        if !p.is_file() {
            continue;
        }
        let real = std::fs::canonicalize(&p).unwrap_or_else(|_| p.clone());
        if !seen.contains(&real) {
            seen.push(real);
            out.push(p);
        }
    }
    out
}

/// Runs `path arg` with a deadline; its stdout and stderr together.
fn run(path: &Path, arg: &str) -> Result<String, String> {
    let mut child = Command::new(path)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut r| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.by_ref().take(1 << 20).read_to_end(&mut v);
            v
        })
    })
    .collect();
    let deadline = Instant::now() + PROBE_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("`{arg}` did not finish within {PROBE_TIMEOUT:?}"));
            }
            Err(e) => return Err(format!("waiting for `{arg}`: {e}")),
        }
    }
    let mut text = String::new();
    for r in readers {
        text.push_str(&String::from_utf8_lossy(&r.join().unwrap_or_default()));
    }
    Ok(text)
}

/// Checks that `path` is a virtiofsd capsule can drive: its version line,
/// and whether it can cache negative lookups.
pub fn probe_virtiofsd(path: &Path) -> Result<Virtiofsd, String> {
    let help = run(path, "--help")?;
    let version = run(path, "--version")
        .ok()
        .and_then(|v| {
            v.lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(String::from)
        })
        .unwrap_or_else(|| "version unknown".into());
    // Whole words: "--socket" must not pass for "--socket-path".
    let offers = |flag: &str| {
        help.split(|c: char| c.is_whitespace() || matches!(c, ',' | '=' | '[' | '<'))
            .any(|w| w == flag)
    };
    let missing: Vec<&str> = VIRTIOFSD_FLAGS
        .iter()
        .copied()
        .filter(|f| !offers(f))
        .collect();
    if missing.is_empty() {
        Ok(Virtiofsd {
            path: path.to_path_buf(),
            version,
            negative_timeout: offers(NEGATIVE_TIMEOUT_FLAG),
        })
    } else {
        Err(format!(
            "{version}: its --help offers no {} (capsule drives the Rust virtiofsd; \
             QEMU's legacy C virtiofsd takes `-o source=` instead)",
            missing.join(", ")
        ))
    }
}

/// Looks `bin` up (see [`virtiofsd_candidates`]) and probes the candidates
/// in order: the first that passes is found; those that failed before it
/// are skipped. `all` probes every candidate (for `capsule check`).
pub fn find_virtiofsd(bin: &Path, all: bool) -> VirtiofsdLookup {
    let mut lookup = VirtiofsdLookup::default();
    for path in virtiofsd_candidates(bin) {
        match probe_virtiofsd(&path) {
            Ok(found) if lookup.found.is_none() => {
                lookup.found = Some(found);
                if !all {
                    break;
                }
            }
            Ok(_) => {}
            Err(reason) => lookup.skipped.push(Skipped { path, reason }),
        }
    }
    lookup
}

impl VirtiofsdLookup {
    /// Why nothing was found.
    pub fn error(&self, bin: &Path) -> String {
        let mut msg = format!(
            "no virtiofsd capsule can drive for [virtiofsd] path = {:?}",
            bin.display().to_string()
        );
        if self.skipped.is_empty() {
            msg.push_str(" (none found");
            if bin.components().count() == 1 {
                msg.push_str(&format!(
                    " in {}/{VIRTIOFSD_LIBEXEC}, PATH or the usual locations",
                    DEFAULT_PREFIX
                ));
            }
            msg.push(')');
        }
        for s in &self.skipped {
            msg.push_str(&format!("; skipped {}: {}", s.path.display(), s.reason));
        }
        msg.push_str(
            "; install the Rust virtiofsd (capsule's build: scripts/virtiofsd/build.sh, \
             or `cargo install virtiofsd`; `make install` puts it in \
             /usr/local/libexec/capsule) or set [virtiofsd] path",
        );
        msg
    }
}

/// The virtiofsd the shim starts for `bin` (the configuration's `[virtiofsd]
/// path`); candidates passed over are logged.
pub fn resolve_virtiofsd(bin: &Path) -> Result<Virtiofsd, String> {
    let lookup = find_virtiofsd(bin, false);
    for s in &lookup.skipped {
        tracing::warn!(virtiofsd = %s.path.display(), reason = %s.reason, "skipped a virtiofsd capsule cannot drive");
    }
    match lookup.found {
        Some(v) => Ok(v),
        None => Err(lookup.error(bin)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    type TestResult<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

    /// Why `path` is refused; an error if it passes.
    fn refused(path: &Path) -> TestResult<String> {
        match probe_virtiofsd(path) {
            Ok(v) => Err(format!("{} passed the probe: {v:?}", path.display()).into()),
            Err(why) => Ok(why),
        }
    }

    fn script(dir: &Path, name: &str, body: &str) -> std::io::Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n"))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        Ok(p)
    }

    /// The Rust virtiofsd's stand-in, its --help ending with `extra`.
    fn rust_stand_in(dir: &Path, name: &str, extra: &str) -> std::io::Result<PathBuf> {
        script(
            dir,
            name,
            &format!(
                r#"case "$1" in
--version) echo "virtiofsd 1.14.0";;
*) printf 'Usage: virtiofsd --shared-dir <SHARED_DIR> --socket-path <SOCKET_PATH> [OPTIONS]\n      --socket <SOCKET>\n      --fd <FD>\n      --sandbox <SANDBOX>\n      --cache <CACHE>\n      --announce-submounts\n{extra}';;
esac"#
            ),
        )
    }

    /// Stand-ins printing what the real binaries print (the help texts are
    /// abridged from virtiofsd 1.14.0 and QEMU 7.2's virtiofsd).
    fn stand_ins(dir: &Path) -> std::io::Result<(PathBuf, PathBuf)> {
        let rust = rust_stand_in(dir, "rust-virtiofsd", "")?;
        // capsule's build (scripts/virtiofsd/) offers one flag more.
        rust_stand_in(
            dir,
            "capsule-virtiofsd",
            "      --negative-timeout <NEGATIVE_TIMEOUT>\\n",
        )?;
        let c = script(
            dir,
            "c-virtiofsd",
            r#"case "$1" in
--version) echo "virtiofsd version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)";;
*) printf 'usage: virtiofsd [options]\n    -o source=PATH             shared directory tree\n    --socket-path=PATH         path for the vhost-user socket\n';;
esac"#,
        )?;
        Ok((rust, c))
    }

    #[test]
    fn the_rust_virtiofsd_passes_and_the_c_one_is_skipped_with_the_reason() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (rust, c) = stand_ins(dir.path())?;
        let stock = probe_virtiofsd(&rust)?;
        assert_eq!(stock.version, "virtiofsd 1.14.0");
        assert!(
            !stock.negative_timeout,
            "stock virtiofsd caches no negative lookups"
        );
        let patched = probe_virtiofsd(&dir.path().join("capsule-virtiofsd"))?;
        assert!(patched.negative_timeout, "{patched:?}");
        let why = refused(&c)?;
        assert!(why.starts_with("virtiofsd version 7.2.22"), "{why}");
        assert!(
            why.contains("--shared-dir") && why.contains("--sandbox"),
            "{why}"
        );
        assert!(why.contains("--fd"), "it has no --fd: {why}");
        let missing = dir.path().join("nope");
        assert!(refused(&missing)?.contains("cannot run it"));
        // A configured path is taken as is: never another binary instead.
        let l = find_virtiofsd(&c, true);
        assert!(l.found.is_none());
        assert_eq!(l.skipped.len(), 1);
        let msg = l.error(&c);
        assert!(
            msg.contains("skipped") && msg.contains("c-virtiofsd"),
            "{msg}"
        );
        let l = find_virtiofsd(&rust, false);
        assert_eq!(l.found.map(|v| v.path), Some(rust));
        Ok(())
    }

    #[test]
    fn a_hanging_binary_times_out() -> TestResult {
        let dir = tempfile::tempdir()?;
        let p = script(dir.path(), "hangs", "exec sleep 30")?;
        let t = Instant::now();
        assert!(refused(&p)?.contains("did not finish"));
        assert!(t.elapsed() < Duration::from_secs(10));
        Ok(())
    }

    #[test]
    fn the_real_ones_on_this_host() -> TestResult {
        // Debian 12's QEMU package ships the C one; scripts/install-deps.sh
        // installs the Rust one. Probe whichever are present.
        let c = Path::new("/usr/lib/qemu/virtiofsd");
        if c.is_file() {
            let why = refused(c)?;
            assert!(why.contains("--shared-dir"), "{why}");
        }
        if let Some(v) = find_virtiofsd(Path::new("virtiofsd"), true).found {
            assert!(v.version.starts_with("virtiofsd "), "{v:?}");
        }
        Ok(())
    }
}
