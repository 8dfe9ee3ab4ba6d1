//! Gathering requests into batches, for writes and loads alike: a collector
//! task takes the first request, gathers what arrives within the batch
//! window, up to a full batch, and hands the batch to an executor once one
//! of a bounded number of slots is free. While every slot is busy, requests
//! pile up, so batches grow with the load: no wait is added beyond the
//! bound, and the database sees few, large statements exactly when it is
//! busiest.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

use crate::entity::PersistenceId;

/// A request a collector batches.
pub(super) trait Request: Send + 'static {
    /// A key at most one request of a batch may have (one row per entity
    /// per write statement); a second waits for a later batch.
    fn exclusive_key(&self) -> Option<&PersistenceId>;
}

/// How a collector batches.
#[derive(Debug, Clone, Copy)]
pub(super) struct Batching {
    /// Batches executing at once.
    pub(super) in_flight: usize,
    /// Requests in one batch at most.
    pub(super) max: usize,
    /// How long a batch waits for more after its first request.
    pub(super) wait: Duration,
}

/// Collects `requests` into batches and runs `execute` on each, at most
/// `batching.in_flight` at once, until every sender is gone.
pub(super) async fn collect<R, F, Fut>(mut requests: mpsc::UnboundedReceiver<R>, batching: Batching, execute: F)
where
    R: Request,
    F: Fn(Vec<R>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(batching.in_flight.max(1)));
    let mut deferred = VecDeque::new();
    loop {
        let first = match deferred.pop_front() {
            Some(request) => request,
            None => match requests.recv().await {
                Some(request) => request,
                None => return,
            },
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // At most one batch of keys: a fast hash is safe here.
        let mut keys: HashSet<PersistenceId, foldhash::fast::RandomState> = HashSet::default();
        let batch = gather(
            &mut requests,
            first,
            batching.max,
            batching.wait,
            &mut deferred,
            |request: &R| request.exclusive_key().is_none_or(|key| keys.insert(key.clone())),
        )
        .await;
        let work = execute(batch);
        tokio::spawn(async move {
            work.await;
            drop(slot);
        });
    }
}

/// Takes what is queued after `first`, then, unless the batch is already
/// full, what arrives within `wait` (zero: nothing more), up to `max`.
/// `admit` may refuse a request for this batch; refused ones go to `deferred`.
///
/// It sleeps once for the rest of the window instead of listening: a
/// listening collector is woken across threads by every request at every
/// load below the peak. The price is that a batch that fills while it
/// sleeps still waits out the window, which `wait` bounds anyway.
async fn gather<R>(
    requests: &mut mpsc::UnboundedReceiver<R>,
    first: R,
    max: usize,
    wait: Duration,
    deferred: &mut VecDeque<R>,
    mut admit: impl FnMut(&R) -> bool,
) -> Vec<R> {
    let mut batch = Vec::with_capacity(max.min(1024));
    // The first request is admitted through the same check, so that it
    // counts against what follows (one row per user per statement).
    let admitted = admit(&first);
    debug_assert!(admitted, "the first request of a batch is always admitted");
    batch.push(first);
    // Requests deferred from the previous batch come first.
    let mut still_deferred = VecDeque::new();
    while let Some(request) = deferred.pop_front() {
        if batch.len() < max && admit(&request) {
            batch.push(request);
        } else {
            still_deferred.push_back(request);
        }
    }
    *deferred = still_deferred;
    let deadline = Instant::now() + wait;
    let open = take_queued(requests, max, &mut batch, deferred, &mut admit);
    if open && batch.len() < max && !wait.is_zero() {
        tokio::time::sleep_until(deadline).await;
        take_queued(requests, max, &mut batch, deferred, &mut admit);
    }
    batch
}

/// Moves queued requests into `batch` (or `deferred`) until it holds `max`
/// or none is left; false once every sender is gone.
fn take_queued<R>(
    requests: &mut mpsc::UnboundedReceiver<R>,
    max: usize,
    batch: &mut Vec<R>,
    deferred: &mut VecDeque<R>,
    admit: &mut impl FnMut(&R) -> bool,
) -> bool {
    while batch.len() < max {
        match requests.try_recv() {
            Ok(request) if admit(&request) => batch.push(request),
            Ok(request) => deferred.push_back(request),
            Err(mpsc::error::TryRecvError::Empty) => return true,
            Err(mpsc::error::TryRecvError::Disconnected) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::future::Future;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::gather;

    const WINDOW: Duration = Duration::from_millis(1);

    /// A batch, and the channel it was taken from.
    type Gathered = (Vec<u32>, mpsc::UnboundedReceiver<u32>);

    /// Gathers a batch after `first` on a task of its own, counting how
    /// often the task is polled, that is, woken.
    fn gather_counting_polls(
        mut requests: mpsc::UnboundedReceiver<u32>,
        first: u32,
        max: usize,
    ) -> (tokio::task::JoinHandle<Gathered>, Arc<AtomicUsize>) {
        let polls = Arc::new(AtomicUsize::new(0));
        let counted = polls.clone();
        let task = tokio::spawn(async move {
            let mut deferred = VecDeque::new();
            let batch = {
                let mut gathering = Box::pin(gather(&mut requests, first, max, WINDOW, &mut deferred, |_| true));
                std::future::poll_fn(|cx| {
                    counted.fetch_add(1, Ordering::Relaxed);
                    gathering.as_mut().poll(cx)
                })
                .await
            };
            (batch, requests)
        });
        (task, polls)
    }

    #[tokio::test(start_paused = true)]
    async fn requests_sent_within_the_window_join_the_batch_without_waking_the_collector() {
        let (sender, requests) = mpsc::unbounded_channel();
        let (task, polls) = gather_counting_polls(requests, 0, 512);
        tokio::task::yield_now().await; // the collector is now waiting
        for request in 1..=100 {
            sender.send(request).unwrap();
            tokio::task::yield_now().await;
        }
        let (batch, _) = task.await.unwrap();
        assert_eq!(
            batch,
            (0..=100).collect::<Vec<_>>(),
            "every request of the window, in order"
        );
        assert!(
            polls.load(Ordering::Relaxed) <= 3,
            "woken {} times for 100 requests: senders must not wake the collector",
            polls.load(Ordering::Relaxed)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_holds_at_most_its_size_and_the_rest_waits_for_the_next() {
        let (sender, requests) = mpsc::unbounded_channel();
        for request in 1..=10 {
            sender.send(request).unwrap();
        }
        let started = tokio::time::Instant::now();
        let (task, _) = gather_counting_polls(requests, 0, 4);
        let (batch, mut requests) = task.await.unwrap();
        assert_eq!(batch, [0, 1, 2, 3]);
        assert_eq!(started.elapsed(), Duration::ZERO, "a batch full at once goes at once");
        assert_eq!(requests.try_recv().unwrap(), 4, "the rest stays queued, in order");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_request_waits_for_a_later_batch_ahead_of_newer_ones() {
        let (sender, mut requests) = mpsc::unbounded_channel();
        for request in [1, 2, 1, 3] {
            sender.send(request).unwrap();
        }
        let mut deferred = VecDeque::new();
        let mut seen = std::collections::HashSet::new();
        let batch = gather(&mut requests, 0, 512, WINDOW, &mut deferred, |r| seen.insert(*r)).await;
        assert_eq!(batch, [0, 1, 2, 3], "one of each per batch");
        assert_eq!(deferred, [1], "the second 1 is kept back");

        sender.send(4).unwrap();
        let first = deferred.pop_front().unwrap();
        let mut seen = std::collections::HashSet::new();
        let next = gather(&mut requests, first, 512, WINDOW, &mut deferred, |r| seen.insert(*r)).await;
        assert_eq!(next, [1, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn once_every_sender_is_gone_a_batch_goes_without_waiting() {
        let (sender, requests) = mpsc::unbounded_channel();
        sender.send(1).unwrap();
        drop(sender);
        let started = tokio::time::Instant::now();
        let (task, _) = gather_counting_polls(requests, 0, 512);
        let (batch, _) = task.await.unwrap();
        assert_eq!(batch, [0, 1]);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_window_a_batch_takes_what_is_queued_and_goes_at_once() {
        let (sender, mut requests) = mpsc::unbounded_channel();
        sender.send(1).unwrap();
        let started = tokio::time::Instant::now();
        let batch = gather(&mut requests, 0, 512, Duration::ZERO, &mut VecDeque::new(), |_| true).await;
        assert_eq!(batch, [0, 1]);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_goes_out_when_its_window_has_passed() {
        let (_sender, requests) = mpsc::unbounded_channel();
        let started = tokio::time::Instant::now();
        let (task, _) = gather_counting_polls(requests, 7, 512);
        let (batch, _) = task.await.unwrap();
        assert_eq!(batch, [7]);
        assert_eq!(started.elapsed(), WINDOW, "no longer than the window, and not sooner");
    }
}
