//! The timer anchor (`tagway::anchor`) saves the system call tokio's timer driver makes to wake
//! its own thread when a connection arms a timer. Counted with the process's write(2) calls
//! (`/proc/self/io`, `syscw`; the driver's wake is a write to its eventfd). Its own test binary,
//! so no other test's threads write meanwhile.
#![cfg(target_os = "linux")]

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

fn write_calls() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").expect("/proc/self/io");
    io.lines()
        .find_map(|l| l.strip_prefix("syscw:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("syscw in /proc/self/io")
}

/// Write calls while `n` connections each arm a timer as the data path does (the 100 ms
/// default `terminationDelay`) and end before it expires, the runtime polling its driver in
/// between (`yield_now`) with no timer of theirs pending, as between short connections.
async fn writes_for_connections(n: u64) -> u64 {
    let before = write_calls();
    for _ in 0..n {
        {
            let mut delay = std::pin::pin!(tokio::time::sleep(Duration::from_millis(100)));
            std::future::poll_fn(|cx| {
                assert!(delay.as_mut().poll(cx).is_pending());
                Poll::Ready(())
            })
            .await;
        }
        tokio::task::yield_now().await;
    }
    write_calls() - before
}

#[test]
fn an_anchored_worker_arms_timers_without_waking_itself() {
    const N: u64 = 200;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // The premise: without the anchor, tokio wakes the thread for (nearly) every timer.
        let plain = writes_for_connections(N).await;
        assert!(
            plain >= N / 2,
            "tokio no longer wakes its thread for a new timer ({plain} writes for {N} timers): \
             the anchor has nothing to save"
        );
        // An accepted connection starts the anchor; let it arm its timer.
        tagway::anchor::accepted();
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        let anchored = writes_for_connections(N).await;
        assert!(
            anchored <= 2,
            "{anchored} write calls for {N} timers with the anchor ({plain} without)"
        );
    });
}
