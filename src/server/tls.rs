//! TLS for client connections (rustls, `ring` provider), set up like the
//! stock ZEO server's `<ssl>` section: `tls-certificate` and `tls-key` are
//! the server's certificate chain and private key (`certificate`, `key`);
//! `tls-client-ca`, when set, is the file of CA certificates that a client's
//! certificate must be signed by (`authenticate`): a client that presents
//! none, or one from another CA, fails the handshake.
//!
//! Once configured, TLS applies to every listener, unix-domain sockets
//! included, as the stock server hands its SSL context to each listener
//! (`ZEO.asyncio.server.Acceptor`). The handshake runs in the connection's
//! own task (`server::connection::serve`), within `frame-timeout`, and before the server
//! sends its protocol frame (`Z5`): a client that is slow or silent in the
//! handshake ties up only its own connection.
//!
//! The files are read once, at startup ([`load`]); an error names the
//! setting, the file and what is wrong. Renewing a certificate takes a
//! restart, as with the stock server.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::Config;

/// How long after a failed handshake from an address (a refused or missing
/// client certificate, plain text instead of TLS) the next handshake from
/// that address waits before it starts. The stock client reconnects at once
/// when a connection it saw established is closed, and with TLS 1.3 it sees
/// its handshake complete before the server has checked its certificate:
/// a client with a refused certificate would otherwise come back hundreds
/// of times a second, each time a handshake's CPU and a log line.
pub const TLS_RETRY_DELAY: Duration = Duration::from_secs(1);

/// At most this many failing addresses are remembered; when full, those
/// older than [`TLS_RETRY_DELAY`] are dropped (and if it is still full, a new
/// one gets no delay: the map never grows past this).
const MAX_REMEMBERED_FAILURES: usize = 4096;

/// Why a handshake did not complete.
#[derive(Debug)]
pub enum HandshakeFailure {
    /// A TLS error (refused certificate, plain text instead of TLS, ...):
    /// worth a warning.
    Refused(String),
    /// Not completed within the timeout (`frame-timeout`): worth a
    /// warning.
    TimedOut(Duration),
    /// The peer closed or reset the connection (a port probe, a client
    /// giving up), as a plain connection closed before its handshake.
    Closed(String),
}

/// The server's TLS setup, shared by every connection's handshake.
pub struct Tls {
    acceptor: TlsAcceptor,
    /// When each address last failed a handshake with a TLS error.
    failures: Mutex<HashMap<IpAddr, Instant>>,
}

impl Tls {
    /// The server side of a TLS handshake, within `timeout`
    /// (`frame-timeout`), after the retry delay if `peer` failed one just
    /// before (unix-domain peers have no address: no delay). A plain ZEO client sends nothing until the
    /// server's protocol frame arrives, so against TLS it waits out the
    /// timeout; one that sends plain bytes fails at once.
    pub async fn handshake<IO>(
        &self,
        stream: IO,
        peer: Option<IpAddr>,
        timeout: Duration,
    ) -> Result<TlsStream<IO>, HandshakeFailure>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        if let Some(wait) = peer.and_then(|ip| self.retry_delay(ip)) {
            tokio::time::sleep(wait).await;
        }
        match tokio::time::timeout(timeout, self.acceptor.accept(stream)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => {
                // rustls's errors come wrapped in the io::Error; the rest
                // are the socket's (EOF, reset).
                if !e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
                    return Err(HandshakeFailure::Closed(e.to_string()));
                }
                if let Some(ip) = peer {
                    self.failed(ip);
                }
                Err(HandshakeFailure::Refused(e.to_string()))
            }
            Err(_) => Err(HandshakeFailure::TimedOut(timeout)),
        }
    }

    fn retry_delay(&self, ip: IpAddr) -> Option<Duration> {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let since = failures.get(&ip)?.elapsed();
        TLS_RETRY_DELAY.checked_sub(since)
    }

    fn failed(&self, ip: IpAddr) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= MAX_REMEMBERED_FAILURES {
            failures.retain(|_, t| t.elapsed() < TLS_RETRY_DELAY);
        }
        if failures.len() < MAX_REMEMBERED_FAILURES {
            failures.insert(ip, Instant::now());
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file named by a setting cannot be read or used.
    #[error("{setting} {}: {reason}", path.display())]
    File {
        setting: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// The files are each fine but do not work together.
    #[error("TLS: {0}")]
    Setup(String),
}

/// The TLS that `cfg` sets up, as the logs name it after a listener's
/// address: `TLS`, `TLS, client certificate required`, or `None` without
/// TLS.
pub fn describe(cfg: &Config) -> Option<&'static str> {
    match (&cfg.tls_certificate, &cfg.tls_client_ca) {
        (None, _) => None,
        (Some(_), None) => Some("TLS"),
        (Some(_), Some(_)) => Some("TLS, client certificate required"),
    }
}

/// Reads and checks the TLS files of `cfg` and builds what every
/// connection's handshake uses; `Ok(None)` when TLS is not configured.
/// Settings are assumed to have passed [`Config::validate`] (certificate
/// and key together).
pub fn load(cfg: &Config) -> Result<Option<Tls>, TlsError> {
    let (Some(cert_path), Some(key_path)) = (&cfg.tls_certificate, &cfg.tls_key) else {
        return Ok(None);
    };
    let chain = certificates("tls-certificate", cert_path)?;
    let key = private_key(key_path)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    let builder = match &cfg.tls_client_ca {
        None => builder.with_no_client_auth(),
        Some(ca_path) => {
            let mut roots = RootCertStore::empty();
            for (i, ca) in certificates("tls-client-ca", ca_path)?
                .into_iter()
                .enumerate()
            {
                roots.add(ca).map_err(|e| TlsError::File {
                    setting: "tls-client-ca",
                    path: ca_path.clone(),
                    reason: format!("certificate {} cannot be a CA: {e}", i + 1),
                })?;
            }
            // Required, not optional: a client without a certificate is
            // refused, as by the stock server (verify_mode CERT_REQUIRED).
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::File {
                    setting: "tls-client-ca",
                    path: ca_path.clone(),
                    reason: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::Setup(format!(
            "tls-key {} does not belong to the certificate in tls-certificate {} ({e})",
            key_path.display(),
            cert_path.display()
        )),
        e => TlsError::File {
            setting: "tls-key",
            path: key_path.clone(),
            reason: e.to_string(),
        },
    })?;
    Ok(Some(Tls {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        failures: Mutex::new(HashMap::new()),
    }))
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        setting,
        path: path.to_path_buf(),
        reason: match e.kind() {
            std::io::ErrorKind::PermissionDenied => permission_denied(setting, path),
            _ => format!("cannot read: {e}"),
        },
    })
}

/// Why a TLS file cannot be read, when it is its permissions: who the
/// server runs as, and how systemd hands such a file to a service user
/// (`LoadCredential=`, the unit's TLS recipe).
fn permission_denied(setting: &str, path: &Path) -> String {
    let who = match super::listener::credentials() {
        Some((uid, gid, _)) => format!("zeotemp runs as uid {uid} (gid {gid}), which"),
        None => "zeotemp's user".into(),
    };
    let name = path
        .file_name()
        .map_or("FILE".into(), |n| n.to_string_lossy().into_owned());
    format!(
        "permission denied: {who} may not read it (under systemd, hand it over with \
         LoadCredential={name}:{} and --{setting} %d/{name}; see config/zeotemp.service)",
        path.display()
    )
}

/// Every `CERTIFICATE` section of a PEM file, in order (a chain: the
/// server's certificate first, then its intermediates; or a set of CAs).
fn certificates(
    setting: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::File {
        setting,
        path: path.to_path_buf(),
        reason,
    };
    let text = read(setting, path)?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a valid PEM file: {e}")))?;
    if certs.is_empty() {
        return Err(bad(
            "no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    Ok(certs)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC).
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bad = |reason: String| TlsError::File {
        setting: "tls-key",
        path: path.to_path_buf(),
        reason,
    };
    let text = read("tls-key", path)?;
    match PrivateKeyDer::from_pem_slice(&text) {
        Ok(key) => Ok(key),
        // The stock server's `password-function` has no equivalent here.
        Err(pem::Error::NoItemsFound) if text.windows(9).any(|w| w == b"ENCRYPTED") => Err(bad(
            "the key is encrypted; zeotemp reads unencrypted keys only (decrypt it with \
             `openssl pkey -in KEY -out PLAIN`, readable only by zeotemp's user)"
                .into(),
        )),
        Err(pem::Error::NoItemsFound) => Err(bad(
            "no private key in it (expected PEM: -----BEGIN PRIVATE KEY-----, \
             RSA PRIVATE KEY or EC PRIVATE KEY)"
                .into(),
        )),
        Err(e) => Err(bad(format!("not a valid PEM file: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(cert: &str, key: &str, ca: Option<&str>) -> Config {
        Config {
            tls_certificate: Some(cert.into()),
            tls_key: Some(key.into()),
            tls_client_ca: ca.map(PathBuf::from),
            ..Config::default()
        }
    }

    fn err(c: &Config) -> String {
        match load(c) {
            Ok(_) => panic!("accepted {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn no_tls_without_certificate() {
        assert!(load(&Config::default()).unwrap().is_none());
        assert_eq!(describe(&Config::default()), None);
    }

    #[test]
    fn errors_name_the_setting_the_file_and_the_reason() {
        let dir = std::env::temp_dir().join(format!("zeotemp-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello\n").unwrap();
        let encrypted = dir.join("enc.pem");
        std::fs::write(
            &encrypted,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap();
        let missing = dir.join("missing.pem");
        let (not_pem, encrypted, missing) = (
            not_pem.to_str().unwrap(),
            encrypted.to_str().unwrap(),
            missing.to_str().unwrap(),
        );

        let e = err(&cfg(missing, missing, None));
        assert!(
            e.starts_with(&format!("tls-certificate {missing}: cannot read")),
            "{e}"
        );
        let e = err(&cfg(not_pem, not_pem, None));
        assert!(
            e.starts_with(&format!("tls-certificate {not_pem}: no certificate")),
            "{e}"
        );
        // A certificate file is read before the key; use one that parses.
        let cert = dir.join("cert.pem");
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let cert = cert.to_str().unwrap();
        let e = err(&cfg(cert, not_pem, None));
        assert!(
            e.starts_with(&format!("tls-key {not_pem}: no private key")),
            "{e}"
        );
        let e = err(&cfg(cert, encrypted, None));
        assert!(e.contains("encrypted"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
