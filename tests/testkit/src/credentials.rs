//! Credential material of the test world: the app registration's certificates (committed
//! fixtures, public, trusted by nothing real) and an emulated cluster OIDC issuer that signs
//! service account tokens, as AKS does for workload identity.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use ring::signature::{KeyPair, RSA_PKCS1_SHA256, RsaKeyPair};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use serde_json::json;

use crate::graph::assertion::{TOKEN_EXCHANGE_AUDIENCE, b64};

/// The sandbox app registration's certificate (registered on the emulator's default app).
pub const APP_CERT_PEM: &str = include_str!("../fixtures/app-cert.pem");
/// Its private key (PKCS#8).
pub const APP_KEY_PEM: &str = include_str!("../fixtures/app-key.pem");
/// A certificate no app registers, and its key.
pub const OTHER_CERT_PEM: &str = include_str!("../fixtures/other-cert.pem");
pub const OTHER_KEY_PEM: &str = include_str!("../fixtures/other-key.pem");
const ISSUER_KEY_PEM: &str = include_str!("../fixtures/oidc-issuer-key.pem");

/// The emulated cluster's OIDC issuer URL (an AKS issuer looks like
/// `https://<region>.oic.prod-aks.azure.com/<tenant>/<uuid>/`).
pub const SANDBOX_ISSUER: &str = "https://oidc.sandbox.mailpoll.test/cluster-1/";

/// The subject of the operator's service account as the chart installs it.
pub fn service_account_subject(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

/// The base64 body of a PEM text (what a log line would hold if the key leaked).
pub fn pem_body_line(pem: &str) -> &str {
    pem.lines()
        .find(|line| !line.starts_with("-----") && line.len() > 40)
        .unwrap_or_default()
}

/// Signs service account tokens the way the kubelet's projected volume gets them.
pub struct ServiceAccountIssuer {
    pub issuer: String,
    key: RsaKeyPair,
}

impl ServiceAccountIssuer {
    /// The sandbox issuer, with the committed signing key.
    pub fn sandbox() -> anyhow::Result<Self> {
        Self::new(SANDBOX_ISSUER)
    }

    pub fn new(issuer: &str) -> anyhow::Result<Self> {
        let der =
            PrivateKeyDer::from_pem_slice(ISSUER_KEY_PEM.as_bytes()).context("issuer key PEM")?;
        let key = RsaKeyPair::from_pkcs8(der.secret_der())
            .map_err(|error| anyhow::anyhow!("issuer key: {error}"))?;
        Ok(Self {
            issuer: issuer.to_owned(),
            key,
        })
    }

    /// The public key (PKCS#1) a relying party verifies tokens with.
    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }

    /// A token for `subject` with Entra's exchange audience, valid for `lifetime`.
    pub fn token(&self, subject: &str, lifetime: Duration) -> anyhow::Result<String> {
        self.token_for(subject, TOKEN_EXCHANGE_AUDIENCE, lifetime)
    }

    pub fn token_for(
        &self,
        subject: &str,
        audience: &str,
        lifetime: Duration,
    ) -> anyhow::Result<String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("clock")?
            .as_secs();
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": "sandbox"});
        let claims = json!({
            "iss": self.issuer,
            "sub": subject,
            "aud": [audience],
            "iat": now,
            "nbf": now,
            "exp": now + lifetime.as_secs(),
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| anyhow::anyhow!("signing a service account token"))?;
        Ok(format!("{input}.{}", b64(&signature)))
    }

    /// Writes a fresh token to `path` the way the kubelet does: a new file renamed over the
    /// old one, so a reader never sees half a token.
    pub fn write_token_file(
        &self,
        path: &Path,
        subject: &str,
        lifetime: Duration,
    ) -> anyhow::Result<String> {
        let token = self.token(subject, lifetime)?;
        let staging = path.with_extension("new");
        std::fs::write(&staging, &token).with_context(|| format!("{}", staging.display()))?;
        std::fs::rename(&staging, path).with_context(|| format!("{}", path.display()))?;
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The examples' certificate Secret holds the pair the emulator registers.
    #[test]
    fn the_examples_certificate_is_the_registered_one() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/11-certificate-secret.yaml"
        ))
        .expect("example");
        let secret: serde_json::Value = serde_saphyr::from_str(&text).expect("YAML");
        assert_eq!(secret["stringData"]["tls.crt"], APP_CERT_PEM);
        assert_eq!(secret["stringData"]["tls.key"], APP_KEY_PEM);
    }

    #[test]
    fn service_account_tokens_carry_the_exchange_audience() {
        let issuer = ServiceAccountIssuer::sandbox().expect("issuer");
        let token = issuer
            .token("system:serviceaccount:a:b", Duration::from_secs(60))
            .expect("token");
        let jwt = crate::graph::assertion::Jwt::parse(&token).expect("JWT");
        assert_eq!(jwt.claims["aud"][0], TOKEN_EXCHANGE_AUDIENCE);
        assert_eq!(jwt.claims["iss"], SANDBOX_ISSUER);
        assert!(pem_body_line(APP_KEY_PEM).len() > 40);
    }
}
