//! A token bucket for the per-connection publish rate. Pure: the caller
//! passes the time, so the rule is testable without sleeping.

use std::time::{Duration, Instant};

/// `rate` publishes per second on average, bursts of up to `burst`.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// A limiter that starts full. A `rate` of 0 disables limiting.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        let burst = burst.max(1.0);
        RateLimiter {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until the next token, for the error message.
    pub fn retry_after(&self) -> Duration {
        if self.rate <= 0.0 || self.tokens >= 1.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(10.0, 3.0, t0);
        assert!(r.try_take(t0) && r.try_take(t0) && r.try_take(t0));
        assert!(!r.try_take(t0));
        assert!(r.retry_after() > Duration::ZERO);
        assert!(r.try_take(t0 + Duration::from_millis(100)));
        assert!(!r.try_take(t0 + Duration::from_millis(100)));
        let mut off = RateLimiter::new(0.0, 1.0, t0);
        assert!((0..1000).all(|_| off.try_take(t0)));
    }
}
