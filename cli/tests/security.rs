//! Mutual TLS and service identity with real processes and real
//! certificates: a throwaway CA made here (rcgen), a coordinator serving
//! TLS, sidecars presenting their services' certificates.
//!
//! The contract checked: a caller's identity is its certificate's, so a
//! client holding one service's certificate cannot commit, roll back,
//! prepare, look at or answer check-backs for another service's
//! transactions, nor consume what it is not granted (PERMISSION_DENIED);
//! plaintext, expired and untrusted certificates never get a call through;
//! certificates rotate without a restart; and replicas sharing a
//! PostgreSQL store forward calls to each other over mutual TLS.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tandem_examples::process::Process;
use tandem_proto::app as app_pb;
use tandem_proto::coordinator as pb;
use tandem_proto::sidecar as sc;
use tandem_runtime::tls::{ClientTls, TlsFiles};
use tonic::Code;
use tonic::transport::Channel;

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

/// A CA that signs the test's certificates.
struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str) -> TestResult<Ca> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        Ok(Ca {
            issuer: rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate()?)?,
        })
    }

    /// Writes `<stem>.crt`, `<stem>.key` for the service `name` (a SPIFFE
    /// id, and 127.0.0.1 so that it can serve on loopback), valid
    /// `from..until` (years), and `<stem>.ca` holding this CA.
    fn issue(&self, dir: &Path, stem: &str, name: &str, years: (i32, i32)) -> TestResult<TlsFiles> {
        self.issue_for(dir, stem, name, years, true)
    }

    /// As [`issue`](Self::issue); with `loopback` false the certificate
    /// names the host `localhost` but no address: a client dialling
    /// 127.0.0.1 finds it valid only by its identity.
    fn issue_for(
        &self,
        dir: &Path,
        stem: &str,
        name: &str,
        years: (i32, i32),
        loopback: bool,
    ) -> TestResult<TlsFiles> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![rcgen::SanType::URI(
            format!("spiffe://tandem.test/ns/test/sa/{name}").try_into()?,
        )];
        params.subject_alt_names.push(if loopback {
            rcgen::SanType::IpAddress([127, 0, 0, 1].into())
        } else {
            rcgen::SanType::DnsName("localhost".try_into()?)
        });
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = rcgen::date_time_ymd(years.0, 1, 1);
        params.not_after = rcgen::date_time_ymd(years.1, 1, 1);
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let files = TlsFiles {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
            ca: dir.join(format!("{stem}.ca")),
        };
        // Written whole and renamed, as a Secret's files change.
        write(&files.cert, &cert.pem())?;
        write(&files.key, &key.serialize_pem())?;
        write(&files.ca, &self.issuer.pem())?;
        Ok(files)
    }
}

fn write(path: &Path, text: &str) -> TestResult {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

const VALID: (i32, i32) = (2020, 2200);
const EXPIRED: (i32, i32) = (2020, 2021);

fn sets(files: &TlsFiles) -> Vec<String> {
    vec![
        "--set".into(),
        format!("tls_cert={}", files.cert.display()),
        "--set".into(),
        format!("tls_key={}", files.key.display()),
        "--set".into(),
        format!("tls_ca={}", files.ca.display()),
    ]
}

/// A coordinator serving mutual TLS with `files`, and the rules in
/// `authorization` (a TOML `[authorization]` table, or none).
fn start_coordinator(dir: &Path, files: &TlsFiles, authorization: &str) -> TestResult<Process> {
    let config = dir.join("coordinator.toml");
    std::fs::write(&config, authorization)?;
    let mut args: Vec<String> = [
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--config",
        &config.display().to_string(),
        "--data-dir",
        &dir.join("coordinator").display().to_string(),
        "--set",
        "metrics_listen=off",
        "--set",
        "check_after_ms=60000",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(sets(files));
    Ok(Process::start(
        "coordinator",
        Path::new(TANDEM),
        &args,
        &[],
        dir,
    )?)
}

fn https(p: &Process) -> String {
    format!("https://{}", p.addr)
}

/// A coordinator client presenting `files`, connected now.
async fn client(
    url: &str,
    files: &TlsFiles,
) -> TestResult<pb::coordinator_client::CoordinatorClient<Channel>> {
    client_expecting(url, files, None).await
}

/// [`client`], accepting a server certificate that names `expect`.
async fn client_expecting(
    url: &str,
    files: &TlsFiles,
    expect: Option<&str>,
) -> TestResult<pb::coordinator_client::CoordinatorClient<Channel>> {
    let tls = ClientTls::new(files.clone(), expect.map(str::to_owned))?;
    let endpoint = tandem_runtime::tls::endpoint(url)?.connect_timeout(Duration::from_secs(5));
    let channel = tandem_runtime::tls::channel(endpoint, Some(&tls)).await?;
    Ok(pb::coordinator_client::CoordinatorClient::new(channel))
}

/// Runs `tandem --coordinator URL [TLS flags] args…`: success, stdout, stderr.
fn tandem(
    url: &str,
    files: Option<&TlsFiles>,
    args: &[&str],
) -> TestResult<(bool, String, String)> {
    let mut cmd = std::process::Command::new(TANDEM);
    cmd.arg("--coordinator").arg(url);
    if let Some(f) = files {
        cmd.arg("--tls-cert")
            .arg(&f.cert)
            .arg("--tls-key")
            .arg(&f.key)
            .arg("--tls-ca")
            .arg(&f.ca);
    }
    let out = cmd.args(args).stdin(std::process::Stdio::null()).output()?;
    Ok((
        out.status.success(),
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    ))
}

fn sidecar_args(dir: &Path, url: &str, service: &str, files: &TlsFiles) -> Vec<String> {
    let mut args: Vec<String> = [
        "sidecar",
        "--listen",
        "127.0.0.1:0",
        "--coordinator",
        url,
        "--service",
        service,
        "--db",
        &dir.join(format!("{service}.db")).display().to_string(),
        "--set",
        "metrics_listen=off",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(sets(files));
    args
}

fn message(id: &str) -> pb::Message {
    pb::Message {
        id: id.into(),
        key: Some(bytes::Bytes::from_static(b"k")),
        value: bytes::Bytes::from_static(b"order placed"),
        headers: Vec::new(),
        partition: None,
    }
}

/// Whether a client presenting `files` gets a call answered (a refused
/// client certificate may show only at the first call: in TLS 1.3 the
/// server checks it after the client's side of the handshake is done).
async fn answered(url: &str, files: &TlsFiles) -> Result<(), String> {
    let mut c = client(url, files).await.map_err(|e| e.to_string())?;
    c.list_topics(pb::ListTopicsRequest {})
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

fn code<T>(r: Result<T, tonic::Status>) -> Option<Code> {
    r.err().map(|s| s.code())
}

/// Opens a consume stream as `group` on `topic`: its first answer, or
/// the refusal.
async fn consume(
    c: &mut pb::coordinator_client::CoordinatorClient<Channel>,
    topic: &str,
    group: &str,
) -> Result<
    (
        tokio::sync::mpsc::Sender<pb::ConsumeRequest>,
        tonic::Streaming<pb::ConsumeResponse>,
    ),
    tonic::Status,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let _ = tx
        .send(pb::ConsumeRequest {
            kind: Some(pb::consume_request::Kind::Subscribe(pb::Subscribe {
                topic: topic.into(),
                group: group.into(),
                initial_credit: 10,
                start_from: pb::StartFrom::Earliest as i32,
                ..Default::default()
            })),
        })
        .await;
    let mut stream = c
        .consume(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // The assignment (or the refusal, on a stream refused after opening).
    stream
        .message()
        .await?
        .ok_or_else(|| tonic::Status::unknown("stream ended"))?;
    Ok((tx, stream))
}

/// The first message delivered on a consume stream, within 20 s.
async fn first_delivery(
    stream: &mut tonic::Streaming<pb::ConsumeResponse>,
) -> TestResult<pb::Delivery> {
    let got = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.message().await? {
                Some(pb::ConsumeResponse {
                    kind: Some(pb::consume_response::Kind::Deliveries(d)),
                }) if !d.deliveries.is_empty() => {
                    return Ok::<_, tonic::Status>(d.deliveries[0].clone());
                }
                Some(_) => continue,
                None => return Err(tonic::Status::unknown("stream ended")),
            }
        }
    })
    .await??;
    Ok(got)
}

const RULES: &str = r#"
[authorization]
admins = ["tandem-admin"]

[[authorization.grant]]
principals = ["orders"]
publish = ["orders.*"]

[[authorization.grant]]
principals = ["payments"]
consume = ["orders.*"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_acts_only_for_its_own_service() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let ca = Ca::new("tandem test CA")?;
    let coordinator_files = ca.issue(d, "coordinator", "tandem-coordinator", VALID)?;
    let orders_files = ca.issue(d, "orders", "orders", VALID)?;
    let payments_files = ca.issue(d, "payments", "payments", VALID)?;
    let admin_files = ca.issue(d, "admin", "tandem-admin", VALID)?;
    let coordinator = start_coordinator(d, &coordinator_files, RULES)?;
    let url = https(&coordinator);

    // The operator's command authenticates with its own certificate.
    for topic in ["orders.created", "carts"] {
        let (ok, _, err) = tandem(
            &url,
            Some(&admin_files),
            &["topic", "create", topic, "--partitions", "1"],
        )?;
        assert!(ok, "{err}");
    }
    let (ok, _, err) = tandem(&url, Some(&payments_files), &["topic", "delete", "carts"])?;
    assert!(
        !ok && err.contains("payments") && err.contains("admins"),
        "{err}"
    );
    let (ok, _, err) = tandem(&url, Some(&payments_files), &["txn", "list"])?;
    assert!(!ok && err.contains("may not"), "{err}");

    // A sidecar whose certificate names another service does not start.
    let mut wrong = std::process::Command::new(TANDEM)
        .args(sidecar_args(d, &url, "orders", &payments_files))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = wrong.try_wait()? {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = wrong.kill();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let out = wrong.wait_with_output()?;
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(status.is_some_and(|s| !s.success()), "{said}");
    assert!(said.contains("does not match"), "{said}");

    // The real orders sidecar prepares a transaction.
    let orders = Process::start(
        "orders-sidecar",
        Path::new(TANDEM),
        &sidecar_args(d, &url, "orders", &orders_files),
        &[],
        d,
    )?;
    let mut app = sc::sidecar_client::SidecarClient::connect(orders.url()).await?;
    let txn = app
        .begin(sc::BeginRequest {
            topic: "orders.created".into(),
            message: Some(message("")),
            txn_id: "order-1".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .txn_id;

    // Another service's certificate gets nowhere with it.
    let mut rogue = client(&url, &payments_files).await?;
    let end = |service: &str| pb::EndTransactionRequest {
        service: service.into(),
        txn_id: txn.clone(),
    };
    assert_eq!(
        code(rogue.commit(end("orders")).await),
        Some(Code::PermissionDenied)
    );
    assert_eq!(
        code(rogue.rollback(end("orders")).await),
        Some(Code::PermissionDenied)
    );
    // Under its own name, the transaction is still not its own.
    assert_eq!(
        code(rogue.rollback(end("payments")).await),
        Some(Code::PermissionDenied)
    );
    let transact = rogue
        .transact(pb::TransactRequest {
            items: vec![pb::TransactItem {
                kind: Some(pb::transact_item::Kind::Commit(end("orders"))),
            }],
        })
        .await?
        .into_inner();
    assert_eq!(transact.results[0].code, Code::PermissionDenied as i32);
    let prepare = pb::PrepareRequest {
        service: "orders".into(),
        txn_id: "forged".into(),
        topic: "orders.created".into(),
        message: Some(message("")),
        ..Default::default()
    };
    assert_eq!(
        code(rogue.prepare(prepare).await),
        Some(Code::PermissionDenied)
    );
    assert_eq!(
        code(
            rogue
                .get_transaction(pb::GetTransactionRequest {
                    txn_id: txn.clone()
                })
                .await
        ),
        Some(Code::PermissionDenied)
    );
    // Check-backs of orders never reach it: its session is refused.
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(pb::SessionRequest {
        kind: Some(pb::session_request::Kind::Hello(pb::Hello {
            service: "orders".into(),
            instance: "rogue".into(),
        })),
    })
    .await?;
    let session = rogue
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let session = match session {
        Ok(r) => r.into_inner().message().await.map(|_| ()),
        Err(s) => Err(s),
    };
    assert_eq!(code(session), Some(Code::PermissionDenied));
    // A call dressed up as forwarded by a replica is refused too.
    let mut forged = tonic::Request::new(pb::EndTransactionRequest {
        service: "orders".into(),
        txn_id: txn.clone(),
    });
    forged.metadata_mut().insert(
        "tandem-forwarded",
        tonic::metadata::MetadataValue::from_static("1"),
    );
    assert_eq!(
        code(rogue.rollback(forged).await),
        Some(Code::PermissionDenied)
    );
    // It publishes nothing it is not granted, and consumes only what it is,
    // under its own group.
    let publish = pb::PublishRequest {
        topic: "orders.created".into(),
        messages: vec![message("fake")],
    };
    assert_eq!(
        code(rogue.publish(publish).await),
        Some(Code::PermissionDenied)
    );
    // A saga of orders may call only orders' branches (its grant names no
    // `sagas`), started directly or begun in a transaction.
    let mut as_orders = client(&url, &orders_files).await?;
    let definition = pb::SagaDefinition {
        branches: vec![pb::SagaBranch {
            name: "charge".into(),
            service: "payments".into(),
            action: "charge".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let start = pb::StartSagaRequest {
        saga_id: "saga-1".into(),
        service: "orders".into(),
        definition: Some(definition),
    };
    assert_eq!(
        code(as_orders.start_saga(start.clone()).await),
        Some(Code::PermissionDenied)
    );
    let begun = pb::PrepareRequest {
        service: "orders".into(),
        txn_id: "saga-txn".into(),
        topic: "__sagas".into(),
        message: Some(pb::Message {
            value: bytes::Bytes::from(prost::Message::encode_to_vec(&start)),
            ..message("")
        }),
        ..Default::default()
    };
    assert_eq!(
        code(as_orders.prepare(begun).await),
        Some(Code::PermissionDenied)
    );
    // Its dead letters of the topic it consumes must be its own group's:
    // `dlq redrive` would send a forged one to another group.
    rogue
        .create_topic(pb::CreateTopicRequest {
            name: "orders.created.dlq".into(),
            partitions: 1,
        })
        .await?;
    let dead_letter = |id: &str, group: &str| pb::PublishRequest {
        topic: "orders.created.dlq".into(),
        messages: vec![pb::Message {
            headers: ["tandem.topic", "tandem.group"]
                .iter()
                .zip(["orders.created", group])
                .map(|(name, value)| pb::Header {
                    name: (*name).into(),
                    value: bytes::Bytes::from(value.to_owned()),
                })
                .collect(),
            ..message(id)
        }],
    };
    assert_eq!(
        code(rogue.publish(dead_letter("forged", "orders")).await),
        Some(Code::PermissionDenied)
    );
    rogue.publish(dead_letter("own", "payments")).await?;
    // Nor by way of a transaction (Prepare, or a Transact item).
    let forged = pb::PrepareRequest {
        service: "payments".into(),
        txn_id: "forged-txn".into(),
        topic: "orders.created.dlq".into(),
        message: dead_letter("forged-txn", "orders").messages.pop(),
        ..Default::default()
    };
    assert_eq!(
        code(rogue.prepare(forged.clone()).await),
        Some(Code::PermissionDenied)
    );
    let items = rogue
        .transact(pb::TransactRequest {
            items: vec![pb::TransactItem {
                kind: Some(pb::transact_item::Kind::Prepare(forged)),
            }],
        })
        .await?
        .into_inner();
    assert_eq!(items.results[0].code, Code::PermissionDenied as i32);
    assert_eq!(
        code(consume(&mut rogue, "carts", "payments").await),
        Some(Code::PermissionDenied)
    );
    assert_eq!(
        code(consume(&mut rogue, "orders.created", "orders").await),
        Some(Code::PermissionDenied)
    );
    let (_keep, mut deliveries) = consume(&mut rogue, "orders.created", "payments").await?;

    // The transaction is untouched: its own sidecar commits it, and the
    // granted consumer gets it.
    let committed = app
        .commit(sc::EndRequest {
            txn_id: txn.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(committed.state, pb::TransactionState::Committed as i32);
    let got = first_delivery(&mut deliveries).await?;
    assert_eq!(got.message.map(|m| m.id), Some(txn.clone()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_expired_and_untrusted_clients_are_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let ca = Ca::new("tandem test CA")?;
    let other = Ca::new("someone else's CA")?;
    let coordinator_files = ca.issue(d, "coordinator", "tandem-coordinator", VALID)?;
    let coordinator = start_coordinator(d, &coordinator_files, "")?;
    let url = https(&coordinator);
    let good = ca.issue(d, "good", "orders", VALID)?;
    answered(&url, &good).await?;

    // Plaintext: no call gets through.
    let plain = format!("http://{}", coordinator.addr);
    let answer = match pb::coordinator_client::CoordinatorClient::connect(plain.clone()).await {
        Ok(mut c) => c.list_topics(pb::ListTopicsRequest {}).await.map(drop),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    assert!(answer.is_err(), "a plaintext call was answered");
    let (ok, _, err) = tandem(&plain, None, &["topic", "list"])?;
    assert!(
        !ok && err.contains("does not speak plaintext gRPC"),
        "{err}"
    );

    // Expired, or signed by a CA the coordinator does not trust.
    let expired = ca.issue(d, "expired", "orders", EXPIRED)?;
    let mut untrusted = other.issue(d, "untrusted", "orders", VALID)?;
    // (It trusts the coordinator's CA: only its own certificate is wrong.)
    untrusted.ca = good.ca.clone();
    for files in [&expired, &untrusted] {
        assert!(
            answered(&url, files).await.is_err(),
            "{} was let in",
            files.cert.display()
        );
    }
    // A client that does not trust the coordinator's CA stops too.
    let distrustful = other.issue(d, "distrustful", "orders", VALID)?;
    assert!(answered(&url, &distrustful).await.is_err());
    // And a coordinator address given as https without certificates is
    // refused before anything is sent.
    let (ok, _, err) = tandem(&url, None, &["topic", "list"])?;
    assert!(!ok && err.contains("https"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_a_restart() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let old = Ca::new("old CA")?;
    let new = Ca::new("new CA")?;
    let served = old.issue(d, "coordinator", "tandem-coordinator", VALID)?;
    let mut coordinator = start_coordinator(d, &served, "")?;
    let url = https(&coordinator);
    let before = old.issue(d, "before", "orders", VALID)?;
    let after = new.issue(d, "after", "orders", VALID)?;
    answered(&url, &before).await?;
    assert!(
        answered(&url, &after).await.is_err(),
        "a new-CA client was let in before the rotation"
    );

    // cert-manager renews the coordinator's certificate under the new CA
    // and the bundle changes with it: the same files, new contents.
    let renewed = new.issue(d, "renewed", "tandem-coordinator", VALID)?;
    for (from, to) in [
        (&renewed.cert, &served.cert),
        (&renewed.key, &served.key),
        (&renewed.ca, &served.ca),
    ] {
        write(to, &std::fs::read_to_string(from)?)?;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match answered(&url, &after).await {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => {
                return Err(
                    format!("the rotated certificates were not used within 15 s: {e}").into(),
                );
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    // Old-CA clients are now out, and the coordinator never restarted.
    assert!(answered(&url, &before).await.is_err());
    assert!(!coordinator.has_exited());
    Ok(())
}

/// The PostgreSQL server of the test command, if it gave one (it fails
/// the test when one was required and none is there).
fn postgres() -> Option<String> {
    match std::env::var("TANDEM_TEST_POSTGRES") {
        Ok(url) => Some(url),
        Err(_) => {
            assert!(
                std::env::var_os("TANDEM_REQUIRE_POSTGRES").is_none(),
                "TANDEM_TEST_POSTGRES is not set but PostgreSQL tests are required"
            );
            eprintln!("skipped: no TANDEM_TEST_POSTGRES (scripts/test.sh provides one)");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_forward_to_each_other_over_mutual_tls() -> TestResult {
    let Some(server) = postgres() else {
        return Ok(());
    };
    let name = format!(
        "security_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    let store = tandem_storage::PgStore::create_database(&server, &name).await?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let ca = Ca::new("tandem test CA")?;
    // One certificate for every replica, as one Secret for a Deployment.
    // It names `localhost` but not the address replicas advertise
    // (127.0.0.1:PORT, as pod addresses): reaching one there is checked
    // by identity.
    let replica_files = ca.issue_for(d, "replica", "tandem-coordinator", VALID, false)?;
    let orders_files = ca.issue(d, "orders", "orders", VALID)?;
    let replica = |i: usize| -> TestResult<Process> {
        let mut args: Vec<String> = [
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--store",
            &store,
            "--set",
            "lease_ms=1500",
            "--set",
            "shards=4",
            "--set",
            "metrics_listen=off",
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(sets(&replica_files));
        Ok(Process::start(
            &format!("replica-{i}"),
            Path::new(TANDEM),
            &args,
            &[],
            d,
        )?)
    };
    let a = replica(0)?;
    let b = replica(1)?;
    let at = |p: &Process| format!("https://localhost:{}", p.addr.port());
    let mut c = client(&at(&a), &orders_files).await?;
    let topics: Vec<String> = (0..8).map(|i| format!("orders.{i}")).collect();
    // Created through replica a, whoever owns each shard: calls about
    // another's shard go there.
    let deadline = Instant::now() + Duration::from_secs(30);
    for t in &topics {
        loop {
            let created = c
                .create_topic(pb::CreateTopicRequest {
                    name: t.clone(),
                    partitions: 1,
                })
                .await;
            match created {
                Ok(_) => break,
                Err(s) if s.code() == Code::AlreadyExists => break,
                Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(s) => return Err(format!("creating {t}: {s}").into()),
            }
        }
    }
    // Once b owns a shard, a (which does not forward streams) names b for
    // that shard's topics.
    let b_addr = b.addr.to_string();
    let theirs = loop {
        let mut found = None;
        for t in &topics {
            if let Err(s) = consume(&mut c, t, "orders").await
                && s.code() == Code::Unavailable
                && s.metadata()
                    .get("tandem-owner")
                    .and_then(|v| v.to_str().ok())
                    == Some(b_addr.as_str())
            {
                found = Some(t.clone());
                break;
            }
        }
        match found {
            Some(t) => break t,
            None if Instant::now() > deadline => {
                return Err(format!(
                    "replica b never owned a shard within 30 s; logs:\n{}\n{}",
                    a.log_tail(),
                    b.log_tail()
                )
                .into());
            }
            None => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    };
    // A unary call about it, sent to a, is forwarded to b over mutual TLS
    // and answered.
    let published = c
        .publish(pb::PublishRequest {
            topic: theirs.clone(),
            messages: vec![message("via-a")],
        })
        .await;
    assert!(
        published.is_ok(),
        "{published:?}; logs:\n{}\n{}",
        a.log_tail(),
        b.log_tail()
    );
    let mut at_b = client(&at(&b), &orders_files).await?;
    let (_keep, mut stream) = consume(&mut at_b, &theirs, "orders").await?;
    let got = first_delivery(&mut stream).await?;
    assert_eq!(got.message.map(|m| m.id).as_deref(), Some("via-a"));

    // A sidecar given replica a by name holds a session with every replica
    // (check-backs of b's shards come down b's), reaching b at the address
    // it advertises: the identity it verified at a is what it accepts.
    let _sidecar = Process::start(
        "orders-sidecar",
        Path::new(TANDEM),
        &sidecar_args(d, &at(&a), "orders", &orders_files),
        &[],
        d,
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !b.log_tail().contains("sidecar session opened") {
        assert!(
            Instant::now() < deadline,
            "no session reached replica b within 20 s; its log:\n{}",
            b.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// An app that commits every local transaction and records the messages
/// it is handed.
#[derive(Clone, Default)]
struct App {
    handled: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl app_pb::app_server::App for App {
    async fn execute_local_transaction(
        &self,
        _: tonic::Request<app_pb::ExecuteLocalTransactionRequest>,
    ) -> Result<tonic::Response<app_pb::LocalTransactionResponse>, tonic::Status> {
        Ok(tonic::Response::new(app_pb::LocalTransactionResponse {
            state: pb::LocalState::Commit as i32,
        }))
    }

    async fn check_local_transaction(
        &self,
        _: tonic::Request<app_pb::CheckLocalTransactionRequest>,
    ) -> Result<tonic::Response<app_pb::LocalTransactionResponse>, tonic::Status> {
        Ok(tonic::Response::new(app_pb::LocalTransactionResponse {
            state: pb::LocalState::Commit as i32,
        }))
    }

    async fn handle_message(
        &self,
        req: tonic::Request<app_pb::HandleMessageRequest>,
    ) -> Result<tonic::Response<app_pb::HandleMessageResponse>, tonic::Status> {
        let id = req.into_inner().message.unwrap_or_default().id;
        self.handled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(id);
        Ok(tonic::Response::new(app_pb::HandleMessageResponse {}))
    }

    async fn handle_messages(
        &self,
        _: tonic::Request<app_pb::HandleMessagesRequest>,
    ) -> Result<tonic::Response<app_pb::HandleMessagesResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("one at a time"))
    }

    async fn execute_branch(
        &self,
        _: tonic::Request<app_pb::BranchRequest>,
    ) -> Result<tonic::Response<app_pb::BranchResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("no sagas here"))
    }

    async fn compensate_branch(
        &self,
        _: tonic::Request<app_pb::BranchRequest>,
    ) -> Result<tonic::Response<app_pb::BranchResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("no sagas here"))
    }
}

/// The production shape: each app and its sidecar talk over Unix sockets
/// in their pod, and the sidecars reach the coordinator over mutual TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_reach_their_sidecars_over_unix_sockets() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let ca = Ca::new("tandem test CA")?;
    let coordinator_files = ca.issue(d, "coordinator", "tandem-coordinator", VALID)?;
    let admin_files = ca.issue(d, "admin", "tandem-admin", VALID)?;
    let coordinator = start_coordinator(d, &coordinator_files, RULES)?;
    let url = https(&coordinator);
    let (ok, _, err) = tandem(
        &url,
        Some(&admin_files),
        &["topic", "create", "orders.created", "--partitions", "1"],
    )?;
    assert!(ok, "{err}");

    let mut sidecars = Vec::new();
    let mut apps = Vec::new();
    let mut servers = Vec::new();
    for service in ["orders", "payments"] {
        let files = ca.issue(d, service, service, VALID)?;
        let app_socket = d.join(format!("{service}-app.sock"));
        let app = App::default();
        let listener = tandem_runtime::unix::bind(&app_socket)?;
        servers.push(tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(app_pb::app_server::AppServer::new(app.clone()))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        ));
        let mut args = sidecar_args(d, &url, service, &files);
        args[2] = format!("unix:{}", d.join(format!("{service}.sock")).display());
        args.extend(["--app".to_owned(), format!("unix:{}", app_socket.display())]);
        let sidecar = Process::start(
            &format!("{service}-sidecar"),
            Path::new(TANDEM),
            &args,
            &[],
            d,
        )?;
        assert_eq!(sidecar.listening, args[2]);
        sidecars.push(sidecar);
        apps.push(app);
    }
    let socket = |service: &str| d.join(format!("{service}.sock"));
    // What a probe asks: each sidecar on its socket, the coordinator over
    // mutual TLS.
    for service in ["orders", "payments"] {
        let target = format!("unix:{}", socket(service).display());
        let (ok, out, err) = tandem(&url, None, &["health", &target])?;
        assert!(ok && out.trim() == "SERVING", "{out}{err}");
    }
    let (ok, out, err) = tandem(
        &url,
        Some(&admin_files),
        &["health", "--service", "tandem.coordinator.v1.Coordinator"],
    )?;
    assert!(ok && out.trim() == "SERVING", "{out}{err}");
    let mut payments = sc::sidecar_client::SidecarClient::new(tandem_runtime::unix::lazy_channel(
        socket("payments"),
    ));
    payments
        .subscribe(sc::SubscribeRequest {
            topic: "orders.created".into(),
            group: "payments".into(),
            start_from: pb::StartFrom::Earliest as i32,
            ..Default::default()
        })
        .await?;
    // A group it may not consume as is refused at Subscribe, and not kept.
    let refused = payments
        .subscribe(sc::SubscribeRequest {
            topic: "orders.created".into(),
            group: "orders".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(refused), Some(Code::PermissionDenied));
    let kept = payments
        .list_subscriptions(sc::ListSubscriptionsRequest {})
        .await?
        .into_inner()
        .subscriptions;
    assert_eq!(kept.len(), 1, "{kept:?}");
    let mut orders = sc::sidecar_client::SidecarClient::new(tandem_runtime::unix::lazy_channel(
        socket("orders"),
    ));
    // The local transaction runs in the app, called back over its socket.
    let sent = orders
        .publish_transactional(sc::PublishTransactionalRequest {
            topic: "orders.created".into(),
            message: Some(message("")),
            txn_id: "order-uds".into(),
        })
        .await?
        .into_inner();
    assert_eq!(sent.state, pb::TransactionState::Committed as i32);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let handled = apps[1]
            .handled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if handled == ["order-uds"] {
            break;
        }
        assert!(Instant::now() < deadline, "handled: {handled:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for s in servers {
        s.abort();
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_accepts_only_the_coordinator_it_expects() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let ca = Ca::new("tandem test CA")?;
    // Signed by the same CA, but another service's certificate, and valid
    // for no address: it serves as an impostor would.
    let imposter = ca.issue_for(d, "imposter", "payments", VALID, false)?;
    let coordinator = start_coordinator(d, &imposter, "")?;
    let url = https(&coordinator);
    let orders = ca.issue(d, "orders", "orders", VALID)?;
    let expected = "spiffe://tandem.test/ns/test/sa/tandem-coordinator";
    assert!(
        client_expecting(&url, &orders, Some(expected))
            .await
            .is_err()
    );
    assert!(client(&url, &orders).await.is_err());
    // A bare service name is not an identity to expect.
    assert!(
        client_expecting(&url, &orders, Some("payments"))
            .await
            .is_err()
    );
    // What it does name is accepted when expected (the pod-address case).
    let mut c = client_expecting(
        &url,
        &orders,
        Some("spiffe://tandem.test/ns/test/sa/payments"),
    )
    .await?;
    c.list_topics(pb::ListTopicsRequest {}).await?;
    Ok(())
}
