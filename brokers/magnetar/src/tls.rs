//! TLS flags every role shares, and `magnetar tls`, which makes a CA and
//! certificates for tests and development so that the README's TLS
//! example needs no openssl.
//!
//! One certificate and key serve every TLS listener of a process, and are
//! what it presents as a client on the internal planes (mTLS). The CA
//! file is what client certificates are checked against, and what this
//! process trusts as the servers of the internal planes.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use magnetar_net::{GrpcClientTls, TlsFiles, TlsServer};

#[derive(Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// PEM certificate chain of this process's TLS listeners, also
    /// presented as its client certificate on TLS internal planes.
    #[arg(long, env = "MAGNETAR_TLS_CERT_FILE", requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key of that certificate.
    #[arg(long, env = "MAGNETAR_TLS_KEY_FILE", requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// PEM CA certificates: client certificates signed by them are taken
    /// (the CN is the role), and internal-plane servers must be signed by
    /// them.
    #[arg(long, env = "MAGNETAR_TLS_CA_FILE")]
    tls_ca_file: Option<PathBuf>,
    /// Refuse TLS clients without a certificate the CA signed.
    #[arg(
        long,
        env = "MAGNETAR_TLS_REQUIRE_CLIENT_CERT",
        requires = "tls_ca_file"
    )]
    tls_require_client_cert: bool,
    /// The metadata gRPC plane speaks TLS: `magnetar meta` (and
    /// standalone's embedded node) listens with it, everyone else
    /// connects with it.
    #[arg(long, env = "MAGNETAR_META_TLS")]
    meta_tls: bool,
    /// The bookie gRPC plane speaks TLS, likewise.
    #[arg(long, env = "MAGNETAR_BOOKIE_TLS")]
    bookie_tls: bool,
    /// Both internal planes speak TLS (`--meta-tls --bookie-tls`), and
    /// brokers advertise their HTTPS listener to each other (forwarded
    /// publishes, lookups).
    #[arg(long, env = "MAGNETAR_INTERNAL_TLS")]
    internal_tls: bool,
}

/// gRPC needs HTTP/2, which it negotiates by ALPN over TLS.
const H2: &[u8] = b"h2";
const HTTP1: &[u8] = b"http/1.1";

impl TlsArgs {
    fn files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert_file.clone()?,
            key: self.tls_key_file.clone()?,
            ca: self.tls_ca_file.clone(),
            require_client_cert: self.tls_require_client_cert,
        })
    }

    fn server(&self, alpn: &[&[u8]], what: &str) -> anyhow::Result<TlsServer> {
        let files = self
            .files()
            .with_context(|| format!("{what} needs --tls-cert-file and --tls-key-file"))?;
        Ok(TlsServer::new(files, alpn)?)
    }

    /// The TLS of a client protocol listener (Kafka, AMQP, MQTT).
    pub fn listener(&self, what: &str) -> anyhow::Result<TlsServer> {
        self.server(&[], what)
    }

    /// The TLS of the HTTPS listener: HTTP/2 for replication from other
    /// clusters (gRPC), HTTP/1.1 for everything else.
    pub fn https(&self) -> anyhow::Result<TlsServer> {
        self.server(&[H2, HTTP1], "--https-listen")
    }

    pub fn meta_on(&self) -> bool {
        self.meta_tls || self.internal_tls
    }

    pub fn bookie_on(&self) -> bool {
        self.bookie_tls || self.internal_tls
    }

    /// The TLS of a metadata node's gRPC listener, if the plane speaks it.
    pub fn meta_server(&self) -> anyhow::Result<Option<TlsServer>> {
        self.meta_on()
            .then(|| self.server(&[H2], "--meta-tls"))
            .transpose()
    }

    /// The TLS of a bookie's gRPC listener, if the plane speaks it.
    pub fn bookie_server(&self) -> anyhow::Result<Option<TlsServer>> {
        self.bookie_on()
            .then(|| self.server(&[H2], "--bookie-tls"))
            .transpose()
    }

    fn client(&self, what: &str) -> anyhow::Result<GrpcClientTls> {
        let ca = self
            .tls_ca_file
            .as_deref()
            .with_context(|| format!("{what} needs --tls-ca-file to check the servers"))?;
        let identity = self
            .tls_cert_file
            .as_deref()
            .zip(self.tls_key_file.as_deref());
        Ok(GrpcClientTls::load(ca, identity)?)
    }

    /// How this process connects to the metadata store.
    pub fn meta_client(&self) -> anyhow::Result<Option<GrpcClientTls>> {
        self.meta_on()
            .then(|| self.client("--meta-tls"))
            .transpose()
    }

    /// The TLS of a broker's calls to other brokers' HTTPS listeners:
    /// the CA, and the certificate presented; none without a CA.
    pub fn http_client(&self) -> anyhow::Result<Option<magnetar_net::tls::ClientConfig>> {
        let Some(ca) = self.tls_ca_file.as_deref() else {
            return Ok(None);
        };
        let identity = self
            .tls_cert_file
            .as_deref()
            .zip(self.tls_key_file.as_deref());
        Ok(Some(magnetar_net::tls::client_config(
            ca,
            identity,
            &[HTTP1.to_vec()],
        )?))
    }

    /// Brokers call each other over HTTPS.
    pub fn internal_on(&self) -> bool {
        self.internal_tls
    }

    /// How this process connects to bookies.
    pub fn bookie_client(&self) -> anyhow::Result<Option<GrpcClientTls>> {
        self.bookie_on()
            .then(|| self.client("--bookie-tls"))
            .transpose()
    }
}

#[derive(Args)]
pub struct TlsCommand {
    #[command(subcommand)]
    command: TlsSub,
}

#[derive(Subcommand)]
enum TlsSub {
    /// Make a certificate authority: CA.pem and CA.key in the directory.
    CreateCa {
        /// Where to write ca.pem and ca.key.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        #[arg(long, default_value = "Magnetar development CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Make a certificate signed by the CA: NAME.pem and NAME.key. Good
    /// for a server (its names: localhost, 127.0.0.1, ::1 and every
    /// --san) and for a client, whose role is the CN.
    CreateCert {
        /// The CA's certificate and key, as `create-ca` wrote them.
        #[arg(long, default_value = "ca.pem")]
        ca_cert: PathBuf,
        #[arg(long, default_value = "ca.key")]
        ca_key: PathBuf,
        /// Subject CN: the role of a client certificate.
        #[arg(long)]
        cn: String,
        /// More DNS names or IP addresses the certificate is valid for.
        #[arg(long, value_delimiter = ',')]
        san: Vec<String>,
        /// Where to write NAME.pem and NAME.key.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// File name stem (default: the CN).
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

pub fn run(cmd: TlsCommand) -> anyhow::Result<()> {
    match cmd.command {
        TlsSub::CreateCa { dir, name, days } => {
            let mut params = validity(rcgen::CertificateParams::new(Vec::<String>::new())?, days);
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
                rcgen::KeyUsagePurpose::DigitalSignature,
            ];
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let key = rcgen::KeyPair::generate()?;
            let cert = params.self_signed(&key)?;
            write(&dir, "ca", &cert.pem(), &key.serialize_pem())
        }
        TlsSub::CreateCert {
            ca_cert,
            ca_key,
            cn,
            san,
            dir,
            name,
            days,
        } => {
            let read = |p: &Path| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            let ca_key = rcgen::KeyPair::from_pem(&read(&ca_key)?)?;
            let issuer = rcgen::Issuer::from_ca_cert_pem(&read(&ca_cert)?, ca_key)
                .context("the CA certificate")?;
            let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
            names.extend(san.into_iter().map(|s| s.trim().to_string()));
            names.dedup();
            let mut params = validity(rcgen::CertificateParams::new(names)?, days);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn.clone());
            params.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let key = rcgen::KeyPair::generate()?;
            let cert = params.signed_by(&key, &issuer)?;
            write(
                &dir,
                name.as_deref().unwrap_or(&cn),
                &cert.pem(),
                &key.serialize_pem(),
            )
        }
    }
}

fn validity(mut params: rcgen::CertificateParams, days: u32) -> rcgen::CertificateParams {
    let now = rcgen::date_time_ymd(1970, 1, 1)
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
    // Backdated a little, for clocks slightly behind.
    params.not_before = now - std::time::Duration::from_secs(3600);
    params.not_after = now + std::time::Duration::from_secs(u64::from(days) * 86_400);
    params
}

fn write(dir: &Path, stem: &str, cert: &str, key: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}.key"));
    std::fs::write(&cert_path, cert).with_context(|| format!("writing {}", cert_path.display()))?;
    write_private(&key_path, key)?;
    println!("{}\n{}", cert_path.display(), key_path.display());
    Ok(())
}

/// Private keys are readable by their owner only.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
