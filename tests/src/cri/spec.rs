//! Pod and container configurations as the kubelet would send them, with
//! the defaults the suite's cases start from.
use super::image;
use super::proto::v1::*;

/// Kubernetes' defaults: the pod's own network and IPC, a PID namespace per
/// container.
pub fn namespaces() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// A pod named `name` (uid `uid`), logging into `log_directory`, under
/// `cgroup_parent`.
pub fn pod(name: &str, uid: &str, log_directory: &str, cgroup_parent: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_string(),
            uid: uid.to_string(),
            namespace: "capsule-cri".into(),
            attempt: 0,
        }),
        hostname: name.to_string(),
        log_directory: log_directory.to_string(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.to_string(),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The pod's Linux security context (created when missing).
pub fn pod_security(p: &mut PodSandboxConfig) -> &mut LinuxSandboxSecurityContext {
    p.linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
}

/// A busybox container running `cmd`, logging to `<name>.log`.
pub fn container(name: &str, cmd: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image::BUSYBOX.into(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources::default()),
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(namespaces()),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// A container running `sh -c SCRIPT`.
pub fn shell(name: &str, script: &str) -> ContainerConfig {
    container(name, &["sh", "-c", script])
}

/// The container's Linux security context (created when missing).
pub fn security(c: &mut ContainerConfig) -> &mut LinuxContainerSecurityContext {
    c.linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
}

/// The container's Linux resources (created when missing).
pub fn resources(c: &mut ContainerConfig) -> &mut LinuxContainerResources {
    c.linux
        .get_or_insert_with(Default::default)
        .resources
        .get_or_insert_with(Default::default)
}

/// Sets the PID/IPC/network modes of both the pod and the container (the
/// kubelet sends the same to both).
pub fn set_namespaces(
    p: &mut PodSandboxConfig,
    cs: &mut [&mut ContainerConfig],
    ns: NamespaceOption,
) {
    pod_security(p).namespace_options = Some(ns.clone());
    for c in cs {
        security(c).namespace_options = Some(ns.clone());
    }
}
