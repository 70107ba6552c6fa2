//! Figure 6, pod networking: TCP throughput and HTTP request latency from
//! the node to the same server (busybox httpd) in (A) a capsule container,
//! (B) a runc container, (C) bare QEMU on the same tap + tc plumbing.
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
/// Requests per latency sample.
const REQUESTS: usize = 50;
const T: Duration = Duration::from_secs(300);
/// Target D: bare QEMU's guest serving with a container's isolation, on
/// its own port.
const CONTAINED: &str = "bare QEMU contained";
const CONTAINED_PORT: u16 = 8081;

const METHOD: &str = "Three pods, each a network namespace with one veth to a private \"node\" namespace (what CNI's bridge plugin makes, without the bridge), serving the same files with busybox httpd: A **capsule**, a container started with `ctr run --runtime io.containerd.capsule.v2 --with-ns network:POD` (capsule plumbs a tap beside the veth with tc redirects and gives the VM a virtio-net device; its rootfs is virtio-fs, served by capsule's virtiofsd, which lets the guest cache failed lookups: httpd looks for the missing /etc/localtime on every request); B **runc**, the same container with runc; C **bare QEMU**, capsule's own QEMU command line for the same configuration started by the hypervisor crate alone (no shim, device manager, virtiofsd or agent: the busybox test guest), on a tap plumbed by `capsule-network` exactly as capsule does, configured by hand in the guest; D **bare QEMU contained**, a second server in C's guest (port 8081) started with a container's isolation: its own cgroup with every controller enabled and new pid, mount, ipc and uts namespaces (`unshare -p -f -m -i -u`), as `ctr run` gives A and B (no seccomp: `ctr run` sets none). The client runs in the node namespace: throughput is one `GET` of a 32 MiB file (MB/s), latency the median of 50 sequential `GET`s of a small file on new connections (ms), the round trip the median of 50 TCP handshakes (`connect` returns on the guest kernel's SYN-ACK: no process in the guest takes part). Every target serves from memory (/dev/shm). Order per round: the large GETs A, B, C, D; then the requests in 10 slices of 5 per target in turn (A, B, C, D, A, B, …), so that a slow spell of the host falls on every target alike; then the handshakes the same way; one warm-up round first.";

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

/// One target's sample of a round: throughput (MB/s), median request
/// latency (ms), median TCP handshake time (ms: `connect` returns on the
/// SYN-ACK, which the guest kernel sends before any process in the guest
/// runs, so this is the round trip through the plumbing and the guest's
/// network stack alone).
struct Sample {
    mbs: f64,
    request_ms: f64,
    handshake_ms: f64,
}

/// Slices per round: each target's requests and handshakes are taken in
/// turn, `REQUESTS / SLICES` at a time, so a slow spell of the host (whole
/// runs of requests at twice the usual time, seen on every target) falls on
/// all targets alike instead of on whichever one it coincides with.
const SLICES: usize = 10;

/// [`REQUESTS`] timings (ms) of `op` per address, taken in [`SLICES`]:
/// `REQUESTS / SLICES` against each address in turn.
fn sliced(
    addrs: &[SocketAddr],
    op: impl Fn(SocketAddr) -> std::io::Result<()>,
) -> std::io::Result<Vec<Vec<f64>>> {
    let mut ms = vec![Vec::with_capacity(REQUESTS); addrs.len()];
    for _ in 0..SLICES {
        for (i, &addr) in addrs.iter().enumerate() {
            for _ in 0..REQUESTS / SLICES {
                let t = Instant::now();
                op(addr)?;
                ms[i].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    Ok(ms)
}

/// One round against every address in `addrs`, from inside `node`: one
/// large GET each, then the requests and then the handshakes, interleaved
/// in [`SLICES`].
fn measure_round(node: &capsule_network::Netns, addrs: &[SocketAddr]) -> Result<Vec<Sample>> {
    let owned = addrs.to_vec();
    node.run_blocking(move || {
        let addrs = owned;
        let mut mbs = Vec::with_capacity(addrs.len());
        for &addr in &addrs {
            let t0 = Instant::now();
            let n = get(addr, "/big")?;
            let secs = t0.elapsed().as_secs_f64();
            if n < BIG_MIB << 20 {
                return Err(std::io::Error::other(format!(
                    "GET /big from {addr}: {n} bytes, expected at least {}",
                    BIG_MIB << 20
                )));
            }
            mbs.push(n as f64 / 1e6 / secs);
        }
        let lat = sliced(&addrs, |addr| get(addr, "/small").map(drop))?;
        let shakes = sliced(&addrs, |addr| {
            TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map(drop)
        })?;
        Ok(mbs
            .into_iter()
            .zip(lat.iter().zip(&shakes))
            .map(|(mbs, (l, h))| Sample {
                mbs,
                request_ms: Summary::of(l).median,
                handshake_ms: Summary::of(h).median,
            })
            .collect())
    })
    .map_err(|e| anyhow!("measuring {addrs:?}: {e}"))
}

/// Serves from memory (/dev/shm: tmpfs in a container, devtmpfs in the
/// bare guest), so every target measures the network, not its filesystem
/// (a container's rootfs is virtio-fs in capsule, overlayfs with runc).
fn serve_script() -> String {
    format!(
        "mkdir -p /dev/shm/www && dd if=/dev/zero of=/dev/shm/www/big bs=1M count={BIG_MIB} 2>/dev/null && echo ok > /dev/shm/www/small && exec httpd -f -p 8080 -h /dev/shm/www"
    )
}

/// The same server in the bare guest with a container's isolation (its own
/// cgroup with every controller enabled, and new pid, mount, ipc and uts
/// namespaces, as `ctr run` gives it; no seccomp, as `ctr run` sets none) on
/// port 8081, serving the files the plain server made.
fn contained_script() -> String {
    format!("grep -q cgroup2 /proc/mounts || mount -t cgroup2 none /sys/fs/cgroup; mkdir -p /sys/fs/cgroup/srv; for c in $(cat /sys/fs/cgroup/cgroup.controllers); do echo +$c > /sys/fs/cgroup/cgroup.subtree_control; done; sh -c 'echo $$ > /sys/fs/cgroup/srv/cgroup.procs && exec unshare -p -f -m -i -u httpd -f -p {CONTAINED_PORT} -h /dev/shm/www'")
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

/// Bare QEMU: the hypervisor crate's launcher with the bench's VM
/// configuration, the busybox test guest, and the pod's link plumbed as
/// capsule plumbs it, cold-plugged.
async fn bare_vm(
    env: &Env,
    pod: &Path,
    dir: &Path,
) -> Result<(QemuVm, GuestShell, capsule_network::EndpointRecord)> {
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
        &format!("({}) >/dev/null 2>&1 &", serve_script()),
        Duration::from_secs(60),
    )
    .await?;
    sh.run_ok(
        &format!("({}) >/dev/null 2>&1 &", contained_script()),
        Duration::from_secs(60),
    )
    .await?;
    Ok((qemu, sh, plumbed.record))
}

fn addr(n: u8) -> SocketAddr {
    SocketAddr::from(([10, n, 0, 2], 8080))
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
    ];
    let node_ns = capsule_network::Netns::open(&node.path)?;
    container(env, RUNTIME, &pods[0].ns.path, "net-cap")?;
    container(env, "io.containerd.runc.v2", &pods[1].ns.path, "net-runc")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = env.dir.path().join("bare-net");
    std::fs::create_dir_all(&dir)?;
    let (bare, _shell, bare_endpoint) = rt.block_on(bare_vm(env, &pods[2].ns.path, &dir))?;
    let targets = [
        ("capsule", addr(81)),
        ("runc", addr(82)),
        ("bare QEMU", addr(83)),
        (CONTAINED, SocketAddr::new(addr(83).ip(), CONTAINED_PORT)),
    ];
    // The bare VM is the bench's own: stopped and unplumbed whatever the
    // measurement's outcome, so a failed run leaks no QEMU or tap.
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
    let stopped = rt.block_on(bare.stop());
    // The bare VM's plumbing is the bench's own: undone as capsule undoes it.
    let unplumbed = rt.block_on(capsule_network::unplumb(
        &bare_endpoint,
        Duration::from_secs(5),
    ));
    let (tput, lat, shake) = measured?;
    stopped?;
    unplumbed?;
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
        "capsule / bare QEMU",
        "capsule throughput",
        "bare QEMU throughput",
        0.9,
        "capsule's plumbing adds nothing",
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
        "capsule / bare QEMU",
        "capsule latency",
        "bare QEMU latency",
        Some(1.1),
        "capsule's plumbing adds nothing",
    );
    l.ratio(
        "capsule / bare QEMU contained",
        "capsule latency",
        "bare QEMU contained latency",
        None,
        "against the same server with a container's isolation in the bare guest: what capsule adds beyond a container's own cost",
    );
    l.ratio(
        "bare QEMU contained / bare QEMU",
        "bare QEMU contained latency",
        "bare QEMU latency",
        None,
        "a container's isolation (cgroup, namespaces) in the same guest",
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
        "the plumbing and the guest kernel alone (no process in the guest): where 6b's difference is not",
    );
    Ok(vec![t, l, h])
}
