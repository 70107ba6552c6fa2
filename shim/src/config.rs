//! The capsule configuration file (TOML).
//!
//! Where it comes from, first match wins: the runtime options' config path
//! (`ctr run --runtime-config-path P`), the `CAPSULE_CONFIG` environment
//! variable, `/etc/capsule/configuration.toml`. A missing default file means
//! built-in defaults; a missing explicit file is an error. Unknown keys and
//! bad values are errors naming the key.
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use capsule_devmgr::BlockDriver;
use capsule_hypervisor::config::{AccelMode, MachineType};

use crate::error::{Error, Result};

mod virtiofsd;
pub use virtiofsd::{
    find_virtiofsd, probe_virtiofsd, resolve_virtiofsd, virtiofsd_candidates, virtiofsd_locations,
    Skipped, Virtiofsd, VirtiofsdLookup, NEGATIVE_TIMEOUT_FLAG, VIRTIOFSD_FLAGS, VIRTIOFSD_LIBEXEC,
};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/capsule/configuration.toml";
pub const CONFIG_ENV: &str = "CAPSULE_CONFIG";
pub const DEFAULT_STATE_DIR: &str = "/run/capsule";
pub const DEFAULT_KERNEL: &str = "/usr/local/share/capsule/vmlinux";
pub const DEFAULT_INITRAMFS: &str = "/usr/local/share/capsule/initramfs.img";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Per-sandbox state lives in `<state_dir>/sandboxes/<id>/`.
    pub state_dir: PathBuf,
    /// error, warn, info, debug or trace.
    pub log_level: String,
    /// virtio-scsi (default), virtio-blk or nvdimm (virtio-mmio is refused:
    /// capsule's machine types have no virtio-mmio bus).
    #[serde(with = "block_driver_name")]
    pub block_device_driver: BlockDriver,
    /// Resolve `b 241:N` / `b 242:N` nodes in the vhost-user store.
    pub enable_vhost_user_store: bool,
    pub vhost_user_store_path: PathBuf,
    pub hypervisor: HypervisorSection,
    pub virtiofsd: VirtiofsdSection,
    pub agent: AgentSection,
    pub timeouts: TimeoutsSection,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HypervisorSection {
    /// QEMU binary: a path, or a name looked up in PATH.
    pub path: PathBuf,
    /// pc or q35.
    pub machine: MachineType,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Appended to the kernel command line.
    pub kernel_params: String,
    /// auto (KVM when it really works), kvm or tcg.
    pub accel: AccelMode,
    /// TCG's translation cache, MiB (host memory per sandbox; a smaller
    /// cache retranslates more). Unused under KVM.
    pub tcg_translation_cache_mib: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VirtiofsdSection {
    /// virtiofsd binary: a path, or a name looked up in
    /// `<prefix>/libexec/capsule`, PATH and the usual install locations;
    /// only a virtiofsd capsule can drive is taken (see `config::virtiofsd`).
    pub path: PathBuf,
    /// virtiofsd's own sandbox: namespace, chroot or none.
    pub sandbox: VirtiofsdSandbox,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VirtiofsdSandbox {
    Namespace,
    Chroot,
    None,
}

impl VirtiofsdSandbox {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Namespace => "namespace",
            Self::Chroot => "chroot",
            Self::None => "none",
        }
    }
}

/// How the shim reaches the guest agent. Only virtio-serial exists on the
/// host side: `vsock` is refused when the configuration is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", try_from = "String")]
pub enum AgentTransport {
    VirtioSerial,
    /// The same as virtio-serial.
    Auto,
}

impl TryFrom<String> for AgentTransport {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        match s.as_str() {
            "virtio-serial" => Ok(Self::VirtioSerial),
            "auto" => Ok(Self::Auto),
            "vsock" => Err("\"vsock\" is not supported: the shim's agent client speaks virtio-serial only (and vsock needs /dev/vhost-vsock on the host); use \"virtio-serial\" or \"auto\"".into()),
            other => Err(format!("unknown agent transport {other:?} (expected virtio-serial or auto)")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    /// virtio-serial or auto (= virtio-serial).
    pub transport: AgentTransport,
}

/// Deadlines in seconds (fractions allowed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsSection {
    /// VM boot until the agent answers.
    pub agent_connect: f64,
    /// One agent call (calls that wait for a process have none).
    pub agent_call: f64,
    /// One QMP command.
    pub qmp: f64,
    /// One QMP command of a hotplug (device_add can be slow); the
    /// hypervisor applies a single per-command deadline, the larger of
    /// `qmp` and `hotplug`.
    pub hotplug: f64,
    /// The guest acknowledging an unplug.
    pub unplug: f64,
    /// The guest agent waiting for a hotplugged device to appear.
    pub device_wait: f64,
}

// f64 fields: Eq is fine for configuration comparisons (no NaN passes
// validation).
impl Eq for TimeoutsSection {}

impl Default for Config {
    fn default() -> Self {
        Self {
            state_dir: DEFAULT_STATE_DIR.into(),
            log_level: "info".into(),
            block_device_driver: BlockDriver::VirtioScsi,
            enable_vhost_user_store: false,
            vhost_user_store_path: "/run/capsule/vhost-user".into(),
            hypervisor: HypervisorSection::default(),
            virtiofsd: VirtiofsdSection::default(),
            agent: AgentSection::default(),
            timeouts: TimeoutsSection::default(),
        }
    }
}

impl Default for HypervisorSection {
    fn default() -> Self {
        Self {
            path: "qemu-system-x86_64".into(),
            machine: MachineType::Pc,
            vcpus: 1,
            memory_mib: 256,
            kernel: DEFAULT_KERNEL.into(),
            initramfs: DEFAULT_INITRAMFS.into(),
            kernel_params: String::new(),
            accel: AccelMode::Auto,
            tcg_translation_cache_mib: 16,
        }
    }
}

impl Default for VirtiofsdSection {
    fn default() -> Self {
        Self {
            path: "virtiofsd".into(),
            sandbox: VirtiofsdSandbox::Namespace,
        }
    }
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            transport: AgentTransport::Auto,
        }
    }
}

impl Default for TimeoutsSection {
    fn default() -> Self {
        Self {
            agent_connect: 60.0,
            agent_call: 30.0,
            qmp: 10.0,
            hotplug: 20.0,
            unplug: 5.0,
            device_wait: 20.0,
        }
    }
}

impl TimeoutsSection {
    fn dur(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }
    pub fn agent_connect(&self) -> Duration {
        Self::dur(self.agent_connect)
    }
    pub fn agent_call(&self) -> Duration {
        Self::dur(self.agent_call)
    }
    pub fn qmp(&self) -> Duration {
        Self::dur(self.qmp)
    }
    pub fn hotplug(&self) -> Duration {
        Self::dur(self.hotplug)
    }
    pub fn unplug(&self) -> Duration {
        Self::dur(self.unplug)
    }
    pub fn device_wait(&self) -> Duration {
        Self::dur(self.device_wait)
    }
}

mod block_driver_name {
    use capsule_devmgr::BlockDriver;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &BlockDriver, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(super::block_driver_str(*d))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BlockDriver, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

pub fn block_driver_str(d: BlockDriver) -> &'static str {
    match d {
        BlockDriver::VirtioScsi => "virtio-scsi",
        BlockDriver::VirtioBlk => "virtio-blk",
        BlockDriver::Nvdimm => "nvdimm",
    }
}

/// Where a configuration was read from (for messages and the bundle record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    /// The default path does not exist: built-in defaults.
    Defaults,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Defaults => write!(
                f,
                "built-in defaults ({DEFAULT_CONFIG_PATH} does not exist)"
            ),
        }
    }
}

impl Config {
    /// Parses and validates TOML text. Errors name the key.
    pub fn parse(text: &str) -> Result<Self> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let key = key_at(text, e.span());
            let msg = e.message().trim().to_string();
            match key {
                Some(k) if !msg.contains(&format!("`{k}`")) => {
                    Error::invalid(format!("key `{k}`: {msg}"))
                }
                _ => Error::invalid(msg),
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads `path` (must exist).
    pub fn load_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| crate::error::io(format!("capsule config {}", path.display()), e))?;
        Self::parse(&text).map_err(|e| e.context(format!("capsule config {}", path.display())))
    }

    /// Loads the configuration: `explicit` (runtime options), then
    /// `$CAPSULE_CONFIG`, then the default path (built-in defaults when it
    /// does not exist).
    pub fn load(explicit: Option<&Path>) -> Result<(Self, Source)> {
        let env = std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty());
        Self::load_from(
            explicit,
            env.as_deref().map(Path::new),
            Path::new(DEFAULT_CONFIG_PATH),
        )
    }

    pub fn load_from(
        explicit: Option<&Path>,
        env: Option<&Path>,
        default: &Path,
    ) -> Result<(Self, Source)> {
        if let Some(p) = explicit.or(env) {
            return Ok((Self::load_file(p)?, Source::File(p.to_path_buf())));
        }
        if default.exists() {
            return Ok((
                Self::load_file(default)?,
                Source::File(default.to_path_buf()),
            ));
        }
        Ok((Self::default(), Source::Defaults))
    }

    /// Value checks serde cannot do. Messages name the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: String| Err(Error::invalid(format!("key `{key}`: {why}")));
        if !self.state_dir.is_absolute() {
            return bad(
                "state_dir",
                format!("{} is not an absolute path", self.state_dir.display()),
            );
        }
        if !matches!(
            self.log_level.as_str(),
            "error" | "warn" | "info" | "debug" | "trace"
        ) {
            return bad(
                "log_level",
                format!(
                    "{:?} is not one of error, warn, info, debug, trace",
                    self.log_level
                ),
            );
        }
        if self.enable_vhost_user_store && !self.vhost_user_store_path.is_absolute() {
            return bad(
                "vhost_user_store_path",
                format!(
                    "{} is not an absolute path",
                    self.vhost_user_store_path.display()
                ),
            );
        }
        let h = &self.hypervisor;
        if h.vcpus == 0 || h.vcpus > 255 {
            return bad(
                "hypervisor.vcpus",
                format!("{} is outside 1..=255", h.vcpus),
            );
        }
        if h.memory_mib < 64 {
            return bad(
                "hypervisor.memory_mib",
                format!("{} is below 64", h.memory_mib),
            );
        }
        if !(4..=2048).contains(&h.tcg_translation_cache_mib) {
            return bad(
                "hypervisor.tcg_translation_cache_mib",
                format!("{} is outside 4..=2048", h.tcg_translation_cache_mib),
            );
        }
        for (key, p) in [
            ("hypervisor.kernel", &h.kernel),
            ("hypervisor.initramfs", &h.initramfs),
        ] {
            if !p.is_absolute() {
                return bad(key, format!("{} is not an absolute path", p.display()));
            }
        }
        if h.path.as_os_str().is_empty() {
            return bad("hypervisor.path", "is empty".into());
        }
        if self.virtiofsd.path.as_os_str().is_empty() {
            return bad("virtiofsd.path", "is empty".into());
        }
        let t = &self.timeouts;
        for (key, v) in [
            ("timeouts.agent_connect", t.agent_connect),
            ("timeouts.agent_call", t.agent_call),
            ("timeouts.qmp", t.qmp),
            ("timeouts.hotplug", t.hotplug),
            ("timeouts.unplug", t.unplug),
            ("timeouts.device_wait", t.device_wait),
        ] {
            if !v.is_finite() || v <= 0.0 || v > 3600.0 {
                return bad(key, format!("{v} seconds is outside (0, 3600]"));
            }
        }
        Ok(())
    }

    /// `<state_dir>/sandboxes`.
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.state_dir.join("sandboxes")
    }

    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.sandboxes_dir().join(id)
    }

    /// The config as TOML (the shipped default file is this for defaults).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

/// The dotted key whose value or name covers `span` in `text`, if any.
fn key_at(text: &str, span: Option<std::ops::Range<usize>>) -> Option<String> {
    let span = span?;
    let mut table = String::new();
    let mut offset = 0usize;
    for line in text.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let trimmed = line.trim();
        if trimmed.starts_with('[') && !trimmed.starts_with("[[") {
            if let Some(end) = trimmed.find(']') {
                table = trimmed[1..end].trim().to_string();
            }
            if (start..offset).contains(&span.start) {
                return Some(table.clone());
            }
            continue;
        }
        if (start..offset).contains(&span.start) {
            let key = trimmed.split('=').next()?.trim().trim_matches('"');
            if key.is_empty() || trimmed.starts_with('#') {
                return None;
            }
            return Some(if table.is_empty() {
                key.to_string()
            } else {
                format!("{table}.{key}")
            });
        }
    }
    None
}

/// Finds a binary: a path with a `/` is taken as is; a bare name is looked
/// up in PATH, then in `extra` directories.
pub fn find_binary(bin: &Path, extra: &[PathBuf]) -> Option<PathBuf> {
    if bin.components().count() > 1 || bin.is_absolute() {
        return bin.is_file().then(|| bin.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().cloned())
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_validate() {
        let c = Config::default();
        c.validate().unwrap();
        let text = c.to_toml();
        assert_eq!(Config::parse(&text).unwrap(), c);
        assert_eq!(Config::parse("").unwrap(), c);
        assert_eq!(
            c.sandbox_dir("x"),
            PathBuf::from("/run/capsule/sandboxes/x")
        );
    }

    #[test]
    fn shipped_default_file_is_the_defaults() {
        let text = include_str!("../configuration.toml");
        assert_eq!(Config::parse(text).unwrap(), Config::default());
    }

    #[test]
    fn full_file_parses() {
        let c = Config::parse(
            r#"
state_dir = "/tmp/st"
log_level = "debug"
block_device_driver = "virtio-blk"
enable_vhost_user_store = true
vhost_user_store_path = "/tmp/store"
[hypervisor]
path = "/usr/bin/qemu-system-x86_64"
machine = "q35"
vcpus = 2
memory_mib = 512
kernel = "/k"
initramfs = "/i"
kernel_params = "quiet"
accel = "tcg"
tcg_translation_cache_mib = 64
[virtiofsd]
path = "/usr/libexec/virtiofsd"
sandbox = "none"
[agent]
transport = "virtio-serial"
[timeouts]
agent_connect = 90
agent_call = 5.5
qmp = 3
hotplug = 4
unplug = 2
device_wait = 7
"#,
        )
        .unwrap();
        assert_eq!(c.block_device_driver, BlockDriver::VirtioBlk);
        assert_eq!(c.hypervisor.machine, MachineType::Q35);
        assert_eq!(c.hypervisor.accel, AccelMode::Tcg);
        assert_eq!(c.hypervisor.tcg_translation_cache_mib, 64);
        assert_eq!(c.agent.transport, AgentTransport::VirtioSerial);
        assert_eq!(c.virtiofsd.sandbox, VirtiofsdSandbox::None);
        assert_eq!(c.timeouts.agent_call(), Duration::from_millis(5500));
    }

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = err("bogus = 1\n");
        assert!(e.contains("bogus"), "{e}");
        let e = err("[hypervisor]\nvcpu = 2\n");
        assert!(e.contains("vcpu"), "{e}");
        let e = err("[nope]\nx = 1\n");
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn the_translation_cache_reaches_the_qemu_command_line() {
        let c = Config::parse("[hypervisor]\ntcg_translation_cache_mib = 48\n").unwrap();
        let paths = crate::state::SandboxPaths::new(&c.state_dir, "s1");
        let vm = crate::sandbox::qemu::vm_config(&c, &paths).unwrap();
        assert_eq!(vm.tcg_tb_size_mib, 48);
        for bad in ["0", "3", "2049"] {
            let e = err(&format!(
                "[hypervisor]\ntcg_translation_cache_mib = {bad}\n"
            ));
            assert!(
                e.contains("hypervisor.tcg_translation_cache_mib") && e.contains("4..=2048"),
                "{e}"
            );
        }
    }

    #[test]
    fn bad_values_are_named() {
        let e = err("[hypervisor]\nvcpus = \"two\"\n");
        assert!(e.contains("hypervisor.vcpus"), "{e}");
        let e = err("block_device_driver = \"virtio-floppy\"\n");
        assert!(
            e.contains("block_device_driver") && e.contains("virtio-floppy"),
            "{e}"
        );
        let e = err("[hypervisor]\nmachine = \"isapc\"\n");
        assert!(e.contains("hypervisor.machine"), "{e}");
        let e = err("[hypervisor]\nvcpus = 0\n");
        assert!(e.contains("hypervisor.vcpus"), "{e}");
        let e = err("[timeouts]\nqmp = -1\n");
        assert!(e.contains("timeouts.qmp"), "{e}");
        let e = err("log_level = \"loud\"\n");
        assert!(e.contains("log_level"), "{e}");
        let e = err("state_dir = \"relative\"\n");
        assert!(e.contains("state_dir"), "{e}");
        let e = err("[agent]\ntransport = \"carrier-pigeon\"\n");
        assert!(e.contains("agent.transport"), "{e}");
    }

    /// Every value the shipped configuration documents is accepted, and
    /// the ones capsule cannot honour are refused at load, saying why.
    #[test]
    fn every_documented_value_loads_or_is_refused_with_a_reason() {
        let ok = [
            "block_device_driver = \"virtio-scsi\"",
            "block_device_driver = \"virtio-blk\"",
            "block_device_driver = \"nvdimm\"",
            "[hypervisor]\nmachine = \"pc\"",
            "[hypervisor]\nmachine = \"q35\"",
            "[hypervisor]\naccel = \"auto\"",
            "[hypervisor]\naccel = \"kvm\"",
            "[hypervisor]\naccel = \"tcg\"",
            "[virtiofsd]\nsandbox = \"namespace\"",
            "[virtiofsd]\nsandbox = \"chroot\"",
            "[virtiofsd]\nsandbox = \"none\"",
            "[agent]\ntransport = \"virtio-serial\"",
            "[agent]\ntransport = \"auto\"",
            "log_level = \"error\"",
            "log_level = \"warn\"",
            "log_level = \"info\"",
            "log_level = \"debug\"",
            "log_level = \"trace\"",
        ];
        for text in ok {
            Config::parse(&format!("{text}\n")).unwrap_or_else(|e| panic!("{text}: {e}"));
        }
        let e = err("block_device_driver = \"virtio-mmio\"\n");
        assert!(
            e.contains("block_device_driver") && e.contains("virtio-mmio bus"),
            "{e}"
        );
        let e = err("[agent]\ntransport = \"vsock\"\n");
        assert!(
            e.contains("agent.transport") && e.contains("virtio-serial only"),
            "{e}"
        );
    }

    #[test]
    fn load_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.toml");
        let b = dir.path().join("b.toml");
        std::fs::write(&a, "log_level = \"warn\"\n").unwrap();
        std::fs::write(&b, "log_level = \"debug\"\n").unwrap();
        let missing = dir.path().join("missing.toml");
        let (c, s) = Config::load_from(Some(&a), Some(&b), &missing).unwrap();
        assert_eq!((c.log_level.as_str(), s), ("warn", Source::File(a.clone())));
        let (c, _) = Config::load_from(None, Some(&b), &a).unwrap();
        assert_eq!(c.log_level, "debug");
        let (c, _) = Config::load_from(None, None, &a).unwrap();
        assert_eq!(c.log_level, "warn");
        let (c, s) = Config::load_from(None, None, &missing).unwrap();
        assert_eq!((c, s), (Config::default(), Source::Defaults));
        let e = Config::load_from(Some(&missing), None, &a).unwrap_err();
        assert!(e.to_string().contains("missing.toml"), "{e}");
    }
}
