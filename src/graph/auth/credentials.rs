//! How an app registration proves who it is to Entra: a client secret, a certificate (a signed
//! client assertion) or a federated Kubernetes service account token (workload identity).
//!
//! Secret material lives only in [`ClientSecret`] and [`Certificate`]; their `Debug` output is
//! redacted, and no error names more than the kind of defect.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use ring::signature::RsaKeyPair;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// A client secret. Debug and Display never show it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ClientSecret(String);

impl ClientSecret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }
    /// The secret itself, for the token request only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientSecret([redacted])")
    }
}

impl fmt::Display for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// An app registration's credentials: who (tenant and client ids) and the proof.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Credentials {
    pub tenant_id: String,
    pub client_id: String,
    pub proof: Proof,
}

impl Credentials {
    /// Client-secret credentials.
    pub fn client_secret(
        tenant_id: impl Into<String>,
        client_id: impl Into<String>,
        secret: impl Into<String>,
    ) -> Self {
        Self {
            tenant_id: tenant_id.into(),
            client_id: client_id.into(),
            proof: Proof::Secret(ClientSecret::new(secret)),
        }
    }

    /// The kind of proof, for logs and errors.
    pub fn kind(&self) -> &'static str {
        self.proof.kind()
    }
}

/// The proof sent with a token request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Proof {
    /// `client_secret`.
    Secret(ClientSecret),
    /// A client assertion signed with the certificate's private key.
    Certificate(Arc<Certificate>),
    /// A client assertion read from this file at every token request: a projected service
    /// account token that the kubelet rotates (Azure workload identity).
    FederatedTokenFile(PathBuf),
}

impl Proof {
    pub fn kind(&self) -> &'static str {
        match self {
            Proof::Secret(_) => "client secret",
            Proof::Certificate(_) => "certificate",
            Proof::FederatedTokenFile(_) => "workload identity",
        }
    }
}

/// Why a certificate and key pair cannot be used; names the defect, never the material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificateError {
    #[error("no PEM certificate (-----BEGIN CERTIFICATE-----) found")]
    NoCertificate,
    #[error("the certificate is not a valid X.509 certificate")]
    InvalidCertificate,
    #[error(
        "no unencrypted PEM private key (PRIVATE KEY or RSA PRIVATE KEY) found; an encrypted key must be decrypted first (openssl pkcs8 -topk8 -nocrypt)"
    )]
    NoPrivateKey,
    #[error(
        "the private key is not an RSA key; Entra ID accepts RSA certificates (2048 bits or more) for client assertions"
    )]
    NotRsa,
    #[error("the RSA private key is not usable: {0}")]
    InvalidKey(String),
    #[error(
        "the private key does not belong to the certificate (the first certificate of the PEM must be the one whose key is given)"
    )]
    KeyMismatch,
}

/// A certificate and its RSA private key, checked to belong together. Debug never shows the
/// key; equality and hashing go by a digest of both, so a rotated pair is a new credential.
pub struct Certificate {
    key: RsaKeyPair,
    /// Base64url SHA-256 digest of the certificate's DER: the assertion's `x5t#S256` header.
    thumbprint_s256: String,
    /// SHA-256 over the certificate and the key, to tell pairs apart without keeping the key
    /// bytes twice.
    fingerprint: [u8; 32],
}

impl Certificate {
    /// Reads a PEM certificate (the first one of a chain is the app's) and its PEM private key
    /// (PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`). Both may come from one text.
    pub fn from_pem(certificate: &[u8], private_key: &[u8]) -> Result<Self, CertificateError> {
        let cert = CertificateDer::pem_slice_iter(certificate)
            .next()
            .ok_or(CertificateError::NoCertificate)?
            .map_err(|_| CertificateError::NoCertificate)?;
        let key_der = PrivateKeyDer::from_pem_slice(private_key)
            .map_err(|_| CertificateError::NoPrivateKey)?;
        let key = rsa_key(&key_der)?;
        check_pair(&cert, &key)?;
        let digest = Sha256::digest(cert.as_ref());
        let mut fingerprint = Sha256::new();
        fingerprint.update(cert.as_ref());
        fingerprint.update(key_der.secret_der());
        Ok(Self {
            key,
            thumbprint_s256: base64_url(&digest),
            fingerprint: fingerprint.finalize().into(),
        })
    }

    /// The `x5t#S256` value: base64url SHA-256 thumbprint of the certificate.
    pub fn thumbprint_s256(&self) -> &str {
        &self.thumbprint_s256
    }

    /// RSASSA-PSS with SHA-256 (`PS256`) over `message`.
    pub(crate) fn sign_ps256(&self, message: &[u8]) -> Result<Vec<u8>, CertificateError> {
        let rng = ring::rand::SystemRandom::new();
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &ring::signature::RSA_PSS_SHA256,
                &rng,
                message,
                &mut signature,
            )
            .map_err(|_| CertificateError::InvalidKey("signing failed".into()))?;
        Ok(signature)
    }
}

fn rsa_key(key: &PrivateKeyDer<'_>) -> Result<RsaKeyPair, CertificateError> {
    let parsed = match key {
        PrivateKeyDer::Pkcs1(der) => RsaKeyPair::from_der(der.secret_pkcs1_der()),
        PrivateKeyDer::Pkcs8(der) => RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()),
        PrivateKeyDer::Sec1(_) => return Err(CertificateError::NotRsa),
        _ => return Err(CertificateError::NoPrivateKey),
    };
    parsed.map_err(|rejected| match rejected.to_string().as_str() {
        // ring says "WrongAlgorithm" for a PKCS#8 key of another type (EC, Ed25519).
        "WrongAlgorithm" => CertificateError::NotRsa,
        reason => CertificateError::InvalidKey(reason.to_owned()),
    })
}

/// The key belongs to the certificate when the certificate's subject public key is the key's
/// public half. The SPKI's last bytes are its BIT STRING's content, which for RSA is the
/// PKCS#1 `RSAPublicKey` that ring gives for the key pair.
fn check_pair(cert: &CertificateDer<'_>, key: &RsaKeyPair) -> Result<(), CertificateError> {
    let parsed =
        webpki::EndEntityCert::try_from(cert).map_err(|_| CertificateError::InvalidCertificate)?;
    let spki = parsed.subject_public_key_info();
    let public = ring::signature::KeyPair::public_key(key).as_ref();
    if spki.as_ref().ends_with(public) {
        Ok(())
    } else {
        Err(CertificateError::KeyMismatch)
    }
}

pub(crate) fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("x5t#S256", &self.thumbprint_s256)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Certificate {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

impl Eq for Certificate {}

impl std::hash::Hash for Certificate {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.fingerprint.hash(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/testkit/fixtures");

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}/{name}")).expect("fixture exists")
    }

    #[test]
    fn pkcs8_and_pkcs1_keys_load_and_give_the_same_credential() {
        let cert = fixture("app-cert.pem");
        let pkcs8 = Certificate::from_pem(&cert, &fixture("app-key.pem")).expect("PKCS#8");
        let pkcs1 = Certificate::from_pem(&cert, &fixture("app-key-pkcs1.pem")).expect("PKCS#1");
        assert_eq!(pkcs8.thumbprint_s256(), pkcs1.thumbprint_s256());
        assert_eq!(pkcs8.thumbprint_s256().len(), 43, "base64url of 32 bytes");
        // One PEM text holding both, as some tools write it.
        let mut both = cert.clone();
        both.extend(fixture("app-key.pem"));
        assert!(Certificate::from_pem(&both, &both).is_ok());
    }

    #[test]
    fn defects_are_named_without_the_material() {
        let cert = fixture("app-cert.pem");
        let other_key = fixture("other-key.pem");
        assert_eq!(
            Certificate::from_pem(&cert, &other_key).err(),
            Some(CertificateError::KeyMismatch)
        );
        assert_eq!(
            Certificate::from_pem(&fixture("ec-cert.pem"), &fixture("ec-key.pem")).err(),
            Some(CertificateError::NotRsa)
        );
        assert_eq!(
            Certificate::from_pem(b"hello", &other_key).err(),
            Some(CertificateError::NoCertificate)
        );
        assert_eq!(
            Certificate::from_pem(&cert, b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n").err(),
            Some(CertificateError::NoPrivateKey)
        );
        let debug = format!(
            "{:?}",
            Certificate::from_pem(&cert, &fixture("app-key.pem")).expect("pair")
        );
        assert!(
            debug.contains("x5t#S256") && !debug.contains("BEGIN"),
            "{debug}"
        );
    }

    #[test]
    fn secrets_never_print() {
        let credentials = Credentials::client_secret("t", "c", "hunter2");
        assert!(!format!("{credentials:?}").contains("hunter2"));
        assert_eq!(credentials.kind(), "client secret");
        assert_eq!(ClientSecret::new("hunter2").to_string(), "[redacted]");
    }
}
