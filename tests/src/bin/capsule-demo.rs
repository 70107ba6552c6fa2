//! `make demo`: capsule's main job, shown step by step on a private
//! containerd. It uses the end-to-end tests' harness, so the demo runs exactly
//! what `make test` checks, and it changes nothing system-wide.
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use capsule_tests::{text, wait_for, Env};

const ID: &str = "capsule-demo";

fn step(title: &str) {
    println!("\n=== {title}");
}

fn show(cmd: &str, out: &std::process::Output) {
    println!("$ {cmd}");
    print!("{}", text(out));
}

fn main() -> Result<()> {
    step("private containerd 1.6 (own root, state and socket) with busybox imported");
    let mut env = Env::start().context("starting the private containerd")?;
    println!("containerd socket: {}", env.sock.display());

    step("a loop device on the host");
    let (dev, file) = env.loop_device("demo-disk", 16 << 20)?;
    println!("{dev} backed by {}", file.display());

    step(&format!(
        "ctr run --runtime io.containerd.capsule.v2 --device {dev}: a container in its own VM"
    ));
    let o = env.run(&["-d", "--device", &dev], ID, &["sleep", "600"])?;
    show(
        &format!(
            "ctr run -d --runtime io.containerd.capsule.v2 --device {dev} busybox {ID} sleep 600"
        ),
        &o,
    );
    ensure!(
        o.status.success(),
        "ctr run failed:\n{}",
        env.containerd_log_tail()
    );
    wait_for("the task to run", Duration::from_secs(120), || {
        (env.task_status(ID).as_deref() == Some("RUNNING")).then_some(())
    })?;

    step("inside the container: the device at the path asked for, and the guest kernel");
    let o = env.exec(ID, "look", &["sh", "-c", &format!("ls -l {dev}; uname -r")])?;
    show(
        &format!("ctr task exec {ID} sh -c 'ls -l {dev}; uname -r'"),
        &o,
    );
    ensure!(o.status.success(), "exec failed");

    step("data written in the container ...");
    let marker = "written inside a capsule VM";
    let script = format!(
        "echo '{marker}' | dd of={dev} bs=512 count=1 conv=sync,fsync 2>/dev/null && echo ok"
    );
    let o = env.exec(ID, "write", &["sh", "-c", &script])?;
    show(
        &format!("ctr task exec {ID} sh -c \"echo '{marker}' | dd of={dev} ...\""),
        &o,
    );
    ensure!(o.status.success(), "write failed");

    step("... read on the host from the loop device's file");
    let bytes = std::fs::read(&file)?;
    let found = String::from_utf8_lossy(&bytes[..512.min(bytes.len())])
        .trim_end_matches('\0')
        .trim()
        .to_string();
    println!("$ head -c 512 {} \n{found}", file.display());
    ensure!(
        found == marker,
        "the host file holds {found:?}, not {marker:?}"
    );

    step("capsule inspect: the persisted devices and VM, checked against QEMU");
    let o = env.capsule(&["inspect", ID])?;
    show(&format!("capsule inspect {ID}"), &o);
    ensure!(o.status.success(), "capsule inspect failed");

    step("clean up: kill, delete, and check nothing is left");
    env.remove(ID);
    env.assert_clean(Duration::from_secs(60))?;
    println!("no QEMU, virtiofsd, mount or state file left; {dev} still holds the data");
    println!("\ncapsule demo: OK");
    Ok(())
}
