//! OOM kills of containers, for the shim's TaskOOM events.
//!
//! Each container's cgroup v2 `memory.events` is watched with inotify (the
//! kernel signals a modification whenever a counter changes); when its
//! `oom_kill` counter has grown, an event naming the container is appended
//! to a log with a sequence number. `GetOOMEvent` returns the first event
//! after the sequence number the host last handled, waiting for one if
//! needed: nothing is consumed by a read, so a call cancelled or lost with
//! its connection loses no event (the host asks again with the same
//! number). The log keeps the last [`LOG_LEN`] events.
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

/// Events kept for hosts that fall behind.
pub const LOG_LEN: usize = 1024;

/// One OOM kill (or several seen at once) in a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OomEvent {
    pub seq: u64,
    pub container_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OomError {
    #[error("OOM watcher: inotify: {0}")]
    Inotify(#[source] nix::errno::Errno),
    #[error("OOM watcher: watch {}: {source}", path.display())]
    Watch {
        path: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
}

/// The `oom_kill` counter of a `memory.events` file.
pub fn oom_kills(memory_events: &str) -> Option<u64> {
    memory_events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

struct Watched {
    cid: String,
    file: PathBuf,
    kills: u64,
}

#[derive(Default)]
struct State {
    watched: HashMap<WatchDescriptor, Watched>,
    by_cid: HashMap<String, WatchDescriptor>,
    log: VecDeque<OomEvent>,
    last_seq: u64,
}

impl State {
    /// Re-reads the counter of `wd`; logs an event when it grew.
    fn check(&mut self, wd: WatchDescriptor) -> Option<u64> {
        let w = self.watched.get_mut(&wd)?;
        let kills = std::fs::read_to_string(&w.file)
            .ok()
            .and_then(|s| oom_kills(&s))?;
        if kills <= w.kills {
            return None;
        }
        tracing::info!(cid = %w.cid, oom_kills = kills, "container OOM kill");
        w.kills = kills;
        let cid = w.cid.clone();
        Some(self.push(cid))
    }

    fn push(&mut self, container_id: String) -> u64 {
        self.last_seq += 1;
        self.log.push_back(OomEvent {
            seq: self.last_seq,
            container_id,
        });
        while self.log.len() > LOG_LEN {
            self.log.pop_front();
        }
        self.last_seq
    }

    fn after(&self, seq: u64) -> Option<OomEvent> {
        self.log.iter().find(|e| e.seq > seq).cloned()
    }
}

/// The inotify instance, for `AsyncFd` (which wants `AsRawFd`).
struct InotifyFd(Inotify);

impl std::os::fd::AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

pub struct OomWatcher {
    inotify: Arc<AsyncFd<InotifyFd>>,
    state: Mutex<State>,
    /// The last sequence number, for waiters.
    last: watch::Sender<u64>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl OomWatcher {
    /// Starts the watcher task. Must run inside the tokio runtime.
    pub fn start() -> Result<Arc<Self>, OomError> {
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(OomError::Inotify)?;
        // SAFETY: the AsyncFd owns the Inotify, whose fd stays open (and the same) until the AsyncFd is dropped.
        let fd = unsafe {
            AsyncFd::register_with_interest(InotifyFd(ino), tokio::io::Interest::READABLE)
        }
        .map_err(|e| {
            let e = std::io::Error::from(e);
            OomError::Inotify(nix::errno::Errno::from_raw(
                e.raw_os_error().unwrap_or(libc::EIO),
            ))
        })?;
        let w = Arc::new(Self {
            inotify: Arc::new(fd),
            state: Mutex::new(State::default()),
            last: watch::channel(0).0,
        });
        let weak = Arc::downgrade(&w);
        let ino = w.inotify.clone();
        tokio::spawn(async move {
            loop {
                let mut guard = match ino.readable().await {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::error!(error = %e, "OOM watcher: inotify poll failed; no more OOM events");
                        return;
                    }
                };
                let events = match guard.try_io(|fd| {
                    fd.get_ref()
                        .0
                        .read_events()
                        .map_err(|e| std::io::Error::from_raw_os_error(e as i32))
                }) {
                    Ok(Ok(ev)) => ev,
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "OOM watcher: inotify read failed; no more OOM events");
                        return;
                    }
                    Err(_would_block) => continue,
                };
                let Some(w) = weak.upgrade() else { return };
                for ev in events {
                    w.check(ev.wd);
                }
            }
        });
        Ok(w)
    }

    fn check(&self, wd: WatchDescriptor) {
        let seq = lock(&self.state).check(wd);
        if let Some(seq) = seq {
            self.last.send_replace(seq);
        }
    }

    /// Watches `cgroup_dir/memory.events` of container `cid`.
    pub fn add(&self, cid: &str, cgroup_dir: &Path) -> Result<(), OomError> {
        let file = cgroup_dir.join("memory.events");
        let wd = self
            .inotify
            .get_ref()
            .0
            .add_watch(&file, AddWatchFlags::IN_MODIFY)
            .map_err(|source| OomError::Watch {
                path: file.clone(),
                source,
            })?;
        let kills = std::fs::read_to_string(&file)
            .ok()
            .and_then(|s| oom_kills(&s))
            .unwrap_or(0);
        let mut st = lock(&self.state);
        st.watched.insert(
            wd,
            Watched {
                cid: cid.to_string(),
                file,
                kills,
            },
        );
        st.by_cid.insert(cid.to_string(), wd);
        Ok(())
    }

    /// Stops watching `cid`, after a last look at its counter (call it
    /// before the cgroup is removed: an OOM kill that ended the container
    /// may not have been read yet).
    pub fn remove(&self, cid: &str) {
        let seq = {
            let mut st = lock(&self.state);
            let Some(wd) = st.by_cid.remove(cid) else {
                return;
            };
            let seq = st.check(wd);
            st.watched.remove(&wd);
            if let Err(e) = self.inotify.get_ref().0.rm_watch(wd) {
                // EINVAL: the kernel dropped it with the file already.
                if e != nix::errno::Errno::EINVAL {
                    tracing::warn!(cid, error = %e, "OOM watcher: rm_watch");
                }
            }
            seq
        };
        if let Some(seq) = seq {
            self.last.send_replace(seq);
        }
    }

    /// The first event after `seq`, waiting until there is one. Cancel-safe.
    pub async fn next_after(&self, seq: u64) -> OomEvent {
        let mut rx = self.last.subscribe();
        loop {
            if let Some(e) = lock(&self.state).after(seq) {
                return e;
            }
            // The log changed since the lookup: look again. The sender
            // lives as long as `self`, so this never ends in an error.
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Names of the containers watched (tests, debugging).
    pub fn watched(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.state).by_cid.keys().cloned().collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counter() {
        let ev = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(oom_kills(ev), Some(2));
        assert_eq!(oom_kills("low 0\n"), None);
        assert_eq!(oom_kills("oom_kill x\n"), None);
        assert_eq!(oom_kills("oom_group_kill 4\n"), None);
    }

    #[test]
    fn log_is_bounded_and_read_without_consuming() {
        let mut st = State::default();
        for i in 0..(LOG_LEN + 10) {
            st.push(format!("c{i}"));
        }
        assert_eq!(st.log.len(), LOG_LEN);
        // A host far behind gets the oldest kept event.
        assert_eq!(st.after(0).unwrap().seq, 11);
        assert_eq!(st.after(11).unwrap().container_id, "c11");
        assert_eq!(st.after(11), st.after(11));
        assert_eq!(st.after(st.last_seq), None);
    }

    /// A plain file stands in for memory.events: inotify sees its writes
    /// as it sees the kernel's counter updates.
    #[tokio::test]
    async fn events_from_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("memory.events");
        std::fs::write(&file, "oom 0\noom_kill 0\n").unwrap();
        let w = OomWatcher::start().unwrap();
        w.add("c1", dir.path()).unwrap();
        assert_eq!(w.watched(), vec!["c1"]);
        let waiter = {
            let w = w.clone();
            tokio::spawn(async move { w.next_after(0).await })
        };
        // A change that is not an OOM kill: no event.
        std::fs::write(&file, "oom 1\noom_kill 0\n").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished());
        std::fs::write(&file, "oom 1\noom_kill 1\n").unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("event within 5 s")
            .unwrap();
        assert_eq!(
            ev,
            OomEvent {
                seq: 1,
                container_id: "c1".into()
            }
        );
        // Cancelled waits lose nothing: the same question, the same answer.
        let again = tokio::time::timeout(Duration::from_millis(100), w.next_after(0)).await;
        assert_eq!(again.unwrap().seq, 1);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), w.next_after(1))
                .await
                .is_err()
        );
        // A kill counted only at removal (cgroup about to go) still arrives.
        std::fs::write(&file, "oom 2\noom_kill 2\n").unwrap();
        w.remove("c1");
        let ev = tokio::time::timeout(Duration::from_secs(5), w.next_after(1))
            .await
            .unwrap();
        assert_eq!(ev.seq, 2);
        assert!(w.watched().is_empty());
    }
}
