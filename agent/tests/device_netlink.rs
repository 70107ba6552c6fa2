//! The uevent listener on the real host: `DeviceWatcher::start` on /sys and
//! /dev, woken by the kernel's uevents for loop devices (needs root and
//! /dev/loop-control; fails saying so otherwise).
use capsule_agent::device;

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use capsule_agent_protocol::agent::{Device, DeviceKind};
use device::{prepare, DeviceWatcher, WatcherConfig};

const LOOP_CTL_ADD: libc::c_ulong = 0x4C80;
const LOOP_CTL_REMOVE: libc::c_ulong = 0x4C81;

/// Polling once an hour: only a uevent can end a wait in time.
fn event_only() -> WatcherConfig {
    WatcherConfig {
        poll_interval: Duration::from_secs(3600),
        ..WatcherConfig::default()
    }
}

/// Root and the loop driver, or a failure saying what is missing.
fn require_loop_devices() {
    capsule_hypervisor::testkit::require_root("creating loop devices");
    assert!(
        Path::new("/dev/loop-control").exists(),
        "/dev/loop-control is missing: load the loop driver (`modprobe loop`)"
    );
}

fn loop_ctl(req: libc::c_ulong, index: u32) -> std::io::Result<()> {
    let ctl = fs::File::open("/dev/loop-control")?;
    // SAFETY: LOOP_CTL_ADD/REMOVE take the index by value.
    // SAFETY: the loop-control ioctls take an integer argument, no pointer.
    let r = unsafe { libc::ioctl(ctl.as_raw_fd(), req as _, index as libc::c_ulong) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A loop device index no one uses (created by the test, removed after).
fn new_loop_index() -> Option<u32> {
    let base = 3000 + (std::process::id() % 500) * 2;
    (base..base + 200).find(|i| {
        !Path::new(&format!("/sys/block/loop{i}")).exists() && loop_ctl(LOOP_CTL_ADD, *i).is_ok()
    })
}

struct LoopDev(u32);
impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = loop_ctl(LOOP_CTL_REMOVE, self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_a_losetup_device_is_woken_by_the_change_uevent() {
    require_loop_devices();
    let w = DeviceWatcher::start_with("/sys".into(), "/dev".into(), event_only()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    fs::File::create(&img).unwrap().set_len(1 << 20).unwrap();
    let img_s = img.to_string_lossy().into_owned();

    // Which loopN has our file as backing file (the `loop/backing_file`
    // attribute appears with the attach, announced by a "change" uevent).
    let probe_img = img_s.clone();
    let probe = move |_: Duration| -> Result<String, String> {
        for e in fs::read_dir("/sys/block")
            .map_err(|e| e.to_string())?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let bf = fs::read_to_string(e.path().join("loop/backing_file")).unwrap_or_default();
            if name.starts_with("loop") && bf.trim() == probe_img {
                return Ok(name);
            }
        }
        Err(format!("no loop device backed by {probe_img}"))
    };
    let w2 = w.clone();
    let waiter = tokio::spawn(async move { w2.wait_until(Duration::from_secs(20), probe).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = w.events_seen();
    let start = Instant::now();
    let out = Command::new("losetup")
        .args(["--find", "--show", &img_s])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let loopdev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let got = waiter.await.unwrap();
    let elapsed = start.elapsed();
    let _ = Command::new("losetup").args(["-d", &loopdev]).status();
    assert_eq!(got.map(|n| format!("/dev/{n}")), Ok(loopdev));
    assert!(
        elapsed < Duration::from_secs(5),
        "woken after {elapsed:?}: not by the uevent"
    );
    assert!(w.events_seen() > before, "no uevent received");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blk_mmio_by_name_finds_a_hotplugged_loop_device_and_not_a_removed_one() {
    require_loop_devices();
    let w = DeviceWatcher::start_with("/sys".into(), "/dev".into(), event_only()).unwrap();
    // Pick a free index without creating it yet.
    let index = new_loop_index().expect("no free loop device index (LOOP_CTL_ADD failed)");
    loop_ctl(LOOP_CTL_REMOVE, index).unwrap();
    let name = format!("loop{index}");
    let mut d = Device::new();
    d.id = "dev-loop".into();
    d.kind = DeviceKind::DEVICE_KIND_BLK_MMIO.into();
    d.guest_address = name.clone();
    d.container_path = "/dev/xvdz".into();
    let req = vec![d];

    let (w2, req2) = (w.clone(), req.clone());
    let waiter = tokio::spawn(async move { prepare(&w2, &req2, Duration::from_secs(20)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    loop_ctl(LOOP_CTL_ADD, index).unwrap();
    let guard = LoopDev(index);
    let got = waiter.await.unwrap().unwrap();
    let elapsed = start.elapsed();
    assert!(
        elapsed < Duration::from_secs(5),
        "woken after {elapsed:?}: not by the uevent"
    );
    assert_eq!(got[0].guest_node, PathBuf::from(format!("/dev/{name}")));
    assert_eq!((got[0].guest_major, got[0].guest_minor), (7, index));

    // Removed: no longer matched, even though it was seen before.
    drop(guard);
    let err = prepare(&w, &req, Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(
        err.to_string().starts_with(&format!(
            "device dev-loop (blk-mmio at {name}): not visible"
        )),
        "{err}"
    );
}
