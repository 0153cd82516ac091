//! What a worker lets tasks do: which executors it offers (`worker_executors`; `shell` and
//! `http` only when named), and where the `http` executor may connect
//! (`http_executor_allow`). A task's input comes from whoever may submit workflows; the worker
//! decides what that input can reach.
//!
//! The `http` allow-list holds, comma-separated: `public` (any public address), a host name
//! (exact, any address it resolves to), an address (`10.0.0.7`, `::1`) or a network in CIDR
//! notation (`10.0.0.0/8`, `fd00::/8`). Loopback, private, link-local, shared (CGNAT),
//! unspecified, multicast and broadcast addresses are reachable only through an entry naming
//! them (a host name, an address or a network), never through `public`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The executors `omoi worker` can offer.
pub const BUILTIN_EXECUTORS: &[&str] = &["echo", "sleep", "sim", "shell", "http"];
/// What a worker offers unless told otherwise: nothing that runs commands or makes requests.
pub const DEFAULT_EXECUTORS: &str = "echo,sleep,sim";
/// Where the `http` executor may connect unless told otherwise.
pub const DEFAULT_HTTP_ALLOW: &str = "public";

/// Parses `worker_executors`: known builtin names, comma-separated, at least one.
pub fn parse_executors(list: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if !BUILTIN_EXECUTORS.contains(&name) {
            return Err(format!(
                "unknown executor `{}`; omoi worker offers {}",
                crate::domain::text::bounded(name, 64),
                BUILTIN_EXECUTORS.join(", ")
            ));
        }
        if !out.iter().any(|n| n == name) {
            out.push(name.to_string());
        }
    }
    if out.is_empty() {
        return Err("name at least one executor".into());
    }
    out.sort();
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Public,
    Host(String),
    Net { addr: IpAddr, prefix: u8 },
}

/// Where the `http` executor may connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAllow {
    entries: Vec<Entry>,
}

impl Default for HttpAllow {
    fn default() -> Self {
        Self {
            entries: vec![Entry::Public],
        }
    }
}

impl HttpAllow {
    /// Parses `http_executor_allow` (see the module documentation). Empty allows nothing.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        for raw in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let entry = if raw == "public" {
                Entry::Public
            } else if let Some((addr, prefix)) = raw.split_once('/') {
                let addr: IpAddr = addr
                    .parse()
                    .map_err(|_| format!("`{raw}` is not a network (address/prefix)"))?;
                let max = if addr.is_ipv4() { 32 } else { 128 };
                let prefix: u8 = prefix
                    .parse()
                    .ok()
                    .filter(|p| *p <= max)
                    .ok_or_else(|| format!("`{raw}`: the prefix must be 0 to {max}"))?;
                Entry::Net { addr, prefix }
            } else if let Ok(addr) = raw.parse::<IpAddr>() {
                let prefix = if addr.is_ipv4() { 32 } else { 128 };
                Entry::Net { addr, prefix }
            } else if raw
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                Entry::Host(raw.to_ascii_lowercase())
            } else {
                return Err(format!(
                    "`{}` is neither `public`, a host name, an address nor a network",
                    crate::domain::text::bounded(raw, 64)
                ));
            };
            entries.push(entry);
        }
        Ok(Self { entries })
    }

    /// Whether a request to `host` may go to `ip` (one of the addresses `host` resolved to).
    pub fn permits(&self, host: &str, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.entries.iter().any(|e| match e {
            Entry::Public => is_public(ip),
            Entry::Host(h) => host.eq_ignore_ascii_case(h),
            Entry::Net { addr, prefix } => in_network(ip, canonical(*addr), *prefix),
        })
    }
}

/// An IPv4 address written as IPv6 (`::ffff:127.0.0.1`) is that IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn in_network(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// A globally routable unicast address: none of loopback, private, link-local, shared
/// (100.64/10), unspecified, broadcast, multicast, documentation, or IPv6 unique-local.
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (first & 0xffc0) == 0xfe80 // link-local fe80::/10
        || first == 0x2001 && ip.segments()[1] == 0x0db8) // documentation
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn public_means_public_and_nothing_private_loopback_or_link_local() {
        let allow = HttpAllow::default();
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!allow.permits("h", ip(private)), "{private}");
        }
        for public in ["93.184.216.34", "1.1.1.1", "2606:4700::1111"] {
            assert!(allow.permits("h", ip(public)), "{public}");
        }
    }

    #[test]
    fn entries_name_hosts_addresses_and_networks() {
        let allow = HttpAllow::parse("127.0.0.1, 10.0.0.0/8, hooks.internal").unwrap();
        assert!(allow.permits("x", ip("127.0.0.1")));
        assert!(allow.permits("x", ip("::ffff:127.0.0.1")));
        assert!(!allow.permits("x", ip("127.0.0.2")));
        assert!(allow.permits("x", ip("10.200.0.1")));
        assert!(!allow.permits("x", ip("11.0.0.1")), "public is not listed");
        assert!(allow.permits("Hooks.Internal", ip("192.168.0.9")));
        assert!(HttpAllow::parse("").unwrap().entries.is_empty());
        assert!(HttpAllow::parse("10.0.0.0/33").is_err());
        assert!(HttpAllow::parse("not a host!").is_err());
    }

    #[test]
    fn executor_lists_name_known_executors() {
        assert_eq!(
            parse_executors("shell, echo,echo").unwrap(),
            vec!["echo", "shell"]
        );
        assert!(parse_executors("echo,rm-rf").is_err());
        assert!(parse_executors(" , ").is_err());
        assert_eq!(
            parse_executors(DEFAULT_EXECUTORS).unwrap(),
            vec!["echo", "sim", "sleep"]
        );
    }
}
