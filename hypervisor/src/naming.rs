//! QEMU object names derived from a device manager id. Deterministic, so a
//! restarted runtime finds what an earlier one plugged.

/// Prefix of every device, node, chardev and object capsule creates.
pub const PREFIX: &str = "cap-";

/// The names of one attached device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    id: String,
}

impl Names {
    /// Checks `id` is a valid QEMU id fragment (letters, digits, `-`, `_`,
    /// `.`; starting with a letter; at most 64 bytes).
    pub fn new(id: &str) -> Result<Self, String> {
        let ok = !id.is_empty()
            && id.len() <= 64
            && id.starts_with(|c: char| c.is_ascii_alphabetic())
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if ok {
            Ok(Self { id: id.to_owned() })
        } else {
            Err(format!(
                "device id {id:?} is not usable in QEMU names (letters, digits, '-', '_', '.', starting with a letter, at most 64 bytes)"
            ))
        }
    }
    pub fn id(&self) -> &str {
        &self.id
    }
    /// qdev id of the device (function 0 of a VFIO group).
    pub fn device(&self) -> String {
        format!("{PREFIX}{}", self.id)
    }
    /// qdev id of the `i`th member of a VFIO group.
    pub fn function(&self, i: usize) -> String {
        if i == 0 {
            self.device()
        } else {
            format!("{PREFIX}{}-fn{i}", self.id)
        }
    }
    pub fn node(&self) -> String {
        format!("{PREFIX}{}-node", self.id)
    }
    pub fn chardev(&self) -> String {
        format!("{PREFIX}{}-chr", self.id)
    }
    pub fn object(&self) -> String {
        format!("{PREFIX}{}-mem", self.id)
    }
    /// Name of the fd handed over with `getfd`.
    pub fn fdname(&self) -> String {
        format!("{PREFIX}{}-fd", self.id)
    }
    /// The tap netdev of a network endpoint.
    pub fn netdev(&self) -> String {
        format!("{PREFIX}{}-net", self.id)
    }
    /// Name of tap queue `i`'s fd handed over with `getfd`.
    pub fn queue_fd(&self, i: usize) -> String {
        format!("{PREFIX}{}-q{i}", self.id)
    }
}

/// The device manager id a qdev id belongs to, when capsule made it.
pub fn capsule_id_of_device(qdev_id: &str) -> Option<&str> {
    let rest = qdev_id.strip_prefix(PREFIX)?;
    if let Some((base, n)) = rest.rsplit_once("-fn") {
        if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
            return Some(base);
        }
    }
    (!rest.is_empty()).then_some(rest)
}

/// The device manager id a node, chardev or object name belongs to.
pub fn capsule_id_of_backend(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(PREFIX)?;
    ["-node", "-chr", "-mem", "-net"]
        .iter()
        .find_map(|s| rest.strip_suffix(s))
        .filter(|b| !b.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let n = Names::new("dev7").unwrap();
        assert_eq!(n.device(), "cap-dev7");
        assert_eq!(n.function(2), "cap-dev7-fn2");
        assert_eq!(capsule_id_of_device(&n.function(2)), Some("dev7"));
        assert_eq!(capsule_id_of_device(&n.device()), Some("dev7"));
        assert_eq!(capsule_id_of_backend(&n.node()), Some("dev7"));
        assert_eq!(capsule_id_of_backend(&n.chardev()), Some("dev7"));
        assert_eq!(capsule_id_of_backend(&n.object()), Some("dev7"));
        assert_eq!(capsule_id_of_device("vser0"), None);
        assert_eq!(capsule_id_of_device("cap-"), None);
    }

    #[test]
    fn hostile_ids_are_refused() {
        for bad in [
            "",
            "7dev",
            "a,b",
            "a b",
            "a=b",
            "é",
            &"x".repeat(65),
            "a/b",
            "a\"b",
        ] {
            assert!(Names::new(bad).is_err(), "{bad:?}");
        }
        assert!(Names::new("dev-7_x.1").is_ok());
    }
}
