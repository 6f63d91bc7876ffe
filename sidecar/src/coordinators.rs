//! The coordinator replicas a sidecar may talk to, and which one to use.
//!
//! The `coordinator` setting is a comma-separated list of URLs; a URL whose
//! host is a name stands for every address the name resolves to. Calls go
//! to the replica that served last; replicas forward a call to the owner
//! of its shard. A replica that refuses as UNAVAILABLE and names another
//! (`tandem-owner`: a stream about a shard it does not own, a call about a
//! shard that moved) sends the next call there (added to the list if it
//! was not in it), and a stream about that topic goes there from then on
//! ([`Coordinators::route`]). Any other
//! UNAVAILABLE (refused connection, a replica going down) moves on to the
//! next replica, re-resolving names once every replica has failed.
//! [`Coordinators::call`] retries a unary call this way (and a call cut
//! off mid-way, UNKNOWN or CANCELLED, when a replica dies under it) for up
//! to [`FAILOVER_WAIT`], which covers a lease expiring and its successor
//! recovering; the app sees an error only if no replica served within it.
//! Every call retried so is safe to repeat: outcomes are idempotent by
//! transaction id, a prepare names its call (`attempt`) so that its repeat
//! is still recognised as the same call's, and publishes carry ids the
//! coordinator deduplicates.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tandem_runtime::tls::ClientTls;
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

use crate::error::{Error, Result};

/// How long a unary call keeps looking for a replica that serves.
pub(crate) const FAILOVER_WAIT: Duration = Duration::from_secs(20);

/// Metadata naming the owner of a shard on a refusal.
const OWNER: &str = "tandem-owner";

struct Replica {
    /// `http://host:port`.
    url: String,
    client: CoordinatorClient<Channel>,
    /// Learnt from a redirect or a name's addresses, not configured:
    /// forgotten when it cannot be reached (pods come and go).
    learnt: bool,
}

struct State {
    replicas: Vec<Replica>,
    current: usize,
    /// Changes of `current` so far: a failure reported against an older
    /// value came from a call made before someone else moved on.
    moves: usize,
    /// Failures in a row since a call last succeeded.
    failures: usize,
}

/// The known replicas and the one in use.
pub(crate) struct Coordinators {
    configured: Vec<String>,
    state: Mutex<State>,
    /// Streams about one topic go to the replica that owns its shard, once
    /// a refusal named it; by topic.
    routes: Mutex<std::collections::HashMap<String, (String, CoordinatorClient<Channel>)>>,
    /// Mutual TLS to every replica (`None`: plaintext).
    tls: Option<Arc<ClientTls>>,
}

/// The replica a stream about one topic is opened with.
pub(crate) struct Route {
    /// The choice of the replica in use, when no owner is known.
    ticket: Option<usize>,
    /// The replica's client.
    pub(crate) client: CoordinatorClient<Channel>,
}

impl std::fmt::Debug for Coordinators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinators")
            .field("configured", &self.configured)
            .finish()
    }
}

/// A client of the replica at `url`, over mutual TLS with `tls`.
pub(crate) fn client(
    url: &str,
    tls: Option<&Arc<ClientTls>>,
) -> Result<CoordinatorClient<Channel>> {
    let max = tandem_runtime::MAX_REQUEST_BYTES;
    tandem_runtime::tls::check_scheme("coordinator", url, tls.is_some())
        .map_err(|e| Error::invalid("coordinator", e.to_string()))?;
    let endpoint = tandem_runtime::tls::endpoint(url)
        .map_err(|e| Error::invalid("coordinator", format!("{url}: {e}")))?
        .tcp_nodelay(true)
        // A connection that died silently (a black-holed network, a
        // peer that vanished) is noticed within seconds, not after the
        // kernel's TCP timeout: sessions reconnect instead of stalling.
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true);
    Ok(
        CoordinatorClient::new(tandem_runtime::tls::lazy_channel(endpoint, tls))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    )
}

/// `http://host:port` split into host and port.
fn host_port(url: &str) -> Option<(&str, u16)> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.split('/').next()?;
    let (host, port) = rest.rsplit_once(':')?;
    Some((
        host.trim_start_matches('[').trim_end_matches(']'),
        port.parse().ok()?,
    ))
}

impl Coordinators {
    /// The replicas named by `urls` (not resolved yet: the first failure
    /// of all of them resolves names).
    pub(crate) fn new(urls: &[String], tls: Option<Arc<ClientTls>>) -> Result<Coordinators> {
        let replicas = urls
            .iter()
            .map(|u| {
                Ok(Replica {
                    url: u.clone(),
                    client: client(u, tls.as_ref())?,
                    learnt: false,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Coordinators {
            configured: urls.to_vec(),
            state: Mutex::new(State {
                replicas,
                current: 0,
                moves: 0,
                failures: 0,
            }),
            routes: Mutex::default(),
            tls,
        })
    }

    /// The URL of the replica at `addr` (`host:port`).
    pub(crate) fn url_of(&self, addr: &str) -> String {
        format!(
            "{}://{addr}",
            tandem_runtime::tls::scheme(self.tls.is_some())
        )
    }

    /// A client of the replica at `url`.
    pub(crate) fn connect(&self, url: &str) -> Result<CoordinatorClient<Channel>> {
        client(url, self.tls.as_ref())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The replica to use now: a ticket naming this choice (for
    /// [`failed`](Self::failed)) and its client.
    pub(crate) fn pick(&self) -> (usize, CoordinatorClient<Channel>) {
        let s = self.state();
        (s.moves, s.replicas[s.current].client.clone())
    }

    /// Where to open a stream about topic `key`: its shard's owner when a
    /// refusal named it, else the replica in use.
    pub(crate) fn route(&self, key: &str) -> Route {
        let routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, c)) = routes.get(key) {
            return Route {
                ticket: None,
                client: c.clone(),
            };
        }
        drop(routes);
        let (ticket, client) = self.pick();
        Route {
            ticket: Some(ticket),
            client,
        }
    }

    /// A stream about `key` opened by `route` failed with `status`: one
    /// naming the owner sends the next one there; another failure forgets
    /// the owner (or, with none known, moves on as [`failed`](Self::failed)
    /// does).
    /// True when the refusal named the owner.
    pub(crate) async fn route_failed(&self, key: &str, route: &Route, status: &Status) -> bool {
        let owner = status
            .metadata()
            .get(OWNER)
            .and_then(|v| v.to_str().ok())
            .map(|a| self.url_of(a));
        if let Some(url) = owner
            && let Ok(c) = self.connect(&url)
        {
            tracing::debug!(topic = %key, coordinator = %url, "streams of this topic go to its owner");
            self.routes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(key.to_owned(), (url, c));
            return true;
        }
        let known = self
            .routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key)
            .is_some();
        if let (false, Some(ticket)) = (known, route.ticket) {
            self.failed(ticket, status).await;
        }
        false
    }

    /// The replica in use served a call.
    pub(crate) fn served(&self) {
        self.state().failures = 0;
    }

    /// A call to the replica picked with `ticket` failed with `status`: if
    /// it named a shard's owner, use that one next, else the next replica.
    /// True when every replica has now failed in a row (time to pause).
    /// Only the first report against a choice counts (the calls of one
    /// failed batch all report it).
    pub(crate) async fn failed(&self, ticket: usize, status: &Status) -> bool {
        let owner = status
            .metadata()
            .get(OWNER)
            .and_then(|v| v.to_str().ok())
            .map(|a| self.url_of(a));
        let round_over = {
            let mut s = self.state();
            if s.moves != ticket {
                // Someone else already moved on.
                return false;
            }
            s.moves = s.moves.wrapping_add(1);
            let index = s.current;
            if let Some(owner) = owner {
                // A fresh round, starting at the holder.
                s.failures = 0;
                match s.replicas.iter().position(|r| r.url == owner) {
                    Some(i) => s.current = i,
                    None => match self.connect(&owner) {
                        Ok(c) => {
                            tracing::info!(coordinator = %owner, "coordinator named as the lease holder added");
                            s.replicas.push(Replica {
                                url: owner,
                                client: c,
                                learnt: true,
                            });
                            s.current = s.replicas.len() - 1;
                        }
                        Err(_) => s.current = (s.current + 1) % s.replicas.len(),
                    },
                }
                return false;
            }
            s.failures += 1;
            if s.replicas[index].learnt && s.replicas.len() > 1 {
                // Gone (or not reachable from here): forgotten; the next
                // one now has its place.
                let gone = s.replicas.remove(index);
                tracing::info!(coordinator = %gone.url, "unreachable coordinator address forgotten");
                s.current = index % s.replicas.len();
            } else {
                s.current = (s.current + 1) % s.replicas.len();
            }
            s.failures >= s.replicas.len()
        };
        if round_over {
            self.resolve().await;
        }
        round_over
    }

    /// Adds every address the configured names resolve to.
    async fn resolve(&self) {
        for url in &self.configured {
            let Some((host, port)) = host_port(url) else {
                continue;
            };
            if host.parse::<std::net::IpAddr>().is_ok() {
                continue;
            }
            let Ok(addrs) = tokio::net::lookup_host((host, port)).await else {
                continue;
            };
            let scheme = url.split_once("://").map_or("http", |(s, _)| s);
            for addr in addrs {
                let u = format!("{scheme}://{addr}");
                let mut s = self.state();
                if s.replicas.iter().any(|r| r.url == u) {
                    continue;
                }
                if let Ok(c) = self.connect(&u) {
                    tracing::info!(coordinator = %u, name = %host, "coordinator address resolved");
                    s.replicas.push(Replica {
                        url: u,
                        client: c,
                        learnt: true,
                    });
                }
            }
        }
    }

    /// Runs `call` on the replica in use, moving to another while the
    /// answer is UNAVAILABLE, for up to [`FAILOVER_WAIT`].
    pub(crate) async fn call<T, F, Fut>(&self, mut call: F) -> Result<Response<T>, Status>
    where
        F: FnMut(CoordinatorClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        self.retrying(|| {
            let (index, client) = self.pick();
            let answer = call(client);
            async move { (index, answer.await) }
        })
        .await
    }

    /// Runs `attempt` (which answers with the replica it asked) until it
    /// succeeds, fails for good, or [`FAILOVER_WAIT`] is over: an answer
    /// of UNAVAILABLE, UNKNOWN or CANCELLED moves on to another replica.
    pub(crate) async fn retrying<T, F, Fut>(&self, mut attempt: F) -> Result<T, Status>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = (usize, Result<T, Status>)>,
    {
        let deadline = tokio::time::Instant::now() + FAILOVER_WAIT;
        let mut pause = Duration::from_millis(50);
        let mut attempts = 0;
        loop {
            let (index, answer) = attempt().await;
            match answer {
                Ok(r) => {
                    self.served();
                    return Ok(r);
                }
                // Refused by a standby, not reached, or cut off mid-call
                // (the replica died): safe to send again, see above.
                Err(s)
                    if matches!(
                        s.code(),
                        Code::Unavailable | Code::Unknown | Code::Cancelled
                    ) && tokio::time::Instant::now() < deadline =>
                {
                    tracing::debug!(error = %s.message(), "coordinator unavailable; trying another");
                    self.failed(index, &s).await;
                    // The first redirect is followed at once; after that
                    // (a holder that is gone, every replica down) pause,
                    // longer each time.
                    if attempts > 0 {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(1));
                    }
                    attempts += 1;
                }
                Err(s) => return Err(s),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_come_out_of_urls() {
        assert_eq!(host_port("http://a.b:7400"), Some(("a.b", 7400)));
        assert_eq!(host_port("http://[::1]:7400/"), Some(("::1", 7400)));
        assert_eq!(host_port("http://a.b"), None);
    }

    fn refusal(owner: &'static str) -> Status {
        let mut s = Status::unavailable("not the holder");
        s.metadata_mut()
            .insert(OWNER, tonic::metadata::MetadataValue::from_static(owner));
        s
    }

    impl Coordinators {
        fn current(&self) -> String {
            let s = self.state();
            s.replicas[s.current].url.clone()
        }

        /// Reports a failure of the replica in use now.
        async fn fails(&self, status: &Status) -> bool {
            let ticket = self.pick().0;
            self.failed(ticket, status).await
        }
    }

    #[tokio::test]
    async fn a_named_holder_is_used_next_and_added_when_unknown() -> Result<()> {
        let c = Coordinators::new(
            &["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()],
            None,
        )?;
        assert!(!c.fails(&refusal("127.0.0.1:2")).await);
        assert_eq!(c.current(), "http://127.0.0.1:2");
        assert!(!c.fails(&refusal("127.0.0.1:3")).await);
        assert_eq!(c.current(), "http://127.0.0.1:3");
        // Plain failures go round; a learnt address that fails is
        // forgotten; a full round says so.
        let down = Status::unavailable("tcp connect error");
        assert!(!c.fails(&down).await);
        assert_eq!(c.current(), "http://127.0.0.1:1");
        assert_eq!(c.state().replicas.len(), 2, "127.0.0.1:3 forgotten");
        c.served();
        assert!(!c.fails(&down).await);
        let ticket = c.pick().0;
        assert!(c.failed(ticket, &down).await);
        // A stale report (another caller moved on already) changes nothing.
        assert!(!c.failed(ticket, &down).await);
        assert_eq!(c.current(), "http://127.0.0.1:1");
        // Configured addresses are never forgotten.
        assert_eq!(c.state().replicas.len(), 2);
        Ok(())
    }

    /// The calls of one failed batch all report the replica they used: the
    /// first report moves on, the others change nothing, also when the
    /// failed replica was forgotten and another took its place in the list.
    #[tokio::test]
    async fn reports_of_one_failed_choice_count_once() -> Result<()> {
        let c = Coordinators::new(
            &["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()],
            None,
        )?;
        assert!(!c.fails(&refusal("127.0.0.1:3")).await);
        assert!(!c.fails(&refusal("127.0.0.1:4")).await);
        assert!(!c.fails(&refusal("127.0.0.1:3")).await);
        assert_eq!(c.current(), "http://127.0.0.1:3");
        let ticket = c.pick().0;
        let down = Status::unavailable("tcp connect error");
        for _ in 0..5 {
            assert!(!c.failed(ticket, &down).await);
        }
        assert_eq!(c.current(), "http://127.0.0.1:4", "tried next, not skipped");
        assert_eq!(c.state().replicas.len(), 3, "only 127.0.0.1:3 forgotten");
        Ok(())
    }
}
