//! Client-side rate limits per ACS resource, so a busy operator waits locally instead of
//! collecting 429s from the service.
//!
//! The service counts each operation in a sliding 30-second window (1000 creates, 1000 issues,
//! 500 deletes, 500 revokes). The limiter here keeps the same count: a log of when requests
//! were *answered* in the last 30 s plus those still in flight, and admits a request only while
//! that total is under the limit. Counting answer times (not send times) makes it exact: the
//! service saw a request no later than its answer came back, so a request sent 30 s after that
//! answer can never share a window with it, whatever the latency.
//!
//! Written by hand rather than with `governor`: GCRA admits at most `burst + W / interval` per
//! window, so staying under the service's sliding window forces a small burst and a sustained
//! rate below the limit, and 10,000 creates took ≈ 312 s against the service's floor of ≈ 270 s
//! (full windows of 1000 every 30 s). A sliding-window log reaches that floor. Nor with a
//! priority-queue crate: the order is a class, then tenants in turn, then deadlines
//! ([`crate::schedule`]), and waiters must keep their place while away, which no general
//! queue models.
//!
//! In front of each budget waits a queue in that order; slots go to its head as reservations
//! under the request's key, which a waiting caller claims at once, and one that stopped
//! waiting ([`Queued`]) claims when it comes back after its [`Turn`] was called. The
//! endpoint's [`Circuit`] decides whether slots go out at all while it fails.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use jiff::Timestamp;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::circuit::{Answer, Circuit, Gate};
use crate::schedule::{Queue, Ticket};

/// The window in which the service counts requests.
pub const WINDOW: Duration = Duration::from_secs(30);

/// One ACS identity operation; each has its own budget at the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    CreateIdentity,
    IssueToken,
    RevokeTokens,
    DeleteIdentity,
    GetIdentity,
}

impl Operation {
    pub const ALL: [Operation; 5] = [
        Operation::CreateIdentity,
        Operation::IssueToken,
        Operation::RevokeTokens,
        Operation::DeleteIdentity,
        Operation::GetIdentity,
    ];

    /// A bounded label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::CreateIdentity => "create_identity",
            Operation::IssueToken => "issue_token",
            Operation::RevokeTokens => "revoke_tokens",
            Operation::DeleteIdentity => "delete_identity",
            Operation::GetIdentity => "get_identity",
        }
    }

    /// Requests the service allows per [`WINDOW`] and resource.
    pub fn published_limit(self) -> u32 {
        match self {
            Operation::CreateIdentity | Operation::IssueToken => 1000,
            Operation::RevokeTokens | Operation::DeleteIdentity => 500,
            // No limit is published for the preview GET. Assume the smaller published budget
            // rather than rely on an unpublished larger one; the operator reads identities
            // only to verify them, so the cap costs nothing.
            Operation::GetIdentity => 500,
        }
    }
}

/// How long a slot granted to a caller that is not waiting (it was told to come back, see
/// [`Queued`]) stays reserved for it: long enough for a reconcile to be scheduled and reach
/// its ACS call even when a window's worth of them (1,000) is called back at once and queues
/// for the controller's workers. A slot nobody claims in time goes back to the budget; only
/// a resource that no longer needs it (deleted, or decided otherwise) leaves one unclaimed.
pub const RESERVATION_TTL: Duration = Duration::from_secs(60);

/// How long the circuit's probe stays reserved for a caller that is not waiting: shorter,
/// since every other request of the endpoint waits for its answer, and a caller that was
/// called back and decided it needs no ACS call after all never claims it.
pub const PROBE_RESERVATION_TTL: Duration = Duration::from_secs(10);

/// How long the next in line, if it can come back when its turn comes ([`Turn`]), waits in
/// [`RateLimits::acquire`] before it is told to: long enough that a request waiting for the next
/// free slot of a busy budget (or for the circuit's next probe) is sent at once, short enough
/// that it never holds a reconcile worker for long.
pub const PATIENCE: Duration = Duration::from_secs(1);

/// Slots reserved at once, per endpoint, for callers that were called back and have not
/// claimed them yet; further slots wait until one is claimed. About an operator's reconcile
/// workers: a caller called back is a reconcile scheduled, and a window's worth (1,000)
/// called back at once would queue for the workers ahead of anything more urgent that comes
/// due meanwhile (a refresh waited 13 s that way), while this many keep every worker busy.
pub const MAX_CALLED_BACK: usize = 64;

/// Called when a request that stopped waiting ([`Queued`]) is granted its slot: the caller
/// should come back (its slot is reserved for [`RESERVATION_TTL`]).
pub type Turn = Arc<dyn Fn() + Send + Sync>;

/// One operation's budget: answers within the last [`WINDOW`], requests in flight and slots
/// reserved for callers coming back.
#[derive(Default)]
struct Lane {
    /// When requests were answered, oldest first.
    answered_at: VecDeque<Instant>,
    in_flight: u32,
    /// Slots granted and not yet claimed, by ticket key.
    reserved: HashMap<String, Reservation>,
    queue: Queue<Waker>,
}

#[derive(Debug, Clone, Copy)]
struct Reservation {
    granted_at: Instant,
    /// The circuit's probe.
    probe: bool,
    /// Granted to a caller that was not waiting: it is being called back, until it comes back
    /// ([`RateLimits::came_back`]).
    called_back: bool,
    /// How long a caller called back took to come back.
    came_back_after: Option<Duration>,
}

impl Reservation {
    fn lapses_at(&self) -> Instant {
        let ttl = match self.probe {
            true => PROBE_RESERVATION_TTL,
            false => RESERVATION_TTL,
        };
        self.granted_at + ttl
    }
}

/// How a waiting request learns that it was granted a slot.
struct Waker {
    /// The caller waits in [`RateLimits::acquire`].
    waiting: Option<Arc<Notify>>,
    /// The caller stopped waiting and is to be called back.
    turn: Option<Turn>,
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waker")
            .field("waiting", &self.waiting.is_some())
            .field("turn", &self.turn.is_some())
            .finish()
    }
}

impl Lane {
    fn forget_before(&mut self, now: Instant) {
        while self
            .answered_at
            .front()
            .is_some_and(|at| *at + WINDOW <= now)
        {
            self.answered_at.pop_front();
        }
    }

    /// Whether the head of the queue waits in [`RateLimits::acquire`] (it claims its slot at
    /// once) rather than to be called back.
    fn head_waits(&self) -> bool {
        self.queue
            .peek()
            .and_then(|head| self.queue.get(&head.key))
            .is_some_and(|head| head.waker.waiting.is_some())
    }

    fn used(&self) -> u32 {
        self.in_flight + self.answered_at.len() as u32 + self.reserved.len() as u32
    }

    /// When counting next changes by itself: the oldest answer leaves the window, or the
    /// oldest reservation lapses.
    fn next_change(&self) -> Option<Instant> {
        let answer = self.answered_at.front().map(|at| *at + WINDOW);
        let lapse = self.reserved.values().map(Reservation::lapses_at).min();
        answer.into_iter().chain(lapse).min()
    }
}

/// Everything about one endpoint that changes, under one lock.
#[derive(Default)]
struct State {
    /// Indexed by `operation as usize`: [`Operation::ALL`] is in declaration order.
    lanes: [Lane; Operation::ALL.len()],
    circuit: Circuit,
    /// Reservations of every lane for callers being called back (see [`MAX_CALLED_BACK`]).
    called_back: usize,
    /// A task is serving the queues as time frees budget (see [`RateLimits::drive`]).
    driven: bool,
}

/// A request that stopped waiting: its place is kept, and its turn is called when its slot is
/// granted. `circuit_open`: it waits for the endpoint to recover rather than for budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued {
    pub since: Timestamp,
    pub circuit_open: bool,
}

/// What the queues of one endpoint hold, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSnapshot {
    pub endpoint: String,
    pub waiting: usize,
    pub oldest_deadline: Option<Timestamp>,
    pub circuit_open: bool,
}

/// How many requests per window the limiter admits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Quota {
    /// The published limits times this factor: 1 for a resource with the default quotas, more
    /// for one whose quotas Microsoft raised.
    Scaled(f64),
    /// No client-side limit (`--acs-rate-limit off`, for an endpoint that sets none).
    Unlimited,
}

impl Default for Quota {
    fn default() -> Self {
        Quota::Scaled(1.0)
    }
}

impl Quota {
    /// Requests of `operation` admitted per [`WINDOW`].
    pub fn limit(self, operation: Operation) -> u32 {
        match self {
            // At least one, so that a tiny factor slows requests down instead of stopping them.
            Quota::Scaled(factor) => {
                (f64::from(operation.published_limit()) * factor).max(1.0) as u32
            }
            Quota::Unlimited => u32::MAX,
        }
    }
}

/// The limiters of one ACS resource, one per operation, and its circuit. Share one per
/// endpoint: every client built for the same endpoint uses [`RateLimits::for_endpoint`] unless
/// given its own.
///
/// Requests wait in a queue per operation served in [`crate::schedule`] order; a slot is
/// granted as a reservation under the request's key, which the caller claims at once (if it
/// still waits) or when it comes back after its [`Turn`] was called.
#[derive(Default)]
pub struct RateLimits {
    quota: Quota,
    state: Mutex<State>,
    /// Wakes the driving task when something changed earlier than it planned to look.
    changed: Notify,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("quota", &self.quota)
            .finish_non_exhaustive()
    }
}

/// Leave to send one request. Say how it ended with [`Permit::answered`] (the circuit takes a
/// permit dropped without an answer as abandoned); dropping it counts the request as answered.
#[must_use = "the request counts as answered when the permit is dropped"]
pub struct Permit {
    limits: Arc<RateLimits>,
    operation: Operation,
    probe: bool,
    answer: Answer,
    /// How long the caller waited for it.
    pub waited: Duration,
    /// For a caller that was called back: how long its reserved slot waited for it to come
    /// back (budget the service could have spent meanwhile).
    pub came_back_after: Option<Duration>,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("operation", &self.operation)
            .field("probe", &self.probe)
            .field("waited", &self.waited)
            .field("came_back_after", &self.came_back_after)
            .finish_non_exhaustive()
    }
}

impl Permit {
    /// How the exchange ended, for the endpoint's circuit.
    pub fn answered(&mut self, answer: Answer) {
        self.answer = answer;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let now = Instant::now();
        let turns = {
            let mut state = self.limits.lock();
            let lane = &mut state.lanes[self.operation as usize];
            lane.in_flight -= 1;
            // Counted even if never sent: the budget errs on the side of the service.
            lane.answered_at.push_back(now);
            state.circuit.answered(self.answer, self.probe, now);
            self.limits.serve(&mut state, now)
        };
        self.limits.changed.notify_one();
        call_turns(turns);
    }
}

fn call_turns(turns: Vec<Turn>) {
    for turn in turns {
        turn();
    }
}

impl RateLimits {
    /// Limiters at the published limits, with nothing counted yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Limiters admitting `quota`, with nothing counted yet.
    pub fn with_quota(quota: Quota) -> Self {
        Self {
            quota,
            ..Self::default()
        }
    }

    fn registry() -> &'static Mutex<HashMap<String, Arc<RateLimits>>> {
        static REGISTRY: OnceLock<Mutex<HashMap<String, Arc<RateLimits>>>> = OnceLock::new();
        REGISTRY.get_or_init(Default::default)
    }

    /// The process-wide limiters of the resource at `endpoint`, created with `quota` by the
    /// first caller (a process uses one quota). An entry outlives its clients while its window
    /// still counts requests (a fresh limiter would forget what the service still counts), and
    /// is dropped, when the next endpoint is added, once no client holds it and its window is
    /// empty: tenants name endpoints, so the registry must not grow with every one ever named.
    pub fn for_endpoint(endpoint: &str, quota: Quota) -> Arc<Self> {
        let key = endpoint.trim_end_matches('/').to_ascii_lowercase();
        let mut registry = Self::registry()
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(limits) = registry.get(&key) {
            return limits.clone();
        }
        // Under the registry's lock a count of one cannot grow: every other handle is a clone
        // of one handed out here.
        registry.retain(|_, limits| Arc::strong_count(limits) > 1 || !limits.is_idle());
        let limits = Arc::new(Self::with_quota(quota));
        registry.insert(key, limits.clone());
        limits
    }

    /// The queues of every endpoint in the registry that has one waiting or an open circuit.
    pub fn snapshots() -> Vec<QueueSnapshot> {
        let registry = Self::registry()
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        registry
            .iter()
            .filter_map(|(endpoint, limits)| {
                let state = limits.lock();
                let queues = state.lanes.iter().map(|lane| &lane.queue);
                let snapshot = QueueSnapshot {
                    endpoint: endpoint.clone(),
                    waiting: queues.clone().map(Queue::len).sum(),
                    oldest_deadline: queues.filter_map(Queue::oldest_deadline).min(),
                    circuit_open: state.circuit.is_open(),
                };
                (snapshot.waiting > 0 || snapshot.circuit_open).then_some(snapshot)
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Nothing answered within the last [`WINDOW`], nothing in flight, reserved or waiting, in
    /// any lane.
    fn is_idle(&self) -> bool {
        let now = Instant::now();
        let mut state = self.lock();
        state.lanes.iter_mut().all(|lane| {
            lane.forget_before(now);
            lane.used() == 0 && lane.queue.is_empty()
        })
    }

    /// Gives up every place and unclaimed slot of `key` (its resource is gone): a place left
    /// behind would be granted to nobody and hold its slot, or the circuit's only probe, for
    /// [`RESERVATION_TTL`] while the others wait.
    pub fn withdraw(self: &Arc<Self>, key: &str) {
        let now = Instant::now();
        let turns = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let mut held_probe = false;
            for lane in &mut state.lanes {
                lane.queue.remove(key);
                if let Some(slot) = lane.reserved.remove(key) {
                    held_probe |= slot.probe;
                    state.called_back -= usize::from(slot.called_back);
                }
            }
            if held_probe {
                state.circuit.answered(Answer::Abandoned, true, now);
            }
            self.serve(state, now)
        };
        self.changed.notify_one();
        call_turns(turns);
    }

    /// [`RateLimits::withdraw`] at every endpoint in the registry.
    pub fn withdraw_everywhere(key: &str) {
        let endpoints: Vec<Arc<RateLimits>> = Self::registry()
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .cloned()
            .collect();
        for limits in endpoints {
            limits.withdraw(key);
        }
    }

    /// Whether the endpoint's circuit is open (see [`crate::circuit`]).
    pub fn circuit_open(&self) -> bool {
        self.lock().circuit.is_open()
    }

    /// Waits for a slot of `operation` in `ticket`'s place in the queue. A caller with a `turn`
    /// waits at most [`PATIENCE`] if it is next in line, else not at all: then it gets
    /// [`Queued`], keeps its place, and `turn` is called once the slot is reserved for it;
    /// asking again with the same key claims it. A caller without one waits as long as it takes.
    pub async fn acquire(
        self: &Arc<Self>,
        operation: Operation,
        ticket: &Ticket,
        turn: Option<&Turn>,
    ) -> Result<Permit, Queued> {
        let start = Instant::now();
        loop {
            self.reserve(operation, ticket, turn).await?;
            // Only a lapse or a withdrawal takes the slot away in between: then it queues again.
            if let Some(permit) = self.claim(&mut self.lock(), operation, &ticket.key, start) {
                return Ok(permit);
            }
        }
    }

    /// As [`RateLimits::acquire`], but the slot stays reserved under `ticket`'s key (for
    /// [`RESERVATION_TTL`]) instead of being claimed: for a caller that must write something
    /// before it sends, and should write it only once the request can go out.
    pub async fn reserve(
        self: &Arc<Self>,
        operation: Operation,
        ticket: &Ticket,
        turn: Option<&Turn>,
    ) -> Result<(), Queued> {
        let notify = Arc::new(Notify::new());
        let (since, next_in_line, turns) = {
            let mut state = self.lock();
            let waker = Waker {
                waiting: Some(notify.clone()),
                turn: turn.cloned(),
            };
            let since = match self.came_back(&mut state, operation, &ticket.key) {
                true => ticket.asked_at,
                false => state.lanes[operation as usize]
                    .queue
                    .push(ticket.clone(), waker),
            };
            let queue = &state.lanes[operation as usize].queue;
            let next_in_line = queue.peek().is_none_or(|next| next.key == ticket.key);
            (since, next_in_line, self.serve(&mut state, Instant::now()))
        };
        self.changed.notify_one();
        call_turns(turns);
        let reserved = |state: &State| {
            let lane = &state.lanes[operation as usize];
            lane.reserved.contains_key(&ticket.key)
        };
        let granted = async {
            while !reserved(&self.lock()) {
                notify.notified().await;
            }
        };
        let Some(turn) = turn else {
            granted.await;
            return Ok(());
        };
        // Only the next in line waits: one with others ahead would hold its reconcile worker
        // for nothing (a burst of thousands would hold them all), so it stops waiting at once.
        let patience = if next_in_line {
            PATIENCE
        } else {
            Duration::ZERO
        };
        if tokio::time::timeout(patience, granted).await.is_ok() {
            return Ok(());
        }
        let mut state = self.lock();
        if reserved(&state) {
            return Ok(());
        }
        if let Some(waiting) = state.lanes[operation as usize].queue.get_mut(&ticket.key) {
            waiting.waker.waiting = None;
            waiting.waker.turn = Some(turn.clone());
        }
        Err(Queued {
            since,
            circuit_open: state.circuit.is_open(),
        })
    }

    /// Whether a slot is reserved under `key`. If it was granted to a caller being called back,
    /// that caller is back: it no longer counts among those (see [`MAX_CALLED_BACK`]), even if
    /// it writes something before it claims the slot, and the next may be called back.
    fn came_back(&self, state: &mut State, operation: Operation, key: &str) -> bool {
        let lane = &mut state.lanes[operation as usize];
        let Some(reservation) = lane.reserved.get_mut(key) else {
            return false;
        };
        if reservation.called_back {
            reservation.called_back = false;
            reservation.came_back_after = Some(reservation.granted_at.elapsed());
            state.called_back -= 1;
            self.changed.notify_one();
        }
        true
    }

    /// Turns the slot reserved under `key`, if there is one, into a permit.
    fn claim(
        self: &Arc<Self>,
        state: &mut State,
        operation: Operation,
        key: &str,
        start: Instant,
    ) -> Option<Permit> {
        self.came_back(state, operation, key);
        let lane = &mut state.lanes[operation as usize];
        let reservation = lane.reserved.remove(key)?;
        lane.in_flight += 1;
        Some(Permit {
            limits: self.clone(),
            operation,
            probe: reservation.probe,
            answer: Answer::Abandoned,
            waited: start.elapsed(),
            came_back_after: reservation.came_back_after,
        })
    }

    /// Grants what the budgets and the circuit allow, in queue order, and makes sure a task
    /// keeps doing so while requests wait. While the circuit is open the one probe is the most
    /// urgent request of any lane with budget. Returns the turns to call (after the lock is
    /// released: a turn may do anything).
    fn serve(self: &Arc<Self>, state: &mut State, now: Instant) -> Vec<Turn> {
        let mut turns = Vec::new();
        for lane in &mut state.lanes {
            lane.forget_before(now);
            let mut lapsed_probe = false;
            lane.reserved.retain(|_, reservation| {
                let live = reservation.lapses_at() > now;
                lapsed_probe |= !live && reservation.probe;
                if !live && reservation.called_back {
                    state.called_back -= 1;
                }
                live
            });
            if lapsed_probe {
                state.circuit.answered(Answer::Abandoned, true, now);
            }
        }
        // The lane whose head is the most urgent of those with budget (and, for a caller to be
        // called back, room among those being called back): every lane's head competes, so a
        // due refresh's token issue goes ahead of a burst's creates.
        let most_urgent = |state: &State| {
            Operation::ALL
                .into_iter()
                .filter(|operation| {
                    let lane = &state.lanes[*operation as usize];
                    !lane.queue.is_empty()
                        && lane.used() < self.quota.limit(*operation)
                        && (lane.head_waits() || state.called_back < MAX_CALLED_BACK)
                })
                .min_by_key(|operation| {
                    let ticket = state.lanes[*operation as usize].queue.peek();
                    ticket.map(|ticket| (ticket.class, ticket.deadline))
                })
        };
        match state.circuit.gate(now) {
            Gate::Open => {
                while let Some(operation) = most_urgent(state) {
                    self.grant(state, operation, false, now, &mut turns);
                }
            }
            Gate::Probe => {
                if let Some(operation) = most_urgent(state) {
                    state.circuit.probe_sent();
                    self.grant(state, operation, true, now, &mut turns);
                }
            }
            Gate::AwaitProbe | Gate::Until(_) => {}
        }
        let waiting = state.lanes.iter().any(|lane| !lane.queue.is_empty());
        let reserved = state.lanes.iter().any(|lane| !lane.reserved.is_empty());
        if (waiting || reserved) && !state.driven {
            state.driven = true;
            tokio::spawn(self.clone().drive());
        }
        turns
    }

    /// Reserves a slot of `operation` for the head of its queue and wakes it: at once if it
    /// waits, through its turn if it stopped waiting.
    fn grant(
        &self,
        state: &mut State,
        operation: Operation,
        probe: bool,
        now: Instant,
        turns: &mut Vec<Turn>,
    ) {
        let lane = &mut state.lanes[operation as usize];
        let Some(waiting) = lane.queue.pop() else {
            return;
        };
        let reservation = Reservation {
            granted_at: now,
            probe,
            called_back: waiting.waker.waiting.is_none(),
            came_back_after: None,
        };
        state.called_back += usize::from(reservation.called_back);
        lane.reserved.insert(waiting.ticket.key, reservation);
        match (waiting.waker.waiting, waiting.waker.turn) {
            (Some(notify), _) => notify.notify_one(),
            (None, Some(turn)) => turns.push(turn),
            (None, None) => {}
        }
    }

    /// Serves the queues whenever time frees budget (an answer leaves the window, a reservation
    /// lapses, a probe is due), until nothing waits or is reserved.
    async fn drive(self: Arc<Self>) {
        loop {
            let next = {
                let mut state = self.lock();
                let now = Instant::now();
                let turns = self.serve(&mut state, now);
                let waiting = state.lanes.iter().any(|lane| !lane.queue.is_empty());
                let reserved = state.lanes.iter().any(|lane| !lane.reserved.is_empty());
                if !waiting && !reserved {
                    state.driven = false;
                    drop(state);
                    call_turns(turns);
                    return;
                }
                let probe = match state.circuit.gate(now) {
                    Gate::Until(at) => Some(at),
                    _ => None,
                };
                let next = state
                    .lanes
                    .iter()
                    .filter_map(Lane::next_change)
                    .chain(probe)
                    .min();
                drop(state);
                call_turns(turns);
                next
            };
            match next {
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = self.changed.notified() => {}
                    }
                }
                None => self.changed.notified().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Class;
    use crate::schedule::tests::ticket;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A caller without a turn, new and due now, under a key of its own.
    fn anyone() -> Ticket {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let key = format!("caller-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        ticket(Class::New, 0, "", &key)
    }

    /// Waits as long as it takes, as a caller without a turn does.
    async fn wait_for(limits: &Arc<RateLimits>, operation: Operation) -> Permit {
        limits
            .acquire(operation, &anyone(), None)
            .await
            .expect("a caller without a turn is never told to come back")
    }

    /// The most admissions in any half-open window `[t, t + width)`.
    fn busiest_window(admitted: &[Duration], width: Duration) -> usize {
        let mut busiest = 0;
        let mut first = 0;
        for (last, &time) in admitted.iter().enumerate() {
            while admitted[first] + width <= time {
                first += 1;
            }
            busiest = busiest.max(last - first + 1);
        }
        busiest
    }

    #[tokio::test(start_paused = true)]
    async fn greedy_callers_fill_each_window_and_never_exceed_it() {
        let limits = Arc::new(RateLimits::new());
        for operation in [Operation::CreateIdentity, Operation::DeleteIdentity] {
            let limit = operation.published_limit() as usize;
            let origin = Instant::now();
            let mut answered = Vec::new();
            for _ in 0..3 * limit {
                let mut permit = wait_for(&limits, operation).await;
                // Each request is answered 1 ms after it was sent.
                tokio::time::sleep(Duration::from_millis(1)).await;
                permit.answered(Answer::Success);
                drop(permit);
                answered.push(origin.elapsed());
            }
            assert!(busiest_window(&answered, WINDOW) <= limit, "{operation:?}");
            // Three windows' worth go out in just over two windows: the service's own floor.
            let took = *answered.last().unwrap();
            let floor = 2 * WINDOW + Duration::from_millis(1) * limit as u32;
            assert!(
                took >= 2 * WINDOW && took <= floor + Duration::from_secs(1),
                "{operation:?}: {took:?}"
            );
            tokio::time::sleep(WINDOW).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn requests_in_flight_count_until_answered() {
        let limits = Arc::new(RateLimits::new());
        let limit = Operation::DeleteIdentity.published_limit();
        let mut held = Vec::new();
        for _ in 0..limit {
            held.push(wait_for(&limits, Operation::DeleteIdentity).await);
        }
        let at_once = |permit: &Permit| permit.waited.is_zero() && permit.came_back_after.is_none();
        assert!(held.iter().all(at_once));
        // Other operations have budgets of their own.
        assert!(
            wait_for(&limits, Operation::CreateIdentity)
                .await
                .waited
                .is_zero()
        );
        // The next delete waits for the answers (5 s from now), then a full window after them.
        let next = tokio::spawn({
            let limits = limits.clone();
            async move { wait_for(&limits, Operation::DeleteIdentity).await.waited }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        for mut permit in held {
            permit.answered(Answer::Success);
        }
        assert_eq!(next.await.unwrap(), Duration::from_secs(5) + WINDOW);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_the_budget_in_arrival_order() {
        let limits = Arc::new(RateLimits::new());
        let origin = Instant::now();
        let tasks: Vec<_> = (0..1500)
            .map(|_| {
                let limits = limits.clone();
                tokio::spawn(async move {
                    let permit = wait_for(&limits, Operation::IssueToken).await;
                    let sent = origin.elapsed();
                    drop(permit);
                    sent
                })
            })
            .collect();
        let mut admitted = Vec::new();
        for task in tasks {
            admitted.push(task.await.unwrap());
        }
        // First come, first served: admissions follow the order the callers arrived in.
        assert!(admitted.windows(2).all(|pair| pair[0] <= pair[1]));
        assert!(busiest_window(&admitted, WINDOW) <= 1000);
        assert_eq!(
            *admitted.last().unwrap(),
            WINDOW,
            "the 1001st waits exactly one window"
        );
    }

    /// A turn that records, in `log`, that `key`'s slot was granted.
    fn recording(log: &Arc<Mutex<Vec<String>>>, key: &str) -> Turn {
        let (log, key) = (log.clone(), key.to_owned());
        Arc::new(move || log.lock().unwrap().push(key.clone()))
    }

    /// Asks for a slot for each ticket at once, in one task each.
    fn ask_all(
        limits: &Arc<RateLimits>,
        tickets: &[Ticket],
        log: &Arc<Mutex<Vec<String>>>,
    ) -> Vec<tokio::task::JoinHandle<Result<Permit, Queued>>> {
        tickets
            .iter()
            .map(|ticket| {
                let (limits, ticket) = (limits.clone(), ticket.clone());
                let turn = recording(log, &ticket.key);
                tokio::spawn(async move {
                    limits
                        .acquire(Operation::IssueToken, &ticket, Some(&turn))
                        .await
                })
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_with_a_turn_stops_waiting_keeps_its_place_and_claims_its_slot() {
        let limits = Arc::new(RateLimits::with_quota(Quota::Scaled(0.0001)));
        let mut first = wait_for(&limits, Operation::IssueToken).await;
        first.answered(Answer::Success);
        drop(first);
        let log = Arc::default();
        let waiter = ticket(Class::Refresh, 0, "b", "b/due");
        let turn = recording(&log, &waiter.key);
        let started = Instant::now();
        let queued = limits
            .acquire(Operation::IssueToken, &waiter, Some(&turn))
            .await
            .unwrap_err();
        assert_eq!(
            started.elapsed(),
            PATIENCE,
            "held no longer than its patience"
        );
        assert_eq!(
            queued,
            Queued {
                since: waiter.asked_at,
                circuit_open: false
            }
        );
        assert!(log.lock().unwrap().is_empty());
        // Asking again before its turn keeps the place and the time it first asked.
        let mut later = waiter.clone();
        later.asked_at += jiff::SignedDuration::from_secs(5);
        let again = limits
            .acquire(Operation::IssueToken, &later, Some(&turn))
            .await;
        assert_eq!(again.unwrap_err().since, waiter.asked_at);
        // The slot frees a window after the first answer: the turn is called, and the slot
        // waits for its claim.
        tokio::time::sleep_until(started + WINDOW + Duration::from_millis(1)).await;
        assert_eq!(*log.lock().unwrap(), ["b/due"]);
        // It comes back 2 s later: the slot was held that long unsent.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let permit = limits
            .acquire(Operation::IssueToken, &waiter, Some(&turn))
            .await
            .unwrap();
        assert!(permit.waited.is_zero());
        let held = Duration::from_secs(2) + Duration::from_millis(1);
        assert_eq!(permit.came_back_after, Some(held));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unclaimed_slot_goes_back_to_the_budget() {
        let limits = Arc::new(RateLimits::with_quota(Quota::Scaled(0.0001)));
        drop(wait_for(&limits, Operation::IssueToken).await);
        let log = Arc::default();
        let gone = ticket(Class::New, 0, "a", "a/gone");
        let turn = recording(&log, &gone.key);
        assert!(
            limits
                .acquire(Operation::IssueToken, &gone, Some(&turn))
                .await
                .is_err()
        );
        let next = tokio::spawn({
            let limits = limits.clone();
            async move { wait_for(&limits, Operation::IssueToken).await.waited }
        });
        // a/gone is granted a window after the first answer, never claims, and its slot lapses.
        assert_eq!(next.await.unwrap(), WINDOW + RESERVATION_TTL - PATIENCE);
        assert_eq!(*log.lock().unwrap(), ["a/gone"]);
    }

    #[tokio::test(start_paused = true)]
    async fn freed_slots_go_by_class_deadline_and_tenant_turns() {
        let limits = Arc::new(RateLimits::with_quota(Quota::Scaled(0.0001)));
        drop(wait_for(&limits, Operation::IssueToken).await);
        let log = Arc::default();
        let tickets = [
            ticket(Class::New, -90, "a", "a/new-1"),
            ticket(Class::New, -80, "a", "a/new-2"),
            ticket(Class::Refresh, 0, "a", "a/refresh-1"),
            ticket(Class::Refresh, 5, "a", "a/refresh-2"),
            ticket(Class::Refresh, 60, "b", "b/refresh"),
            ticket(Class::Expiring, 100, "c", "c/expiring"),
        ];
        for task in ask_all(&limits, &tickets, &log) {
            assert!(task.await.unwrap().is_err());
        }
        // One slot per window; each claim is answered at once.
        for _ in 0..tickets.len() {
            tokio::time::sleep(WINDOW + Duration::from_secs(1)).await;
            let granted = log.lock().unwrap().last().cloned().unwrap();
            let ticket = tickets.iter().find(|t| t.key == granted).unwrap();
            let turn = recording(&log, &ticket.key);
            let permit = limits
                .acquire(Operation::IssueToken, ticket, Some(&turn))
                .await;
            drop(permit.expect("its slot is reserved"));
        }
        assert_eq!(
            *log.lock().unwrap(),
            [
                "c/expiring",
                "a/refresh-1",
                "b/refresh",
                "a/refresh-2",
                "a/new-1",
                "a/new-2"
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_delays_another_namespaces_refreshes_no_longer_than_the_budgets_pace() {
        let limits = Arc::new(RateLimits::new());
        let origin = Instant::now();
        let spawn = |ticket: Ticket| {
            let limits = limits.clone();
            tokio::spawn(async move {
                let permit = limits.acquire(Operation::IssueToken, &ticket, None).await;
                let granted = origin.elapsed();
                drop(permit);
                granted
            })
        };
        // Namespace a: 3,000 refreshes, all due earlier than b's; the first 1,000 go at once.
        let a: Vec<_> = (0..3000)
            .map(|i| spawn(ticket(Class::Refresh, -100, "a", &format!("a/{i}"))))
            .collect();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let b: Vec<_> = (0..100)
            .map(|i| spawn(ticket(Class::Refresh, 0, "b", &format!("b/{i}"))))
            .collect();
        let mut b_granted = Vec::new();
        for task in b {
            b_granted.push(task.await.unwrap());
        }
        // b's all go with the first slots the window frees (30 s after a's first 1,000), taking
        // turns with a, although 1,900 of a's wait ahead of them by deadline.
        assert!(b_granted.iter().all(|at| *at == WINDOW), "{b_granted:?}");
        let mut a_granted = Vec::new();
        for task in a {
            a_granted.push(task.await.unwrap());
        }
        let a_in_that_window = a_granted.iter().filter(|at| **at == WINDOW).count();
        assert_eq!(
            a_in_that_window, 900,
            "b's 100 took 100 of a's slots, no more"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_sends_one_probe_at_a_time_then_drains_in_deadline_order() {
        use crate::circuit::{OPEN_AFTER, PROBE_BACKOFF_BASE};
        let limits = Arc::new(RateLimits::new());
        for _ in 0..OPEN_AFTER {
            wait_for(&limits, Operation::IssueToken)
                .await
                .answered(Answer::Outage);
        }
        assert!(limits.circuit_open());
        let log = Arc::default();
        let tickets = [
            ticket(Class::New, 0, "a", "a/new"),
            ticket(Class::Refresh, -10, "a", "a/refresh"),
            ticket(Class::Expiring, -5, "b", "b/expiring"),
            ticket(Class::Refresh, -20, "b", "b/refresh"),
        ];
        let mut probes = Vec::new();
        for task in ask_all(&limits, &tickets, &log) {
            match task.await.unwrap() {
                Ok(permit) => probes.push(permit),
                Err(queued) => assert!(queued.circuit_open),
            }
        }
        // The most urgent request went out as the probe, after the first probe delay; the
        // others wait for its answer, however long it takes.
        assert_eq!(probes.len(), 1);
        let mut probe = probes.pop().unwrap();
        assert_eq!(probe.waited, PROBE_BACKOFF_BASE);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(log.lock().unwrap().is_empty());
        // It fails and its caller asks again at once: the next probe, a backoff later, is the
        // same request again, still the most urgent.
        probe.answered(Answer::Outage);
        drop(probe);
        let turn = recording(&log, "b/expiring");
        let mut probe = limits
            .acquire(Operation::IssueToken, &tickets[2], Some(&turn))
            .await
            .expect("the next probe, within its patience");
        assert_eq!(probe.waited, 2 * PROBE_BACKOFF_BASE);
        assert!(log.lock().unwrap().is_empty());
        // It succeeds: everything waiting is granted at once (the budget allows it), in order.
        probe.answered(Answer::Success);
        drop(probe);
        assert!(!limits.circuit_open());
        assert_eq!(*log.lock().unwrap(), ["b/refresh", "a/refresh", "a/new"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reserved_slot_counts_in_the_budget_until_the_same_key_claims_it_at_once() {
        // A budget of one create per window.
        let limits = Arc::new(RateLimits::with_quota(Quota::Scaled(0.001)));
        let operation = Operation::CreateIdentity;
        let holder = anyone();
        limits.reserve(operation, &holder, None).await.unwrap();

        let log = Arc::new(Mutex::new(Vec::new()));
        let other = anyone();
        let turn = recording(&log, &other.key);
        let queued = limits.acquire(operation, &other, Some(&turn)).await;
        assert!(queued.is_err(), "the reserved slot is spent");

        let started = Instant::now();
        let permit = limits.acquire(operation, &holder, None).await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(
            permit.came_back_after, None,
            "it was waiting, not called back"
        );
        drop(permit);
        assert!(log.lock().unwrap().is_empty(), "one slot, counted once");
    }

    #[tokio::test(start_paused = true)]
    async fn callers_are_called_back_no_more_than_max_called_back_at_a_time() {
        let limits = Arc::new(RateLimits::new());
        for _ in 0..Operation::IssueToken.published_limit() {
            wait_for(&limits, Operation::IssueToken)
                .await
                .answered(Answer::Success);
        }
        let log = Arc::default();
        let tickets: Vec<_> = (0..3 * MAX_CALLED_BACK as i64)
            .map(|i| ticket(Class::New, i, "a", &format!("a/{i}")))
            .collect();
        for task in ask_all(&limits, &tickets, &log) {
            assert!(task.await.unwrap().is_err(), "queued: the window is full");
        }
        // The window frees a full budget, yet only so many are called back, in order.
        tokio::time::sleep(WINDOW).await;
        let called = |log: &Arc<Mutex<Vec<String>>>| log.lock().unwrap().clone();
        let expected: Vec<_> = tickets.iter().map(|ticket| ticket.key.clone()).collect();
        assert_eq!(called(&log), expected[..MAX_CALLED_BACK]);
        // Each one that comes back and claims its slot lets the next be called.
        for ticket in &tickets[..2] {
            let turn = recording(&log, &ticket.key);
            let permit = limits
                .acquire(Operation::IssueToken, ticket, Some(&turn))
                .await
                .expect("its slot, reserved");
            drop(permit);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(called(&log), expected[..MAX_CALLED_BACK + 2]);
        // So does one that comes back to hold its slot while it writes before sending.
        let turn = recording(&log, &tickets[2].key);
        let held = limits.reserve(Operation::IssueToken, &tickets[2], Some(&turn));
        held.await.expect("its slot, reserved");
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(called(&log), expected[..MAX_CALLED_BACK + 3]);
        // Those that never come back lose their slots after the reservation's time.
        tokio::time::sleep(RESERVATION_TTL).await;
        assert_eq!(called(&log), expected[..2 * MAX_CALLED_BACK + 3]);
    }

    /// An endpoint whose circuit is open, its next probe 2 s away (beyond any patience), and
    /// two resources queued: the probe is granted to the more urgent one, which is not waiting.
    async fn probe_granted_to_one_of_two(
        log: &Arc<Mutex<Vec<String>>>,
    ) -> (Arc<RateLimits>, Ticket) {
        use crate::circuit::OPEN_AFTER;
        let limits = Arc::new(RateLimits::new());
        // Opened, then three failed probes.
        for _ in 0..OPEN_AFTER + 3 {
            wait_for(&limits, Operation::IssueToken)
                .await
                .answered(Answer::Outage);
        }
        let tickets = [
            ticket(Class::Expiring, -5, "a", "a/gone"),
            ticket(Class::Refresh, 0, "b", "b/stays"),
        ];
        for task in ask_all(&limits, &tickets, log) {
            assert!(task.await.unwrap().unwrap_err().circuit_open);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            *log.lock().unwrap(),
            ["a/gone"],
            "the probe, to the most urgent"
        );
        (limits, tickets[1].clone())
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_nobody_claims_passes_on_when_its_resource_withdraws_or_after_its_ttl() {
        for withdrawn in [true, false] {
            let log = Arc::default();
            let (limits, stays) = probe_granted_to_one_of_two(&log).await;
            // a/gone was deleted (or decided it needs no call) and never claims it: the other
            // waits for an answer that never comes.
            tokio::time::sleep(PROBE_RESERVATION_TTL / 2).await;
            assert_eq!(log.lock().unwrap().len(), 1);
            match withdrawn {
                true => limits.withdraw("a/gone"),
                false => {
                    tokio::time::sleep(PROBE_RESERVATION_TTL / 2 + Duration::from_millis(1)).await
                }
            }
            assert_eq!(
                *log.lock().unwrap(),
                ["a/gone", "b/stays"],
                "withdrawn: {withdrawn}"
            );
            let turn = recording(&log, "b/stays");
            let probe = limits
                .acquire(Operation::IssueToken, &stays, Some(&turn))
                .await
                .expect("its slot, reserved");
            assert!(probe.waited.is_zero());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_quota_scales_or_lifts_the_published_limits() {
        assert_eq!(Quota::Scaled(2.5).limit(Operation::CreateIdentity), 2500);
        assert_eq!(Quota::Scaled(0.0001).limit(Operation::RevokeTokens), 1);
        for (quota, admitted_at_once) in [(Quota::Scaled(2.0), 1000), (Quota::Unlimited, 5000)] {
            let limits = Arc::new(RateLimits::with_quota(quota));
            let mut held = Vec::new();
            for _ in 0..5000 {
                let permit = tokio::time::timeout(
                    Duration::from_millis(1),
                    wait_for(&limits, Operation::DeleteIdentity),
                )
                .await;
                match permit {
                    Ok(permit) => held.push(permit),
                    Err(_) => break,
                }
            }
            assert_eq!(held.len(), admitted_at_once, "{quota:?}");
        }
    }

    #[test]
    fn one_registry_entry_per_endpoint() {
        let quota = Quota::default();
        let a = RateLimits::for_endpoint("https://r.communication.azure.com", quota);
        let b = RateLimits::for_endpoint("https://R.communication.azure.com/", quota);
        let other = RateLimits::for_endpoint("https://s.communication.azure.com", quota);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &other));
    }

    #[tokio::test(start_paused = true)]
    async fn the_registry_drops_entries_nobody_uses_once_their_window_is_empty() {
        let quota = Quota::default();
        let endpoint = "https://evicted.communication.azure.com";
        let limits = RateLimits::for_endpoint(endpoint, quota);
        let mut permit = wait_for(&limits, Operation::IssueToken).await;
        permit.answered(Answer::Success);
        drop(permit);
        let unused = Arc::downgrade(&limits);
        drop(limits);
        // Another endpoint arrives while the answer still counts: the entry stays.
        let held = RateLimits::for_endpoint("https://held.communication.azure.com", quota);
        assert!(
            unused.upgrade().is_some(),
            "dropped while its window counted"
        );

        tokio::time::sleep(WINDOW).await;
        let _next = RateLimits::for_endpoint("https://next.communication.azure.com", quota);
        assert!(unused.upgrade().is_none(), "kept although idle and unused");
        // An entry a client still holds stays, idle as it is.
        let again = RateLimits::for_endpoint("https://held.communication.azure.com", quota);
        assert!(Arc::ptr_eq(&held, &again));
    }
}
