//! Transaction ids claimed across shards (PostgreSQL store with several
//! shards): a transaction lives in the shard of its topic, but its id must
//! name one transaction whatever the topic, and a replica asked about an id
//! it does not hold must find the shard that does. Before a new
//! transaction is prepared its shard claims the id in `tandem_txn_claim`
//! (concurrent claims share one statement); an id claimed by another shard
//! is refused. A shard forgets its claims once it has forgotten their
//! transactions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tandem_storage::PgStore;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};

/// Claims gathered into one statement, at most.
const MAX_BATCH: usize = 1024;

type Asked = (String, u32, oneshot::Sender<Result<u32>>);

/// Claims on one store.
pub(crate) struct Claims {
    store: PgStore,
    queue: mpsc::Sender<Asked>,
}

impl Claims {
    /// Claims on `store`; the task gathering them ends with the last
    /// handle.
    pub(crate) fn start(store: PgStore) -> Arc<Claims> {
        let (queue, rx) = mpsc::channel(4096);
        tokio::spawn(gather(store.clone(), rx));
        Arc::new(Claims { store, queue })
    }

    /// Claims `id` for `shard`; answers the shard that holds it (`shard`
    /// unless another one claimed it first).
    pub(crate) async fn claim(&self, id: &str, shard: u32) -> Result<u32> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send((id.to_owned(), shard, tx))
            .await
            .map_err(|_| Error::Internal("the id claims task ended".into()))?;
        rx.await
            .map_err(|_| Error::Internal("the id claims task ended".into()))?
    }

    /// The shard holding `id`, if any.
    pub(crate) async fn holder(&self, id: &str) -> Result<Option<u32>> {
        Ok(self.store.claimed_by(id).await?)
    }

    /// Forgets claims of `shard` older than `age` whose transactions it no
    /// longer `knows`; answers how many. (A claim renewed meanwhile, by a
    /// new transaction reusing the id, is kept: the delete checks the age
    /// again.)
    pub(crate) async fn sweep(
        &self,
        shard: u32,
        age: Duration,
        knows: impl Fn(&str) -> bool,
    ) -> Result<u64> {
        let mut dropped = 0;
        loop {
            let old = self.store.old_claims(shard, age, 10_000).await?;
            let n = old.len();
            let gone: Vec<String> = old.into_iter().filter(|id| !knows(id)).collect();
            if !gone.is_empty() {
                dropped += self.store.drop_claims(shard, &gone, age).await?;
            }
            // A page of ids all still known: the rest are younger.
            if n < 10_000 || gone.is_empty() {
                return Ok(dropped);
            }
        }
    }
}

async fn gather(store: PgStore, mut rx: mpsc::Receiver<Asked>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(a) => batch.push(a),
                Err(_) => break,
            }
        }
        let mut by_shard: HashMap<u32, Vec<Asked>> = HashMap::new();
        for a in batch {
            by_shard.entry(a.1).or_default().push(a);
        }
        for (shard, asked) in by_shard {
            // One id asked twice at once is one claim.
            let mut ids: Vec<String> = asked.iter().map(|a| a.0.clone()).collect();
            ids.sort();
            ids.dedup();
            match store.claim_ids(&ids, shard).await {
                Ok(holders) => {
                    let held: HashMap<&String, u32> = ids.iter().zip(holders).collect();
                    for (id, _, tx) in asked {
                        let _ = tx.send(
                            held.get(&id)
                                .copied()
                                .ok_or_else(|| Error::Internal(format!("no claim for {id:?}"))),
                        );
                    }
                }
                Err(e) => {
                    // Not reached: the caller may try again.
                    let cause = e.to_string();
                    for (_, _, tx) in asked {
                        let _ = tx.send(Err(Error::Storage(tandem_storage::Error::Store {
                            what: "claim a transaction id",
                            cause: cause.clone(),
                        })));
                    }
                }
            }
        }
    }
}
