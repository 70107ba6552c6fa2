//! Figure 6, pod networking: TCP throughput and HTTP request latency from
//! the node to the same server (busybox httpd) in (A) a capsule container,
//! (B) a runc container, (C) bare QEMU on the same tap + tc plumbing, (D)
//! a second bare QEMU serving with a container's isolation.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use capsule_device_api::{AttachRequest, DeviceBackend, DeviceKind};
use capsule_hypervisor::testkit::GuestShell;
use capsule_hypervisor::{QemuVm, VmBuilder};
use capsule_shim::config::Config;
use capsule_shim::sandbox::network::to_endpoint;
use capsule_shim::state::SandboxPaths;
use capsule_tests::netfix::{Netns, PodNs};
use capsule_tests::{Env, IMAGE, RUNTIME};

use crate::host::ctr;
use crate::report::Figure;
use crate::stats::{Series, Summary};

/// Size of the file fetched for throughput.
const BIG_MIB: usize = 32;
/// Requests (and handshakes) per target and round.
const REQUESTS: usize = 200;
const T: Duration = Duration::from_secs(300);
/// Target D: a second bare QEMU whose guest serves with a container's
/// isolation.
const CONTAINED: &str = "bare QEMU contained";
/// Every target's server port.
const PORT: u16 = 8080;

/// The targeted ratios compare like with like: the same server with the
/// same isolation, in capsule and in bare QEMU on the same plumbing.
const PLUMBING: &str = "capsule's plumbing adds nothing: the same server with a container's isolation, in capsule and in bare QEMU on the same tap + tc plumbing";
const UNCONTAINED: &str = "against the server in the bare guest's root cgroup and namespaces, which no container runs in (runc's pays the same cgroup cost)";
const ISOLATION: &str = "a container's own cost (its memory cgroup, mostly), in identical guests";

const METHOD: &str = "Four pods, each a network namespace with one veth to a private \"node\" namespace (what CNI's bridge plugin makes, without the bridge), serving the same files with busybox httpd: A **capsule**, a container started with `ctr run --runtime io.containerd.capsule.v2 --with-ns network:POD` (capsule plumbs a tap beside the veth with tc redirects and gives the VM a virtio-net device; its rootfs is virtio-fs, served by capsule's virtiofsd, which lets the guest cache failed lookups: httpd looks for the missing /etc/localtime on every request); B **runc**, the same container with runc; C **bare QEMU**, capsule's own QEMU command line for the same configuration started by the hypervisor crate alone (no shim, device manager, virtiofsd or agent: the busybox test guest), on a tap plumbed by `capsule-network` exactly as capsule does, configured by hand in the guest; D **bare QEMU contained**, a second VM like C whose server runs with a container's isolation: its own cgroup with every controller enabled and new pid, mount, ipc and uts namespaces (`unshare -p -f -m -i -u`), as `ctr run` gives A and B (no seccomp: `ctr run` sets none). Each VM serves one target, so every VM is idle for the same time between its slices (C's and D's servers once shared a guest, which kept C's VM busy for two slices in a row: that alone made A/C about 0.08 higher). The client runs in the node namespace: throughput the median of 10 `GET`s of a 32 MiB file (MB/s), latency the median of 200 sequential `GET`s of a small file on new connections (ms), the round trip the median of 200 TCP handshakes (`connect` returns on the guest kernel's SYN-ACK; httpd then accepts each connection and forks for it, so that work of the earlier handshakes overlaps the later ones). Every target serves from memory (/dev/shm). Order per round: the large GETs A, B, C, D, 10 times; then the requests in 40 slices of 5 per target in turn (A, B, C, D, A, B, …), so that a slow spell of the host falls on every target alike; then the handshakes the same way; one warm-up round first. Under TCG a request is guest CPU time: the vCPU thread runs for nearly all of it. The targets compare A with D, like with like: C's server runs in the bare guest's root cgroup, which no container does (runc's runs in a cgroup too), and D/C shows what a container's cgroup costs there (its memory controller, mostly: the accounting of every page and kernel object a request's fork touches).";

/// One HTTP/1.0 GET; returns the body length.
fn get(addr: SocketAddr, path: &str) -> std::io::Result<usize> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
    let mut total = 0;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf)? {
            0 => return Ok(total),
            n => total += n,
        }
    }
}

/// One target's sample of a round: median throughput (MB/s), median request
/// latency (ms), median TCP handshake time (ms: `connect` returns on the
/// SYN-ACK, which the guest kernel sends; httpd's accept and fork for each
/// connection come after it, and overlap the next handshakes).
struct Sample {
    mbs: f64,
    request_ms: f64,
    handshake_ms: f64,
}

/// Slices per round: each target's requests and handshakes are taken in
/// turn, `REQUESTS / SLICES` at a time, so a slow spell of the host (whole
/// runs of requests at twice the usual time, seen on every target) falls on
/// all targets alike instead of on whichever one it coincides with.
const SLICES: usize = 40;

/// Large GETs per target and round, one per target in turn.
const BIG_GETS: usize = 10;

/// `slices * per_slice` samples of `op` per address: `per_slice` against
/// each address in turn, `slices` times.
fn sliced(
    addrs: &[SocketAddr],
    slices: usize,
    per_slice: usize,
    op: impl Fn(SocketAddr) -> std::io::Result<f64>,
) -> std::io::Result<Vec<Vec<f64>>> {
    let mut samples = vec![Vec::with_capacity(slices * per_slice); addrs.len()];
    for _ in 0..slices {
        for (i, &addr) in addrs.iter().enumerate() {
            for _ in 0..per_slice {
                samples[i].push(op(addr)?);
            }
        }
    }
    Ok(samples)
}

/// Milliseconds `op` took.
fn timed_ms(op: impl FnOnce() -> std::io::Result<()>) -> std::io::Result<f64> {
    let t = Instant::now();
    op()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// MB/s of one GET of the large file from `addr`.
fn big_get_mbs(addr: SocketAddr) -> std::io::Result<f64> {
    let t0 = Instant::now();
    let n = get(addr, "/big")?;
    let secs = t0.elapsed().as_secs_f64();
    if n < BIG_MIB << 20 {
        return Err(std::io::Error::other(format!(
            "GET /big from {addr}: {n} bytes, expected at least {}",
            BIG_MIB << 20
        )));
    }
    Ok(n as f64 / 1e6 / secs)
}

/// One round against every address in `addrs`, from inside `node`: the
/// large GETs, one per target in turn, [`BIG_GETS`] times; then the
/// requests and then the handshakes, interleaved in [`SLICES`]. Each
/// figure of a round is the median of its samples.
fn measure_round(node: &capsule_network::Netns, addrs: &[SocketAddr]) -> Result<Vec<Sample>> {
    let owned = addrs.to_vec();
    node.run_blocking(move || {
        let addrs = owned;
        let per_slice = REQUESTS / SLICES;
        let mbs = sliced(&addrs, BIG_GETS, 1, big_get_mbs)?;
        let lat = sliced(&addrs, SLICES, per_slice, |addr| {
            timed_ms(|| get(addr, "/small").map(drop))
        })?;
        let shakes = sliced(&addrs, SLICES, per_slice, |addr| {
            timed_ms(|| TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map(drop))
        })?;
        Ok(mbs
            .iter()
            .zip(lat.iter().zip(&shakes))
            .map(|(m, (l, h))| Sample {
                mbs: Summary::of(m).median,
                request_ms: Summary::of(l).median,
                handshake_ms: Summary::of(h).median,
            })
            .collect())
    })
    .map_err(|e| anyhow!("measuring {addrs:?}: {e}"))
}

/// Writes the served files to memory (/dev/shm: tmpfs in a container,
/// devtmpfs in the bare guest), so every target measures the network, not
/// its filesystem (a container's rootfs is virtio-fs in capsule, overlayfs
/// with runc).
fn files_script() -> String {
    format!("mkdir -p /dev/shm/www && dd if=/dev/zero of=/dev/shm/www/big bs=1M count={BIG_MIB} 2>/dev/null && echo ok > /dev/shm/www/small")
}

/// The server of A, B and C.
fn serve_script() -> String {
    format!(
        "{} && exec httpd -f -p {PORT} -h /dev/shm/www",
        files_script()
    )
}

/// D's server: the same in the bare guest with a container's isolation (its
/// own cgroup with every controller enabled, and new pid, mount, ipc and uts
/// namespaces, as `ctr run` gives it; no seccomp, as `ctr run` sets none).
fn contained_script() -> String {
    format!("{} && {{ grep -q cgroup2 /proc/mounts || mount -t cgroup2 none /sys/fs/cgroup; }} && mkdir -p /sys/fs/cgroup/srv && for c in $(cat /sys/fs/cgroup/cgroup.controllers); do echo +$c > /sys/fs/cgroup/cgroup.subtree_control; done && sh -c 'echo $$ > /sys/fs/cgroup/srv/cgroup.procs && exec unshare -p -f -m -i -u httpd -f -p {PORT} -h /dev/shm/www'", files_script())
}

/// A container serving the files in `pod`.
fn container(env: &Env, runtime: &str, pod: &Path, id: &str) -> Result<()> {
    let ns = format!("network:{}", pod.display());
    let script = serve_script();
    let o = capsule_tests::run_with_timeout(
        ctr(
            env,
            &[
                "run",
                "-d",
                "--runtime",
                runtime,
                "--with-ns",
                &ns,
                IMAGE,
                id,
                "sh",
                "-c",
                &script,
            ],
        ),
        T,
    )?;
    ensure!(o.status.success(), "{id}: {}", capsule_tests::text(&o));
    Ok(())
}

/// A bare QEMU target: its VM (the guest's shell kept open with it) and
/// its pod link's plumbing, undone when the bench is done with it.
struct BareVm {
    qemu: QemuVm,
    _shell: GuestShell,
    endpoint: capsule_network::EndpointRecord,
}

/// Bare QEMU: the hypervisor crate's launcher with the bench's VM
/// configuration, the busybox test guest, and the pod's link plumbed as
/// capsule plumbs it, cold-plugged; `server` runs in the background.
async fn bare_vm(env: &Env, pod: &Path, dir: &Path, server: &str) -> Result<BareVm> {
    let config = Config::load_file(&env.config_path).map_err(|e| anyhow!("{e}"))?;
    let paths = SandboxPaths::new(dir, "bare-net");
    let mut vm =
        capsule_shim::sandbox::qemu::vm_config(&config, &paths).map_err(|e| anyhow!("{e}"))?;
    vm.run_dir = dir.join("vm");
    vm.initrd = Some(env.ready.initramfs.with_file_name("initramfs-test.img"));
    vm.netns = Some(pod.to_path_buf());
    let links = capsule_network::endpoints(pod, Duration::from_secs(5)).await?;
    let link = links.first().context("the bare pod has no link")?;
    let record = capsule_network::plan(pod, link, 1)?;
    let plumbed = capsule_network::plumb(
        pod,
        &link.name,
        &capsule_network::PlumbOptions {
            queues: 1,
            timeout: Duration::from_secs(5),
        },
    )
    .await?;
    let builder = VmBuilder::new(vm)?;
    builder
        .taps()
        .hand_over(&plumbed.record.tap, plumbed.queues);
    let req = AttachRequest {
        id: "net0".into(),
        kind: DeviceKind::Network(to_endpoint(&record)),
        host_path: pod.to_path_buf(),
        read_only: false,
        driver: None,
        block_index: None,
        drive_name: None,
        scsi_addr: None,
        pmem_index: None,
        pci_slots: vec![6],
    };
    builder
        .coldplug(&req)
        .await
        .map_err(|e| anyhow!("cold-plugging the bare VM's NIC: {e}"))?;
    let qemu = builder.start().await?;
    let mut sh = GuestShell::connect(&qemu.description().agent_socket).await?;
    let ip = link
        .addresses
        .iter()
        .find(|a| !a.link_local)
        .map(|a| a.prefix.to_string())
        .context("the bare pod's link has no address")?;
    sh.run_ok(
        &format!(
            "i=$(for d in /sys/class/net/*; do [ \"$(cat $d/address)\" = {mac} ] && basename $d; done); ip link set \"$i\" up && ip addr add {ip} dev \"$i\"",
            mac = record.mac
        ),
        Duration::from_secs(30),
    )
    .await?;
    sh.run_ok(
        &format!("({server}) >/dev/null 2>&1 &"),
        Duration::from_secs(60),
    )
    .await?;
    Ok(BareVm {
        qemu,
        _shell: sh,
        endpoint: plumbed.record,
    })
}

/// Stops a bare VM and undoes its plumbing as capsule undoes it, whatever
/// the measurement's outcome, so a failed run leaks no QEMU or tap.
async fn stop_bare(vm: BareVm) -> Result<()> {
    let stopped = vm.qemu.stop().await;
    let unplumbed = capsule_network::unplumb(&vm.endpoint, Duration::from_secs(5)).await;
    stopped?;
    unplumbed?;
    Ok(())
}

fn addr(n: u8) -> SocketAddr {
    SocketAddr::from(([10, n, 0, 2], PORT))
}

/// Waits until `a` answers from `node`.
fn ready(node: &capsule_network::Netns, a: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if node.run_blocking(move || get(a, "/small")).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{a} did not answer within 120 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn run(env: &Env, rounds: usize) -> Result<Vec<Figure>> {
    let node = Netns::new("bnode")?;
    let pods = [
        PodNs::new("bcap", &node, 1500, 81)?,
        PodNs::new("brunc", &node, 1500, 82)?,
        PodNs::new("bbare", &node, 1500, 83)?,
        PodNs::new("bcont", &node, 1500, 84)?,
    ];
    let node_ns = capsule_network::Netns::open(&node.path)?;
    container(env, RUNTIME, &pods[0].ns.path, "net-cap")?;
    container(env, "io.containerd.runc.v2", &pods[1].ns.path, "net-runc")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dirs = [
        env.dir.path().join("bare-net"),
        env.dir.path().join("bare-contained"),
    ];
    for d in &dirs {
        std::fs::create_dir_all(d)?;
    }
    let bare = rt.block_on(bare_vm(env, &pods[2].ns.path, &dirs[0], &serve_script()))?;
    let contained = match rt.block_on(bare_vm(
        env,
        &pods[3].ns.path,
        &dirs[1],
        &contained_script(),
    )) {
        Ok(vm) => vm,
        Err(e) => {
            if let Err(stop) = rt.block_on(stop_bare(bare)) {
                eprintln!("stopping the bare VM after the contained one failed: {stop:#}");
            }
            return Err(e);
        }
    };
    let targets = [
        ("capsule", addr(81)),
        ("runc", addr(82)),
        ("bare QEMU", addr(83)),
        (CONTAINED, addr(84)),
    ];
    // The bare VMs are the bench's own: stopped and unplumbed whatever the
    // measurement's outcome.
    let measured = (|| -> Result<_> {
        for (_, a) in targets {
            ready(&node_ns, a)?;
        }
        let series = |what: &str| -> Vec<Series> {
            targets
                .iter()
                .map(|(n, _)| Series::new(format!("{n} {what}")))
                .collect()
        };
        let (mut tput, mut lat, mut shake) =
            (series("throughput"), series("latency"), series("handshake"));
        let addrs: Vec<SocketAddr> = targets.iter().map(|(_, a)| *a).collect();
        measure_round(&node_ns, &addrs)?; // warm-up
        for r in 0..rounds {
            let samples = measure_round(&node_ns, &addrs)?;
            for (i, ((name, _), m)) in targets.iter().zip(samples).enumerate() {
                tput[i].samples.push(m.mbs);
                lat[i].samples.push(m.request_ms);
                shake[i].samples.push(m.handshake_ms);
                eprintln!(
                    "network round {r}: {name}: {:.1} MB/s, {:.2} ms per request, {:.2} ms per TCP handshake",
                    m.mbs, m.request_ms, m.handshake_ms
                );
            }
        }
        Ok((tput, lat, shake))
    })();
    let stopped = [
        rt.block_on(stop_bare(bare)),
        rt.block_on(stop_bare(contained)),
    ];
    let (tput, lat, shake) = measured?;
    for s in stopped {
        s?;
    }
    drop(rt);
    for id in ["net-cap", "net-runc"] {
        env.remove(id);
    }
    env.assert_clean(T)?;
    for p in &pods {
        p.assert_untouched()?;
    }

    let mut t = Figure::new(
        "net-throughput",
        "6a. Pod network throughput",
        "MB/s",
        METHOD,
    );
    t.series = tput;
    t.ratio_at_least(
        "capsule / bare QEMU contained",
        "capsule throughput",
        "bare QEMU contained throughput",
        0.9,
        PLUMBING,
    );
    t.ratio(
        "capsule / bare QEMU",
        "capsule throughput",
        "bare QEMU throughput",
        None,
        UNCONTAINED,
    );
    t.ratio(
        "bare QEMU contained / bare QEMU",
        "bare QEMU contained throughput",
        "bare QEMU throughput",
        None,
        ISOLATION,
    );
    t.ratio(
        "capsule / runc",
        "capsule throughput",
        "runc throughput",
        None,
        "the price of the VM",
    );
    let mut l = Figure::new(
        "net-latency",
        "6b. Pod network request latency",
        "ms",
        METHOD,
    );
    l.series = lat;
    l.ratio(
        "capsule / bare QEMU contained",
        "capsule latency",
        "bare QEMU contained latency",
        Some(1.1),
        PLUMBING,
    );
    l.ratio(
        "capsule / bare QEMU",
        "capsule latency",
        "bare QEMU latency",
        None,
        UNCONTAINED,
    );
    l.ratio(
        "bare QEMU contained / bare QEMU",
        "bare QEMU contained latency",
        "bare QEMU latency",
        None,
        ISOLATION,
    );
    l.ratio(
        "capsule / runc",
        "capsule latency",
        "runc latency",
        None,
        "the price of the VM",
    );
    let mut h = Figure::new(
        "net-handshake",
        "6c. Pod network round trip (TCP handshake)",
        "ms",
        METHOD,
    );
    h.series = shake;
    h.ratio(
        "capsule / bare QEMU",
        "capsule handshake",
        "bare QEMU handshake",
        None,
        "the plumbing and the guest kernel answering a SYN, with httpd's accepts and forks for the earlier handshakes overlapping",
    );
    Ok(vec![t, l, h])
}
