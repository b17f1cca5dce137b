//! An invocation's time budget: until when it may still *start* work.
//!
//! A Lambda invocation that reaches its timeout is killed mid-post and then
//! retried from the start, re-posting everything. So the fan-out stops
//! starting posts (and 429 retries) a reserve before the deadline the Lambda
//! context gives, lets the posts in flight finish (each attempt is cut after
//! [`crate::aws::POST_ATTEMPT_TIMEOUT`]) and hands what is left on (see
//! [`crate::fanout`]). The reserve is at most half the time the invocation
//! has, so an invocation always gets to start some work and a hand-on chain
//! always moves forward.

use std::time::{Duration, Instant};

/// Kept back from the deadline: one post attempt (5 s) cut by its timeout,
/// then handing the rest on or recording it (a few requests).
pub const RESERVE: Duration = Duration::from_secs(8);

/// Until when work may start.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    stop_at: Option<Instant>,
}

impl Budget {
    /// No limit (tests, and work outside an invocation's deadline).
    pub fn unlimited() -> Budget {
        Budget { stop_at: None }
    }

    /// Work may start until `reserve` before `deadline`, but for at least
    /// half the time left.
    pub fn until(deadline: Instant, reserve: Duration) -> Budget {
        let now = Instant::now();
        let left = deadline.saturating_duration_since(now);
        Budget {
            stop_at: Some(now + left.saturating_sub(reserve).max(left / 2)),
        }
    }

    /// From the Lambda context's deadline (ms since the Unix epoch).
    pub fn from_deadline_ms(deadline_ms: u64, reserve: Duration) -> Budget {
        let left_ms = deadline_ms.saturating_sub(crate::now_millis().max(0) as u64);
        Budget::until(Instant::now() + Duration::from_millis(left_ms), reserve)
    }

    /// At most `limit` from now, and within this budget.
    pub fn at_most(self, limit: Duration) -> Budget {
        let cap = Instant::now() + limit;
        Budget {
            stop_at: Some(self.stop_at.map_or(cap, |at| at.min(cap))),
        }
    }

    /// Whether work may start now.
    pub fn may_start(&self) -> bool {
        self.stop_at.is_none_or(|at| Instant::now() < at)
    }

    /// Whether work may still start after waiting `wait`.
    pub fn may_start_after(&self, wait: Duration) -> bool {
        self.stop_at.is_none_or(|at| Instant::now() + wait < at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_kept_but_never_more_than_half() {
        let now = Instant::now();
        let b = Budget::until(now + Duration::from_secs(60), Duration::from_secs(8));
        assert!(b.may_start());
        assert!(b.may_start_after(Duration::from_secs(51)));
        assert!(!b.may_start_after(Duration::from_secs(53)));
        // Only 4 s left: work may start for 2 s.
        let b = Budget::until(now + Duration::from_secs(4), Duration::from_secs(8));
        assert!(b.may_start_after(Duration::from_millis(1900)));
        assert!(!b.may_start_after(Duration::from_millis(2100)));
        // A deadline already past: nothing starts.
        let b = Budget::until(now, Duration::from_secs(8));
        assert!(!b.may_start());
        assert!(Budget::unlimited().may_start_after(Duration::from_secs(1_000_000)));
        let capped = Budget::unlimited().at_most(Duration::from_secs(1));
        assert!(capped.may_start() && !capped.may_start_after(Duration::from_secs(2)));
    }
}
