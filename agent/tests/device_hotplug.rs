//! Devices plugged into a running guest by the real stack (the device
//! manager over the hypervisor's `QemuVm` backend) and given to containers
//! by the agent at the guest address the manager returned. One VM for all
//! steps (the TCG boot is the expensive part); each step is announced on
//! stderr and named in its failures.
//!
//! 1. CreateContainer with three hot-plugged disks: virtio-blk over a loop
//!    device, scsi-hd over a loop device (driver virtio-scsi, address
//!    `id:lun`), vhost-user-blk served by qemu-storage-daemon (resolved from
//!    a vhost-user store, as the shim's resolver does). Each node has the
//!    requested mode and owner and the guest's numbers; the owner may write,
//!    the group may only read, others get EACCES; the host's data is read
//!    and data written inside the container (dd) lands in the host file.
//! 2. Duplicate container paths: two devices for one path in
//!    CreateContainer -> INVALID_ARGUMENT naming both; AddDevice over a path
//!    that holds a device -> ALREADY_EXISTS naming both.
//! 3. Churn with AddDevice/RemoveDevice on the running container, for
//!    virtio-blk and scsi-hd: a disk is added, removed and unplugged, then
//!    another disk (another backing file) is plugged at the same guest
//!    address and added at the same container path: the container reads
//!    and writes the new disk, never the old one.
//! 4. Cleanup: containers removed, every device detached (QEMU holds no
//!    capsule device but the share), the VM stopped, loop devices
//!    detached, qemu-storage-daemon killed.
//!
//! Needs root (loop devices, mknod), qemu-system-x86_64,
//! qemu-storage-daemon, virtiofsd and the guest image (built by
//! `agent/build-static.sh`, which the support module runs); fails saying
//! which is missing.
#![allow(clippy::await_holding_lock)]
mod support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use capsule_agent_protocol::agent::{AddDeviceRequest, Device, RemoveDeviceRequest};
use capsule_devmgr::device::DevType;
use capsule_devmgr::testing::ManagerTestExt;
use capsule_devmgr::{
    DetachOutcome, DeviceId, DeviceInfo, DeviceManager, GuestAddress, HostDevice, Resolver,
    ResolverConfig,
};
use capsule_hypervisor::testkit::{pattern, require_root, Daemon, LoopDev};
use support::qemu::SCSI_ID_PREFIX;
use support::*;
use ttrpc::Code;

const DISK_SIZE: u64 = 16 << 20;
/// Where the container writes (block 256 of 4 KiB), away from the marker.
const DATA_AT: u64 = 1 << 20;
const DATA_LEN: usize = 8192;
/// Owner and mode the nodes are requested with.
const UID: u32 = 1000;
const GID: u32 = 6;
const MODE: u32 = 0o640;
/// virtio-blk's (dynamic) block major in the guest kernel; sd is 8.
const VIRTIO_BLK_MAJOR: u32 = 254;
const SD_MAJOR: u32 = 8;

/// A raw image whose first bytes are `CAPSULE-<name>`.
fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(format!("{name}.img"));
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(DISK_SIZE).unwrap();
    f.write_all_at(marker_of(name).as_bytes(), 0).unwrap();
    p
}

fn marker_of(name: &str) -> String {
    format!("CAPSULE-{name}")
}

fn read_host(p: &Path, at: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    std::fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut buf, at)
        .unwrap();
    buf
}

/// The OCI request for a block device: `path` with the host numbers.
fn info(path: &str, (major, minor): (u32, u32), mode: u32, uid: u32, gid: u32) -> DeviceInfo {
    DeviceInfo {
        file_mode: Some(mode),
        uid: Some(uid),
        gid: Some(gid),
        ..DeviceInfo::new(path, DevType::Block, major, minor)
    }
}

/// A device the manager attached, and what the agent gets for it.
#[derive(Clone)]
struct Plugged {
    id: DeviceId,
    addr: GuestAddress,
    dev: Device,
}

/// new_device + attach (the hotplug through QemuVm); `prefix` is the
/// manager's id prefix towards QEMU (see support::qemu).
async fn plug(mgr: &DeviceManager, prefix: &str, host: HostDevice) -> Plugged {
    let info = host.info.clone().expect("an OCI device");
    let kind = host.kind.clone();
    let what = format!("{} ({:?})", info.container_path.display(), host.host_path);
    let id = mgr
        .add(host)
        .unwrap_or_else(|e| panic!("new_device {what}: {e}"));
    let t = Instant::now();
    let addr = mgr
        .attach(&id)
        .await
        .unwrap_or_else(|e| panic!("attach {what}: {e}"));
    eprintln!(
        "  attached {what} as {prefix}{id} at {addr:?} in {:?}",
        t.elapsed()
    );
    let dev = agent_device(&format!("{prefix}{id}"), &kind, &addr, &info);
    Plugged { id, addr, dev }
}

/// detach (the unplug, acknowledged by the guest) + remove.
async fn unplug(mgr: &DeviceManager, p: &Plugged) {
    let t = Instant::now();
    let out = mgr
        .detach(&p.id)
        .await
        .unwrap_or_else(|e| panic!("detach {}: {e}", p.dev.id));
    assert_eq!(out, DetachOutcome::Detached, "detach {}", p.dev.id);
    mgr.remove(&p.id)
        .await
        .unwrap_or_else(|e| panic!("remove {}: {e}", p.dev.id));
    eprintln!("  detached {} in {:?}", p.dev.id, t.elapsed());
}

fn add_req(cid: &str, d: &Device) -> AddDeviceRequest {
    let mut r = AddDeviceRequest::new();
    r.container_id = cid.into();
    r.device = protobuf::MessageField::some(d.clone());
    r
}

fn rm_req(cid: &str, path: &str) -> RemoveDeviceRequest {
    let mut r = RemoveDeviceRequest::new();
    r.container_id = cid.into();
    r.container_path = path.into();
    r
}

/// Guest command: the first `len` bytes of `dev`.
fn read_cmd(dev: &str, len: usize) -> String {
    format!("dd if={dev} bs=512 count=1 2>/dev/null | head -c {len}")
}

/// Guest command: `pattern(tag, DATA_LEN)` written at [`DATA_AT`] of `dev`,
/// flushed to the host.
fn write_cmd(dev: &str, tag: &str) -> String {
    format!(
        "yes {tag} | tr -d '\\n' | head -c {DATA_LEN} | dd of={dev} bs=4096 seek={} conv=fsync 2>&1",
        DATA_AT / 4096
    )
}

/// The test's execs: numbered ids, panics carry the step and the console.
struct Ctr<'a> {
    vm: &'a Vm,
    conn: &'a capsule_agent_protocol::client::AgentConn,
    cid: &'a str,
    n: AtomicU32,
}

impl Ctr<'_> {
    async fn sh_as(&self, user: (u32, u32, &[u32]), cmd: &str) -> (i32, String, String) {
        let exec_id = format!("x{}", self.n.fetch_add(1, Ordering::Relaxed));
        run_as(self.conn, self.cid, &exec_id, user, &["sh", "-c", cmd]).await
    }

    /// Runs `cmd` as root; requires exit 0; returns stdout.
    async fn ok(&self, step: &str, cmd: &str) -> String {
        self.ok_as(step, (0, 0, &[]), cmd).await
    }

    async fn ok_as(&self, step: &str, user: (u32, u32, &[u32]), cmd: &str) -> String {
        let (st, out, err) = self.sh_as(user, cmd).await;
        assert_eq!(
            st,
            0,
            "{step}: `{cmd}` as {user:?} in {}: stdout {out:?} stderr {err:?}\n--- console ---\n{}",
            self.cid,
            self.vm.console()
        );
        out
    }

    /// Checks the node at `path`: mode, owner, guest major; the disk's
    /// marker; who may read and write; a write reaching `host_file`.
    /// Returns the node's guest `(major, minor)`.
    async fn check_disk(
        &self,
        step: &str,
        path: &str,
        major: u32,
        name: &str,
        host_file: &Path,
    ) -> (u32, u32) {
        let out = self
            .ok(step, &format!("stat -c '%a %u %g %t:%T' {path}"))
            .await;
        let (head, numbers) = out.trim().rsplit_once(' ').unwrap_or_default();
        assert_eq!(
            head,
            format!("{MODE:o} {UID} {GID}"),
            "{step}: mode and owner of {path}: {out:?}"
        );
        let (maj, min) = numbers.split_once(':').unwrap_or_default();
        let hex = |s: &str| u32::from_str_radix(s, 16).unwrap_or(u32::MAX);
        let (maj, min) = (hex(maj), hex(min));
        assert_eq!(maj, major, "{step}: guest major of {path}: {out:?}");
        let want = marker_of(name);
        let owner = (UID, GID, &[][..]);
        let got = self.ok_as(step, owner, &read_cmd(path, want.len())).await;
        assert_eq!(got, want, "{step}: {path} is not the disk {name}");
        // The group may read, not write; others may not even read.
        let group = (2000, 2000, &[GID][..]);
        assert_eq!(
            self.ok_as(step, group, &read_cmd(path, want.len())).await,
            want,
            "{step}: group read of {path}"
        );
        let (st, _, err) = self
            .sh_as(
                group,
                &format!("dd if=/dev/zero of={path} bs=512 count=1 seek=8"),
            )
            .await;
        assert!(
            st != 0 && err.contains("Permission denied"),
            "{step}: group write to {path} (mode {MODE:o}) must fail: {st} {err}"
        );
        let (st, _, err) = self
            .sh_as(
                (65534, 65534, &[]),
                &format!("dd if={path} of=/dev/null bs=512 count=1"),
            )
            .await;
        assert!(
            st != 0 && err.contains("Permission denied"),
            "{step}: others reading {path} (mode {MODE:o}) must fail: {st} {err}"
        );
        // The owner writes; the host reads it from the backing file.
        let tag = format!("ctr-{name}");
        self.ok_as(step, owner, &write_cmd(path, &tag)).await;
        assert_eq!(
            read_host(host_file, DATA_AT, DATA_LEN),
            pattern(&tag, DATA_LEN),
            "{step}: the container's write to {path} is not in {}",
            host_file.display()
        );
        eprintln!(
            "  {path} ({maj}:{min}): mode, owner, marker {want:?}, permissions, write to the host: ok"
        );
        (maj, min)
    }
}

/// A vhost-user store (devmgr's layout) with one device `name` = `b 241:minor`
/// whose socket qemu-storage-daemon serves from `image`.
fn vhost_store(dir: &Path, name: &str, minor: u32, image: &Path) -> (PathBuf, Daemon) {
    let store = dir.join("vhost-store");
    for d in ["block/devices", "block/sockets"] {
        std::fs::create_dir_all(store.join(d)).unwrap();
    }
    nix::sys::stat::mknod(
        &store.join("block/devices").join(name),
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(
            capsule_devmgr::vhost_store::VHOST_USER_BLK_MAJOR.into(),
            minor.into(),
        ),
    )
    .expect("mknod in the vhost-user store");
    let sock = store.join("block/sockets").join(name);
    let qsd = Daemon::vhost_user_blk(image, &sock, &dir.join("qsd.log"))
        .unwrap_or_else(|e| panic!("qemu-storage-daemon: {e:#}"));
    (store, qsd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotplugged_devices_reach_containers() {
    require_root("hot-plugging loop devices and a vhost-user store (mknod)");
    let _g = vm_lock();
    let t0 = Instant::now();
    let vm = Vm::boot(VmOptions::default()).await;
    let conn = vm.connect().await;
    create_sandbox(&conn, "devices").await.unwrap();
    eprintln!("VM and agent ready in {:?}", t0.elapsed());
    let dir = vm.dir().join("disks");
    std::fs::create_dir_all(&dir).unwrap();

    // Host devices, resolved like the shim does: loop devices by number
    // through sysfs, vhost-user-blk through the store.
    let blk_lo = LoopDev::attach(&image(&dir, "blk1")).unwrap();
    let scsi_lo = LoopDev::attach(&image(&dir, "scsi1")).unwrap();
    let vu_img = image(&dir, "vhost1");
    let (store, mut qsd) = vhost_store(&dir, "vub0", 0, &vu_img);
    let resolver = Resolver::new(ResolverConfig {
        vhost_user_store: Some(store),
        ..ResolverConfig::default()
    })
    .unwrap();
    let resolve = |i: DeviceInfo| {
        resolver
            .resolve(&i)
            .unwrap_or_else(|e| panic!("resolve {}: {e}", i.container_path.display()))
    };
    let blk_host = resolve(info("/dev/xvdb", blk_lo.numbers().unwrap(), MODE, UID, GID));
    assert_eq!(blk_host.host_path, blk_lo.device);
    let scsi_host = resolve(info(
        "/dev/xvdc",
        scsi_lo.numbers().unwrap(),
        MODE,
        UID,
        GID,
    ));
    let vu_host = resolve(info(
        "/dev/xvdd",
        (capsule_devmgr::vhost_store::VHOST_USER_BLK_MAJOR, 0),
        MODE,
        UID,
        GID,
    ));
    assert!(
        matches!(vu_host.kind, capsule_devmgr::DeviceKind::VhostUser { .. }),
        "{vu_host:?}"
    );

    // ---- 1. CreateContainer with hot-plugged devices.
    let step = "step 1 (CreateContainer: virtio-blk, scsi-hd, vhost-user-blk)";
    eprintln!("{step}");
    let t = Instant::now();
    let blk = plug(&vm.blk, "", blk_host).await;
    let scsi = plug(&vm.scsi, SCSI_ID_PREFIX, scsi_host).await;
    let vu = plug(&vm.blk, "", vu_host).await;
    assert!(matches!(blk.addr, GuestAddress::Pci(_)), "{:?}", blk.addr);
    assert!(
        matches!(scsi.addr, GuestAddress::Scsi(_)),
        "{:?}",
        scsi.addr
    );
    assert!(matches!(vu.addr, GuestAddress::Pci(_)), "{:?}", vu.addr);
    let rootfs = vm.busybox_rootfs("ctr");
    create_container(
        &conn,
        "ctr",
        &rootfs,
        &spec(&["sleep", "1000"], false, "ctr"),
        vec![blk.dev.clone(), scsi.dev.clone(), vu.dev.clone()],
        false,
    )
    .await
    .unwrap_or_else(|e| panic!("{step}: {e}\n--- console ---\n{}", vm.console()));
    conn.start_container(&creq("ctr")).await.unwrap();
    eprintln!("  plugged and created in {:?}", t.elapsed());
    let ctr = Ctr {
        vm: &vm,
        conn: &conn,
        cid: "ctr",
        n: AtomicU32::new(0),
    };
    ctr.check_disk(step, "/dev/xvdb", VIRTIO_BLK_MAJOR, "blk1", &blk_lo.file)
        .await;
    ctr.check_disk(step, "/dev/xvdc", SD_MAJOR, "scsi1", &scsi_lo.file)
        .await;
    ctr.check_disk(step, "/dev/xvdd", VIRTIO_BLK_MAJOR, "vhost1", &vu_img)
        .await;

    // ---- 2. Duplicate container paths.
    let step = "step 2 (duplicate container paths)";
    eprintln!("{step}");
    let mut a = blk.dev.clone();
    a.container_path = "/dev/same".into();
    let mut b = scsi.dev.clone();
    b.container_path = "/dev/same".into();
    let dup_rootfs = vm.busybox_rootfs("dup");
    let e = create_container(
        &conn,
        "dup",
        &dup_rootfs,
        &spec(&["true"], false, "dup"),
        vec![a, b],
        false,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Some(Code::INVALID_ARGUMENT), "{step}: {e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&blk.dev.id) && msg.contains(&scsi.dev.id) && msg.contains("/dev/same"),
        "{step}: the error names both devices and the path: {msg}"
    );
    assert_eq!(
        conn.stats_container(&creq("dup")).await.unwrap_err().code(),
        Some(Code::NOT_FOUND),
        "{step}: nothing of the refused container remains"
    );
    // AddDevice over a path CreateContainer filled: refused, naming both.
    let mut over = scsi.dev.clone();
    over.container_path = "/dev/xvdb".into();
    let e = conn.add_device(&add_req("ctr", &over)).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::ALREADY_EXISTS), "{step}: {e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&blk.dev.id) && msg.contains(&scsi.dev.id),
        "{step}: {msg}"
    );
    // ...and the node there is still the virtio-blk disk.
    let got = ctr
        .ok(step, &read_cmd("/dev/xvdb", marker_of("blk1").len()))
        .await;
    assert_eq!(got, marker_of("blk1"), "{step}: /dev/xvdb was replaced");

    // ---- 3. Churn: remove and re-add under the same path, another disk.
    for (label, mgr, prefix, path, major) in [
        ("virtio-blk", &vm.blk, "", "/dev/xvde", VIRTIO_BLK_MAJOR),
        ("scsi-hd", &vm.scsi, SCSI_ID_PREFIX, "/dev/xvdf", SD_MAJOR),
    ] {
        let step = format!("step 3 (AddDevice/RemoveDevice churn, {label})");
        let step = step.as_str();
        eprintln!("{step}");
        let name_a = format!("{}-a", &label[..4]);
        let name_b = format!("{}-b", &label[..4]);
        let lo_a = LoopDev::attach(&image(&dir, &name_a)).unwrap();
        let first = plug(
            mgr,
            prefix,
            resolve(info(path, lo_a.numbers().unwrap(), MODE, UID, GID)),
        )
        .await;
        let t = Instant::now();
        let r = conn
            .add_device(&add_req("ctr", &first.dev))
            .await
            .unwrap_or_else(|e| panic!("{step}: AddDevice: {e}\n{}", vm.console()));
        eprintln!("  AddDevice {path} ready in {:?}", t.elapsed());
        let numbers = ctr.check_disk(step, path, major, &name_a, &lo_a.file).await;
        assert_eq!(
            (r.guest_major, r.guest_minor),
            (i64::from(numbers.0), i64::from(numbers.1)),
            "{step}: AddDevice's numbers are the node's"
        );
        let e = conn
            .add_device(&add_req("ctr", &first.dev))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::ALREADY_EXISTS), "{step}: {e}");

        conn.remove_device(&rm_req("ctr", path))
            .await
            .unwrap_or_else(|e| panic!("{step}: RemoveDevice: {e}"));
        unplug(mgr, &first).await;
        ctr.ok(step, &format!("! test -e {path}")).await;
        if label == "virtio-blk" {
            // The guest acknowledged the unplug: no disk with the old
            // serial is left.
            let serial_gone = format!(
                "for s in /sys/block/*/serial; do [ -r $s ] && read -r v < $s && [ \"$v\" = {} ] && exit 1; done; exit 0",
                first.dev.id
            );
            ctr.ok(step, &serial_gone).await;
        }
        // No wait for the guest beyond what detach did (as the shim): the
        // next disk goes in at once.

        let lo_b = LoopDev::attach(&image(&dir, &name_b)).unwrap();
        let second = plug(
            mgr,
            prefix,
            resolve(info(path, lo_b.numbers().unwrap(), MODE, UID, GID)),
        )
        .await;
        assert_eq!(
            second.addr, first.addr,
            "{step}: the new disk reuses the old guest address (the case where a stale device could be matched)"
        );
        conn.add_device(&add_req("ctr", &second.dev))
            .await
            .unwrap_or_else(|e| panic!("{step}: AddDevice again: {e}\n{}", vm.console()));
        ctr.check_disk(step, path, major, &name_b, &lo_b.file).await;
        assert_eq!(
            read_host(&lo_a.file, DATA_AT, DATA_LEN),
            pattern(&format!("ctr-{name_a}"), DATA_LEN),
            "{step}: the removed disk was written again"
        );
        conn.remove_device(&rm_req("ctr", path)).await.unwrap();
        assert_eq!(
            conn.remove_device(&rm_req("ctr", path))
                .await
                .unwrap_err()
                .code(),
            Some(Code::NOT_FOUND),
            "{step}: second RemoveDevice"
        );
        unplug(mgr, &second).await;
        drop((lo_a, lo_b));
    }

    // ---- 4. Cleanup: everything the test plugged goes away.
    let step = "step 4 (cleanup)";
    eprintln!("{step}");
    // A device given at CreateContainer can be removed too.
    conn.remove_device(&rm_req("ctr", "/dev/xvdb"))
        .await
        .unwrap();
    ctr.ok(step, "! test -e /dev/xvdb && test -b /dev/xvdc")
        .await;
    remove(&conn, "ctr").await.unwrap();
    for (mgr, p) in [(&vm.blk, &blk), (&vm.scsi, &scsi), (&vm.blk, &vu)] {
        unplug(mgr, p).await;
    }
    let left = vm.vm.devices().await.unwrap().capsule_ids();
    assert_eq!(
        left.into_iter().collect::<Vec<_>>(),
        vec![vm.share.to_string()],
        "{step}: QEMU still holds devices other than the share"
    );
    assert_eq!(vm.blk.len(), 1, "{step}: only the share is left");
    assert!(vm.scsi.is_empty(), "{step}");
    conn.destroy_sandbox(&Default::default()).await.unwrap();
    drop(conn);
    vm.shutdown().await;
    assert!(qsd.is_running(), "{step}: qemu-storage-daemon died early");
    qsd.kill();
    let files = [blk_lo.file.clone(), scsi_lo.file.clone()];
    drop((blk_lo, scsi_lo));
    for f in files {
        assert!(
            !LoopDev::is_attached(&f),
            "{step}: a loop device still backs {}",
            f.display()
        );
    }
    eprintln!("all steps in {:?}", t0.elapsed());
}
