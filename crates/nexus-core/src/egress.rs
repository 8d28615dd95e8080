//! Where outbound calls that carry secrets may go. A provider's token,
//! revocation and UserInfo endpoints and a webhook receive client secrets,
//! codes, verifiers, tokens and signatures; a hostile or mistaken profile or
//! discovery document must not send them to a cloud metadata service, to a
//! link-local or private address, or over plaintext.
//!
//! The rules: `https`, or `http` to loopback only (development) unless the
//! caller allows plaintext explicitly; and every address the name resolves
//! to must be permitted (checked by [`EgressResolver`], which the HTTP client
//! uses for every connection, so a name that resolves somewhere forbidden is
//! refused after DNS resolution, not only as written).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use url::Url;

/// Why an outbound URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    /// Not https (and not plaintext to loopback, nor allowed plaintext).
    #[error("{0} must use https (http only to loopback)")]
    Plaintext(String),
    /// Not an http(s) URL with a host.
    #[error("{0} is not an http(s) URL with a host")]
    NotHttp(String),
    /// An address outside the egress policy.
    #[error(
        "{0} is an address outbound calls may not reach (link-local, metadata, private or denied)"
    )]
    Forbidden(IpAddr),
}

/// The egress policy: some private networks may be allowed (an IdP on the
/// company network), some other networks denied on top of the built-in
/// rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Egress {
    /// Private networks outbound calls may reach anyway.
    pub allow: Vec<IpNet>,
    /// Networks outbound calls may never reach (besides the built-in ones).
    pub deny: Vec<IpNet>,
}

/// Cloud metadata services outside 169.254.0.0/16.
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

fn link_local_or_special(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || v4.octets()[0] == 0
        }
        IpAddr::V6(v6) => {
            (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6 == METADATA_V6
        }
    }
}

fn private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_private()
                // Carrier-grade NAT, 100.64.0.0/10.
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
        }
        // Unique local addresses, fc00::/7.
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`) is judged as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Whether `url` is plaintext `http` to a host that is not loopback (an
/// unparsable URL is not: other checks refuse it).
///
/// ```
/// use nexus_core::egress::plaintext_beyond_loopback as p;
/// assert!(p("http://idp.example.com/token") && !p("https://idp.example.com/token"));
/// assert!(!p("http://127.0.0.1:8080/") && !p("http://localhost/") && !p("http://[::1]/"));
/// ```
pub fn plaintext_beyond_loopback(url: &str) -> bool {
    Url::parse(url).is_ok_and(|u| u.scheme() == "http" && !loopback_host(&u))
}

/// An IP literal host, if the URL has one.
fn literal_host(url: &Url) -> Option<IpAddr> {
    match url.host()? {
        url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
        url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
        url::Host::Domain(_) => None,
    }
}

fn loopback_host(url: &Url) -> bool {
    match literal_host(url) {
        Some(ip) => canonical(ip).is_loopback(),
        None => url.host_str() == Some("localhost"),
    }
}

impl Egress {
    /// Whether outbound calls may reach `ip`: never denied networks,
    /// link-local (metadata services live there) or special addresses;
    /// private networks only when allowed; loopback and public addresses yes.
    ///
    /// ```
    /// use nexus_core::egress::Egress;
    /// let e = Egress::default();
    /// assert!(e.permits("203.0.113.9".parse().unwrap()) == false); // documentation range
    /// assert!(e.permits("8.8.8.8".parse().unwrap()));
    /// assert!(!e.permits("169.254.169.254".parse().unwrap()));
    /// assert!(!e.permits("10.1.2.3".parse().unwrap()));
    /// assert!(e.permits("127.0.0.1".parse().unwrap()));
    /// ```
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if self.deny.iter().any(|n| n.contains(&ip)) || link_local_or_special(ip) {
            return false;
        }
        if private(ip) {
            return self.allow.iter().any(|n| n.contains(&ip));
        }
        true
    }

    /// Checks an outbound URL as written: http(s) with a host; `https`, or
    /// `http` to a loopback host (or anywhere with `plaintext_ok`); an IP
    /// literal host must be permitted (names are checked when resolved).
    pub fn check_url(&self, what: &str, url: &str, plaintext_ok: bool) -> Result<(), EgressError> {
        let parsed = Url::parse(url).map_err(|_| EgressError::NotHttp(what.to_string()))?;
        if parsed.host().is_none() || !matches!(parsed.scheme(), "http" | "https") {
            return Err(EgressError::NotHttp(what.to_string()));
        }
        if let Some(ip) = literal_host(&parsed).filter(|ip| !self.permits(*ip)) {
            return Err(EgressError::Forbidden(ip));
        }
        if parsed.scheme() == "http" && !loopback_host(&parsed) && !plaintext_ok {
            return Err(EgressError::Plaintext(what.to_string()));
        }
        Ok(())
    }
}

/// A DNS resolver for `reqwest` that drops the addresses the policy
/// forbids, and fails when none is left.
#[derive(Debug, Clone)]
pub struct EgressResolver(pub Arc<Egress>);

impl reqwest::dns::Resolve for EgressResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| policy.permits(a.ip()))
                .collect();
            if allowed.is_empty() {
                crate::static_counter!("nexus_egress_refused_total").increment(1);
                let ip = found
                    .first()
                    .map(SocketAddr::ip)
                    .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
                return Err(Box::new(EgressError::Forbidden(ip)) as Box<_>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_address_rules() {
        let e = Egress::default();
        for bad in [
            "169.254.169.254",
            "169.254.0.1",
            "fe80::1",
            "fd00:ec2::254",
            "0.0.0.0",
            "::",
            "255.255.255.255",
            "224.0.0.1",
            "10.0.0.1",
            "172.16.5.5",
            "192.168.1.1",
            "100.64.0.1",
            "fc00::1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
        ] {
            assert!(!e.permits(ip(bad)), "{bad}");
        }
        for good in [
            "1.1.1.1",
            "2606:4700::1111",
            "127.0.0.1",
            "::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(e.permits(ip(good)), "{good}");
        }
        let e = Egress {
            allow: vec![
                "10.0.0.0/8".parse().unwrap(),
                "169.254.0.0/16".parse().unwrap(),
            ],
            deny: vec![
                "127.0.0.2/32".parse().unwrap(),
                "1.1.1.0/24".parse().unwrap(),
            ],
        };
        assert!(e.permits(ip("10.9.9.9")), "allowed private network");
        assert!(
            !e.permits(ip("172.16.0.1")),
            "other private networks stay refused"
        );
        assert!(
            !e.permits(ip("169.254.169.254")),
            "link-local cannot be allowed"
        );
        assert!(
            !e.permits(ip("127.0.0.2")) && !e.permits(ip("1.1.1.1")),
            "denied"
        );
        assert!(e.permits(ip("127.0.0.1")));
    }

    #[test]
    fn the_url_rules() {
        let e = Egress::default();
        assert!(e
            .check_url("token_url", "https://idp.example.com/token", false)
            .is_ok());
        assert!(e
            .check_url("token_url", "http://127.0.0.1:9000/token", false)
            .is_ok());
        assert!(e
            .check_url("token_url", "http://localhost/token", false)
            .is_ok());
        assert!(e
            .check_url("token_url", "http://[::1]/token", false)
            .is_ok());
        assert_eq!(
            e.check_url("token_url", "http://idp.example.com/token", false),
            Err(EgressError::Plaintext("token_url".into()))
        );
        assert!(e
            .check_url("token_url", "http://idp.example.com/token", true)
            .is_ok());
        assert_eq!(
            e.check_url("token_url", "https://169.254.169.254/latest", false),
            Err(EgressError::Forbidden(ip("169.254.169.254")))
        );
        assert!(e.check_url("token_url", "ftp://x/y", false).is_err());
        assert!(e.check_url("token_url", "not a url", false).is_err());
    }

    #[tokio::test]
    async fn names_resolving_to_forbidden_addresses_are_refused() {
        use reqwest::dns::Resolve;
        let deny_loopback = EgressResolver(Arc::new(Egress {
            allow: Vec::new(),
            deny: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
        }));
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        assert!(deny_loopback.resolve(name).await.is_err());
        let open = EgressResolver(Arc::new(Egress::default()));
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        assert!(open.resolve(name).await.unwrap().next().is_some());
    }
}
