//! Exec (sync and streaming), Attach, logs, stats and resource updates.
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use capsule_tests::cri::proto::v1::*;
use capsule_tests::cri::spec;
use capsule_tests::cri::stream::{Session, STDIN};
use capsule_tests::cri::suite::Ctx;

use super::lifecycle::SLEEPER;
use super::util::*;

fn running(ctx: &mut Ctx) -> Result<(String, String, PodSandboxConfig)> {
    let (pod, pcfg) = ctx.pod("p")?;
    let id = ctx.start(&pod, &spec::shell("main", SLEEPER), &pcfg)?;
    Ok((pod, id, pcfg))
}

pub fn exec_sync(ctx: &mut Ctx) -> Result<()> {
    let (_, id, _) = running(ctx)?;
    let r = ctx.sh(&id, "echo out; echo err >&2; exit 3")?;
    ensure!(
        r.stdout == b"out\n" && r.stderr == b"err\n" && r.exit_code == 3,
        "ExecSync: stdout {:?} stderr {:?} exit {}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr),
        r.exit_code
    );
    Ok(())
}

/// ExecSync's timeout ends the command and leaves the container working.
pub fn exec_sync_timeout(ctx: &mut Ctx) -> Result<()> {
    let (_, id, _) = running(ctx)?;
    let t = Instant::now();
    let r = ctx.node.cri.exec_sync(&id, &["sleep", "1234"], 2);
    let took = t.elapsed();
    match r {
        Err(e) => ctx.note(format!(
            "timed out in {:.1} s: {}",
            took.as_secs_f64(),
            e.message
        )),
        Ok(r) => bail!(
            "ExecSync of `sleep 1234` with a 2 s timeout returned after {:.1} s with exit code {}",
            took.as_secs_f64(),
            r.exit_code
        ),
    }
    ensure!(
        took < Duration::from_secs(20),
        "ExecSync with a 2 s timeout returned after {:.1} s",
        took.as_secs_f64()
    );
    ensure!(
        ctx.sh_ok(&id, "echo alive")? == "alive\n",
        "the container no longer execs"
    );
    let mut left = String::new();
    let gone = capsule_tests::wait_for(
        "the timed-out exec to be killed",
        Duration::from_secs(10),
        || {
            left = ctx
                .sh_ok(&id, "ps -o args | grep '[s]leep 1234'; true")
                .ok()?;
            left.is_empty().then_some(())
        },
    );
    ensure!(gone.is_ok(), "the timed-out exec still runs: {left:?}");
    Ok(())
}

pub fn exec_stream(ctx: &mut Ctx) -> Result<()> {
    let (_, id, _) = running(ctx)?;
    let url = ctx.node.cri.exec(ExecRequest {
        container_id: id.clone(),
        cmd: ["sh", "-c", "read l; echo got:$l; echo err >&2; exit 5"]
            .map(String::from)
            .to_vec(),
        tty: false,
        stdin: true,
        stdout: true,
        stderr: true,
    })?;
    let mut s = Session::open(&ctx.node.netns.path, &url)?;
    s.send(STDIN, b"hi\n")?;
    s.read_to_close(Duration::from_secs(60))?;
    ensure!(
        s.text(1) == "got:hi\n" && s.text(2) == "err\n" && s.exit_code() == Some(5),
        "streaming exec: stdout {:?} stderr {:?} status {:?}",
        s.text(1),
        s.text(2),
        s.status()
    );
    Ok(())
}

pub fn attach(ctx: &mut Ctx) -> Result<()> {
    let (pod, pcfg) = ctx.pod("p")?;
    let mut ccfg = spec::shell(
        "main",
        "echo ready; while read l; do echo \"attached:$l\"; echo \"err:$l\" >&2; done",
    );
    ccfg.stdin = true;
    let id = ctx.start(&pod, &ccfg, &pcfg)?;
    wait_log(&pcfg, &ccfg, "ready")?;
    let url = ctx.node.cri.attach(AttachRequest {
        container_id: id.clone(),
        stdin: true,
        tty: false,
        stdout: true,
        stderr: true,
    })?;
    let mut s = Session::open(&ctx.node.netns.path, &url)?;
    s.send(STDIN, b"x\n")?;
    s.read_until(Duration::from_secs(60), |s| {
        s.text(1).contains("attached:x") && s.text(2).contains("err:x")
    })?;
    ensure!(
        s.text(1).contains("attached:x") && s.text(2).contains("err:x"),
        "attach: stdout {:?} stderr {:?} (closed: {})",
        s.text(1),
        s.text(2),
        s.closed
    );
    s.close();
    wait_log(&pcfg, &ccfg, "attached:x")?;
    Ok(())
}

/// One CRI log line: `<RFC 3339 time> <stream> <F|P> <text>`.
fn parse_line(l: &str) -> Result<(&str, &str, &str)> {
    let mut f = l.splitn(4, ' ');
    let (Some(ts), Some(stream), Some(tag), Some(text)) = (f.next(), f.next(), f.next(), f.next())
    else {
        bail!("log line {l:?} is not `<time> <stream> <tag> <text>`");
    };
    ensure!(
        ts.len() >= 20 && ts.as_bytes()[4] == b'-' && ts.as_bytes()[10] == b'T',
        "log line {l:?}: {ts:?} is not an RFC 3339 time"
    );
    ensure!(
        matches!(stream, "stdout" | "stderr") && matches!(tag, "F" | "P"),
        "log line {l:?}: stream {stream:?} tag {tag:?}"
    );
    Ok((stream, tag, text))
}

pub fn logs(ctx: &mut Ctx) -> Result<()> {
    let (pod, pcfg) = ctx.pod("p")?;
    let ccfg = spec::shell(
        "main",
        "echo out1; echo err1 >&2; while :; do if [ -e /tmp/go ]; then echo after-reopen; rm -f /tmp/go; fi; sleep 0.2; done",
    );
    let id = ctx.start(&pod, &ccfg, &pcfg)?;
    let path = log_path(&pcfg, &ccfg);
    let text = wait_log(&pcfg, &ccfg, "err1")?;
    let lines = text.lines().map(parse_line).collect::<Result<Vec<_>>>()?;
    for want in [("stdout", "F", "out1"), ("stderr", "F", "err1")] {
        ensure!(lines.contains(&want), "log {text:?} lacks {want:?}");
    }
    let st = ctx.status(&id)?;
    ensure!(
        std::path::Path::new(&st.log_path) == path,
        "ContainerStatus.log_path {:?}, expected {}",
        st.log_path,
        path.display()
    );
    // Rotation: the kubelet renames the file, then asks for a new one.
    let rotated = path.with_extension("log.1");
    std::fs::rename(&path, &rotated)?;
    ctx.node.cri.reopen_container_log(&id)?;
    ctx.sh_ok(&id, "touch /tmp/go")?;
    let fresh = wait_file_contains(&path, "after-reopen", Duration::from_secs(30))?;
    ensure!(
        !fresh.contains("out1"),
        "the reopened log holds old lines: {fresh:?}"
    );
    let old = std::fs::read_to_string(&rotated)?;
    ensure!(
        !old.contains("after-reopen"),
        "the rotated log got new lines: {old:?}"
    );
    Ok(())
}

pub fn stats(ctx: &mut Ctx) -> Result<()> {
    let (pod, id, _) = running(ctx)?;
    ctx.sh_ok(&id, "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done")?;
    let s = ctx.node.cri.container_stats(&id)?;
    ensure!(
        s.attributes.as_ref().map(|a| a.id.as_str()) == Some(id.as_str()),
        "ContainerStats attributes: {:?}",
        s.attributes
    );
    let cpu = s
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .map(|v| v.value)
        .unwrap_or(0);
    let mem = s
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref())
        .map(|v| v.value)
        .unwrap_or(0);
    ensure!(
        cpu > 0 && mem > 0,
        "ContainerStats: cpu {:?} memory {:?}",
        s.cpu,
        s.memory
    );
    let all = ctx
        .node
        .cri
        .list_container_stats(Some(ContainerStatsFilter {
            pod_sandbox_id: pod.clone(),
            ..Default::default()
        }))?;
    ensure!(
        all.iter()
            .any(|s| s.attributes.as_ref().is_some_and(|a| a.id == id)),
        "ListContainerStats of pod {pod} lacks {id}: {all:?}"
    );
    ctx.note(format!("cpu {cpu} ns, working set {mem} B"));
    Ok(())
}

pub fn pod_sandbox_stats(ctx: &mut Ctx) -> Result<()> {
    let (pod, id, _) = running(ctx)?;
    let s = ctx.node.cri.pod_sandbox_stats(&pod)?;
    let linux = s.linux.context("PodSandboxStats: no linux stats")?;
    ensure!(
        linux.cpu.is_some() && linux.memory.is_some(),
        "PodSandboxStats: cpu {:?} memory {:?}",
        linux.cpu,
        linux.memory
    );
    ensure!(
        linux
            .containers
            .iter()
            .any(|c| c.attributes.as_ref().is_some_and(|a| a.id == id)),
        "PodSandboxStats lacks container {id}: {:?}",
        linux.containers
    );
    Ok(())
}

/// The container's memory limit and CPU quota as its cgroup shows them
/// (cgroup v2 or v1).
fn cgroup_limits(ctx: &Ctx, id: &str) -> Result<(String, String)> {
    let listing = ctx.sh(id, "ls /sys/fs/cgroup; grep cgroup /proc/self/mountinfo")?;
    let listing = String::from_utf8_lossy(&listing.stdout).replace('\n', " ");
    let mem = ctx.sh_ok(
        id,
        "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes",
    )
    .with_context(|| format!("no memory limit file; /sys/fs/cgroup: {listing}"))?;
    let cpu = ctx.sh_ok(
        id,
        "cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)",
    )
    .with_context(|| format!("no CPU quota file; /sys/fs/cgroup: {listing}"))?;
    Ok((mem.trim().to_string(), cpu.trim().to_string()))
}

pub fn update_resources(ctx: &mut Ctx) -> Result<()> {
    let (pod, pcfg) = ctx.pod("p")?;
    let mut ccfg = spec::shell("main", SLEEPER);
    *spec::resources(&mut ccfg) = LinuxContainerResources {
        memory_limit_in_bytes: 128 << 20,
        cpu_period: 100_000,
        cpu_quota: 100_000,
        ..Default::default()
    };
    let id = ctx.start(&pod, &ccfg, &pcfg)?;
    let before = cgroup_limits(ctx, &id)?;
    ensure!(
        before == ("134217728".to_string(), "100000 100000".to_string()),
        "limits at start (memory, cpu quota/period): {before:?}"
    );
    ctx.node.cri.update_container_resources(
        &id,
        LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            cpu_period: 100_000,
            cpu_quota: 50_000,
            ..Default::default()
        },
    )?;
    let after = cgroup_limits(ctx, &id)?;
    ensure!(
        after == ("67108864".to_string(), "50000 100000".to_string()),
        "limits after UpdateContainerResources (memory, cpu quota/period): {after:?}"
    );
    if let Some(r) = ctx.status(&id)?.resources.and_then(|r| r.linux) {
        ensure!(
            r.memory_limit_in_bytes == 64 << 20 && r.cpu_quota == 50_000,
            "ContainerStatus.resources after the update: {r:?}"
        );
    }
    Ok(())
}
