//! The container's cgroup v2 group `/sys/fs/cgroup/capsule/<cid>`: resources,
//! freezer, stats, processes. The guest kernel mounts cgroup2 only (see
//! `init`), so there is no v1 path.
use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capsule_agent_protocol::agent::CgroupStats;
use oci_spec::runtime::LinuxResources;

use crate::error::{io_err, AgentError, Result};

/// Files that may be missing (controller or kernel option absent): writes to
/// them are skipped with a warning instead of failing the request.
fn optional(file: &str) -> bool {
    file.starts_with("cpuset.")
        || file.starts_with("io.")
        || file.starts_with("hugetlb.")
        || matches!(
            file,
            "memory.swap.max" | "cpu.idle" | "cpu.max.burst" | "memory.low"
        )
}

/// The `(file, value)` writes for OCI resources, in order. Conversions follow
/// runc's cgroup v2 driver.
pub fn resource_writes(r: &LinuxResources) -> std::result::Result<Vec<(String, String)>, String> {
    let mut w: Vec<(String, String)> = Vec::new();
    let mut put = |f: &str, v: String| w.push((f.to_string(), v));
    if let Some(m) = r.memory() {
        let limit = m.limit().unwrap_or(0);
        match limit {
            0 => {}
            -1 => put("memory.max", "max".into()),
            l if l > 0 => put("memory.max", l.to_string()),
            l => return Err(format!("memory.limit {l} is negative")),
        }
        match m.reservation() {
            None | Some(0) => {}
            Some(-1) => put("memory.low", "max".into()),
            Some(v) if v > 0 => put("memory.low", v.to_string()),
            Some(v) => return Err(format!("memory.reservation {v} is negative")),
        }
        match swap_v2(m.swap().unwrap_or(0), limit)? {
            None => {}
            Some(-1) => put("memory.swap.max", "max".into()),
            Some(v) => put("memory.swap.max", v.to_string()),
        }
    }
    if let Some(c) = r.cpu() {
        if let Some(shares) = c.shares().filter(|s| *s != 0) {
            let s = shares.clamp(2, 262_144);
            put("cpu.weight", (1 + ((s - 2) * 9999) / 262_142).to_string());
        }
        let quota = c.quota().unwrap_or(0);
        let period = c.period().unwrap_or(0);
        if quota != 0 || period != 0 {
            let mut v = if quota > 0 {
                quota.to_string()
            } else {
                "max".to_string()
            };
            if period != 0 {
                v.push_str(&format!(" {period}"));
            }
            put("cpu.max", v);
        }
        if let Some(b) = c.burst() {
            put("cpu.max.burst", b.to_string());
        }
        if let Some(idle) = c.idle() {
            put("cpu.idle", idle.to_string());
        }
        if let Some(cpus) = c.cpus().as_deref().filter(|s| !s.is_empty()) {
            put("cpuset.cpus", cpus.to_string());
        }
        if let Some(mems) = c.mems().as_deref().filter(|s| !s.is_empty()) {
            put("cpuset.mems", mems.to_string());
        }
    }
    if let Some(p) = r.pids() {
        let v = if p.limit() > 0 {
            p.limit().to_string()
        } else {
            "max".to_string()
        };
        put("pids.max", v);
    }
    if let Some(weight) = r
        .block_io()
        .as_ref()
        .and_then(|b| b.weight())
        .filter(|w| *w != 0)
    {
        // blkio weight 10..1000 to io.weight 1..10000.
        let w = u64::from(weight.clamp(10, 1000));
        put(
            "io.weight",
            format!("default {}", 1 + (w - 10) * 9999 / 990),
        );
    }
    for h in r.hugepage_limits().iter().flatten() {
        put(
            &format!("hugetlb.{}.max", h.page_size()),
            h.limit().to_string(),
        );
    }
    if let Some(unified) = r.unified() {
        let mut keys: Vec<_> = unified.keys().collect();
        keys.sort();
        for k in keys {
            if k.is_empty() || k.contains('/') || k.starts_with('.') || !k.contains('.') {
                return Err(format!("unified key {k:?} is not a cgroup file name"));
            }
            put(k, unified[k].clone());
        }
    }
    Ok(w)
}

/// OCI `memory.swap` is memory+swap; cgroup v2 `memory.swap.max` is swap only.
fn swap_v2(swap: i64, memory: i64) -> std::result::Result<Option<i64>, String> {
    if memory == -1 && swap == 0 {
        return Ok(Some(-1));
    }
    if swap == -1 {
        return Ok(Some(-1));
    }
    if swap == 0 {
        return Ok(None);
    }
    if memory <= 0 {
        return Err("memory.swap needs a memory.limit".into());
    }
    if swap < memory {
        return Err(format!("memory.swap {swap} is below memory.limit {memory}"));
    }
    Ok(Some(swap - memory))
}

/// Stats from the cgroup files, read through `read(file)`.
pub fn parse_stats(read: &dyn Fn(&str) -> Option<String>) -> CgroupStats {
    let kv = |file: &str| -> HashMap<String, u64> {
        read(file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect()
    };
    let num = |file: &str, max: u64| -> u64 {
        match read(file).as_deref().map(str::trim) {
            Some("max") => max,
            Some(v) => v.parse().unwrap_or(0),
            None => 0,
        }
    };
    let cpu = kv("cpu.stat");
    let mem = kv("memory.stat");
    let mut s = CgroupStats::new();
    s.cpu_usage_usec = cpu.get("usage_usec").copied().unwrap_or(0);
    s.cpu_user_usec = cpu.get("user_usec").copied().unwrap_or(0);
    s.cpu_system_usec = cpu.get("system_usec").copied().unwrap_or(0);
    s.cpu_nr_throttled = cpu.get("nr_throttled").copied().unwrap_or(0);
    s.cpu_throttled_usec = cpu.get("throttled_usec").copied().unwrap_or(0);
    s.memory_usage_bytes = num("memory.current", 0);
    // Unlimited memory is u64::MAX, unlimited pids 0 (containerd's convention).
    s.memory_limit_bytes = num("memory.max", u64::MAX);
    s.memory_max_usage_bytes = num("memory.peak", 0);
    s.memory_cache_bytes = mem.get("file").copied().unwrap_or(0);
    s.memory_rss_bytes = mem.get("anon").copied().unwrap_or(0);
    s.memory_swap_bytes = num("memory.swap.current", 0);
    s.pids_current = num("pids.current", 0);
    s.pids_limit = num("pids.max", 0);
    s
}

/// One container's cgroup directory.
#[derive(Debug, Clone)]
pub struct Cgroup {
    pub dir: PathBuf,
}

impl Cgroup {
    /// Creates the group (and the `capsule` parent with its controllers).
    pub fn create(cid: &str) -> Result<Self> {
        let dir = crate::paths::cgroup_dir(cid);
        if let Some(parent) = dir.parent() {
            if !parent.exists() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| io_err(format!("create {}", parent.display()), e))?;
                enable_controllers(parent);
            }
        }
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(io_err(
                    format!("container {cid:?}: create cgroup {}", dir.display()),
                    e,
                ))
            }
        }
        Ok(Self { dir })
    }

    pub fn apply(&self, cid: &str, r: &LinuxResources) -> Result<()> {
        let writes = resource_writes(r)
            .map_err(|e| AgentError::invalid(format!("container {cid:?}: resources: {e}")))?;
        for (file, value) in writes {
            let path = self.dir.join(&file);
            match std::fs::write(&path, &value) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound && optional(&file) => {
                    tracing::warn!(cid, file, "cgroup file missing, resource not applied");
                }
                Err(e) => {
                    let what = format!("container {cid:?}: write {value:?} to {}", path.display());
                    return Err(if e.raw_os_error() == Some(libc::EINVAL) {
                        AgentError::InvalidArgument(format!("{what}: {e}"))
                    } else {
                        io_err(what, e)
                    });
                }
            }
        }
        Ok(())
    }

    pub fn stats(&self) -> CgroupStats {
        let dir = self.dir.clone();
        parse_stats(&move |f| std::fs::read_to_string(dir.join(f)).ok())
    }

    /// Pids of the group and its descendants.
    pub fn procs(&self) -> Vec<i32> {
        let mut out = Vec::new();
        collect_procs(&self.dir, &mut out, 0);
        out
    }

    /// Freezes (true) or thaws the group and waits until the kernel says so.
    pub async fn set_frozen(&self, cid: &str, frozen: bool) -> Result<()> {
        let file = self.dir.join("cgroup.freeze");
        std::fs::write(&file, if frozen { "1" } else { "0" })
            .map_err(|e| io_err(format!("container {cid:?}: write {}", file.display()), e))?;
        let want = if frozen { "frozen 1" } else { "frozen 0" };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let events =
                std::fs::read_to_string(self.dir.join("cgroup.events")).unwrap_or_default();
            if events.lines().any(|l| l == want) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(AgentError::DeadlineExceeded(format!(
                    "container {cid:?}: cgroup did not become {want:?} within 10s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs every process of the group (cgroup.kill, or one by one).
    pub fn kill_all(&self) {
        if std::fs::write(self.dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        for pid in self.procs() {
            match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL)
            {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => tracing::warn!(pid, error = %e, "SIGKILL of a container process failed"),
            }
        }
    }

    /// Removes the group (and sub-groups), retrying while processes exit.
    pub async fn remove(&self, cid: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match remove_tree(&self.dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(io_err(
                        format!("container {cid:?}: remove cgroup {}", self.dir.display()),
                        e,
                    ))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

fn collect_procs(dir: &Path, out: &mut Vec<i32>, depth: usize) {
    if depth > 16 {
        return;
    }
    if let Ok(s) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            collect_procs(&e.path(), out, depth + 1);
        }
    }
}

fn remove_tree(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_tree(&e.path())?;
        }
    }
    std::fs::remove_dir(dir)
}

/// Enables the controllers capsule uses in `dir`'s subtree, one by one so a
/// missing controller does not prevent the others.
pub fn enable_controllers(dir: &Path) {
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    for c in ["cpu", "memory", "pids", "io", "cpuset", "hugetlb"] {
        if !available.split_whitespace().any(|a| a == c) {
            if matches!(c, "cpu" | "memory" | "pids" | "io") {
                tracing::warn!(controller = c, dir = %dir.display(), "cgroup controller not available");
            }
            continue;
        }
        if let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")) {
            tracing::warn!(controller = c, dir = %dir.display(), error = %e, "cannot enable cgroup controller");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(json: &str) -> LinuxResources {
        serde_json::from_str(json).unwrap()
    }

    fn writes(json: &str) -> Vec<(String, String)> {
        resource_writes(&res(json)).unwrap()
    }

    fn w(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn memory_cpu_pids() {
        assert_eq!(
            writes(
                r#"{"memory":{"limit":268435456,"swap":536870912},"cpu":{"shares":1024,"quota":50000,"period":100000},"pids":{"limit":100}}"#
            ),
            w(&[
                ("memory.max", "268435456"),
                ("memory.swap.max", "268435456"),
                ("cpu.weight", "39"),
                ("cpu.max", "50000 100000"),
                ("pids.max", "100"),
            ])
        );
        assert_eq!(
            writes(
                r#"{"memory":{"limit":-1},"cpu":{"quota":-1,"period":100000},"pids":{"limit":0}}"#
            ),
            w(&[
                ("memory.max", "max"),
                ("memory.swap.max", "max"),
                ("cpu.max", "max 100000"),
                ("pids.max", "max")
            ])
        );
        assert_eq!(writes(r#"{"cpu":{"shares":2}}"#), w(&[("cpu.weight", "1")]));
        assert_eq!(
            writes(r#"{"cpu":{"shares":262144}}"#),
            w(&[("cpu.weight", "10000")])
        );
        assert_eq!(
            writes(r#"{"cpu":{"quota":20000}}"#),
            w(&[("cpu.max", "20000")])
        );
        assert_eq!(
            writes(r#"{"cpu":{"cpus":"0-1","mems":""}}"#),
            w(&[("cpuset.cpus", "0-1")])
        );
        assert_eq!(
            writes(r#"{"blockIO":{"weight":500}}"#),
            w(&[("io.weight", "default 4950")])
        );
        assert_eq!(
            writes(r#"{"unified":{"memory.high":"1000000"}}"#),
            w(&[("memory.high", "1000000")])
        );
        assert!(writes("{}").is_empty());
    }

    #[test]
    fn bad_resources() {
        for bad in [
            r#"{"memory":{"limit":-5}}"#,
            r#"{"memory":{"swap":100}}"#,
            r#"{"memory":{"limit":200,"swap":100}}"#,
            r#"{"unified":{"../../x":"1"}}"#,
            r#"{"unified":{"nodot":"1"}}"#,
        ] {
            assert!(resource_writes(&res(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn stats_from_files() {
        let files: HashMap<&str, &str> = [
            ("cpu.stat", "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\nnr_throttled 2\nthrottled_usec 77\n"),
            ("memory.current", "4096\n"),
            ("memory.max", "max\n"),
            ("memory.peak", "8192\n"),
            ("memory.stat", "anon 1024\nfile 2048\nkernel 10\n"),
            ("pids.current", "3\n"),
            ("pids.max", "max\n"),
        ]
        .into_iter()
        .collect();
        let s = parse_stats(&|f| files.get(f).map(|s| s.to_string()));
        assert_eq!(s.cpu_usage_usec, 1500);
        assert_eq!(s.cpu_user_usec, 1000);
        assert_eq!(s.cpu_system_usec, 500);
        assert_eq!(s.cpu_nr_throttled, 2);
        assert_eq!(s.cpu_throttled_usec, 77);
        assert_eq!(s.memory_usage_bytes, 4096);
        assert_eq!(s.memory_limit_bytes, u64::MAX);
        assert_eq!(s.memory_max_usage_bytes, 8192);
        assert_eq!(s.memory_rss_bytes, 1024);
        assert_eq!(s.memory_cache_bytes, 2048);
        assert_eq!(s.pids_current, 3);
        assert_eq!(s.pids_limit, 0);
        let empty = parse_stats(&|_| None);
        assert_eq!(empty.memory_usage_bytes, 0);
    }
}
