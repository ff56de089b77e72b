//! The live connections: who they are, and the way to each connection's socket task.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::Message;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;
use tokio::sync::{Notify, mpsc, watch};

/// What every event of a connection says about it; fixed at `$connect`.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    pub id: String,
    pub function: String,
    pub alias: String,
    pub connected_at_ms: i64,
    pub source_ip: String,
    pub user_agent: String,
    pub domain: String,
    /// `requestContext.authorizer` of `$connect`, repeated on every later event as
    /// API Gateway does (the credentials themselves are not kept).
    pub authorizer: Option<Value>,
}

#[derive(Debug)]
pub(crate) struct Conn {
    pub info: ConnInfo,
    last_active_ms: AtomicI64,
    /// Set once the socket is gone: queued messages are then dropped, not invoked.
    closed: AtomicBool,
    /// Frames for the client (replies, pushes), written by the socket task.
    tx: mpsc::Sender<Message>,
    /// A close asked for by the API or a drain: apart from `tx`, so a client that
    /// stopped reading can still be closed.
    close_req: Mutex<Option<(u16, &'static str)>>,
    close_notify: Notify,
}

/// Why a message could not be handed to a connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SendError {
    Gone,
    Full,
}

impl Conn {
    pub fn new(info: ConnInfo, tx: mpsc::Sender<Message>) -> Conn {
        let now = info.connected_at_ms;
        Conn {
            info,
            last_active_ms: AtomicI64::new(now),
            closed: AtomicBool::new(false),
            tx,
            close_req: Mutex::new(None),
            close_notify: Notify::new(),
        }
    }

    /// Asks the socket task to close with `code`; the first request wins.
    pub fn request_close(&self, code: u16, reason: &'static str) -> Result<(), SendError> {
        if self.is_closed() {
            return Err(SendError::Gone);
        }
        let mut req = self.close_req.lock().unwrap_or_else(|p| p.into_inner());
        if req.is_none() {
            *req = Some((code, reason));
        }
        // A stored permit: the socket task sees it even if it is not waiting yet.
        self.close_notify.notify_one();
        Ok(())
    }

    /// Resolves with the requested close once there is one.
    pub async fn close_requested(&self) -> (u16, &'static str) {
        loop {
            if let Some(req) = *self.close_req.lock().unwrap_or_else(|p| p.into_inner()) {
                return req;
            }
            self.close_notify.notified().await;
        }
    }

    pub fn touch(&self, now_ms: i64) {
        self.last_active_ms.fetch_max(now_ms, Ordering::Relaxed);
    }

    pub fn last_active_ms(&self) -> i64 {
        self.last_active_ms.load(Ordering::Relaxed)
    }

    pub fn mark_closed(&self) {
        self.closed.store(true, Ordering::Release);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Queues without waiting: a client that stops reading must not stall whoever
    /// pushes to it (the management API answers 429, a reply is dropped).
    pub fn send(&self, out: Message) -> Result<(), SendError> {
        if self.is_closed() {
            return Err(SendError::Gone);
        }
        self.tx.try_send(out).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::Gone,
        })
    }
}

/// The registry, shared by the upgrade handler, the socket tasks and the
/// `@connections` API.
#[derive(Debug)]
pub struct Connections {
    inner: Mutex<Inner>,
    /// Socket tasks not yet finished (their `$disconnect` included): what a drain
    /// waits for.
    running: watch::Sender<usize>,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<String, Arc<Conn>>,
    closing: bool,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            inner: Mutex::default(),
            running: watch::channel(0).0,
        }
    }
}

/// Held by a socket task from before the upgrade until its `$disconnect` is done.
pub(crate) struct Running(watch::Sender<usize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Connections {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the map consistent (one insert or
        // remove); keep serving rather than poisoning every later request.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn running(&self) -> Running {
        self.running.send_modify(|n| *n += 1);
        Running(self.running.clone())
    }

    /// Adds a connection; refused (false) once the server is draining.
    pub(crate) fn register(&self, conn: Arc<Conn>) -> bool {
        let mut inner = self.lock();
        if inner.closing {
            return false;
        }
        inner.map.insert(conn.info.id.clone(), conn);
        crate::observe::websocket_connections(inner.map.len());
        true
    }

    pub(crate) fn get(&self, id: &str) -> Option<Arc<Conn>> {
        self.lock().map.get(id).cloned()
    }

    pub(crate) fn remove(&self, id: &str) -> Option<Arc<Conn>> {
        let mut inner = self.lock();
        let c = inner.map.remove(id);
        crate::observe::websocket_connections(inner.map.len());
        c
    }

    pub fn is_closing(&self) -> bool {
        self.lock().closing
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// At server drain: refuses new connections, closes every open one with 1001
    /// (going away) and waits until each has run its `$disconnect`. The caller
    /// bounds the wait (the drain timeout).
    pub async fn shutdown(&self) {
        let open: Vec<Arc<Conn>> = {
            let mut inner = self.lock();
            inner.closing = true;
            inner.map.values().cloned().collect()
        };
        for c in open {
            let _ = c.request_close(1001, "Going away");
        }
        let mut rx = self.running.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

/// A connection id: 96 random bits, URL-safe (it goes into `/v1/connections/{id}`).
pub(crate) fn new_connection_id() -> String {
    random_b64(12)
}

/// A message id: unique enough to tell messages of one connection apart in logs.
pub(crate) fn new_message_id() -> String {
    random_b64(9)
}

fn random_b64(n: usize) -> String {
    use rand::RngCore;
    let mut raw = vec![0u8; n];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    URL_SAFE_NO_PAD.encode(raw)
}

#[cfg(test)]
pub(crate) fn info(id: &str) -> ConnInfo {
    ConnInfo {
        id: id.into(),
        function: "chat".into(),
        alias: "live".into(),
        connected_at_ms: 1_700_000_000_000,
        source_ip: "127.0.0.1".into(),
        user_agent: "test".into(),
        domain: "localhost".into(),
        authorizer: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_url_safe_and_distinct() {
        let ids: std::collections::HashSet<String> =
            (0..1000).map(|_| new_connection_id()).collect();
        assert_eq!(ids.len(), 1000);
        for id in ids.iter().take(10) {
            assert_eq!(id.len(), 16, "{id}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{id}"
            );
        }
    }

    #[tokio::test]
    async fn registered_connections_are_found_until_removed() {
        let reg = Connections::default();
        let (tx, mut rx) = mpsc::channel(1);
        let c = Arc::new(Conn::new(info("a"), tx));
        assert!(reg.register(Arc::clone(&c)));
        assert_eq!(reg.len(), 1);
        let found = reg.get("a").expect("registered");
        assert_eq!(found.send(Message::text("hi")), Ok(()));
        assert!(matches!(rx.try_recv(), Ok(Message::Text(_))));
        // A full queue is reported, not waited on; a close still gets through.
        assert_eq!(found.send(Message::text("1")), Ok(()));
        assert_eq!(found.send(Message::text("2")), Err(SendError::Full));
        assert_eq!(found.request_close(1000, ""), Ok(()));
        assert_eq!(found.request_close(1001, "later"), Ok(()));
        assert_eq!(found.close_requested().await, (1000, ""));
        c.touch(c.info.connected_at_ms + 5);
        assert_eq!(found.last_active_ms(), c.info.connected_at_ms + 5);
        c.touch(c.info.connected_at_ms);
        assert_eq!(found.last_active_ms(), c.info.connected_at_ms + 5);
        assert!(reg.remove("a").is_some());
        assert!(reg.get("a").is_none());
        assert!(reg.is_empty());
        c.mark_closed();
        assert_eq!(c.request_close(1000, ""), Err(SendError::Gone));
        assert_eq!(c.send(Message::text("late")), Err(SendError::Gone));
    }

    #[tokio::test]
    async fn shutdown_closes_everyone_and_waits_for_their_tasks() {
        let reg = Arc::new(Connections::default());
        let (tx, _rx) = mpsc::channel(4);
        let running = reg.running();
        let c = Arc::new(Conn::new(info("a"), tx));
        assert!(reg.register(Arc::clone(&c)));
        let r2 = Arc::clone(&reg);
        let drain = tokio::spawn(async move { r2.shutdown().await });
        // The socket task sees the close, runs `$disconnect`, then finishes.
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), c.close_requested())
            .await
            .expect("close requested");
        assert_eq!(got.0, 1001);
        assert!(!drain.is_finished());
        reg.remove("a");
        drop(running);
        tokio::time::timeout(std::time::Duration::from_secs(5), drain)
            .await
            .expect("drain ends")
            .expect("no panic");
        // Late arrivals are refused.
        let (tx, _rx) = mpsc::channel(1);
        assert!(!reg.register(Arc::new(Conn::new(info("b"), tx))));
        assert!(reg.is_closing());
    }
}
