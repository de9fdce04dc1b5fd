//! Where a webhook goes and what it carries besides the payload: the URL (from the spec or a
//! Secret) and extra headers from a Secret. Both may hold credentials (a Logic Apps `sig=`, an
//! `Authorization` header), so neither ever appears in a `Debug`, a log or an error: errors
//! name the Secret and key, never the value.

use std::fmt;
use std::time::Duration;

use reqwest::Url;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::content::ContentOptions;
use super::signing::SigningSecret;

/// At most this many extra headers, of at most this many bytes together: a Secret that holds
/// more is a mistake (or an attempt to make every request huge).
const MAX_EXTRA_HEADERS: usize = 32;
const MAX_EXTRA_HEADER_BYTES: usize = 8 * 1024;

/// Headers mailpoll sets itself, or that belong to the connection: an extra header may not
/// replace them. Prefixes end in `-`.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "user-agent",
    "idempotency-key",
    "webhook-",
    "mailpoll-",
    "proxy-",
    "ce-",
];

/// Where and how to POST.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: WebhookUrl,
    pub timeout: Duration,
    pub signing_secret: Option<SigningSecret>,
    pub headers: ExtraHeaders,
    /// The body's format and the attachments in it.
    pub content: ContentOptions,
}

impl Endpoint {
    /// Time allowed for one request when the spec does not say.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// An unsigned endpoint with the default timeout and no extra headers.
    pub fn new(url: WebhookUrl) -> Self {
        Self {
            url,
            timeout: Self::DEFAULT_TIMEOUT,
            signing_secret: None,
            headers: ExtraHeaders::default(),
            content: ContentOptions::default(),
        }
    }
}

/// A checked webhook URL. `Debug` and `Display` show the scheme and host only: the path and
/// query of Logic Apps and Power Automate URLs carry their signature.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookUrl(Url);

/// Why a URL is not a webhook URL mailpoll may call. Never includes the URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidUrl {
    #[error("the value is not text")]
    NotText,
    #[error("not an absolute URL")]
    NotAUrl,
    #[error(
        "must be https://, or http:// only for loopback or in-cluster service hosts (*.svc, *.svc.cluster.local)"
    )]
    SchemeNotAllowed,
    #[error("must not carry a user name or password before the host")]
    HasUserInfo,
}

impl WebhookUrl {
    /// The rules of the CRD's `url` field, for a URL that comes from a Secret.
    pub fn parse(text: &str) -> Result<Self, InvalidUrl> {
        let url = Url::parse(text.trim()).map_err(|_| InvalidUrl::NotAUrl)?;
        let Some(host) = url.host_str() else {
            return Err(InvalidUrl::NotAUrl);
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(InvalidUrl::HasUserInfo);
        }
        let allowed = match url.scheme() {
            "https" => true,
            "http" => is_plain_http_host(host),
            _ => false,
        };
        if !allowed {
            return Err(InvalidUrl::SchemeNotAllowed);
        }
        Ok(Self(url))
    }

    /// Reads a URL from a Secret's value.
    pub fn from_secret_value(value: &[u8]) -> Result<Self, InvalidUrl> {
        let text = std::str::from_utf8(value).map_err(|_| InvalidUrl::NotText)?;
        Self::parse(text)
    }

    pub fn as_url(&self) -> &Url {
        &self.0
    }

    /// The host, the only part of the URL fit for logs and conditions.
    pub fn host(&self) -> &str {
        self.0.host_str().unwrap_or_default()
    }
}

/// Where plain http is accepted: the operator's own loopback (tests, sidecars) and cluster
/// services, whose traffic stays inside the cluster network.
fn is_plain_http_host(host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let host = host.trim_end_matches('.');
    host == "localhost"
        || host == "[::1]"
        || host.starts_with("127.")
        || host.ends_with(".svc")
        || host.ends_with(".svc.cluster.local")
}

impl fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookUrl({self})")
    }
}

impl fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}/…", self.0.scheme(), self.host())
    }
}

/// Extra request headers from a Secret, marked sensitive so HTTP-level logging hides them.
/// `Debug` shows their names only.
#[derive(Clone, Default)]
pub struct ExtraHeaders(HeaderMap);

/// Why a Secret's key is not a usable header. Names the key, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidHeader {
    #[error("key {key:?} is not a valid HTTP header name")]
    BadName { key: String },
    #[error("key {key:?} names a header mailpoll sets itself or that belongs to the connection")]
    Reserved { key: String },
    #[error(
        "the value of key {key:?} is not a valid header value (line breaks, NUL and other control characters are not allowed)"
    )]
    BadValue { key: String },
    #[error("more than {MAX_EXTRA_HEADERS} headers")]
    TooMany,
    #[error("the headers are longer than {MAX_EXTRA_HEADER_BYTES} bytes together")]
    TooLong,
}

impl ExtraHeaders {
    /// The headers of a Secret's data: each key a header name, each value its value. A value
    /// written with `echo` ends in a newline, which is dropped.
    pub fn from_secret_data<'a>(
        data: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Self, InvalidHeader> {
        let mut headers = HeaderMap::new();
        let mut bytes = 0;
        for (key, value) in data {
            let name =
                HeaderName::from_bytes(key.as_bytes()).map_err(|_| InvalidHeader::BadName {
                    key: printable(key),
                })?;
            if is_reserved(name.as_str()) {
                return Err(InvalidHeader::Reserved {
                    key: key.to_owned(),
                });
            }
            let value = value.trim_ascii_end();
            let mut value =
                HeaderValue::from_bytes(value).map_err(|_| InvalidHeader::BadValue {
                    key: key.to_owned(),
                })?;
            value.set_sensitive(true);
            bytes += name.as_str().len() + value.len();
            headers.insert(name, value);
        }
        if headers.len() > MAX_EXTRA_HEADERS {
            return Err(InvalidHeader::TooMany);
        }
        if bytes > MAX_EXTRA_HEADER_BYTES {
            return Err(InvalidHeader::TooLong);
        }
        Ok(Self(headers))
    }

    pub fn map(&self) -> &HeaderMap {
        &self.0
    }
}

fn is_reserved(name: &str) -> bool {
    RESERVED_HEADERS
        .iter()
        .any(|reserved| match reserved.strip_suffix('-') {
            Some(_) => name.starts_with(reserved),
            None => name == *reserved,
        })
}

/// A Secret key shown in an error: keys are names, but a hostile one must not carry a
/// terminal escape into a condition.
fn printable(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .take(64)
        .collect()
}

impl fmt::Debug for ExtraHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_follow_the_crd_rules() {
        for ok in [
            "https://prod-12.westeurope.logic.azure.com/workflows/abc/triggers/manual/paths/invoke?api-version=2016-10-01&sig=SECRET",
            "http://localhost:8080/hook",
            "http://127.0.0.1:9/hook",
            "http://[::1]:9/hook",
            "http://receiver.mail.svc/hook",
            "http://receiver.mail.svc.cluster.local:8080/hook",
            "  https://hooks.example.com/mail\n",
        ] {
            assert!(WebhookUrl::parse(ok).is_ok(), "{ok}");
        }
        for (bad, error) in [
            ("hooks.example.com/mail", InvalidUrl::NotAUrl),
            (
                "http://hooks.example.com/mail",
                InvalidUrl::SchemeNotAllowed,
            ),
            ("ftp://hooks.example.com/", InvalidUrl::SchemeNotAllowed),
            ("file:///etc/passwd", InvalidUrl::NotAUrl),
            (
                "https://user:pw@hooks.example.com/",
                InvalidUrl::HasUserInfo,
            ),
            ("http://evil.com#.svc", InvalidUrl::SchemeNotAllowed),
        ] {
            assert_eq!(WebhookUrl::parse(bad).err(), Some(error), "{bad}");
        }
        assert_eq!(
            WebhookUrl::from_secret_value(b"\xffhttps://x").err(),
            Some(InvalidUrl::NotText)
        );
    }

    #[test]
    fn a_url_shows_its_host_only() {
        let url = WebhookUrl::parse("https://hooks.example.com/path?sig=SECRET").expect("url");
        assert_eq!(url.to_string(), "https://hooks.example.com/…");
        assert!(!format!("{url:?}").contains("SECRET"));
    }

    #[test]
    fn headers_come_from_every_key_and_hide_their_values() {
        let headers = ExtraHeaders::from_secret_data([
            ("Authorization", b"Bearer s3cr3t\n".as_slice()),
            ("x-api-key", b"k3y".as_slice()),
        ])
        .expect("headers");
        let map = headers.map();
        assert_eq!(map["authorization"], "Bearer s3cr3t");
        assert!(map["x-api-key"].is_sensitive());
        let shown = format!("{headers:?}");
        assert!(
            shown.contains("authorization") && !shown.contains("s3cr3t"),
            "{shown}"
        );
    }

    #[test]
    fn unusable_headers_name_the_key_never_the_value() {
        let error = |key: &str, value: &[u8]| {
            ExtraHeaders::from_secret_data([(key, value)])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let junk = error("Authorization", b"Bearer \x00\xff\x1b[31m\r\nX-Injected: 1");
        assert!(
            junk.contains("\"Authorization\"") && !junk.contains("Bearer"),
            "{junk}"
        );
        assert!(error("bad header", b"v").contains("not a valid HTTP header name"));
        assert!(error("bad\u{1b}[31m", b"v").contains('\u{fffd}'));
        for reserved in [
            "Content-Type",
            "Host",
            "webhook-signature",
            "Idempotency-Key",
            "mailpoll-x",
        ] {
            assert!(
                error(reserved, b"v").contains("sets itself"),
                "{reserved} must be refused"
            );
        }
        let many: Vec<(String, Vec<u8>)> = (0..40)
            .map(|i| (format!("x-h{i}"), b"v".to_vec()))
            .collect();
        assert_eq!(
            ExtraHeaders::from_secret_data(many.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .err(),
            Some(InvalidHeader::TooMany)
        );
        let long = vec![b'a'; 9000];
        assert_eq!(
            ExtraHeaders::from_secret_data([("x-long", long.as_slice())]).err(),
            Some(InvalidHeader::TooLong)
        );
    }
}
