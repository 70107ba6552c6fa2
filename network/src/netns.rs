//! A network namespace by path (`/run/netns/x`, `/proc/<pid>/ns/net`, the
//! CNI netns containerd made), checked to be one, and a way to run code
//! inside it.
//!
//! Code runs in the namespace on a dedicated, short-lived OS thread that
//! calls `setns(CLONE_NEWNET)` and exits when done: the caller's thread
//! (a tokio worker) never changes namespace. What that code creates stays
//! bound to the namespace after the thread is gone: a netlink socket talks
//! to the namespace it was created in, and a tap made by `TUNSETIFF` lives
//! in the namespace of the thread that opened `/dev/net/tun`.
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sched::{setns, CloneFlags};
use serde::{Deserialize, Serialize};

use crate::error::{NetworkError, Result};

/// Identity of a namespace (the nsfs inode): a path such as
/// `/proc/<pid>/ns/net` may name another namespace once the pid is reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NetnsId {
    pub dev: u64,
    pub inode: u64,
}

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
    id: NetnsId,
}

fn not_netns(path: &Path, why: impl Into<String>) -> NetworkError {
    NetworkError::NotNetns {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

fn ns_type_name(t: libc::c_int) -> &'static str {
    match t {
        libc::CLONE_NEWNET => "network",
        libc::CLONE_NEWIPC => "ipc",
        libc::CLONE_NEWNS => "mount",
        libc::CLONE_NEWPID => "pid",
        libc::CLONE_NEWUTS => "uts",
        libc::CLONE_NEWUSER => "user",
        libc::CLONE_NEWCGROUP => "cgroup",
        libc::CLONE_NEWTIME => "time",
        _ => "unknown",
    }
}

impl Netns {
    /// Opens `path` and checks it is a network namespace: it exists, is a
    /// file on nsfs (not a directory, a leftover file of a deleted
    /// namespace, or any other file), and its type is `CLONE_NEWNET`.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(NetworkError::NetnsMissing {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => return Err(not_netns(path, format!("cannot stat it: {e}"))),
        };
        let ft = meta.file_type();
        if ft.is_dir() {
            return Err(not_netns(path, "it is a directory"));
        }
        if !ft.is_file() {
            // nsfs files are regular files; never open a FIFO or a device.
            return Err(not_netns(
                path,
                "it is not a regular file (a device, FIFO or socket)",
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => NetworkError::NetnsMissing {
                    path: path.to_path_buf(),
                },
                _ => not_netns(path, format!("cannot open it: {e}")),
            })?;
        let mut sfs = std::mem::MaybeUninit::<libc::statfs>::zeroed();
        // SAFETY: `file` is an open descriptor and `sfs` is a writable statfs.
        let r = unsafe { libc::fstatfs(file.as_raw_fd(), sfs.as_mut_ptr()) };
        if r != 0 {
            return Err(not_netns(
                path,
                format!("fstatfs: {}", io::Error::last_os_error()),
            ));
        }
        // SAFETY: fstatfs succeeded, so it filled the struct.
        let sfs = unsafe { sfs.assume_init() };
        // f_type's integer type differs between architectures.
        #[allow(clippy::unnecessary_cast)]
        let on_nsfs = sfs.f_type as i64 == libc::NSFS_MAGIC as i64;
        if !on_nsfs {
            return Err(not_netns(
                path,
                "it is not a namespace file (not on nsfs; a deleted namespace leaves a plain file behind)",
            ));
        }
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd.
        let t = unsafe { libc::ioctl(file.as_raw_fd(), libc::NS_GET_NSTYPE) };
        if t < 0 {
            return Err(not_netns(
                path,
                format!("NS_GET_NSTYPE: {}", io::Error::last_os_error()),
            ));
        }
        if t != libc::CLONE_NEWNET {
            return Err(not_netns(
                path,
                format!("its namespace type is {}", ns_type_name(t)),
            ));
        }
        let st = file
            .metadata()
            .map_err(|e| not_netns(path, format!("fstat: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            id: NetnsId {
                dev: st.dev(),
                inode: st.ino(),
            },
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn id(&self) -> NetnsId {
        self.id
    }

    /// The path for error messages.
    pub fn name(&self) -> String {
        self.path.display().to_string()
    }

    /// Runs `f` on a new thread inside the namespace and waits for it (a
    /// blocking call: for async callers, see [`Netns::run`]).
    pub fn run_blocking<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let fd = self.file.try_clone()?;
        let t = std::thread::Builder::new()
            .name("capsule-netns".into())
            .spawn(move || -> io::Result<T> {
                setns(fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                f()
            })?;
        t.join()
            .map_err(|_| io::Error::other("the namespace thread panicked"))?
    }

    /// Runs `f` on a new thread inside the namespace; gives up after
    /// `timeout` (the thread then finishes on its own and what it returns
    /// is dropped, closing any descriptor in it).
    pub async fn run<T, F>(&self, op: &str, timeout: Duration, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let io_err = |source| NetworkError::Io {
            netns: self.name(),
            op: op.to_string(),
            source,
        };
        let fd = self.file.try_clone().map_err(io_err)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("capsule-netns".into())
            .spawn(move || {
                let r = setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)
                    .and_then(|()| f());
                // The receiver is gone after a timeout: `r` is dropped here.
                let _ = tx.send(r);
            })
            .map_err(io_err)?;
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(NetworkError::Timeout {
                netns: self.name(),
                op: op.to_string(),
                timeout,
            }),
            Ok(Err(_)) => Err(io_err(io::Error::other("the namespace thread died"))),
            Ok(Ok(r)) => r.map_err(io_err),
        }
    }
}
