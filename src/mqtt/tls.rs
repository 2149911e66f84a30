//! TLS to the broker (`mqtts://`): the roots that may sign its certificate and, optionally,
//! our client certificate, loaded and checked when made.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rumqttc::tokio_rustls::rustls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::BrokerAddress;

/// TLS to the broker: the roots that may sign its certificate and, optionally, our client
/// certificate. Loaded and checked when made, so a bad file fails at start, not at connect.
/// rustls with the ring provider; the broker's name (or IP) must match its certificate.
#[derive(Clone)]
pub struct Tls {
    pub(super) config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls { .. }")
    }
}

/// A TLS file that could not be used; names the file, never its contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("no broker_ca given and no trusted roots found on this system")]
    NoRoots,
    #[error("TLS setup: {0}")]
    Setup(String),
}

impl Tls {
    /// The TLS settings for `broker`: `None` for `mqtt://`, else [`Tls::from_files`].
    /// `cert` and `key` are used only together.
    pub fn for_broker(
        broker: &BrokerAddress,
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Option<Tls>, TlsError> {
        if !broker.tls {
            return match ca.or(cert).or(key) {
                Some(path) => Err(TlsError::File {
                    path: path.to_path_buf(),
                    message: "TLS files need an mqtts:// broker".into(),
                }),
                None => Ok(None),
            };
        }
        Tls::from_files(ca, cert.zip(key)).map(Some)
    }

    /// Trusts the certificates in the PEM file `ca` (or the system's roots when `None`) and
    /// presents `client` (PEM certificate chain, PEM private key) when given.
    pub fn from_files(ca: Option<&Path>, client: Option<(&Path, &Path)>) -> Result<Tls, TlsError> {
        let file_error = |path: &Path, message: String| TlsError::File {
            path: path.to_path_buf(),
            message,
        };
        let mut roots = rustls::RootCertStore::empty();
        match ca {
            Some(path) => {
                for cert in read_certs(path)? {
                    roots.add(cert).map_err(|e| {
                        file_error(path, format!("not a usable CA certificate: {e}"))
                    })?;
                }
            }
            None => {
                let (added, _) =
                    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                if added == 0 {
                    return Err(TlsError::NoRoots);
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = read_certs(cert)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| file_error(key, format!("no usable PEM private key: {e}")))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| file_error(cert, format!("client certificate and key: {e}")))?
            }
        };
        Ok(Tls {
            config: Arc::new(config),
        })
    }
}

/// Every certificate in a PEM file; none is an error.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |message: String| TlsError::File {
        path: path.to_path_buf(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(format!("cannot read PEM: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_error("no CERTIFICATE in this PEM file".into()));
    }
    Ok(certs)
}
