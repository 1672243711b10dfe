//! TLS for the listeners and the internal clients, with rustls and ring.
//!
//! One certificate and key serve every TLS listener of a process. With a
//! CA file, clients may present certificates signed by it, and the
//! subject CN of a verified one is the connection's role when it presents
//! no token (Pulsar's TLS authentication provider). The files are read
//! again when they change, so that renewing a certificate needs no
//! restart: connections already open keep theirs, new ones get the new.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// A client's TLS configuration, as [`client_config`] makes it (for
/// reqwest's `use_preconfigured_tls`, say).
pub use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::{info, warn};

/// What can go wrong setting TLS up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client certificate verification: {0}")]
    Verifier(String),
}

/// The files of one TLS identity, as the `--tls-*` flags name them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates: servers verify client certificates against
    /// them, clients verify servers (the system's roots are not used).
    pub ca: Option<PathBuf>,
    /// Servers refuse clients without a certificate the CA signed.
    pub require_client_cert: bool,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The certificates of a PEM file; none is an error.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "no CERTIFICATE in the file".into(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read(path)?).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        what: format!("no private key: {e}"),
    })
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            what: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

fn server_config(files: &TlsFiles, alpn: &[Vec<u8>]) -> Result<ServerConfig, TlsError> {
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match &files.ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider());
            let verifier = if files.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| TlsError::Verifier(e.to_string()))?,
            )
        }
    };
    let mut cfg = builder.with_single_cert(certs, key)?;
    cfg.alpn_protocols = alpn.to_vec();
    Ok(cfg)
}

/// A client's TLS settings: servers are verified against the CA file
/// (required: internal planes trust the cluster's CA, not the world's),
/// and the certificate and key, if given, are presented for mTLS.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    alpn: &[Vec<u8>],
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca)?);
    let mut cfg = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
    };
    cfg.alpn_protocols = alpn.to_vec();
    Ok(cfg)
}

/// How often the files are looked at for changes, at most.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// The TLS side of one listener: its current configuration, read again
/// from the files when they change.
#[derive(Clone)]
pub struct TlsServer(Arc<Inner>);

struct Inner {
    files: TlsFiles,
    alpn: Vec<Vec<u8>>,
    state: Mutex<State>,
}

struct State {
    config: Arc<ServerConfig>,
    stamps: Vec<Option<(SystemTime, u64)>>,
    checked: Instant,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("files", &self.0.files)
            .finish_non_exhaustive()
    }
}

impl TlsFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [Some(&self.cert), Some(&self.key), self.ca.as_ref()]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
    }

    fn stamps(&self) -> Vec<Option<(SystemTime, u64)>> {
        self.paths()
            .map(|p| {
                let m = std::fs::metadata(p).ok()?;
                Some((m.modified().ok()?, m.len()))
            })
            .collect()
    }
}

impl TlsServer {
    /// Reads the files now, so that a bad one stops the process at start;
    /// `alpn`: the protocols offered (`h2` for gRPC, `http/1.1` for HTTPS,
    /// none for the others).
    pub fn new(files: TlsFiles, alpn: &[&[u8]]) -> Result<Self, TlsError> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let stamps = files.stamps();
        let config = Arc::new(server_config(&files, &alpn)?);
        Ok(TlsServer(Arc::new(Inner {
            files,
            alpn,
            state: Mutex::new(State {
                config,
                stamps,
                checked: Instant::now(),
            }),
        })))
    }

    /// The configuration for the next handshake, read again if the files
    /// changed. A change that does not load (a key written before its
    /// certificate, say) keeps the old configuration and is tried again
    /// at the next change.
    pub fn config(&self) -> Arc<ServerConfig> {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.checked.elapsed() >= RELOAD_CHECK {
            st.checked = Instant::now();
            let stamps = self.0.files.stamps();
            if stamps != st.stamps {
                st.stamps = stamps;
                match server_config(&self.0.files, &self.0.alpn) {
                    Ok(cfg) => {
                        info!(cert = %self.0.files.cert.display(), "TLS certificates reloaded");
                        st.config = Arc::new(cfg);
                    }
                    Err(e) => warn!("TLS files changed but did not load, keeping the old: {e}"),
                }
            }
        }
        Arc::clone(&st.config)
    }

    /// The server side of the TLS handshake over `stream`.
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<Conn> {
        let tls = tokio_rustls::TlsAcceptor::from(self.config())
            .accept(stream)
            .await?;
        let role = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| certificate_cn(leaf));
        Ok(Conn {
            io: Io::Tls(Box::new(tls)),
            certificate_role: role.map(Arc::from),
        })
    }
}

/// The subject CN of a certificate, if it has one.
pub fn certificate_cn(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// An accepted connection, in clear or over TLS.
#[derive(Debug)]
pub struct Conn {
    io: Io,
    certificate_role: Option<Arc<str>>,
}

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(TlsIo),
}

impl Conn {
    pub fn plain(stream: TcpStream) -> Self {
        Conn {
            io: Io::Plain(stream),
            certificate_role: None,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.io, Io::Tls(_))
    }

    /// The CN of the client certificate the CA verified, if the client
    /// presented one: its role when it presents no token.
    pub fn certificate_role(&self) -> Option<&Arc<str>> {
        self.certificate_role.as_ref()
    }

    pub fn tcp(&self) -> &TcpStream {
        match &self.io {
            Io::Plain(s) => s,
            Io::Tls(t) => t.get_ref().0,
        }
    }

    /// Read and write halves for two tasks: a plain connection's are the
    /// socket's own, lock-free; a TLS session's share it behind tokio's
    /// split.
    pub fn into_split(self) -> (ConnRead, ConnWrite) {
        match self.io {
            Io::Plain(s) => {
                let (r, w) = s.into_split();
                (ConnRead::Plain(r), ConnWrite::Plain(w))
            }
            Io::Tls(t) => {
                let (r, w) = tokio::io::split(t);
                (ConnRead::Tls(r), ConnWrite::Tls(w))
            }
        }
    }
}

type TlsIo = Box<tokio_rustls::server::TlsStream<TcpStream>>;

/// The read half of a [`Conn`].
#[derive(Debug)]
pub enum ConnRead {
    Plain(tokio::net::tcp::OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsIo>),
}

/// The write half of a [`Conn`].
#[derive(Debug)]
pub enum ConnWrite {
    Plain(tokio::net::tcp::OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsIo>),
}

impl AsyncRead for ConnRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ConnRead::Plain(r) => Pin::new(r).poll_read(cx, buf),
            ConnRead::Tls(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ConnWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ConnWrite::Plain(w) => Pin::new(w).poll_write(cx, buf),
            ConnWrite::Tls(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ConnWrite::Plain(w) => Pin::new(w).poll_flush(cx),
            ConnWrite::Tls(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ConnWrite::Plain(w) => Pin::new(w).poll_shutdown(cx),
            ConnWrite::Tls(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(t) => t.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

/// TLS of a client of the internal gRPC planes: the cluster's CA, and
/// the certificate and key presented for mTLS, if any.
#[derive(Clone)]
pub struct GrpcClientTls {
    config: tonic::transport::ClientTlsConfig,
}

impl std::fmt::Debug for GrpcClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcClientTls").finish_non_exhaustive()
    }
}

impl GrpcClientTls {
    /// From the `--tls-*` files: the CA is required (it is what the
    /// servers are checked against); the certificate and key are
    /// presented when both are given.
    pub fn load(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Self, TlsError> {
        // Parsed here so that a bad file is reported at start, not at the
        // first call.
        let _ = client_config(ca, identity, &[])?;
        let pem = |p: &Path| read(p).map(tonic::transport::Certificate::from_pem);
        let mut config = tonic::transport::ClientTlsConfig::new().ca_certificate(pem(ca)?);
        if let Some((cert, key)) = identity {
            config = config.identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ));
        }
        Ok(GrpcClientTls { config })
    }
}

/// The endpoint of a gRPC server at `addr` (`host:port`, or a URL), over
/// TLS when `tls` is given.
pub fn grpc_endpoint(
    addr: &str,
    tls: Option<&GrpcClientTls>,
) -> Result<tonic::transport::Endpoint, String> {
    let hostport = addr
        .trim()
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let scheme = if tls.is_some() { "https" } else { "http" };
    let ep = tonic::transport::Endpoint::from_shared(format!("{scheme}://{hostport}"))
        .map_err(|e| format!("bad address {addr:?}: {e}"))?;
    match tls {
        None => Ok(ep),
        Some(t) => ep
            .tls_config(t.config.clone())
            .map_err(|e| format!("TLS for {addr:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Pki {
        dir: tempfile::TempDir,
        ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    }

    impl Pki {
        fn new() -> Pki {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "test CA");
            let key = rcgen::KeyPair::generate().expect("key");
            let ca = rcgen::CertifiedIssuer::self_signed(params, key).expect("CA");
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write");
            Pki { dir, ca }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        /// A certificate for `cn` signed by the CA, written as NAME.pem
        /// and NAME.key.
        fn issue(&self, name: &str, cn: &str) {
            let mut params =
                rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            let key = rcgen::KeyPair::generate().expect("key");
            let cert = params.signed_by(&key, &self.ca).expect("sign");
            std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).expect("write");
            std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).expect("write");
        }

        fn files(&self, require: bool) -> TlsFiles {
            TlsFiles {
                cert: self.path("server.pem"),
                key: self.path("server.key"),
                ca: Some(self.path("ca.pem")),
                require_client_cert: require,
            }
        }
    }

    /// A TLS server on an ephemeral port answering the role it saw.
    async fn serve(tls: TlsServer) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let tls = tls.clone();
                tokio::spawn(async move {
                    if let Ok(mut c) = tls.accept(s).await {
                        let role = c.certificate_role().map(|r| r.to_string());
                        let _ = c.write_all(role.unwrap_or_default().as_bytes()).await;
                        let _ = c.shutdown().await;
                    }
                });
            }
        });
        addr
    }

    async fn connect(
        addr: std::net::SocketAddr,
        cfg: ClientConfig,
    ) -> std::io::Result<(String, Vec<u8>)> {
        let s = TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut c = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, s)
            .await?;
        let mut out = Vec::new();
        c.read_to_end(&mut out).await?;
        let leaf = c
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default();
        Ok((String::from_utf8_lossy(&out).into_owned(), leaf))
    }

    #[tokio::test]
    async fn a_client_certificate_names_the_role_and_a_foreign_ca_is_refused() {
        let pki = Pki::new();
        pki.issue("server", "broker");
        pki.issue("client", "sensor-7");
        let addr = serve(TlsServer::new(pki.files(false), &[]).expect("tls")).await;
        let anon = client_config(&pki.path("ca.pem"), None, &[]).expect("client");
        assert_eq!(connect(addr, anon).await.expect("anonymous").0, "");
        let mtls = client_config(
            &pki.path("ca.pem"),
            Some((&pki.path("client.pem"), &pki.path("client.key"))),
            &[],
        )
        .expect("client");
        assert_eq!(connect(addr, mtls).await.expect("mTLS").0, "sensor-7");

        let other = Pki::new();
        other.issue("client", "intruder");
        let wrong_ca = client_config(&other.path("ca.pem"), None, &[]).expect("client");
        assert!(connect(addr, wrong_ca).await.is_err(), "server not trusted");
        let foreign_cert = client_config(
            &pki.path("ca.pem"),
            Some((&other.path("client.pem"), &other.path("client.key"))),
            &[],
        )
        .expect("client");
        assert!(
            connect(addr, foreign_cert).await.is_err(),
            "a certificate of another CA is refused"
        );
    }

    #[tokio::test]
    async fn a_required_client_certificate_is_required() {
        let pki = Pki::new();
        pki.issue("server", "broker");
        let addr = serve(TlsServer::new(pki.files(true), &[]).expect("tls")).await;
        let anon = client_config(&pki.path("ca.pem"), None, &[]).expect("client");
        assert!(connect(addr, anon).await.is_err());
    }

    #[tokio::test]
    async fn new_files_are_served_without_a_restart() {
        let pki = Pki::new();
        pki.issue("server", "first");
        let addr = serve(TlsServer::new(pki.files(false), &[]).expect("tls")).await;
        let cfg = || client_config(&pki.path("ca.pem"), None, &[]).expect("client");
        let first = connect(addr, cfg()).await.expect("first").1;
        pki.issue("server", "second");
        tokio::time::sleep(RELOAD_CHECK + Duration::from_millis(100)).await;
        let second = connect(addr, cfg()).await.expect("second").1;
        assert_ne!(first, second, "the new certificate is served");
        assert_eq!(
            certificate_cn(&CertificateDer::from(second)).as_deref(),
            Some("second")
        );
    }

    #[test]
    fn missing_or_empty_files_are_clear_errors() {
        let pki = Pki::new();
        let err = TlsServer::new(pki.files(false), &[]).expect_err("no server.pem");
        assert!(err.to_string().contains("server.pem"), "{err}");
        std::fs::write(pki.path("server.pem"), "not pem").expect("write");
        let err = TlsServer::new(pki.files(false), &[]).expect_err("empty");
        assert!(err.to_string().contains("no CERTIFICATE"), "{err}");
    }
}
