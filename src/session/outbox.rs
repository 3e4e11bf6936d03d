//! The per-connection outbound FIFO.
//!
//! Replies and server pushes (`invalidateTransaction`, `info`) for one client
//! all go through one `Outbox`, emptied by the connection's own task (the
//! server's `Conn`, which also reads the client's requests: it takes the
//! queued frames in batches and writes them to the socket), so the client
//! sees them in the order they were enqueued. Enqueueing never blocks: the storage
//! enqueues invalidations while it holds its lock (that is what keeps commit
//! order equal to delivery order), so it must not wait for a slow socket.
//!
//! Instead the outbox is bounded in bytes. Past the bound the connection is
//! marked for closing (never dropping a frame in the middle: a client that
//! cannot keep up is disconnected and verifies its cache on reconnect, which
//! is how ZEO recovers from a lost connection). A connection's own requests
//! are not read while its outbox holds more than `read-pause-bytes` (or
//! half the bound, if that is less), so a client that pipelines requests
//! and never reads replies only stalls itself, and holds about that much
//! of the server's memory, not the whole bound: a queue fed by the
//! client's own requests stops growing there; only pushes (invalidations)
//! take it on towards the bound.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::config::effective_read_pause;

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Bytes>,
    bytes: usize,
    closed: Option<&'static str>,
    /// The connection's task while it waits for frames
    /// ([`Outbox::poll_frames`]); a push or close wakes it (once) and
    /// [`Outbox::unpark`] forgets it when the task runs again, so the
    /// task's own replies never wake it for nothing.
    writer: Option<Waker>,
}

#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    /// Wakes [`Outbox::wait_closed`]: the outbox closed.
    wake_closed: Notify,
    max_bytes: usize,
    /// Queued bytes over which the connection's requests are not read.
    read_pause: usize,
}

impl Outbox {
    /// A queue bounded at `max_bytes` whose connection pauses reading at
    /// [`crate::config::DEFAULT_READ_PAUSE_BYTES`] (tests; connections use
    /// [`Outbox::with_read_pause`] with the configured pause).
    #[cfg(test)]
    pub fn new(max_bytes: usize) -> Outbox {
        Outbox::with_read_pause(max_bytes, crate::config::DEFAULT_READ_PAUSE_BYTES)
    }

    /// A queue bounded at `max_bytes` whose connection stops reading its
    /// requests over `read_pause` queued bytes (or half the bound, if less).
    pub fn with_read_pause(max_bytes: usize, read_pause: usize) -> Outbox {
        Outbox {
            state: Mutex::new(State::default()),
            wake_closed: Notify::new(),
            max_bytes,
            read_pause: effective_read_pause(max_bytes, read_pause),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue half
        // updated (every critical section is a push or a drain), so a
        // poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues one whole frame. Returns false if the connection is closing
    /// (the frame is not queued), which includes the case where this frame
    /// would take the queue over its bound.
    pub fn push(&self, frame: Bytes) -> bool {
        let mut st = self.lock();
        if st.closed.is_some() {
            return false;
        }
        // One frame alone may exceed the bound (a big object); a queue that
        // already holds data and would go over it means the client is not
        // reading.
        if st.bytes > 0 && st.bytes + frame.len() > self.max_bytes {
            st.closed = Some("client is not reading: outbound queue over max-outbox-bytes");
            let writer = st.writer.take();
            drop(st);
            wake(writer);
            self.wake_closed.notify_waiters();
            return false;
        }
        st.bytes += frame.len();
        st.frames.push_back(frame);
        let writer = st.writer.take();
        drop(st);
        wake(writer);
        true
    }

    /// Marks the connection for closing after what is already queued has
    /// been written... or at once, for an overflow.
    pub fn close(&self, reason: &'static str) {
        let mut st = self.lock();
        if st.closed.is_none() {
            st.closed = Some(reason);
        }
        let writer = st.writer.take();
        drop(st);
        wake(writer);
        self.wake_closed.notify_waiters();
    }

    /// Waits until the outbox is closed (by an overflow, a failed write or
    /// `close`), so the reader side ends the connection even while its
    /// client sends nothing.
    pub async fn wait_closed(&self) -> &'static str {
        loop {
            let notified = self.wake_closed.notified();
            if let Some(reason) = self.lock().closed {
                return reason;
            }
            notified.await;
        }
    }

    pub fn closed_reason(&self) -> Option<&'static str> {
        self.lock().closed
    }

    /// Bytes queued and not yet written (tests).
    #[cfg(test)]
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// True while the connection may take its next request: not closed,
    /// not backlogged (one look at the queue for the two).
    pub fn takes_requests(&self) -> bool {
        let st = self.lock();
        st.closed.is_none() && st.bytes <= self.read_pause
    }

    /// True while the reader side should stop taking new requests.
    pub fn is_backlogged(&self) -> bool {
        self.lock().bytes > self.read_pause
    }

    /// For the connection's writer: moves every queued frame to `into` (they
    /// stay counted until [`Outbox::written`]). Returns how many it moved.
    pub fn take_frames(&self, into: &mut VecDeque<Bytes>) -> usize {
        let mut st = self.lock();
        let n = st.frames.len();
        into.extend(st.frames.drain(..));
        n
    }

    /// For the connection's task: ready once frames are queued or the
    /// outbox is closed; until then the task is woken by the next push or
    /// close (from any thread). A waker instead of a `Notify`: the
    /// connection polls this every time it parks (once per request of a
    /// client that sends one at a time), and a `Notify` waiter is
    /// registered, and removed again, under the `Notify`'s own lock each
    /// time, while every reply the task pushes for itself left a permit
    /// that woke it once more for nothing.
    pub fn poll_frames(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.lock();
        if !st.frames.is_empty() || st.closed.is_some() {
            return Poll::Ready(());
        }
        match &mut st.writer {
            Some(w) if w.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// For the connection's task, once it runs again: pushes need not wake
    /// it until it waits again ([`Outbox::poll_frames`]); it looks at the
    /// queue before it does.
    pub fn unpark(&self) {
        self.lock().writer = None;
    }

    /// Waits until frames are queued or the outbox is closed (tests).
    #[cfg(test)]
    async fn wait_frames(&self) {
        std::future::poll_fn(|cx| self.poll_frames(cx)).await
    }

    /// For tests: waits for frames and takes all queued ones.
    /// Returns `Err(reason)` once the outbox is closed and empty.
    #[cfg(test)]
    async fn next_batch(&self, batch: &mut VecDeque<Bytes>) -> Result<(), &'static str> {
        self.wait_frames().await;
        if self.take_frames(batch) > 0 {
            return Ok(());
        }
        Err(self.closed_reason().unwrap_or("closed"))
    }

    /// For the connection's writer: `n` bytes were written to the socket.
    pub fn written(&self, n: usize) {
        let mut st = self.lock();
        st.bytes = st.bytes.saturating_sub(n);
    }
}

/// Wakes the connection's task, if it was waiting (outside the lock).
fn wake(writer: Option<Waker>) {
    if let Some(w) = writer {
        w.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_READ_PAUSE_BYTES;

    #[tokio::test]
    async fn fifo_and_batches() {
        let ob = Outbox::new(1000);
        assert!(ob.push(Bytes::from_static(b"a")));
        assert!(ob.push(Bytes::from_static(b"bc")));
        let mut batch = VecDeque::new();
        ob.next_batch(&mut batch).await.unwrap();
        assert_eq!(
            batch,
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"bc")]
        );
        assert_eq!(ob.queued_bytes(), 3);
        ob.written(3);
        assert_eq!(ob.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn overflow_closes_instead_of_dropping() {
        let ob = Outbox::new(10);
        assert!(ob.push(Bytes::from(vec![0u8; 6])));
        assert!(!ob.push(Bytes::from(vec![0u8; 6])));
        assert!(ob.closed_reason().is_some());
        // The frame queued before the overflow is still delivered in order,
        // then the writer is told to close.
        let mut batch = VecDeque::new();
        ob.next_batch(&mut batch).await.unwrap();
        assert_eq!(batch.len(), 1);
        batch.clear();
        assert!(ob.next_batch(&mut batch).await.is_err());
    }

    #[tokio::test]
    async fn overflow_wakes_a_reader_waiting_for_the_close() {
        let ob = std::sync::Arc::new(Outbox::new(10));
        let waiter = {
            let ob = ob.clone();
            tokio::spawn(async move { ob.wait_closed().await })
        };
        tokio::task::yield_now().await;
        assert!(ob.push(Bytes::from(vec![0u8; 6])));
        assert!(!waiter.is_finished());
        assert!(!ob.push(Bytes::from(vec![0u8; 6])));
        let reason = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(reason.contains("max-outbox-bytes"), "{reason}");
    }

    #[test]
    fn reading_pauses_at_the_smaller_of_half_the_bound_and_the_pause_size() {
        // A small bound: half of it.
        let ob = Outbox::new(100);
        assert!(ob.push(Bytes::from(vec![0u8; 50])));
        assert!(!ob.is_backlogged());
        assert!(ob.push(Bytes::from(vec![0u8; 1])));
        assert!(ob.is_backlogged());
        // A big bound: the pause size, far below half of it; the queue may
        // still grow to the bound (pushes) without closing.
        let ob = Outbox::new(crate::config::DEFAULT_MAX_OUTBOX_BYTES);
        let chunk = DEFAULT_READ_PAUSE_BYTES / 4;
        for _ in 0..4 {
            assert!(ob.push(Bytes::from(vec![0u8; chunk])));
        }
        assert!(!ob.is_backlogged());
        assert!(ob.push(Bytes::from(vec![0u8; 1])));
        assert!(ob.is_backlogged());
        assert!(ob.push(Bytes::from(vec![0u8; 8 * DEFAULT_READ_PAUSE_BYTES])));
        assert!(ob.closed_reason().is_none());
        ob.written(ob.queued_bytes() - DEFAULT_READ_PAUSE_BYTES);
        assert!(!ob.is_backlogged());
    }

    #[test]
    fn one_big_frame_is_allowed() {
        let ob = Outbox::new(10);
        assert!(ob.push(Bytes::from(vec![0u8; 100])));
        assert!(ob.is_backlogged());
    }
}
