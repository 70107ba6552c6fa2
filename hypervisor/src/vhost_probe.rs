//! Vetting a vhost-user backend before QEMU touches it.
//!
//! A backend that accepts a connection and never answers makes QEMU's
//! `device_add` block the whole monitor for about a minute. So capsule
//! connects first, sends `VHOST_USER_GET_FEATURES` and requires the reply
//! within a deadline. The vetted connection itself is then handed to QEMU
//! (SCM_RIGHTS): no window in which the socket could change, and backends
//! that serve a single connection and exit when it closes (virtiofsd) keep
//! working.
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const VHOST_USER_GET_FEATURES: u32 = 1;
/// Protocol version 1.
const VHOST_USER_VERSION: u32 = 0x1;
const VHOST_USER_REPLY_MASK: u32 = 0x4;

/// Why a backend socket was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot connect to vhost-user socket {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "vhost-user backend {path} did not answer VHOST_USER_GET_FEATURES within {timeout:?}; refusing it (QEMU's monitor would freeze on it)"
    )]
    Timeout { path: String, timeout: Duration },
    #[error("vhost-user backend {path}: {what}")]
    BadReply { path: String, what: String },
}

/// The 12-byte `VHOST_USER_GET_FEATURES` request header (little-endian).
pub fn get_features_request() -> [u8; 12] {
    let mut msg = [0u8; 12];
    msg[0..4].copy_from_slice(&VHOST_USER_GET_FEATURES.to_le_bytes());
    msg[4..8].copy_from_slice(&VHOST_USER_VERSION.to_le_bytes());
    // size = 0
    msg
}

/// Checks a reply header; returns the payload size.
fn check_reply_header(hdr: &[u8; 12]) -> Result<u32, String> {
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let (request, flags, size) = (word(0), word(4), word(8));
    if request != VHOST_USER_GET_FEATURES {
        return Err(format!(
            "reply to request {request}, expected {VHOST_USER_GET_FEATURES}"
        ));
    }
    if flags & VHOST_USER_REPLY_MASK == 0 {
        return Err(format!("reply flags {flags:#x} lack the reply bit"));
    }
    if size != 8 {
        return Err(format!("GET_FEATURES reply of {size} bytes, expected 8"));
    }
    Ok(size)
}

/// Connects to `path`, checks the backend answers GET_FEATURES within
/// `timeout`, and returns the connected socket (blocking mode) with the
/// backend's feature bits.
pub async fn probe(path: &Path, timeout: Duration) -> Result<(OwnedFd, u64), ProbeError> {
    let shown = path.display().to_string();
    let work = async {
        let mut stream = UnixStream::connect(path)
            .await
            .map_err(|source| ProbeError::Connect {
                path: shown.clone(),
                source,
            })?;
        let bad = |what: String| ProbeError::BadReply {
            path: shown.clone(),
            what,
        };
        stream
            .write_all(&get_features_request())
            .await
            .map_err(|e| bad(format!("sending GET_FEATURES: {e}")))?;
        let mut hdr = [0u8; 12];
        stream
            .read_exact(&mut hdr)
            .await
            .map_err(|e| bad(format!("reading the reply header: {e}")))?;
        check_reply_header(&hdr).map_err(bad)?;
        let mut payload = [0u8; 8];
        stream
            .read_exact(&mut payload)
            .await
            .map_err(|e| bad(format!("reading the feature bits: {e}")))?;
        Ok::<_, ProbeError>((stream, u64::from_le_bytes(payload)))
    };
    let (stream, features) =
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| ProbeError::Timeout {
                path: shown.clone(),
                timeout,
            })??;
    let std = stream.into_std().map_err(|e| ProbeError::BadReply {
        path: shown.clone(),
        what: format!("detaching the socket: {e}"),
    })?;
    // QEMU expects a socket in the mode a fresh connect() leaves it.
    std.set_nonblocking(false)
        .map_err(|e| ProbeError::BadReply {
            path: shown.clone(),
            what: format!("set blocking: {e}"),
        })?;
    tracing::debug!(path = %shown, features = format!("{features:#x}"), "vhost-user backend answered");
    Ok((OwnedFd::from(std), features))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[test]
    fn request_header_layout() {
        assert_eq!(get_features_request(), [1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        let mut ok = [0u8; 12];
        ok[0] = 1;
        ok[4] = 5;
        ok[8] = 8;
        assert_eq!(check_reply_header(&ok), Ok(8));
        let mut no_reply_bit = ok;
        no_reply_bit[4] = 1;
        assert!(check_reply_header(&no_reply_bit).is_err());
    }

    #[tokio::test]
    async fn answering_backend_passes_and_silent_one_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.sock");
        let l = UnixListener::bind(&good).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = [0u8; 12];
            s.read_exact(&mut req).await.unwrap();
            let mut reply = [0u8; 20];
            reply[0] = 1;
            reply[4] = 5;
            reply[8] = 8;
            reply[12..20].copy_from_slice(&0x1_4000_0000u64.to_le_bytes());
            s.write_all(&reply).await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let (_fd, features) = probe(&good, Duration::from_secs(2)).await.unwrap();
        assert_eq!(features, 0x1_4000_0000);

        let silent = dir.path().join("silent.sock");
        let l = UnixListener::bind(&silent).unwrap();
        tokio::spawn(async move {
            let (_s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let start = std::time::Instant::now();
        let err = probe(&silent, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(err, ProbeError::Timeout { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(2));

        let err = probe(&dir.path().join("missing.sock"), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, ProbeError::Connect { .. }), "{err}");
        assert!(err.to_string().contains("missing.sock"));
    }
}
