//! TLS for the server, with certificates that reload without dropping sessions.
//!
//! The server terminates TLS itself (rustls, with the ring provider: pure
//! cargo, no system library), in the task that accepts connections, so a slow
//! handshake costs only its own connection and is bounded by the handshake
//! timeout. Each new connection takes the configuration in force at that
//! moment. [`ServerTls::reload`] reads the files again and swaps it, so new
//! certificates apply to the next connection while every open session carries on.
//!
//! With a client CA, every connection must present a certificate that chains to
//! it (mutual TLS). Otherwise the handshake fails before any HTTP/2.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use parking_lot::RwLock;
use tokio_rustls::{
    rustls::{
        self,
        pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
        server::WebPkiClientVerifier,
        RootCertStore,
    },
    TlsAcceptor,
};

use crate::error::TlsError;

/// Where the server's certificate, key and (for mutual TLS) client CA are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// The private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates, PEM, that client certificates must chain to; `None`
    /// for no client certificates.
    pub client_ca: Option<PathBuf>,
}

/// The server's TLS: its files, and the configuration read from them.
/// Cheap to clone; clones share the configuration.
#[derive(Clone)]
pub struct ServerTls {
    files: TlsFiles,
    current: Arc<RwLock<Loaded>>,
}

/// The configurations in force, one per protocol a listener speaks: they
/// differ only in the ALPN they offer.
struct Loaded {
    grpc: Arc<rustls::ServerConfig>,
    #[cfg(feature = "web")]
    web: Arc<rustls::ServerConfig>,
}

/// Which protocol a TLS listener offers in ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Alpn {
    /// `h2`: gRPC is HTTP/2 only.
    Grpc,
    /// `http/1.1`: browsers open WebSockets with an HTTP/1.1 upgrade.
    #[cfg(feature = "web")]
    Web,
}

impl ServerTls {
    /// Reads the files; the error names the file and what is wrong.
    pub fn from_files(files: TlsFiles) -> Result<Self, TlsError> {
        let loaded = load(&files)?;
        Ok(Self {
            files,
            current: Arc::new(RwLock::new(loaded)),
        })
    }

    /// Reads the files again and, if they are valid, uses them for every
    /// connection from now on. Open connections keep their session. Invalid
    /// files leave the configuration in force unchanged.
    pub fn reload(&self) -> Result<(), TlsError> {
        *self.current.write() = load(&self.files)?;
        Ok(())
    }

    /// The files the configuration comes from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// An acceptor with the configuration in force now.
    pub(crate) fn acceptor(&self, alpn: Alpn) -> TlsAcceptor {
        let loaded = self.current.read();
        TlsAcceptor::from(match alpn {
            Alpn::Grpc => loaded.grpc.clone(),
            #[cfg(feature = "web")]
            Alpn::Web => loaded.web.clone(),
        })
    }
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &Self) -> bool {
        self.files == other.files
    }
}

impl Eq for ServerTls {}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

fn load(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::Pem {
        path: files.key.clone(),
        what: "a private key",
        source,
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rejected {
            what: "the protocol versions",
            source,
        })?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(path)? {
                roots.add(cert).map_err(|source| TlsError::Rejected {
                    what: "a client CA certificate",
                    source,
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|error| TlsError::ClientCa {
                    path: path.clone(),
                    problem: error.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Rejected {
            what: "the certificate and key (do they belong together?)",
            source,
        })?;
    #[cfg(feature = "web")]
    let web = {
        let mut web = config.clone();
        web.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(web)
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded {
        grpc: Arc::new(config),
        #[cfg(feature = "web")]
        web,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |source| TlsError::Pem {
        path: path.to_owned(),
        what: "certificates",
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}
