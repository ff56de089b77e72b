//! TLS for the public listener (rustls, ALPN h2 and http/1.1), and mTLS: client
//! certificates verified against `--tls-client-ca` when presented, described for the
//! gateway as a [`nimbus_core::ClientCert`].

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

#[derive(Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// Serve the public listener over TLS with this certificate chain (PEM).
    #[arg(long, env = "NIMBUS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "NIMBUS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Verify client certificates against these CAs (PEM); `auth = "mtls"` routes
    /// then admit only callers with a valid one.
    #[arg(long, env = "NIMBUS_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

pub fn acceptor(args: &TlsArgs) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("read TLS certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parse TLS certificate {}", cert.display()))?;
    if chain.is_empty() {
        anyhow::bail!("{} holds no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("read TLS key {}", key.display()))?;
    let builder = rustls::ServerConfig::builder();
    let builder = match &args.tls_client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("read client CA {}", ca.display()))?
            {
                roots
                    .add(c.with_context(|| format!("parse client CA {}", ca.display()))?)
                    .with_context(|| format!("client CA {}", ca.display()))?;
            }
            // Optional at the TLS layer: open routes stay reachable without a
            // certificate; mtls routes refuse callers that presented none.
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .allow_unauthenticated()
                .build()
                .context("build client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .context("TLS certificate and key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}

/// Describes a verified client certificate (DER) for the gateway.
pub fn describe(der: &[u8]) -> Option<nimbus_core::ClientCert> {
    use x509_cert::der::{Decode, EncodePem};
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let tbs = &cert.tbs_certificate();
    let serial = tbs
        .serial_number()
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    let fingerprint = Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    Some(nimbus_core::ClientCert {
        subject_dn: tbs.subject().to_string(),
        issuer_dn: tbs.issuer().to_string(),
        serial_number: serial,
        fingerprint_sha256: fingerprint,
        pem: cert
            .to_pem(x509_cert::der::pem::LineEnding::LF)
            .unwrap_or_default(),
        validity: nimbus_core::CertValidity {
            not_before: tbs.validity().not_before.to_string(),
            not_after: tbs.validity().not_after.to_string(),
        },
    })
}
