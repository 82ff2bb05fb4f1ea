//! The emulator's notion of "now".
//!
//! Everything time-dependent (token `iat`/`exp`, the `x-ms-date` skew check, the sliding
//! limit windows, expiry in token validation) reads one [`Clock`], so an in-process test can
//! drive time with a [`ManualClock`] instead of sleeping. Clients must then sign with the same
//! clock's time, or the skew check refuses them.

use std::sync::Mutex;
use std::time::Duration;

use jiff::Timestamp;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

/// Wall-clock time: what the binary uses.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock(Mutex<Timestamp>);

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        Self(Mutex::new(start))
    }

    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().expect("clock lock");
        *now = now
            .checked_add(jiff::SignedDuration::try_from(by).expect("duration fits"))
            .expect("time stays in range");
    }

    pub fn set(&self, to: Timestamp) {
        *self.0.lock().expect("clock lock") = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.0.lock().expect("clock lock")
    }
}
