//! The circuit of one ACS endpoint: while it fails, one probe at a time. Pure; time comes in as
//! values.
//!
//! Without it, every resource of an endpoint that is down retries on its own schedule, and each
//! retry spends budget: after a long outage the window is full of failed attempts and the
//! re-issues queue behind them. With it, after [`OPEN_AFTER`] outage answers in a row, the
//! requests wait in the queue while one probe at a time goes out ([`PROBE_BACKOFF_CAP`] apart
//! at most); the first answer closes the circuit and the queue drains in its order.

use std::time::Duration;

use tokio::time::Instant;

/// Outage answers in a row (connection failures, timeouts, 5xx) that open the circuit. Five,
/// not fewer: an endpoint failing 30 % of requests at random (the soak's emulator) answers
/// three in a row badly every few dozen requests, five only every few hundred; an endpoint
/// that is down fails five in well under a second of a busy operator's requests.
pub const OPEN_AFTER: u32 = 5;
/// The wait before the first probe; doubled after each failed probe.
pub const PROBE_BACKOFF_BASE: Duration = Duration::from_millis(250);
/// The longest wait between probes. Short: a probe costs one request, while each second the
/// circuit stays open after the endpoint came back leaves tokens expired; and far below any
/// token's validity (an hour at least), so a recovered endpoint is noticed long before.
pub const PROBE_BACKOFF_CAP: Duration = Duration::from_secs(2);

/// How an exchange with the endpoint ended, as the circuit sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Success,
    /// Connection refused or reset, a timeout, a 5xx, an answer that was no ACS answer.
    Outage,
    /// The endpoint answered and refused (4xx, 429): it is up.
    Refused,
    /// The request was never sent or its answer never awaited (the caller went away).
    Abandoned,
}

/// Whether requests may go out now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Closed: as many as the budget allows.
    Open,
    /// Open circuit, probe due: exactly one may go, as the probe.
    Probe,
    /// Open circuit, a probe is out: wait for its answer.
    AwaitProbe,
    /// Open circuit: no probe before then.
    Until(Instant),
}

#[derive(Debug, Default)]
pub struct Circuit {
    outages_in_a_row: u32,
    open: Option<Opened>,
}

#[derive(Debug)]
struct Opened {
    probe_out: bool,
    failed_probes: u32,
    next_probe: Instant,
}

impl Circuit {
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    pub fn gate(&self, now: Instant) -> Gate {
        match &self.open {
            None => Gate::Open,
            Some(opened) if opened.probe_out => Gate::AwaitProbe,
            Some(opened) if opened.next_probe > now => Gate::Until(opened.next_probe),
            Some(_) => Gate::Probe,
        }
    }

    /// The probe [`Gate::Probe`] allowed went out.
    pub fn probe_sent(&mut self) {
        if let Some(opened) = &mut self.open {
            opened.probe_out = true;
        }
    }

    /// An exchange ended; `probe` says whether it was the circuit's probe.
    pub fn answered(&mut self, answer: Answer, probe: bool, now: Instant) {
        match answer {
            Answer::Success | Answer::Refused => *self = Circuit::default(),
            Answer::Abandoned => {
                if let Some(opened) = self.open.as_mut().filter(|_| probe) {
                    // Nothing learned: the next probe may go at once.
                    opened.probe_out = false;
                }
            }
            Answer::Outage => {
                self.outages_in_a_row = self.outages_in_a_row.saturating_add(1);
                match &mut self.open {
                    Some(opened) if probe => {
                        opened.probe_out = false;
                        opened.failed_probes = opened.failed_probes.saturating_add(1);
                        opened.next_probe = now + probe_backoff(opened.failed_probes);
                    }
                    // An answer to a request sent before the circuit opened.
                    Some(_) => {}
                    None if self.outages_in_a_row >= OPEN_AFTER => {
                        self.open = Some(Opened {
                            probe_out: false,
                            failed_probes: 0,
                            next_probe: now + probe_backoff(0),
                        });
                    }
                    None => {}
                }
            }
        }
    }
}

/// The wait before the next probe after `failed_probes` failed ones.
fn probe_backoff(failed_probes: u32) -> Duration {
    PROBE_BACKOFF_BASE
        .saturating_mul(2u32.saturating_pow(failed_probes))
        .min(PROBE_BACKOFF_CAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn outages_in_a_row_open_it_and_one_probe_at_a_time_goes() {
        let t0 = Instant::now();
        let mut circuit = Circuit::default();
        for _ in 1..OPEN_AFTER {
            circuit.answered(Answer::Outage, false, t0);
            assert_eq!(circuit.gate(t0), Gate::Open);
        }
        circuit.answered(Answer::Outage, false, t0 + 2 * MS);
        assert_eq!(circuit.gate(t0 + 2 * MS), Gate::Until(t0 + 252 * MS));
        // Answers to requests already out change nothing.
        circuit.answered(Answer::Outage, false, t0 + 3 * MS);
        assert_eq!(circuit.gate(t0 + 3 * MS), Gate::Until(t0 + 252 * MS));
        assert_eq!(circuit.gate(t0 + 252 * MS), Gate::Probe);
        circuit.probe_sent();
        assert_eq!(circuit.gate(t0 + 10_000 * MS), Gate::AwaitProbe);
        // Failed probes back off, doubling up to the cap.
        let mut now = t0 + 300 * MS;
        for expected in [500, 1000, 2000, 2000, 2000] {
            circuit.answered(Answer::Outage, true, now);
            assert_eq!(circuit.gate(now), Gate::Until(now + expected * MS));
            now += expected * MS;
            assert_eq!(circuit.gate(now), Gate::Probe);
            circuit.probe_sent();
        }
        circuit.answered(Answer::Success, true, now);
        assert_eq!(circuit.gate(now), Gate::Open);
        assert!(!circuit.is_open());
    }

    #[test]
    fn any_answer_of_the_endpoint_closes_it_and_resets_the_count() {
        let t0 = Instant::now();
        for answer in [Answer::Success, Answer::Refused] {
            let mut circuit = Circuit::default();
            for _ in 1..OPEN_AFTER {
                circuit.answered(Answer::Outage, false, t0);
            }
            circuit.answered(answer, false, t0);
            for _ in 1..OPEN_AFTER {
                circuit.answered(Answer::Outage, false, t0);
            }
            assert_eq!(circuit.gate(t0), Gate::Open, "{answer:?}");
        }
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_go_at_once() {
        let t0 = Instant::now();
        let mut circuit = Circuit::default();
        for _ in 0..OPEN_AFTER {
            circuit.answered(Answer::Outage, false, t0);
        }
        let due = t0 + PROBE_BACKOFF_BASE;
        circuit.probe_sent();
        circuit.answered(Answer::Abandoned, true, due);
        assert_eq!(circuit.gate(due), Gate::Probe);
        // A request abandoned while closed is nothing to the circuit.
        let mut closed = Circuit::default();
        closed.answered(Answer::Abandoned, false, t0);
        assert_eq!(closed.gate(t0), Gate::Open);
    }
}
