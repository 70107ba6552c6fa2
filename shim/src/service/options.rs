//! Runtime options containerd passes with a task (CreateTaskRequest.options;
//! at `start` on stdin up to containerd 2.2, in the bootstrap params'
//! extensions from 2.3: see `bootstrap::protocol`).
//!
//! `ctr run --runtime-config-path P` (containerd 1.6 to 2.x alike) sends
//! `runtimeoptions.v1.Options { type_url = 1; config_path = 2; }` for any
//! runtime other than runc; Kata uses it for its configuration.toml, and so
//! does capsule. Other option types (runc's `containerd.runc.v1.Options`)
//! carry no config path and are ignored.
use std::path::PathBuf;

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::{Message, UnknownValueRef};

pub const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";

/// The config path of runtime options, if they carry one.
pub fn config_path(any: &Any) -> Option<PathBuf> {
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    if name != RUNTIME_OPTIONS_TYPE {
        return None;
    }
    // Decode field 2 without a generated type: every field lands in the
    // unknown fields of an empty message.
    let msg = Empty::parse_from_bytes(&any.value).ok()?;
    match msg.special_fields.unknown_fields().get(2)? {
        UnknownValueRef::LengthDelimited(b) => {
            let s = std::str::from_utf8(b).ok()?;
            (!s.is_empty()).then(|| PathBuf::from(s))
        }
        _ => None,
    }
}

/// Encodes runtime options with a config path (tests, and how containerd
/// does it).
pub fn encode(config_path: &str) -> Any {
    let mut m = Empty::new();
    m.special_fields
        .mut_unknown_fields()
        .add_length_delimited(2, config_path.as_bytes().to_vec());
    Any {
        type_url: RUNTIME_OPTIONS_TYPE.into(),
        value: m.write_to_bytes().unwrap_or_default(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_config_path() {
        let any = encode("/etc/capsule/other.toml");
        assert_eq!(config_path(&any), Some("/etc/capsule/other.toml".into()));
        let mut typed = any.clone();
        typed.type_url = format!("type.googleapis.com/{RUNTIME_OPTIONS_TYPE}");
        assert_eq!(config_path(&typed), Some("/etc/capsule/other.toml".into()));
        let mut other = any.clone();
        other.type_url = "containerd.runc.v1.Options".into();
        assert_eq!(config_path(&other), None);
        // An empty config path is no config path.
        assert_eq!(config_path(&encode("")), None);
    }
}
