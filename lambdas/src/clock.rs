//! The clock the fan-out's lookup cache ages its entries by.
//!
//! A cached read may be used only while it is younger than the cache's
//! maximum age (see [`crate::lookup`]). Age is measured on both the monotonic
//! and the wall clock, and the older reading wins: a Lambda execution
//! environment is frozen between invocations, and whichever clock a freeze
//! might stop, the other still shows the time that passed. A wall clock that
//! went backwards makes an entry stale, never fresh.
//!
//! [`Clock::manual`] is a clock that only moves when told to, so a workload
//! replay (`benches/store_load.rs`) can run a second of traffic in
//! simulated time against a local DynamoDB that is far slower than the real one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A point in time on both clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Monotonic time since the process's first reading.
    mono: Duration,
    /// Wall time, ms since the Unix epoch.
    wall_ms: i64,
}

impl Stamp {
    /// The wall clock's reading, ms since the Unix epoch.
    pub fn wall_ms(self) -> i64 {
        self.wall_ms
    }

    /// How long ago `self` was at `now`: the larger of the two clocks'
    /// readings; `None` when the wall clock went backwards past it.
    pub fn age(self, now: Stamp) -> Option<Duration> {
        let mono = now.mono.saturating_sub(self.mono);
        let wall = u64::try_from(now.wall_ms - self.wall_ms).ok()?;
        Some(mono.max(Duration::from_millis(wall)))
    }

    /// Whether `self` is younger than `max_age` at `now`.
    pub fn fresh(self, now: Stamp, max_age: Duration) -> bool {
        self.age(now).is_some_and(|age| age < max_age)
    }
}

/// The system's clocks, or a manual one.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    #[default]
    System,
    /// Milliseconds, moved by [`Clock::advance`].
    Manual(Arc<AtomicU64>),
}

impl Clock {
    /// A clock standing at `start_ms` that moves only when advanced.
    pub fn manual(start_ms: u64) -> Clock {
        Clock::Manual(Arc::new(AtomicU64::new(start_ms)))
    }

    /// Moves a manual clock forward (the system clock ignores it).
    pub fn advance(&self, by: Duration) {
        if let Clock::Manual(ms) = self {
            ms.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
        }
    }

    pub fn now(&self) -> Stamp {
        match self {
            Clock::System => {
                static BASE: OnceLock<Instant> = OnceLock::new();
                let base = *BASE.get_or_init(Instant::now);
                Stamp {
                    mono: base.elapsed(),
                    wall_ms: crate::now_millis(),
                }
            }
            Clock::Manual(ms) => {
                let ms = ms.load(Ordering::SeqCst);
                Stamp {
                    mono: Duration::from_millis(ms),
                    wall_ms: ms as i64,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_older_clock_reading_wins() {
        let then = Stamp {
            mono: Duration::from_millis(1000),
            wall_ms: 50_000,
        };
        let max = Duration::from_millis(500);
        // Both clocks moved 100 ms: fresh.
        let now = Stamp {
            mono: Duration::from_millis(1100),
            wall_ms: 50_100,
        };
        assert!(then.fresh(now, max));
        // The monotonic clock stood still over a freeze; the wall clock did not.
        let now = Stamp {
            mono: Duration::from_millis(1000),
            wall_ms: 60_000,
        };
        assert!(!then.fresh(now, max));
        // And the other way round.
        let now = Stamp {
            mono: Duration::from_millis(9000),
            wall_ms: 50_000,
        };
        assert!(!then.fresh(now, max));
        // A wall clock that went backwards: stale.
        let now = Stamp {
            mono: Duration::from_millis(1001),
            wall_ms: 49_000,
        };
        assert!(!then.fresh(now, max));
        assert!(
            !then.fresh(then, Duration::ZERO),
            "max age 0 caches nothing"
        );
    }

    #[test]
    fn a_manual_clock_moves_when_told() {
        let clock = Clock::manual(1_000);
        let a = clock.now();
        assert_eq!(clock.now(), a);
        clock.advance(Duration::from_millis(999));
        assert!(a.fresh(clock.now(), Duration::from_secs(1)));
        clock.advance(Duration::from_millis(1));
        assert!(!a.fresh(clock.now(), Duration::from_secs(1)));
    }
}
