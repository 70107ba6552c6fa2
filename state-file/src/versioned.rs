//! Versioned state files: a JSON object whose `"version"` names its
//! format. A file of another version, or one that does not parse, is
//! refused with an error naming the file, and left untouched.
use std::io;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::atomic::{write_atomic, ReplaceError};

/// A state file type: `Serialize` must write a top-level `"version"` equal
/// to [`Versioned::VERSION`].
pub trait Versioned: Serialize + DeserializeOwned {
    /// What the file holds, for messages (`sandbox state`).
    const WHAT: &'static str;
    /// The format version this build reads and writes.
    const VERSION: u32;
}

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} {} is corrupt ({detail}); refusing to use it (it is left as it is)", path.display())]
    Corrupt {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("{what} {} has version {found}; this build reads version {supported} (it is left as it is)", path.display())]
    Version {
        what: &'static str,
        path: PathBuf,
        found: u64,
        supported: u32,
    },
    #[error("cannot encode {what}: {detail}")]
    Encode { what: &'static str, detail: String },
    #[error("cannot save {what}: {source}")]
    Write {
        what: &'static str,
        #[source]
        source: ReplaceError,
    },
}

#[derive(Deserialize)]
struct Probe {
    version: u64,
}

/// Reads the `"version"` of state bytes: `Ok(version)`, or why the bytes
/// are not a versioned state file (`Err(detail)`).
pub fn check_version(bytes: &[u8]) -> Result<u64, String> {
    serde_json::from_slice::<Probe>(bytes)
        .map(|p| p.version)
        .map_err(|e| match e.classify() {
            serde_json::error::Category::Eof => format!("truncated file: {e}"),
            serde_json::error::Category::Data if !e.to_string().contains("version") => {
                format!("expected a JSON object with a numeric \"version\": {e}")
            }
            _ => e.to_string(),
        })
}

/// Loads `path`: `Ok(None)` when it does not exist.
pub fn load<T: Versioned>(path: &Path) -> Result<Option<T>, StateFileError> {
    let bytes = match crate::private::open_nofollow(path).and_then(|mut f| {
        let mut b = Vec::new();
        io::Read::read_to_end(&mut f, &mut b).map(|_| b)
    }) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateFileError::Read {
                what: T::WHAT,
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let corrupt = |detail: String| StateFileError::Corrupt {
        what: T::WHAT,
        path: path.to_path_buf(),
        detail,
    };
    let found = check_version(&bytes).map_err(corrupt)?;
    if found != u64::from(T::VERSION) {
        return Err(StateFileError::Version {
            what: T::WHAT,
            path: path.to_path_buf(),
            found,
            supported: T::VERSION,
        });
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| corrupt(e.to_string()))
}

/// Writes `value` to `path` atomically ([`write_atomic`]).
pub fn save<T: Versioned>(path: &Path, value: &T) -> Result<(), StateFileError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| StateFileError::Encode {
        what: T::WHAT,
        detail: e.to_string(),
    })?;
    bytes.push(b'\n');
    write_atomic(path, &bytes).map_err(|source| StateFileError::Write {
        what: T::WHAT,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Thing {
        version: u32,
        name: String,
    }
    impl Versioned for Thing {
        const WHAT: &'static str = "thing";
        const VERSION: u32 = 3;
    }

    #[test]
    fn round_trip_and_refusals_leave_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("thing.json");
        assert!(load::<Thing>(&p).unwrap().is_none());
        let t = Thing {
            version: 3,
            name: "a".into(),
        };
        save(&p, &t).unwrap();
        assert_eq!(load::<Thing>(&p).unwrap(), Some(t));
        for (bytes, want) in [
            (
                &br#"{"version": 4, "name": "a"}"#[..],
                "has version 4; this build reads version 3",
            ),
            (
                br#"{"version": 3, "name": "a", "x": 1}"#,
                "unknown field `x`",
            ),
            (br#"{"version": 3, "na"#, "truncated file"),
            (b"[]", "expected a JSON object"),
        ] {
            std::fs::write(&p, bytes).unwrap();
            let e = load::<Thing>(&p).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("thing.json"), "{e}");
            assert_eq!(std::fs::read(&p).unwrap(), bytes, "left as it is");
        }
    }
}
