//! Security contexts: users and groups, read-only rootfs, capabilities,
//! no_new_privs, masked and read-only paths, sysctls, seccomp, and the PID
//! and IPC namespace modes.
use anyhow::{ensure, Context, Result};
use capsule_tests::cri::proto::v1::security_profile::ProfileType;
use capsule_tests::cri::proto::v1::*;
use capsule_tests::cri::spec;
use capsule_tests::cri::suite::{Ctx, Runtime};

use super::lifecycle::SLEEPER;
use super::util::*;

/// A pod with one container made by `tweak`; (pod, container).
fn one(ctx: &mut Ctx, tweak: impl FnOnce(&mut ContainerConfig)) -> Result<(String, String)> {
    let (pod, pcfg) = ctx.pod("p")?;
    let mut ccfg = spec::shell("main", SLEEPER);
    tweak(&mut ccfg);
    let id = ctx.start(&pod, &ccfg, &pcfg)?;
    Ok((pod, id))
}

pub fn run_as_user(ctx: &mut Ctx) -> Result<()> {
    let (_, id) = one(ctx, |c| {
        let s = spec::security(c);
        s.run_as_user = Some(Int64Value { value: 1000 });
        s.run_as_group = Some(Int64Value { value: 2000 });
        s.supplemental_groups = vec![3000, 4000];
    })?;
    let uid = proc1_status(ctx, &id, "Uid")?;
    let gid = proc1_status(ctx, &id, "Gid")?;
    let groups = proc1_status(ctx, &id, "Groups")?;
    let groups: Vec<&str> = groups.split_whitespace().collect();
    ensure!(
        uid.split_whitespace().all(|u| u == "1000")
            && gid.split_whitespace().all(|g| g == "2000")
            && groups.contains(&"3000")
            && groups.contains(&"4000"),
        "container process: Uid {uid:?} Gid {gid:?} Groups {groups:?} (want 1000, 2000, 3000 and 4000)"
    );
    let ids = ctx.sh_ok(&id, "id -u; id -g")?;
    ensure!(ids == "1000\n2000\n", "exec runs as {ids:?}, not 1000/2000");
    Ok(())
}

pub fn readonly_rootfs(ctx: &mut Ctx) -> Result<()> {
    let (_, id) = one(ctx, |c| spec::security(c).readonly_rootfs = true)?;
    let r = ctx.sh(&id, "touch /new-file")?;
    ensure!(
        r.exit_code != 0 && String::from_utf8_lossy(&r.stderr).contains("Read-only"),
        "touch on a read-only rootfs: exit {} stderr {:?}",
        r.exit_code,
        String::from_utf8_lossy(&r.stderr)
    );
    Ok(())
}

pub fn capabilities(ctx: &mut Ctx) -> Result<()> {
    let (_, id) = one(ctx, |c| {
        spec::security(c).capabilities = Some(Capability {
            add_capabilities: vec!["NET_ADMIN".into()],
            drop_capabilities: vec!["CHOWN".into()],
            ..Default::default()
        })
    })?;
    let mut want: Vec<u32> = DEFAULT_CAPS.iter().copied().filter(|c| *c != 0).collect();
    want.push(12); // NET_ADMIN
    let eff = proc1_status(ctx, &id, "CapEff")?;
    ensure!(
        eff == cap_mask(&want),
        "CapEff {eff}, expected {} (containerd's defaults - CHOWN + NET_ADMIN)",
        cap_mask(&want)
    );
    let r = ctx.sh(&id, "touch /tmp/f && chown 1:1 /tmp/f")?;
    ensure!(r.exit_code != 0, "chown worked without CAP_CHOWN");
    ctx.sh_ok(&id, "ip link set lo mtu 1500")
        .context("NET_ADMIN: changing lo's MTU")?;
    Ok(())
}

pub fn no_new_privs(ctx: &mut Ctx) -> Result<()> {
    let (pod, pcfg) = ctx.pod("p")?;
    for (name, nnp, want) in [("nnp", true, "1"), ("plain", false, "0")] {
        let mut c = spec::shell(name, SLEEPER);
        spec::security(&mut c).no_new_privs = nnp;
        let id = ctx.start(&pod, &c, &pcfg)?;
        let v = proc1_status(ctx, &id, "NoNewPrivs")?;
        ensure!(v == want, "no_new_privs = {nnp}: NoNewPrivs {v}");
    }
    Ok(())
}

pub fn masked_readonly_paths(ctx: &mut Ctx) -> Result<()> {
    let (_, id) = one(ctx, |c| {
        let s = spec::security(c);
        s.masked_paths = vec!["/opt/masked".into(), "/etc/masked-file".into()];
        s.readonly_paths = vec!["/opt/ro".into()];
    })?;
    let file = ctx.sh_ok(&id, "cat /etc/masked-file")?;
    ensure!(file.is_empty(), "masked file reads {file:?}");
    let dir = ctx.sh_ok(&id, "ls -A /opt/masked")?;
    ensure!(dir.is_empty(), "masked directory lists {dir:?}");
    ensure!(
        ctx.sh_ok(&id, "cat /opt/ro/file")? == "ro\n",
        "read-only path unreadable"
    );
    let r = ctx.sh(&id, "touch /opt/ro/new")?;
    ensure!(r.exit_code != 0, "wrote into read-only path /opt/ro");
    ctx.sh_ok(&id, "touch /opt/rw/new")
        .context("writing next to the read-only path")?;
    Ok(())
}

pub fn sysctls(ctx: &mut Ctx) -> Result<()> {
    let mut pcfg = ctx.pod_config("p")?;
    let linux = pcfg.linux.get_or_insert_with(Default::default);
    linux
        .sysctls
        .insert("kernel.shm_rmid_forced".into(), "1".into());
    linux
        .sysctls
        .insert("net.ipv4.ip_local_port_range".into(), "40000 50000".into());
    let pod = ctx.run_pod(&pcfg)?;
    let id = ctx.start(&pod, &spec::shell("main", SLEEPER), &pcfg)?;
    let got = ctx.sh_ok(
        &id,
        "cat /proc/sys/kernel/shm_rmid_forced /proc/sys/net/ipv4/ip_local_port_range",
    )?;
    let got: Vec<String> = got
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    ensure!(
        got == ["1", "40000 50000"],
        "sysctls inside the pod: {got:?}"
    );
    Ok(())
}

fn seccomp(profile_type: ProfileType, localhost_ref: &str) -> SecurityProfile {
    SecurityProfile {
        profile_type: profile_type as i32,
        localhost_ref: localhost_ref.to_string(),
    }
}

pub fn seccomp_runtime_default(ctx: &mut Ctx) -> Result<()> {
    let (_, id) = one(ctx, |c| {
        spec::security(c).seccomp = Some(seccomp(ProfileType::RuntimeDefault, ""))
    })?;
    let mode = proc1_status(ctx, &id, "Seccomp")?;
    ensure!(
        mode == "2",
        "RuntimeDefault: Seccomp mode {mode} (2 = filter)"
    );
    // The default profile lets unshare through only with CAP_SYS_ADMIN.
    let r = ctx.sh(&id, "unshare -U true")?;
    ensure!(
        r.exit_code != 0,
        "RuntimeDefault: unshare(CLONE_NEWUSER) without CAP_SYS_ADMIN was allowed"
    );
    Ok(())
}

pub fn seccomp_localhost(ctx: &mut Ctx) -> Result<()> {
    let dir = ctx.scratch("seccomp")?;
    let profile = dir.join("no-mkdir.json");
    std::fs::write(
        &profile,
        serde_json::to_vec(&serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]
        }))?,
    )?;
    let p = profile.display().to_string();
    let (_, id) = one(ctx, |c| {
        spec::security(c).seccomp = Some(seccomp(ProfileType::Localhost, &p))
    })?;
    let mode = proc1_status(ctx, &id, "Seccomp")?;
    ensure!(mode == "2", "Localhost profile: Seccomp mode {mode}");
    let r = ctx.sh(&id, "mkdir /tmp/denied")?;
    ensure!(
        r.exit_code != 0,
        "the profile denies mkdir, yet mkdir worked"
    );
    ctx.sh_ok(&id, "touch /tmp/allowed")
        .context("a syscall the profile allows")?;
    Ok(())
}

pub fn seccomp_unconfined(ctx: &mut Ctx) -> Result<()> {
    let (_, id) = one(ctx, |c| {
        spec::security(c).seccomp = Some(seccomp(ProfileType::Unconfined, ""))
    })?;
    let mode = proc1_status(ctx, &id, "Seccomp")?;
    ensure!(mode == "0", "Unconfined: Seccomp mode {mode} (0 = none)");
    ctx.sh_ok(&id, "unshare -U true")
        .context("Unconfined: unshare(CLONE_NEWUSER)")?;
    Ok(())
}

/// Two containers of a pod with PID namespace mode `mode`; whether the
/// second sees the first's process, and its PID 1's command line.
fn pid_view(ctx: &mut Ctx, mode: NamespaceMode) -> Result<(bool, String)> {
    let mut pcfg = ctx.pod_config("p")?;
    let mut a = spec::container("a", &["sleep", "3601"]);
    let mut b = spec::container("b", &["sleep", "3602"]);
    let mut ns = spec::namespaces();
    ns.pid = mode as i32;
    spec::set_namespaces(&mut pcfg, &mut [&mut a, &mut b], ns);
    let pod = ctx.run_pod(&pcfg)?;
    ctx.start(&pod, &a, &pcfg)?;
    let b = ctx.start(&pod, &b, &pcfg)?;
    let ps = ctx.sh_ok(&b, "ps -o args")?;
    let init = ctx.sh_ok(&b, "tr '\\0' ' ' < /proc/1/cmdline")?;
    Ok((ps.contains("sleep 3601"), init.trim().to_string()))
}

pub fn pid_namespace_pod(ctx: &mut Ctx) -> Result<()> {
    let (sees, init) = pid_view(ctx, NamespaceMode::Pod)?;
    ensure!(
        sees,
        "PID mode POD: container b does not see container a's process"
    );
    ensure!(
        init.contains("sleep infinity"),
        "PID mode POD: PID 1 is {init:?}, not the pod's pause process"
    );
    Ok(())
}

pub fn pid_namespace_container(ctx: &mut Ctx) -> Result<()> {
    let (sees, init) = pid_view(ctx, NamespaceMode::Container)?;
    ensure!(
        !sees,
        "PID mode CONTAINER: container b sees container a's process"
    );
    ensure!(
        init == "sleep 3602",
        "PID mode CONTAINER: PID 1 is {init:?}"
    );
    Ok(())
}

/// IPC mode POD: the pod's containers share SysV IPC and /dev/shm (containerd
/// maps CONTAINER to POD as well; only NODE differs).
pub fn ipc_namespace_pod(ctx: &mut Ctx) -> Result<()> {
    let (pod, pcfg) = ctx.pod("p")?;
    let a = ctx.start(&pod, &spec::shell("a", SLEEPER), &pcfg)?;
    let b = ctx.start(&pod, &spec::shell("b", SLEEPER), &pcfg)?;
    let na = ctx.sh_ok(&a, "readlink /proc/self/ns/ipc")?;
    let nb = ctx.sh_ok(&b, "readlink /proc/self/ns/ipc")?;
    ensure!(
        na == nb,
        "IPC namespaces differ within the pod: {na:?} {nb:?}"
    );
    ctx.sh_ok(&a, "echo shared > /dev/shm/marker")?;
    let got = ctx.sh_ok(&b, "cat /dev/shm/marker")?;
    ensure!(got == "shared\n", "/dev/shm is not shared: b reads {got:?}");
    Ok(())
}

/// HostPID: the container sees the node's processes.
pub fn host_pid(ctx: &mut Ctx) -> Result<()> {
    let mut pcfg = ctx.pod_config("p")?;
    let mut c = spec::shell("main", SLEEPER);
    let mut ns = spec::namespaces();
    ns.pid = NamespaceMode::Node as i32;
    spec::set_namespaces(&mut pcfg, &mut [&mut c], ns);
    let pod = ctx.run_pod(&pcfg)?;
    let id = ctx.start(&pod, &c, &pcfg)?;
    if ctx.runtime == Runtime::Capsule {
        // In a VM the pod's host is the guest: the container shares the
        // guest's pid namespace, where PID 1 is capsule's agent (`/init`).
        let inside = ctx.sh_ok(&id, "cat /proc/1/comm")?;
        ensure!(
            inside.trim() == "init",
            "HostPID on capsule: PID 1 inside is {:?}, not the guest's init (the agent)",
            inside.trim()
        );
        return Ok(());
    }
    let host_init = std::fs::read_to_string("/proc/1/comm")?;
    let inside = ctx.sh_ok(&id, "cat /proc/1/comm")?;
    ensure!(
        inside == host_init,
        "HostPID: PID 1 inside is {:?}, the host's is {:?}",
        inside.trim(),
        host_init.trim()
    );
    let me = std::process::id();
    let r = ctx.sh(&id, &format!("test -d /proc/{me}"))?;
    ensure!(
        r.exit_code == 0,
        "HostPID: the test process {me} is not visible inside"
    );
    Ok(())
}
