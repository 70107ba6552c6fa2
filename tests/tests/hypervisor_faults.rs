//! Hypervisor faults through ctr: QEMU killed while Create waits for the
//! agent, QEMU killed during a device hotplug, virtiofsd killed while a
//! container runs, and vhost-user backends that hang (silent on the probe;
//! answering the probe, then silent towards QEMU). Every case: ctr gets an
//! error within a bound derived from the configured timeouts, the task is
//! reported exited (or never exists), and nothing is left behind.
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use capsule_tests::{sigkill, wait_for, CapsuleOptions, Env};

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

const CLEAN: Duration = Duration::from_secs(60);
/// Slack for the loaded machine (other tests boot VMs at the same time).
const SLACK: Duration = Duration::from_secs(30);
/// The hypervisor's fixed VM stop timeouts (quit reply + quit wait, SIGTERM,
/// SIGKILL: hypervisor/src/config.rs) and the shim's virtiofsd stop (3+3 s).
const VM_STOP: Duration = Duration::from_secs(5 + 5 + 3 + 3 + 6);

fn secs(t: f64) -> Duration {
    Duration::from_secs_f64(t)
}

/// `ctr ARGS` running in the background, output into files.
struct Bg {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

struct Done {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Bg {
    fn spawn(env: &Env, name: &str, args: &[&str]) -> Result<Bg> {
        let out = env.dir.path().join(format!("{name}.out"));
        let err = env.dir.path().join(format!("{name}.err"));
        let child = Command::new("ctr")
            .arg("--address")
            .arg(&env.sock)
            .args(["--namespace", capsule_tests::NAMESPACE])
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(&err)?)
            .spawn()
            .context("spawning ctr")?;
        Ok(Bg { child, out, err })
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits at most `timeout` for ctr to exit.
    fn wait(&mut self, timeout: Duration) -> Result<Done> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait()? {
                break s;
            }
            if Instant::now() >= deadline {
                bail!(
                    "ctr did not return within {timeout:?}; stderr so far: {}",
                    std::fs::read_to_string(&self.err).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Ok(Done {
            code: status.code(),
            stdout: std::fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.err).unwrap_or_default(),
        })
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn vm_pid(env: &Env, id: &str, which: &str) -> Option<u32> {
    let v = env.sandbox_record(id)?;
    v[which]["pid"].as_u64().map(|p| p as u32)
}

/// The task is gone or STOPPED (a failed Create leaves no task).
/// ctr failed with an error naming `device`, and the task is not running.
fn failed_naming(env: &Env, id: &str, done: &Done, device: &str) -> Result<()> {
    ensure!(done.code != Some(0), "ctr succeeded: {}", done.stdout);
    ensure!(
        done.stderr.contains("capsule") && done.stderr.contains(device),
        "the error does not name the device {device}: {}",
        done.stderr
    );
    task_not_running(env, id)
}

fn task_not_running(env: &Env, id: &str) -> Result<()> {
    match env.task_status(id).as_deref() {
        None | Some("STOPPED") => Ok(()),
        Some(s) => bail!("task {id} is {s} after the fault"),
    }
}

fn finish(env: &Env, id: &str) -> Result<()> {
    let _ = env.ctr(&["task", "delete", id]);
    let _ = env.ctr(&["container", "delete", id]);
    env.assert_clean(CLEAN)
}

#[test]
fn qemu_killed_while_create_waits_for_the_agent() -> Result<()> {
    let _s = serial();
    let agent_connect = 120.0;
    let mut env = Env::start_with(CapsuleOptions {
        timeouts: vec![("agent_connect".into(), agent_connect)],
        ..Default::default()
    })?;
    // The shim logs the fault under test as an error.
    env.allow_log_error("module=capsule_shim::sandbox::qemu::faults");
    let id = "qk1";
    let mut ctr = Bg::spawn(
        &env,
        id,
        &[
            "run",
            "--runtime",
            capsule_tests::RUNTIME,
            "-d",
            capsule_tests::IMAGE,
            id,
            "sleep",
            "1000",
        ],
    )?;
    // QEMU is recorded in sandbox.json as soon as it is spawned, before its
    // monitor is up: kill it once the shim says it waits for the agent.
    let pid = wait_for("QEMU in sandbox.json", Duration::from_secs(120), || {
        vm_pid(&env, id, "qemu")
    })?;
    let log = env.dir.path().join("containerd.log");
    wait_for(
        "the shim waiting for the agent",
        Duration::from_secs(120),
        || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|l| l.contains("QEMU is up; waiting for the guest agent"))
        },
    )?;
    ensure!(ctr.running(), "ctr finished before QEMU could be killed");
    sigkill(pid);
    let killed = Instant::now();
    // A shim sitting out the agent timeout fails this bound.
    let bound = secs(agent_connect) / 2;
    let done = ctr.wait(bound)?;
    eprintln!(
        "QEMU killed while waiting for the agent: ctr returned {:?} after {:?}: {}",
        done.code,
        killed.elapsed(),
        done.stderr.trim()
    );
    ensure!(done.code != Some(0), "ctr succeeded: {}", done.stdout);
    ensure!(
        done.stderr.contains("capsule")
            && done
                .stderr
                .contains(&format!("QEMU (pid {pid}) exited (signal 9)"))
            && done.stderr.contains("waiting for the guest agent"),
        "the error does not say QEMU exited: {}",
        done.stderr
    );
    task_not_running(&env, id)?;
    finish(&env, id)
}

/// A vhost-user backend served by a thread: `answer` = reply to the first
/// GET_FEATURES (capsule's probe), then never again; otherwise silent.
struct HungBackend {
    stop: Arc<AtomicBool>,
    events: mpsc::Receiver<&'static str>,
    thread: Option<JoinHandle<()>>,
}

impl HungBackend {
    fn start(socket: &Path, answer: bool) -> Result<HungBackend> {
        let listener =
            UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, events) = mpsc::channel();
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held: Vec<UnixStream> = Vec::new();
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = tx.send("accepted");
                        if answer {
                            let _ = serve_once(&s, &stop2, &tx);
                        }
                        held.push(s);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(HungBackend {
            stop,
            events,
            thread: Some(thread),
        })
    }

    /// Waits for the event `what` (at most `timeout`).
    fn wait_event(&self, what: &str, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(e) if e == what => return Ok(Instant::now()),
                Ok(_) => continue,
                Err(_) => bail!("the backend never saw {what:?} within {timeout:?}"),
            }
        }
    }
}

impl Drop for HungBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one 12-byte vhost-user header, polling `stop`.
fn read_header(mut s: &UnixStream, stop: &AtomicBool) -> Option<[u8; 12]> {
    s.set_read_timeout(Some(Duration::from_millis(100))).ok()?;
    let mut hdr = [0u8; 12];
    let mut got = 0;
    while got < 12 {
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        match s.read(&mut hdr[got..]) {
            Ok(0) => return None,
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return None,
        }
    }
    Some(hdr)
}

/// Answers the probe's GET_FEATURES, then reports QEMU's first message on
/// the same (handed-over) connection and never answers it.
fn serve_once(s: &UnixStream, stop: &AtomicBool, tx: &mpsc::Sender<&'static str>) -> Option<()> {
    let hdr = read_header(s, stop)?;
    if hdr[0..4] != 1u32.to_le_bytes() {
        return None;
    }
    let mut reply = Vec::with_capacity(20);
    reply.extend_from_slice(&1u32.to_le_bytes());
    reply.extend_from_slice(&5u32.to_le_bytes()); // version 1 | reply
    reply.extend_from_slice(&8u32.to_le_bytes());
    reply.extend_from_slice(&0x1_4000_0000u64.to_le_bytes());
    let mut w = s;
    w.write_all(&reply).ok()?;
    let _ = tx.send("probed");
    read_header(s, stop)?;
    let _ = tx.send("qemu");
    Some(())
}

/// A vhost-user store in `env`'s directory with a backend socket and a
/// node `b 241:minor` named `name`; returns (node, config for
/// `--runtime-config-path`).
fn store_with(
    env: &Env,
    opts: &CapsuleOptions,
    name: &str,
    minor: u64,
) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let (store, cfg) = env.vhost_store(opts)?;
    let node = store.join("block/devices").join(name);
    capsule_tests::mknod_block(&node, 241, minor)?;
    Ok((node, store.join("block/sockets").join(name), cfg))
}

fn run_with_node(env: &Env, id: &str, cfg: &Path, node: &Path) -> Result<Bg> {
    Bg::spawn(
        env,
        id,
        &[
            "run",
            "--runtime",
            capsule_tests::RUNTIME,
            "--rm",
            "--runtime-config-path",
            &cfg.display().to_string(),
            "--device",
            &node.display().to_string(),
            capsule_tests::IMAGE,
            id,
            "true",
        ],
    )
}

#[test]
fn qemu_killed_during_a_device_hotplug() -> Result<()> {
    let _s = serial();
    // Long QMP timeouts: the death must be noticed, not the timeout.
    let t = 120.0;
    let opts = CapsuleOptions {
        timeouts: vec![("qmp".into(), t), ("hotplug".into(), t)],
        ..Default::default()
    };
    let mut env = Env::start_with(opts.clone())?;
    // The shim logs the fault under test as an error.
    env.allow_log_error("module=capsule_shim::sandbox::qemu::faults");
    let (node, sock, cfg) = store_with(&env, &opts, "vub1", 1)?;
    let backend = HungBackend::start(&sock, true)?;
    let id = "qh1";
    let mut ctr = run_with_node(&env, id, &cfg, &node)?;
    // QEMU talking to the backend = QEMU inside device_add.
    backend.wait_event("qemu", Duration::from_secs(180))?;
    let pid = vm_pid(&env, id, "qemu").context("no QEMU in sandbox.json")?;
    sigkill(pid);
    let killed = Instant::now();
    let bound = VM_STOP + SLACK;
    ensure!(bound < secs(t), "the bound must be below the QMP timeout");
    let done = ctr.wait(bound)?;
    eprintln!(
        "QEMU killed during device_add: ctr returned {:?} after {:?}: {}",
        done.code,
        killed.elapsed(),
        done.stderr.trim()
    );
    failed_naming(&env, id, &done, "(b 241:1)")?;
    drop(backend);
    finish(&env, id)
}

#[test]
fn virtiofsd_killed_while_a_container_runs() -> Result<()> {
    let _s = serial();
    let mut env = Env::start()?;
    // The shim logs the fault under test as an error.
    env.allow_log_error("module=capsule_shim::sandbox::qemu::faults");
    let id = "vk1";
    let mut ctr = Bg::spawn(
        &env,
        id,
        &[
            "run",
            "--runtime",
            capsule_tests::RUNTIME,
            capsule_tests::IMAGE,
            id,
            "sleep",
            "1000",
        ],
    )?;
    wait_for("the task to run", Duration::from_secs(180), || {
        (env.task_status(id).as_deref() == Some("RUNNING")).then_some(())
    })?;
    let pid = vm_pid(&env, id, "virtiofsd").context("no virtiofsd in sandbox.json")?;
    sigkill(pid);
    let killed = Instant::now();
    let done = ctr.wait(VM_STOP + SLACK)?;
    eprintln!(
        "virtiofsd killed: ctr run returned {:?} after {:?}",
        done.code,
        killed.elapsed()
    );
    ensure!(
        done.code == Some(255),
        "ctr run: exit {:?}, stderr {}",
        done.code,
        done.stderr
    );
    // ctr run deletes the task it waited for; a task still listed must be
    // STOPPED.
    task_not_running(&env, id)?;
    let log = std::fs::read_to_string(env.dir.path().join("containerd.log"))?;
    ensure!(
        log.lines()
            .any(|l| l.contains("virtiofsd exited while the sandbox runs")
                && l.contains(&format!("virtiofsd_pid={pid}"))),
        "no error naming virtiofsd (pid {pid}) in the shim log\n{}",
        env.containerd_log_tail()
    );
    finish(&env, id)
}

/// A store backend that hangs: ctr fails within the bound from `hang`
/// (the event after which only timeouts can end Create), naming the node.
fn hung_backend(answer: bool, hang: &str, bound_of: impl Fn(f64) -> Duration) -> Result<()> {
    let t = 5.0;
    let opts = CapsuleOptions {
        timeouts: vec![
            ("qmp".into(), t),
            ("hotplug".into(), t),
            ("unplug".into(), t),
        ],
        ..Default::default()
    };
    let env = Env::start_with(opts.clone())?;
    let (node, sock, cfg) = store_with(&env, &opts, "vub2", 2)?;
    let backend = HungBackend::start(&sock, answer)?;
    let id = if answer { "hb2" } else { "hb1" };
    let mut ctr = run_with_node(&env, id, &cfg, &node)?;
    let at = backend.wait_event(hang, Duration::from_secs(180))?;
    let bound = bound_of(t);
    let done = ctr.wait(bound)?;
    eprintln!(
        "hung backend (answer={answer}): ctr returned {:?} {:?} after {hang:?} (bound {bound:?}): {}",
        done.code,
        at.elapsed(),
        done.stderr.trim()
    );
    failed_naming(&env, id, &done, "(b 241:2)")?;
    drop(backend);
    finish(&env, id)
}

#[test]
fn vhost_user_backend_silent_on_the_probe() -> Result<()> {
    let _s = serial();
    // The probe's deadline (min(qmp, 5 s)), then rollback and VM stop.
    hung_backend(false, "accepted", |t| secs(t) + VM_STOP + SLACK)
}

#[test]
fn vhost_user_backend_hanging_on_qemu() -> Result<()> {
    let _s = serial();
    // device_add's QMP deadline freezes nothing for longer: its timeout,
    // rollback commands against the frozen monitor (each bounded by the
    // same deadline, at most 3), then the VM stop kills QEMU.
    hung_backend(true, "qemu", |t| secs(t) * 4 + VM_STOP + SLACK)
}
