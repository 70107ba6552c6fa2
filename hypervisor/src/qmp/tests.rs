//! QMP client against an in-process fake QMP server.
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};

use super::*;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;

struct FakeConn {
    read: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
}

impl FakeConn {
    async fn recv(&mut self) -> Value {
        let line = self.read.next_line().await.unwrap().expect("client closed");
        serde_json::from_str(&line).unwrap()
    }
    async fn send_raw(&mut self, s: &str) {
        self.write.write_all(s.as_bytes()).await.unwrap();
        self.write.write_all(b"\r\n").await.unwrap();
    }
    async fn reply(&mut self, cmd: &Value, ret: Value) {
        let msg = json!({ "return": ret, "id": cmd["id"] });
        self.send_raw(&msg.to_string()).await;
    }
    /// Greeting + capabilities negotiation.
    async fn negotiate(&mut self) {
        self.send_raw(GREETING).await;
        let caps = self.recv().await;
        assert_eq!(caps["execute"], "qmp_capabilities");
        self.reply(&caps, json!({})).await;
    }
}

/// Starts a fake server running `script` on the first connection and
/// returns a connected client (after `negotiate` when `negotiate` is true).
async fn fake<F, Fut>(
    opts: QmpOptions,
    script: F,
) -> (
    Result<QmpClient, QmpError>,
    tokio::task::JoinHandle<()>,
    tempfile::TempDir,
)
where
    F: FnOnce(FakeConn) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, w) = stream.into_split();
        script(FakeConn {
            read: BufReader::new(r).lines(),
            write: w,
        })
        .await;
    });
    let client = QmpClient::connect(&path, opts).await;
    (client, server, dir)
}

fn opts(ms: u64) -> QmpOptions {
    QmpOptions {
        command_timeout: Duration::from_millis(ms),
        handshake_timeout: Duration::from_secs(2),
    }
}

#[tokio::test]
async fn greeting_capabilities_and_typed_reply() {
    let (client, server, _dir) = fake(opts(2000), |mut c| async move {
        c.negotiate().await;
        let cmd = c.recv().await;
        assert_eq!(cmd["execute"], "query-status");
        assert!(cmd.get("arguments").is_none());
        c.reply(
            &cmd,
            json!({"status": "running", "running": true, "singlestep": false}),
        )
        .await;
        let _ = c.read.next_line().await;
    })
    .await;
    let client = client.unwrap();
    assert_eq!(client.version()["qemu"]["major"], 7);
    let status = client.query_status().await.unwrap();
    assert!(status.running);
    assert_eq!(status.status, "running");
    drop(client);
    server.await.unwrap();
}

#[tokio::test]
async fn replies_matched_by_id_out_of_order_with_events_interleaved() {
    let (client, server, _dir) = fake(opts(3000), |mut c| async move {
        c.negotiate().await;
        let a = c.recv().await;
        let b = c.recv().await;
        c.send_raw(r#"{"event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral/x/virtio-backend"}, "timestamp": {"seconds": 1, "microseconds": 2}}"#).await;
        // Second command answered first.
        c.reply(&b, json!({"who": b["execute"]})).await;
        c.send_raw(r#"{"event": "DEVICE_DELETED", "data": {"device": "x", "path": "/machine/peripheral/x"}, "timestamp": {"seconds": 1, "microseconds": 3}}"#).await;
        c.reply(&a, json!({"who": a["execute"]})).await;
        let _ = c.read.next_line().await;
    })
    .await;
    let client = client.unwrap();
    let mut events = client.subscribe();
    let (ra, rb) = tokio::join!(client.execute("cmd-a", None), async {
        // Make sure cmd-a is written first.
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.execute("cmd-b", Some(json!({"k": 1}))).await
    });
    assert_eq!(ra.unwrap()["who"], "cmd-a");
    assert_eq!(rb.unwrap()["who"], "cmd-b");
    let e1 = events.recv().await.unwrap();
    assert_eq!(e1.event, "DEVICE_DELETED");
    assert_eq!(
        e1.deleted_device(),
        None,
        "backend event carries no device id"
    );
    let e2 = events.recv().await.unwrap();
    assert_eq!(e2.deleted_device(), Some("x"));
    assert_eq!(e2.timestamp.unwrap().microseconds, 3);
    drop(client);
    server.await.unwrap();
}

#[tokio::test]
async fn error_reply_carries_class_and_desc() {
    let (client, server, _dir) = fake(opts(2000), |mut c| async move {
        c.negotiate().await;
        let cmd = c.recv().await;
        let msg = json!({"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}, "id": cmd["id"]});
        c.send_raw(&msg.to_string()).await;
        let _ = c.read.next_line().await;
    })
    .await;
    let client = client.unwrap();
    let err = client
        .execute("device_del", Some(json!({"id": "x"})))
        .await
        .unwrap_err();
    assert_eq!(err.class(), Some("DeviceNotFound"));
    assert_eq!(err.desc(), Some("Device 'x' not found"));
    assert!(err.to_string().contains("device_del"), "{err}");
    drop(client);
    server.await.unwrap();
}

#[tokio::test]
async fn timeout_then_late_reply_is_ignored() {
    let (client, server, _dir) = fake(opts(300), |mut c| async move {
        c.negotiate().await;
        let slow = c.recv().await;
        let next = c.recv().await;
        // The late reply to the timed-out command must not be taken for
        // the next one.
        c.reply(&slow, json!("late")).await;
        c.reply(&next, json!("next")).await;
        let _ = c.read.next_line().await;
    })
    .await;
    let client = client.unwrap();
    let start = Instant::now();
    let err = client.execute("slow", None).await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(client.execute("next", None).await.unwrap(), json!("next"));
    drop(client);
    server.await.unwrap();
}

#[tokio::test]
async fn server_dying_mid_command_fails_every_pending_command_promptly() {
    let (client, server, _dir) = fake(opts(10_000), |mut c| async move {
        c.negotiate().await;
        let _a = c.recv().await;
        let _b = c.recv().await;
        // QEMU dies: connection dropped without replies.
    })
    .await;
    let client = client.unwrap();
    let start = Instant::now();
    let (a, b) = tokio::join!(client.execute("a", None), client.execute("b", None));
    assert!(a.unwrap_err().is_disconnected());
    let b = b.unwrap_err();
    assert!(b.is_disconnected(), "{b}");
    assert!(b.to_string().contains("during b"), "{b}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
    // Later commands fail at once.
    let start = Instant::now();
    assert!(client
        .execute("c", None)
        .await
        .unwrap_err()
        .is_disconnected());
    assert!(start.elapsed() < Duration::from_millis(100));
    assert!(!client.is_connected());
    tokio::time::timeout(Duration::from_secs(1), client.closed())
        .await
        .unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn malformed_json_is_an_error_not_a_panic() {
    let (client, server, _dir) = fake(opts(5000), |mut c| async move {
        c.negotiate().await;
        let _cmd = c.recv().await;
        c.send_raw(r#"{"return": {}, "id": 2"#).await;
        let _ = c.read.next_line().await;
    })
    .await;
    let client = client.unwrap();
    let start = Instant::now();
    let err = client.execute("query-status", None).await.unwrap_err();
    assert!(matches!(err, QmpError::Protocol(_)), "{err}");
    assert!(err.to_string().contains("malformed JSON"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(client
        .execute("x", None)
        .await
        .unwrap_err()
        .is_disconnected());
    drop(client);
    server.await.unwrap();
}

#[tokio::test]
async fn reply_of_wrong_shape_is_a_protocol_error() {
    let (client, server, _dir) = fake(opts(2000), |mut c| async move {
        c.negotiate().await;
        let cmd = c.recv().await;
        c.reply(&cmd, json!({"status": 5})).await;
        let _ = c.read.next_line().await;
    })
    .await;
    let client = client.unwrap();
    let err = client.query_status().await.unwrap_err();
    assert!(matches!(err, QmpError::Protocol(_)), "{err}");
    drop(client);
    server.await.unwrap();
}

#[tokio::test]
async fn missing_greeting_is_refused() {
    let (client, server, _dir) = fake(opts(2000), |mut c| async move {
        c.send_raw(r#"{"hello": 1}"#).await;
    })
    .await;
    let err = client.unwrap_err();
    assert!(matches!(err, QmpError::Protocol(_)), "{err}");
    server.await.unwrap();
}

#[tokio::test]
async fn silent_server_times_out_the_handshake() {
    let (client, server, _dir) = fake(
        QmpOptions {
            command_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_millis(200),
        },
        |c| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(c);
        },
    )
    .await;
    assert!(client.unwrap_err().is_timeout());
    server.await.unwrap();
}

#[tokio::test]
async fn getfd_passes_the_descriptor() {
    use std::io::{BufRead, Write};
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
        let (mut s, _) = listener.accept().unwrap();
        let mut r = std::io::BufReader::new(s.try_clone().unwrap());
        writeln!(s, "{GREETING}").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let caps: Value = serde_json::from_str(&line).unwrap();
        writeln!(s, "{}", json!({"return": {}, "id": caps["id"]})).unwrap();
        // Read the getfd line with its control message.
        let mut buf = vec![0u8; 4096];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let (n, fds) = {
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let msg =
                recvmsg::<UnixAddr>(s.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty())
                    .unwrap();
            let mut fds = Vec::new();
            for c in msg.cmsgs().unwrap() {
                if let ControlMessageOwned::ScmRights(f) = c {
                    fds.extend(f);
                }
            }
            (msg.bytes, fds)
        };
        let cmd: Value = serde_json::from_slice(&buf[..n]).unwrap();
        assert_eq!(cmd["execute"], "getfd");
        assert_eq!(cmd["arguments"]["fdname"], "f1");
        assert_eq!(fds.len(), 1);
        writeln!(s, "{}", json!({"return": {}, "id": cmd["id"]})).unwrap();
        let mut rest = String::new();
        let _ = r.read_line(&mut rest);
    });
    let client = QmpClient::connect(&path, opts(2000)).await.unwrap();
    let (a, _b) = UnixStream::pair().unwrap();
    let fd: OwnedFd = a.into_std().unwrap().into();
    client.getfd("f1", fd).await.unwrap();
    drop(client);
    tokio::task::spawn_blocking(move || server.join().unwrap())
        .await
        .unwrap();
}

#[tokio::test]
async fn close_ends_the_session_for_every_clone() {
    let (client, server, _dir) = fake(opts(2000), |mut c| async move {
        c.negotiate().await;
        // The server sees EOF once the client closes.
        assert!(c.read.next_line().await.unwrap().is_none());
    })
    .await;
    let client = client.unwrap();
    let clone = client.clone();
    client.close();
    assert!(clone
        .execute("x", None)
        .await
        .unwrap_err()
        .is_disconnected());
    tokio::time::timeout(Duration::from_secs(2), server)
        .await
        .unwrap()
        .unwrap();
    drop(clone);
}

#[test]
fn parse_message_decodes_replies_events_and_refuses_non_objects() {
    assert_eq!(
        parse_message(br#"{"return": {"running": true}, "id": 7}"#).unwrap(),
        QmpMessage::Reply {
            id: Some(7),
            result: Ok(json!({"running": true}))
        }
    );
    assert_eq!(
        parse_message(br#"{"error": {"class": "GenericError", "desc": "no"}, "id": 8}"#).unwrap(),
        QmpMessage::Reply {
            id: Some(8),
            result: Err(("GenericError".into(), "no".into()))
        }
    );
    assert_eq!(
        parse_message(br#"{"error": 1, "id": "x"}"#).unwrap(),
        QmpMessage::Reply {
            id: None,
            result: Err(("(none)".into(), "(none)".into()))
        }
    );
    match parse_message(br#"{"event": "DEVICE_DELETED", "data": {"device": "d1"}}"#).unwrap() {
        QmpMessage::Event(e) => assert_eq!(e.deleted_device(), Some("d1")),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        parse_message(br#"{"event": 3}"#).unwrap(),
        QmpMessage::Ignored(_)
    ));
    assert!(matches!(
        parse_message(br#"{"QMP": {}}"#).unwrap(),
        QmpMessage::Ignored(_)
    ));
    for bad in [&b"[1]"[..], b"null", b"\"x\"", b"{", b"\xff\xfe", b""] {
        let e = parse_message(bad).unwrap_err();
        assert!(
            e.contains("not a JSON object") || e.contains("malformed JSON"),
            "{e}"
        );
    }
}
