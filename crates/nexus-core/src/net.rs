//! Networks: parsing allowlists from settings, matching callers against them.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::ConfigError;

/// Parses a comma-separated list of networks (`10.0.0.0/8`, or a single
/// address) for the variable `var`.
///
/// ```
/// let nets = nexus_core::net::parse_cidrs("ALLOWED_CIDRS", "10.0.0.0/8, ::1").unwrap();
/// assert!(nexus_core::net::ip_allowed(&nets, "10.1.2.3".parse().unwrap()));
/// assert!(nexus_core::net::parse_cidrs("ALLOWED_CIDRS", "nope").is_err());
/// ```
pub fn parse_cidrs(var: &'static str, value: &str) -> Result<Vec<IpNet>, ConfigError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse::<IpNet>()
                .or_else(|_| c.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    ConfigError::new(var, format!("'{c}' is not a CIDR such as 10.0.0.0/8"))
                })
        })
        .collect()
}

/// Whether `ip` is in one of `cidrs`. An IPv4 client on a dual-stack socket
/// shows up as `::ffff:a.b.c.d` and is matched as IPv4.
pub fn ip_allowed(cidrs: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(Into::into).unwrap_or(ip),
        v4 => v4,
    };
    cidrs.iter().any(|net| net.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_ipv4_matches_ipv4_networks() {
        let nets = parse_cidrs("X", "127.0.0.0/8").unwrap();
        assert!(ip_allowed(&nets, "::ffff:127.0.0.1".parse().unwrap()));
        assert!(!ip_allowed(&nets, "::1".parse().unwrap()));
        let e = parse_cidrs("X", "10.0.0.0/8, nope")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("X:") && e.contains("nope"), "{e}");
    }
}
