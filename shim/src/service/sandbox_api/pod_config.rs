//! The pod configuration containerd's CRI plugin sends as
//! `CreateSandboxRequest.options`: a `runtime.v1.PodSandboxConfig`
//! (k8s.io/cri-api `api.proto`), read for what a VM sandbox needs: the
//! hostname, the namespace modes, the annotations and the pod sysctls.
//!
//! The shim speaks rust-protobuf, the CRI types are prost's: rather than
//! generating the whole CRI API, the few fields are read from the wire
//! format (rust-protobuf keeps every field of an unknown message as an
//! unknown field). Field numbers, from api.proto:
//!
//! ```text
//! PodSandboxConfig      hostname = 2, annotations = 7 (map), linux = 8
//! LinuxPodSandboxConfig security_context = 2, sysctls = 3 (map)
//! LinuxSandboxSecurityContext namespace_options = 1
//! NamespaceOption       network = 1, pid = 2, ipc = 3, userns_options = 5
//! UserNamespace         mode = 1
//! NamespaceMode         POD = 0, CONTAINER = 1, NODE = 2, TARGET = 3
//! map entry             key = 1, value = 2
//! ```
use std::collections::BTreeMap;

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::{Message, UnknownFields, UnknownValueRef};

use crate::error::{Error, Result};

/// The type URL containerd gives the pod configuration.
pub const TYPE_URL: &str = "runtime.v1.PodSandboxConfig";

/// A CRI namespace mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NamespaceMode {
    /// The pod's own namespace (the default).
    #[default]
    Pod,
    Container,
    /// The host's.
    Node,
    /// Another container's.
    Target,
    /// A value this shim does not know.
    Other(u64),
}

impl NamespaceMode {
    fn from_wire(v: u64) -> Self {
        match v {
            0 => Self::Pod,
            1 => Self::Container,
            2 => Self::Node,
            3 => Self::Target,
            o => Self::Other(o),
        }
    }
}

/// What capsule reads of a `PodSandboxConfig`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodConfig {
    pub hostname: String,
    pub network: NamespaceMode,
    pub pid: NamespaceMode,
    pub ipc: NamespaceMode,
    /// `userns_options` present with mode POD: a user namespace for the pod.
    pub user_namespace: bool,
    pub annotations: BTreeMap<String, String>,
    pub sysctls: BTreeMap<String, String>,
}

/// Reads `options` (absent: a pod with every default).
pub fn parse(options: Option<&Any>) -> Result<PodConfig> {
    let Some(any) = options else {
        return Ok(PodConfig::default());
    };
    if any.type_url.is_empty() && any.value.is_empty() {
        return Ok(PodConfig::default());
    }
    if any.type_url.rsplit('/').next() != Some(TYPE_URL) {
        return Err(Error::invalid(format!(
            "sandbox options: expected a CRI pod configuration ({TYPE_URL}), got {:?}",
            any.type_url
        )));
    }
    decode(&any.value).map_err(|e| e.context("sandbox options (CRI PodSandboxConfig)"))
}

/// Decodes the wire bytes of a `PodSandboxConfig`.
pub fn decode(bytes: &[u8]) -> Result<PodConfig> {
    let top = fields("PodSandboxConfig", bytes)?;
    let mut c = PodConfig {
        hostname: last_string(&top, 2, "hostname")?.unwrap_or_default(),
        annotations: map(&top, 7, "annotations")?,
        ..Default::default()
    };
    let Some(linux) = last_message(&top, 8, "linux")? else {
        return Ok(c);
    };
    c.sysctls = map(&linux, 3, "linux.sysctls")?;
    let Some(security) = last_message(&linux, 2, "linux.security_context")? else {
        return Ok(c);
    };
    let Some(ns) = last_message(&security, 1, "linux.security_context.namespace_options")? else {
        return Ok(c);
    };
    let mode = |n: u32, what: &str| -> Result<NamespaceMode> {
        Ok(last_varint(&ns, n, what)?
            .map(NamespaceMode::from_wire)
            .unwrap_or_default())
    };
    c.network = mode(1, "namespace_options.network")?;
    c.pid = mode(2, "namespace_options.pid")?;
    c.ipc = mode(3, "namespace_options.ipc")?;
    if let Some(userns) = last_message(&ns, 5, "namespace_options.userns_options")? {
        let m = last_varint(&userns, 1, "userns_options.mode")?.unwrap_or(0);
        c.user_namespace = NamespaceMode::from_wire(m) == NamespaceMode::Pod;
    }
    Ok(c)
}

/// Every field of a message, by number.
fn fields(what: &str, bytes: &[u8]) -> Result<UnknownFields> {
    let mut m = Empty::parse_from_bytes(bytes)
        .map_err(|e| Error::invalid(format!("{what}: not valid protobuf: {e}")))?;
    Ok(std::mem::take(m.special_fields.mut_unknown_fields()))
}

/// The values of field `n`, in wire order.
fn values(f: &UnknownFields, n: u32) -> impl Iterator<Item = UnknownValueRef<'_>> {
    f.iter().filter(move |(num, _)| *num == n).map(|(_, v)| v)
}

/// The last length-delimited value of field `n` (proto3: the last wins).
fn last_bytes<'a>(f: &'a UnknownFields, n: u32, what: &str) -> Result<Option<&'a [u8]>> {
    let mut last = None;
    for v in values(f, n) {
        match v {
            UnknownValueRef::LengthDelimited(b) => last = Some(b),
            other => {
                return Err(Error::invalid(format!(
                    "{what} (field {n}): wire type {:?}, expected length-delimited",
                    other.wire_type()
                )))
            }
        }
    }
    Ok(last)
}

fn last_string(f: &UnknownFields, n: u32, what: &str) -> Result<Option<String>> {
    last_bytes(f, n, what)?
        .map(|b| {
            String::from_utf8(b.to_vec())
                .map_err(|_| Error::invalid(format!("{what} (field {n}): not UTF-8")))
        })
        .transpose()
}

fn last_message(f: &UnknownFields, n: u32, what: &str) -> Result<Option<UnknownFields>> {
    last_bytes(f, n, what)?.map(|b| fields(what, b)).transpose()
}

fn last_varint(f: &UnknownFields, n: u32, what: &str) -> Result<Option<u64>> {
    let mut last = None;
    for v in values(f, n) {
        match v {
            UnknownValueRef::Varint(x) => last = Some(x),
            other => {
                return Err(Error::invalid(format!(
                    "{what} (field {n}): wire type {:?}, expected varint",
                    other.wire_type()
                )))
            }
        }
    }
    Ok(last)
}

/// A `map<string, string>` field: repeated entries `{key = 1, value = 2}`.
fn map(f: &UnknownFields, n: u32, what: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for v in values(f, n) {
        let UnknownValueRef::LengthDelimited(b) = v else {
            return Err(Error::invalid(format!(
                "{what} (field {n}): an entry that is not length-delimited"
            )));
        };
        let entry = fields(what, b)?;
        let key = last_string(&entry, 1, what)?.unwrap_or_default();
        let value = last_string(&entry, 2, what)?.unwrap_or_default();
        out.insert(key, value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::protobuf::CodedOutputStream;

    /// A message built with rust-protobuf's writer, field by field.
    #[derive(Default)]
    struct W(Vec<u8>);
    impl W {
        fn with(mut self, f: impl FnOnce(&mut CodedOutputStream<'_>)) -> Self {
            {
                let mut os = CodedOutputStream::vec(&mut self.0);
                f(&mut os);
                os.flush().unwrap();
            }
            self
        }
        fn string(self, n: u32, s: &str) -> Self {
            self.with(|o| o.write_string(n, s).unwrap())
        }
        fn varint(self, n: u32, v: u64) -> Self {
            self.with(|o| o.write_uint64(n, v).unwrap())
        }
        fn message(self, n: u32, m: W) -> Self {
            self.with(|o| o.write_bytes(n, &m.0).unwrap())
        }
        fn entry(self, n: u32, k: &str, v: &str) -> Self {
            self.message(n, W::default().string(1, k).string(2, v))
        }
    }

    fn any(value: Vec<u8>) -> Any {
        Any {
            type_url: TYPE_URL.into(),
            value,
            ..Default::default()
        }
    }

    #[test]
    fn reads_hostname_modes_annotations_and_sysctls() {
        let ns = W::default().varint(1, 2).varint(2, 1).varint(3, 0);
        let linux = W::default()
            .string(1, "/kubepods/pod1")
            .message(2, W::default().message(1, ns))
            .entry(3, "net.ipv4.ip_forward", "1");
        let pod = W::default()
            .message(1, W::default().string(1, "web").string(3, "default"))
            .string(2, "web-0")
            .string(3, "/var/log/pods/x")
            .entry(6, "app", "web")
            .entry(7, "io.kubernetes.pod.name", "web-0")
            .entry(7, "x", "y")
            .message(8, linux);
        let c = parse(Some(&any(pod.0))).unwrap();
        assert_eq!(c.hostname, "web-0");
        assert_eq!(c.network, NamespaceMode::Node);
        assert_eq!(c.pid, NamespaceMode::Container);
        assert_eq!(c.ipc, NamespaceMode::Pod);
        assert!(!c.user_namespace);
        assert_eq!(c.annotations.len(), 2);
        assert_eq!(c.annotations["x"], "y");
        assert_eq!(c.sysctls["net.ipv4.ip_forward"], "1");
    }

    #[test]
    fn defaults_and_user_namespaces() {
        assert_eq!(parse(None).unwrap(), PodConfig::default());
        assert_eq!(parse(Some(&any(vec![]))).unwrap(), PodConfig::default());
        let userns = W::default().message(5, W::default().varint(1, 0));
        let pod = W::default().message(8, W::default().message(2, W::default().message(1, userns)));
        let c = parse(Some(&any(pod.0))).unwrap();
        assert!(c.user_namespace);
        assert_eq!(c.network, NamespaceMode::Pod);
        // NODE user namespace: the host's, i.e. none of the pod's own.
        let userns = W::default().message(5, W::default().varint(1, 2));
        let pod = W::default().message(8, W::default().message(2, W::default().message(1, userns)));
        assert!(!parse(Some(&any(pod.0))).unwrap().user_namespace);
    }

    #[test]
    fn refuses_other_types_and_bad_wire_data_naming_the_field() {
        let e = parse(Some(&Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: vec![],
            ..Default::default()
        }))
        .unwrap_err();
        assert!(
            e.to_string().contains("expected a CRI pod configuration"),
            "{e}"
        );
        // hostname as a varint.
        let e = parse(Some(&any(W::default().varint(2, 5).0))).unwrap_err();
        assert!(e.to_string().contains("hostname (field 2)"), "{e}");
        // Truncated.
        let e = parse(Some(&any(vec![0x12, 0x05, b'a']))).unwrap_err();
        assert!(e.to_string().contains("not valid protobuf"), "{e}");
        // A hostname that is not UTF-8.
        let e = parse(Some(&any(vec![0x12, 0x01, 0xff]))).unwrap_err();
        assert!(e.to_string().contains("not UTF-8"), "{e}");
    }
}
