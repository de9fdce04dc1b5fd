//! The client assertion of the certificate credential: a JWT signed with the app's
//! certificate key, as Entra's certificate credentials document it: header `alg` `PS256`,
//! `typ` `JWT`, `x5t#S256` (the certificate's SHA-256 thumbprint); claims `aud` (the token
//! endpoint), `iss` = `sub` = client id, a fresh `jti`, `iat`/`nbf` now and a short `exp`.
//!
//! The signature is ring's; this module only lays out the JSON and the base64url parts.

use std::fmt;
use std::time::Duration;

use serde_json::json;

use super::credentials::{Certificate, CertificateError, base64_url};

/// How long an assertion is valid: it is sent once, right after it is made.
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(300);

/// A signed client assertion (or a federated token read from its file). Debug never shows it.
pub(crate) struct ClientAssertion(String);

impl ClientAssertion {
    pub(crate) fn new(text: String) -> Self {
        Self(text)
    }
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ClientAssertion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientAssertion([redacted])")
    }
}

/// What an assertion says, apart from the key.
pub(crate) struct Claims<'a> {
    pub client_id: &'a str,
    /// The token endpoint URL the assertion is for.
    pub audience: &'a str,
    /// Seconds since the Unix epoch.
    pub now: u64,
    /// A unique id, so Entra can refuse a replay.
    pub jti: String,
}

/// The unsigned `header.claims` part.
pub(crate) fn signing_input(certificate: &Certificate, claims: &Claims<'_>) -> String {
    let header = json!({
        "alg": "PS256",
        "typ": "JWT",
        "x5t#S256": certificate.thumbprint_s256(),
    });
    let body = json!({
        "aud": claims.audience,
        "iss": claims.client_id,
        "sub": claims.client_id,
        "jti": claims.jti,
        "iat": claims.now,
        "nbf": claims.now,
        "exp": claims.now + ASSERTION_LIFETIME.as_secs(),
    });
    format!(
        "{}.{}",
        base64_url(header.to_string().as_bytes()),
        base64_url(body.to_string().as_bytes())
    )
}

/// A signed assertion for `claims`.
pub(crate) fn sign(
    certificate: &Certificate,
    claims: &Claims<'_>,
) -> Result<ClientAssertion, CertificateError> {
    let input = signing_input(certificate, claims);
    let signature = certificate.sign_ps256(input.as_bytes())?;
    Ok(ClientAssertion(format!(
        "{input}.{}",
        base64_url(&signature)
    )))
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use ring::signature::{RSA_PSS_2048_8192_SHA256, UnparsedPublicKey};
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/testkit/fixtures");

    fn part(text: &str) -> serde_json::Value {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .expect("base64url");
        serde_json::from_slice(&bytes).expect("JSON")
    }

    #[test]
    fn an_assertion_carries_the_documented_header_and_claims_and_verifies() {
        let cert_pem = std::fs::read(format!("{FIXTURES}/app-cert.pem")).expect("fixture");
        let key_pem = std::fs::read(format!("{FIXTURES}/app-key.pem")).expect("fixture");
        let certificate = Certificate::from_pem(&cert_pem, &key_pem).expect("pair");
        let claims = Claims {
            client_id: "app-1",
            audience: "https://login.example/t/oauth2/v2.0/token",
            now: 1_700_000_000,
            jti: "j-1".into(),
        };
        let assertion = sign(&certificate, &claims).expect("signed");
        assert!(!format!("{assertion:?}").contains(assertion.expose()));
        let parts: Vec<&str> = assertion.expose().split('.').collect();
        assert_eq!(parts.len(), 3);
        let header = part(parts[0]);
        assert_eq!(header["alg"], "PS256");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["x5t#S256"], certificate.thumbprint_s256());
        let body = part(parts[1]);
        assert_eq!(body["aud"], claims.audience);
        assert_eq!(body["iss"], "app-1");
        assert_eq!(body["sub"], "app-1");
        assert_eq!(body["exp"].as_u64(), Some(1_700_000_300));
        assert_eq!(body["nbf"].as_u64(), Some(1_700_000_000));
        // Checked against the certificate's public key, as Entra does.
        let cert = CertificateDer::from_pem_slice(&cert_pem).expect("cert");
        let parsed = webpki::EndEntityCert::try_from(&cert).expect("x509");
        let spki = parsed.subject_public_key_info();
        let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[2])
            .expect("signature");
        let public = rsa_public_key(spki.as_ref());
        UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA256, public)
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
            .expect("the signature verifies with the certificate");
    }

    /// The PKCS#1 key at the end of an RSA SPKI (2048-bit keys: the last 270 bytes).
    fn rsa_public_key(spki: &[u8]) -> &[u8] {
        &spki[spki.len() - 270..]
    }
}
