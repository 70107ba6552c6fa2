//! What containerd pipes to `start`, how the shim tells which containerd
//! calls it, and the reply that containerd understands.
//!
//! | containerd | `start` stdin | environment | replies it understands |
//! |---|---|---|---|
//! | 1.6 | runtime options (`Any`), only when configured | `TTRPC_ADDRESS` | the bare address |
//! | 1.7 | same | + `GRPC_ADDRESS`, `NAMESPACE`, `MAX_SHIM_VERSION=2` | JSON `{version ≤ 2, address, protocol}`, bare address |
//! | 2.0–2.2 | same | same | JSON with version ≤ 3, bare address |
//! | 2.3+ | `BootstrapParams`, always (options in `extensions`) | same (deprecated) | `BootstrapResult` protobuf, JSON, bare address |
//!
//! Read from containerd's sources (1.6/1.7 `runtime/v2/shim/util.go`
//! `Command`, 2.0–2.2 `pkg/shim/util.go`, 2.3 `core/runtime/v2/command.go`;
//! `parseStartResponse` in `runtime/v2/shim.go` / `core/runtime/v2/shim.go`)
//! and checked against the real 1.6.20, 1.7.24 and 2.1.9 (the end-to-end
//! tests run on each). 1.7 and 2.0–2.2 pass byte-identical stdin and the same
//! environment, so `start` cannot tell them apart; it does not need to, as
//! both take the JSON reply with version 2.
//!
//! The version: containerd 2.x reads a shim's version 3 as "supports the
//! Sandbox API and streaming I/O" (`supportSandboxAPIVersion = 3` in
//! `core/runtime/v2/shim_manager.go`, containerd PR #11793, in 2.1.9): for a
//! task whose container belongs to a sandbox it then stops running `start`
//! and `delete` and the task `Shutdown`, and creates the task on the
//! sandbox's shim (`containerd.task.v3.Task` on a new connection to the
//! same socket). So the version depends on what the shim is started as
//! ([`Role`]):
//!
//! - a container's task (every daemon, and 2.x's `podsandbox` pods): task
//!   API version 2, never more than the daemon's `MAX_SHIM_VERSION`. A pod's
//!   containers get a `start` each and find the pod's shim by its socket
//!   (grouping by the CRI annotations), then `delete` and `Shutdown`, which
//!   the shim ignores while the pod lives — as with every daemon since 1.6;
//! - a sandbox of containerd 2.x's shim sandbox controller (a runtime with
//!   `sandboxer = "shim"`): version 3. That controller starts the shim in a
//!   bundle under its own state directory, [`SANDBOX_CONTROLLER_DIR`]
//!   (`<state>/io.containerd.sandbox.controller.v1.shim/<ns>/<id>`, with no
//!   `config.json`), which is how `start` knows: no other caller uses that
//!   directory, and containerd 1.7's experimental controller has another
//!   (`…controller.v1.local`). containerd 2.0–2.3 still set
//!   `MAX_SHIM_VERSION=2` for every `start` (`pkg/shim/util.go`,
//!   `core/runtime/v2/command.go`) but take version 3 from any shim
//!   (`parseStartResponse` refuses only versions above 3): the variable is
//!   ignored for this role.
//!
//! The server registers the task service under `containerd.task.v3.Task`
//! too (same messages), so a daemon that connects with v3 is served in both
//! roles.
use containerd_shim::bootstrap::{BootstrapParams, BootstrapResult};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::Message;

/// The task API version capsule announces for a container's task (see the
/// module documentation).
pub const TASK_API_VERSION: i32 = 2;

/// The version announced to containerd 2.x's shim sandbox controller: the
/// shim serves the Sandbox API and the pod's tasks (task API v3).
pub const SANDBOX_API_VERSION: i32 = 3;

/// The state directory of containerd 2.x's shim sandbox controller
/// (`plugins.SandboxControllerPlugin` + `.shim`): its bundles are
/// `<it>/<namespace>/<sandbox id>`.
pub const SANDBOX_CONTROLLER_DIR: &str = "io.containerd.sandbox.controller.v1.shim";

/// What containerd starts the shim for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A container's task (alone, or in a pod).
    Task,
    /// A sandbox of the Sandbox API (`sandboxer = "shim"`, containerd 2.x).
    Sandbox,
}

/// The role of a `start` run in `bundle` (its working directory).
pub fn role_of(bundle: &std::path::Path) -> Role {
    let controller = bundle
        .parent()
        .and_then(|namespace| namespace.parent())
        .and_then(|dir| dir.file_name());
    if controller.is_some_and(|d| d == SANDBOX_CONTROLLER_DIR) {
        Role::Sandbox
    } else {
        Role::Task
    }
}

/// The only protocol capsule serves.
pub const PROTOCOL: &str = "ttrpc";

/// containerd ≥ 1.7 sets it for `start` to the highest reply version it
/// takes (containerd PR #8189); 1.6 does not.
pub const MAX_SHIM_VERSION_ENV: &str = "MAX_SHIM_VERSION";

/// What containerd piped to `start`.
#[derive(Debug, Clone, PartialEq)]
pub enum StartInput {
    /// Nothing: containerd ≤ 2.2 without runtime options.
    Empty,
    /// The runtime options: containerd ≤ 2.2 with options configured.
    RuntimeOptions(Any),
    /// containerd ≥ 2.3.
    Bootstrap(Box<BootstrapParams>),
    /// Bytes that are neither; ignored (`start` must not fail on them).
    Unrecognised,
}

/// Decodes `start`'s stdin; `id` and `namespace` are the `-id` and
/// `-namespace` flags.
///
/// The ambiguity, and how it is resolved: a protobuf `Any` has two fields,
/// `type_url = 1` and `value = 2`; `BootstrapParams` has `instance_id = 1`
/// and `namespace = 2`, both strings. So runtime options (an `Any` whose
/// value is UTF-8) decode as `BootstrapParams { instance_id: <type URL>,
/// namespace: <options bytes> }`, and every `BootstrapParams` decodes as an
/// `Any` (fields 3–9 unknown). The bytes are taken for `BootstrapParams`
/// only when all of these hold:
///
/// 1. they decode as `BootstrapParams` (wire types, UTF-8 strings);
/// 2. `instance_id` and `namespace` equal the `-id` and `-namespace` flags
///    (the check containerd 2.3's own shim library makes, `pkg/shim`);
/// 3. they carry containerd's TTRPC address (field 5), which containerd 2.3
///    always sets and an `Any` cannot carry (it has no field 5);
/// 4. every extension holds an `Any` with a type URL.
///
/// Anything else is read as runtime options. Erring that way is the safe
/// side: the replies for older daemons (JSON, bare address) are understood
/// by 2.3 as well, while a protobuf reply would be taken for an address by
/// every daemon before 2.3.
pub fn decode_start_input(bytes: &[u8], id: &str, namespace: &str) -> StartInput {
    if bytes.is_empty() {
        return StartInput::Empty;
    }
    if let Ok(params) = BootstrapParams::parse_from_bytes(bytes) {
        let extensions_typed = params
            .extensions
            .iter()
            .all(|e| e.value.as_ref().is_some_and(|a| !a.type_url.is_empty()));
        if params.instance_id == id
            && params.namespace == namespace
            && !params.containerd_ttrpc_address.is_empty()
            && extensions_typed
        {
            return StartInput::Bootstrap(Box::new(params));
        }
    }
    match Any::parse_from_bytes(bytes) {
        Ok(any) if !any.type_url.is_empty() => StartInput::RuntimeOptions(any),
        _ => StartInput::Unrecognised,
    }
}

impl StartInput {
    /// The runtime options containerd passed, wherever they came.
    pub fn options(&self) -> Vec<Any> {
        match self {
            StartInput::RuntimeOptions(any) => vec![any.clone()],
            StartInput::Bootstrap(p) => p
                .extensions
                .iter()
                .filter_map(|e| e.value.as_ref().cloned())
                .collect(),
            StartInput::Empty | StartInput::Unrecognised => Vec::new(),
        }
    }
}

/// The calling daemon, as far as `start` can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Daemon {
    /// containerd 1.6 (or older): no `MAX_SHIM_VERSION`.
    Containerd16,
    /// containerd 1.7 or 2.0–2.2 (indistinguishable): `MAX_SHIM_VERSION`.
    Versioned { max_version: i32 },
    /// containerd 2.3+: `BootstrapParams` on stdin.
    Bootstrap { containerd_version: String },
}

/// Which daemon sent `input`, given `$MAX_SHIM_VERSION`.
pub fn daemon(input: &StartInput, max_shim_version: Option<&str>) -> Daemon {
    if let StartInput::Bootstrap(p) = input {
        return Daemon::Bootstrap {
            containerd_version: p.containerd_version.clone(),
        };
    }
    match max_shim_version.map(|v| v.trim().parse::<i32>()) {
        Some(Ok(max_version)) => Daemon::Versioned { max_version },
        // Set but not a number: a daemon newer than 1.6 that the shim does
        // not understand; the bare address is what every daemon reads.
        Some(Err(_)) => Daemon::Versioned { max_version: 0 },
        None => Daemon::Containerd16,
    }
}

/// The form of the reply to `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// The address alone: task v2 over ttrpc for every daemon.
    Bare,
    /// `{"version":N,"address":…,"protocol":"ttrpc"}`.
    Json { version: i32 },
    /// A `BootstrapResult` protobuf.
    BootstrapResult { version: i32 },
}

impl Daemon {
    /// The reply to `start` in `role` (see the module documentation).
    pub fn reply(&self, role: Role) -> Reply {
        match (self, role) {
            (Daemon::Containerd16, _) => Reply::Bare,
            // containerd reads JSON with a version below 2 as a bare address
            // made of the whole JSON text.
            (Daemon::Versioned { max_version }, _) if *max_version < 2 => Reply::Bare,
            (Daemon::Versioned { max_version }, Role::Task) => Reply::Json {
                version: TASK_API_VERSION.min(*max_version),
            },
            (Daemon::Versioned { .. }, Role::Sandbox) => Reply::Json {
                version: SANDBOX_API_VERSION,
            },
            (Daemon::Bootstrap { .. }, Role::Task) => Reply::BootstrapResult {
                version: TASK_API_VERSION,
            },
            (Daemon::Bootstrap { .. }, Role::Sandbox) => Reply::BootstrapResult {
                version: SANDBOX_API_VERSION,
            },
        }
    }
}

/// The bytes `start` writes to stdout.
pub fn encode_reply(reply: Reply, address: &str) -> Result<Vec<u8>, String> {
    match reply {
        Reply::Bare => Ok(address.as_bytes().to_vec()),
        Reply::Json { version } => serde_json::to_vec(&serde_json::json!({
            "version": version,
            "address": address,
            "protocol": PROTOCOL,
        }))
        .map_err(|e| format!("encoding the JSON reply: {e}")),
        Reply::BootstrapResult { version } => BootstrapResult {
            version,
            address: address.to_string(),
            protocol: PROTOCOL.to_string(),
            ..Default::default()
        }
        .write_to_bytes()
        .map_err(|e| format!("encoding the BootstrapResult reply: {e}")),
    }
}

#[cfg(test)]
#[path = "protocol_tests.rs"]
mod tests;
