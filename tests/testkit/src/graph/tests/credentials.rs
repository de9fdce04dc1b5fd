//! The token endpoint's client assertions: certificate credentials (signature checked against
//! the registered certificate), federated service account tokens (issuer, subject, audience
//! and signature checked), and the wrong-certificate switch.

use std::time::Duration;

use ring::signature::{RSA_PKCS1_SHA256, RSA_PSS_SHA256, RsaEncoding, RsaKeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use super::*;
use crate::credentials::{
    APP_CERT_PEM, APP_KEY_PEM, OTHER_CERT_PEM, OTHER_KEY_PEM, ServiceAccountIssuer,
    service_account_subject,
};
use crate::graph::assertion::b64;

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

fn unix_now() -> u64 {
    chrono::Utc::now()
        .timestamp()
        .try_into()
        .expect("after 1970")
}

/// A certificate assertion written from Entra's documentation, signed here with ring.
fn certificate_assertion(
    cert_pem: &str,
    key_pem: &str,
    client_id: &str,
    audience: &str,
    algorithm: (&str, &'static dyn RsaEncoding),
) -> String {
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("certificate");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
    let key = RsaKeyPair::from_pkcs8(key.secret_der()).expect("RSA key");
    let header =
        json!({"alg": algorithm.0, "typ": "JWT", "x5t#S256": b64(&Sha256::digest(cert.as_ref()))});
    let now = unix_now();
    let claims = json!({"aud": audience, "iss": client_id, "sub": client_id, "jti": "j", "nbf": now, "exp": now + 300});
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        algorithm.1,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut signature,
    )
    .expect("signed");
    format!("{input}.{}", b64(&signature))
}

async fn assert_with(probe: &Probe, tenant: &str, client_id: &str, assertion: &str) -> Value {
    let response = probe
        .http
        .post(format!(
            "{}/{tenant}/oauth2/v2.0/token",
            probe.emulator.base_url()
        ))
        .form(&[
            ("client_id", client_id),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion),
            ("scope", "https://graph.microsoft.com/.default"),
            ("grant_type", "client_credentials"),
        ])
        .send()
        .await
        .expect("token request");
    response.json().await.expect("JSON")
}

fn endpoint(probe: &Probe) -> String {
    format!(
        "{}/{DEFAULT_TENANT}/oauth2/v2.0/token",
        probe.emulator.base_url()
    )
}

#[tokio::test]
async fn certificate_assertions_are_checked_against_the_registered_certificate() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let audience = endpoint(&probe);
    for algorithm in [
        ("PS256", &RSA_PSS_SHA256 as &'static dyn RsaEncoding),
        ("RS256", &RSA_PKCS1_SHA256),
    ] {
        let good = certificate_assertion(
            APP_CERT_PEM,
            APP_KEY_PEM,
            DEFAULT_CLIENT_ID,
            &audience,
            algorithm,
        );
        let body = assert_with(&probe, DEFAULT_TENANT, DEFAULT_CLIENT_ID, &good).await;
        assert!(body["access_token"].is_string(), "{algorithm:?}: {body}");
    }
    // Signed by another key under the registered certificate's thumbprint: refused.
    let forged = certificate_assertion(
        APP_CERT_PEM,
        OTHER_KEY_PEM,
        DEFAULT_CLIENT_ID,
        &audience,
        ("PS256", &RSA_PSS_SHA256),
    );
    let body = assert_with(&probe, DEFAULT_TENANT, DEFAULT_CLIENT_ID, &forged).await;
    assert_eq!(body["error_codes"], json!([700027]), "{body}");
    // A certificate the app does not know.
    let unknown = certificate_assertion(
        OTHER_CERT_PEM,
        OTHER_KEY_PEM,
        DEFAULT_CLIENT_ID,
        &audience,
        ("PS256", &RSA_PSS_SHA256),
    );
    let body = assert_with(&probe, DEFAULT_TENANT, DEFAULT_CLIENT_ID, &unknown).await;
    assert_eq!(body["error"], "invalid_client");
    assert_eq!(body["error_codes"], json!([700027]), "{body}");
    // Another audience.
    let elsewhere = certificate_assertion(
        APP_CERT_PEM,
        APP_KEY_PEM,
        DEFAULT_CLIENT_ID,
        "https://login.example/other/oauth2/v2.0/token",
        ("PS256", &RSA_PSS_SHA256),
    );
    let body = assert_with(&probe, DEFAULT_TENANT, DEFAULT_CLIENT_ID, &elsewhere).await;
    assert_eq!(body["error_codes"], json!([50013]), "{body}");
    let counters = probe.emulator.counters();
    let by_certificate: u64 = counters
        .tokens_by_credential
        .iter()
        .filter(|(label, _)| label.starts_with("certificate:"))
        .map(|(_, count)| count)
        .sum();
    assert_eq!(by_certificate, 2);
}

#[tokio::test]
async fn the_wrong_certificate_switch_refuses_every_certificate_assertion() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let good = certificate_assertion(
        APP_CERT_PEM,
        APP_KEY_PEM,
        DEFAULT_CLIENT_ID,
        &endpoint(&probe),
        ("PS256", &RSA_PSS_SHA256),
    );
    probe
        .emulator
        .update_faults(|faults| faults.token_endpoint.wrong_certificate = true);
    let body = assert_with(&probe, DEFAULT_TENANT, DEFAULT_CLIENT_ID, &good).await;
    assert_eq!(body["error_codes"], json!([700027]), "{body}");
    // Secrets are not affected.
    let response = token_for(&probe.http, &probe.emulator.base_url(), &default_app()).await;
    assert_eq!(response.status(), StatusCode::OK);
    probe
        .emulator
        .update_faults(|faults| faults.token_endpoint.wrong_certificate = false);
    let body = assert_with(&probe, DEFAULT_TENANT, DEFAULT_CLIENT_ID, &good).await;
    assert!(body["access_token"].is_string(), "{body}");
}

#[tokio::test]
async fn federated_tokens_need_a_matching_credential_and_a_trusted_issuer() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let issuer = ServiceAccountIssuer::sandbox().expect("issuer");
    let subject = service_account_subject("mailpoll-system", "mailpoll");
    probe.emulator.add_app(AppRegistration {
        federated_credentials: vec![FederatedCredential {
            issuer: issuer.issuer.clone(),
            subject: subject.clone(),
            audience: TOKEN_EXCHANGE_AUDIENCE.into(),
        }],
        ..default_app()
    });
    let minute = Duration::from_secs(60);
    let token = issuer.token(&subject, minute).expect("token");
    // The issuer is not trusted yet (its keys are unknown): the signature cannot be checked.
    let body = assert_with(&probe, DEFAULT_TENANT, DEFAULT_CLIENT_ID, &token).await;
    assert_eq!(body["error_codes"], json!([700027]), "{body}");
    probe
        .emulator
        .add_issuer(&issuer.issuer, issuer.public_key());
    let body = assert_with(&probe, DEFAULT_TENANT, DEFAULT_CLIENT_ID, &token).await;
    assert!(body["access_token"].is_string(), "{body}");
    assert_eq!(
        probe.emulator.counters().tokens_by_credential[&format!("federated:{subject}")],
        1
    );
    let cases = [
        (
            issuer
                .token(&service_account_subject("default", "default"), minute)
                .expect("token"),
            70021,
        ),
        (
            issuer
                .token_for(&subject, "api://SomethingElse", minute)
                .expect("token"),
            700212,
        ),
        (
            ServiceAccountIssuer::new("https://oidc.elsewhere.test/")
                .expect("issuer")
                .token(&subject, minute)
                .expect("token"),
            700211,
        ),
    ];
    for (token, code) in cases {
        let body = assert_with(&probe, DEFAULT_TENANT, DEFAULT_CLIENT_ID, &token).await;
        assert_eq!(body["error_codes"], json!([code]), "{body}");
    }
    // Tampered: the signature no longer matches.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    parts[1] = b64(json!({"iss": issuer.issuer, "sub": subject, "aud": TOKEN_EXCHANGE_AUDIENCE, "nbf": unix_now(), "exp": unix_now() + 60}).to_string().as_bytes());
    let body = assert_with(&probe, DEFAULT_TENANT, DEFAULT_CLIENT_ID, &parts.join(".")).await;
    assert_eq!(body["error_codes"], json!([700027]), "{body}");
    let body = assert_with(&probe, DEFAULT_TENANT, DEFAULT_CLIENT_ID, "not.a.jwt").await;
    assert_eq!(body["error_codes"], json!([50027]), "{body}");
}
