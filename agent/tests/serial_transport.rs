//! The serial transport against a fake QEMU on the host (no VM): a unix
//! socket chardev that serves one client at a time, in front of a fake
//! virtio-serial port with the guest driver's semantics (read = 0 while no
//! host, writes block while no host). It can also *hide* disconnects, like a
//! guest that handles "host closed" and "host opened" in one go.
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use capsule_agent::device::{DeviceWatcher, WatcherConfig};
use capsule_agent::transport::serial::{listen, Port};
use capsule_agent_protocol::agent::HealthRequest;
use capsule_agent_protocol::agent_ttrpc::create_agent;
use capsule_agent_protocol::client::{AgentConn, ConnOptions, HELLO_MAGIC};

#[derive(Default)]
struct State {
    connected: bool,
    to_guest: VecDeque<u8>,
    client: Option<UnixStream>,
    /// The guest never sees a disconnect (reads block instead of EOF).
    hide_disconnects: bool,
}

#[derive(Default)]
struct Shared {
    st: Mutex<State>,
    cv: Condvar,
}

struct FakePort(Arc<Shared>);

impl Port for FakePort {
    fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut st = self.0.st.lock().unwrap();
        loop {
            if !st.to_guest.is_empty() {
                let n = buf.len().min(st.to_guest.len());
                for b in buf.iter_mut().take(n) {
                    *b = st.to_guest.pop_front().unwrap();
                }
                return Ok(n);
            }
            if !st.connected && !st.hide_disconnects {
                return Ok(0);
            }
            st = self.0.cv.wait(st).unwrap();
        }
    }
    fn write_all(&self, data: &[u8]) -> std::io::Result<()> {
        let mut st = self.0.st.lock().unwrap();
        while !st.connected {
            st = self.0.cv.wait(st).unwrap();
        }
        if let Some(c) = st.client.as_mut() {
            let _ = c.write_all(data);
        }
        Ok(())
    }
    fn wait_host(&self) {
        let mut st = self.0.st.lock().unwrap();
        while !st.connected {
            st = self.0.cv.wait(st).unwrap();
        }
    }
}

/// QEMU's `-chardev socket,server=on`: one client at a time.
fn fake_qemu(path: PathBuf, shared: Arc<Shared>) {
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            {
                let mut st = shared.st.lock().unwrap();
                st.connected = true;
                st.client = conn.try_clone().ok();
                shared.cv.notify_all();
            }
            let mut buf = [0u8; 4096];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut st = shared.st.lock().unwrap();
                        st.to_guest.extend(&buf[..n]);
                        shared.cv.notify_all();
                    }
                }
            }
            let mut st = shared.st.lock().unwrap();
            st.connected = false;
            st.client = None;
            shared.cv.notify_all();
        }
    });
}

async fn setup(hide_disconnects: bool) -> (tempfile::TempDir, PathBuf, Arc<Shared>) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let shared = Arc::new(Shared::default());
    shared.st.lock().unwrap().hide_disconnects = hide_disconnects;
    fake_qemu(sock.clone(), shared.clone());
    let reaper = capsule_agent::reaper::Reaper::start().unwrap();
    let watcher = DeviceWatcher::polling_only(
        dir.path().join("sys"),
        dir.path().join("dev"),
        WatcherConfig::default(),
    );
    let oom = capsule_agent::oom::OomWatcher::start().unwrap();
    let sandbox = Arc::new(capsule_agent::sandbox::Sandbox::new(reaper, watcher, oom));
    let service = Arc::new(capsule_agent::service::AgentService::new(sandbox, vec![]));
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(listen(FakePort(shared.clone())))
        .register_service(create_agent(service));
    server.start().await.unwrap();
    std::mem::forget(server);
    (dir, sock, shared)
}

fn opts() -> ConnOptions {
    ConnOptions {
        connect_timeout: Duration::from_secs(10),
        call_timeout: Duration::from_secs(10),
    }
}

async fn health(conn: &AgentConn) {
    assert!(conn.health(&HealthRequest::new()).await.unwrap().serving);
}

#[tokio::test]
async fn reconnects_with_and_without_visible_disconnects() {
    for hide in [false, true] {
        let (_dir, sock, _shared) = setup(hide).await;
        let mut conn = AgentConn::connect(&sock, opts()).await.unwrap();
        health(&conn).await;
        for _ in 0..5 {
            conn.reconnect().await.unwrap();
            health(&conn).await;
        }
        // A client that dies in the middle of a frame.
        drop(conn);
        {
            let mut raw = UnixStream::connect(&sock).unwrap();
            let mut hello = HELLO_MAGIC.to_vec();
            hello.extend_from_slice(b"00000000000000aa");
            raw.write_all(&hello).unwrap();
            raw.write_all(&[0, 0, 0, 200, 0, 0, 0, 1, 1, 0, 9, 9, 9])
                .unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        let t = std::time::Instant::now();
        let conn = AgentConn::connect(&sock, opts()).await.unwrap();
        health(&conn).await;
        // The HELLO is found inside the dead frame: no resend needed.
        assert!(
            t.elapsed() < Duration::from_millis(900),
            "hide={hide}: {:?}",
            t.elapsed()
        );
        // Binary data with 0xff goes through the escaping intact.
        let e = conn
            .guest_details(&capsule_agent_protocol::agent::GuestDetailsRequest::new())
            .await
            .unwrap();
        assert_eq!(e.protocol, "capsule.agent.v1");
    }
}

#[tokio::test]
async fn stale_replies_never_reach_a_new_client() {
    let (_dir, sock, _shared) = setup(true).await;
    // Many concurrent calls, then an abrupt reconnect, several times: every
    // answer must belong to its own call (a mix-up would fail to decode or
    // return the wrong type).
    let mut conn = AgentConn::connect(&sock, opts()).await.unwrap();
    for _ in 0..5 {
        let c = conn.client().clone();
        let calls: Vec<_> = (0..20)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move {
                    c.health(
                        ttrpc::context::with_duration(Duration::from_secs(5)),
                        &HealthRequest::new(),
                    )
                    .await
                })
            })
            .collect();
        drop(c);
        for h in calls {
            h.abort();
        }
        conn.reconnect().await.unwrap();
        for _ in 0..10 {
            health(&conn).await;
        }
    }
}
