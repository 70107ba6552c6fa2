//! A route-netlink session bound to one network namespace, with a deadline
//! on every request and errors that name the namespace and the object.
use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::link::LinkMessage;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::Handle;

use crate::error::{NetworkError, Result};
use crate::netns::Netns;

pub(crate) struct Nl {
    pub handle: Handle,
    netns: String,
    timeout: Duration,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Nl {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The errno of a netlink NACK (positive), if `e` is one.
pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

impl Nl {
    /// Opens a netlink socket inside `ns` (on the namespace's own thread)
    /// and serves it from the caller's runtime.
    pub async fn connect(ns: &Netns, timeout: Duration) -> Result<Self> {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle, _messages) = ns
            .run("open a netlink socket", timeout, move || {
                // Registers the socket with the caller's reactor; the socket
                // itself is created here, in the namespace.
                let _enter = rt.enter();
                rtnetlink::new_connection()
            })
            .await?;
        let task = tokio::spawn(conn);
        Ok(Self {
            handle,
            netns: ns.name(),
            timeout,
            task,
        })
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }

    fn timed_out(&self, op: String) -> NetworkError {
        NetworkError::Timeout {
            netns: self.netns.clone(),
            op,
            timeout: self.timeout,
        }
    }

    pub fn error(&self, op: impl Display, source: rtnetlink::Error) -> NetworkError {
        NetworkError::Netlink {
            netns: self.netns.clone(),
            op: op.to_string(),
            source,
        }
    }

    /// One request with the session's deadline; the raw netlink error is
    /// returned so callers can tell ENOENT/EEXIST apart.
    pub async fn try_call<T>(
        &self,
        op: impl Display,
        fut: impl Future<Output = std::result::Result<T, rtnetlink::Error>>,
    ) -> Result<std::result::Result<T, rtnetlink::Error>> {
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| self.timed_out(op.to_string()))
    }

    /// One request with the session's deadline.
    pub async fn call<T>(
        &self,
        op: impl Display,
        fut: impl Future<Output = std::result::Result<T, rtnetlink::Error>>,
    ) -> Result<T> {
        let op = op.to_string();
        self.try_call(&op, fut)
            .await?
            .map_err(|e| self.error(&op, e))
    }

    /// A dump, collected with the session's deadline on the whole of it.
    pub async fn dump<T>(
        &self,
        op: impl Display,
        stream: impl Stream<Item = std::result::Result<T, rtnetlink::Error>>,
    ) -> Result<Vec<T>> {
        self.call(op, stream.try_collect::<Vec<T>>()).await
    }

    /// A request built by hand (`flags` include NLM_F_REQUEST): its
    /// messages, or the kernel's NACK as the inner error.
    pub async fn raw(
        &self,
        op: impl Display,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<std::result::Result<Vec<RouteNetlinkMessage>, rtnetlink::Error>> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = flags;
        let mut handle = self.handle.clone();
        let fut = async move {
            let mut resp = handle.request(req)?;
            let mut out = Vec::new();
            while let Some(m) = resp.next().await {
                match m.payload {
                    NetlinkPayload::InnerMessage(i) => out.push(i),
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        return Err(rtnetlink::Error::NetlinkError(e))
                    }
                    _ => {}
                }
            }
            Ok(out)
        };
        self.try_call(op, fut).await
    }

    /// All links of the namespace.
    pub async fn links(&self) -> Result<Vec<LinkMessage>> {
        self.dump("list links", self.handle.link().get().execute())
            .await
    }
}
