//! Which request a packet id belongs to. rumqttc does not say, so requests
//! are matched to ids by order: rumqttc handles requests in the order they
//! were queued and reports each with an `Outgoing` event carrying its id. On
//! a lost connection it keeps the unsent ones for the next session and drops
//! them if the broker has no session for us; the correlator mirrors exactly
//! that.

use std::collections::{HashMap, VecDeque};

/// Matches requests handed to rumqttc with the packet ids rumqttc gives them.
#[derive(Debug)]
pub(super) struct Correlator<T> {
    /// Requests queued in rumqttc, in order, not yet given an id.
    pub(super) fifo: VecDeque<T>,
    /// Requests sent, by packet id, awaiting their ack.
    pub(super) inflight: HashMap<u16, T>,
    /// After a lost connection: `fifo` positions of requests that rumqttc
    /// holds for the next session and drops if the session is gone.
    at_risk: std::ops::Range<usize>,
}

impl<T> Default for Correlator<T> {
    fn default() -> Self {
        Correlator {
            fifo: VecDeque::new(),
            inflight: HashMap::new(),
            at_risk: 0..0,
        }
    }
}

impl<T> Correlator<T> {
    /// An `Outgoing` event: the oldest queued request got `pkid` (0 for QoS 0,
    /// which needs no ack and is returned to be resolved now). An id already
    /// in flight is a retransmission and takes nothing from the queue.
    pub(super) fn sent(&mut self, pkid: u16) -> Option<T> {
        if pkid != 0 && self.inflight.contains_key(&pkid) {
            return None;
        }
        let t = self.fifo.pop_front()?;
        self.at_risk = self.at_risk.start.saturating_sub(1)..self.at_risk.end.saturating_sub(1);
        if pkid == 0 {
            return Some(t);
        }
        self.inflight.insert(pkid, t);
        None
    }

    pub(super) fn acked(&mut self, pkid: u16) -> Option<T> {
        self.inflight.remove(&pkid)
    }

    /// The connection was lost: `stale` requests have events still to come,
    /// the next `pending` ones wait in rumqttc for the next session.
    pub(super) fn lost(&mut self, stale: usize, pending: usize) {
        self.at_risk = stale..stale + pending;
    }

    /// CONNACK: without a session, what rumqttc held back and what was in
    /// flight is gone; returned so the callers can be told.
    pub(super) fn connected(&mut self, session_present: bool) -> Vec<T> {
        let mut gone = Vec::new();
        if !session_present {
            let end = self.at_risk.end.min(self.fifo.len());
            let start = self.at_risk.start.min(end);
            gone.extend(self.fifo.drain(start..end));
            gone.extend(self.inflight.drain().map(|(_, t)| t));
        }
        self.at_risk = 0..0;
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlator_orders_and_survives_a_lost_session() {
        let mut c = Correlator::<u32>::default();
        c.fifo.extend([1, 2, 3, 4]);
        assert_eq!(c.sent(0), Some(1)); // QoS 0: resolved at once
        assert_eq!(c.sent(7), None); // 2 in flight as 7
        assert_eq!(c.sent(7), None); // retransmission: nothing taken
        assert_eq!(c.fifo.len(), 2);
        // Lost: one stale event (3) to come, one request (4) held back.
        c.lost(1, 1);
        c.fifo.push_back(5); // queued in the race window
        let gone = c.connected(false);
        assert_eq!(gone.len(), 2); // 4 and the in-flight 2
        assert!(gone.contains(&4) && gone.contains(&2));
        assert_eq!(c.sent(0), Some(3));
        assert_eq!(c.sent(0), Some(5));
    }

    #[test]
    fn correlator_keeps_everything_with_a_session() {
        let mut c = Correlator::<u32>::default();
        c.fifo.extend([1, 2]);
        c.sent(3);
        c.lost(0, 1);
        assert!(c.connected(true).is_empty());
        assert_eq!(c.sent(3), None); // retransmitted
        assert_eq!(c.acked(3), Some(1));
        assert_eq!(c.sent(0), Some(2));
    }
}
