//! OOM kills in the guest → TaskOOM: one watcher per sandbox long-polls
//! the agent (`GetOOMEvent`, which consumes nothing, so a lost call loses
//! no event) and publishes TaskOOM for each container the guest's cgroup
//! saw killed. CRI marks a container that exits after a TaskOOM as
//! OOMKilled, so an exit by SIGKILL first asks for a pending event
//! ([`OomEvents::flush_before_exit`]): TaskOOM goes out before TaskExit.
use std::sync::Arc;
use std::time::Duration;

use containerd_shim_protos::events::task::TaskOOM;

use crate::events::{EventSink, TaskEvent};
use crate::sandbox::Sandbox;

/// How long an exit by SIGKILL waits for the OOM event that may explain it.
const FLUSH_WAIT: Duration = Duration::from_millis(500);
/// Pause after a failed poll (the agent restarting its connection).
const RETRY: Duration = Duration::from_secs(1);

/// The OOM events of one sandbox, published once each.
pub struct OomEvents {
    sandbox: Arc<dyn Sandbox>,
    events: Arc<dyn EventSink>,
    /// Sequence number of the last event published.
    last: tokio::sync::Mutex<u64>,
}

impl OomEvents {
    pub fn new(sandbox: Arc<dyn Sandbox>, events: Arc<dyn EventSink>) -> Arc<Self> {
        Arc::new(Self {
            sandbox,
            events,
            last: tokio::sync::Mutex::new(0),
        })
    }

    /// Publishes the event after `after`, once (a concurrent caller may
    /// have done it already).
    async fn publish(&self, container_id: String, seq: u64) {
        let mut last = self.last.lock().await;
        if seq <= *last {
            return;
        }
        *last = seq;
        tracing::info!(container = %container_id, seq, "OOM kill in the guest");
        self.events
            .publish(TaskEvent::Oom(TaskOOM {
                container_id,
                ..Default::default()
            }))
            .await;
    }

    /// Polls until the task is aborted (the sandbox goes).
    pub async fn watch(self: Arc<Self>) {
        loop {
            let after = *self.last.lock().await;
            match self.sandbox.guest().next_oom_event(after).await {
                Ok((cid, seq)) => self.publish(cid, seq).await,
                Err(e) => {
                    tracing::debug!(error = %e, "OOM event poll failed; retrying");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// Publishes an OOM event the guest already has but the watcher has
    /// not published yet, waiting at most a moment: called before the exit
    /// of a process killed by SIGKILL is published.
    pub async fn flush_before_exit(&self) {
        let after = *self.last.lock().await;
        let next = self.sandbox.guest().next_oom_event(after);
        if let Ok(Ok((cid, seq))) = tokio::time::timeout(FLUSH_WAIT, next).await {
            self.publish(cid, seq).await;
        }
    }
}
