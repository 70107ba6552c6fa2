//! How the host reaches the agent: the virtio-serial port `agent.channel.0`
//! (always), and vsock port 1024 when the guest has `/dev/vsock`.
pub mod deframe;
pub mod serial;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The port name QEMU gives the agent channel (`-device virtserialport,name=`).
pub const PORT_NAME: &str = "agent.channel.0";
/// The vsock port the agent listens on when vsock exists.
pub const VSOCK_PORT: u32 = 1024;

/// `/dev/<vportNpM>` of the virtio-serial port named `name`, by looking at
/// `<sysfs>/class/virtio-ports/*/name` (no udev in the guest).
pub fn find_port(sysfs: &Path, dev: &Path, name: &str) -> Option<PathBuf> {
    let dir = sysfs.join("class/virtio-ports");
    let mut entries: Vec<_> = std::fs::read_dir(dir).ok()?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    entries.into_iter().find_map(|e| {
        let n = std::fs::read_to_string(e.path().join("name")).ok()?;
        (n.trim_end_matches('\n') == name).then(|| dev.join(e.file_name()))
    })
}

/// Waits for the port (its module may still be loading) and its /dev node.
/// Logs once `warn_after` has passed, and keeps looking: the agent is useless
/// without a transport, so it never gives up.
pub async fn wait_for_port(sysfs: &Path, dev: &Path, name: &str, warn_after: Duration) -> PathBuf {
    let start = Instant::now();
    let mut warned = false;
    loop {
        if let Some(p) = find_port(sysfs, dev, name) {
            if p.exists() {
                tracing::info!(port = %p.display(), waited_ms = start.elapsed().as_millis() as u64, "agent port found");
                return p;
            }
        }
        if !warned && start.elapsed() > warn_after {
            tracing::error!(name, "no virtio-serial port with this name yet; still looking (is -device virtserialport,name={name} set?)");
            warned = true;
        }
        tokio::time::sleep(Duration::from_millis(if warned { 1000 } else { 50 })).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_port_by_name() {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("sys");
        for (port, name) in [
            ("vport0p0", "org.qemu.guest_agent.0\n"),
            ("vport0p1", "agent.channel.0\n"),
        ] {
            std::fs::create_dir_all(sys.join("class/virtio-ports").join(port)).unwrap();
            std::fs::write(sys.join("class/virtio-ports").join(port).join("name"), name).unwrap();
        }
        assert_eq!(
            find_port(&sys, Path::new("/dev"), PORT_NAME),
            Some(PathBuf::from("/dev/vport0p1"))
        );
        assert_eq!(find_port(&sys, Path::new("/dev"), "other"), None);
        assert_eq!(
            find_port(&d.path().join("none"), Path::new("/dev"), PORT_NAME),
            None
        );
    }
}
