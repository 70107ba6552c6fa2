//! capsule guest agent: PID 1 of the sandbox VM. It mounts the base
//! filesystems, loads modules, reaps orphans, and serves the
//! `capsule.agent.v1.Agent` ttrpc service on the virtio-serial port
//! `agent.channel.0` (and vsock port 1024 when the guest has vsock).
//!
//! Module map: [`init`] (PID 1 duties), [`transport`] (serial sessions,
//! vsock), [`service`] (RPCs) over [`sandbox`] (state) and [`container`]
//! (create/start/exec, with the re-executed child in `container::child`),
//! [`process`] + [`stdio`] + [`reaper`] + [`spawn`] (processes), [`pod`]
//! (the pod's namespaces without a pause container), [`storage`]
//! (virtio-fs and block mounts), [`device`] (in-guest device discovery),
//! [`network`] (virtio-net interfaces, routes, neighbours).
pub mod container;
pub mod device;
pub mod error;
pub mod init;
pub mod network;
pub mod oom;
pub mod page_reporting;
pub mod paths;
pub mod pod;
pub mod process;
pub mod reaper;
pub mod sandbox;
pub mod service;
pub mod signals;
pub mod spawn;
pub mod stdio;
pub mod storage;
pub mod transport;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use capsule_agent_protocol::agent_ttrpc::create_agent;

/// Where the agent serves.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Serve on this ttrpc address (e.g. `unix:///tmp/agent.sock`) instead of
    /// the serial port and vsock (`CAPSULE_AGENT_LISTEN`, for host runs).
    pub listen: Option<String>,
    /// Sysfs and /dev roots (device discovery, port lookup).
    pub sysfs: PathBuf,
    pub dev: PathBuf,
}

/// The agent's main: never returns.
pub fn run_agent() -> ! {
    let init = init::is_init();
    if init {
        init::mount_base();
        init::setup_console();
    }
    let cmdline = init::kernel_cmdline();
    let filter = tracing_subscriber::EnvFilter::try_new(init::log_filter(&cmdline))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
    std::panic::set_hook(Box::new(|info| {
        tracing::error!("panic: {info}");
        init::console(&format!("capsule-agent: panic: {info}"));
    }));
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        pid1 = init,
        "capsule-agent starting"
    );
    if init {
        init::load_modules();
        page_reporting::apply_from_cmdline(&cmdline);
        init::setup_cgroups();
        init::loopback_up();
        // `capsule.bench=`: the benchmarks' bare-QEMU baselines (no serving).
        if let Some(mode) = init::parse_bench_mode(&cmdline) {
            init::run_bench(mode);
        }
    }
    let opts = ServeOptions {
        listen: std::env::var("CAPSULE_AGENT_LISTEN")
            .ok()
            .filter(|s| !s.is_empty()),
        sysfs: PathBuf::from("/sys"),
        dev: PathBuf::from("/dev"),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => init::fatal(&format!("tokio runtime: {e}")),
    };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(serve(opts))));
    match r {
        Ok(Err(e)) => init::fatal(&e),
        Ok(Ok(never)) => match never {},
        Err(_) => init::fatal("the agent's main task panicked"),
    }
}

/// Starts the reaper, the device watcher and the ttrpc servers; runs forever.
pub async fn serve(opts: ServeOptions) -> Result<std::convert::Infallible, String> {
    let reaper = reaper::Reaper::start().map_err(|e| format!("SIGCHLD handler: {e}"))?;
    let watcher = device::DeviceWatcher::start(opts.sysfs.clone(), opts.dev.clone())
        .map_err(|e| e.to_string())?;
    let oom = oom::OomWatcher::start().map_err(|e| e.to_string())?;
    let sandbox = Arc::new(sandbox::Sandbox::new(reaper, watcher, oom));
    let mut servers = Vec::new();
    if let Some(addr) = &opts.listen {
        let service = Arc::new(service::AgentService::new(sandbox, vec![]));
        let mut s = ttrpc::r#async::Server::new()
            .bind(addr)
            .map_err(|e| format!("listen on {addr}: {e}"))?
            .register_service(create_agent(service));
        s.start()
            .await
            .map_err(|e| format!("serve on {addr}: {e}"))?;
        tracing::info!(addr, "serving");
        servers.push(s);
        return forever(servers).await;
    }
    let mut features = Vec::new();
    if Path::new("/dev/vsock").exists() {
        let addr = format!("vsock://-1:{}", transport::VSOCK_PORT);
        match ttrpc::r#async::Server::new().bind(&addr) {
            Ok(s) => {
                // Listening works without a device; advertise vsock only
                // when a virtio vsock device is bound to its driver.
                if vsock_device_present(&opts.sysfs) {
                    features.push("vsock".to_string());
                } else {
                    tracing::info!("vsock listener up, but no virtio vsock device in the guest");
                }
                let service = Arc::new(service::AgentService::new(
                    sandbox.clone(),
                    features.clone(),
                ));
                let mut s = s.register_service(create_agent(service));
                match s.start().await {
                    Ok(()) => {
                        tracing::info!(addr, "serving on vsock");
                        servers.push(s);
                    }
                    Err(e) => tracing::warn!(addr, error = %e, "vsock server did not start"),
                }
            }
            Err(e) => tracing::warn!(addr, error = %e, "vsock listen failed; serial only"),
        }
    } else {
        tracing::info!("no /dev/vsock in the guest: serving on virtio-serial only");
    }
    let service = Arc::new(service::AgentService::new(sandbox, features));
    let path = transport::wait_for_port(
        &opts.sysfs,
        &opts.dev,
        transport::PORT_NAME,
        Duration::from_secs(10),
    )
    .await;
    let port = loop {
        match transport::serial::DevicePort::open(&path) {
            Ok(p) => break p,
            Err(e) => {
                tracing::error!(port = %path.display(), error = %e, "cannot open the agent port; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let mut s = ttrpc::r#async::Server::new()
        .add_listener(transport::serial::listen(port))
        .register_service(create_agent(service));
    s.start()
        .await
        .map_err(|e| format!("serve on {}: {e}", path.display()))?;
    tracing::info!(port = %path.display(), "serving on virtio-serial");
    servers.push(s);
    forever(servers).await
}

fn vsock_device_present(sysfs: &Path) -> bool {
    std::fs::read_dir(sysfs.join("bus/virtio/drivers/vmw_vsock_virtio_transport"))
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("virtio"))
        })
        .unwrap_or(false)
}

async fn forever(servers: Vec<ttrpc::r#async::Server>) -> Result<std::convert::Infallible, String> {
    let _keep = servers;
    std::future::pending().await
}
