//! Atomic replacement of a file.
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The file operations of an atomic replace, so tests can inject failures
/// (ENOSPC, EIO, a failed rename or directory fsync) at each step.
pub trait StateIo: Send {
    /// Create or truncate `path` (mode 0600, never through a symlink),
    /// write `bytes`, fsync the file.
    fn write_synced(&mut self, path: &Path, bytes: &[u8]) -> io::Result<()>;
    /// Rename `from` over `to`.
    fn rename(&mut self, from: &Path, to: &Path) -> io::Result<()>;
    /// fsync a directory, making a rename in it durable.
    fn sync_dir(&mut self, dir: &Path) -> io::Result<()>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealIo;

impl StateIo for RealIo {
    fn write_synced(&mut self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    }
    fn rename(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn sync_dir(&mut self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// Which step of a replace failed, and on which path.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {}: {source}", path.display())]
pub struct ReplaceError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Replaces `file` with `bytes` through the temp file `temp` (in the same
/// directory `dir`): a reader sees the old or the new content, never a mix.
/// After an error the old file is untouched and the temp file is gone,
/// except that a failed directory fsync is reported although the rename
/// happened (the new content may not survive a power loss).
pub fn replace(
    io: &mut dyn StateIo,
    dir: &Path,
    temp: &Path,
    file: &Path,
    bytes: &[u8],
) -> Result<(), ReplaceError> {
    let err = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| ReplaceError { op, path, source }
    };
    let staged = io
        .write_synced(temp, bytes)
        .map_err(err("write", temp))
        .and_then(|()| io.rename(temp, file).map_err(err("rename", temp)));
    if let Err(e) = staged {
        let _ = std::fs::remove_file(temp);
        return Err(e);
    }
    io.sync_dir(dir)
        .map_err(err("fsync directory after replacing", file))
}

/// [`replace`] through `.<name>.tmp` next to `path`, on the real file
/// system. Takes no lock: callers serialise the writers of one file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ReplaceError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Some(name) = path.file_name() else {
        return Err(ReplaceError {
            op: "write",
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"),
        });
    };
    let temp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    replace(&mut RealIo, dir, &temp, path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_with_0600_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = write_atomic(&dir.path().join("no/such/dir/f"), b"x").unwrap_err();
        assert!(e.to_string().contains("no/such/dir"), "{e}");
    }

    #[test]
    fn never_writes_through_a_planted_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let p = dir.path().join("state.json");
        std::os::unix::fs::symlink(&victim, dir.path().join(".state.json.tmp")).unwrap();
        let e = write_atomic(&p, b"new").unwrap_err();
        assert_eq!(e.op, "write", "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!p.exists());
    }
}
