//! The timer driver: sleeps until the shard's earliest deadline and fires what is due
//! ([`Shard::poll_timeout`], [`Shard::handle_timeout`]). One task per core.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use glommio::timer::Timer;

use crate::shard::Shard;

/// Runs the shard's timers for as long as the core runs.
pub(crate) async fn run(shard: Rc<Shard>) {
    // The sleep under way, and the deadline it sleeps to.
    let mut sleep: Option<(u64, Timer)> = None;
    std::future::poll_fn(|cx| loop {
        let now = shard.clock().now_ms();
        shard.handle_timeout(now);
        let Some(deadline) = shard.poll_timeout(cx.waker()) else {
            sleep = None;
            return Poll::Pending;
        };
        if deadline <= now {
            continue;
        }
        if sleep.as_ref().is_none_or(|(d, _)| *d != deadline) {
            sleep = Some((deadline, Timer::new(Duration::from_millis(deadline - now))));
        }
        let (_, timer) = sleep.as_mut().expect("set above");
        match Pin::new(timer).poll(cx) {
            Poll::Ready(_) => sleep = None,
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}
