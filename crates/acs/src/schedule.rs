//! Which waiting request an ACS budget serves next: the ordering rules, pure.
//!
//! Requests are served by [`Class`] first (how soon a workload would notice), then round-robin
//! over the tenants (namespaces) waiting in that class, then in deadline order within a
//! tenant, ties by arrival. Round-robin rather than one deadline order across tenants: a
//! tenant's burst of 5,000 requests with early deadlines would otherwise hold another tenant's
//! single due refresh behind all of them; served in turn, the other tenant waits for at most
//! one request of each busy tenant.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use jiff::Timestamp;

/// How urgent a request is; the declaration order is the serving order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Revoking tokens that leaked (the revoke annotation), and the reissue after it: every
    /// minute the leaked token works is a minute too many.
    LeakedRevoke,
    /// A token expired or within the refresh floor of expiry, or lost from its Secret: its
    /// workloads fail (or soon will). Deadline: the expiry minus the floor.
    Expiring,
    /// A refresh whose planned time came. Deadline: the planned time.
    Refresh,
    /// A new identity, a spec change, a cleanup: nothing breaks while it waits. Deadline: when
    /// it was asked for.
    New,
}

impl Class {
    pub const ALL: [Class; 4] = [
        Class::LeakedRevoke,
        Class::Expiring,
        Class::Refresh,
        Class::New,
    ];
}

/// One request's place in the queue of an ACS budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub class: Class,
    pub deadline: Timestamp,
    /// Whose request it is (a namespace): fairness is between tenants.
    pub tenant: String,
    /// Who asks (a resource): one place per key and budget; asking again keeps the place.
    pub key: String,
    /// When the key first asked; kept while it waits, so a waiter can say since when.
    pub asked_at: Timestamp,
}

/// A waiting request and what wakes it when it is served.
#[derive(Debug)]
pub struct Waiting<W> {
    pub ticket: Ticket,
    pub waker: W,
    arrival: u64,
}

/// A class and a tenant: the requests of one line.
type LineKey = (Class, String);
/// One line's requests in serving order: (deadline, arrival, key).
type Line = BTreeSet<(Timestamp, u64, String)>;

/// The requests waiting for one budget.
#[derive(Debug)]
pub struct Queue<W> {
    by_key: HashMap<String, Waiting<W>>,
    lines: BTreeMap<LineKey, Line>,
    /// The serve count at which each waiting tenant of a class was last served; a tenant
    /// absent here has not been served since it started waiting, and goes first.
    served_at: HashMap<LineKey, u64>,
    arrivals: u64,
    serves: u64,
}

impl<W> Default for Queue<W> {
    fn default() -> Self {
        Self {
            by_key: HashMap::new(),
            lines: BTreeMap::new(),
            served_at: HashMap::new(),
            arrivals: 0,
            serves: 0,
        }
    }
}

impl<W> Queue<W> {
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The earliest deadline waiting.
    pub fn oldest_deadline(&self) -> Option<Timestamp> {
        self.lines
            .values()
            .filter_map(|line| line.first().map(|(deadline, _, _)| *deadline))
            .min()
    }

    /// The waiting request of `key`, if it waits.
    pub fn get(&self, key: &str) -> Option<&Waiting<W>> {
        self.by_key.get(key)
    }

    /// The waiting request of `key`, if it waits.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Waiting<W>> {
        self.by_key.get_mut(key)
    }

    /// Queues `ticket`; when its key waits already, it keeps its arrival and `asked_at` and
    /// takes the more urgent of the two places. Returns since when the key waits.
    pub fn push(&mut self, ticket: Ticket, waker: W) -> Timestamp {
        let (arrival, asked_at, ticket) = match self.by_key.remove(&ticket.key) {
            Some(waiting) => {
                self.unlink(&waiting.ticket, waiting.arrival);
                let old = waiting.ticket;
                let asked_at = old.asked_at.min(ticket.asked_at);
                let more_urgent = (ticket.class, ticket.deadline) < (old.class, old.deadline);
                let ticket = if more_urgent { ticket } else { old };
                (waiting.arrival, asked_at, ticket)
            }
            None => {
                self.arrivals += 1;
                (self.arrivals, ticket.asked_at, ticket)
            }
        };
        let ticket = Ticket { asked_at, ..ticket };
        self.lines
            .entry((ticket.class, ticket.tenant.clone()))
            .or_default()
            .insert((ticket.deadline, arrival, ticket.key.clone()));
        self.by_key.insert(
            ticket.key.clone(),
            Waiting {
                ticket,
                waker,
                arrival,
            },
        );
        asked_at
    }

    /// The request to serve next: the most urgent class waiting, in it the tenant served
    /// longest ago (one not served since it started waiting first; ties by the earlier head),
    /// and that tenant's earliest deadline.
    pub fn peek(&self) -> Option<&Ticket> {
        let class = Class::ALL.into_iter().find(|class| {
            self.lines
                .range((*class, String::new())..)
                .next()
                .is_some_and(|((c, _), _)| c == class)
        })?;
        let (_, line) = self
            .lines
            .range((class, String::new())..)
            .take_while(|((c, _), _)| *c == class)
            .min_by_key(|(line_key, line)| {
                let served = self.served_at.get(*line_key).copied().unwrap_or(0);
                (served, line.first().map(|(d, a, _)| (*d, *a)))
            })?;
        let (_, _, key) = line.first()?;
        self.by_key.get(key).map(|waiting| &waiting.ticket)
    }

    /// Takes the request [`Queue::peek`] shows.
    pub fn pop(&mut self) -> Option<Waiting<W>> {
        let key = self.peek()?.key.clone();
        let waiting = self.by_key.remove(&key)?;
        self.unlink(&waiting.ticket, waiting.arrival);
        self.serves += 1;
        let line_key = (waiting.ticket.class, waiting.ticket.tenant.clone());
        if self.lines.contains_key(&line_key) {
            self.served_at.insert(line_key, self.serves);
        }
        Some(waiting)
    }

    /// Takes `key`'s request out of the queue, if it waits.
    pub fn remove(&mut self, key: &str) -> Option<Waiting<W>> {
        let waiting = self.by_key.remove(key)?;
        self.unlink(&waiting.ticket, waiting.arrival);
        Some(waiting)
    }

    /// Drops `ticket`'s entry from its line, and the line (and its turn) once empty, so the
    /// queue holds nothing of tenants that stopped waiting.
    fn unlink(&mut self, ticket: &Ticket, arrival: u64) {
        let line_key = (ticket.class, ticket.tenant.clone());
        if let Some(line) = self.lines.get_mut(&line_key) {
            line.remove(&(ticket.deadline, arrival, ticket.key.clone()));
            if line.is_empty() {
                self.lines.remove(&line_key);
                self.served_at.remove(&line_key);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(T0 + second).unwrap()
    }

    /// A ticket asked for at T0, due `deadline` seconds after it.
    pub(crate) fn ticket(class: Class, deadline: i64, tenant: &str, key: &str) -> Ticket {
        Ticket {
            class,
            deadline: at(deadline),
            tenant: tenant.into(),
            key: key.into(),
            asked_at: at(0),
        }
    }

    fn served(queue: &mut Queue<()>) -> Vec<String> {
        std::iter::from_fn(|| queue.pop().map(|waiting| waiting.ticket.key)).collect()
    }

    #[test]
    fn classes_go_first_then_deadlines_then_arrival() {
        use Class::*;
        // (name, pushed in this order, served in this order)
        let cases: [(&str, Vec<Ticket>, Vec<&str>); 4] = [
            (
                "an expiring token beats a due refresh and a new identity",
                vec![
                    ticket(New, 0, "a", "new"),
                    ticket(Refresh, -50, "a", "refresh"),
                    ticket(Expiring, 100, "a", "expiring"),
                ],
                vec!["expiring", "refresh", "new"],
            ),
            (
                "a leaked-token revoke jumps every queue",
                vec![
                    ticket(Expiring, -600, "a", "expired"),
                    ticket(LeakedRevoke, 500, "b", "leak"),
                ],
                vec!["leak", "expired"],
            ),
            (
                "within a tenant and class, earliest deadline first",
                vec![
                    ticket(Refresh, 30, "a", "late"),
                    ticket(Refresh, 10, "a", "early"),
                    ticket(Refresh, 20, "a", "middle"),
                ],
                vec!["early", "middle", "late"],
            ),
            (
                "equal deadlines go by arrival",
                vec![
                    ticket(New, 5, "a", "first"),
                    ticket(New, 5, "a", "second"),
                    ticket(New, 5, "a", "third"),
                ],
                vec!["first", "second", "third"],
            ),
        ];
        for (name, pushed, expected) in cases {
            let mut queue = Queue::default();
            for ticket in pushed {
                queue.push(ticket, ());
            }
            assert_eq!(served(&mut queue), expected, "{name}");
            assert!(queue.is_empty(), "{name}");
        }
    }

    #[test]
    fn tenants_of_one_class_take_turns() {
        let mut queue = Queue::default();
        for i in 0..5 {
            queue.push(ticket(Class::Refresh, i, "a", &format!("a{i}")), ());
        }
        queue.push(ticket(Class::Refresh, 100, "b", "b0"), ());
        queue.push(ticket(Class::Refresh, 101, "b", "b1"), ());
        // b's deadlines are later, yet a's burst delays each of them by one request at most.
        assert_eq!(
            served(&mut queue),
            ["a0", "b0", "a1", "b1", "a2", "a3", "a4"]
        );
    }

    #[test]
    fn a_tenant_arriving_during_a_burst_is_served_next() {
        let mut queue = Queue::default();
        for i in 0..1000 {
            queue.push(ticket(Class::Refresh, 0, "a", &format!("a{i}")), ());
        }
        for _ in 0..500 {
            queue.pop();
        }
        queue.push(ticket(Class::Refresh, 10, "b", "b"), ());
        assert_eq!(queue.pop().unwrap().ticket.key, "b");
        assert_eq!(queue.pop().unwrap().ticket.key, "a500");
    }

    #[test]
    fn a_burst_of_new_identities_never_delays_a_refresh() {
        let mut queue = Queue::default();
        for i in 0..5000 {
            queue.push(ticket(Class::New, 0, "a", &format!("a{i}")), ());
        }
        queue.push(ticket(Class::Refresh, 0, "b", "b"), ());
        assert_eq!(queue.pop().unwrap().ticket.key, "b");
    }

    #[test]
    fn asking_again_keeps_the_place_and_the_time_asked() {
        let mut queue = Queue::default();
        queue.push(ticket(Class::New, 0, "a", "x"), ());
        queue.push(ticket(Class::New, 0, "a", "y"), ());
        let mut again = ticket(Class::New, 0, "a", "x");
        again.asked_at = at(40);
        assert_eq!(queue.push(again, ()), at(0));
        assert_eq!(queue.len(), 2);
        assert_eq!(served(&mut queue), ["x", "y"]);

        // Asking again more urgently moves the key up, still since the first time.
        queue.push(ticket(Class::New, 0, "a", "x"), ());
        queue.push(ticket(Class::New, 0, "a", "y"), ());
        let mut urgent = ticket(Class::Expiring, 0, "a", "y");
        urgent.asked_at = at(9);
        assert_eq!(queue.push(urgent, ()), at(0));
        let first = queue.pop().unwrap().ticket;
        assert_eq!((first.key.as_str(), first.class), ("y", Class::Expiring));
    }

    #[test]
    fn the_oldest_deadline_is_the_earliest_waiting() {
        let mut queue = Queue::default();
        assert_eq!(queue.oldest_deadline(), None);
        queue.push(ticket(Class::New, 30, "a", "x"), ());
        queue.push(ticket(Class::Refresh, 50, "b", "y"), ());
        queue.push(ticket(Class::Expiring, -20, "c", "z"), ());
        assert_eq!(queue.oldest_deadline(), Some(at(-20)));
        served(&mut queue);
        assert_eq!(queue.oldest_deadline(), None);
        assert!(queue.served_at.is_empty() && queue.lines.is_empty());
    }
}
