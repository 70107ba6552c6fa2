//! Task events. The service publishes through an [`EventSink`]: the real one
//! forwards to containerd ([`RemoteSink`]), tests record ([`RecordingSink`]).
//!
//! Order containerd requires, which the service keeps: TaskCreate,
//! TaskStart, TaskExit, TaskDelete for a container; TaskExecAdded,
//! TaskExecStarted, TaskExit for an exec; TaskPaused/TaskResumed and
//! TaskOOM as they happen.
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::MessageDyn;
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::EventsClient;

#[derive(Debug, Clone, PartialEq)]
pub enum TaskEvent {
    Create(TaskCreate),
    Start(TaskStart),
    Exit(TaskExit),
    Delete(TaskDelete),
    ExecAdded(TaskExecAdded),
    ExecStarted(TaskExecStarted),
    Paused(TaskPaused),
    Resumed(TaskResumed),
    Oom(TaskOOM),
}

impl TaskEvent {
    pub fn topic(&self) -> &'static str {
        match self {
            TaskEvent::Create(_) => "/tasks/create",
            TaskEvent::Start(_) => "/tasks/start",
            TaskEvent::Exit(_) => "/tasks/exit",
            TaskEvent::Delete(_) => "/tasks/delete",
            TaskEvent::ExecAdded(_) => "/tasks/exec-added",
            TaskEvent::ExecStarted(_) => "/tasks/exec-started",
            TaskEvent::Paused(_) => "/tasks/paused",
            TaskEvent::Resumed(_) => "/tasks/resumed",
            TaskEvent::Oom(_) => "/tasks/oom",
        }
    }

    /// Short name for tests and logs: `create c1`, `exit c1/e1`.
    pub fn label(&self) -> String {
        let (kind, cid, exec) = match self {
            TaskEvent::Create(e) => ("create", &e.container_id, ""),
            TaskEvent::Start(e) => ("start", &e.container_id, ""),
            TaskEvent::Exit(e) => ("exit", &e.container_id, {
                if e.id == e.container_id {
                    ""
                } else {
                    e.id.as_str()
                }
            }),
            TaskEvent::Delete(e) => ("delete", &e.container_id, ""),
            TaskEvent::ExecAdded(e) => ("exec-added", &e.container_id, e.exec_id.as_str()),
            TaskEvent::ExecStarted(e) => ("exec-started", &e.container_id, e.exec_id.as_str()),
            TaskEvent::Paused(e) => ("paused", &e.container_id, ""),
            TaskEvent::Resumed(e) => ("resumed", &e.container_id, ""),
            TaskEvent::Oom(e) => ("oom", &e.container_id, ""),
        };
        if exec.is_empty() {
            format!("{kind} {cid}")
        } else {
            format!("{kind} {cid}/{exec}")
        }
    }

    fn into_message(self) -> Box<dyn MessageDyn> {
        match self {
            TaskEvent::Create(e) => Box::new(e),
            TaskEvent::Start(e) => Box::new(e),
            TaskEvent::Exit(e) => Box::new(e),
            TaskEvent::Delete(e) => Box::new(e),
            TaskEvent::ExecAdded(e) => Box::new(e),
            TaskEvent::ExecStarted(e) => Box::new(e),
            TaskEvent::Paused(e) => Box::new(e),
            TaskEvent::Resumed(e) => Box::new(e),
            TaskEvent::Oom(e) => Box::new(e),
        }
    }
}

/// Where the service sends task events.
#[async_trait]
pub trait EventSink: Send + Sync {
    async fn publish(&self, event: TaskEvent);
}

/// Forwards events to containerd's ttrpc events service, in order, from
/// one queue. containerd-shim's own publisher does not reconnect after
/// containerd restarts (its send error is not a "closed" error), which
/// loses every later event (CRI learns about exits from events); this one
/// reconnects and retries each event until containerd takes it (or, after
/// [`GIVE_UP`], drops it with an error in the log).
pub struct RemoteSink {
    tx: tokio::sync::mpsc::Sender<Envelope>,
    namespace: String,
}

/// How long one event is retried while containerd is unreachable.
pub const GIVE_UP: std::time::Duration = std::time::Duration::from_secs(300);
const QUEUE: usize = 4096;

impl RemoteSink {
    /// Starts the forwarding task for containerd's ttrpc `address`.
    pub fn new(address: &str, namespace: impl Into<String>) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        tokio::spawn(forward_loop(address.to_string(), rx));
        Self {
            tx,
            namespace: namespace.into(),
        }
    }
}

async fn connect(address: &str) -> std::io::Result<EventsClient> {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    let stream = tokio::net::UnixStream::connect(path).await?;
    let socket = ttrpc::r#async::transport::Socket::from(stream);
    Ok(EventsClient::new(ttrpc::r#async::Client::new(socket)))
}

async fn forward_loop(address: String, mut rx: tokio::sync::mpsc::Receiver<Envelope>) {
    let mut client: Option<EventsClient> = None;
    while let Some(envelope) = rx.recv().await {
        let deadline = tokio::time::Instant::now() + GIVE_UP;
        let mut backoff = std::time::Duration::from_millis(50);
        loop {
            if client.is_none() {
                match connect(&address).await {
                    Ok(c) => client = Some(c),
                    Err(e) => {
                        tracing::debug!(address = %address, error = %e, "cannot reach containerd's event service")
                    }
                }
            }
            if let Some(c) = &client {
                let mut req = ForwardRequest::new();
                req.set_envelope(envelope.clone());
                match c
                    .forward(
                        ttrpc::context::with_duration(std::time::Duration::from_secs(10)),
                        &req,
                    )
                    .await
                {
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(topic = %envelope.topic, error = %e, "publishing an event failed; reconnecting");
                        client = None;
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::error!(topic = %envelope.topic, "containerd did not take the event for {GIVE_UP:?}; dropping it");
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
        }
    }
}

#[async_trait]
impl EventSink for RemoteSink {
    async fn publish(&self, event: TaskEvent) {
        let topic = event.topic();
        let label = event.label();
        tracing::debug!(topic, event = %label, "publishing event");
        let any = match containerd_shim::util::convert_to_any(event.into_message()) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(topic, event = %label, error = %e, "cannot encode event");
                return;
            }
        };
        let mut env = Envelope::new();
        env.set_topic(topic.to_string());
        env.set_namespace(self.namespace.clone());
        if let Ok(ts) = containerd_shim::util::timestamp() {
            env.set_timestamp(ts);
        }
        env.set_event(any);
        if let Err(e) = self.tx.try_send(env) {
            tracing::error!(topic, event = %label, error = %e, "event queue full or closed; dropping the event");
        }
    }
}

/// Keeps every event, in order (tests).
#[derive(Default, Clone)]
pub struct RecordingSink {
    events: Arc<Mutex<Vec<TaskEvent>>>,
}

impl RecordingSink {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn events(&self) -> Vec<TaskEvent> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    pub fn labels(&self) -> Vec<String> {
        self.events().iter().map(TaskEvent::label).collect()
    }
    pub fn clear(&self) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

#[async_trait]
impl EventSink for RecordingSink {
    async fn publish(&self, event: TaskEvent) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::events::task::{TaskExit, TaskStart};
    use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
    use containerd_shim_protos::shim_async::{create_events, Events};
    use ttrpc::r#async::TtrpcContext;

    #[derive(Clone, Default)]
    struct Containerd(Arc<Mutex<Vec<String>>>);

    #[async_trait]
    impl Events for Containerd {
        async fn forward(&self, _c: &TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
            let e = req.envelope();
            self.0
                .lock()
                .unwrap()
                .push(format!("{} {} {}", e.namespace, e.topic, e.event.type_url));
            Ok(Empty::new())
        }
    }

    async fn serve(sock: &std::path::Path, c: &Containerd) -> ttrpc::r#async::Server {
        let _ = std::fs::remove_file(sock);
        let l = std::os::unix::net::UnixListener::bind(sock).unwrap();
        let mut s = ttrpc::r#async::Server::new()
            .add_listener(ttrpc::r#async::transport::Listener::try_from(l).unwrap())
            .register_service(create_events(Arc::new(c.clone())));
        s.start().await.unwrap();
        s
    }

    fn start(n: u32) -> TaskEvent {
        TaskEvent::Start(TaskStart {
            container_id: format!("c{n}"),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn remote_sink_survives_a_containerd_restart_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("containerd.sock.ttrpc");
        let c = Containerd::default();
        // containerd is not up yet: the first event waits for it.
        let sink = RemoteSink::new(&sock.display().to_string(), "ns1");
        sink.publish(start(1)).await;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let mut server = serve(&sock, &c).await;
        sink.publish(start(2)).await;
        let wait = |n: usize| {
            let c = c.clone();
            async move {
                for _ in 0..200 {
                    if c.0.lock().unwrap().len() >= n {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                panic!("events: {:?}", c.0.lock().unwrap());
            }
        };
        wait(2).await;
        // containerd restarts.
        server.shutdown().await.unwrap();
        drop(server);
        sink.publish(TaskEvent::Exit(TaskExit {
            container_id: "c2".into(),
            ..Default::default()
        }))
        .await;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let _server = serve(&sock, &c).await;
        wait(3).await;
        assert_eq!(
            c.0.lock().unwrap().clone(),
            [
                "ns1 /tasks/start containerd.events.TaskStart",
                "ns1 /tasks/start containerd.events.TaskStart",
                "ns1 /tasks/exit containerd.events.TaskExit",
            ]
        );
    }
}
