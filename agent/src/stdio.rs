//! A process's stdio as the agent holds it: pipes, or a pty master when the
//! OCI process has `terminal` (then stdout carries the terminal output and
//! stderr is empty). Reads return up to `len` bytes as soon as some are
//! there; an empty read means end of stream.
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::Mutex;

/// Largest chunk one ReadStdout/ReadStderr returns.
pub const MAX_READ: usize = 1 << 20;
/// Chunk size when the request says 0.
pub const DEFAULT_READ: usize = 64 << 10;

pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

impl PtyMaster {
    async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(io::Error::from)) {
                Ok(Ok(n)) => return Ok(n),
                // EIO: every slave fd is closed (the process exited).
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    pub fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize, `ws`, valid for the call; the master fd is open while `self` lives.
        if unsafe { libc::ioctl(self.fd.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

enum Writer {
    Pipe(pipe::Sender),
    Pty(Arc<PtyMaster>),
}

enum Reader {
    Pipe(pipe::Receiver),
    Pty(Arc<PtyMaster>),
}

/// The agent's side of a process's stdio.
pub struct Stdio {
    stdin: Mutex<Option<Writer>>,
    stdout: Mutex<Option<Reader>>,
    stderr: Mutex<Option<Reader>>,
    pty: Option<Arc<PtyMaster>>,
}

/// The child's side: fds 0, 1, 2.
pub struct ChildStdio {
    pub fds: [OwnedFd; 3],
}

fn cloexec(fd: &OwnedFd) -> io::Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

impl Stdio {
    /// The agent's side of a terminal whose master the process sent back
    /// (allocated in the container's devpts), resized to `size`.
    pub fn from_master(master: OwnedFd, stdin: bool, size: Option<(u16, u16)>) -> io::Result<Self> {
        cloexec(&master)?;
        let flags = OFlag::from_bits_truncate(fcntl(&master, FcntlArg::F_GETFL)?);
        fcntl(&master, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open until it is dropped.
        let fd = unsafe { AsyncFd::register(master) }.map_err(io::Error::from)?;
        let master = Arc::new(PtyMaster { fd });
        if let Some((rows, cols)) = size.filter(|(r, c)| *r > 0 && *c > 0) {
            master.resize(rows, cols)?;
        }
        Ok(Self {
            stdin: Mutex::new(stdin.then(|| Writer::Pty(master.clone()))),
            stdout: Mutex::new(Some(Reader::Pty(master.clone()))),
            stderr: Mutex::new(None),
            pty: Some(master),
        })
    }

    /// The child's fds of a terminal process until it opens its pty: /dev/null.
    pub fn terminal_placeholder() -> io::Result<ChildStdio> {
        let null = || -> io::Result<OwnedFd> { Ok(std::fs::File::open("/dev/null")?.into()) };
        Ok(ChildStdio {
            fds: [null()?, null()?, null()?],
        })
    }

    /// Pipes; stdin only if `stdin` (else /dev/null).
    pub fn pipes(stdin: bool) -> io::Result<(Self, ChildStdio)> {
        let (in_child, in_agent) = if stdin {
            let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
            (r, Some(Writer::Pipe(pipe::Sender::from_owned_fd(w)?)))
        } else {
            (std::fs::File::open("/dev/null")?.into(), None)
        };
        let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let stdio = Self {
            stdin: Mutex::new(in_agent),
            stdout: Mutex::new(Some(Reader::Pipe(pipe::Receiver::from_owned_fd(out_r)?))),
            stderr: Mutex::new(Some(Reader::Pipe(pipe::Receiver::from_owned_fd(err_r)?))),
            pty: None,
        };
        Ok((
            stdio,
            ChildStdio {
                fds: [in_child, out_w, err_w],
            },
        ))
    }

    pub fn is_terminal(&self) -> bool {
        self.pty.is_some()
    }

    pub async fn read_stdout(&self, len: usize) -> io::Result<Vec<u8>> {
        read(&self.stdout, len).await
    }

    pub async fn read_stderr(&self, len: usize) -> io::Result<Vec<u8>> {
        read(&self.stderr, len).await
    }

    /// Writes all of `data`. `Ok(None)` when stdin is closed or absent.
    pub async fn write_stdin(&self, data: &[u8]) -> io::Result<Option<usize>> {
        let mut g = self.stdin.lock().await;
        match g.as_mut() {
            None => Ok(None),
            Some(Writer::Pipe(p)) => {
                p.write_all(data).await?;
                Ok(Some(data.len()))
            }
            Some(Writer::Pty(m)) => {
                m.write_all(data).await?;
                Ok(Some(data.len()))
            }
        }
    }

    /// Closes stdin (for a terminal: sends the EOF character, since closing
    /// the master would also end the output).
    pub async fn close_stdin(&self) -> io::Result<()> {
        let w = self.stdin.lock().await.take();
        if let Some(Writer::Pty(m)) = w {
            m.write_all(&[4]).await?;
        }
        Ok(())
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Option<io::Result<()>> {
        self.pty.as_ref().map(|m| m.resize(rows, cols))
    }

    /// True once stdout and stderr both reached end of stream.
    pub async fn drained(&self) -> bool {
        self.stdout.lock().await.is_none() && self.stderr.lock().await.is_none()
    }
}

async fn read(slot: &Mutex<Option<Reader>>, len: usize) -> io::Result<Vec<u8>> {
    let len = match len {
        0 => DEFAULT_READ,
        n => n.min(MAX_READ),
    };
    let mut g = slot.lock().await;
    let mut buf = vec![0u8; len];
    let n = match g.as_mut() {
        None => 0,
        Some(Reader::Pipe(p)) => p.read(&mut buf).await?,
        Some(Reader::Pty(m)) => m.read(&mut buf).await?,
    };
    if n == 0 {
        *g = None;
    }
    buf.truncate(n);
    Ok(buf)
}

impl ChildStdio {
    pub fn borrowed(&self) -> [std::os::fd::BorrowedFd<'_>; 3] {
        [
            self.fds[0].as_fd(),
            self.fds[1].as_fd(),
            self.fds[2].as_fd(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[tokio::test]
    async fn pipes_stream_and_end() {
        let (stdio, child) = Stdio::pipes(true).unwrap();
        let [cin, cout, cerr] = child.fds;
        let mut cout = std::fs::File::from(cout);
        cout.write_all(b"hello").unwrap();
        assert_eq!(stdio.read_stdout(3).await.unwrap(), b"hel");
        assert_eq!(stdio.read_stdout(0).await.unwrap(), b"lo");
        drop(cout);
        assert!(stdio.read_stdout(10).await.unwrap().is_empty());
        assert!(stdio.read_stdout(10).await.unwrap().is_empty());
        assert_eq!(stdio.write_stdin(b"in").await.unwrap(), Some(2));
        stdio.close_stdin().await.unwrap();
        assert_eq!(stdio.write_stdin(b"x").await.unwrap(), None);
        let mut got = String::new();
        std::fs::File::from(cin).read_to_string(&mut got).unwrap();
        assert_eq!(got, "in");
        drop(cerr);
        assert!(stdio.read_stderr(10).await.unwrap().is_empty());
        assert!(stdio.drained().await);
    }

    #[tokio::test]
    async fn pty_output_and_eof() {
        let pty = nix::pty::openpty(None, None).unwrap();
        let stdio = Stdio::from_master(pty.master, true, Some((40, 100))).unwrap();
        assert!(stdio.is_terminal());
        let (_a, b, c) = (
            pty.slave.try_clone().unwrap(),
            pty.slave.try_clone().unwrap(),
            pty.slave,
        );
        // SAFETY: an all-zero winsize is valid; TIOCGWINSZ writes one into `ws`, which outlives the call, on an open pty slave.
        let ws = unsafe {
            let mut ws: libc::winsize = std::mem::zeroed();
            assert_eq!(libc::ioctl(b.as_raw_fd(), libc::TIOCGWINSZ, &mut ws), 0);
            ws
        };
        assert_eq!((ws.ws_row, ws.ws_col), (40, 100));
        std::fs::File::from(b).write_all(b"tty!").unwrap();
        let mut got = Vec::new();
        while got.len() < 4 {
            got.extend(stdio.read_stdout(100).await.unwrap());
        }
        assert_eq!(got, b"tty!");
        drop((c, _a));
        assert!(stdio.read_stdout(100).await.unwrap().is_empty());
        assert!(stdio.read_stderr(100).await.unwrap().is_empty());
    }
}
