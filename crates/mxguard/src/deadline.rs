//! Waits that end on time: the end of the greet delay.
//!
//! tokio's timer wheel rounds every deadline up to its next 1 ms tick and
//! parks in whole milliseconds, so a greeting held with `sleep_until` leaves
//! 0–2 ms after the configured delay (1.4 ms at the median at 1,000
//! sessions/s, docs/benchmarks.md). Every client pays that. Here one task
//! keeps the pending deadlines in a heap and one `timerfd` armed (to the
//! nanosecond) at the earliest: a wait costs a heap entry and a oneshot
//! channel, and ends within the scheduler's wake-up time of its deadline.
//! Each session thread has its own (`sleep_until`), so the wake-up never
//! crosses threads.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

thread_local! {
    /// The deadlines of the sessions on this thread: each session thread
    /// has its own timer in its own event loop, so the end of a delay
    /// wakes the session where it runs, without waiting for another
    /// thread to be scheduled first.
    static LOCAL: Arc<Deadlines> = Arc::new(Deadlines::default());
}

/// Opens this thread's timer and starts its task (on the thread's
/// runtime); a session thread does it when it starts, so its descriptor
/// is there from the start rather than from the first delayed session.
pub fn start_local() {
    LOCAL.with(|d| d.start());
}

/// [`Deadlines::sleep_until`] on this thread's deadlines.
pub async fn sleep_until(at: Instant) {
    let deadlines = LOCAL.with(Arc::clone);
    deadlines.sleep_until(at).await;
}

/// Waits registered on this thread's deadlines so far.
#[cfg(test)]
pub fn local_waits() -> u64 {
    LOCAL.with(|d| d.inner().map_or(0, |inner| inner.state.lock().seq))
}

/// A set of fine deadlines served by one task and one timer.
#[derive(Default)]
pub struct Deadlines {
    inner: OnceLock<Option<Arc<Inner>>>,
}

struct Inner {
    state: Mutex<State>,
    /// A deadline earlier than the one the timer is armed for.
    sooner: Notify,
}

#[derive(Default)]
struct State {
    waiting: BinaryHeap<Waiting>,
    seq: u64,
    /// The task is gone: waits fall back to tokio's timer.
    closed: bool,
}

/// One wait; the heap's top is the earliest (then the first registered).
struct Waiting {
    at: Instant,
    seq: u64,
    done: oneshot::Sender<()>,
}

impl PartialEq for Waiting {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Waiting {}

impl PartialOrd for Waiting {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Waiting {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl Deadlines {
    /// Opens the timer and starts its task (inside the runtime).
    pub fn start(&self) {
        let _ = self.inner();
    }

    /// Returns at `at`, to within the scheduler's wake-up time. A wait that
    /// is dropped before then leaves its entry until `at` (a few dozen
    /// bytes).
    pub async fn sleep_until(&self, at: Instant) {
        if at <= Instant::now() {
            return;
        }
        let Some(inner) = self.inner() else {
            return tokio::time::sleep_until(at).await;
        };
        let (done, fired) = oneshot::channel();
        // `None`: the task is gone (the wait below falls back).
        let sooner = {
            let mut state = inner.state.lock();
            if state.closed {
                None
            } else {
                let sooner = state.waiting.peek().is_none_or(|w| at < w.at);
                state.seq += 1;
                let seq = state.seq;
                state.waiting.push(Waiting { at, seq, done });
                Some(sooner)
            }
        };
        if sooner == Some(true) {
            inner.sooner.notify_one();
        }
        if fired.await.is_err() {
            // The task ended (its timer failed): tokio's timer, then.
            tokio::time::sleep_until(at).await;
        }
    }

    fn inner(&self) -> Option<&Arc<Inner>> {
        self.inner
            .get_or_init(|| match mxguard_net::FineTimer::new() {
                Ok(timer) => {
                    let inner = Arc::new(Inner {
                        state: Mutex::new(State::default()),
                        sooner: Notify::new(),
                    });
                    tokio::spawn(serve(inner.clone(), timer));
                    Some(inner)
                }
                Err(e) => {
                    tracing::warn!("greet delay on tokio's 1 ms timer: no timerfd: {e}");
                    None
                }
            })
            .as_ref()
    }
}

async fn serve(inner: Arc<Inner>, timer: mxguard_net::FineTimer) {
    loop {
        let now = Instant::now();
        let next = {
            let mut state = inner.state.lock();
            while state.waiting.peek().is_some_and(|w| w.at <= now) {
                if let Some(w) = state.waiting.pop() {
                    let _ = w.done.send(());
                }
            }
            state.waiting.peek().map(|w| w.at)
        };
        let armed = match next {
            Some(at) => timer.arm(at.saturating_duration_since(now)),
            None => Ok(()),
        };
        let failed = match armed {
            Err(e) => Some(e),
            Ok(()) => tokio::select! {
                fired = timer.fired(), if next.is_some() => fired.err(),
                () = inner.sooner.notified() => None,
            },
        };
        if let Some(e) = failed {
            tracing::error!("greet delay timer: {e}; falling back to tokio's timer");
            let mut state = inner.state.lock();
            state.closed = true;
            // Dropping the senders wakes every wait into its fall-back.
            state.waiting.clear();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waits_end_at_their_deadline_in_order() {
        let deadlines = Arc::new(Deadlines::default());
        deadlines.start();
        let start = Instant::now();
        let mut waits = Vec::new();
        // Registered out of order; a later one registered first.
        for ms in [30u64, 10, 20] {
            let d = deadlines.clone();
            let at = start + Duration::from_millis(ms);
            waits.push(tokio::spawn(async move {
                d.sleep_until(at).await;
                (ms, Instant::now().saturating_duration_since(at))
            }));
        }
        for wait in waits {
            let (ms, late) = wait.await.unwrap();
            // Never early; late only by scheduling (generous on a shared
            // machine: tokio's own timer alone is up to 2 ms late).
            assert!(
                late < Duration::from_millis(50),
                "{ms} ms wait ended {late:?} late"
            );
        }
        assert!(start.elapsed() >= Duration::from_millis(30));
    }

    #[tokio::test]
    async fn a_past_deadline_returns_at_once() {
        let deadlines = Deadlines::default();
        deadlines.start();
        tokio::time::timeout(
            Duration::from_secs(1),
            deadlines.sleep_until(Instant::now()),
        )
        .await
        .expect("no wait");
    }
}
