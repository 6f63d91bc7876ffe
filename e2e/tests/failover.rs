//! Three coordinator replicas on one PostgreSQL database, as real
//! processes: the shards spread over them and moving when one dies or
//! comes back, requests served through any replica, the owner of a busy
//! shard SIGKILLed under transactional load, paused past its lease,
//! PostgreSQL crashed under load, and a sidecar given the three addresses
//! while each replica in turn is down.
//!
//! The load tests are cycles of the fault campaign restricted to one kind
//! of fault (the campaign starts its own PostgreSQL server, so that it can
//! crash it); each cycle's whole history is checked: nothing acknowledged
//! or committed lost, nothing rolled back delivered, nothing applied twice,
//! per-key order.

mod common;

use std::time::Duration;

use common::*;
use tandem_e2e::campaign::{self, CycleReport};
use tandem_examples::process::Process;
use tandem_proto::coordinator as pb;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tandem_proto::sidecar as sc;
use tandem_proto::sidecar::sidecar_client::SidecarClient;
use tandem_storage::PgStore;

const BIN: &str = env!("CARGO_BIN_EXE_tandem-e2e");

/// Runs replicated campaign cycles with only fault kind `fault`; `None`
/// when PostgreSQL is not there and not required.
async fn campaign_with(fault: &str, seed: u64) -> TestResult<Option<CycleReport>> {
    if postgres().is_none() {
        return Ok(None);
    }
    let root = tempfile::tempdir()?;
    let opts = campaign::Options {
        seed,
        cycles: 1,
        messages: 60,
        chaos: Duration::from_secs(10),
        settle: Duration::from_secs(90),
        bin: BIN.into(),
        root: root.path().to_owned(),
        keep: false,
        replicated: true,
        only: vec![fault.to_owned()],
    };
    let mut reports = campaign::run(&opts).await?;
    let report = reports.pop().ok_or("the cycle could not be run")?;
    assert!(
        report.violations.is_empty(),
        "broken promises: {:#?}",
        report.violations
    );
    // Kept on failure for a look; removed with the test's folder otherwise.
    if report.kept.is_some() {
        let _ = root.keep();
    }
    Ok(Some(report))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_lease_holder_under_transactional_load_loses_nothing() -> TestResult {
    let Some(r) = campaign_with("kill-holder", 1001).await? else {
        return Ok(());
    };
    let kills = r.faults.get("SIGKILL of the lease holder").copied();
    assert!(kills >= Some(1), "the holder was killed: {:?}", r.faults);
    assert!(
        r.tally.committed > 0 && r.tally.effects > 0,
        "{:?}",
        r.tally
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_crashing_under_load_loses_nothing_acknowledged() -> TestResult {
    let Some(r) = campaign_with("pg-restart", 1002).await? else {
        return Ok(());
    };
    let crashes = r.faults.get("PostgreSQL crashed and restarted").copied();
    assert!(crashes >= Some(1), "PostgreSQL was crashed: {:?}", r.faults);
    assert!(
        r.tally.committed > 0 && r.tally.effects > 0,
        "{:?}",
        r.tally
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_holders_paused_past_their_lease_under_load_lose_nothing() -> TestResult {
    let Some(r) = campaign_with("stop-holder", 1003).await? else {
        return Ok(());
    };
    let taken = r
        .faults
        .get("SIGSTOP of the lease holder past its lease, taken over")
        .copied();
    assert!(
        taken >= Some(1),
        "another replica took over while the holder was paused: {:?}",
        r.faults
    );
    assert!(
        r.tally.committed > 0 && r.tally.effects > 0,
        "{:?}",
        r.tally
    );
    Ok(())
}

/// Three coordinator processes on one fresh database.
struct Replicas {
    url: String,
    procs: Vec<Process>,
    ports: Vec<u16>,
    /// Failpoints armed in every replica.
    failpoints: Option<String>,
    /// Shards of the store.
    shards: u32,
    /// Last: removed after the processes (whose logs are in it) are gone.
    dir: tempfile::TempDir,
}

impl Replicas {
    async fn start() -> TestResult<Option<Replicas>> {
        Self::start_with(None).await
    }

    async fn start_with(failpoints: Option<&str>) -> TestResult<Option<Replicas>> {
        let Some(server) = postgres() else {
            return Ok(None);
        };
        let url = fresh_postgres_database(&server).await?;
        let mut r = Replicas {
            dir: tempfile::tempdir()?,
            url,
            procs: Vec::new(),
            ports: vec![0; 3],
            failpoints: failpoints.map(str::to_owned),
            shards: tandem_coordinator::DEFAULT_SHARDS,
        };
        for i in 0..3 {
            let p = r.spawn(i)?;
            r.ports[i] = p.addr.port();
            r.procs.push(p);
        }
        Ok(Some(r))
    }

    fn spawn(&self, i: usize) -> TestResult<Process> {
        let args: Vec<String> = [
            "coordinator",
            "--listen",
            &format!("127.0.0.1:{}", self.ports[i]),
            "--store",
            &self.url,
            "--set",
            "lease_ms=1500",
            "--set",
            "check_after_ms=1000",
            "--set",
            &format!("shards={}", self.shards),
        ]
        .map(String::from)
        .to_vec();
        let env: Vec<(&str, String)> = self
            .failpoints
            .iter()
            .map(|f| ("TANDEM_FAILPOINTS", f.clone()))
            .collect();
        Ok(Process::start(
            &format!("coordinator-{i}"),
            BIN.as_ref(),
            &args,
            &env,
            self.dir.path(),
        )?)
    }

    fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The lease of `topic`'s shard.
    fn lease_of(&self, topic: &str) -> String {
        use tandem_coordinator::shards::{lease_name, shard_of};
        lease_name(shard_of(topic, self.shards), self.shards)
    }

    /// The namespace of `topic`'s records.
    fn namespace_of(&self, topic: &str) -> String {
        use tandem_coordinator::shards::{namespaces, shard_of};
        namespaces(shard_of(topic, self.shards), self.shards).0
    }

    /// How many shards each replica holds now (by index).
    async fn spread(&self) -> TestResult<Vec<u32>> {
        let store = PgStore::connect(&self.url, Duration::from_secs(5)).await?;
        let held = store.live_leases(tandem_coordinator::LEASE_NAME).await;
        store.close().await;
        let mut spread = vec![0; self.ports.len()];
        for l in held? {
            let port: Option<u16> = l.address.rsplit_once(':').and_then(|(_, p)| p.parse().ok());
            if let Some(i) = self.ports.iter().position(|p| Some(*p) == port) {
                spread[i] += 1;
            }
        }
        Ok(spread)
    }

    /// Waits until the shards are spread as `want` says (in any order of
    /// the replicas) and stay so for longer than a lease: no shard moving.
    async fn settle(&self, what: &str, want: &[u32]) -> TestResult {
        eventually(what, || async {
            let mut before = self.spread().await?;
            before.sort();
            if before != want {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(2000)).await;
            let mut after = self.spread().await?;
            after.sort();
            Ok((after == want).then_some(()))
        })
        .await
    }

    /// The index of the replica holding the lease of `topic`'s shard now,
    /// and its epoch.
    async fn holder_of(&self, topic: &str) -> TestResult<(usize, i64)> {
        let store = PgStore::connect(&self.url, Duration::from_secs(5)).await?;
        let lease = self.lease_of(topic);
        let found = eventually("a holder of the shard", || async {
            let l = store.holder(&lease).await?.filter(|l| l.expires_in > 0);
            let port: Option<u16> = l
                .as_ref()
                .and_then(|l| l.address.rsplit_once(':'))
                .and_then(|(_, p)| p.parse().ok());
            Ok(l.zip(self.ports.iter().position(|p| Some(*p) == port))
                .map(|(l, i)| (i, l.epoch)))
        })
        .await;
        store.close().await;
        found
    }

    /// The index of the replica holding the lease of topic `t`'s shard,
    /// and its epoch, once one does (other than `not`) and serves.
    async fn holder(&self, not: Option<(usize, i64)>) -> TestResult<(usize, i64)> {
        let store = PgStore::connect(&self.url, Duration::from_secs(5)).await?;
        let lease = self.lease_of("t");
        let found = eventually("a replica holding the lease", || async {
            let Some(l) = store.holder(&lease).await? else {
                return Ok(None);
            };
            // (A row not taken yet has no address.)
            let Some((_, port)) = l.address.rsplit_once(':') else {
                return Ok(None);
            };
            let port: u16 = port.parse()?;
            let i = self.ports.iter().position(|p| *p == port);
            let found = match (i, not) {
                (Some(i), Some((old, epoch))) if i == old || l.epoch <= epoch => None,
                (Some(i), _) if l.expires_in > 0 => Some((i, l.epoch)),
                _ => None,
            };
            // Holding it, and done recovering: it serves.
            Ok(match found {
                Some((i, _)) => {
                    // (Not yet created is an answer too: NOT_FOUND.)
                    let asked = client(self.ports[i])
                        .await?
                        .describe_topic(pb::DescribeTopicRequest { name: "t".into() })
                        .await;
                    let serves = !matches!(asked, Err(e) if e.code() == tonic::Code::Unavailable);
                    found.filter(|_| serves)
                }
                None => None,
            })
        })
        .await;
        store.close().await;
        found
    }

    fn print_logs(&self) {
        for p in &self.procs {
            eprintln!("---- {} log (tail) ----\n{}", p.name(), p.log_tail());
        }
    }
}

/// The health a replica reports for `service` ("" for the server).
async fn health(port: u16, service: &str) -> TestResult<i32> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect()
        .await?;
    let mut h = HealthClient::new(channel);
    Ok(h.check(HealthCheckRequest {
        service: service.into(),
    })
    .await?
    .into_inner()
    .status)
}

async fn client(port: u16) -> TestResult<CoordinatorClient<tonic::transport::Channel>> {
    Ok(CoordinatorClient::connect(format!("http://127.0.0.1:{port}")).await?)
}

fn msg(id: &str) -> pb::Message {
    pb::Message {
        id: id.into(),
        key: Some(bytes::Bytes::from_static(b"k")),
        value: bytes::Bytes::from(id.to_owned()),
        headers: Vec::new(),
        partition: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_paused_past_its_lease_cannot_write_when_it_wakes() -> TestResult {
    // Every append to a topic waits 1.5 s before its transaction, so that
    // one is in flight when the holder is frozen.
    let (ns, _) = {
        use tandem_coordinator::shards::{namespaces, shard_of};
        let n = tandem_coordinator::DEFAULT_SHARDS;
        namespaces(shard_of("t", n), n)
    };
    let point = format!("storage.pg.write:{ns}=delay:1500");
    let Some(mut r) = Replicas::start_with(Some(&point)).await? else {
        return Ok(());
    };
    let result = paused_holder(&mut r).await;
    if result.is_err() {
        r.print_logs();
    }
    result
}

async fn paused_holder(r: &mut Replicas) -> TestResult {
    // Once the shards have settled (three, three and two), nothing moves
    // until the pause.
    r.settle("the shards spread evenly", &[2, 3, 3]).await?;
    let (old, epoch) = r.holder(None).await?;
    // Health: every replica reaches the database (ready); a replica serves
    // the coordinator service while it holds a shard.
    let serving = tonic_health::ServingStatus::Serving as i32;
    let coordinator = "tandem.coordinator.v1.Coordinator";
    for (i, port) in r.ports.iter().enumerate() {
        let all = eventually("a replica reaching the database", || async {
            Ok((health(*port, "").await? == serving).then_some(()))
        });
        all.await?;
        let named = health(*port, coordinator).await?;
        let holds = r.spread().await?[i] > 0;
        assert_eq!(named == serving, holds, "replica {i}: {named}");
    }
    let mut c = client(r.ports[old]).await?;
    c.create_topic(pb::CreateTopicRequest {
        name: "t".into(),
        partitions: 1,
    })
    .await?;
    c.publish(pb::PublishRequest {
        topic: "t".into(),
        messages: vec![msg("before-1"), msg("before-2")],
    })
    .await?;

    // A publish on its way to the log (held up before its transaction);
    // the holder freezes; another replica takes the lease over.
    let stuck = {
        let mut c = c.clone();
        tokio::spawn(async move {
            c.publish(pb::PublishRequest {
                topic: "t".into(),
                messages: vec![msg("in-flight-when-the-holder-froze")],
            })
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    r.procs[old].pause()?;
    let (new, new_epoch) = r.holder(Some((old, epoch))).await?;
    let mut n = client(r.ports[new]).await?;
    n.publish(pb::PublishRequest {
        topic: "t".into(),
        messages: vec![msg("after-1")],
    })
    .await?;

    // It wakes up: its write goes to PostgreSQL and is refused there.
    r.procs[old].resume()?;
    let refused = tokio::time::timeout(Duration::from_secs(20), stuck)
        .await??
        .expect_err("the woken holder must not acknowledge a write");
    eprintln!(
        "the woken holder (epoch {epoch}, taken over at epoch {new_epoch}) answered: {:?}: {}",
        refused.code(),
        refused.message()
    );
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains(&format!(
            "no longer held with epoch {epoch} (now epoch {new_epoch}): write refused"
        )),
        "refused by the fence: {refused:?}"
    );
    // From now on it forwards what it is sent to the new holder (once it
    // has noticed; until then it refuses): the message lands once, under
    // the new epoch.
    eventually("the old holder forwarding to the new one", || {
        let mut c = c.clone();
        async move {
            let sent = c
                .publish(pb::PublishRequest {
                    topic: "t".into(),
                    messages: vec![msg("sent-to-the-old-holder-later")],
                })
                .await;
            match sent {
                Ok(_) => Ok(Some(())),
                Err(e) => {
                    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
                    Ok(None)
                }
            }
        }
    })
    .await?;
    n.publish(pb::PublishRequest {
        topic: "t".into(),
        messages: vec![msg("after-2")],
    })
    .await?;

    // What the log holds: exactly the acknowledged messages, in order, once.
    let ids = read_ids(r).await?;
    assert_eq!(
        ids,
        [
            "before-1",
            "before-2",
            "after-1",
            "sent-to-the-old-holder-later",
            "after-2"
        ]
    );
    let woke = r.procs[old].log_tail();
    assert!(
        woke.contains("stopped serving"),
        "the woken holder says it stopped serving:\n{woke}"
    );
    Ok(())
}

/// The ids in topic `t`, read straight from the tables.
async fn read_ids(r: &Replicas) -> TestResult<Vec<String>> {
    let pool = sqlx::PgPool::connect(&r.url).await?;
    let rows: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT id FROM tandem_record WHERE ns = $1 AND topic = 't' ORDER BY \"offset\"",
    )
    .bind(r.namespace_of("t"))
    .fetch_all(&pool)
    .await?;
    pool.close().await;
    Ok(rows
        .into_iter()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_given_three_addresses_keeps_working_while_any_one_replica_is_down() -> TestResult
{
    let Some(mut r) = Replicas::start().await? else {
        return Ok(());
    };
    let result = one_down_at_a_time(&mut r).await;
    if result.is_err() {
        r.print_logs();
    }
    result
}

/// The orders service's test app and its sidecar, given `coordinators`.
fn orders(r: &Replicas, coordinators: &str) -> TestResult<(Process, Process)> {
    let dir = r.dir.path();
    let db = dir.join("orders-app.db").display().to_string();
    let app = Process::start(
        "orders-app",
        BIN.as_ref(),
        &[
            "test-app".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--db".into(),
            db.clone(),
        ],
        &[],
        dir,
    )?;
    let sidecar = Process::start(
        "orders-sidecar",
        BIN.as_ref(),
        &[
            "sidecar".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--coordinator".into(),
            coordinators.into(),
            "--service".into(),
            "orders".into(),
            "--app".into(),
            app.url(),
            "--db".into(),
            db,
        ],
        &[],
        dir,
    )?;
    Ok((app, sidecar))
}

async fn one_down_at_a_time(r: &mut Replicas) -> TestResult {
    let (app, sidecar) = orders(r, &r.urls())?;
    let mut s = SidecarClient::connect(sidecar.url()).await?;
    let (first, _) = r.holder(None).await?;
    client(r.ports[first])
        .await?
        .create_topic(pb::CreateTopicRequest {
            name: "orders".into(),
            partitions: 2,
        })
        .await?;
    let mut committed = Vec::new();
    // Each replica down in turn (the holder among them, whichever it is
    // then), with transactions and plain publishes going on; then back.
    for down in 0..3 {
        r.procs[down].kill();
        for i in 0..5 {
            let id = format!("txn-{down}-{i}");
            let t = s
                .publish_transactional(sc::PublishTransactionalRequest {
                    topic: "orders".into(),
                    message: Some(pb::Message {
                        id: String::new(),
                        key: Some(bytes::Bytes::from(format!("k{i}"))),
                        value: bytes::Bytes::from(format!("commit {id}")),
                        headers: Vec::new(),
                        partition: None,
                    }),
                    txn_id: id.clone(),
                })
                .await
                .map_err(|e| format!("{id} with coordinator-{down} down: {e}"))?
                .into_inner();
            assert_eq!(
                t.state,
                pb::TransactionState::Committed as i32,
                "{id} with coordinator-{down} down: {t:?}"
            );
            committed.push(id);
            s.publish(pb::PublishRequest {
                topic: "orders".into(),
                messages: vec![msg(&format!("plain-{down}-{i}"))],
            })
            .await
            .map_err(|e| format!("plain publish with coordinator-{down} down: {e}"))?;
        }
        let p = r.spawn(down)?;
        r.procs[down] = p;
    }
    // Every committed transaction's message is in the log once, and every
    // plain one too.
    let pool = sqlx::PgPool::connect(&r.url).await?;
    let ids: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT id FROM tandem_record WHERE ns = $1 AND topic = 'orders'")
            .bind(r.namespace_of("orders"))
            .fetch_all(&pool)
            .await?;
    pool.close().await;
    let mut ids: Vec<String> = ids
        .into_iter()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect();
    ids.sort();
    let mut expected: Vec<String> = committed;
    for down in 0..3 {
        for i in 0..5 {
            expected.push(format!("plain-{down}-{i}"));
        }
    }
    expected.sort();
    assert_eq!(ids, expected);
    drop(sidecar);
    drop(app);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_spread_over_the_replicas_and_move_when_one_dies_or_returns() -> TestResult {
    let Some(mut r) = Replicas::start().await? else {
        return Ok(());
    };
    let result = sharded(&mut r).await;
    if result.is_err() {
        r.print_logs();
    }
    result
}

fn topic_names() -> Vec<String> {
    (0..16).map(|i| format!("topic-{i:02}")).collect()
}

/// The high-water mark of each of `topics`, asked through `port`.
async fn marks(port: u16, topics: &[String]) -> TestResult<Vec<u64>> {
    let mut c = client(port).await?;
    let mut out = Vec::new();
    for t in topics {
        let d = c
            .describe_topic(pb::DescribeTopicRequest { name: t.clone() })
            .await?
            .into_inner();
        out.push(d.partitions.iter().map(|p| p.high_water_mark).sum());
    }
    Ok(out)
}

async fn sharded(r: &mut Replicas) -> TestResult {
    use tandem_coordinator::shards::shard_of;
    assert_eq!(r.shards, 8, "the default");
    let n = r.shards;
    // Eight shards over three replicas: three, three and two.
    r.settle("the shards spread evenly", &[2, 3, 3]).await?;
    let topics = topic_names();
    let shards: std::collections::BTreeSet<u32> = topics.iter().map(|t| shard_of(t, n)).collect();
    assert!(
        shards.len() >= 6,
        "the topics fall in most shards: {shards:?}"
    );

    // Any replica serves any request: topics created through one, listed
    // through each, published to through each in turn.
    let mut first = client(r.ports[0]).await?;
    for t in &topics {
        first
            .create_topic(pb::CreateTopicRequest {
                name: t.clone(),
                partitions: 2,
            })
            .await?;
    }
    for port in &r.ports {
        let listed: Vec<String> = client(*port)
            .await?
            .list_topics(pb::ListTopicsRequest {})
            .await?
            .into_inner()
            .topics
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(listed, topics, "listed through {port}");
    }
    for (i, t) in topics.iter().enumerate() {
        client(r.ports[i % 3])
            .await?
            .publish(pb::PublishRequest {
                topic: t.clone(),
                messages: vec![msg(&format!("{t}-a"))],
            })
            .await?;
    }
    assert_eq!(marks(r.ports[1], &topics).await?, vec![1; topics.len()]);
    // Describe says where a topic lives, whichever replica is asked.
    let (owner, _) = r.holder_of(&topics[3]).await?;
    let d = client(r.ports[(owner + 1) % 3])
        .await?
        .describe_topic(pb::DescribeTopicRequest {
            name: topics[3].clone(),
        })
        .await?
        .into_inner();
    assert_eq!((d.shard, d.shards), (shard_of(&topics[3], n), n));
    assert_eq!(d.owner, format!("127.0.0.1:{}", r.ports[owner]));

    // A transaction prepared through one replica, committed through a
    // second and read through the third, whichever owns its topic.
    let t0 = &topics[0];
    let prepared = client(r.ports[1])
        .await?
        .prepare(pb::PrepareRequest {
            service: "orders".into(),
            txn_id: "txn-1".into(),
            topic: t0.clone(),
            message: Some(msg("ignored")),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(prepared.txn_id, "txn-1");
    client(r.ports[2])
        .await?
        .commit(pb::EndTransactionRequest {
            service: "orders".into(),
            txn_id: "txn-1".into(),
        })
        .await?;
    let seen = client(r.ports[0])
        .await?
        .get_transaction(pb::GetTransactionRequest {
            txn_id: "txn-1".into(),
        })
        .await?
        .into_inner();
    assert_eq!(seen.state, pb::TransactionState::Committed as i32);
    // Its id names that transaction only, also for a topic of another
    // shard.
    let other = topics
        .iter()
        .find(|t| shard_of(t, n) != shard_of(t0, n))
        .expect("a topic of another shard");
    let reused = client(r.ports[0])
        .await?
        .prepare(pb::PrepareRequest {
            service: "orders".into(),
            txn_id: "txn-1".into(),
            topic: other.clone(),
            message: Some(msg("ignored")),
            ..Default::default()
        })
        .await
        .expect_err("an id taken in another shard");
    assert_eq!(reused.code(), tonic::Code::AlreadyExists, "{reused:?}");
    let unknown = client(r.ports[1])
        .await?
        .commit(pb::EndTransactionRequest {
            service: "orders".into(),
            txn_id: "never-prepared".into(),
        })
        .await
        .expect_err("an unknown transaction");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");

    // The owner of the first topic's shard dies: the two others take its
    // shards (four each) and serve what was acknowledged.
    let victim = {
        let (i, _) = r.holder_of(t0).await?;
        i
    };
    r.procs[victim].kill();
    let alive: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    eventually("the dead replica's shards taken over", || async {
        let now = r.spread().await?;
        Ok((now[alive[0]] == 4 && now[alive[1]] == 4).then_some(()))
    })
    .await?;
    let mut expected = vec![1; topics.len()];
    expected[0] = 2; // and the committed transaction's message
    // Until a survivor has read the new holders from the lease table, what
    // it forwards to the dead one is answered UNAVAILABLE, which a client
    // sends again (as sidecars do): asked through each, until neither is.
    for port in alive.iter().map(|i| r.ports[*i]) {
        let got = eventually("the survivors routing to the new holders", || async {
            match marks(port, &topics).await {
                Ok(m) => Ok(Some(m)),
                Err(e)
                    if e.downcast_ref::<tonic::Status>()
                        .is_some_and(|s| s.code() == tonic::Code::Unavailable) =>
                {
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        })
        .await?;
        assert_eq!(got, expected, "through {port}");
    }
    let after = client(r.ports[alive[1]])
        .await?
        .get_transaction(pb::GetTransactionRequest {
            txn_id: "txn-1".into(),
        })
        .await?
        .into_inner();
    assert_eq!(after.state, pb::TransactionState::Committed as i32);
    for (i, t) in topics.iter().enumerate() {
        client(r.ports[alive[i % 2]])
            .await?
            .publish(pb::PublishRequest {
                topic: t.clone(),
                messages: vec![msg(&format!("{t}-b"))],
            })
            .await?;
    }

    // It comes back: shards are handed to it until the load is even again,
    // and nothing acknowledged moved or went missing.
    r.procs[victim] = r.spawn(victim)?;
    r.settle("the shards spread evenly again", &[2, 3, 3])
        .await?;
    let expected: Vec<u64> = expected.iter().map(|m| m + 1).collect();
    for port in &r.ports {
        assert_eq!(marks(*port, &topics).await?, expected, "through {port}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_backs_reach_a_sidecar_from_a_replica_it_was_not_given() -> TestResult {
    let Some(mut r) = Replicas::start().await? else {
        return Ok(());
    };
    let result = check_back_from_elsewhere(&mut r).await;
    if result.is_err() {
        r.print_logs();
    }
    result
}

/// A sidecar given one replica's address only; the transaction's topic is
/// in a shard another replica owns. That owner checks the transaction back
/// through a session the sidecar opened with it after the first replica
/// listed the live ones.
async fn check_back_from_elsewhere(r: &mut Replicas) -> TestResult {
    r.settle("the shards spread evenly", &[2, 3, 3]).await?;
    let (owner, _) = r.holder_of("orders").await?;
    let given = (owner + 1) % 3;
    let (app, sidecar) = orders(r, &format!("http://127.0.0.1:{}", r.ports[given]))?;
    client(r.ports[given])
        .await?
        .create_topic(pb::CreateTopicRequest {
            name: "orders".into(),
            partitions: 2,
        })
        .await?;
    let mut s = SidecarClient::connect(sidecar.url()).await?;
    // Begun and never ended: the app has no row for it, so check-back
    // (after check_after_ms = 1000) learns that it rolled back.
    let begun = s
        .begin(sc::BeginRequest {
            topic: "orders".into(),
            message: Some(msg("left-open")),
            txn_id: "left-open".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(begun.txn_id, "left-open");
    let mut c = client(r.ports[given]).await?;
    let ended = eventually("the transaction settled by check-back", || {
        let mut c = c.clone();
        async move {
            let t = c
                .get_transaction(pb::GetTransactionRequest {
                    txn_id: "left-open".into(),
                })
                .await?
                .into_inner();
            Ok((t.state != pb::TransactionState::Prepared as i32).then_some(t))
        }
    })
    .await?;
    assert_eq!(
        ended.state,
        pb::TransactionState::RolledBack as i32,
        "{ended:?}"
    );
    let stats = c.get_stats(pb::GetStatsRequest {}).await?.into_inner();
    // Only the owner checks back, through its own sessions: an answer
    // means the sidecar holds one with it.
    assert!(
        stats.resolved_by_check >= 1 && stats.final_actions == 0,
        "answered by the sidecar, not settled by the final action: {stats:?}"
    );
    drop(sidecar);
    drop(app);
    Ok(())
}
