//! Mutual TLS for the gRPC hops between Tandem's processes (sidecar →
//! coordinator, replica → replica, the `tandem` command → coordinator).
//!
//! Each side has three PEM files: its certificate chain, its private key,
//! and the CA bundle it trusts for the other side. Both sides present a
//! certificate and verify the other's chain, validity dates included.
//!
//! **Identity.** A peer's identity comes from its certificate, never from
//! a field it sends: the first URI SAN (a SPIFFE id such as
//! `spiffe://cluster.local/ns/shop/sa/orders`), else the first DNS SAN
//! (`orders.shop.svc`). The *service name* it stands for is the URI's last
//! path segment (`orders`) or the DNS name's first label (`orders`).
//!
//! **Server names.** A client accepts a server certificate valid for the
//! host it dialled, as usual, or one whose identity (its full id) is the
//! one it expects: the one configured, else the first one it verified by
//! host name (replicas reach each other, and sidecars reach an owner, by
//! pod address, which no certificate of a Deployment names).
//!
//! **Rotation.** The files are read again at most once a second when a
//! connection is accepted or opened; when their bytes changed and they
//! load, new connections use them (established ones keep theirs). Files
//! caught half-written are skipped with a warning until they load.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::Uri;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

/// How often the files are looked at again, at most.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// TLS handshakes a server runs at once, at most.
const MAX_HANDSHAKES: usize = 256;

/// A handshake not finished within this long is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS file that cannot be used, or settings that do not fit together.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read the {what} {}: {source}", path.display())]
    Read {
        /// Which file (certificate, key, CA bundle).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file does not hold what it should.
    #[error("the {what} {}: {message}", path.display())]
    Content {
        /// Which file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Settings that do not fit together, or a URL that does not fit them.
    #[error("{0}")]
    Settings(String),
}

/// The PEM files of one side of a mutual-TLS hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// This side's certificate chain (leaf first).
    pub cert: PathBuf,
    /// This side's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificates this side trusts for the other side.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// The files from three settings, which are given all together or not
    /// at all (`names` are the settings' names, for the error).
    pub fn from_settings(
        cert: Option<&str>,
        key: Option<&str>,
        ca: Option<&str>,
        names: [&str; 3],
    ) -> Result<Option<TlsFiles>, TlsError> {
        fn given(v: Option<&str>) -> Option<&str> {
            v.map(str::trim).filter(|v| !v.is_empty())
        }
        match (given(cert), given(key), given(ca)) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles {
                cert: cert.into(),
                key: key.into(),
                ca: ca.into(),
            })),
            (c, k, a) => {
                let missing: Vec<&str> = [c, k, a]
                    .iter()
                    .zip(names)
                    .filter(|(v, _)| v.is_none())
                    .map(|(_, n)| n)
                    .collect();
                Err(TlsError::Settings(format!(
                    "{} must be set too: TLS needs {}, {} and {} together",
                    missing.join(" and "),
                    names[0],
                    names[1],
                    names[2]
                )))
            }
        }
    }
}

/// Who a certificate names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The URI or DNS SAN it was taken from.
    pub id: String,
    /// The service name it stands for.
    pub name: String,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.id == self.name {
            f.write_str(&self.id)
        } else {
            write!(f, "{} ({})", self.name, self.id)
        }
    }
}

impl Identity {
    /// The identity a DER certificate names, if any.
    pub fn of_certificate(der: &[u8]) -> Option<Identity> {
        let names = subject_alt_names(der)?;
        let text = |v: &[u8]| std::str::from_utf8(v).ok().map(str::to_owned);
        if let Some(uri) = names.iter().find(|(t, _)| *t == SAN_URI) {
            let id = text(uri.1)?;
            let path = id.split_once("://").map_or(id.as_str(), |(_, r)| r);
            let name = path.rsplit('/').find(|s| !s.is_empty())?.to_owned();
            return Some(Identity { id, name });
        }
        let dns = names.iter().find(|(t, _)| *t == SAN_DNS)?;
        let id = text(dns.1)?;
        // (A wildcard name stands for no one service.)
        let name = id
            .split('.')
            .next()
            .filter(|s| !s.is_empty() && !s.contains('*'))?
            .to_owned();
        Some(Identity { id, name })
    }
}

/// Context tags of the GeneralName choices used (RFC 5280 4.2.1.6).
const SAN_DNS: u8 = 0x82;
const SAN_URI: u8 = 0x86;

/// One DER element at the start of `input`: its tag, its content and what
/// follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, r) = rest.split_at_checked(n)?;
        rest = r;
        bytes.iter().fold(0usize, |a, &b| (a << 8) | usize::from(b))
    };
    let (content, rest) = rest.split_at_checked(len)?;
    Some((tag, content, rest))
}

/// The subjectAltName entries (tag, value) of a DER certificate: empty
/// when it has none, `None` when it does not parse.
fn subject_alt_names(cert: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    const SEQUENCE: u8 = 0x30;
    const EXTENSIONS: u8 = 0xa3;
    const SAN_OID: [u8; 3] = [0x55, 0x1d, 0x11];
    let (SEQUENCE, cert, _) = der(cert)? else {
        return None;
    };
    let (SEQUENCE, mut tbs, _) = der(cert)? else {
        return None;
    };
    while !tbs.is_empty() {
        let (tag, content, rest) = der(tbs)?;
        tbs = rest;
        if tag != EXTENSIONS {
            continue;
        }
        let (SEQUENCE, mut exts, _) = der(content)? else {
            return None;
        };
        while !exts.is_empty() {
            let (SEQUENCE, ext, rest) = der(exts)? else {
                return None;
            };
            exts = rest;
            let (0x06, oid, rest) = der(ext)? else {
                return None;
            };
            if oid != SAN_OID {
                continue;
            }
            let (mut tag, mut value, rest) = der(rest)?;
            if tag == 0x01 {
                // `critical`
                (tag, value, _) = der(rest)?;
            }
            if tag != 0x04 {
                return None;
            }
            let (SEQUENCE, mut names, _) = der(value)? else {
                return None;
            };
            let mut out = Vec::new();
            while !names.is_empty() {
                let (t, v, rest) = der(names)?;
                names = rest;
                out.push((t, v));
            }
            return Some(out);
        }
    }
    Some(Vec::new())
}

/// The files, parsed.
struct Material {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    identity: Identity,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn content(what: &'static str, path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::Content {
        what,
        path: path.to_owned(),
        message: message.to_string(),
    }
}

fn certificates(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| content(what, path, e))?;
    if certs.is_empty() {
        return Err(content(what, path, "holds no PEM certificate"));
    }
    Ok(certs)
}

impl Material {
    /// Reads the files; also returns their bytes, to tell when they change.
    fn load(files: &TlsFiles) -> Result<(Vec<u8>, Material), TlsError> {
        let cert_pem = read("certificate", &files.cert)?;
        let key_pem = read("private key", &files.key)?;
        let ca_pem = read("CA bundle", &files.ca)?;
        let chain = certificates("certificate", &files.cert, &cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| content("private key", &files.key, e))?;
        let mut roots = RootCertStore::empty();
        for ca in certificates("CA bundle", &files.ca, &ca_pem)? {
            roots
                .add(ca)
                .map_err(|e| content("CA bundle", &files.ca, e))?;
        }
        let identity = Identity::of_certificate(&chain[0]).ok_or_else(|| {
            content(
                "certificate",
                &files.cert,
                "names no identity: it needs a URI SAN (spiffe://…/sa/NAME) or a DNS SAN",
            )
        })?;
        let mut raw = cert_pem;
        raw.extend_from_slice(&key_pem);
        raw.extend_from_slice(&ca_pem);
        Ok((
            raw,
            Material {
                chain,
                key,
                roots: Arc::new(roots),
                identity,
            },
        ))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds a rustls configuration from the files' contents.
type Build<T> = Box<dyn Fn(&Material) -> Result<T, TlsError> + Send + Sync>;

/// A rustls configuration built from the files, built again when they
/// change.
struct Reloading<T> {
    files: TlsFiles,
    build: Build<T>,
    state: Mutex<Loaded<T>>,
}

struct Loaded<T> {
    raw: Vec<u8>,
    value: Arc<T>,
    identity: Identity,
    checked: Instant,
}

impl<T> Reloading<T> {
    fn new(files: TlsFiles, build: Build<T>) -> Result<Reloading<T>, TlsError> {
        let (raw, material) = Material::load(&files)?;
        let value = Arc::new(build(&material)?);
        Ok(Reloading {
            files,
            build,
            state: Mutex::new(Loaded {
                raw,
                value,
                identity: material.identity,
                checked: Instant::now(),
            }),
        })
    }

    /// The configuration to use now (the files are looked at again when
    /// they were not for a second).
    fn current(&self) -> Arc<T> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.checked.elapsed() >= RELOAD_CHECK {
            state.checked = Instant::now();
            let loaded = Material::load(&self.files).and_then(|(raw, m)| {
                if raw == state.raw {
                    return Ok(None);
                }
                let value = (self.build)(&m)?;
                Ok(Some((raw, value, m.identity)))
            });
            match loaded {
                Ok(None) => {}
                Ok(Some((raw, value, identity))) => {
                    tracing::info!(cert = %self.files.cert.display(), %identity, "TLS files changed: new connections use them");
                    state.raw = raw;
                    state.value = Arc::new(value);
                    state.identity = identity;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "TLS files changed but do not load: still using the previous ones");
                    // (Read the same broken bytes again only in a second.)
                }
            }
        }
        state.value.clone()
    }

    fn identity(&self) -> Identity {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .identity
            .clone()
    }
}

/// The TLS side of a server that requires a client certificate.
pub struct ServerTls {
    config: Reloading<ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.config.files)
            .finish()
    }
}

fn rustls_error(e: impl std::fmt::Display) -> TlsError {
    TlsError::Settings(format!("TLS: {e}"))
}

impl ServerTls {
    /// Loads the files now (an error names the file at fault).
    pub fn new(files: TlsFiles) -> Result<Arc<ServerTls>, TlsError> {
        let build = |m: &Material| -> Result<ServerConfig, TlsError> {
            let provider = provider();
            let clients =
                WebPkiClientVerifier::builder_with_provider(m.roots.clone(), provider.clone())
                    .build()
                    .map_err(rustls_error)?;
            let mut config = ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(rustls_error)?
                .with_client_cert_verifier(clients)
                .with_single_cert(m.chain.clone(), m.key.clone_key())
                .map_err(rustls_error)?;
            config.alpn_protocols = vec![b"h2".to_vec()];
            Ok(config)
        };
        Ok(Arc::new(ServerTls {
            config: Reloading::new(files, Box::new(build))?,
        }))
    }

    /// The identity of this server's own certificate (as last loaded).
    pub fn identity(&self) -> Identity {
        self.config.identity()
    }

    /// Accepts connections on `listener`, each handshake in a task of its
    /// own; those that fail (no certificate, an untrusted or expired one,
    /// plaintext) are logged and dropped. Ends when the stream is dropped.
    pub fn incoming(
        self: &Arc<Self>,
        listener: TcpListener,
    ) -> ReceiverStream<io::Result<TlsConn>> {
        let (tx, rx) = mpsc::channel(64);
        let tls = self.clone();
        // Handshakes in progress at most.
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = tx.closed() => return,
                };
                let (tcp, remote) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: not a
                        // reason to stop serving.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Accepting never waits: past the limit, a new connection is
                // closed at once (its client tries again), so idle sockets
                // cannot hold the port.
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    tracing::debug!(%remote, "too many TLS handshakes at once: connection closed");
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.current());
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let identity = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(|c| Identity::of_certificate(c));
                            let info = PeerInfo {
                                remote: Some(remote),
                                identity,
                            };
                            let _ = tx.send(Ok(TlsConn { stream, info })).await;
                        }
                        Ok(Err(e)) => {
                            tracing::info!(%remote, error = %e, "TLS handshake refused");
                        }
                        Err(_) => tracing::info!(%remote, "TLS handshake not finished within 10 s"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// Who is at the other end of a connection a server accepted: in every
/// request's extensions when the server serves TLS.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// The identity its certificate names.
    pub identity: Option<Identity>,
}

/// The identity of the client that sent `req`, when it came over TLS with
/// a certificate that names one.
pub fn peer_identity<T>(req: &tonic::Request<T>) -> Option<&Identity> {
    req.extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.identity.as_ref())
}

/// Whether `req` came over a TLS connection.
pub fn over_tls<T>(req: &tonic::Request<T>) -> bool {
    req.extensions().get::<PeerInfo>().is_some()
}

/// A server's TLS connection.
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The TLS side of a client: its certificate, and the CA it trusts.
pub struct ClientTls {
    config: Reloading<ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("files", &self.config.files)
            .finish()
    }
}

/// Accepts a server certificate valid for the dialled name, or one that
/// names the expected identity: the configured one, else the first one
/// verified by name (pinned).
#[derive(Debug)]
struct ServerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    expect: Option<String>,
    pinned: Arc<Mutex<Option<String>>>,
}

impl ServerVerifier {
    fn expected(&self) -> Option<String> {
        self.expect.clone().or_else(|| {
            self.pinned
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        })
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(v) => {
                if self.expect.is_none()
                    && let Some(id) = Identity::of_certificate(end_entity)
                {
                    self.pinned
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get_or_insert(id.id);
                }
                Ok(v)
            }
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.expected().is_some_and(|e| {
                Identity::of_certificate(end_entity).is_some_and(|i| i.id == e)
            }) =>
            {
                // (The chain and dates were checked before the name.)
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

impl ClientTls {
    /// Loads the files now. A server is accepted when its certificate is
    /// valid for the name dialled, or names `expect` (a full id: a URI or
    /// DNS SAN), or without `expect` the id of the first server this client
    /// verified by name.
    pub fn new(files: TlsFiles, expect: Option<String>) -> Result<Arc<ClientTls>, TlsError> {
        if let Some(e) = &expect
            && !e.contains("://")
            && !e.contains('.')
        {
            return Err(TlsError::Settings(format!(
                "expected coordinator identity {e:?}: give its full id (spiffe://DOMAIN/ns/NS/sa/NAME, or a DNS name), not a bare service name"
            )));
        }
        let pinned = Arc::new(Mutex::new(None));
        let build = move |m: &Material| -> Result<ClientConfig, TlsError> {
            let provider = provider();
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                m.roots.clone(),
                provider.clone(),
            )
            .build()
            .map_err(rustls_error)?;
            let verifier = Arc::new(ServerVerifier {
                inner,
                expect: expect.clone(),
                pinned: pinned.clone(),
            });
            let mut config = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(rustls_error)?
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_client_auth_cert(m.chain.clone(), m.key.clone_key())
                .map_err(rustls_error)?;
            config.alpn_protocols = vec![b"h2".to_vec()];
            Ok(config)
        };
        Ok(Arc::new(ClientTls {
            config: Reloading::new(files, Box::new(build))?,
        }))
    }

    /// The identity of this client's own certificate (as last loaded).
    pub fn identity(&self) -> Identity {
        self.config.identity()
    }

    /// Opens a TLS connection to `host:port`, checking the server's
    /// certificate against `host`.
    async fn connect(
        &self,
        host: &str,
        port: u16,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
        tokio_rustls::TlsConnector::from(self.config.current())
            .connect(name, tcp)
            .await
    }
}

/// Opens the TLS connections of a [`Channel`].
#[derive(Clone, Debug)]
struct Connector(Arc<ClientTls>);

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.0.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: no host"))
                })?;
            let port = uri.port_u16().unwrap_or(443);
            let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.connect(&host, port))
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("TLS connection to {host}:{port} not made within 10 s"),
                    )
                })??;
            Ok(TokioIo::new(stream))
        })
    }
}

/// Checks that `url`'s scheme fits the TLS settings: `https://` with TLS,
/// `http://` without (`setting` names the URL's setting in the error).
pub fn check_scheme(setting: &str, url: &str, tls: bool) -> Result<(), TlsError> {
    match (url.split_once("://").map(|(s, _)| s), tls) {
        (Some("https"), true) | (Some("http"), false) => Ok(()),
        (Some("https"), false) => Err(TlsError::Settings(format!(
            "{setting}: {url} is https:// but no TLS certificate, key and CA are set"
        ))),
        (Some("http"), true) => Err(TlsError::Settings(format!(
            "{setting}: {url} is plaintext http:// but TLS is configured: use https://"
        ))),
        _ => Err(TlsError::Settings(format!(
            "{setting}: {url:?} is not an http:// or https:// URL"
        ))),
    }
}

/// The scheme of URLs to servers: `https` with TLS.
pub fn scheme(tls: bool) -> &'static str {
    if tls { "https" } else { "http" }
}

/// The endpoint of `url` for [`lazy_channel`] and [`channel`]: an
/// `https://` URL is given to tonic as `http://` (this module's connector
/// does the TLS, whatever tonic's own TLS features, which would take
/// `https://` URLs over, are).
pub fn endpoint(url: &str) -> Result<Endpoint, tonic::transport::Error> {
    match url.strip_prefix("https://") {
        Some(rest) => Endpoint::from_shared(format!("http://{rest}")),
        None => Endpoint::from_shared(url.to_owned()),
    }
}

/// A channel to `endpoint` that connects when first used: over TLS with
/// `tls`, else plaintext. Call [`check_scheme`] on the URL first, and make
/// the endpoint with [`endpoint`].
pub fn lazy_channel(endpoint: Endpoint, tls: Option<&Arc<ClientTls>>) -> Channel {
    match tls {
        Some(tls) => endpoint.connect_with_connector_lazy(Connector(tls.clone())),
        None => endpoint.connect_lazy(),
    }
}

/// A channel to `endpoint` (made with [`endpoint`]), connected now.
pub async fn channel(
    endpoint: Endpoint,
    tls: Option<&Arc<ClientTls>>,
) -> Result<Channel, tonic::transport::Error> {
    match tls {
        Some(tls) => {
            endpoint
                .connect_with_connector(Connector(tls.clone()))
                .await
        }
        None => endpoint.connect().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().expect("a key");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        params
            .self_signed(&key)
            .expect("a certificate")
            .der()
            .to_vec()
    }

    #[test]
    fn identity_is_the_uri_san_else_the_dns_san() {
        let uri = |s: &str| rcgen::SanType::URI(s.try_into().expect("an ia5 string"));
        let dns = |s: &str| rcgen::SanType::DnsName(s.try_into().expect("an ia5 string"));
        let spiffe = cert_with(vec![
            dns("orders.shop.svc"),
            uri("spiffe://cluster.local/ns/shop/sa/orders"),
        ]);
        assert_eq!(
            Identity::of_certificate(&spiffe),
            Some(Identity {
                id: "spiffe://cluster.local/ns/shop/sa/orders".into(),
                name: "orders".into()
            })
        );
        let by_dns = cert_with(vec![dns("payments.shop.svc.cluster.local")]);
        assert_eq!(
            Identity::of_certificate(&by_dns).map(|i| i.name),
            Some("payments".into())
        );
        let none = cert_with(vec![rcgen::SanType::IpAddress([127, 0, 0, 1].into())]);
        assert_eq!(Identity::of_certificate(&none), None);
        assert_eq!(Identity::of_certificate(b"\x30\x05garbage"), None);
        // Cut anywhere, a certificate never panics the parser.
        for n in 0..spiffe.len() {
            let _ = Identity::of_certificate(&spiffe[..n]);
        }
    }

    #[test]
    fn tls_settings_come_together() {
        let names = ["tls_cert", "tls_key", "tls_ca"];
        assert_eq!(
            TlsFiles::from_settings(None, Some(" "), None, names).ok(),
            Some(None)
        );
        let e = TlsFiles::from_settings(Some("c.pem"), None, Some("ca.pem"), names)
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.starts_with("tls_key must be set")),
            "{e:?}"
        );
        assert!(check_scheme("coordinator", "http://a:1", true).is_err());
        assert!(check_scheme("coordinator", "https://a:1", false).is_err());
        assert!(check_scheme("coordinator", "https://a:1", true).is_ok());
    }
}
