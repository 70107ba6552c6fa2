//! What touches the node: host network and IPC, port forwarding, mount
//! propagation, the OOM killer, and the pod network.
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use capsule_tests::cri::node::POD_SUBNET_PREFIX;
use capsule_tests::cri::proto::v1::*;
use capsule_tests::cri::spec;
use capsule_tests::cri::stream::Session;
use capsule_tests::cri::suite::Ctx;

use super::lifecycle::SLEEPER;
use super::util::*;

/// How fast a refusal must come.
/// What a VM cannot do is refused within a second.
const REFUSAL: Duration = Duration::from_secs(1);

/// A pod whose namespace `set` is NODE, with one container.
fn host_ns_pod(
    ctx: &mut Ctx,
    set: impl FnOnce(&mut NamespaceOption),
) -> Result<(PodSandboxConfig, ContainerConfig)> {
    let mut pcfg = ctx.pod_config("p")?;
    let mut c = spec::shell("main", SLEEPER);
    let mut ns = spec::namespaces();
    set(&mut ns);
    spec::set_namespaces(&mut pcfg, &mut [&mut c], ns);
    // The kubelet sets no hostname for host-namespace pods (runc refuses a
    // hostname without a UTS namespace of its own).
    pcfg.hostname.clear();
    Ok((pcfg, c))
}

fn ns_link(path: &str) -> Result<String> {
    Ok(std::fs::read_link(path)
        .with_context(|| format!("readlink {path}"))?
        .display()
        .to_string())
}

pub fn host_network(ctx: &mut Ctx) -> Result<()> {
    let (pcfg, c) = host_ns_pod(ctx, |ns| ns.network = NamespaceMode::Node as i32)?;
    let r = ctx.try_run_pod(&pcfg);
    if ctx.is_capsule() {
        return expect_refusal(ctx, r, REFUSAL, "host network is not supported");
    }
    let pod = r?;
    let id = ctx.start(&pod, &c, &pcfg)?;
    let inode = std::fs::metadata(&ctx.node.netns.path)?.ino();
    let inside = ctx.sh_ok(&id, "readlink /proc/self/ns/net")?;
    ensure!(
        inside.trim() == format!("net:[{inode}]"),
        "HostNetwork: the container's netns is {inside:?}, the node's is net:[{inode}]"
    );
    Ok(())
}

pub fn host_ipc(ctx: &mut Ctx) -> Result<()> {
    let (pcfg, c) = host_ns_pod(ctx, |ns| ns.ipc = NamespaceMode::Node as i32)?;
    let r = ctx.try_run_pod(&pcfg);
    if ctx.is_capsule() {
        return expect_refusal(ctx, r, REFUSAL, "host IPC is not supported");
    }
    let pod = r?;
    let id = ctx.start(&pod, &c, &pcfg)?;
    let host = ns_link("/proc/self/ns/ipc")?;
    let inside = ctx.sh_ok(&id, "readlink /proc/self/ns/ipc")?;
    ensure!(
        inside.trim() == host,
        "HostIPC: the container's IPC namespace is {inside:?}, the host's {host:?}"
    );
    Ok(())
}

/// A pod serving `body` over HTTP on `port` (busybox httpd); (pod, config,
/// container).
fn web_pod(ctx: &mut Ctx, port: u16, body: &str) -> Result<(String, PodSandboxConfig, String)> {
    let (pod, pcfg) = ctx.pod("web")?;
    let script = format!(
        "mkdir -p /tmp/www && echo {body} > /tmp/www/index.html && exec httpd -f -p {port} -h /tmp/www"
    );
    let id = ctx.start(&pod, &spec::shell("web", &script), &pcfg)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = ctx.sh(&id, &format!("wget -qO- http://127.0.0.1:{port}/"))?;
        let last = String::from_utf8_lossy(&r.stdout).into_owned();
        if last.contains(body) {
            break;
        }
        if Instant::now() >= deadline {
            bail!("httpd in {id} does not answer on {port}: {last:?}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok((pod, pcfg, id))
}

/// PortForward: containerd dials the port inside the pod's network
/// namespace on the host side. A VM pod's processes are not there, so
/// capsule cannot serve it: it must fail fast with an error.
pub fn port_forward(ctx: &mut Ctx) -> Result<()> {
    let (pod, _, _) = web_pod(ctx, 8080, "pf-ok")?;
    let url = ctx.node.cri.port_forward(&pod, &[8080])?;
    let t = Instant::now();
    let mut s = Session::open(&ctx.node.netns.path, &format!("{url}?port=8080"))?;
    s.send(0, b"GET / HTTP/1.0\r\n\r\n")?;
    // Each channel's first frame carries the port (2 bytes).
    let data = |s: &Session| {
        s.channels
            .get(&0)
            .map(|d| d.get(2..).unwrap_or_default().to_vec())
    };
    let err = |s: &Session| {
        s.channels
            .get(&1)
            .map(|d| d.get(2..).unwrap_or_default().to_vec())
    };
    s.read_until(Duration::from_secs(60), |s| {
        data(s).is_some_and(|d| String::from_utf8_lossy(&d).contains("pf-ok"))
            || err(s).is_some_and(|e| !e.is_empty())
    })?;
    let took = t.elapsed();
    let got = String::from_utf8_lossy(&data(&s).unwrap_or_default()).into_owned();
    let error = String::from_utf8_lossy(&err(&s).unwrap_or_default()).into_owned();
    s.close();
    if ctx.is_capsule() {
        ensure!(
            !error.is_empty() && took <= REFUSAL,
            "port-forward into a VM pod: no error within {REFUSAL:?} (data {got:?})"
        );
        ctx.note(format!(
            "failed in {:.1} s: {}",
            took.as_secs_f64(),
            error.trim()
        ));
        return Ok(());
    }
    ensure!(
        got.contains("pf-ok"),
        "port-forward: data {got:?}, error {error:?}"
    );
    Ok(())
}

/// A directory under the node's directory bind-mounted on itself and made
/// shared (what Bidirectional and HostToContainer need); unmounted after the
/// case, with whatever was mounted below it.
fn shared_dir(ctx: &mut Ctx, name: &str) -> Result<PathBuf> {
    let d = ctx.scratch(name)?;
    let p = d.display().to_string();
    host(&format!("mount --bind {p} {p} && mount --make-shared {p}"))?;
    ctx.defer(move || {
        let _ = std::process::Command::new("umount")
            .args(["-R", "-l", &p])
            .status();
    });
    Ok(d)
}

fn mount(container: &str, host_path: &std::path::Path, propagation: MountPropagation) -> Mount {
    Mount {
        container_path: container.to_string(),
        host_path: host_path.display().to_string(),
        propagation: propagation as i32,
        ..Default::default()
    }
}

/// rprivate and rslave (HostToContainer): both show the source; a mount the
/// host adds later reaches only the rslave one.
pub fn mount_propagation(ctx: &mut Ctx) -> Result<()> {
    let src = shared_dir(ctx, "prop")?;
    std::fs::write(src.join("before"), "before\n")?;
    let (pod, pcfg) = ctx.pod("p")?;
    let mut c = spec::shell("main", SLEEPER);
    c.mounts = vec![
        mount("/mnt/private", &src, MountPropagation::PropagationPrivate),
        mount(
            "/mnt/slave",
            &src,
            MountPropagation::PropagationHostToContainer,
        ),
    ];
    let id = ctx.start(&pod, &c, &pcfg)?;
    let got = ctx.sh_ok(&id, "cat /mnt/private/before /mnt/slave/before")?;
    ensure!(got == "before\nbefore\n", "bind mounts show {got:?}");
    let sub = src.join("sub");
    std::fs::create_dir_all(&sub)?;
    host(&format!("mount -t tmpfs capcri-late {}", sub.display()))?;
    std::fs::write(sub.join("late"), "late\n")?;
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        seen = ctx.sh_ok(&id, "cat /mnt/slave/sub/late 2>/dev/null; true")?;
        if seen == "late\n" {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    ensure!(
        seen == "late\n",
        "rslave: a tmpfs mounted on the host after start is not visible at /mnt/slave/sub ({seen:?})"
    );
    let private = ctx.sh_ok(&id, "cat /mnt/private/sub/late 2>/dev/null; true")?;
    ensure!(
        private.is_empty(),
        "rprivate: the host's later mount leaked into /mnt/private/sub ({private:?})"
    );
    Ok(())
}

/// Bidirectional (rshared): a mount made in the container reaches the host.
/// A VM cannot do that: capsule must refuse, fast, naming the reason.
pub fn mount_bidirectional(ctx: &mut Ctx) -> Result<()> {
    let src = shared_dir(ctx, "bidir")?;
    let mut pcfg = ctx.pod_config("p")?;
    spec::pod_security(&mut pcfg).privileged = true;
    let pod = ctx.run_pod(&pcfg)?;
    let mut c = spec::shell("main", SLEEPER);
    spec::security(&mut c).privileged = true;
    c.mounts = vec![mount(
        "/mnt/bidir",
        &src,
        MountPropagation::PropagationBidirectional,
    )];
    if ctx.is_capsule() {
        let r = ctx.try_start(&pod, &c, &pcfg);
        return expect_refusal(ctx, r, REFUSAL, "shared propagation back to the host");
    }
    let id = ctx.start(&pod, &c, &pcfg)?;
    ctx.sh_ok(
        &id,
        "mkdir -p /mnt/bidir/sub && mount -t tmpfs capcri-bidir /mnt/bidir/sub && echo up > /mnt/bidir/sub/from-container",
    )?;
    let got = std::fs::read_to_string(src.join("sub/from-container")).unwrap_or_default();
    ensure!(
        got == "up\n",
        "Bidirectional: the container's mount did not reach the host ({got:?})"
    );
    Ok(())
}

pub fn oom_killed(ctx: &mut Ctx) -> Result<()> {
    let (pod, pcfg) = ctx.pod("p")?;
    let mut c = spec::shell("hog", "echo start; tail /dev/zero");
    spec::resources(&mut c).memory_limit_in_bytes = 32 << 20;
    let id = ctx.start(&pod, &c, &pcfg)?;
    let s = ctx.wait_exited(&id, Duration::from_secs(120))?;
    ensure!(
        s.reason == "OOMKilled" && s.exit_code == 137,
        "a container over its 32 MiB limit exited {} with reason {:?} (want 137, OOMKilled)",
        s.exit_code,
        s.reason
    );
    Ok(())
}

/// The pod's CNI address, shared by its containers; reachable from the
/// node; the pod reaches its gateway.
pub fn network(ctx: &mut Ctx) -> Result<()> {
    let (pod, pcfg, web) = web_pod(ctx, 8080, "net-ok")?;
    let other = ctx.start(&pod, &spec::shell("other", SLEEPER), &pcfg)?;
    let ip = ctx
        .node
        .cri
        .pod_sandbox_status(&pod)?
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .unwrap_or_default();
    ensure!(ip.starts_with(POD_SUBNET_PREFIX), "pod IP {ip:?}");
    for id in [&web, &other] {
        let addrs = ctx.sh_ok(id, "ip -4 -o addr show")?;
        ensure!(
            addrs.contains(&format!("inet {ip}/")),
            "container {id} lacks the pod address {ip}: {addrs:?}"
        );
    }
    let local = ctx.sh_ok(&other, "wget -qO- http://127.0.0.1:8080/")?;
    ensure!(
        local.contains("net-ok"),
        "localhost across the pod's containers: {local:?}"
    );
    let from_node = http_get_from_node(ctx, &format!("{ip}:8080"))?;
    ensure!(
        from_node.contains("net-ok"),
        "the node fetching http://{ip}:8080/: {from_node:?}"
    );
    ctx.sh_ok(&other, &format!("ping -c 1 -W 5 {POD_SUBNET_PREFIX}1"))
        .context("the pod pinging its gateway")?;
    Ok(())
}
