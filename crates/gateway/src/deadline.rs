//! Deadlines that move with every request and are rarely reached.
//!
//! Arming a tokio timer takes a lock and a wheel insertion, and disarming it
//! as much again: per request, for a head timeout and an upstream timeout,
//! that is a noticeable share of what a proxied request costs. A
//! [`Deadline`] keeps one timer and only re-arms it when it fires before the
//! deadline (which has moved later since) or when the deadline moves
//! earlier than it — nginx's lazy timers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

pub(crate) struct Deadline {
    timer: Pin<Box<Sleep>>,
    due: Instant,
}

impl Deadline {
    pub(crate) fn new(due: Instant) -> Deadline {
        Deadline {
            timer: Box::pin(tokio::time::sleep_until(due)),
            due,
        }
    }

    /// Moves the deadline; the timer is touched only if it must fire
    /// sooner.
    pub(crate) fn set(&mut self, due: Instant) {
        if due < self.timer.deadline() {
            self.timer.as_mut().reset(due);
        }
        self.due = due;
    }

    /// Runs `work` until it finishes (`Some`) or the deadline passes
    /// (`None`).
    pub(crate) fn within<F: Future>(&mut self, work: F) -> Within<'_, F> {
        Within {
            deadline: self,
            work,
        }
    }
}

pin_project_lite::pin_project! {
    /// [`Deadline::within`]'s future: the work and the deadline, nothing
    /// more (an async fn would hold the work twice, and an idle connection
    /// waits in one of these).
    pub(crate) struct Within<'a, F> {
        deadline: &'a mut Deadline,
        #[pin]
        work: F,
    }
}

impl<F: Future> Future for Within<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.work.poll(cx) {
            return Poll::Ready(Some(out));
        }
        while this.deadline.timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= this.deadline.due {
                return Poll::Ready(None);
            }
            // Fired for an earlier deadline: wait on for this one.
            let due = this.deadline.due;
            this.deadline.timer.as_mut().reset(due);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_moved_deadline_holds_and_a_passed_one_ends_the_wait() {
        let start = Instant::now();
        let mut d = Deadline::new(start + Duration::from_secs(1));
        // Moved later before the timer fires: the wait lasts until the new
        // deadline, not the timer's first one.
        d.set(start + Duration::from_secs(3));
        assert_eq!(d.within(std::future::pending::<()>()).await, None);
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        // Moved earlier: the timer fires sooner.
        let now = Instant::now();
        d.set(now + Duration::from_secs(10));
        d.set(now + Duration::from_secs(2));
        assert_eq!(d.within(std::future::pending::<()>()).await, None);
        assert_eq!(now.elapsed(), Duration::from_secs(2));
        // Work that finishes in time gets its result.
        d.set(Instant::now() + Duration::from_secs(5));
        let quick = tokio::time::sleep(Duration::from_secs(1));
        assert_eq!(
            d.within(async {
                quick.await;
                7
            })
            .await,
            Some(7)
        );
    }
}
