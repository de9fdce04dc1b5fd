//! Client assertions as Entra checks them: a certificate credential's JWT (signed with a key
//! whose certificate is registered on the app, found by its `x5t#S256` thumbprint) and a
//! federated credential's token (signed by a trusted issuer, whose issuer, subject and
//! audience match a federated identity credential of the app). Written from Entra's
//! documentation with ring, independently of mailpoll's own signing code.

use base64::Engine as _;
use ring::signature::{RSA_PKCS1_2048_8192_SHA256, RSA_PSS_2048_8192_SHA256, UnparsedPublicKey};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::state::TokenError;

/// The audience a Kubernetes token must carry for Entra's token exchange.
pub const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";

/// A federated identity credential of an app registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FederatedCredential {
    /// The cluster's OIDC issuer URL.
    pub issuer: String,
    /// `system:serviceaccount:<namespace>:<name>`.
    pub subject: String,
    /// Usually [`TOKEN_EXCHANGE_AUDIENCE`].
    pub audience: String,
}

/// A registered certificate: its thumbprint and public key.
#[derive(Clone, Debug)]
pub struct RegisteredKey {
    /// Base64url SHA-256 of the certificate's DER.
    pub thumbprint: String,
    /// PKCS#1 `RSAPublicKey`.
    pub public_key: Vec<u8>,
}

impl RegisteredKey {
    /// From a PEM certificate, as uploaded to an app registration.
    pub fn from_certificate_pem(pem: &str) -> Result<Self, String> {
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|error| format!("not a PEM certificate: {error}"))?;
        let parsed = webpki::EndEntityCert::try_from(&der)
            .map_err(|error| format!("not an X.509 certificate: {error}"))?;
        let spki = parsed.subject_public_key_info();
        Ok(Self {
            thumbprint: b64(&Sha256::digest(der.as_ref())),
            public_key: rsa_public_key(spki.as_ref())?,
        })
    }
}

/// The RSA public key inside an SPKI: the content of its BIT STRING (after the unused-bits
/// byte), found by walking the DER: SEQUENCE { SEQUENCE algorithm, BIT STRING key }.
fn rsa_public_key(spki: &[u8]) -> Result<Vec<u8>, String> {
    let (_, inner) = der_element(spki).ok_or("SPKI is not DER")?;
    let (algorithm_len, _) = der_element(inner).ok_or("SPKI has no algorithm")?;
    let (_, bits) = der_element(&inner[algorithm_len..]).ok_or("SPKI has no key")?;
    bits.get(1..)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| "empty key".into())
}

/// One DER element: its total length and its content.
fn der_element(input: &[u8]) -> Option<(usize, &[u8])> {
    let first = *input.get(1)?;
    let (length, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let count = usize::from(first & 0x7f);
        let bytes = input.get(2..2 + count)?;
        let length = bytes
            .iter()
            .fold(0usize, |acc, byte| (acc << 8) | usize::from(*byte));
        (length, 2 + count)
    };
    let content = input.get(header..header + length)?;
    Some((header + length, content))
}

pub(crate) fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A JWT split and decoded, its signature not yet checked.
pub struct Jwt {
    pub header: Value,
    pub claims: Value,
    signing_input: String,
    signature: Vec<u8>,
}

impl Jwt {
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let malformed = || invalid(50027, "JWT token is invalid or malformed.");
        let mut parts = text.split('.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        let decode = |part: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| malformed())
        };
        let json = |part: &str| -> Result<Value, TokenError> {
            serde_json::from_slice(&decode(part)?).map_err(|_| malformed())
        };
        Ok(Self {
            header: json(header)?,
            claims: json(claims)?,
            signing_input: format!("{header}.{claims}"),
            signature: decode(signature)?,
        })
    }

    fn claim(&self, name: &str) -> &str {
        self.claims[name].as_str().unwrap_or_default()
    }

    /// Whether `public_key` (PKCS#1) made the signature, with the header's algorithm.
    fn verify(&self, public_key: &[u8]) -> bool {
        let algorithm: &dyn ring::signature::VerificationAlgorithm =
            match self.header["alg"].as_str() {
                Some("PS256") => &RSA_PSS_2048_8192_SHA256,
                Some("RS256") => &RSA_PKCS1_2048_8192_SHA256,
                _ => return false,
            };
        UnparsedPublicKey::new(algorithm, public_key)
            .verify(self.signing_input.as_bytes(), &self.signature)
            .is_ok()
    }

    /// `nbf <= now < exp`, with Entra's five minutes of clock skew.
    fn in_time(&self, now: u64) -> bool {
        let skew = 300;
        let exp = self.claims["exp"].as_u64().unwrap_or(0);
        let nbf = self.claims["nbf"].as_u64().unwrap_or(0);
        nbf <= now + skew && now < exp + skew
    }

    fn has_audience(&self, audience: &str) -> bool {
        match &self.claims["aud"] {
            Value::String(one) => one == audience,
            Value::Array(many) => many.iter().any(|a| a.as_str() == Some(audience)),
            _ => false,
        }
    }
}

fn invalid(code: u32, text: &str) -> TokenError {
    TokenError {
        error: "invalid_client",
        code,
        description: format!("AADSTS{code}: {text}"),
    }
}

/// Checks a certificate credential's assertion for `client_id` at `endpoint`; on success,
/// the thumbprint of the certificate that signed it.
pub fn check_certificate_assertion(
    jwt: &Jwt,
    client_id: &str,
    endpoint: &str,
    registered: &[RegisteredKey],
    now: u64,
) -> Result<String, TokenError> {
    let thumbprint = jwt.header["x5t#S256"].as_str().unwrap_or_default();
    let Some(key) = registered.iter().find(|key| key.thumbprint == thumbprint) else {
        return Err(invalid(
            700027,
            &format!(
                "The certificate with identifier used to sign the client assertion is not registered on application. [Reason - The key was not found., Thumbprint of key used by client: '{thumbprint}']"
            ),
        ));
    };
    if !jwt.verify(&key.public_key) {
        return Err(invalid(
            700027,
            "Client assertion failed signature validation.",
        ));
    }
    if jwt.claim("iss") != client_id || jwt.claim("sub") != client_id {
        return Err(invalid(
            700021,
            "Client assertion application identifier doesn't match 'client_id' parameter.",
        ));
    }
    if !jwt.has_audience(endpoint) {
        return Err(invalid(
            50013,
            "Assertion failed signature validation. [Reason - The audience is not the token endpoint.]",
        ));
    }
    if !jwt.in_time(now) {
        return Err(invalid(
            700024,
            "Client assertion is not within its valid time range.",
        ));
    }
    Ok(key.thumbprint.clone())
}

/// Checks a federated token against the app's federated credentials and the issuers'
/// keys; on success, the subject.
pub fn check_federated_token(
    jwt: &Jwt,
    credentials: &[FederatedCredential],
    issuer_key: impl Fn(&str) -> Option<Vec<u8>>,
    now: u64,
) -> Result<String, TokenError> {
    let issuer = jwt.claim("iss");
    let subject = jwt.claim("sub");
    let by_issuer: Vec<&FederatedCredential> =
        credentials.iter().filter(|c| c.issuer == issuer).collect();
    if by_issuer.is_empty() {
        return Err(invalid(
            700211,
            &format!(
                "No matching federated identity record found for presented assertion issuer '{issuer}'."
            ),
        ));
    }
    let Some(credential) = by_issuer.iter().find(|c| c.subject == subject) else {
        return Err(invalid(
            70021,
            &format!(
                "No matching federated identity record found for presented assertion. Assertion Issuer: '{issuer}'. Assertion Subject: '{subject}'."
            ),
        ));
    };
    if !jwt.has_audience(&credential.audience) {
        return Err(invalid(
            700212,
            "No matching federated identity record found for presented assertion audience.",
        ));
    }
    let verified = issuer_key(issuer).is_some_and(|key| jwt.verify(&key));
    if !verified {
        return Err(invalid(
            700027,
            "Client assertion failed signature validation. [Reason - The key was not found.]",
        ));
    }
    if !jwt.in_time(now) {
        return Err(invalid(
            700024,
            "Client assertion is not within its valid time range.",
        ));
    }
    Ok(subject.to_owned())
}
