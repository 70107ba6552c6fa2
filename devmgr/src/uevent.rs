//! Strict parser for sysfs `uevent` files (`/sys/dev/block/8:0/uevent`).
//!
//! The format is one `KEY=VALUE` per line: keys are `[A-Z0-9_]+`, values are
//! any bytes except a newline. Trailing blank lines are accepted; anything
//! else (a blank line in the middle, a line without `=`, a bad key, a key
//! given twice) is an error naming the 1-based line number. Parsing never
//! panics, whatever the input.
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

/// Why a `uevent` file (or one of its values) was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("uevent line {line}: {reason}")]
pub struct UeventError {
    /// 1-based line number.
    pub line: usize,
    pub reason: String,
}

impl UeventError {
    fn new(line: usize, reason: impl Into<String>) -> Self {
        Self {
            line,
            reason: reason.into(),
        }
    }
}

/// One `KEY=VALUE` line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    key: String,
    value: Vec<u8>,
    line: usize,
}

/// A parsed `uevent` file: its entries in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uevent {
    entries: Vec<Entry>,
}

impl Uevent {
    /// Parses `uevent` content. Never panics on any input.
    pub fn parse(input: &[u8]) -> Result<Self, UeventError> {
        let lines: Vec<&[u8]> = input.split(|b| *b == b'\n').collect();
        // Index of the first line of the trailing run of blank lines.
        let end = lines
            .iter()
            .rposition(|l| !l.is_empty())
            .map_or(0, |i| i + 1);
        let mut entries: Vec<Entry> = Vec::new();
        let mut first_line: HashMap<String, usize> = HashMap::new();
        for (i, raw) in lines.iter().take(end).enumerate() {
            let entry = parse_line(raw, i + 1)?;
            if let Some(first) = first_line.insert(entry.key.clone(), entry.line) {
                return Err(UeventError::new(
                    entry.line,
                    format!("duplicate key {} (first on line {first})", entry.key),
                ));
            }
            entries.push(entry);
        }
        Ok(Self { entries })
    }

    /// The raw value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.entry(key).map(|e| e.value.as_slice())
    }

    /// All `(key, value)` pairs in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.entries
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_slice()))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the file had no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `MAJOR`, as a decimal number.
    pub fn major(&self) -> Result<Option<u32>, UeventError> {
        self.number("MAJOR")
    }

    /// `MINOR`, as a decimal number.
    pub fn minor(&self) -> Result<Option<u32>, UeventError> {
        self.number("MINOR")
    }

    /// `DEVTYPE` (`disk`, `partition`, ...); must be UTF-8.
    pub fn devtype(&self) -> Result<Option<&str>, UeventError> {
        let Some(e) = self.entry("DEVTYPE") else {
            return Ok(None);
        };
        std::str::from_utf8(&e.value)
            .map(Some)
            .map_err(|_| UeventError::new(e.line, "DEVTYPE is not UTF-8"))
    }

    /// `DEVNAME`: the node's path relative to `/dev`. Validated: not empty,
    /// relative, no `.`/`..`/empty components and no NUL byte.
    pub fn devname(&self) -> Result<Option<&Path>, UeventError> {
        let Some(e) = self.entry("DEVNAME") else {
            return Ok(None);
        };
        validate_devname(&e.value).map(Some).map_err(|why| {
            UeventError::new(e.line, format!("DEVNAME {:?}: {why}", lossy(&e.value)))
        })
    }

    fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.key == key)
    }

    fn number(&self, key: &str) -> Result<Option<u32>, UeventError> {
        let Some(e) = self.entry(key) else {
            return Ok(None);
        };
        parse_decimal_u32(&e.value).map(Some).ok_or_else(|| {
            UeventError::new(
                e.line,
                format!("{key} {:?} is not a decimal number", lossy(&e.value)),
            )
        })
    }
}

fn parse_line(raw: &[u8], line: usize) -> Result<Entry, UeventError> {
    if raw.is_empty() {
        return Err(UeventError::new(
            line,
            "blank line before the end of the file",
        ));
    }
    let eq = raw
        .iter()
        .position(|b| *b == b'=')
        .ok_or_else(|| UeventError::new(line, format!("no '=' in {:?}", lossy(raw))))?;
    let (key, value) = raw.split_at(eq);
    if key.is_empty() {
        return Err(UeventError::new(line, "empty key"));
    }
    if !key
        .iter()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'_')
    {
        return Err(UeventError::new(
            line,
            format!("key {:?} is not [A-Z0-9_]+", lossy(key)),
        ));
    }
    // `value` starts with the '='; the key is pure ASCII so it is valid UTF-8.
    let value = value.get(1..).unwrap_or_default().to_vec();
    let key = String::from_utf8_lossy(key).into_owned();
    Ok(Entry { key, value, line })
}

/// Strict decimal `u32`: ASCII digits only, no sign, no whitespace.
pub(crate) fn parse_decimal_u32(s: &[u8]) -> Option<u32> {
    if s.is_empty() || s.len() > 10 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

fn validate_devname(value: &[u8]) -> Result<&Path, &'static str> {
    if value.is_empty() {
        return Err("empty");
    }
    if value.contains(&0) {
        return Err("contains a NUL byte");
    }
    if value.first() == Some(&b'/') {
        return Err("must be relative to /dev");
    }
    if value
        .split(|b| *b == b'/')
        .any(|c| c.is_empty() || c == b"." || c == b"..")
    {
        return Err("has an empty, '.' or '..' component");
    }
    let path = Path::new(OsStr::from_bytes(value));
    // Belt and braces: every component must be a plain name.
    if !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err("is not a plain relative path");
    }
    Ok(path)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_block_uevent() {
        let u = Uevent::parse(b"MAJOR=8\nMINOR=0\nDEVNAME=sda\nDEVTYPE=disk\nDISKSEQ=9\n").unwrap();
        assert_eq!(u.major().unwrap(), Some(8));
        assert_eq!(u.minor().unwrap(), Some(0));
        assert_eq!(u.devname().unwrap(), Some(Path::new("sda")));
        assert_eq!(u.devtype().unwrap(), Some("disk"));
        assert_eq!(u.get("DISKSEQ"), Some(&b"9"[..]));
        assert_eq!(u.len(), 5);
        let keys: Vec<&str> = u.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["MAJOR", "MINOR", "DEVNAME", "DEVTYPE", "DISKSEQ"]);
    }

    #[test]
    fn values_keep_any_bytes_but_newline() {
        let u = Uevent::parse(b"A=b=c\nB=\nC=\xff\x00\r\n").unwrap();
        assert_eq!(u.get("A"), Some(&b"b=c"[..]));
        assert_eq!(u.get("B"), Some(&b""[..]));
        assert_eq!(u.get("C"), Some(&b"\xff\x00\r"[..]));
    }

    #[test]
    fn trailing_blank_lines_and_empty_input_are_fine() {
        assert!(Uevent::parse(b"").unwrap().is_empty());
        assert!(Uevent::parse(b"\n\n").unwrap().is_empty());
        assert_eq!(Uevent::parse(b"A=1").unwrap().len(), 1);
        assert_eq!(Uevent::parse(b"A=1\n\n").unwrap().len(), 1);
    }

    #[test]
    fn errors_name_the_line() {
        for (input, line) in [
            (&b"A=1\n\nB=2\n"[..], 2),
            (b"A=1\nnoequals\n", 2),
            (b"=1\n", 1),
            (b"a=1\n", 1),
            (b"A-B=1\n", 1),
            (b" A=1\n", 1),
            (b"A=1\nB=2\nA=3\n", 3),
            (b"\nA=1", 1),
        ] {
            let e = Uevent::parse(input).unwrap_err();
            assert_eq!(e.line, line, "{input:?}: {e}");
            assert!(
                e.to_string().starts_with(&format!("uevent line {line}: ")),
                "{e}"
            );
        }
    }

    #[test]
    fn numbers_are_strict() {
        for bad in [
            "-1",
            "+1",
            " 1",
            "1 ",
            "0x10",
            "",
            "4294967296",
            "99999999999",
        ] {
            let u = Uevent::parse(format!("X=0\nMAJOR={bad}\n").as_bytes()).unwrap();
            let e = u.major().unwrap_err();
            assert_eq!(e.line, 2, "{bad}");
        }
        let u = Uevent::parse(b"MAJOR=4294967295\n").unwrap();
        assert_eq!(u.major().unwrap(), Some(u32::MAX));
        assert_eq!(u.minor().unwrap(), None);
    }

    #[test]
    fn devname_must_be_a_plain_relative_path() {
        for ok in ["sda", "vfio/12", "dri/card0", "vfio/devices/vfio0", "a..b"] {
            let u = Uevent::parse(format!("DEVNAME={ok}").as_bytes()).unwrap();
            assert_eq!(u.devname().unwrap(), Some(Path::new(ok)));
        }
        for bad in [
            "", "/sda", "../sda", "a/../b", "a/./b", ".", "..", "a//b", "a/", "a\0b",
        ] {
            let u = Uevent::parse(format!("DEVNAME={bad}").as_bytes()).unwrap();
            let e = u.devname().unwrap_err();
            assert!(e.reason.starts_with("DEVNAME"), "{bad:?}: {e}");
        }
        assert_eq!(Uevent::parse(b"A=1").unwrap().devname().unwrap(), None);
    }

    #[test]
    fn devtype_must_be_utf8() {
        let u = Uevent::parse(b"DEVTYPE=\xff").unwrap();
        assert_eq!(u.devtype().unwrap_err().line, 1);
    }
}
