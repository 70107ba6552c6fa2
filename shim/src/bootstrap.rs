//! The shim binary's modes, as containerd 1.6, 1.7 and 2.x run them:
//!
//! - `-info`: the runtime info protobuf (containerd 2.x; [`info`]).
//! - `start`: reads what containerd piped in (nothing, runtime options or,
//!   from 2.3, bootstrap params), finds or spawns the shim serving this
//!   container (reusing the pod's shim when the CRI annotations group it)
//!   and prints its address in the form the calling daemon reads
//!   ([`protocol`]), and nothing else: containerd reads stdout **and**
//!   stderr as the reply.
//! - (no action) `-socket ADDR`: the long-running server.
//! - `delete`: cleans up after a dead shim and writes a DeleteResponse.
//!
//! Why not `containerd_shim::run`: containerd-shim 0.12 tells containerd 2.3
//! from older daemons, but answers every older daemon with JSON version 3,
//! which containerd 1.6 takes for the address, 1.7 refuses ("unsupported
//! shim version (3)") and 2.0–2.2 read as "this shim serves the Sandbox
//! API" (see [`protocol`], which also says when capsule does announce it);
//! it registers only `containerd.task.v3.Task`,
//! while containerd 1.6 and 1.7 call `containerd.task.v2.Task`; and its
//! reaper calls `waitpid(-1)`. This module reuses its argument parser (with
//! `-info`), its bootstrap messages, `StartOpts` (socket naming, honouring
//! 2.3's `socket_dir`), its exit signal and the protos' `RuntimeInfo`;
//! decodes stdin and picks the reply itself; and serves the task service
//! under both names, with containerd's Sandbox API beside it
//! (`service::sandbox_api`). The shim sets no SIGCHLD handler of its own: QEMU,
//! virtiofsd and logging binaries are tokio children reaped by tokio (per
//! pid, never `waitpid(-1)`), and the shim is no subreaper, so orphans go to
//! init.
mod info;
pub mod protocol;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::{ExitSignal, Flags, StartOpts};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{Message, MessageField};

use crate::cleanup::{self, KillTiming, RealProcesses};
use crate::config::Config;
use crate::events::RemoteSink;
use crate::sandbox::qemu::QemuFactory;
use crate::service::{self, ConfigSource, TaskService};

pub const RUNTIME_ID: &str = "io.containerd.capsule.v2";
pub const TASK_V2: &str = "containerd.task.v2.Task";
pub const TASK_V3: &str = "containerd.task.v3.Task";
/// `start` tells the server which daemon called and how it was answered
/// (logged when the server comes up).
const CALLER_ENV: &str = "CAPSULE_SHIM_CALLER";

/// `containerd-shim-capsule-v2` main. Returns the exit code.
pub fn main(args: Vec<OsString>) -> i32 {
    let flags = match containerd_shim::parse(args.get(1..).unwrap_or_default()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("containerd-shim-capsule-v2: {e}");
            return 2;
        }
    };
    if flags.version {
        println!("containerd-shim-capsule-v2 {}", env!("CARGO_PKG_VERSION"));
        return 0;
    }
    if flags.info {
        return match info::runtime_info(&read_stdin()).write_to_bytes() {
            Ok(b) => {
                let mut out = std::io::stdout();
                let _ = out.write_all(&b);
                let _ = out.flush();
                0
            }
            Err(e) => {
                eprintln!("capsule: -info: encoding the runtime info: {e}");
                1
            }
        };
    }
    match flags.action.as_str() {
        "start" => match start(&flags) {
            Ok(reply) => {
                let mut out = std::io::stdout();
                let _ = out.write_all(&reply);
                let _ = out.flush();
                0
            }
            Err(e) => {
                // Only a failed start may say something: containerd shows it.
                eprint!("capsule: start: {e}");
                1
            }
        },
        "delete" => delete(&flags),
        "" => serve(&flags),
        other => {
            eprintln!("containerd-shim-capsule-v2: unknown action {other:?}");
            2
        }
    }
}

fn strip_unix(addr: &str) -> &str {
    addr.strip_prefix("unix://").unwrap_or(addr)
}

fn socket_works(addr: &str) -> bool {
    std::os::unix::net::UnixStream::connect(strip_unix(addr)).is_ok()
}

/// Reads what containerd piped to `start` or `-info` (nothing, runtime
/// options, or bootstrap params on 2.3+); never fails on it.
fn read_stdin() -> Vec<u8> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        return Vec::new();
    }
    // containerd closes it after writing; a caller that keeps it open must
    // not hang `start`.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::stdin().lock().take(10 << 20).read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default()
}

/// What `start` needs from the flags and from what containerd piped in.
fn start_opts(flags: &Flags, input: &protocol::StartInput) -> StartOpts {
    let mut opts = match input {
        protocol::StartInput::Bootstrap(p) => StartOpts::from(p.as_ref().clone()),
        _ => StartOpts {
            id: flags.id.clone(),
            publish_binary: flags.publish_binary.clone(),
            address: flags.address.clone(),
            ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
            namespace: flags.namespace.clone(),
            ..Default::default()
        },
    };
    opts.debug |= flags.debug;
    opts.extensions = input.options();
    opts
}

/// `start`: find or spawn the shim server; returns the reply for the
/// calling daemon.
pub fn start(flags: &Flags) -> Result<Vec<u8>, String> {
    let input = protocol::decode_start_input(&read_stdin(), &flags.id, &flags.namespace);
    let max_version = std::env::var(protocol::MAX_SHIM_VERSION_ENV).ok();
    let daemon = protocol::daemon(&input, max_version.as_deref());
    let opts = start_opts(flags, &input);
    let bundle = std::env::current_dir().map_err(|e| format!("current directory: {e}"))?;
    let reply = daemon.reply(protocol::role_of(&bundle));
    let address = start_server(&opts, &bundle, &daemon, reply)?;
    protocol::encode_reply(reply, &address)
}

/// Finds or spawns the shim server for `opts`; returns its address.
fn start_server(
    opts: &StartOpts,
    bundle: &Path,
    daemon: &protocol::Daemon,
    reply: protocol::Reply,
) -> Result<String, String> {
    let grouping = std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<oci_spec::runtime::Spec>(&b).ok())
        .map(|s| service::sandbox_id_of(&opts.id, &s))
        .unwrap_or_else(|| opts.id.clone());
    let address = opts.socket_address(&grouping);
    let write_address = |a: &str| {
        std::fs::write(bundle.join("address"), a)
            .map_err(|e| format!("writing {}: {e}", bundle.join("address").display()))
    };
    if socket_works(&address) {
        // The pod's shim already runs: this container joins it.
        write_address(&address)?;
        return Ok(address);
    }
    let path = PathBuf::from(strip_unix(&address));
    if path.exists() {
        let _ = std::fs::remove_file(&path);
    }
    let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.current_dir(bundle)
        .args([
            "-namespace",
            &opts.namespace,
            "-id",
            &opts.id,
            "-address",
            &opts.address,
        ])
        .args(["-socket", &address])
        .env(CALLER_ENV, format!("{daemon:?} (reply {reply:?})"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if opts.debug {
        cmd.arg("-debug");
    }
    if !opts.ttrpc_address.is_empty() {
        // containerd 2.3 hands it over in the bootstrap params.
        cmd.env("TTRPC_ADDRESS", &opts.ttrpc_address);
    }
    if let Some(p) = opts
        .extensions
        .iter()
        .find_map(service::options::config_path)
    {
        cmd.env(crate::config::CONFIG_ENV, p);
    }
    {
        use std::os::unix::process::CommandExt;
        // Its own process group: signals aimed at containerd's group do not
        // reach the sandbox.
        cmd.process_group(0);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("spawning the shim server: {e}"))?;
    // The server closes its stdout once it listens.
    let mut out = child.stdout.take().ok_or("no stdout pipe")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink);
        let _ = tx.send(());
    });
    if rx.recv_timeout(Duration::from_secs(30)).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        return Err("the shim server did not start listening within 30s".into());
    }
    if let Ok(Some(status)) = child.try_wait() {
        // Another start for the same pod may have won the socket.
        if socket_works(&address) {
            write_address(&address)?;
            return Ok(address);
        }
        return Err(format!("the shim server exited during startup ({status})"));
    }
    write_address(&address)?;
    Ok(address)
}

/// Redirects stdout to /dev/null: tells `start` the server is up.
fn release_stdout() {
    let done = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .and_then(|null| nix::unistd::dup2_stdout(&null).map_err(std::io::Error::from));
    if let Err(e) = done {
        // `start` then gives up after its deadline and reports it.
        tracing::error!(error = %e, "cannot release stdout to tell `start` the shim listens");
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// The shim server. Everything it creates (state, logs, sockets; also what
/// QEMU and virtiofsd create, as they inherit it) is private: umask 077.
pub fn serve(flags: &Flags) -> i32 {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    if flags.socket.is_empty() {
        eprintln!("containerd-shim-capsule-v2: -socket is required");
        return 2;
    }
    let level = if flags.debug {
        "debug".to_string()
    } else {
        Config::load(None)
            .map(|(c, _)| c.log_level)
            .unwrap_or_else(|_| "info".into())
    };
    let log: Box<dyn Write + Send> = match crate::logging::open_fifo(Path::new("log")) {
        Ok(f) => Box::new(f),
        Err(_) => Box::new(std::io::sink()),
    };
    crate::logging::init(log, &level);
    let path = strip_unix(&flags.socket).to_string();
    if let Some(dir) = Path::new(&path).parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let listener = match std::os::unix::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(socket = %path, error = %e, "cannot listen");
            return 1;
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return 1;
        }
    };
    let code = rt.block_on(serve_async(flags, listener));
    let _ = std::fs::remove_file(&path);
    rt.shutdown_timeout(Duration::from_secs(2));
    code
}

async fn serve_async(flags: &Flags, listener: std::os::unix::net::UnixListener) -> i32 {
    for kind in [
        tokio::signal::unix::SignalKind::terminate(),
        tokio::signal::unix::SignalKind::interrupt(),
    ] {
        if let Ok(mut s) = tokio::signal::unix::signal(kind) {
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    tracing::info!("signal received; the shim exits on Shutdown");
                }
            });
        }
    }
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").unwrap_or_default();
    if ttrpc_address.is_empty() {
        tracing::error!("TTRPC_ADDRESS is not set: events cannot reach containerd");
        return 1;
    }
    let exit = Arc::new(ExitSignal::default());
    let svc = TaskService::new(
        &flags.namespace,
        &flags.socket,
        Arc::new(RemoteSink::new(&ttrpc_address, flags.namespace.clone())),
        Arc::new(QemuFactory),
        ConfigSource::Load,
        exit.clone(),
    );
    let mut services = containerd_shim_protos::shim_async::create_task(Arc::new(svc.clone()));
    if let Some(v3) = services.remove(TASK_V3) {
        services.insert(TASK_V2.to_string(), v3);
    }
    services.extend(containerd_shim_protos::shim_async::create_task(Arc::new(
        svc.clone(),
    )));
    // The Sandbox API (containerd 2.x, `sandboxer = "shim"`), on the task
    // service's state.
    services.extend(containerd_shim_protos::sandbox_async::create_sandbox(
        Arc::new(svc.sandbox_service()),
    ));
    services.extend(crate::admin::service(svc.clone()));
    let listener = match ttrpc::r#async::transport::Listener::try_from(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot use the socket");
            return 1;
        }
    };
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(listener)
        .register_service(services);
    if let Err(e) = server.start().await {
        tracing::error!(error = %e, "cannot start the ttrpc server");
        return 1;
    }
    release_stdout();
    let caller = std::env::var(CALLER_ENV).unwrap_or_default();
    tracing::info!(id = %flags.id, socket = %flags.socket, pid = std::process::id(), %caller, "shim serving");
    exit.wait().await;
    tracing::info!("shim exiting");
    let _ = server.shutdown().await;
    0
}

/// `delete`: cleanup after container `-id` (bundle `-bundle` or the working
/// directory), then a DeleteResponse (exit 128+9, now) on stdout.
pub fn delete(flags: &Flags) -> i32 {
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))
    } else {
        PathBuf::from(&flags.bundle)
    };
    let report = match runtime() {
        Ok(rt) => rt.block_on(cleanup::delete_container(
            &bundle,
            &flags.id,
            &RealProcesses,
            KillTiming::default(),
        )),
        Err(e) => {
            eprintln!("capsule: delete: cannot start the runtime: {e}");
            return 1;
        }
    };
    for e in &report.errors {
        // containerd logs delete's stderr as cleanup warnings.
        eprintln!("capsule: delete {}: {e}", flags.id);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let resp = containerd_shim::DeleteResponse {
        pid: 0,
        exit_status: 128 + 9,
        exited_at: MessageField::some(Timestamp {
            seconds: now.as_secs() as i64,
            nanos: now.subsec_nanos() as i32,
            ..Default::default()
        }),
        ..Default::default()
    };
    match resp.write_to_bytes() {
        Ok(b) => {
            let mut out = std::io::stdout();
            let _ = out.write_all(&b);
            let _ = out.flush();
            0
        }
        Err(e) => {
            eprintln!("capsule: delete: encoding the response: {e}");
            1
        }
    }
}
