//! Guest addresses exchanged between host and guest.
//!
//! A device is identified in the guest by where it sits, never by the name the
//! host predicts for it (`/dev/vdb` depends on probe order). These types are the
//! text forms both sides parse.
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why an address could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("PCI path {input:?}: {reason}")]
    PciPath { input: String, reason: String },
    #[error("SCSI address {input:?}: {reason}")]
    Scsi { input: String, reason: String },
}

/// Highest device (slot) number on a PCI bus.
pub const PCI_MAX_SLOT: u8 = 31;
/// Highest function number of a PCI device.
pub const PCI_MAX_FUNCTION: u8 = 7;

/// One hop of a [`PciPath`]: a slot on a bus, with its function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciSlot {
    pub slot: u8,
    pub function: u8,
}

impl PciSlot {
    pub fn new(slot: u8, function: u8) -> Option<Self> {
        (slot <= PCI_MAX_SLOT && function <= PCI_MAX_FUNCTION).then_some(Self { slot, function })
    }
}

impl fmt::Display for PciSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.function == 0 {
            write!(f, "{:02x}", self.slot)
        } else {
            write!(f, "{:02x}.{:x}", self.slot, self.function)
        }
    }
}

/// Path from the root bus to a device through bridges, as text `"02/01"`:
/// slot 0x02 on the root bus is a bridge, and the device is slot 0x01 behind
/// it. A hop with a non-zero function is written `"01.3"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciPath(Vec<PciSlot>);

/// Deepest bridge nesting accepted when parsing.
pub const PCI_MAX_DEPTH: usize = 16;

impl PciPath {
    pub fn new(hops: Vec<PciSlot>) -> Option<Self> {
        (!hops.is_empty() && hops.len() <= PCI_MAX_DEPTH).then_some(Self(hops))
    }
    pub fn hops(&self) -> &[PciSlot] {
        &self.0
    }
    /// The device's own slot: the last hop.
    pub fn last(&self) -> PciSlot {
        // Invariant: a PciPath is never empty (checked by `new` and `from_str`).
        self.0[self.0.len() - 1]
    }
}

impl fmt::Display for PciPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, hop) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("/")?;
            }
            write!(f, "{hop}")?;
        }
        Ok(())
    }
}

fn parse_hex_u8(s: &str, max: u8) -> Option<u8> {
    if s.is_empty() || s.len() > 2 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u8::from_str_radix(s, 16).ok().filter(|v| *v <= max)
}

impl FromStr for PciPath {
    type Err = AddressError;
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| AddressError::PciPath {
            input: input.to_owned(),
            reason,
        };
        if input.is_empty() {
            return Err(err("empty".into()));
        }
        let mut hops = Vec::new();
        for part in input.split('/') {
            if hops.len() == PCI_MAX_DEPTH {
                return Err(err(format!("deeper than {PCI_MAX_DEPTH} hops")));
            }
            let (slot, function) = match part.split_once('.') {
                Some((s, f)) => (s, Some(f)),
                None => (part, None),
            };
            let slot = parse_hex_u8(slot, PCI_MAX_SLOT)
                .ok_or_else(|| err(format!("hop {part:?}: slot must be hex 00..1f")))?;
            let function = match function {
                None => 0,
                Some(f) => parse_hex_u8(f, PCI_MAX_FUNCTION)
                    .ok_or_else(|| err(format!("hop {part:?}: function must be 0..7")))?,
            };
            hops.push(PciSlot { slot, function });
        }
        Ok(Self(hops))
    }
}

impl Serialize for PciPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PciPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Highest SCSI target id / LUN capsule allocates (`index / 256 : index % 256`).
pub const SCSI_MAX_ID: u16 = 255;
pub const SCSI_MAX_LUN: u16 = 255;

/// A disk on capsule's virtio-scsi controller, as text `"id:lun"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScsiAddr {
    pub id: u16,
    pub lun: u16,
}

impl ScsiAddr {
    /// The address of block index `index`: `index / 256 : index % 256`.
    /// `None` above index 65535.
    pub fn from_index(index: u32) -> Option<Self> {
        let index = u16::try_from(index).ok()?;
        Some(Self {
            id: index / 256,
            lun: index % 256,
        })
    }
    pub fn to_index(self) -> u32 {
        u32::from(self.id) * 256 + u32::from(self.lun)
    }
}

impl fmt::Display for ScsiAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.id, self.lun)
    }
}

impl FromStr for ScsiAddr {
    type Err = AddressError;
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| AddressError::Scsi {
            input: input.to_owned(),
            reason: reason.into(),
        };
        let (id, lun) = input
            .split_once(':')
            .ok_or_else(|| err("expected id:lun"))?;
        let num = |s: &str, max: u16, what: &str| -> Result<u16, AddressError> {
            if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err(&format!("{what} must be a decimal number")));
            }
            s.parse::<u16>()
                .ok()
                .filter(|v| *v <= max)
                .ok_or_else(|| err(&format!("{what} above {max}")))
        };
        Ok(Self {
            id: num(id, SCSI_MAX_ID, "id")?,
            lun: num(lun, SCSI_MAX_LUN, "lun")?,
        })
    }
}

impl Serialize for ScsiAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ScsiAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pci_path_parses_and_prints() {
        let p: PciPath = "02/01".parse().unwrap();
        assert_eq!(
            p.hops(),
            &[
                PciSlot {
                    slot: 2,
                    function: 0
                },
                PciSlot {
                    slot: 1,
                    function: 0
                }
            ]
        );
        assert_eq!(p.to_string(), "02/01");
        assert_eq!(p.last().slot, 1);
        let f: PciPath = "1f.7".parse().unwrap();
        assert_eq!(f.to_string(), "1f.7");
    }

    #[test]
    fn pci_path_rejects_bad_input() {
        for bad in [
            "", "/", "02/", "20", "0g", "001", "02.8", "02.", ".1", "+1", "02//01", "é",
        ] {
            let e = bad.parse::<PciPath>().unwrap_err();
            assert!(e.to_string().contains("PCI path"), "{bad}: {e}");
        }
        let deep = vec!["01"; PCI_MAX_DEPTH + 1].join("/");
        assert!(deep.parse::<PciPath>().is_err());
    }

    #[test]
    fn scsi_addr_parses_and_maps_indexes() {
        let a: ScsiAddr = "1:44".parse().unwrap();
        assert_eq!(a, ScsiAddr { id: 1, lun: 44 });
        assert_eq!(a.to_index(), 300);
        assert_eq!(ScsiAddr::from_index(300), Some(a));
        assert_eq!(
            ScsiAddr::from_index(65535),
            Some(ScsiAddr { id: 255, lun: 255 })
        );
        assert_eq!(ScsiAddr::from_index(65536), None);
        for bad in [
            "",
            "1",
            "1:",
            ":1",
            "256:0",
            "0:256",
            "-1:0",
            "1:2:3",
            "99999999:0",
        ] {
            assert!(bad.parse::<ScsiAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn serde_uses_text_forms() {
        let p: PciPath = "02/01".parse().unwrap();
        assert_eq!(serde_json::to_string(&p).unwrap(), "\"02/01\"");
        let back: PciPath = serde_json::from_str("\"02/01\"").unwrap();
        assert_eq!(back, p);
        assert!(serde_json::from_str::<PciPath>("\"zz\"").is_err());
        assert!(serde_json::from_str::<PciPath>("{}").is_err());
    }

    proptest! {
        #[test]
        fn pci_path_round_trips(hops in proptest::collection::vec((0u8..=31, 0u8..=7), 1..=PCI_MAX_DEPTH)) {
            let p = PciPath::new(hops.into_iter().map(|(s, f)| PciSlot::new(s, f).unwrap()).collect()).unwrap();
            prop_assert_eq!(p.to_string().parse::<PciPath>().unwrap(), p);
        }

        #[test]
        fn parsers_never_panic(s in "\\PC*") {
            let _ = s.parse::<PciPath>();
            let _ = s.parse::<ScsiAddr>();
        }

        #[test]
        fn scsi_index_round_trips(i in 0u32..=65535) {
            let a = ScsiAddr::from_index(i).unwrap();
            prop_assert_eq!(a.to_index(), i);
            prop_assert_eq!(a.to_string().parse::<ScsiAddr>().unwrap(), a);
        }
    }
}
