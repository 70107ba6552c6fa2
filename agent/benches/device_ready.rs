//! Device-ready latency: a disk hot-plugged through capsule and handed to a
//! running container, against the bare hotplug-to-guest-visible time, in
//! one VM with one running container, interleaved A B A B.
//!
//!   cargo bench -p capsule-agent --bench device_ready [-- ROUNDS]   (default 10)
//!   CAPSULE_TEST_ACCEL=kvm|auto ...                                 (default tcg)
//!   DEVICE_READY_POLL_MS=N ...                (guest poll interval, default 5)
//!
//! A (capsule): device manager `new_device` + `attach` (the hotplug through
//!   `QemuVm`: blockdev-add, device_add, query-pci), then the agent's
//!   AddDevice, which returns once the guest has the disk and its node is in
//!   the container. The clock stops when AddDevice returns.
//! B (bare): the same virtio-blk disk at the same PCI slot with a minimal
//!   QMP client (blockdev-add + device_add, as
//!   `hypervisor/benches/hotplug.rs`); a process exec'd in the container
//!   before the plug (and seen polling: it says so on stdout) polls
//!   `/sys/block/*/serial` every 5 ms (shell builtins only) and exits when
//!   it sees the disk's serial. The clock stops when WaitProcess for it
//!   returns.
//!
//! The same poller runs during A (for A's serial), so both sides carry the
//! same guest load and A also reports when the guest saw its disk: the
//! ratio of the guest-visible times compares the hotplug paths alone (as
//! the hypervisor bench does), the ratio device-ready/bare adds the agent.
//!
//! Both end with one agent reply over virtio-serial. The disk is unplugged
//! between rounds (RemoveDevice + detach, or device_del + blockdev-del) and
//! the guest given 0.5 s to settle, untimed. QEMU serves one QMP client at a
//! time, so the two clients take turns on the monitor; the handover is not
//! timed. Prints medians, min/max and the ratio A/B, and writes them (and
//! every sample) to target/bench/agent-device-ready.json.
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use capsule_agent_protocol::agent::{AddDeviceRequest, ReadStreamRequest, RemoveDeviceRequest};
use capsule_agent_protocol::client::AgentConn;
use capsule_devmgr::device::DevType;
use capsule_devmgr::testing::ManagerTestExt;
use capsule_devmgr::{DetachOutcome, DeviceInfo, DeviceKind, GuestAddress, HostDevice};
use capsule_hypervisor::testkit::BareQmp;
use serde_json::{json, Value};

const CID: &str = "bench";
const PATH: &str = "/dev/xvdb";
const SETTLE: Duration = Duration::from_millis(500);

/// Container command: says `ready` once it polls, exits 0 once a disk with
/// `serial` exists. Shell builtins only, no fork per poll: the sleep is
/// `read -t` on the exec's stdin (a pipe nobody writes to), because
/// busybox's `usleep` forks and execs, which under TCG costs the single
/// vCPU more than the hotplug being measured.
fn guest_wait(serial: &str, poll: Duration) -> String {
    let poll = format!("{:.3}", poll.as_secs_f64());
    format!(
        "echo ready; n=0; f=; while [ -z \"$f\" ] && [ $n -lt 10000 ]; do for p in /sys/block/*/serial; do s=; \
         [ -r \"$p\" ] && read -r s <\"$p\"; [ \"$s\" = {serial} ] && f=1; done; \
         [ -z \"$f\" ] && read -t {poll} x; n=$((n+1)); done; [ -n \"$f\" ]"
    )
}

struct Stats {
    median: Duration,
    min: Duration,
    max: Duration,
}

fn stats(v: &[Duration]) -> Stats {
    let mut v = v.to_vec();
    v.sort();
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    };
    Stats {
        median,
        min: v[0],
        max: v[n - 1],
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A guest process polling for `serial`, known to be polling; `visible`
/// resolves to when WaitProcess for it returned (it exits 0 once the disk is
/// there).
struct Poller {
    visible: tokio::task::JoinHandle<Result<Instant>>,
}

async fn start_poller(
    conn: &AgentConn,
    exec_id: &str,
    serial: &str,
    poll: Duration,
) -> Result<Poller> {
    support::exec(
        conn,
        CID,
        exec_id,
        &["sh", "-c", &guest_wait(serial, poll)],
        false,
        true,
    )
    .await?;
    // Exec returns at spawn; under TCG the shell may take a while to start
    // polling, and it says when it does.
    let mut said = Vec::new();
    while !said.ends_with(b"ready\n") {
        let mut r = ReadStreamRequest::new();
        r.container_id = CID.into();
        r.exec_id = exec_id.into();
        r.len = 64;
        let chunk = conn.read_stdout(&r).await?;
        if chunk.data.is_empty() {
            bail!("the poller exited before polling");
        }
        said.extend(chunk.data);
    }
    let c = conn.client().clone();
    let req = support::preq(CID, exec_id);
    let serial = serial.to_owned();
    let visible = tokio::spawn(async move {
        let r = c
            .wait_process(ttrpc::context::Context::default(), &req)
            .await?;
        let at = Instant::now();
        if r.status != 0 {
            bail!("the guest never saw {serial} (status {})", r.status);
        }
        Ok(at)
    });
    Ok(Poller { visible })
}

async fn run(rounds: usize, poll: Duration) -> Result<Value> {
    let t = Instant::now();
    let vm = support::Vm::boot(support::VmOptions::default()).await;
    let conn = vm.connect().await;
    support::create_sandbox(&conn, "bench").await?;
    vm.busybox_container(&conn, CID, &["sleep", "1000000"], false)
        .await;
    eprintln!("VM, agent and container ready in {:?}", t.elapsed());
    let layout = vm.vm.layout();
    // Per side: until the node is ready (A only), until the guest sees the
    // serial, until the host's plug calls returned.
    let (mut a_ready, mut a_visible, mut a_host) = (Vec::new(), Vec::new(), Vec::new());
    let (mut b_visible, mut b_host) = (Vec::new(), Vec::new());
    let mut slot = None;
    for round in 0..rounds {
        // ---- A: capsule (device manager + QemuVm + agent AddDevice).
        let img = vm.dir().join(format!("a{round}.img"));
        std::fs::File::create(&img)?.set_len(8 << 20)?;
        let info = DeviceInfo::new(PATH, DevType::Block, 0, 0);
        // Registration (what the shim does when it resolves the spec) is
        // bookkeeping, untimed; the id is the disk's serial.
        let id = vm.blk.add(HostDevice {
            info: Some(info.clone()),
            host_path: img,
            kind: DeviceKind::Block,
        })?;
        let poller = start_poller(&conn, &format!("a{round}"), &id.to_string(), poll).await?;
        vm.vm.qmp().await?; // owns the monitor again (untimed)
        let t0 = Instant::now();
        let addr = vm.blk.attach(&id).await?;
        let attached = t0.elapsed();
        let dev = support::agent_device(&id.to_string(), &DeviceKind::Block, &addr, &info);
        let mut add = AddDeviceRequest::new();
        add.container_id = CID.into();
        add.device = protobuf::MessageField::some(dev);
        conn.add_device(&add)
            .await
            .with_context(|| format!("AddDevice {id}\n{}", vm.console()))?;
        let ready = t0.elapsed();
        let visible = poller.visible.await?? - t0;
        a_ready.push(ready);
        a_visible.push(visible);
        a_host.push(attached);
        let GuestAddress::Pci(path) = &addr else {
            bail!("virtio-blk disk at {addr:?}")
        };
        // B plugs at the same root-bus slot (pc: one hop).
        if let [hop] = path.hops() {
            slot.get_or_insert(u32::from(hop.slot));
        }
        let mut rm = RemoveDeviceRequest::new();
        rm.container_id = CID.into();
        rm.container_path = PATH.into();
        conn.remove_device(&rm).await?;
        if vm.blk.detach(&id).await? != DetachOutcome::Detached {
            bail!("unplug of {id} pending");
        }
        vm.blk.remove(&id).await?;
        tokio::time::sleep(SETTLE).await;
        eprintln!(
            "round {round} capsule: ready {:.1} ms, guest saw it {:.1} ms, attach returned {:.1} ms",
            ms(ready),
            ms(visible),
            ms(attached)
        );

        // ---- B: bare QMP.
        let slot = slot.context("the capsule disk was not on a root-bus slot")?;
        let target = layout.pci_target(slot).map_err(anyhow::Error::msg)?;
        let serial = format!("bare{round}");
        let node = format!("{serial}-node");
        let img = vm.dir().join(format!("b{round}.img"));
        std::fs::File::create(&img)?.set_len(8 << 20)?;
        vm.vm.disconnect().await;
        let mut q = BareQmp::connect(&vm.qmp_socket)
            .await
            .context("bare client")?;
        let poller = start_poller(&conn, &format!("b{round}"), &serial, poll).await?;
        let t0 = Instant::now();
        q.cmd(
            "blockdev-add",
            json!({"driver": "raw", "node-name": node, "read-only": false,
                   "file": {"driver": "file", "filename": img, "aio": "threads"}}),
        )
        .await?;
        q.cmd(
            "device_add",
            json!({"driver": "virtio-blk-pci", "id": serial, "drive": node, "serial": serial,
                   "bus": target.bus, "addr": target.addr}),
        )
        .await?;
        let qmp_done = t0.elapsed();
        let visible = poller.visible.await?? - t0;
        b_visible.push(visible);
        b_host.push(qmp_done);
        q.cmd("device_del", json!({ "id": serial })).await?;
        q.wait_deleted(&serial).await?;
        q.cmd("blockdev-del", json!({ "node-name": node })).await?;
        drop(q);
        tokio::time::sleep(SETTLE).await;
        eprintln!(
            "round {round} bare   :                guest saw it {:.1} ms, QMP returned {:.1} ms",
            ms(visible),
            ms(qmp_done)
        );
    }
    support::remove(&conn, CID).await?;
    drop(conn);
    vm.shutdown().await;

    let accel = std::env::var("CAPSULE_TEST_ACCEL").unwrap_or_else(|_| "tcg".into());
    let (ar, av, ah) = (stats(&a_ready), stats(&a_visible), stats(&a_host));
    let (bv, bh) = (stats(&b_visible), stats(&b_host));
    let ratio = ar.median.as_secs_f64() / bv.median.as_secs_f64();
    let ratio_visible = av.median.as_secs_f64() / bv.median.as_secs_f64();
    let line = |what: &str, s: &Stats| {
        println!(
            "  {what:<52}: median {:>7.1} ms  (min {:.1}, max {:.1})",
            ms(s.median),
            ms(s.min),
            ms(s.max)
        )
    };
    println!(
        "device-ready latency, virtio-blk into a running container, {accel}, {rounds} rounds each, interleaved, guest polls every {:.0} ms",
        ms(poll)
    );
    line("A capsule: attach + AddDevice, node in the container", &ar);
    line("A capsule: the guest sees the serial", &av);
    line("B bare QMP: the guest sees the serial", &bv);
    println!("  ratio device-ready/bare (A ready / B seen, medians): {ratio:.3}");
    println!("  ratio guest-visible capsule/bare (medians)         : {ratio_visible:.3}");
    println!(
        "  host side only: capsule attach returned after {:.1} ms (median), bare QMP after {:.1} ms",
        ms(ah.median),
        ms(bh.median)
    );
    let list = |v: &[Duration]| v.iter().map(|d| ms(*d)).collect::<Vec<_>>();
    let st = |s: &Stats, v: &[Duration]| json!({"median": ms(s.median), "min": ms(s.min), "max": ms(s.max), "samples": list(v)});
    Ok(json!({
        "bench": "agent-device-ready", "device": "virtio-blk", "accel": accel, "rounds": rounds,
        "guest_poll_ms": ms(poll),
        "capsule_ready_ms": st(&ar, &a_ready),
        "capsule_visible_ms": st(&av, &a_visible),
        "bare_visible_ms": st(&bv, &b_visible),
        "ratio_ready_over_bare": ratio,
        "ratio_visible_capsule_over_bare": ratio_visible,
        "capsule_attach_ms": st(&ah, &a_host),
        "bare_qmp_ms": st(&bh, &b_host),
    }))
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; an optional number sets the rounds.
    let rounds = std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<usize>().ok())
        .unwrap_or(10)
        .max(1);
    let poll = Duration::from_millis(
        std::env::var("DEVICE_READY_POLL_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5),
    );
    let json = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(rounds, poll))?;
    let out = support::workspace().join("target/bench");
    std::fs::create_dir_all(&out)?;
    let file = out.join("agent-device-ready.json");
    std::fs::write(&file, serde_json::to_string_pretty(&json)?)?;
    eprintln!("wrote {}", file.display());
    Ok(())
}
