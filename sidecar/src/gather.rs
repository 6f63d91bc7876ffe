//! Concurrent requests gathered into calls, as a log's group commit gathers
//! appends: while the calls allowed at once are all in flight, the requests
//! that arrive wait together for the next one. A request that finds a call
//! free goes at once, alone; batches form only under load, so a lone
//! request pays no waiting for company.
//!
//! Each request keeps its own answer ([`Gather::submit`]); how a batch is
//! sent and answered is the caller's `dispatch`.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

/// A request waiting for its answer.
pub(crate) struct Pending<I, R> {
    pub(crate) item: I,
    pub(crate) reply: oneshot::Sender<R>,
}

/// How big a batch and how many calls may get.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Requests per call, at most.
    pub(crate) items: usize,
    /// Bytes per call, at most, as counted by the size function (a batch
    /// closes before it would pass this; a single larger request goes alone).
    pub(crate) bytes: usize,
    /// Calls in flight at once.
    pub(crate) in_flight: usize,
}

/// Gathers requests of type `I` answered with `R` into batches.
#[derive(Debug)]
pub(crate) struct Gather<I, R> {
    tx: mpsc::Sender<Pending<I, R>>,
}

impl<I: Send + 'static, R: Send + 'static> Gather<I, R> {
    /// Starts gathering. `dispatch` is handed each batch with the permit of
    /// its call, to drop when the call is over (it must not block: it spawns
    /// the call). The task ends when the `Gather` is dropped.
    pub(crate) fn start<S, D>(limits: Limits, size: S, mut dispatch: D) -> Gather<I, R>
    where
        S: Fn(&I) -> usize + Send + 'static,
        D: FnMut(Vec<Pending<I, R>>, OwnedSemaphorePermit) + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Pending<I, R>>(limits.items.max(1) * 4);
        tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(limits.in_flight.max(1)));
            // A request that did not fit in the previous batch.
            let mut carried: Option<Pending<I, R>> = None;
            loop {
                let first = match carried.take() {
                    Some(p) => p,
                    None => match rx.recv().await {
                        Some(p) => p,
                        None => break,
                    },
                };
                // Requests queue up while every call is in flight.
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let mut bytes = size(&first.item);
                let mut batch = vec![first];
                while batch.len() < limits.items {
                    match rx.try_recv() {
                        Ok(p) => {
                            let len = size(&p.item);
                            if bytes + len > limits.bytes {
                                carried = Some(p);
                                break;
                            }
                            bytes += len;
                            batch.push(p);
                        }
                        Err(_) => break,
                    }
                }
                dispatch(batch, permit);
            }
        });
        Gather { tx }
    }

    /// Sends `item` with the next call; `None` when the gatherer is gone
    /// (the process is stopping).
    pub(crate) async fn submit(&self, item: I) -> Option<R> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Pending { item, reply }).await.ok()?;
        rx.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Under load, requests share calls within the limits; each gets its own
    /// answer; a lone request goes alone at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_stay_within_limits_and_answers_reach_their_requests() {
        let calls = Arc::new(AtomicUsize::new(0));
        let busiest = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let limits = Limits {
            items: 8,
            bytes: 100,
            in_flight: 2,
        };
        let (c, b, f) = (calls.clone(), busiest.clone(), in_flight.clone());
        let gather = Arc::new(Gather::start(
            limits,
            |n: &usize| if n.is_multiple_of(10) { 60 } else { 10 },
            move |batch: Vec<Pending<usize, (usize, usize)>>, permit| {
                assert!(batch.len() <= 8, "{} items", batch.len());
                let bytes: usize = batch
                    .iter()
                    .map(|p| if p.item.is_multiple_of(10) { 60 } else { 10 })
                    .sum();
                assert!(batch.len() == 1 || bytes <= 100, "{bytes} bytes");
                c.fetch_add(1, Ordering::SeqCst);
                let now = f.fetch_add(1, Ordering::SeqCst) + 1;
                b.fetch_max(now, Ordering::SeqCst);
                let f = f.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    let n = batch.len();
                    f.fetch_sub(1, Ordering::SeqCst);
                    drop(permit);
                    for p in batch {
                        let _ = p.reply.send((p.item * 2, n));
                    }
                });
            },
        ));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..400usize {
            let g = gather.clone();
            tasks.spawn(async move { (i, g.submit(i).await) });
        }
        let mut shared = 0;
        while let Some(r) = tasks.join_next().await {
            let (i, answer) = r.expect("task");
            let (doubled, n) = answer.expect("answered");
            assert_eq!(doubled, i * 2, "another request's answer");
            if n > 1 {
                shared += 1;
            }
        }
        assert!(
            busiest.load(Ordering::SeqCst) <= 2,
            "more than 2 calls at once"
        );
        assert!(
            calls.load(Ordering::SeqCst) < 400 && shared > 0,
            "400 requests went in {} calls",
            calls.load(Ordering::SeqCst)
        );
        // Idle: one request, one call of its own.
        let before = calls.load(Ordering::SeqCst);
        assert_eq!(gather.submit(7).await, Some((14, 1)));
        assert_eq!(calls.load(Ordering::SeqCst), before + 1);
    }
}
