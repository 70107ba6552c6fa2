//! CRI suite: containerd's CRI plugin driven the way the kubelet drives it
//! (the suite stands in for kubelet/crictl/critest, which no registry here
//! offers), every case run with runc (the control) and then with capsule as
//! the RuntimeClass handler, in one private containerd in a private network
//! namespace (`tests/src/cri`).
//!
//! The test fails when a case fails on runc (the control must pass) or
//! passes on runc and fails on capsule. VM-inherent differences are named
//! in [`EXPECTED_DIFFERENCES`]: on capsule those cases assert that capsule
//! refuses fast, naming the reason.
//!
//! `CAPSULE_CONTAINERD=1.6|1.7|2.1` picks containerd (1.6 by default),
//! `CAPSULE_CRI_SANDBOXER=shim` the Sandbox API for capsule (2.x),
//! `CAPSULE_CRI_CASES=a,b` a subset. The report is printed (run with
//! `--nocapture`) and written to `target/cri/report-<containerd>.md`.
mod cri {
    pub mod devices;
    pub mod host;
    pub mod io;
    pub mod lifecycle;
    pub mod security;
    pub mod util;
}

use std::time::Instant;

use capsule_tests::cri::node::{Node, NodeOptions};
use capsule_tests::cri::report;
use capsule_tests::cri::suite::{self, Case, Runtime, Status};
use cri::{devices, host, io, lifecycle, security};

/// VM-inherent differences: runc does these, capsule refuses them.
pub const EXPECTED_DIFFERENCES: &[(&str, &str)] = &[
    (
        "host_network",
        "a VM cannot share the host's network stack",
    ),
    ("host_ipc", "a VM cannot share the host's IPC namespace"),
    (
        "port_forward",
        "containerd forwards inside the pod's host-side network namespace, where a VM pod's processes are not",
    ),
    (
        "mount_bidirectional",
        "mounts made inside a VM cannot propagate back to the host (rshared)",
    ),
];

/// What capsule answers to those requests (the errors the cases provoke).
const REFUSALS: &[&str] = &[
    "host network is not supported",
    "host IPC is not supported",
    "shared propagation back to the host",
];

fn expected(name: &str) -> Option<&'static str> {
    EXPECTED_DIFFERENCES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, why)| *why)
}

macro_rules! cases {
    ($($(#[$m:ident])? $f:path),* $(,)?) => {
        vec![$({
            let name = stringify!($f).rsplit("::").next().unwrap_or_default().trim();
            Case {
                name,
                needs_2x: cases!(@2x $($m)?),
                expected_difference: expected(name),
                run: $f,
            }
        }),*]
    };
    (@2x needs_2x) => { true };
    (@2x) => { false };
}

fn all_cases() -> Vec<Case> {
    cases![
        lifecycle::pod_lifecycle,
        lifecycle::container_lifecycle,
        lifecycle::stop_sigterm,
        lifecycle::stop_timeout_sigkill,
        io::exec_sync,
        io::exec_sync_timeout,
        io::exec_stream,
        io::attach,
        io::logs,
        io::stats,
        #[needs_2x]
        io::pod_sandbox_stats,
        io::update_resources,
        devices::devices,
        #[needs_2x]
        devices::cdi_device,
        devices::privileged,
        security::run_as_user,
        security::readonly_rootfs,
        security::capabilities,
        security::no_new_privs,
        security::masked_readonly_paths,
        security::sysctls,
        security::seccomp_runtime_default,
        security::seccomp_localhost,
        security::seccomp_unconfined,
        security::pid_namespace_pod,
        security::pid_namespace_container,
        security::ipc_namespace_pod,
        security::host_pid,
        host::host_network,
        host::host_ipc,
        host::port_forward,
        host::mount_propagation,
        host::mount_bidirectional,
        host::oom_killed,
        host::network,
    ]
}

#[test]
fn cri_runc_and_capsule() {
    let started = Instant::now();
    let opts = match NodeOptions::from_env() {
        Ok(o) => o,
        Err(e) => panic!("CRI suite: {e:#}"),
    };
    let version = opts.containerd.version.as_str();
    let header = format!(
        "CRI suite: {} (capsule sandboxer: {})",
        opts.containerd.version_line,
        opts.sandboxer.as_str()
    );
    let cases = all_cases();
    let selected = match suite::selected(&cases) {
        Ok(s) => s,
        Err(e) => panic!("{e:#}"),
    };
    let node = match Node::start(opts) {
        Ok(n) => n,
        Err(e) => panic!("starting the CRI node: {e:#}"),
    };
    eprintln!("{header}");
    let outcomes = suite::run_all(&node, &selected, |o| {
        let r = match &o.status {
            Status::Pass => "pass".to_string(),
            Status::Fail(e) => format!("FAIL: {e}"),
            Status::NotApplicable(w) => format!("n/a: {w}"),
        };
        eprintln!(
            "[{:>7}] {:<26} {:>6.1} s  {r}",
            o.runtime.handler(),
            o.case,
            o.elapsed.as_secs_f64()
        );
    });
    let final_leaks = node.wait_clean(suite::CLEAN_TIMEOUT).err();
    // The refusals the expected differences provoke are the only error
    // lines about capsule a clean run may log.
    let provoked: Vec<String> = REFUSALS.iter().map(|s| s.to_string()).collect();
    let logged_errors = capsule_tests::containerd::error_lines(&node.log(), &provoked);
    drop(node);
    let mut text = format!("# {header}\n\n");
    for rt in [Runtime::Runc, Runtime::Capsule] {
        text.push_str(&format!(
            "## {}\n\n{}\n",
            rt.handler(),
            report::table(&outcomes, rt)
        ));
    }
    let mut problems = report::verdict(&outcomes);
    if let Some(left) = final_leaks {
        problems.push(format!("left at the end: {}", left.join("; ")));
    }
    if !logged_errors.is_empty() {
        problems.push(format!(
            "containerd logged {} error line(s) about capsule:\n{}",
            logged_errors.len(),
            logged_errors.join("\n")
        ));
    }
    text.push_str(&format!(
        "suite run time {:.0} s\n\n",
        started.elapsed().as_secs_f64()
    ));
    if !problems.is_empty() {
        text.push_str("## problems\n\n");
        for p in &problems {
            text.push_str(&format!("- {p}\n"));
        }
    }
    println!("{text}");
    let dir = capsule_tests::target_dir().join("cri");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(format!("report-{version}.md")), &text);
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}
