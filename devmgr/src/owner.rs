//! Who uses a device: a container, or the runtime itself (the virtio-fs
//! share, a network endpoint). Every reference the manager counts belongs
//! to one owner, so `devices.json` alone says which container uses which
//! device, and a container's devices are released by naming the container.
use std::fmt;

use serde::{Deserialize, Serialize};

/// The owner of one use of a device.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "owner", content = "name", rename_all = "kebab-case")]
pub enum Owner {
    /// A container, by its id. Its uses carry the container's OCI request.
    Container(String),
    /// The runtime, by what the device is for (`virtio-fs share`). Its
    /// uses carry no OCI request.
    Runtime(String),
}

impl Owner {
    pub fn container(id: impl Into<String>) -> Self {
        Owner::Container(id.into())
    }

    pub fn runtime(purpose: impl Into<String>) -> Self {
        Owner::Runtime(purpose.into())
    }

    pub fn is_container(&self) -> bool {
        matches!(self, Owner::Container(_))
    }

    /// The id or purpose.
    pub fn name(&self) -> &str {
        match self {
            Owner::Container(n) | Owner::Runtime(n) => n,
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Container(id) => write!(f, "container {id}"),
            Owner::Runtime(what) => write!(f, "the runtime ({what})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_tagged() {
        let o = Owner::container("c1");
        let j = serde_json::to_string(&o).unwrap();
        assert_eq!(j, r#"{"owner":"container","name":"c1"}"#);
        assert_eq!(serde_json::from_str::<Owner>(&j).unwrap(), o);
        assert_eq!(
            Owner::runtime("virtio-fs share").to_string(),
            "the runtime (virtio-fs share)"
        );
    }
}
