//! What a VM sandbox cannot share with the host, refused before anything
//! starts (so the error comes at once): the host's network stack (a spec
//! without a network namespace: host networking), the host's IPC namespace
//! (host IPC), and mounts that propagate back to the host (`rshared`). The
//! host's PID namespace is not refused: the pod's PID namespace in the VM
//! stands for it. The Sandbox API (`service::sandbox_api`) refuses a pod's
//! host network and IPC with the same messages.
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::error::{Error, Result};

/// The refusal of host networking; `who` says what asked for it.
pub fn host_network(who: &str) -> Error {
    Error::invalid(format!(
        "host network is not supported: {who}, and a VM sandbox cannot share the host's network stack (run the pod with a network of its own)"
    ))
}

/// The refusal of the host's IPC namespace; `who` says what asked for it.
pub fn host_ipc(who: &str) -> Error {
    Error::invalid(format!(
        "host IPC is not supported: {who}, and a VM sandbox cannot share the host's shared memory, semaphores or message queues"
    ))
}

/// Refuses a spec asking for what only the host can give; names the
/// reason.
pub fn refuse_host_sharing(spec: &Spec) -> Result<()> {
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    let has = |t: LinuxNamespaceType| namespaces.iter().any(|n| n.typ() == t);
    if !has(LinuxNamespaceType::Network) {
        return Err(host_network("the spec shares the host's network namespace"));
    }
    if !has(LinuxNamespaceType::Ipc) {
        return Err(host_ipc("the spec shares the host's IPC namespace"));
    }
    for m in spec.mounts().iter().flatten() {
        let shared = m
            .options()
            .iter()
            .flatten()
            .any(|o| o == "rshared" || o == "shared");
        if shared {
            return Err(Error::invalid(format!(
                "mount {}: shared propagation back to the host (rshared, Kubernetes' Bidirectional) is not supported: mounts made inside a VM cannot reach the host",
                m.destination().display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> Spec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn host_network_ipc_and_rshared_are_refused_with_the_reason() {
        let ns = |types: &[&str]| -> serde_json::Value {
            types
                .iter()
                .map(|t| serde_json::json!({"type": t}))
                .collect()
        };
        let ok = spec(serde_json::json!({"ociVersion": "1.0.2",
            "linux": {"namespaces": ns(&["network", "ipc", "mount"])},
            "mounts": [{"destination": "/data", "type": "bind", "source": "/x", "options": ["rbind", "rslave"]}]}));
        refuse_host_sharing(&ok).unwrap();
        // Host PID: allowed (the pod's PID namespace stands for it).
        let host_pid = spec(serde_json::json!({"ociVersion": "1.0.2",
            "linux": {"namespaces": ns(&["network", "ipc"])}}));
        refuse_host_sharing(&host_pid).unwrap();
        let e = refuse_host_sharing(&spec(serde_json::json!({"ociVersion": "1.0.2",
            "linux": {"namespaces": ns(&["ipc", "pid"])}})))
        .unwrap_err();
        assert!(
            e.to_string().starts_with("host network is not supported"),
            "{e}"
        );
        let e = refuse_host_sharing(&spec(serde_json::json!({"ociVersion": "1.0.2",
            "linux": {"namespaces": ns(&["network", "pid"])}})))
        .unwrap_err();
        assert!(
            e.to_string().starts_with("host IPC is not supported"),
            "{e}"
        );
        let e = refuse_host_sharing(&spec(serde_json::json!({"ociVersion": "1.0.2",
            "linux": {"namespaces": ns(&["network", "ipc"])},
            "mounts": [{"destination": "/shared", "type": "bind", "source": "/x", "options": ["rbind", "rshared"]}]})))
        .unwrap_err();
        assert!(
            e.to_string().contains("mount /shared: shared propagation"),
            "{e}"
        );
    }
}
