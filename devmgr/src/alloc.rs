//! Address allocators: one [`IndexAllocator`] per address space (block
//! indexes, nvdimm indexes, PCI slots), and the virtio drive-name function.
//!
//! An allocator hands out the lowest free integer of a half-open range in
//! O(log n): everything below a high-water mark is either held or in a
//! `BTreeSet` of freed indexes, and freeing the top index lowers the mark.
//! Freeing an index that is not held is an error, so nothing is ever freed
//! twice. The state is fully described by the set of held indexes, which is
//! what the state file stores.
use std::collections::BTreeSet;
use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Block indexes: `0..=65535`, exactly the indexes [`crate::device::ScsiAddr::from_index`]
/// maps to an `id:lun` (`index / 256 : index % 256`).
pub const BLOCK_INDEXES: Range<u32> = 0..65536;

/// Largest range [`IndexAllocator::with_held`] accepts (the block space):
/// rebuilding an allocator costs O(range), so a state file cannot make it
/// allocate gigabytes.
pub const MAX_SPACE_LEN: u32 = 65536;

/// The address space an allocator serves; named in every error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Space {
    /// Block device index (drive name, SCSI address).
    Block,
    /// nvdimm index (`/dev/pmemN`).
    Pmem,
    /// PCI slot (root port on q35, bus slot on pc).
    PciSlot,
}

impl Space {
    pub fn name(self) -> &'static str {
        match self {
            Space::Block => "block index",
            Space::Pmem => "pmem index",
            Space::PciSlot => "PCI slot",
        }
    }
}

impl fmt::Display for Space {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("{space} space exhausted: all {capacity} of {start}..{end} are in use")]
    Exhausted {
        space: Space,
        capacity: u32,
        start: u32,
        end: u32,
    },
    #[error("{space} {index} is not allocated (double free or foreign index)")]
    NotHeld { space: Space, index: u32 },
    #[error("{space} {index} is already allocated")]
    AlreadyHeld { space: Space, index: u32 },
    #[error("{space} range {start}..{end} is larger than {MAX_SPACE_LEN}")]
    TooLarge { space: Space, start: u32, end: u32 },
    #[error("{space} {index} is outside {start}..{end}")]
    OutOfRange {
        space: Space,
        index: u32,
        start: u32,
        end: u32,
    },
}

/// Lowest-free-first allocator of the integers in `range`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "AllocatorRepr", try_from = "AllocatorRepr")]
pub struct IndexAllocator {
    space: Space,
    range: Range<u32>,
    /// Every index in `range.start..next` is held unless it is in `free`;
    /// `next - 1` is always held (or `next == range.start`).
    next: u32,
    free: BTreeSet<u32>,
}

impl IndexAllocator {
    /// An empty allocator over `range` (half-open; may be empty).
    pub fn new(space: Space, range: Range<u32>) -> Self {
        let next = range.start;
        Self {
            space,
            range,
            next,
            free: BTreeSet::new(),
        }
    }

    /// An allocator holding exactly `held`. Fails on an index outside the
    /// range, a duplicate, or a range longer than [`MAX_SPACE_LEN`].
    pub fn with_held(
        space: Space,
        range: Range<u32>,
        held: impl IntoIterator<Item = u32>,
    ) -> Result<Self, AllocError> {
        if range.end.saturating_sub(range.start) > MAX_SPACE_LEN {
            let Range { start, end } = range;
            return Err(AllocError::TooLarge { space, start, end });
        }
        let mut set = BTreeSet::new();
        for index in held {
            if !range.contains(&index) {
                return Err(AllocError::OutOfRange {
                    space,
                    index,
                    start: range.start,
                    end: range.end,
                });
            }
            if !set.insert(index) {
                return Err(AllocError::AlreadyHeld { space, index });
            }
        }
        let next = set.last().map_or(range.start, |top| top + 1);
        let free = (range.start..next).filter(|i| !set.contains(i)).collect();
        Ok(Self {
            space,
            range,
            next,
            free,
        })
    }

    pub fn space(&self) -> Space {
        self.space
    }

    pub fn range(&self) -> Range<u32> {
        self.range.clone()
    }

    /// Take the lowest free index.
    pub fn alloc(&mut self) -> Result<u32, AllocError> {
        if let Some(index) = self.free.pop_first() {
            return Ok(index);
        }
        if self.next < self.range.end {
            self.next += 1;
            return Ok(self.next - 1);
        }
        Err(AllocError::Exhausted {
            space: self.space,
            capacity: self.range.end.saturating_sub(self.range.start),
            start: self.range.start,
            end: self.range.end,
        })
    }

    /// Take `n` indexes, all or nothing.
    pub fn alloc_many(&mut self, n: usize) -> Result<Vec<u32>, AllocError> {
        let mut got = Vec::with_capacity(n);
        for _ in 0..n {
            match self.alloc() {
                Ok(index) => got.push(index),
                Err(e) => {
                    for index in got {
                        // Just allocated here: cannot fail.
                        let _ = self.free(index);
                    }
                    return Err(e);
                }
            }
        }
        Ok(got)
    }

    /// Give `index` back. Errors (and changes nothing) when it is not held.
    pub fn free(&mut self, index: u32) -> Result<(), AllocError> {
        if !self.contains(index) {
            return Err(AllocError::NotHeld {
                space: self.space,
                index,
            });
        }
        self.free.insert(index);
        // Lower the high-water mark over freed indexes at the top so `free`
        // only holds holes below the highest held index.
        while self.next > self.range.start && self.free.remove(&(self.next - 1)) {
            self.next -= 1;
        }
        Ok(())
    }

    /// Take the specific `index` (undoing a [`free`](Self::free)). Errors,
    /// changing nothing, when it is held or outside the range.
    pub fn reserve(&mut self, index: u32) -> Result<(), AllocError> {
        if !self.range.contains(&index) {
            let Range { start, end } = self.range;
            return Err(AllocError::OutOfRange {
                space: self.space,
                index,
                start,
                end,
            });
        }
        if self.contains(index) {
            return Err(AllocError::AlreadyHeld {
                space: self.space,
                index,
            });
        }
        if index < self.next {
            self.free.remove(&index);
        } else {
            self.free.extend(self.next..index);
            self.next = index + 1;
        }
        Ok(())
    }

    /// Whether `index` is currently held.
    pub fn contains(&self, index: u32) -> bool {
        index >= self.range.start && index < self.next && !self.free.contains(&index)
    }

    /// Number of held indexes.
    pub fn len(&self) -> usize {
        (self.next - self.range.start) as usize - self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.next == self.range.start
    }

    /// Held indexes in ascending order.
    pub fn held(&self) -> impl Iterator<Item = u32> + '_ {
        (self.range.start..self.next).filter(move |i| !self.free.contains(i))
    }
}

/// On-disk form: `{"space": "block", "start": 0, "end": 65536, "held": [0, 1, 5]}`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllocatorRepr {
    space: Space,
    start: u32,
    end: u32,
    held: Vec<u32>,
}

impl From<IndexAllocator> for AllocatorRepr {
    fn from(a: IndexAllocator) -> Self {
        let held = a.held().collect();
        Self {
            space: a.space,
            start: a.range.start,
            end: a.range.end,
            held,
        }
    }
}

impl TryFrom<AllocatorRepr> for IndexAllocator {
    type Error = String;
    fn try_from(r: AllocatorRepr) -> Result<Self, String> {
        if r.start > r.end {
            return Err(format!(
                "{} allocator range {}..{} is reversed",
                r.space, r.start, r.end
            ));
        }
        if r.held.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!(
                "{} allocator: held indexes are not strictly ascending",
                r.space
            ));
        }
        IndexAllocator::with_held(r.space, r.start..r.end, r.held).map_err(|e| e.to_string())
    }
}

/// The three address spaces of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allocators {
    pub block: IndexAllocator,
    pub pmem: IndexAllocator,
    pub pci: IndexAllocator,
}

impl Allocators {
    pub fn new(pmem: Range<u32>, pci: Range<u32>) -> Self {
        Self {
            block: IndexAllocator::new(Space::Block, BLOCK_INDEXES),
            pmem: IndexAllocator::new(Space::Pmem, pmem),
            pci: IndexAllocator::new(Space::PciSlot, pci),
        }
    }

    pub fn get(&self, space: Space) -> &IndexAllocator {
        match space {
            Space::Block => &self.block,
            Space::Pmem => &self.pmem,
            Space::PciSlot => &self.pci,
        }
    }
}

/// The virtio-blk name of block index `index`: `vd` followed by the index in
/// bijective base 26 (0 → `vda`, 25 → `vdz`, 26 → `vdaa`, 701 → `vdzz`,
/// 702 → `vdaaa`). Informational only: the guest finds disks by address.
pub fn virtio_drive_name(index: u32) -> String {
    let mut letters = Vec::new();
    let mut n = u64::from(index) + 1;
    while n > 0 {
        n -= 1;
        letters.push(b'a' + (n % 26) as u8);
        n /= 26;
    }
    letters.reverse();
    let mut name = String::with_capacity(2 + letters.len());
    name.push_str("vd");
    name.extend(letters.into_iter().map(char::from));
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_lowest_free_first() {
        let mut a = IndexAllocator::new(Space::Block, BLOCK_INDEXES);
        assert_eq!(
            (0..5).map(|_| a.alloc().unwrap()).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        a.free(3).unwrap();
        a.free(1).unwrap();
        assert_eq!(a.alloc().unwrap(), 1);
        assert_eq!(a.alloc().unwrap(), 3);
        assert_eq!(a.alloc().unwrap(), 5);
        assert_eq!(a.len(), 6);
    }

    #[test]
    fn freeing_the_top_lowers_the_mark() {
        let mut a = IndexAllocator::new(Space::Pmem, 0..8);
        for _ in 0..4 {
            a.alloc().unwrap();
        }
        a.free(1).unwrap();
        a.free(3).unwrap();
        a.free(2).unwrap();
        assert_eq!(a.held().collect::<Vec<_>>(), [0]);
        assert_eq!(a.next, 1);
        assert!(a.free.is_empty());
        a.free(0).unwrap();
        assert!(a.is_empty());
        assert_eq!(a, IndexAllocator::new(Space::Pmem, 0..8));
    }

    #[test]
    fn double_free_and_foreign_free_are_errors() {
        let mut a = IndexAllocator::new(Space::Block, BLOCK_INDEXES);
        let i = a.alloc().unwrap();
        a.alloc().unwrap();
        a.free(i).unwrap();
        let before = a.clone();
        assert_eq!(
            a.free(i),
            Err(AllocError::NotHeld {
                space: Space::Block,
                index: i
            })
        );
        assert!(a.free(7).is_err());
        assert!(a.free(u32::MAX).is_err());
        assert_eq!(a, before);
        assert!(a
            .free(i)
            .unwrap_err()
            .to_string()
            .contains("block index 0 is not allocated"));
    }

    #[test]
    fn block_space_holds_65536_indexes_like_scsi_addresses() {
        let mut a = IndexAllocator::new(Space::Block, BLOCK_INDEXES);
        let mut last = 0;
        for _ in 0..65536 {
            last = a.alloc().unwrap();
        }
        assert_eq!(last, 65535);
        assert!(crate::device::ScsiAddr::from_index(last).is_some());
        let e = a.alloc().unwrap_err();
        assert!(matches!(
            e,
            AllocError::Exhausted {
                space: Space::Block,
                capacity: 65536,
                ..
            }
        ));
        assert!(e.to_string().contains("block index space exhausted"), "{e}");
        a.free(65535).unwrap();
        assert_eq!(a.alloc().unwrap(), 65535);
    }

    #[test]
    fn pci_slots_come_from_the_configured_range() {
        let mut a = IndexAllocator::new(Space::PciSlot, 5..8);
        assert_eq!(a.alloc_many(2).unwrap(), [5, 6]);
        // Not enough left for two: nothing is taken.
        let e = a.alloc_many(2).unwrap_err();
        assert!(e.to_string().contains("PCI slot space exhausted"), "{e}");
        assert_eq!(a.held().collect::<Vec<_>>(), [5, 6]);
        a.free(5).unwrap();
        assert_eq!(a.alloc_many(2).unwrap(), [5, 7]);
        assert!(a.free(4).is_err());
        let mut empty = IndexAllocator::new(Space::PciSlot, 3..3);
        assert!(empty.alloc().is_err());
    }

    #[test]
    fn pmem_space_is_separate() {
        let mut a = Allocators::new(0..4, 1..32);
        assert_eq!(a.block.alloc().unwrap(), 0);
        assert_eq!(a.pmem.alloc().unwrap(), 0);
        assert_eq!(a.pci.alloc().unwrap(), 1);
        assert_eq!(a.get(Space::Pmem).len(), 1);
    }

    #[test]
    fn serializes_as_held_set() {
        let mut a = IndexAllocator::new(Space::Block, BLOCK_INDEXES);
        a.alloc_many(4).unwrap();
        a.free(1).unwrap();
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(
            json,
            r#"{"space":"block","start":0,"end":65536,"held":[0,2,3]}"#
        );
        let back: IndexAllocator = serde_json::from_str(&json).unwrap();
        assert_eq!(back, a);
        for bad in [
            r#"{"space":"block","start":0,"end":4,"held":[2,1]}"#,
            r#"{"space":"block","start":0,"end":4,"held":[1,1]}"#,
            r#"{"space":"block","start":0,"end":4,"held":[4]}"#,
            r#"{"space":"block","start":5,"end":4,"held":[]}"#,
            r#"{"space":"block","start":0,"end":4,"held":[],"x":1}"#,
        ] {
            assert!(
                serde_json::from_str::<IndexAllocator>(bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn rebuilding_refuses_huge_ranges() {
        let e = IndexAllocator::with_held(Space::PciSlot, 0..u32::MAX, [u32::MAX - 1]).unwrap_err();
        assert!(matches!(e, AllocError::TooLarge { .. }), "{e}");
        let json = r#"{"space":"pci-slot","start":0,"end":4294967295,"held":[4294967294]}"#;
        assert!(serde_json::from_str::<IndexAllocator>(json).is_err());
        assert!(IndexAllocator::with_held(Space::Block, BLOCK_INDEXES, [65535]).is_ok());
    }

    #[test]
    fn reserve_takes_back_a_freed_index() {
        let mut a = IndexAllocator::new(Space::Block, BLOCK_INDEXES);
        a.alloc_many(3).unwrap();
        let before = a.clone();
        a.free(2).unwrap();
        a.free(0).unwrap();
        a.reserve(2).unwrap();
        a.reserve(0).unwrap();
        assert_eq!(a, before);
        assert!(matches!(a.reserve(1), Err(AllocError::AlreadyHeld { .. })));
        assert!(matches!(
            a.reserve(65536),
            Err(AllocError::OutOfRange { .. })
        ));
        a.reserve(10).unwrap();
        assert_eq!(a.held().collect::<Vec<_>>(), [0, 1, 2, 10]);
        assert_eq!(a.alloc().unwrap(), 3);
    }

    #[test]
    fn drive_names_are_bijective_base26() {
        for (i, name) in [
            (0, "vda"),
            (1, "vdb"),
            (25, "vdz"),
            (26, "vdaa"),
            (27, "vdab"),
            (701, "vdzz"),
            (702, "vdaaa"),
        ] {
            assert_eq!(virtio_drive_name(i), name, "{i}");
        }
        assert_eq!(virtio_drive_name(u32::MAX), "vdmwlqkwv");
        let names: BTreeSet<String> = (0..20000).map(virtio_drive_name).collect();
        assert_eq!(names.len(), 20000);
    }

    proptest::proptest! {
        #[test]
        fn matches_a_model(ops in proptest::collection::vec((proptest::bool::ANY, 0u32..12), 0..200)) {
            let mut a = IndexAllocator::new(Space::PciSlot, 2..10);
            let mut model = BTreeSet::new();
            for (alloc, idx) in ops {
                if alloc {
                    let expect = (2..10).find(|i| !model.contains(i));
                    match (a.alloc(), expect) {
                        (Ok(got), Some(want)) => { proptest::prop_assert_eq!(got, want); model.insert(got); }
                        (Err(_), None) => {}
                        (got, want) => proptest::prop_assert!(false, "{got:?} vs {want:?}"),
                    }
                } else {
                    proptest::prop_assert_eq!(a.free(idx).is_ok(), model.remove(&idx));
                }
                proptest::prop_assert_eq!(a.held().collect::<BTreeSet<_>>(), model.clone());
                let rebuilt = IndexAllocator::with_held(Space::PciSlot, 2..10, model.iter().copied()).unwrap();
                proptest::prop_assert_eq!(&rebuilt, &a);
            }
        }
    }
}
