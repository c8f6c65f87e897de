//! TLS to PostgreSQL, with rustls. Used when the DSN says `sslmode=require`
//! or `postgres.tls_ca_file` is set (tokio-postgres cannot tell an explicit
//! `sslmode=prefer` from the default, so `prefer` connects in the clear).
//!
//! - With `tls_ca_file`: the server's chain must lead to a certificate in that
//!   PEM file and name the DSN's host (libpq's `verify-full`).
//! - Without it: the connection is encrypted but the certificate is not
//!   checked, as libpq's `require` does; a warning says so at start.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use sluice_core::ConfigError;

use crate::PostgresError;

/// The connector for `tls_ca_file` (verifying) or none (encrypting only).
pub(crate) fn connector(ca_file: Option<&Path>) -> Result<MakeRustlsConnect, PostgresError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| PostgresError::Config(ConfigError::new("postgres.tls_ca_file", e.to_string())))?;
    let config = match ca_file {
        Some(path) => {
            let invalid = |message: String| PostgresError::Config(ConfigError::new("postgres.tls_ca_file", message));
            let mut roots = RootCertStore::empty();
            let certificates = CertificateDer::pem_file_iter(path)
                .map_err(|e| invalid(format!("{}: {e}", path.display())))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
            let (added, _) = roots.add_parsable_certificates(certificates);
            if added == 0 {
                return Err(invalid(format!("{}: no certificate in it", path.display())));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => {
            tracing::warn!(
                "PostgreSQL over TLS without checking the server's certificate (sslmode=require): set postgres.tls_ca_file to verify it"
            );
            let verifier = Arc::new(EncryptOnly(provider.signature_verification_algorithms));
            builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth()
        }
    };
    Ok(MakeRustlsConnect::new(config))
}

/// Accepts any server certificate but still checks that the server holds its
/// key (the handshake signatures): libpq's `sslmode=require`.
#[derive(Debug)]
struct EncryptOnly(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
