//! Decisions' reads, batched when they come together: a read that finds fewer than
//! [`IN_FLIGHT`] statements of its kind running goes at once, with every read of its kind
//! waiting then (a lone read waits for nothing); otherwise it waits, and the next statement
//! to finish takes it along with the others waiting. Under load, one statement answers many
//! requests (`= ANY` of their keys): fewer round trips, and less work for the database.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::store::records::StoreError;

/// Statements of one kind running at once.
const IN_FLIGHT: usize = 4;

/// One kind of read that can be made for many keys in one statement.
pub trait Fetch: Send + Sync + 'static {
    type Key: Send + 'static;
    type Value: Send + 'static;
    /// The value of each key, in the order of `keys`.
    fn fetch(
        &self,
        keys: &[Self::Key],
    ) -> impl Future<Output = Result<Vec<Self::Value>, StoreError>> + Send;
}

type Waiter<F> = (
    <F as Fetch>::Key,
    oneshot::Sender<Result<<F as Fetch>::Value, StoreError>>,
);

struct State<F: Fetch> {
    waiting: Vec<Waiter<F>>,
    running: usize,
}

/// Reads of one kind, batched.
pub struct Batched<F: Fetch> {
    fetch: F,
    state: Mutex<State<F>>,
}

impl<F: Fetch> Batched<F> {
    pub fn new(fetch: F) -> Arc<Batched<F>> {
        Arc::new(Batched {
            fetch,
            state: Mutex::new(State {
                waiting: Vec::new(),
                running: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<F>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub async fn get(self: &Arc<Self>, key: F::Key) -> Result<F::Value, StoreError> {
        enum Turn<W, R> {
            Now(W),
            Later(R),
        }
        let turn = {
            let mut state = self.lock();
            if state.running >= IN_FLIGHT {
                let (tx, rx) = oneshot::channel();
                state.waiting.push((key, tx));
                Turn::Later(rx)
            } else {
                state.running += 1;
                Turn::Now((key, std::mem::take(&mut state.waiting)))
            }
        };
        let (key, others) = match turn {
            Turn::Later(rx) => return rx.await.map_err(|_| StoreError::Writer)?,
            Turn::Now(now) => now,
        };
        let (mut keys, senders): (Vec<_>, Vec<_>) = others.into_iter().unzip();
        keys.insert(0, key);
        let mut results = each(self.fetch.fetch(&keys).await, keys.len()).into_iter();
        let own = results.next().unwrap_or(Err(StoreError::Writer));
        for (tx, result) in senders.into_iter().zip(results) {
            let _ = tx.send(result);
        }
        // Whoever waited meanwhile is taken along by a task of its own, so that this
        // request's answer does not wait for theirs.
        self.next();
        own
    }

    /// Runs the waiting reads, if any, from a task; or gives back the slot.
    fn next(self: &Arc<Self>) {
        let waiting = {
            let mut state = self.lock();
            if state.waiting.is_empty() {
                state.running -= 1;
                return;
            }
            std::mem::take(&mut state.waiting)
        };
        let this = self.clone();
        tokio::spawn(async move {
            let (keys, senders): (Vec<_>, Vec<_>) = waiting.into_iter().unzip();
            let results = each(this.fetch.fetch(&keys).await, keys.len());
            for (tx, result) in senders.into_iter().zip(results) {
                let _ = tx.send(result);
            }
            this.next();
        });
    }
}

/// The result of each of `n` keys: its value, or the batch's failure.
fn each<V>(result: Result<Vec<V>, StoreError>, n: usize) -> Vec<Result<V, StoreError>> {
    match result {
        Ok(values) if values.len() == n => values.into_iter().map(Ok).collect(),
        other => {
            let e = other
                .err()
                .unwrap_or(StoreError::corrupt("batch", "short answer"));
            (0..n).map(|_| Err(clone_error(&e))).collect()
        }
    }
}

/// The same failure for every request of a batch (an unavailable database stays
/// [`StoreError::Unavailable`], so each request is held).
fn clone_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable => StoreError::Unavailable,
        other => StoreError::corrupt("batched read", other),
    }
}
