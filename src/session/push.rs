//! What the server pushes to a client unasked: each commit's
//! `invalidateTransaction` and `info` (the storage's new size), from other
//! clients' commits and packs. The storage calls a [`ConnSubscriber`] under
//! its write lock, so it only enqueues; the frame of a commit is encoded
//! once per encoding for all subscribers (`state::InvalidationFrames`).

use std::sync::Arc;

use tracing::debug;

use crate::protocol::envelope::{self, Encoding};
use crate::protocol::ids::{Oid, Tid};
use crate::session::outbox::Outbox;
use crate::session::replies::info_value;
use crate::state::InvalidationFrames;
use crate::storage::Subscriber;

/// Pushes a storage's commits to one client.
pub(super) struct ConnSubscriber {
    outbox: Arc<Outbox>,
    encoding: Encoding,
    peer: String,
    frames: Arc<InvalidationFrames>,
}

impl ConnSubscriber {
    pub(super) fn new(
        outbox: Arc<Outbox>,
        encoding: Encoding,
        peer: String,
        frames: Arc<InvalidationFrames>,
    ) -> ConnSubscriber {
        ConnSubscriber {
            outbox,
            encoding,
            peer,
            frames,
        }
    }
}

impl Subscriber for ConnSubscriber {
    fn invalidate(&self, tid: Tid, oids: &[Oid]) {
        if self.outbox.closed_reason().is_some() {
            // Already going away (and already logged): it reconnects and
            // verifies its cache.
            return;
        }
        if !self
            .outbox
            .push(self.frames.frame(self.encoding, tid, oids))
        {
            // Never drop an invalidation silently: the connection is closing
            // (its outbox overflowed); the client reconnects and verifies.
            // Its task logs the end (one warning, reason `slow-client`).
            debug!(peer = %self.peer, "invalidation not delivered: disconnecting a client that does not keep up");
            self.outbox.close("client does not read its invalidations");
        }
    }

    fn info(&self, length: usize, size: usize) {
        self.outbox.push(envelope::encode_call(
            self.encoding,
            "info",
            &info_value(length, size),
        ));
    }
}
