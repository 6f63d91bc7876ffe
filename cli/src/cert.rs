//! `tandem cert`: a small CA for trying mutual TLS, and certificates for
//! Tandem's processes with the identity each needs (a SPIFFE id naming the
//! service, plus DNS names and addresses it serves on). For production,
//! cert-manager or your PKI issues the same shape of certificate.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// `tandem cert` subcommands.
#[derive(clap::Subcommand)]
pub enum CertCommand {
    /// Creates a CA: DIR/ca.crt (give it to every process as its CA
    /// bundle) and DIR/ca.key (keep it; `issue` signs with it).
    Ca {
        /// Folder to write into (created if missing).
        #[arg(long, value_name = "DIR", default_value = "tandem-certs")]
        dir: PathBuf,
    },
    /// Issues DIR/NAME.crt and DIR/NAME.key, signed by DIR/ca.key, for the
    /// service NAME (a sidecar's --service, or the coordinator's name), usable
    /// as server and client certificate.
    Issue {
        /// The service name the certificate stands for.
        name: String,
        /// Folder holding ca.crt and ca.key, and where the files go.
        #[arg(long, value_name = "DIR", default_value = "tandem-certs")]
        dir: PathBuf,
        /// Trust domain of the SPIFFE id (spiffe://DOMAIN/ns/NS/sa/NAME).
        #[arg(long, value_name = "DOMAIN", default_value = "tandem.local")]
        trust_domain: String,
        /// Namespace of the SPIFFE id.
        #[arg(long, value_name = "NS", default_value = "default")]
        namespace: String,
        /// A DNS name it serves as (repeatable), e.g. the coordinator's
        /// Service name.
        #[arg(long, value_name = "NAME")]
        dns: Vec<String>,
        /// An IP address it serves on (repeatable), e.g. 127.0.0.1.
        #[arg(long, value_name = "IP")]
        ip: Vec<IpAddr>,
        /// Days it is valid from now.
        #[arg(long, value_name = "N", default_value_t = 365)]
        days: u32,
    },
}

/// The CA's name: `issue` rebuilds the issuer from it and the key.
const CA_NAME: &str = "Tandem CA";

fn ca_params() -> anyhow::Result<rcgen::CertificateParams> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, CA_NAME);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    Ok(params)
}

/// Writes `text` to a new file `path` (never over an existing one), only
/// readable by its owner when `secret`.
fn create(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("cannot create {} (it is not overwritten)", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Midnight (UTC) of the day `days` from today (negative: before), as
/// rcgen takes it.
fn day(days: i64, set: impl FnOnce(i32, u8, u8)) {
    use chrono::Datelike;
    let today = chrono::Utc::now().date_naive();
    let n = chrono::Days::new(days.unsigned_abs());
    let d = if days < 0 { today - n } else { today + n };
    set(d.year(), d.month() as u8, d.day() as u8);
}

/// Runs a `tandem cert` command, saying on `out` what it wrote.
pub fn cert(cmd: CertCommand, out: &mut impl Write) -> anyhow::Result<()> {
    match cmd {
        CertCommand::Ca { dir } => {
            std::fs::create_dir_all(&dir)?;
            let key = rcgen::KeyPair::generate()?;
            let mut params = ca_params()?;
            day(-1, |y, m, d| {
                params.not_before = rcgen::date_time_ymd(y, m, d)
            });
            day(10 * 365, |y, m, d| {
                params.not_after = rcgen::date_time_ymd(y, m, d)
            });
            let cert = params.self_signed(&key)?;
            let (crt, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
            create(&key_path, &key.serialize_pem(), true)?;
            create(&crt, &cert.pem(), false)?;
            writeln!(out, "wrote {} and {}", crt.display(), key_path.display())?;
        }
        CertCommand::Issue {
            name,
            dir,
            trust_domain,
            namespace,
            dns,
            ip,
            days,
        } => {
            tandem_runtime::check_id("NAME", &name)?;
            if name.contains('/') || name.contains('.') {
                anyhow::bail!("NAME {name:?}: a service name has no '/' or '.'");
            }
            let ca_key_path = dir.join("ca.key");
            let ca_key = std::fs::read_to_string(&ca_key_path).with_context(|| {
                format!(
                    "cannot read {} (run `tandem cert ca` first)",
                    ca_key_path.display()
                )
            })?;
            let ca_key = rcgen::KeyPair::from_pem(&ca_key)
                .with_context(|| format!("{} is not a PEM private key", ca_key_path.display()))?;
            let issuer = rcgen::Issuer::new(ca_params()?, ca_key);
            let id = format!("spiffe://{trust_domain}/ns/{namespace}/sa/{name}");
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name.as_str());
            params.subject_alt_names = vec![rcgen::SanType::URI(id.clone().try_into()?)];
            for d in &dns {
                params
                    .subject_alt_names
                    .push(rcgen::SanType::DnsName(d.clone().try_into()?));
            }
            for a in &ip {
                params.subject_alt_names.push(rcgen::SanType::IpAddress(*a));
            }
            params.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            // (From yesterday: clocks that lag a little still accept it.)
            day(-1, |y, m, d| {
                params.not_before = rcgen::date_time_ymd(y, m, d)
            });
            day(i64::from(days), |y, m, d| {
                params.not_after = rcgen::date_time_ymd(y, m, d)
            });
            let key = rcgen::KeyPair::generate()?;
            let cert = params.signed_by(&key, &issuer)?;
            let (crt, key_path) = (
                dir.join(format!("{name}.crt")),
                dir.join(format!("{name}.key")),
            );
            create(&key_path, &key.serialize_pem(), true)?;
            create(&crt, &cert.pem(), false)?;
            writeln!(
                out,
                "wrote {} ({id}) and {}",
                crt.display(),
                key_path.display()
            )?;
        }
    }
    Ok(())
}
