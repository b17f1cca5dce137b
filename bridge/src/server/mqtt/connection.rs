//! An MQTT connection's life: its event loop polled in a task of its own
//! ([`drive`]), each event and failure handed to an [`Events`] owner (the
//! link, the retained fetcher), and reconnects spaced by [`Backoff`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{ConnectionError, Event, EventLoop, Incoming, Outgoing};
use tokio::sync::watch;

/// A session that lasted this long was not flapping: the backoff starts over.
pub const STABLE: Duration = Duration::from_secs(10);
/// Sessions in a row shorter than [`STABLE`] after which the broker is taken
/// to be flapping (and, with nothing in flight, a client-id collision).
pub const FLAPPING: u32 = 3;
/// Longest wait between reconnects...
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// ...and while flapping.
const MAX_BACKOFF_FLAPPING: Duration = Duration::from_secs(60);

/// What an MQTT connection's events go to (the link, the retained fetcher).
pub trait Events: Send + Sync + 'static {
    fn on_event(&self, event: Event);
    /// The connection failed (`attempt` counts failures since the last
    /// CONNACK; `lasted` is how long the session had been up, if it was).
    /// The event loop is given so that requests rumqttc would re-send can be
    /// taken out.
    fn on_error(
        &self,
        eventloop: &mut EventLoop,
        error: &ConnectionError,
        attempt: u32,
        lasted: Option<Duration>,
    );
}

/// The wait before reconnecting: capped exponential backoff (100 ms to 10 s),
/// started over only by a session that lasted, and capped at a minute while
/// sessions keep ending soon after they begin (flapping).
#[derive(Debug)]
struct Backoff {
    next: Duration,
    short_sessions: u32,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);

    fn new() -> Self {
        Backoff {
            next: Self::FIRST,
            short_sessions: 0,
        }
    }

    /// The wait after a failure; `lasted` is how long the session had been up.
    fn after(&mut self, lasted: Option<Duration>) -> Duration {
        match lasted {
            Some(t) if t >= STABLE => {
                self.next = Self::FIRST;
                self.short_sessions = 0;
            }
            Some(_) => self.short_sessions += 1,
            None => {}
        }
        let cap = if self.short_sessions >= FLAPPING {
            MAX_BACKOFF_FLAPPING
        } else {
            MAX_BACKOFF
        };
        let wait = self.next.min(cap);
        self.next = (self.next * 2).min(cap);
        wait
    }
}

/// Polls an event loop until `stop` fires or the session says goodbye,
/// reconnecting with [`Backoff`] (plus up to 100 ms of jitter).
pub async fn drive<E: Events>(
    events: Arc<E>,
    mut eventloop: EventLoop,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new();
    let mut attempt = 0u32;
    let mut up_since: Option<Instant> = None;
    loop {
        let polled = tokio::select! {
            polled = eventloop.poll() => polled,
            _ = stop.changed() => break,
        };
        match polled {
            Ok(event) => {
                if matches!(event, Event::Incoming(Incoming::ConnAck(_))) {
                    attempt = 0;
                    up_since = Some(Instant::now());
                }
                let disconnect = matches!(event, Event::Outgoing(Outgoing::Disconnect));
                events.on_event(event);
                if disconnect {
                    break;
                }
            }
            Err(error) => {
                attempt += 1;
                let lasted = up_since.take().map(|t| t.elapsed());
                events.on_error(&mut eventloop, &error, attempt, lasted);
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos());
                let jitter = Duration::from_millis(u64::from(nanos % 100));
                tokio::select! {
                    _ = tokio::time::sleep(backoff.after(lasted) + jitter) => {}
                    _ = stop.changed() => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_starts_over_after_a_stable_session_and_caps_when_flapping() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new();
        // The broker is down: 100 ms, 200 ms, ... up to 10 s.
        let waits: Vec<Duration> = (0..10).map(|_| b.after(None)).collect();
        assert_eq!(waits[..3], [ms(100), ms(200), ms(400)]);
        assert_eq!(waits[9], MAX_BACKOFF);
        // A session that lasted: from the start again.
        assert_eq!(b.after(Some(STABLE)), ms(100));
        // Sessions that keep ending at once: the wait keeps growing (a CONNACK
        // does not start it over), past 10 s once it is flapping.
        let mut last = Duration::ZERO;
        for _ in 0..12 {
            last = b.after(Some(ms(50)));
        }
        assert_eq!(last, MAX_BACKOFF_FLAPPING);
    }
}
