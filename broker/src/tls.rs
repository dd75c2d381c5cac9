//! TLS for both listeners: `--tls-cert FILE --tls-key FILE` (PEM), rustls, TLS 1.2 and 1.3
//! only. HTTP becomes HTTPS (and `wss://`); the STOMP listener speaks STOMP over TLS
//! (RabbitMQ's `stomp+ssl`).
//!
//! In: the two files, at start and on SIGHUP. Out: a [`TlsAcceptor`] whose certificate is
//! the pair last loaded: a reload changes what new connections are offered and drops none.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{ServerConfig, version};

/// Why the certificate and key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// One of the two options without the other.
    #[error("--tls-cert and --tls-key go together: give both or neither")]
    HalfPair,
    /// A file that cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A certificate file with no certificate in PEM.
    #[error("{0}: no certificate in PEM")]
    NoCertificate(PathBuf),
    /// A key file with no private key in PEM.
    #[error("{0}: no private key in PEM (PKCS#8, PKCS#1 or SEC1)")]
    NoKey(PathBuf),
    /// A key of a kind rustls cannot sign with.
    #[error("{path}: unsupported private key: {reason}")]
    UnsupportedKey {
        /// The key file.
        path: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// A key that is not the certificate's.
    #[error("{key}: the private key does not match the certificate in {cert}")]
    Mismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Config(String),
}

/// The certificate offered to new connections, replaced on reload.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }
}

/// The listeners' TLS.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    current: Arc<Current>,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads the pair and checks that the key is the certificate's.
fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_pem = read(cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::NoCertificate(cert.to_owned()))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_owned()));
    }
    let key_pem = read(key)?;
    let private =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::NoKey(key.to_owned()))?;
    let signing =
        ring::sign::any_supported_type(&private).map_err(|e| TlsError::UnsupportedKey {
            path: key.to_owned(),
            reason: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|_| TlsError::Mismatch {
        key: key.to_owned(),
        cert: cert.to_owned(),
    })?;
    Ok(certified)
}

impl Tls {
    /// TLS from `--tls-cert` and `--tls-key`; `None` when neither is given.
    ///
    /// # Errors
    /// One without the other, a file that cannot be read, no certificate or key in it, or a
    /// key that is not the certificate's: each names the file.
    pub fn from_options(
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Option<Arc<Tls>>, TlsError> {
        let (cert, key) = match (cert, key) {
            (None, None) => return Ok(None),
            (Some(cert), Some(key)) => (cert, key),
            _ => return Err(TlsError::HalfPair),
        };
        let current = Arc::new(Current(RwLock::new(Arc::new(load(cert, key)?))));
        let config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_protocol_versions(&[&version::TLS13, &version::TLS12])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        Ok(Some(Arc::new(Tls {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })))
    }

    /// Accepts TLS connections.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Reads the pair again; new connections are offered it, open ones go on. A bad pair
    /// keeps the one in force.
    ///
    /// # Errors
    /// As [`Tls::from_options`].
    pub fn reload(&self) -> Result<(), TlsError> {
        let certified = load(&self.cert, &self.key)?;
        *self
            .current
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(certified);
        Ok(())
    }
}
