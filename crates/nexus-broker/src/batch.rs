//! Running one claimed batch (of due refreshes, of webhook deliveries) with
//! bounded concurrency, waiting for all of it: the workers' leases cover a
//! batch, and a graceful stop finishes the batch in hand.

use std::future::Future;
use std::sync::Arc;

/// Runs `work` on every item, at most `concurrency` at once, and returns
/// when all are done.
pub(crate) async fn run_bounded<T, F, Fut>(items: Vec<T>, concurrency: usize, work: F)
where
    T: Send + 'static,
    F: Fn(T) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let gate = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut set = tokio::task::JoinSet::new();
    for item in items {
        let (gate, work) = (gate.clone(), work.clone());
        set.spawn(async move {
            // The semaphore is never closed, so acquire only fails if it were.
            let Ok(_permit) = gate.acquire().await else {
                return;
            };
            work(item).await;
        });
    }
    while set.join_next().await.is_some() {}
}
