//! The uevent listener and the wait loop.
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsule_agent_protocol::agent::{Device, DeviceKind};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::watch;
use tokio::time::Instant;

use super::request::parse_target;
use super::sysfs::{self, Found, Target};
use super::uevent::{self, Uevent};
use super::{describe, nodes, secs, DeviceError, GuestDevice};

/// Timing knobs of a [`DeviceWatcher`].
#[derive(Debug, Clone)]
pub struct WatcherConfig {
    /// Re-resolve this often while waiting, events or not.
    pub poll_interval: Duration,
    /// Ask the SCSI hosts to scan the address after waiting this long.
    pub scsi_rescan_after: Duration,
}

impl Default for WatcherConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(500),
            scsi_rescan_after: Duration::from_secs(2),
        }
    }
}

struct Shared {
    /// Bumped on every uevent (and on overflow): waiters re-resolve.
    generation: watch::Sender<u64>,
    events: AtomicU64,
    overflows: AtomicU64,
}

impl Shared {
    fn wake(&self) {
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }
    fn on_event(&self, ev: &Uevent) {
        self.events.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(action = ?ev.action, devpath = %ev.devpath, "uevent");
        // No state to update or drop (not even on remove): waiters look at sysfs.
        self.wake();
    }
}

/// Listens to kernel uevents and resolves guest addresses; one per agent.
pub struct DeviceWatcher {
    sysfs_root: PathBuf,
    dev_root: PathBuf,
    config: WatcherConfig,
    shared: Arc<Shared>,
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for DeviceWatcher {
    fn drop(&mut self) {
        if let Ok(mut r) = self.reader.lock() {
            if let Some(task) = r.take() {
                task.abort();
            }
        }
    }
}

async fn read_uevents(fd: AsyncFd<OwnedFd>, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut guard = match fd.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!("uevent socket: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        match guard.try_io(|fd| uevent::receive(fd.get_ref(), &mut buf)) {
            Err(_would_block) => {}
            Ok(Ok(uevent::Received::Kernel(n))) => {
                match Uevent::parse(buf.get(..n).unwrap_or_default()) {
                    Ok(ev) => shared.on_event(&ev),
                    Err(e) => {
                        tracing::debug!("ignoring uevent: {e}");
                        shared.wake();
                    }
                }
            }
            Ok(Ok(uevent::Received::Foreign)) => {}
            Ok(Ok(uevent::Received::Overflow)) => {
                shared.overflows.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("uevent queue overflowed: events lost, waiters rescan sysfs");
                shared.wake();
            }
            Ok(Err(e)) => {
                tracing::warn!("uevent socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl DeviceWatcher {
    /// Starts listening to kernel uevents (NETLINK_KOBJECT_UEVENT) BEFORE any
    /// request is served. Must run inside a tokio runtime with IO enabled
    /// (tokio panics when registering a socket without an IO driver).
    pub fn start(sysfs_root: PathBuf, dev_root: PathBuf) -> Result<Arc<Self>, DeviceError> {
        Self::start_with(sysfs_root, dev_root, WatcherConfig::default())
    }

    /// [`start`](Self::start) with explicit timing.
    pub fn start_with(
        sysfs_root: PathBuf,
        dev_root: PathBuf,
        config: WatcherConfig,
    ) -> Result<Arc<Self>, DeviceError> {
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|e| DeviceError::Listener(format!("no tokio runtime: {e}")))?;
        let sock = uevent::open_socket()
            .map_err(|e| DeviceError::Listener(format!("netlink socket: {e}")))?;
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open until it is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) }
            .map_err(|e| DeviceError::Listener(format!("registering the socket: {e}")))?;
        let watcher = Self::build(sysfs_root, dev_root, config);
        let task = rt.spawn(read_uevents(fd, watcher.shared.clone()));
        if let Ok(mut r) = watcher.reader.lock() {
            *r = Some(task);
        }
        // The scan right after subscribing. Nothing is kept from it (every
        // wait scans sysfs itself when it starts); it only shows in the log
        // what was already there.
        let mut present: Vec<String> = std::fs::read_dir(watcher.sysfs_root.join("block"))
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        present.sort();
        tracing::info!(block_devices = ?present, "uevent listener started");
        Ok(Arc::new(watcher))
    }

    /// A watcher with no uevent source: waits poll sysfs, and
    /// [`inject`](Self::inject) stands in for the kernel (tests, or a
    /// caller with its own event source).
    pub fn polling_only(
        sysfs_root: PathBuf,
        dev_root: PathBuf,
        config: WatcherConfig,
    ) -> Arc<Self> {
        Arc::new(Self::build(sysfs_root, dev_root, config))
    }

    fn build(sysfs_root: PathBuf, dev_root: PathBuf, config: WatcherConfig) -> Self {
        let shared = Shared {
            generation: watch::Sender::new(0),
            events: AtomicU64::new(0),
            overflows: AtomicU64::new(0),
        };
        Self {
            sysfs_root,
            dev_root,
            config,
            shared: Arc::new(shared),
            reader: Mutex::new(None),
        }
    }

    /// Handles `ev` as if the kernel had sent it: wakes every waiter.
    pub fn inject(&self, ev: &Uevent) {
        self.shared.on_event(ev);
    }

    /// Uevents received (or injected) so far.
    pub fn events_seen(&self) -> u64 {
        self.shared.events.load(Ordering::Relaxed)
    }

    /// Times the kernel reported a receive-queue overflow.
    pub fn overflows(&self) -> u64 {
        self.shared.overflows.load(Ordering::Relaxed)
    }

    pub fn sysfs_root(&self) -> &Path {
        &self.sysfs_root
    }

    pub fn dev_root(&self) -> &Path {
        &self.dev_root
    }

    /// Calls `probe` (with the time waited so far) when the wait starts,
    /// after every uevent and every poll interval, until it returns `Ok` or
    /// `timeout` passes; then `Err` with the probe's last reason.
    pub async fn wait_until<T>(
        &self,
        timeout: Duration,
        probe: impl FnMut(Duration) -> Result<T, String>,
    ) -> Result<T, String> {
        self.wait_deadline(deadline_after(timeout), probe).await
    }

    async fn wait_deadline<T>(
        &self,
        deadline: Instant,
        mut probe: impl FnMut(Duration) -> Result<T, String>,
    ) -> Result<T, String> {
        let start = Instant::now();
        // Subscribed before the first look: an event from now on is seen.
        let mut events = self.shared.generation.subscribe();
        loop {
            events.borrow_and_update();
            let last = match probe(start.elapsed()) {
                Ok(v) => return Ok(v),
                Err(reason) => reason,
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(last);
            }
            let nap = self
                .config
                .poll_interval
                .max(Duration::from_millis(1))
                .min(deadline - now);
            tokio::select! {
                changed = events.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep(nap).await;
                    }
                }
                _ = tokio::time::sleep(nap) => {}
            }
        }
    }

    /// Resolves `target` until its sysfs entry and the guest's node agree.
    pub(super) async fn resolve(
        &self,
        target: &Target,
        deadline: Instant,
    ) -> Result<Found, String> {
        let (mut rescanned, mut bound) = (false, false);
        self.wait_deadline(deadline, |waited| {
            let err = match sysfs::find(&self.sysfs_root, target) {
                Ok(f) => {
                    nodes::check_node(&self.dev_root.join(&f.name), f.block, f.major, f.minor)?;
                    return Ok(f);
                }
                Err(e) => e,
            };
            match target {
                Target::Scsi(addr) if !rescanned && waited >= self.config.scsi_rescan_after => {
                    rescanned = true;
                    let (sysfs, addr) = (self.sysfs_root.clone(), *addr);
                    tracing::info!(
                        "SCSI {addr} not visible after {}: rescanning",
                        secs(&waited)
                    );
                    tokio::task::spawn_blocking(move || sysfs::scsi_rescan(&sysfs, addr));
                }
                Target::Vfio(paths)
                    if !bound
                        && paths
                            .iter()
                            .all(|p| sysfs::pci_device(&self.sysfs_root, p).is_ok()) =>
                {
                    bound = true;
                    let (sysfs, paths) = (self.sysfs_root.clone(), paths.clone());
                    tokio::task::spawn_blocking(move || sysfs::vfio_bind(&sysfs, &paths));
                }
                _ => {}
            }
            Err(err)
        })
        .await
    }

    /// Waits up to `timeout` for the device of `kind` at `address` (the
    /// request's `guest_address` forms; e.g. a Storage source), e.g.
    /// `(DEVICE_KIND_BLK_PCI, "02/01")` -> `/dev/vdb 254:16`.
    pub async fn wait_device(
        &self,
        kind: DeviceKind,
        address: &str,
        timeout: Duration,
    ) -> Result<GuestDevice, DeviceError> {
        let mut d = Device::new();
        d.kind = kind.into();
        d.guest_address = address.to_owned();
        let target = parse_target(&d)?.ok_or_else(|| DeviceError::Invalid {
            device: describe(&d),
            reason: "nothing to wait for".into(),
        })?;
        let found = self
            .resolve(&target, deadline_after(timeout))
            .await
            .map_err(|last| DeviceError::Timeout {
                device: describe(&d),
                waited: timeout,
                last,
            })?;
        Ok(GuestDevice {
            node: self.dev_root.join(&found.name),
            major: found.major,
            minor: found.minor,
            block: found.block,
        })
    }
}

pub(super) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}
