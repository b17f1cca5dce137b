//! What each subscriber counts, and the sum over all of them.
//!
//! Every subscriber task owns one [`SubStats`] behind an uncontended mutex
//! (only that task locks it while messages flow; the orchestrator reads it
//! between phases), so no counter is shared across tasks on the hot path.
//! Latencies go into a small per-phase HdrHistogram (2 significant digits,
//! microseconds), merged at the end.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use hdrhistogram::Histogram;

use crate::payload;

/// Largest latency recorded exactly (60 s, in µs); larger ones saturate.
const MAX_LATENCY_US: u64 = 60_000_000;

/// One subscriber's counts for one phase.
#[derive(Default)]
pub struct PhaseStats {
    pub received: u64,
    pub hist: Option<Histogram<u32>>,
    pub last_us: u64,
    /// `lagged` frames (bridge only) and the messages they say were dropped.
    pub lagged_frames: u64,
    pub lagged_dropped: u64,
    /// Messages whose sequence number was not above the previous one.
    pub reordered: u64,
    last_seq: Option<u64>,
}

/// One subscriber's counts.
#[derive(Default)]
pub struct SubStats {
    /// Indexed by run id (phase).
    pub phases: Vec<PhaseStats>,
    /// Frames that were neither messages nor `lagged` (errors, say).
    pub other_frames: u64,
    pub first_other: Option<String>,
    /// Why the connection ended, if it did.
    pub ended: Option<String>,
}

impl SubStats {
    fn phase(&mut self, run: usize) -> &mut PhaseStats {
        if self.phases.len() <= run {
            self.phases.resize_with(run + 1, PhaseStats::default);
        }
        &mut self.phases[run]
    }
}

/// What every subscriber shares: the clock and the current phase (for
/// `lagged` frames, which carry no run id).
pub struct Clock {
    pub base: Instant,
    pub phase: AtomicU32,
}

impl Clock {
    pub fn new() -> Arc<Self> {
        Arc::new(Clock {
            base: Instant::now(),
            phase: AtomicU32::new(0),
        })
    }

    pub fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }
}

/// A subscriber's handle on its stats.
#[derive(Clone)]
pub struct Recorder {
    pub stats: Arc<Mutex<SubStats>>,
    pub clock: Arc<Clock>,
}

impl Recorder {
    pub fn new(clock: Arc<Clock>) -> Self {
        Recorder {
            stats: Arc::new(Mutex::new(SubStats::default())),
            clock,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, SubStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A message payload (or a frame embedding one) arrived.
    pub fn message(&self, bytes: &[u8]) {
        let now = self.clock.now_us();
        let Some(stamp) = payload::decode(bytes) else {
            self.other(bytes);
            return;
        };
        let mut stats = self.lock();
        let p = stats.phase(stamp.run as usize);
        p.received += 1;
        p.last_us = now;
        if p.last_seq.is_some_and(|last| stamp.seq <= last) {
            p.reordered += 1;
        }
        p.last_seq = Some(stamp.seq);
        let hist = p.hist.get_or_insert_with(|| {
            Histogram::new_with_bounds(1, MAX_LATENCY_US, 2).expect("valid histogram bounds")
        });
        hist.saturating_record(now.saturating_sub(stamp.ts_us).max(1));
    }

    /// A bridge text frame: a message, `lagged`, or anything else.
    pub fn bridge_frame(&self, bytes: &[u8]) {
        if bytes.starts_with(b"{\"type\":\"message\"") {
            self.message(bytes);
        } else if let Some(dropped) = payload::lagged(bytes) {
            let run = self.clock.phase.load(Ordering::Relaxed) as usize;
            let mut stats = self.lock();
            let p = stats.phase(run);
            p.lagged_frames += 1;
            p.lagged_dropped += dropped;
        } else {
            self.other(bytes);
        }
    }

    fn other(&self, bytes: &[u8]) {
        let mut stats = self.lock();
        stats.other_frames += 1;
        if stats.first_other.is_none() {
            stats.first_other =
                Some(String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into());
        }
    }

    pub fn ended(&self, why: String) {
        let mut stats = self.lock();
        if stats.ended.is_none() {
            stats.ended = Some(why);
        }
    }
}

/// The sum over all subscribers for one phase.
pub struct Summary {
    pub received: u64,
    pub hist: Histogram<u64>,
    /// Latest receive time (µs on the bench clock).
    pub last_us: u64,
    pub lagged_frames: u64,
    pub lagged_dropped: u64,
    pub reordered: u64,
    pub other_frames: u64,
    pub first_other: Option<String>,
    /// Subscribers whose connection ended, and the first reason.
    pub ended: usize,
    pub first_end: Option<String>,
}

/// Total messages received in `run` so far (cheap: for drain checks).
pub fn received(recorders: &[Recorder], run: u32) -> u64 {
    recorders
        .iter()
        .map(|r| r.lock().phases.get(run as usize).map_or(0, |p| p.received))
        .sum()
}

pub fn summarize(recorders: &[Recorder], run: u32) -> Summary {
    let mut s = Summary {
        received: 0,
        hist: Histogram::new_with_bounds(1, MAX_LATENCY_US, 2).expect("valid histogram bounds"),
        last_us: 0,
        lagged_frames: 0,
        lagged_dropped: 0,
        reordered: 0,
        other_frames: 0,
        first_other: None,
        ended: 0,
        first_end: None,
    };
    for r in recorders {
        let stats = r.lock();
        s.other_frames += stats.other_frames;
        if s.first_other.is_none() {
            s.first_other.clone_from(&stats.first_other);
        }
        if let Some(why) = &stats.ended {
            s.ended += 1;
            if s.first_end.is_none() {
                s.first_end = Some(why.clone());
            }
        }
        let Some(p) = stats.phases.get(run as usize) else {
            continue;
        };
        s.received += p.received;
        s.lagged_frames += p.lagged_frames;
        s.lagged_dropped += p.lagged_dropped;
        s.reordered += p.reordered;
        s.last_us = s.last_us.max(p.last_us);
        if let Some(h) = &p.hist {
            for v in h.iter_recorded() {
                s.hist
                    .saturating_record_n(v.value_iterated_to(), u64::from(v.count_at_value()));
            }
        }
    }
    s
}
