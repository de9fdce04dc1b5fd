//! Where webhooks may go: the egress policy of a shared cluster.
//!
//! A MailboxPoll's author chooses its webhook URL, so without a policy any namespace could make
//! the operator POST to the node's loopback services, to the cloud metadata endpoint, or to
//! services of other namespaces. The policy is checked twice:
//! - before sending, on the URL's host: IP literals (which no resolver sees) and the
//!   namespace of cluster service names (which depends on the MailboxPoll);
//! - at connect time, on every address the host resolves to ([`EgressResolver`]), so a name
//!   that changes its answer between the check and the connection (DNS rebinding) gains
//!   nothing.
//!
//! [`EgressPolicy`] holds the pure rules, here; [`guard`] does the I/O ([`EgressResolver`],
//! [`GuardedClient`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::time::Duration;

/// The cluster DNS domain of a default Kubernetes installation.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// Longest wait for a name lookup made to check a destination outside a delivery.
const CHECK_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Addresses that reach the operator's own host or its cloud, whatever the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialAddress {
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// 0.0.0.0/8 and ::; connecting to them reaches the host itself on Linux.
    Unspecified,
    /// 169.254.0.0/16 (cloud metadata services, 169.254.169.254), fe80::/10.
    LinkLocal,
}

impl SpecialAddress {
    /// "a loopback address", as a refusal names it.
    fn described(self) -> &'static str {
        match self {
            Self::Loopback => "a loopback address",
            Self::Unspecified => "an unspecified address (it reaches the operator's own host)",
            Self::LinkLocal => "a link-local address (where cloud metadata services answer)",
        }
    }

    /// The kind of destination the operator has to allow, and the flag that allows it.
    fn allowed_by(self) -> (&'static str, &'static str) {
        match self {
            Self::Loopback | Self::Unspecified => ("loopback", "--webhook-allow-loopback"),
            Self::LinkLocal => ("link-local", "--webhook-allow-link-local"),
        }
    }
}

/// The IPv4 address an IPv6 address stands for, if it embeds one: IPv4-mapped
/// (`::ffff:127.0.0.1`), IPv4-compatible (`::127.0.0.1`) and NAT64 (`64:ff9b::7f00:1`) forms
/// would otherwise hide a loopback or metadata address from the rules.
fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let segments = ip.segments();
    let low = || Ipv4Addr::from(((segments[6] as u32) << 16) | segments[7] as u32);
    let compatible =
        segments[..6].iter().all(|s| *s == 0) && !ip.is_loopback() && !ip.is_unspecified();
    let nat64 = segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    (compatible || nat64).then(low)
}

/// The address the rules look at: IPv6 forms of IPv4 addresses as the IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_ipv4(v6).map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Whether an address reaches the host or its cloud rather than a network peer.
pub fn special(ip: IpAddr) -> Option<SpecialAddress> {
    match canonical(ip) {
        IpAddr::V4(v4) if v4.is_loopback() => Some(SpecialAddress::Loopback),
        IpAddr::V4(v4) if v4.octets()[0] == 0 => Some(SpecialAddress::Unspecified),
        IpAddr::V4(v4) if v4.is_link_local() => Some(SpecialAddress::LinkLocal),
        IpAddr::V6(v6) if v6.is_loopback() => Some(SpecialAddress::Loopback),
        IpAddr::V6(v6) if v6.is_unspecified() => Some(SpecialAddress::Unspecified),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some(SpecialAddress::LinkLocal),
        _ => None,
    }
}

/// An address range, `10.0.0.0/8` or `fd00::/8`; a bare address is a range of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_matches(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_matches(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

fn prefix_matches(network: &[u8], ip: &[u8], prefix: u8) -> bool {
    let whole = usize::from(prefix / 8);
    let rest = prefix % 8;
    if network[..whole] != ip[..whole] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (network[whole] & mask) == (ip[whole] & mask)
}

impl FromStr for Cidr {
    type Err = EgressConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || EgressConfigError::Cidr(text.to_owned());
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address.trim().parse().map_err(|_| invalid())?;
        let network = canonical(network);
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix.trim().parse::<u8>().map_err(|_| invalid())?,
            None => max,
        };
        if prefix > max {
            return Err(invalid());
        }
        Ok(Self { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// A host allow-list entry: `hooks.example.com` exactly, or `*.example.com` for every name
/// below `example.com` (not `example.com` itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// The suffix with its leading dot: `.example.com`.
    Below(String),
}

impl HostPattern {
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(name) => host == name,
            Self::Below(suffix) => host.len() > suffix.len() && host.ends_with(suffix.as_str()),
        }
    }
}

impl FromStr for HostPattern {
    type Err = EgressConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let name = normalize_host(text);
        let invalid = || EgressConfigError::Host(text.to_owned());
        let pattern = match name.strip_prefix("*.") {
            Some(suffix) => Self::Below(format!(".{suffix}")),
            None => Self::Exact(name.clone()),
        };
        let bare = name.trim_start_matches("*.");
        let valid = !bare.is_empty()
            && !bare.contains('*')
            && bare
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if valid { Ok(pattern) } else { Err(invalid()) }
    }
}

/// A flag value the policy cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressConfigError {
    #[error("{0:?} is not an address range such as 10.0.0.0/8 or fd00::/8")]
    Cidr(String),
    #[error("{0:?} is not a host name such as hooks.example.com or *.example.com")]
    Host(String),
}

/// Parses a comma-separated flag value; empty entries are skipped.
pub fn parse_list<T: FromStr<Err = EgressConfigError>>(
    list: &str,
) -> Result<Vec<T>, EgressConfigError> {
    list.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(str::parse)
        .collect()
}

/// Lower case, without the trailing dot of an absolute name.
fn normalize_host(host: &str) -> String {
    host.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// What a host name says about where it leads inside the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterName<'a> {
    /// Not a cluster name: resolved by DNS as an absolute name.
    External,
    /// `<service>.<namespace>.svc[.<cluster-domain>]`, or a pod name below a namespace
    /// (`<pod>.<subdomain>.<namespace>.svc…`, `<a-b-c-d>.<namespace>.pod.<cluster-domain>`).
    InNamespace(&'a str),
    /// Another name below the cluster domain (no namespace to check it against).
    Other,
}

/// Classifies a normalized host name.
pub fn cluster_name<'a>(host: &'a str, cluster_domain: &str) -> ClusterName<'a> {
    let in_domain = host
        .strip_suffix(cluster_domain)
        .and_then(|rest| rest.strip_suffix('.'));
    let rest = match in_domain {
        Some(rest) => match rest.rsplit_once('.') {
            Some((rest, "svc" | "pod")) => rest,
            _ => return ClusterName::Other,
        },
        None => match host.strip_suffix(".svc") {
            Some(rest) => rest,
            None => return ClusterName::External,
        },
    };
    // A namespace with at least one name in front of it.
    match rest.rsplit_once('.') {
        Some((front, namespace)) if !front.is_empty() && !namespace.is_empty() => {
            ClusterName::InNamespace(namespace)
        }
        _ => ClusterName::Other,
    }
}

/// Why a webhook destination is refused; its text names the rule and the flag that lifts it.
/// It names the host only: the rest of a URL may carry credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    Special {
        host: String,
        address: IpAddr,
        kind: SpecialAddress,
    },
    DeniedRange {
        host: String,
        address: IpAddr,
        range: Cidr,
    },
    OtherNamespace {
        host: String,
        namespace: String,
        own: String,
    },
    ClusterName {
        host: String,
    },
    SingleLabel {
        host: String,
    },
    InvalidUrl,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // An IP literal is its own address; a name "resolves to" one.
        let leads = |f: &mut fmt::Formatter<'_>, host: &str, address: &IpAddr| {
            if host.trim_matches(['[', ']']) == address.to_string() {
                write!(f, "webhook address {address} is")
            } else {
                write!(f, "webhook host {host} resolves to {address},")
            }
        };
        match self {
            Self::Special {
                host,
                address,
                kind,
            } => {
                leads(f, host, address)?;
                let (what, flag) = kind.allowed_by();
                write!(
                    f,
                    " {}; the operator does not allow {what} destinations ({flag})",
                    kind.described()
                )
            }
            Self::DeniedRange {
                host,
                address,
                range,
            } => {
                leads(f, host, address)?;
                write!(
                    f,
                    " inside {range}, a range the operator denies to webhooks \
                     (--webhook-denied-cidrs; --webhook-allowed-hosts or \
                     --webhook-allowed-cidrs make exceptions)"
                )
            }
            Self::OtherNamespace {
                host,
                namespace,
                own,
            } => write!(
                f,
                "webhook host {host} is in namespace {namespace}; a MailboxPoll in namespace \
                 {own} may only send to its own namespace's services unless the operator \
                 allows the host (--webhook-allowed-hosts)"
            ),
            Self::ClusterName { host } => write!(
                f,
                "webhook host {host} is a cluster name outside any namespace; the operator \
                 does not send to it unless it allows the host (--webhook-allowed-hosts)"
            ),
            Self::SingleLabel { host } => write!(
                f,
                "webhook host {host} is a single-label name, which would resolve in the \
                 operator's own namespace; name a service as <service>.<namespace>.svc"
            ),
            Self::InvalidUrl => {
                f.write_str("webhook URL is not an absolute http(s) URL with a host")
            }
        }
    }
}

/// The operator's rules for webhook destinations. The default allows public and private
/// network addresses, and the services of a MailboxPoll's own namespace; it refuses loopback,
/// unspecified and link-local addresses and other namespaces' services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    pub allow_loopback: bool,
    pub allow_link_local: bool,
    /// Cluster names of every namespace are allowed, not only the MailboxPoll's own.
    pub allow_other_namespaces: bool,
    /// Hosts allowed whatever their namespace or denied range (not their special addresses:
    /// a name's answer is not the operator's to vouch for).
    pub allowed_hosts: Vec<HostPattern>,
    /// Addresses allowed whatever else the rules say, special ones included.
    pub allowed_cidrs: Vec<Cidr>,
    /// Addresses refused unless reached through an allowed host or a cluster name of the
    /// MailboxPoll's namespace (for example the pod and service ranges).
    pub denied_cidrs: Vec<Cidr>,
    pub cluster_domain: String,
}

impl Default for EgressPolicy {
    fn default() -> Self {
        Self {
            allow_loopback: false,
            allow_link_local: false,
            allow_other_namespaces: false,
            allowed_hosts: Vec::new(),
            allowed_cidrs: Vec::new(),
            denied_cidrs: Vec::new(),
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.into(),
        }
    }
}

/// A URL's host, as the rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlHost {
    Address(IpAddr),
    /// Normalized: lower case, no trailing dot.
    Name(String),
}

impl UrlHost {
    /// The host of an http(s) URL. The `url` parser has already turned every IPv4 spelling
    /// (`2130706433`, `0x7f.1`) into dotted form.
    pub fn of(url: &reqwest::Url) -> Option<Self> {
        if !matches!(url.scheme(), "http" | "https") {
            return None;
        }
        let host = url.host_str()?;
        if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            return v6.parse().ok().map(Self::Address);
        }
        if let Ok(v4) = host.parse::<Ipv4Addr>() {
            return Some(Self::Address(IpAddr::V4(v4)));
        }
        Some(Self::Name(normalize_host(host)))
    }
}

impl EgressPolicy {
    /// A policy that also allows loopback destinations (local development and tests).
    pub fn allowing_loopback() -> Self {
        Self {
            allow_loopback: true,
            ..Self::default()
        }
    }

    fn allows_special(&self, kind: SpecialAddress) -> bool {
        match kind {
            SpecialAddress::Loopback | SpecialAddress::Unspecified => self.allow_loopback,
            SpecialAddress::LinkLocal => self.allow_link_local,
        }
    }

    /// Every spelling of a host the allow-list may name: a service written with or without
    /// the cluster domain is the same service.
    fn spellings(&self, host: &str) -> Vec<String> {
        let mut spellings = vec![host.to_owned()];
        let full_suffix = format!(".svc.{}", self.cluster_domain);
        if let Some(short) = host.strip_suffix(&full_suffix) {
            spellings.push(format!("{short}.svc"));
        } else if host.ends_with(".svc") {
            spellings.push(format!("{host}.{}", self.cluster_domain));
        }
        spellings
    }

    pub fn host_allowed(&self, host: &str) -> bool {
        let spellings = self.spellings(host);
        self.allowed_hosts
            .iter()
            .any(|pattern| spellings.iter().any(|s| pattern.matches(s)))
    }

    /// The rule on an address `host` leads to. `host` is a normalized name, or the address
    /// itself for an IP literal.
    pub fn check_address(&self, host: &str, address: IpAddr) -> Result<(), Refusal> {
        if self
            .allowed_cidrs
            .iter()
            .any(|range| range.contains(address))
        {
            return Ok(());
        }
        if let Some(kind) = special(address)
            && !self.allows_special(kind)
        {
            return Err(Refusal::Special {
                host: host.to_owned(),
                address,
                kind,
            });
        }
        // A cluster name reaching here passed the namespace rule before sending.
        let vouched = self.host_allowed(host)
            || matches!(
                cluster_name(host, &self.cluster_domain),
                ClusterName::InNamespace(_)
            );
        if !vouched && let Some(range) = self.denied_cidrs.iter().find(|r| r.contains(address)) {
            return Err(Refusal::DeniedRange {
                host: host.to_owned(),
                address,
                range: *range,
            });
        }
        Ok(())
    }

    /// The rules that need no lookup, for a MailboxPoll in `namespace`: an IP literal's
    /// address, and a name's namespace.
    pub fn check_host(&self, host: &UrlHost, namespace: &str) -> Result<(), Refusal> {
        let name = match host {
            UrlHost::Address(address) => {
                return self.check_address(&address.to_string(), *address);
            }
            UrlHost::Name(name) => name,
        };
        if self.host_allowed(name) {
            return Ok(());
        }
        if is_localhost(name) {
            // Resolved without DNS to loopback addresses (see `lookup_plan`).
            return self.check_address(name, IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        if !name.contains('.') {
            return Err(Refusal::SingleLabel { host: name.clone() });
        }
        match cluster_name(name, &self.cluster_domain) {
            ClusterName::External => Ok(()),
            ClusterName::InNamespace(other)
                if other != namespace && !self.allow_other_namespaces =>
            {
                Err(Refusal::OtherNamespace {
                    host: name.clone(),
                    namespace: other.to_owned(),
                    own: namespace.to_owned(),
                })
            }
            ClusterName::InNamespace(_) => Ok(()),
            ClusterName::Other if self.allow_other_namespaces => Ok(()),
            ClusterName::Other => Err(Refusal::ClusterName { host: name.clone() }),
        }
    }

    /// [`Self::check_host`] on a URL.
    pub fn check_url(&self, url: &str, namespace: &str) -> Result<UrlHost, Refusal> {
        let host = reqwest::Url::parse(url)
            .ok()
            .and_then(|url| UrlHost::of(&url))
            .ok_or(Refusal::InvalidUrl)?;
        self.check_host(&host, namespace)?;
        Ok(host)
    }

    /// What the resolver asks DNS for a host: `None` when the answer is fixed (`localhost`).
    /// Names are looked up as absolute names, so the resolver's search list cannot turn
    /// `hooks.other` into `hooks.other.svc.cluster.local`, a service the namespace rule never
    /// saw; `.svc` names get the cluster domain the search list would have added.
    pub fn lookup_plan(&self, host: &str) -> Option<String> {
        let host = normalize_host(host);
        if is_localhost(&host) {
            return None;
        }
        if host.ends_with(".svc") {
            return Some(format!("{host}.{}.", self.cluster_domain));
        }
        Some(format!("{host}."))
    }

    /// The addresses of `host` the rules allow, from what the lookup answered; the first
    /// refusal when none is allowed.
    pub fn filter_addresses(
        &self,
        host: &str,
        addresses: &[IpAddr],
    ) -> Result<Vec<IpAddr>, Option<Refusal>> {
        let host = normalize_host(host);
        let mut first_refusal = None;
        let mut allowed = Vec::new();
        for address in addresses {
            match self.check_address(&host, *address) {
                Ok(()) => allowed.push(*address),
                Err(refusal) => {
                    first_refusal.get_or_insert(refusal);
                }
            }
        }
        if allowed.is_empty() {
            Err(first_refusal)
        } else {
            Ok(allowed)
        }
    }
}

/// `localhost` and names below it are loopback by definition (RFC 6761).
fn is_localhost(host: &str) -> bool {
    host == "localhost" || host.ends_with(".localhost")
}

/// The loopback addresses `localhost` stands for.
const LOCALHOST_ADDRESSES: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::LOCALHOST),
    IpAddr::V6(Ipv6Addr::LOCALHOST),
];

mod guard;

pub use guard::*;

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::Arc;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    fn policy() -> EgressPolicy {
        EgressPolicy::default()
    }

    fn host(url: &str) -> UrlHost {
        UrlHost::of(&reqwest::Url::parse(url).expect("test URL")).expect("http URL")
    }

    #[test]
    fn special_addresses_in_every_spelling() {
        for (address, kind) in [
            ("127.0.0.1", SpecialAddress::Loopback),
            ("127.8.9.10", SpecialAddress::Loopback),
            ("::1", SpecialAddress::Loopback),
            ("::ffff:127.0.0.1", SpecialAddress::Loopback),
            ("::127.0.0.1", SpecialAddress::Loopback),
            ("64:ff9b::7f00:1", SpecialAddress::Loopback),
            ("0.0.0.0", SpecialAddress::Unspecified),
            ("::", SpecialAddress::Unspecified),
            ("::ffff:0.0.0.0", SpecialAddress::Unspecified),
            ("169.254.169.254", SpecialAddress::LinkLocal),
            ("::ffff:169.254.169.254", SpecialAddress::LinkLocal),
            ("fe80::1", SpecialAddress::LinkLocal),
            ("febf::1", SpecialAddress::LinkLocal),
        ] {
            assert_eq!(special(ip(address)), Some(kind), "{address}");
        }
        for address in [
            "10.1.2.3",
            "192.168.1.1",
            "8.8.8.8",
            "fd00::1",
            "2001:db8::1",
            "fec0::1",
        ] {
            assert_eq!(special(ip(address)), None, "{address}");
        }
    }

    #[test]
    fn cidrs_parse_and_contain() {
        let range: Cidr = "10.96.0.0/12".parse().expect("range");
        assert!(range.contains(ip("10.96.0.10")));
        assert!(range.contains(ip("10.111.255.255")));
        assert!(!range.contains(ip("10.112.0.0")));
        assert!(
            range.contains(ip("::ffff:10.96.0.1")),
            "mapped forms are the same address"
        );
        let one: Cidr = "169.254.169.254".parse().expect("single address");
        assert_eq!(one.to_string(), "169.254.169.254/32");
        let v6: Cidr = "fd00::/8".parse().expect("v6 range");
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        let all: Cidr = "0.0.0.0/0".parse().expect("everything");
        assert!(all.contains(ip("1.2.3.4")) && !all.contains(ip("::1")));
        for bad in [
            "10.0.0.0/33",
            "10.0.0/8",
            "fd00::/129",
            "hooks.example.com",
            "1.2.3.4/x",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn host_patterns_are_exact_or_below_a_suffix() {
        let list: Vec<HostPattern> =
            parse_list(" hooks.example.com, *.partner.example ,,").expect("list");
        assert_eq!(list.len(), 2);
        assert!(list[0].matches("hooks.example.com"));
        assert!(!list[0].matches("x.hooks.example.com"));
        assert!(list[1].matches("a.partner.example"));
        assert!(list[1].matches("a.b.partner.example"));
        assert!(!list[1].matches("partner.example"));
        assert!(!list[1].matches("evilpartner.example"));
        assert!(parse_list::<HostPattern>("a.*.example").is_err());
        assert!(parse_list::<HostPattern>("https://x/").is_err());
    }

    #[test]
    fn cluster_names_know_their_namespace() {
        let domain = DEFAULT_CLUSTER_DOMAIN;
        assert_eq!(
            cluster_name("hooks.team-a.svc", domain),
            ClusterName::InNamespace("team-a")
        );
        assert_eq!(
            cluster_name("hooks.team-a.svc.cluster.local", domain),
            ClusterName::InNamespace("team-a")
        );
        assert_eq!(
            cluster_name("pod-0.hooks.team-a.svc.cluster.local", domain),
            ClusterName::InNamespace("team-a")
        );
        assert_eq!(
            cluster_name("10-1-2-3.team-a.pod.cluster.local", domain),
            ClusterName::InNamespace("team-a")
        );
        assert_eq!(cluster_name("team-a.svc", domain), ClusterName::Other);
        assert_eq!(cluster_name("x.cluster.local", domain), ClusterName::Other);
        assert_eq!(
            cluster_name("hooks.example.com", domain),
            ClusterName::External
        );
        assert_eq!(cluster_name("hooks.team-a", domain), ClusterName::External);
        assert_eq!(
            cluster_name("hooks.team-a.svc.corp.internal", "corp.internal"),
            ClusterName::InNamespace("team-a")
        );
    }

    #[test]
    fn literals_are_refused_by_their_address_class() {
        let refused = |url: &str| policy().check_host(&host(url), "support").expect_err(url);
        let loopback = refused("http://127.0.0.1:8080/hook?sig=secret");
        assert_eq!(
            loopback.to_string(),
            "webhook address 127.0.0.1 is a loopback address; the operator does not allow \
             loopback destinations (--webhook-allow-loopback)"
        );
        assert!(matches!(
            refused("http://2130706433/"),
            Refusal::Special {
                kind: SpecialAddress::Loopback,
                ..
            }
        ));
        assert!(matches!(
            refused("http://[::ffff:127.0.0.1]/"),
            Refusal::Special {
                kind: SpecialAddress::Loopback,
                ..
            }
        ));
        assert!(matches!(
            refused("http://[::1]:9/"),
            Refusal::Special {
                kind: SpecialAddress::Loopback,
                ..
            }
        ));
        assert!(matches!(
            refused("http://0.0.0.0/"),
            Refusal::Special {
                kind: SpecialAddress::Unspecified,
                ..
            }
        ));
        let metadata = refused("http://169.254.169.254/latest/meta-data/");
        assert_eq!(
            metadata.to_string(),
            "webhook address 169.254.169.254 is a link-local address (where cloud metadata \
             services answer); the operator does not allow link-local destinations \
             (--webhook-allow-link-local)"
        );
        assert!(matches!(
            refused("http://[fe80::1]/"),
            Refusal::Special {
                kind: SpecialAddress::LinkLocal,
                ..
            }
        ));
        assert!(
            policy()
                .check_host(&host("https://203.0.113.7/hook"), "support")
                .is_ok()
        );
        assert!(
            policy()
                .check_host(&host("http://10.20.30.40/hook"), "support")
                .is_ok()
        );
    }

    #[test]
    fn services_are_allowed_in_the_own_namespace_only() {
        let p = policy();
        assert!(
            p.check_host(&host("http://hooks.support.svc:8080/x"), "support")
                .is_ok()
        );
        assert!(
            p.check_host(
                &host("http://hooks.support.svc.cluster.local./x"),
                "support"
            )
            .is_ok()
        );
        let other = p
            .check_host(&host("http://hooks.billing.svc.cluster.local/x"), "support")
            .expect_err("another namespace");
        assert_eq!(
            other.to_string(),
            "webhook host hooks.billing.svc.cluster.local is in namespace billing; a MailboxPoll \
             in namespace support may only send to its own namespace's services unless the \
             operator allows the host (--webhook-allowed-hosts)"
        );
        assert!(matches!(
            p.check_host(
                &host("http://10-0-0-1.billing.pod.cluster.local/"),
                "support"
            ),
            Err(Refusal::OtherNamespace { .. })
        ));
        assert!(matches!(
            p.check_host(&host("http://kubernetes/"), "support"),
            Err(Refusal::SingleLabel { .. })
        ));
        assert!(matches!(
            p.check_host(&host("http://default.svc/"), "support"),
            Err(Refusal::ClusterName { .. })
        ));
    }

    #[test]
    fn allow_lists_lift_the_rules_they_name() {
        let p = EgressPolicy {
            allowed_hosts: parse_list("hooks.shared.svc.cluster.local, *.tools.svc")
                .expect("hosts"),
            allowed_cidrs: parse_list("127.0.0.1/32").expect("cidrs"),
            ..policy()
        };
        // Any spelling of an allowed service.
        assert!(
            p.check_host(&host("http://hooks.shared.svc/"), "support")
                .is_ok()
        );
        assert!(
            p.check_host(&host("http://a.tools.svc.cluster.local/"), "support")
                .is_ok()
        );
        assert!(
            p.check_host(&host("http://a.other.svc/"), "support")
                .is_err()
        );
        // The allowed range lifts loopback for its addresses only.
        assert!(
            p.check_host(&host("http://127.0.0.1:9/"), "support")
                .is_ok()
        );
        assert!(
            p.check_host(&host("http://127.0.0.2:9/"), "support")
                .is_err()
        );
        // An allowed host does not vouch for special addresses it resolves to.
        assert!(matches!(
            p.check_address("hooks.shared.svc.cluster.local", ip("169.254.169.254")),
            Err(Refusal::Special { .. })
        ));
        let open = EgressPolicy {
            allow_loopback: true,
            allow_link_local: true,
            allow_other_namespaces: true,
            ..policy()
        };
        assert!(open.check_host(&host("http://[::1]/"), "support").is_ok());
        assert!(
            open.check_host(&host("http://169.254.169.254/"), "support")
                .is_ok()
        );
        assert!(
            open.check_host(&host("http://hooks.billing.svc/"), "support")
                .is_ok()
        );
    }

    #[test]
    fn denied_ranges_spare_own_cluster_names_and_allowed_hosts() {
        let p = EgressPolicy {
            denied_cidrs: parse_list("10.96.0.0/12").expect("cidrs"),
            allowed_hosts: parse_list("partner.example.com").expect("hosts"),
            ..policy()
        };
        let refusal = p
            .check_address("evil.example.com", ip("10.96.0.1"))
            .expect_err("denied");
        assert_eq!(
            refusal.to_string(),
            "webhook host evil.example.com resolves to 10.96.0.1, inside 10.96.0.0/12, a range \
             the operator denies to webhooks (--webhook-denied-cidrs; --webhook-allowed-hosts \
             or --webhook-allowed-cidrs make exceptions)"
        );
        assert!(
            p.check_host(&host("http://10.100.0.1/"), "support")
                .is_err()
        );
        assert!(
            p.check_address("hooks.support.svc", ip("10.96.0.1"))
                .is_ok()
        );
        assert!(
            p.check_address("partner.example.com", ip("10.96.0.1"))
                .is_ok()
        );
        assert!(
            p.check_address("evil.example.com", ip("10.200.0.1"))
                .is_ok()
        );
    }

    #[test]
    fn lookups_use_absolute_names() {
        let p = policy();
        assert_eq!(
            p.lookup_plan("hooks.example.com"),
            Some("hooks.example.com.".into())
        );
        assert_eq!(
            p.lookup_plan("Hooks.Example.COM."),
            Some("hooks.example.com.".into())
        );
        assert_eq!(
            p.lookup_plan("hooks.team.svc"),
            Some("hooks.team.svc.cluster.local.".into())
        );
        assert_eq!(p.lookup_plan("localhost"), None);
        assert_eq!(p.lookup_plan("app.localhost"), None);
    }

    #[test]
    fn some_allowed_addresses_are_kept_and_none_is_a_refusal() {
        let p = policy();
        let mixed = [ip("127.0.0.1"), ip("203.0.113.7")];
        assert_eq!(
            p.filter_addresses("h.example", &mixed),
            Ok(vec![ip("203.0.113.7")])
        );
        let refused = p
            .filter_addresses("rebind.example.", &[ip("::ffff:127.0.0.1")])
            .expect_err("only loopback");
        assert_eq!(
            refused.map(|r| r.to_string()).as_deref(),
            Some(
                "webhook host rebind.example resolves to ::ffff:127.0.0.1, a loopback address; \
                 the operator does not allow loopback destinations (--webhook-allow-loopback)"
            )
        );
        assert_eq!(p.filter_addresses("empty.example", &[]), Err(None));
    }

    /// Answers `rebind.example.` with loopback, `public.example.` with a public address, and
    /// fails every other name.
    struct TableLookup;

    impl Lookup for TableLookup {
        fn lookup(&self, name: &str) -> LookupFuture {
            let answer = match name {
                "rebind.example." => Ok(vec![ip("127.0.0.1")]),
                "public.example." => Ok(vec![ip("203.0.113.7")]),
                "hooks.support.svc.cluster.local." => Ok(vec![ip("10.96.0.20")]),
                other => Err(io::Error::other(format!("{other}: no such name"))),
            };
            Box::pin(async move { answer })
        }
    }

    #[tokio::test]
    async fn destinations_are_checked_through_the_lookup() {
        let guard = EgressGuard::with_lookup(policy(), Arc::new(TableLookup));
        let refused = guard
            .check_destination("https://rebind.example/hook?sig=s3cret", "support")
            .await
            .expect_err("resolves to loopback");
        assert!(matches!(
            refused,
            Refusal::Special {
                kind: SpecialAddress::Loopback,
                ..
            }
        ));
        assert!(
            guard
                .check_destination("https://public.example/h", "support")
                .await
                .is_ok()
        );
        // A lookup that fails is the delivery's to report, not a refusal.
        assert!(
            guard
                .check_destination("https://gone.example/h", "support")
                .await
                .is_ok()
        );
        // `.svc` names are looked up with the cluster domain, absolutely.
        assert_eq!(
            guard.resolve("hooks.support.svc").await.expect("service"),
            vec![ip("10.96.0.20")]
        );
        assert!(matches!(
            guard.resolve("localhost").await,
            Err(ResolveError::Refused(Refusal::Special { .. }))
        ));
        assert!(matches!(
            guard
                .check_destination("http://hooks.billing.svc/h", "support")
                .await,
            Err(Refusal::OtherNamespace { .. })
        ));
    }
}
