//! A timer that keeps a busy worker's own timers from waking the worker.
//!
//! Each connection arms timers: the dial timeout (30 s by default) while it connects, the
//! `terminationDelay` (100 ms by default) after a half-close. tokio's timer driver wakes its
//! thread (`write(2)` on the runtime's eventfd) whenever a new timer is due before the earliest
//! timer the driver knew of when it last went to sleep, and when there was none. On a worker that
//! is running (it is: it is the one arming the timer) that wake is a wasted system call, and the
//! next `epoll_wait` reports the eventfd for nothing. Connections come and go so fast that the
//! driver often knows of no timer at all, so this happened on 0.3 connections in 1 with one
//! worker, 0.6 with two (a worker with half the connections has fewer timers pending).
//!
//! The anchor is a timer that is always pending a short [`PERIOD`] ahead while the worker
//! accepts connections: a connection's timer that is due later than the anchor costs no wake.
//! It rests (no timer, no wake-up) once a period passes without a new connection, and the next
//! accepted connection sets it going again. A timer due before the anchor (a `terminationDelay`
//! shorter than [`PERIOD`]) wakes the driver as before: it is correct either way, only the
//! saving is lost.
//!
//! One anchor per thread, and only on a current-thread runtime (tagway's workers): on a
//! multi-thread runtime tasks move between threads and timers are shared, so the wake is needed.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// How far ahead the anchor's timer is kept: shorter than the default `terminationDelay`
/// (100 ms) and every other per-connection timer, long enough that its own expiry (20 times a
/// second while connections come) is negligible.
pub const PERIOD: Duration = Duration::from_millis(50);

#[derive(Default)]
struct Local {
    /// An anchor task runs on this thread.
    running: Cell<bool>,
    /// A connection was accepted since the anchor last looked.
    accepted: Cell<bool>,
    /// The resting anchor, to wake at the next accepted connection.
    resting: RefCell<Option<Waker>>,
    /// Expiries of the anchor's timer (tests).
    ticks: Cell<u64>,
}

thread_local! {
    static LOCAL: Local = Local::default();
}

/// Notes that the current thread accepted a connection, starting its anchor on the current
/// runtime (which must be a current-thread runtime) if it has none, or waking it if it rests.
/// Called from inside the runtime.
pub fn accepted() {
    let spawn = LOCAL.with(|l| {
        l.accepted.set(true);
        if let Some(w) = l.resting.borrow_mut().take() {
            w.wake();
        }
        !l.running.replace(true)
    });
    if spawn {
        drop(tokio::spawn(run()));
    }
}

/// Expiries of this thread's anchor timer so far.
#[cfg(test)]
fn ticks() -> u64 {
    LOCAL.with(|l| l.ticks.get())
}

/// Clears the thread's state when the anchor task ends (its runtime shut down), so that a later
/// runtime on the same thread starts its own.
struct Running;

impl Drop for Running {
    fn drop(&mut self) {
        // `try_with`: the task may be dropped while the thread's locals are torn down.
        let _ = LOCAL.try_with(|l| {
            l.running.set(false);
            l.resting.borrow_mut().take();
        });
    }
}

/// Waits until a connection was accepted since the last look (at once if one was).
struct NextAccept;

impl Future for NextAccept {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        LOCAL.with(|l| {
            if l.accepted.replace(false) {
                Poll::Ready(())
            } else {
                *l.resting.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
    }
}

async fn run() {
    let _running = Running;
    let sleep = tokio::time::sleep(PERIOD);
    tokio::pin!(sleep);
    loop {
        NextAccept.await;
        // Busy: keep a timer pending until a whole period passes without a connection.
        loop {
            sleep.as_mut().reset(tokio::time::Instant::now() + PERIOD);
            sleep.as_mut().await;
            LOCAL.with(|l| l.ticks.set(l.ticks.get() + 1));
            if !LOCAL.with(|l| l.accepted.replace(false)) {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running() -> bool {
        LOCAL.with(|l| l.running.get())
    }

    #[tokio::test(start_paused = true)]
    async fn ticks_while_connections_come_and_rests_when_they_stop() {
        let t0 = ticks();
        accepted();
        accepted(); // one anchor per thread
        tokio::task::yield_now().await;
        for _ in 0..5 {
            tokio::time::sleep(PERIOD).await;
            accepted();
        }
        // Armed at the first accept, expired once per period since.
        let busy = ticks() - t0;
        assert!((4..=6).contains(&busy), "{busy} ticks in 5 busy periods");
        // No more connections: one more expiry sees none, then the anchor rests.
        tokio::time::sleep(PERIOD * 2).await;
        let rested = ticks();
        tokio::time::sleep(PERIOD * 20).await;
        assert_eq!(ticks(), rested, "a resting anchor has no timer");
        // The next connection sets it going again.
        accepted();
        tokio::time::sleep(PERIOD + Duration::from_millis(1)).await;
        assert_eq!(ticks(), rested + 1);
    }

    #[test]
    fn a_new_runtime_on_the_thread_gets_its_own_anchor() {
        for _ in 0..2 {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap();
            let t0 = ticks();
            rt.block_on(async {
                accepted();
                tokio::time::sleep(PERIOD + Duration::from_millis(1)).await;
            });
            assert_eq!(ticks(), t0 + 1, "the anchor of this runtime ran");
            assert!(running());
            drop(rt);
            assert!(!running(), "the anchor ended with its runtime");
        }
    }
}
