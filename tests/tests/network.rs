//! Pod networking end to end. Every test makes its own network namespace
//! (the "node"), runs a private containerd and ctr in it (`nsenter --net`),
//! and wires pods with Debian's CNI plugins (bridge, host-local, loopback)
//! configured privately: nothing leaves the namespaces the test made.
//!
//! - `ctr run --cni` gives a capsule container its CNI address, MTU and
//!   default route; HTTP works both ways with the node; a runc pod on the
//!   same bridge talks TCP with it both ways; two containers of one
//!   capsule pod share its address; dual-stack gives IPv6 too.
//! - SIGKILL of the shim at each fault point of the network path, then
//!   containerd's cleanup, leaves no tap, qdisc, filter, QEMU or state,
//!   and the pod's namespace intact.
//! - Hostile namespaces (missing path, not a netns, no link, an MTU the VM
//!   cannot carry) are refused naming the problem, leaving nothing.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use capsule_tests::netfix::{Netns, PodNs};
use capsule_tests::{run_with_timeout, text, wait_for, CapsuleOptions, Env, IMAGE, RUNTIME};

const CLEAN: Duration = Duration::from_secs(60);

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A CNI bridge network private to a test: its config, IPAM state and the
/// bridge's subnet (10.<n>.0.0/24, fd00:<n>::/64 with `v6`).
struct Cni {
    dir: tempfile::TempDir,
    n: u8,
}

impl Cni {
    fn new(n: u8, v6: bool, mtu: Option<u32>) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("capcni").tempdir()?;
        std::fs::create_dir_all(dir.path().join("net.d"))?;
        let mut ranges = vec![serde_json::json!([{"subnet": format!("10.{n}.0.0/24")}])];
        if v6 {
            ranges.push(serde_json::json!([{"subnet": format!("fd00:{n}::/64")}]));
        }
        let mut bridge = serde_json::json!({
            "type": "bridge",
            "bridge": format!("capbr{n}"),
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": ranges,
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
                "dataDir": dir.path().join("ipam"),
            }
        });
        if let Some(m) = mtu {
            bridge["mtu"] = serde_json::json!(m);
        }
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": format!("capnet{n}"),
            "plugins": [bridge, {"type": "loopback"}]
        });
        std::fs::write(
            dir.path().join("net.d/10-capnet.conflist"),
            serde_json::to_vec_pretty(&conf)?,
        )?;
        Ok(Self { dir, n })
    }

    fn gateway(&self) -> String {
        format!("10.{}.0.1", self.n)
    }
}

/// A private containerd in the node namespace.
fn node_env(node: &Netns) -> Result<Env> {
    Env::start_with(CapsuleOptions {
        netns: Some(node.path.clone()),
        ..CapsuleOptions::default()
    })
}

/// `ctr run --cni …` in the node namespace, with `cni`'s configuration as
/// the only one (a private mount namespace gives ctr its own /etc/cni and
/// /opt/cni: ctr reads CNI from fixed paths).
fn ctr_cni(env: &Env, node: &Netns, cni: &Cni, args: &[&str]) -> Result<Output> {
    let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
    let ctr: Vec<String> = [
        "nsenter".to_string(),
        format!("--net={}", node.path.display()),
        env.daemon.ctr.display().to_string(),
        "--address".into(),
        env.sock.display().to_string(),
        "--namespace".into(),
        capsule_tests::NAMESPACE.into(),
    ]
    .into_iter()
    .chain(args.iter().map(|s| s.to_string()))
    .map(|s| quote(&s))
    .collect();
    let script = format!(
        "set -e; mount -t tmpfs tmpfs /etc/cni; mkdir -p /etc/cni/net.d; cp {conf}/* /etc/cni/net.d/; \
         mount -t tmpfs tmpfs /opt; mkdir -p /opt/cni/bin; mount --bind /usr/lib/cni /opt/cni/bin; \
         exec {ctr}",
        conf = cni.dir.path().join("net.d").display(),
        ctr = ctr.join(" ")
    );
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    run_with_timeout(c, Duration::from_secs(300))
}

/// What the node, the pod namespace and the guest see, for a failure's
/// message.
fn diagnose(env: &Env, node: &Netns, id: &str, ip: &str) -> String {
    let show = |what: &str, r: Result<String>| match r {
        Ok(s) => format!("--- {what}\n{s}"),
        Err(e) => format!("--- {what}: {e:#}"),
    };
    let netns = netns_of(env, id).unwrap_or_default();
    let pod = |cmd: &str| capsule_tests::netfix::sh_ok(&format!("nsenter --net={netns} {cmd}"));
    [
        show("node links", node.sh("ip -d -o link; ip -o addr; ip route")),
        show("pod links", pod("ip -d -o link")),
        show(
            "pod tc",
            pod("sh -c 'for d in eth0 cap_eth0; do echo $d; tc -s filter show dev $d ingress; done'"),
        ),
        show("node neighbours", node.sh("ip neigh")),
        show(
            "node wget",
            node.sh(&format!("curl -sS -m 2 http://{ip}:8080/ 2>&1 || true")),
        ),
        show("guest addr", exec(env, id, "ip -o addr; ip route")),
        show("guest sockets", exec(env, id, "netstat -ltn; ps")),
    ]
    .join("\n")
}

fn ctr_cni_ok(env: &Env, node: &Netns, cni: &Cni, args: &[&str]) -> Result<String> {
    let o = ctr_cni(env, node, cni, args)?;
    ensure!(
        o.status.success(),
        "ctr {args:?}: {}\n{}",
        text(&o),
        env.containerd_log_tail()
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn exec(env: &Env, id: &str, cmd: &str) -> Result<String> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let exec_id = format!("x{}", N.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
    env.ctr_ok(&["task", "exec", "--exec-id", &exec_id, id, "sh", "-c", cmd])
}

/// The IPv4 address (without prefix) of `eth0` in container `id`.
fn ipv4_of(env: &Env, id: &str) -> Result<String> {
    let out = exec(env, id, "ip -4 -o addr show eth0")?;
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .map(String::from)
        .with_context(|| format!("no IPv4 address on eth0 of {id}: {out}"))
}

/// The pod's network namespace of sandbox `id`, as `capsule inspect`
/// shows it (`ctr run --cni` names none in the spec: the shim makes it).
fn netns_of(env: &Env, id: &str) -> Result<String> {
    let o = env.capsule(&["inspect", id, "--json"])?;
    ensure!(o.status.success(), "inspect {id}: {}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    v["network"][0]["netns"]
        .as_str()
        .map(String::from)
        .with_context(|| format!("no network endpoint in `capsule inspect {id}`: {v}"))
}

/// The server every pod can fetch from: busybox httpd on the bridge's
/// gateway address in the node namespace.
struct NodeServer(std::process::Child);

impl NodeServer {
    fn start(node: &Netns, addr: &str, body: &str) -> Result<(Self, tempfile::TempDir)> {
        let www = tempfile::Builder::new().prefix("capwww").tempdir()?;
        std::fs::write(www.path().join("index.html"), body)?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", node.path.display()))
            .args(["busybox", "httpd", "-f", "-p", addr, "-h"])
            .arg(www.path())
            .spawn()?;
        Ok((Self(child), www))
    }
}

impl Drop for NodeServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A container command serving `from-<name>` on port 8080. (Clients in
/// the guest use `timeout 5 wget`: busybox 1.35's static wget crashes
/// with `-T`.)
fn httpd(name: &str) -> String {
    format!("mkdir -p /tmp/www && echo from-{name} > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www")
}

#[test]
fn cni_address_http_both_ways_runc_peer_and_a_shared_pod_address() -> Result<()> {
    let _s = serial();
    let node = Netns::new("http")?;
    let cni = Cni::new(91, false, Some(1400))?;
    let env = node_env(&node)?;
    ctr_cni_ok(
        &env,
        &node,
        &cni,
        &[
            "run",
            "-d",
            "--cni",
            "--runtime",
            RUNTIME,
            IMAGE,
            "web1",
            "sh",
            "-c",
            &httpd("web1"),
        ],
    )?;
    let ip = ipv4_of(&env, "web1")?;
    ensure!(ip.starts_with("10.91.0."), "CNI's address, got {ip}");
    // Up, with CNI's MTU, and the default route via the bridge.
    let link = exec(&env, "web1", "ip -o link show eth0")?;
    ensure!(link.contains("mtu 1400") && link.contains("UP"), "{link}");
    let routes = exec(&env, "web1", "ip route")?;
    ensure!(
        routes.contains(&format!("default via {}", cni.gateway())),
        "{routes}"
    );

    // `capsule inspect` shows the endpoint, and QEMU has what is recorded.
    let o = env.capsule(&["inspect", "web1", "--json"])?;
    ensure!(
        o.status.success(),
        "inspect (exit 3 is drift): {}",
        text(&o)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let ep = &v["network"][0];
    let mac = exec(&env, "web1", "cat /sys/class/net/eth0/address")?;
    ensure!(
        ep["link"] == "eth0"
            && ep["tap"].as_str().is_some_and(|t| t.starts_with("cap_"))
            && ep["mac"].as_str() == Some(mac.trim())
            && ep["netns"].as_str().is_some_and(|n| !n.is_empty())
            && ep["guest_address"]["type"] == "pci",
        "{ep}"
    );

    // The node fetches from the capsule container…
    let body = wait_for(
        "HTTP from the capsule container",
        Duration::from_secs(60),
        || node.sh(&format!("curl -sf -m 2 http://{ip}:8080/")).ok(),
    )
    .map_err(|e| e.context(diagnose(&env, &node, "web1", &ip)))?;
    ensure!(body.trim() == "from-web1", "{body:?}");
    // … and the container from the node.
    let (_server, _www) =
        NodeServer::start(&node, &format!("{}:8081", cni.gateway()), "from-node")?;
    let got = wait_for("HTTP from the node", Duration::from_secs(30), || {
        exec(
            &env,
            "web1",
            &format!("timeout 5 wget -q -O- http://{}:8081/", cni.gateway()),
        )
        .ok()
    })
    .map_err(|e| {
        let probe = exec(
            &env,
            "web1",
            &format!(
                "timeout 5 wget -O- http://{}:8081/ 2>&1 || true",
                cni.gateway()
            ),
        );
        let node_probe = node.sh(&format!(
            "curl -sS -m 2 http://{}:8081/ 2>&1 || true",
            cni.gateway()
        ));
        e.context(format!(
            "guest: {probe:?}\nnode: {node_probe:?}\n{}",
            diagnose(&env, &node, "web1", &ip)
        ))
    })?;
    ensure!(got.trim() == "from-node", "{got:?}");

    // A runc pod on the same bridge: TCP both ways.
    ctr_cni_ok(
        &env,
        &node,
        &cni,
        &[
            "run",
            "-d",
            "--cni",
            "--runtime",
            "io.containerd.runc.v2",
            IMAGE,
            "runc1",
            "sh",
            "-c",
            &httpd("runc1"),
        ],
    )?;
    let runc_ip = ipv4_of(&env, "runc1")?;
    let got = wait_for("capsule -> runc", Duration::from_secs(30), || {
        exec(
            &env,
            "web1",
            &format!("timeout 5 wget -q -O- http://{runc_ip}:8080/"),
        )
        .ok()
    })?;
    ensure!(got.trim() == "from-runc1", "{got:?}");
    let got = wait_for("runc -> capsule", Duration::from_secs(30), || {
        exec(
            &env,
            "runc1",
            &format!("timeout 5 wget -q -O- http://{ip}:8080/"),
        )
        .ok()
    })?;
    ensure!(got.trim() == "from-web1", "{got:?}");

    // A second container of the capsule pod shares its address.
    let ns = netns_of(&env, "web1")?;
    env.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=web1",
        "--with-ns",
        &format!("network:{ns}"),
        IMAGE,
        "side1",
        "sleep",
        "600",
    ])?;
    ensure!(ipv4_of(&env, "side1")? == ip, "the pod's one address");
    let got = exec(
        &env,
        "side1",
        "timeout 5 wget -q -O- http://127.0.0.1:8080/",
    )?;
    ensure!(got.trim() == "from-web1", "{got:?}");

    for id in ["side1", "web1", "runc1"] {
        env.remove(id);
    }
    env.assert_clean(CLEAN)?;
    no_capsule_plumbing(&node)?;
    Ok(())
}

#[test]
fn dual_stack_gives_the_container_ipv6_too() -> Result<()> {
    let _s = serial();
    let node = Netns::new("v6")?;
    let cni = Cni::new(92, true, None)?;
    let env = node_env(&node)?;
    ctr_cni_ok(
        &env,
        &node,
        &cni,
        &[
            "run",
            "-d",
            "--cni",
            "--runtime",
            RUNTIME,
            IMAGE,
            "six1",
            "sleep",
            "600",
        ],
    )?;
    let addrs = exec(&env, "six1", "ip -6 -o addr show eth0 scope global")?;
    ensure!(addrs.contains("fd00:92::"), "{addrs}");
    let v6 = addrs
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .context("no IPv6 address")?
        .to_string();
    let routes = exec(&env, "six1", "ip -6 route")?;
    ensure!(routes.contains("default via fd00:92::1"), "{routes}");
    // The node reaches it over IPv6.
    wait_for("ping6 to the container", Duration::from_secs(30), || {
        node.sh(&format!("busybox ping6 -c 1 -W 2 {v6}")).ok()
    })?;
    env.remove("six1");
    env.assert_clean(CLEAN)?;
    Ok(())
}

fn no_capsule_plumbing(node: &Netns) -> Result<()> {
    let links = node.sh("ip -o link show")?;
    ensure!(
        !links.contains("cap_"),
        "a capsule tap is left in the node: {links}"
    );
    Ok(())
}

fn run_in_pod(env: &Env, pod: &Path, id: &str, cmd: &[&str]) -> Result<Output> {
    let ns = format!("network:{}", pod.display());
    let mut args = vec![
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--with-ns",
        &ns,
        IMAGE,
        id,
    ];
    args.extend_from_slice(cmd);
    env.ctr(&args)
}

#[test]
fn a_pod_namespace_made_by_hand_works_and_is_left_as_found() -> Result<()> {
    let _s = serial();
    let node = Netns::new("hand")?;
    let pod = PodNs::new("hand-pod", &node, 1500, 93)?;
    let env = node_env(&node)?;
    let o = run_in_pod(
        &env,
        &pod.ns.path,
        "hand1",
        &[
            "sh",
            "-c",
            "ip -4 -o addr show eth0 && ping -c 1 -W 5 10.93.0.1",
        ],
    )?;
    ensure!(o.status.success(), "{}", text(&o));
    ensure!(text(&o).contains("10.93.0.2/24"), "{}", text(&o));
    env.assert_clean(CLEAN)?;
    pod.assert_untouched()?;
    let _ = &pod.node_end;
    Ok(())
}

#[test]
fn sigkill_of_the_shim_on_the_network_path_leaves_nothing() -> Result<()> {
    let _s = serial();
    for (i, phase) in ["net.recorded", "net.plumbed", "start.network-pending"]
        .into_iter()
        .enumerate()
    {
        let node = Netns::new(&format!("crash{i}"))?;
        let pod = PodNs::new(&format!("crash{i}-pod"), &node, 1500, 94)?;
        let mut env = Env::start_with(CapsuleOptions {
            netns: Some(node.path.clone()),
            containerd_env: vec![("CAPSULE_FAULT".into(), phase.into())],
            ..CapsuleOptions::default()
        })?;
        let id = format!("crash{i}");
        // containerd reports the dead shim: provoked on purpose.
        env.allow_log_error(&id);
        let o = run_in_pod(&env, &pod.ns.path, &id, &["true"])?;
        ensure!(
            !o.status.success(),
            "{phase}: the run survived the fault: {}",
            text(&o)
        );
        env.remove(&id);
        env.assert_clean(CLEAN)
            .with_context(|| format!("after SIGKILL at {phase}"))?;
        pod.assert_untouched()
            .with_context(|| format!("after SIGKILL at {phase}"))?;
        let log = env.containerd_log_tail();
        ensure!(!log.is_empty(), "{phase}: containerd logged nothing");
    }
    Ok(())
}

#[test]
fn hostile_namespaces_are_refused_naming_the_problem() -> Result<()> {
    let _s = serial();
    let node = Netns::new("bad")?;
    let mut env = node_env(&node)?;
    let empty = Netns::new("bad-empty")?;
    let fat = PodNs::new("bad-mtu", &node, 65535, 95)?;
    let not_ns = env.dir.path().join("not-a-netns");
    std::fs::write(&not_ns, "x")?;
    let cases: [(&str, PathBuf, &str); 4] = [
        (
            "missing",
            PathBuf::from("/run/netns/capsule-no-such-ns"),
            "capsule-no-such-ns",
        ),
        ("notns", not_ns.clone(), "not-a-netns"),
        ("nolink", empty.path.clone(), "lo"),
        ("mtu", fat.ns.path.clone(), "MTU 65535"),
    ];
    for (tag, path, want) in cases {
        let id = format!("bad-{tag}");
        env.allow_log_error(&id);
        let o = run_in_pod(&env, &path, &id, &["true"])?;
        ensure!(!o.status.success(), "{tag}: succeeded: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        eprintln!("{tag}: {}", err.trim());
        ensure!(
            err.contains("capsule") && err.contains(want),
            "{tag}: the error does not name {want:?}: {err}"
        );
        env.remove(&id);
        env.assert_clean(CLEAN).with_context(|| tag.to_string())?;
    }
    fat.assert_untouched()?;
    Ok(())
}

#[test]
fn host_network_is_refused_at_once() -> Result<()> {
    let _s = serial();
    let mut env = Env::start()?;
    env.allow_log_error("hostnet1");
    let o = env.run(&["--rm", "--net-host"], "hostnet1", &["true"])?;
    ensure!(!o.status.success(), "host network ran: {}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(err.contains("host network is not supported"), "{err}");
    // Refused before anything started: no VM was ever recorded.
    ensure!(
        !env.sandbox_dir("hostnet1").join("sandbox.json").exists()
            && env.sandbox_record("hostnet1").is_none(),
        "a sandbox was started for a refused spec"
    );
    env.remove("hostnet1");
    env.assert_clean(CLEAN)?;
    if capsule_tests::processes()
        .iter()
        .any(|(_, a)| a.iter().any(|x| x.contains("hostnet1")))
    {
        bail!("a process of hostnet1 is left");
    }
    Ok(())
}
