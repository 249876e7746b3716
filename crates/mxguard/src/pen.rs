//! The holding pen: sessions waiting out the greet delay, without a task.
//!
//! Under attack most sessions are in the greet delay (2,000 connections/s
//! × 6 s = 12,000 at once), doing nothing but waiting. A tokio task and a
//! registered tokio socket cost about 2.5 KiB each such session (the task's
//! future, the 128-byte aligned task cell and `ScheduledIo`); in the pen a
//! session is a plain socket in our own epoll set, a few hundred bytes of
//! [`Parked`] state in a slab, and a timer entry in a heap. The session
//! leaves the pen — a task is spawned for it again — when its time comes
//! (the moment to open the upstream), or the client becomes readable
//! (early talk, hang-up, reset), whichever is first. The pen does not read
//! the socket: the session's own code does, exactly as it would have.
//!
//! One task serves the pen: it waits for the epoll descriptor (registered
//! with tokio like any socket), the earliest deadline, or a new, earlier
//! deadline.
//!
//! ```text
//!   session task ──park──► pen (slab + epoll + deadline heap) ──resume──► new session task
//!                              ▲ wakes on: client readable │ deadline │ new earlier deadline
//! ```

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use parking_lot::Mutex;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tokio::time::{sleep_until, Instant};

use crate::session::Parked;

/// A session is parked only when its wake-up is at least this far: below
/// it, the two epoll round trips cost more than the task they save.
pub const PARK_MIN: Duration = Duration::from_millis(50);

/// Events taken from the epoll set per wake-up.
const EVENTS: usize = 1024;

/// The pen of one daemon. Started on the first session parked.
#[derive(Default)]
pub struct Pen {
    inner: OnceLock<Option<Arc<Inner>>>,
}

struct Inner {
    registry: Registry,
    state: Mutex<State>,
    /// A deadline earlier than the one the pen's task sleeps until.
    sooner: Notify,
}

/// Slot `i` of the slab holds the session with token `i`; a deadline in the
/// heap names its slot and the slot's generation, so a deadline left behind
/// by a session that already left is recognised and skipped.
#[derive(Default)]
struct State {
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    deadlines: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    generation: u32,
    /// The deadline the pen's task sleeps until.
    sleeping_until: Option<Instant>,
    /// The pen's task is gone: nothing more is parked.
    closed: bool,
}

struct Slot {
    generation: u32,
    parked: Parked,
}

impl Pen {
    /// Takes the session until its wake-up or its client stirs. If the pen
    /// cannot (no epoll), the session goes on at once in a task of its own.
    pub fn park(&self, parked: Parked) {
        match self.inner() {
            Some(inner) => inner.admit(parked),
            None => resume(parked),
        }
    }

    /// Opens the epoll set (two descriptors: the set and the registry's
    /// duplicate) and starts the pen's task now, at the daemon's start,
    /// rather than with the first session parked: descriptor counts then
    /// rest where they started once the sessions are gone.
    pub fn start(&self) {
        let _ = self.inner();
    }

    /// Sessions in the pen now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        match self.inner.get() {
            Some(Some(inner)) => {
                let state = inner.state.lock();
                state.slots.len() - state.free.len()
            }
            _ => 0,
        }
    }

    fn inner(&self) -> Option<&Arc<Inner>> {
        self.inner
            .get_or_init(|| match start() {
                Ok(inner) => Some(inner),
                Err(e) => {
                    tracing::warn!("greet delay without the holding pen: {e}");
                    None
                }
            })
            .as_ref()
    }
}

/// Opens the epoll set and spawns the pen's task (on the runtime of the
/// first session parked: the daemon's).
fn start() -> io::Result<Arc<Inner>> {
    let fd = mxguard_net::watched_poll()?;
    let inner = Arc::new(Inner {
        registry: fd.get_ref().registry().try_clone()?,
        state: Mutex::new(State::default()),
        sooner: Notify::new(),
    });
    tokio::spawn(serve(inner.clone(), fd));
    Ok(inner)
}

impl Inner {
    /// Takes the session in; or, when the pen cannot, resumes it at once.
    fn admit(&self, parked: Parked) {
        let wake = parked.wake;
        let fd = parked.client.as_raw_fd();
        let sooner = {
            let mut state = self.state.lock();
            if state.closed {
                drop(state);
                resume(parked);
                return;
            }
            let token = match state.free.last() {
                Some(&i) => i,
                None => state.slots.len() as u32,
            };
            // Watched under the lock, so that no event, deadline or close
            // can see the slot before the socket is in the set.
            if let Err(e) = self.registry.register(
                &mut SourceFd(&fd),
                Token(token as usize),
                Interest::READABLE,
            ) {
                drop(state);
                tracing::debug!("holding pen: cannot watch a client: {e}");
                resume(parked);
                return;
            }
            state.generation = state.generation.wrapping_add(1);
            let generation = state.generation;
            let slot = Some(Slot { generation, parked });
            if state.free.pop().is_some() {
                state.slots[token as usize] = slot;
            } else {
                state.slots.push(slot);
            }
            state.deadlines.push(Reverse((wake, token, generation)));
            state.sleeping_until.is_none_or(|t| wake < t)
        };
        if sooner {
            self.sooner.notify_one();
        }
    }

    /// Empties slot `token`; the caller deregisters its socket.
    fn take(&self, token: u32) -> Option<Slot> {
        let mut state = self.state.lock();
        let slot = state.slots.get_mut(token as usize)?.take()?;
        state.free.push(token);
        Some(slot)
    }

    /// Lets the session out: its socket leaves the epoll set, and a task
    /// takes it from there.
    fn release(&self, slot: Slot) {
        let fd = slot.parked.client.as_raw_fd();
        let _ = self.registry.deregister(&mut SourceFd(&fd));
        resume(slot.parked);
    }

    /// Sessions whose time has come, and the next deadline.
    fn due(&self, now: Instant) -> (Vec<Slot>, Option<Instant>) {
        let mut state = self.state.lock();
        let mut due = Vec::new();
        while let Some(&Reverse((at, token, generation))) = state.deadlines.peek() {
            let current = state.slots[token as usize]
                .as_ref()
                .is_some_and(|s| s.generation == generation);
            if !current {
                state.deadlines.pop();
                continue;
            }
            if at > now {
                break;
            }
            state.deadlines.pop();
            if let Some(slot) = state.slots[token as usize].take() {
                state.free.push(token);
                due.push(slot);
            }
        }
        let next = state.deadlines.peek().map(|Reverse((at, ..))| *at);
        state.sleeping_until = next;
        (due, next)
    }
}

impl Inner {
    /// The pen cannot go on: every session in it resumes now, and later
    /// ones are not parked (their greet delay is then held by their task).
    fn close(&self, why: &str) {
        tracing::error!("holding pen: {why}; its sessions go on in their own tasks");
        let slots: Vec<Slot> = {
            let mut state = self.state.lock();
            state.closed = true;
            state.deadlines.clear();
            state.sleeping_until = Some(Instant::now());
            state.slots.iter_mut().filter_map(Option::take).collect()
        };
        for slot in slots {
            self.release(slot);
        }
    }
}

/// The pen's task.
async fn serve(inner: Arc<Inner>, mut fd: AsyncFd<Poll>) {
    let mut events = Events::with_capacity(EVENTS);
    loop {
        let (due, next) = inner.due(Instant::now());
        for slot in due {
            inner.release(slot);
        }
        let far = Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            ready = fd.readable_mut() => {
                let Ok(mut guard) = ready else {
                    inner.close("tokio cannot watch the epoll descriptor");
                    return;
                };
                events.clear();
                match guard.get_inner_mut().poll(&mut events, Some(Duration::ZERO)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        inner.close(&format!("epoll_wait: {e}"));
                        return;
                    }
                }
                if events.is_empty() {
                    guard.clear_ready();
                    continue;
                }
                for event in events.iter() {
                    if let Some(slot) = inner.take(event.token().0 as u32) {
                        inner.release(slot);
                    }
                }
            }
            () = sleep_until(next.unwrap_or(far)) => {}
            () = inner.sooner.notified() => {}
        }
    }
}

/// The session goes on in a task of its own, on the thread that accepted
/// it.
fn resume(parked: Parked) {
    let home = parked.home.clone();
    home.spawn(async move {
        let _live = crate::server::LiveSession::new(parked.shared.clone());
        crate::session::resume(parked).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Dur};
    use crate::server::Shared;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    #[test]
    fn a_parked_session_is_small() {
        // What a held session costs in the pen, beside its socket, its
        // heap entry (24 bytes) and its row in the live session table.
        let size = std::mem::size_of::<Option<Slot>>();
        assert!(size <= 256, "a pen slot is {size} bytes");
    }

    /// A guard with `delay`/`lead` in front of an MTA that greets at once;
    /// returns the guard's shared state, a connected client, and the
    /// session, parked.
    async fn parked_session(delay: u64, lead: u64) -> (Arc<Shared>, TcpStream, Parked) {
        let mta = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mta_addr = mta.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = mta.accept().await {
                let _ = s.write_all(b"220 mta.example ESMTP\r\n").await;
                let mut sink = [0u8; 512];
                while s.read(&mut sink).await.unwrap_or(0) > 0 {}
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = Config::default();
        config.intercept.upstream = mta_addr;
        config.greet.delay = Dur(Duration::from_millis(delay));
        config.greet.connect_lead = Dur(Duration::from_millis(lead));
        let shared = Shared::for_test(config, addr);
        let client = TcpStream::connect(addr).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let parked = crate::session::run(shared.clone(), stream, peer)
            .await
            .expect("a long greet delay is waited out in the pen");
        (shared, client, parked)
    }

    async fn read_until(client: &mut TcpStream, end: &[u8]) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while !got.windows(end.len()).any(|w| w == end) {
            let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
                .await
                .expect("the guard answers")
                .unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn a_held_session_leaves_the_pen_when_the_upstream_is_due_and_is_greeted() {
        let (shared, mut client, parked) = parked_session(400, 200).await;
        shared.pen.park(parked);
        assert_eq!(shared.pen.len(), 1);
        assert_eq!(shared.sessions.len(), 1, "still listed while parked");
        let heard = read_until(&mut client, b"220 mta.example").await;
        assert!(heard.starts_with("220-"), "challenge first: {heard:?}");
        assert_eq!(shared.pen.len(), 0);
    }

    #[tokio::test]
    async fn an_early_talker_is_woken_out_of_the_pen_and_refused() {
        let (shared, mut client, parked) = parked_session(5_000, 1_000).await;
        shared.pen.park(parked);
        assert_eq!(shared.pen.len(), 1);
        client.write_all(b"EHLO too.early\r\n").await.unwrap();
        let heard = read_until(&mut client, b"554 ").await;
        assert!(heard.contains("554 "), "refused at once: {heard:?}");
        assert_eq!(shared.pen.len(), 0);
    }
}
