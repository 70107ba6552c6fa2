//! `<shim> -info`: containerd 2.x runs it (with the runtime options, if
//! any, on stdin) to learn about the runtime, and 2.3 at every task create;
//! it expects a `containerd.types.RuntimeInfo` protobuf on stdout
//! (api/types/introspection.proto: name = 1, version = 2, options = 3,
//! features = 4, annotations = 5), as containerd-shim-runc-v2 prints.
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::types::introspection::{RuntimeInfo, RuntimeVersion};

use super::RUNTIME_ID;
use crate::service::options::{config_path, RUNTIME_OPTIONS_TYPE};

/// The type URL containerd gives the OCI runtime features (what
/// containerd-shim-runc-v2 2.1.9 prints); the value is their JSON.
pub const FEATURES_TYPE: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// The OCI runtime features capsule vouches for: the spec versions it reads
/// (oci-spec's). Nothing else is claimed: CRI derives recursive read-only
/// mounts ("rro" in `mountOptions`) and user namespaces (`linux`) from this
/// document, and capsule's guest implements neither, so they stay absent,
/// exactly as when no features are reported.
pub fn features_json() -> String {
    serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": oci_spec::runtime::VERSION,
    })
    .to_string()
}

/// The runtime info for `stdin` (the runtime options, or nothing).
///
/// `options` echoes the options when they are capsule's own type
/// (`runtimeoptions.v1.Options`, carrying a configuration path), as runc's
/// shim echoes its options; other bytes are not capsule's and are left out.
pub fn runtime_info(stdin: &[u8]) -> RuntimeInfo {
    let options = Any::parse_from_bytes(stdin)
        .ok()
        .filter(|a| a.type_url.rsplit('/').next() == Some(RUNTIME_OPTIONS_TYPE))
        .filter(|a| a.value.is_empty() || config_path(a).is_some());
    RuntimeInfo {
        name: RUNTIME_ID.to_string(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        }),
        options: options.into(),
        features: MessageField::some(Any {
            type_url: FEATURES_TYPE.to_string(),
            value: features_json().into_bytes(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A length-delimited field, encoded by hand.
    fn ld(field: u8, bytes: &[u8]) -> Vec<u8> {
        let mut v = vec![(field << 3) | 2];
        let mut n = bytes.len();
        while n >= 0x80 {
            v.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        v.push(n as u8);
        v.extend_from_slice(bytes);
        v
    }

    #[test]
    fn encodes_as_introspection_proto_says() {
        let options = b"\x0a\x19runtimeoptions.v1.Options\x12\x0d\x12\x0b/etc/c.toml";
        let bytes = runtime_info(options).write_to_bytes().unwrap();
        let mut want = ld(1, b"io.containerd.capsule.v2");
        want.extend(ld(2, &ld(1, env!("CARGO_PKG_VERSION").as_bytes())));
        want.extend(ld(3, options));
        let mut features = ld(1, FEATURES_TYPE.as_bytes());
        features.extend(ld(2, features_json().as_bytes()));
        want.extend(ld(4, &features));
        assert_eq!(bytes, want);
        let back = RuntimeInfo::parse_from_bytes(&bytes).unwrap();
        assert_eq!(back.name, RUNTIME_ID);
        assert_eq!(back.options.type_url, RUNTIME_OPTIONS_TYPE);
        let f: serde_json::Value = serde_json::from_slice(&back.features.value).unwrap();
        assert_eq!(f["ociVersionMin"], "1.0.0");
    }

    #[test]
    fn foreign_or_missing_options_are_left_out() {
        for stdin in [
            &b""[..],
            b"\x0a\x1acontainerd.runc.v1.Options\x12\x00",
            b"\xff garbage",
        ] {
            let info = runtime_info(stdin);
            assert!(info.options.is_none(), "{stdin:?}: {info:?}");
            assert_eq!(info.name, RUNTIME_ID);
        }
    }
}
