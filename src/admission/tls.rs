//! The admission listener's TLS: a certificate read from PEM files and read again when they
//! change (a Secret mounted by the kubelet, cert-manager renewing it), and a listener that
//! completes handshakes off the accept loop, so a client that never finishes its handshake
//! holds up no one else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// Longest a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the certificate files are looked at for a change.
const RELOAD_INTERVAL: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the HTTP server.
const ACCEPTED_BACKLOG: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("the private key in {path} is not usable: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Reads the certificate chain and private key from PEM files.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read_error = |path: &Path| {
        let path = path.to_owned();
        move |source| TlsError::Read { path, source }
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(read_error(cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_error(cert))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_owned(),
        });
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(read_error(key))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&private).map_err(|source| {
        TlsError::Key {
            path: key.to_owned(),
            source,
        }
    })?;
    Ok(CertifiedKey::new(chain, signing))
}

/// The serving certificate, replaced when its files change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadingCert {
    pub fn load(cert: PathBuf, key: PathBuf) -> Result<Arc<Self>, TlsError> {
        let current = load_certified_key(&cert, &key)?;
        Ok(Arc::new(Self {
            cert,
            key,
            current: RwLock::new(Arc::new(current)),
        }))
    }

    fn modified(&self) -> Option<(SystemTime, SystemTime)> {
        let time = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
        Some((time(&self.cert)?, time(&self.key)?))
    }

    /// Reads the files again; a pair that does not load (a half-written update) leaves the
    /// current certificate in place until the next look.
    fn reload(&self) {
        match load_certified_key(&self.cert, &self.key) {
            Ok(fresh) => {
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(fresh);
                tracing::info!(cert = %self.cert.display(), "admission certificate reloaded");
            }
            Err(error) => {
                tracing::warn!(%error, "admission certificate changed but does not load; keeping the previous one");
            }
        }
    }

    /// Looks at the files every few seconds until `stop`.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let mut seen = self.modified();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(RELOAD_INTERVAL) => {}
            }
            let now = self.modified();
            if now.is_some() && now != seen {
                self.reload();
                seen = now;
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }
}

/// A rustls server configuration (ring, TLS 1.2 and 1.3) serving `cert`.
pub fn server_config(cert: Arc<ReloadingCert>) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    // The router speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A TLS listener for `axum::serve`: connections come out handshaken.
pub struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Binds `addr` and accepts until `stop`.
    pub async fn bind(
        addr: SocketAddr,
        config: ServerConfig,
        stop: CancellationToken,
    ) -> Result<Self, TlsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| TlsError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| TlsError::Bind { addr, source })?;
        let (sender, accepted) = mpsc::channel(ACCEPTED_BACKLOG);
        let acceptor = TlsAcceptor::from(Arc::new(config));
        tokio::spawn(accept_loop(listener, acceptor, sender, stop));
        Ok(Self { accepted, local })
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    sender: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(%error, "admission listener cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let sender = sender.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = sender.send((tls, peer)).await;
                }
                Ok(Err(error)) => tracing::debug!(%peer, %error, "admission TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "admission TLS handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The accept loop stopped: no connection will come again.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = include_str!("../../tests/testkit/certs/tls.crt");
    const KEY: &str = include_str!("../../tests/testkit/certs/tls.key");

    /// A fresh directory with the test certificate and key, as `tls.crt` and `tls.key`.
    fn files(name: &str) -> (PathBuf, PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "mailpoll-admission-{name}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&cert, CERT).expect("certificate written");
        std::fs::write(&key, KEY).expect("key written");
        (dir, cert, key)
    }

    #[test]
    fn unusable_files_are_errors_naming_the_file() {
        let (dir, cert, key) = files("errors");
        let missing = dir.join("absent.crt");
        let error = load_certified_key(&missing, &key).expect_err("missing");
        assert!(error.to_string().contains("absent.crt"), "{error}");
        std::fs::write(&cert, "not PEM").expect("written");
        let error = load_certified_key(&cert, &key).expect_err("no certificate");
        assert_eq!(
            error.to_string(),
            format!("{} holds no PEM certificate", cert.display())
        );
        std::fs::write(&cert, CERT).expect("written");
        std::fs::write(&key, CERT).expect("written");
        let error = load_certified_key(&cert, &key).expect_err("no key");
        assert!(error.to_string().contains("tls.key"), "{error}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_changed_pair_that_does_not_load_keeps_the_previous_certificate() {
        let (dir, cert, key) = files("reload");
        let reloading = ReloadingCert::load(cert, key.clone()).expect("loads");
        let before = reloading
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        std::fs::write(&key, "half-written").expect("written");
        reloading.reload();
        let after = reloading
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        assert!(Arc::ptr_eq(&before, &after), "the previous one is kept");
        std::fs::write(&key, KEY).expect("written");
        reloading.reload();
        let renewed = reloading
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        assert!(
            !Arc::ptr_eq(&before, &renewed),
            "a loadable pair replaces it"
        );
        assert_eq!(renewed.cert, before.cert);
        let _ = std::fs::remove_dir_all(dir);
    }
}
