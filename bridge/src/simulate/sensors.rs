//! What a simulated device measures: temperature, humidity, battery and
//! signal strength that drift plausibly (each pulled back towards a level of
//! its own, with noise and a slow daily-like swing), and the JSON telemetry
//! message that carries them.
//!
//! The randomness is a SplitMix64 generator seeded from the standard
//! library's per-process random hasher keys: good enough for noise and for
//! run tags, and no dependency of its own.

use std::hash::{BuildHasher, Hasher};

/// A small pseudo-random generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded differently in every process (and for every `salt`).
    pub fn seeded(salt: u64) -> Rng {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(salt);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        Rng(h.finish())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Roughly standard normal (the sum of four uniforms, scaled).
    pub fn normal(&mut self) -> f64 {
        let sum: f64 = (0..4).map(|_| self.unit()).sum();
        (sum - 2.0) * 3f64.sqrt()
    }
}

/// One device's sensors.
#[derive(Debug, Clone)]
pub struct Sensors {
    rng: Rng,
    /// Seconds of simulated time, for the slow swing.
    clock: f64,
    /// Where this device's temperature, humidity and signal like to be.
    home_temperature: f64,
    home_humidity: f64,
    home_signal: f64,
    /// The swing's phase, so devices do not move in step.
    phase: f64,
    pub temperature: f64,
    pub humidity: f64,
    pub battery: f64,
    pub signal: f64,
}

/// Period of the slow temperature swing, in seconds (a compressed day).
const SWING: f64 = 600.0;
/// Time constant with which a value returns towards its level, in seconds.
const PULL: f64 = 20.0;

impl Sensors {
    pub fn new(mut rng: Rng) -> Sensors {
        let home_temperature = rng.range(18.0, 26.0);
        let home_humidity = rng.range(35.0, 60.0);
        let home_signal = rng.range(-80.0, -55.0);
        let phase = rng.range(0.0, SWING);
        let battery = rng.range(55.0, 100.0);
        Sensors {
            home_temperature,
            home_humidity,
            home_signal,
            phase,
            temperature: home_temperature,
            humidity: home_humidity,
            battery,
            signal: home_signal,
            clock: 0.0,
            rng,
        }
    }

    /// Advances the sensors by `dt` seconds; a lit LED drains the battery
    /// faster.
    pub fn step(&mut self, dt: f64, led_on: bool) {
        let dt = dt.clamp(0.0, 60.0);
        self.clock += dt;
        let pull = (dt / PULL).min(1.0);
        let noise = dt.sqrt();
        let swing = (std::f64::consts::TAU * (self.clock + self.phase) / SWING).sin();

        let target = self.home_temperature + 1.5 * swing;
        self.temperature += (target - self.temperature) * pull + 0.08 * noise * self.rng.normal();

        // Warmer air holds more water: relative humidity falls as it warms.
        let target = self.home_humidity - 2.0 * (self.temperature - self.home_temperature);
        self.humidity += (target - self.humidity) * pull + 0.3 * noise * self.rng.normal();
        self.humidity = self.humidity.clamp(5.0, 95.0);

        let drain = if led_on { 0.03 } else { 0.01 };
        self.battery -= dt * drain * self.rng.range(0.5, 1.5);
        if self.battery < 5.0 {
            // Someone swapped the batteries.
            self.battery = 100.0;
        }

        self.signal += (self.home_signal - self.signal) * pull + 1.5 * noise * self.rng.normal();
        self.signal = self.signal.clamp(-110.0, -30.0);
    }

    /// The telemetry message: the readings, the LED and seconds since boot.
    pub fn telemetry(&self, led_on: bool, uptime_secs: u64) -> String {
        let round = |v: f64, places: i32| {
            let f = 10f64.powi(places);
            (v * f).round() / f
        };
        serde_json::json!({
            "temperature": round(self.temperature, 2),
            "humidity": round(self.humidity, 1),
            "battery": round(self.battery, 1),
            "signal": self.signal.round() as i64,
            "led": if led_on { "on" } else { "off" },
            "uptime": uptime_secs,
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_drift_but_stay_plausible() {
        let mut s = Sensors::new(Rng::seeded(1));
        let first = s.clone();
        let mut temps = Vec::new();
        // An hour at one reading a second.
        for _ in 0..3600 {
            s.step(1.0, false);
            assert!((5.0..=40.0).contains(&s.temperature), "{s:?}");
            assert!((5.0..=95.0).contains(&s.humidity), "{s:?}");
            assert!((5.0..=100.0).contains(&s.battery), "{s:?}");
            assert!((-110.0..=-30.0).contains(&s.signal), "{s:?}");
            temps.push(s.temperature);
        }
        // It moves, but smoothly: no reading jumps far from the last one.
        assert!(temps.windows(2).all(|w| (w[0] - w[1]).abs() < 1.0));
        let (lo, hi) = temps
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &t| (lo.min(t), hi.max(t)));
        assert!(hi - lo > 1.0, "the temperature barely moved: {lo}..{hi}");
        assert!(s.battery < first.battery || s.battery > 90.0);
    }

    #[test]
    fn the_led_drains_the_battery_faster() {
        let (mut off, mut on) = (Sensors::new(Rng(7)), Sensors::new(Rng(7)));
        let start = off.battery;
        for _ in 0..600 {
            off.step(1.0, false);
            on.step(1.0, true);
        }
        assert!(start - on.battery > start - off.battery);
    }

    #[test]
    fn telemetry_is_json_with_every_reading() {
        let s = Sensors::new(Rng(3));
        let v: serde_json::Value = serde_json::from_str(&s.telemetry(true, 42)).unwrap();
        for key in ["temperature", "humidity", "battery", "signal"] {
            assert!(v[key].is_number(), "{v}");
        }
        assert_eq!(v["led"], "on");
        assert_eq!(v["uptime"], 42);
    }
}
