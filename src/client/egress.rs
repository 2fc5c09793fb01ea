//! The egress policy: which destinations callout may connect to. Host names are checked before
//! DNS and every resolved address after it, in the connector, so the address checked is the
//! address dialled (DNS rebinding cannot slip past) and every redirect hop is checked too.
//!
//! Order of rules for an address: the operator's deny rules, then the operator's allow CIDRs
//! (which may open anything, metadata included), then the built-in denials (cloud metadata,
//! link-local, unspecified, multicast; loopback and private ranges unless private networks are
//! allowed), then, when allow rules exist, the requirement to match one of them.
use super::{
    host::{self, normalize as normalize_host},
    host_pattern::{HostPattern, HostPatternError},
};
use ipnet::IpNet;
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// One allow or deny rule: a host pattern (`*.corp.example`, `api.example.com:443`) or a CIDR
/// (`10.0.0.0/8`, `fd00::/8`, `203.0.113.7`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EgressRule {
    Host(HostPattern),
    Net(IpNet),
}

impl FromStr for EgressRule {
    type Err = HostPatternError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let raw = raw.trim();
        if let Ok(net) = raw.parse::<IpNet>() {
            return Ok(Self::Net(normalize_net(net.trunc())));
        }
        if let Ok(ip) = normalize_host(raw).parse::<IpAddr>() {
            return Ok(Self::Net(IpNet::from(normalize_ip(ip))));
        }
        raw.parse().map(Self::Host)
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Host(pattern) => write!(f, "{pattern}"),
            Self::Net(net) => write!(f, "{net}"),
        }
    }
}

/// The `[egress]` section: which destinations may be dialled. The default is safe: public
/// addresses only.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressSettings {
    /// Allow loopback and private ranges (127/8, ::1, 10/8, 172.16/12, 192.168/16, 100.64/10,
    /// fc00::/7). For development and tests. Default false.
    pub allow_private_networks: bool,
    /// When not empty, only destinations matching one of these are allowed. Default empty.
    pub allow: Vec<EgressRule>,
    /// Destinations always refused, before any allow rule. Default empty.
    pub deny: Vec<EgressRule>,
    /// When not empty, only these ports may be dialled. Default empty (any port).
    pub allowed_ports: Vec<u16>,
}

/// Why a destination was refused; `rule` names what matched, for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("egress policy denies {target}: {rule}")]
pub struct Denied {
    pub target: String,
    pub rule: String,
}

/// Host names of cloud metadata services, refused unless an allow rule names them.
const METADATA_HOSTS: [&str; 2] = ["metadata.google.internal", "metadata.goog"];

/// Denied whatever the settings, unless an allow CIDR covers them.
const ALWAYS_DENIED: [(&str, &str); 10] = [
    ("169.254.169.254/32", "cloud metadata address"),
    ("fd00:ec2::254/128", "cloud metadata address"),
    ("100.100.100.200/32", "cloud metadata address"),
    ("169.254.0.0/16", "link-local range"),
    ("fe80::/10", "link-local range"),
    ("0.0.0.0/8", "unspecified address"),
    ("::/128", "unspecified address"),
    ("224.0.0.0/4", "multicast range"),
    ("ff00::/8", "multicast range"),
    ("255.255.255.255/32", "broadcast address"),
];

/// Denied unless `allow_private_networks` (or an allow CIDR covers them).
const PRIVATE: [(&str, &str); 8] = [
    ("127.0.0.0/8", "loopback range"),
    ("::1/128", "loopback range"),
    ("10.0.0.0/8", "private range"),
    ("172.16.0.0/12", "private range"),
    ("192.168.0.0/16", "private range"),
    ("100.64.0.0/10", "shared address space (CGNAT)"),
    ("fc00::/7", "unique local range"),
    ("198.18.0.0/15", "benchmarking range"),
];

/// The policy every connection passes.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
    settings: EgressSettings,
    always_denied: Vec<(IpNet, &'static str)>,
    private: Vec<(IpNet, &'static str)>,
}

impl Default for EgressPolicy {
    fn default() -> Self {
        Self::new(EgressSettings::default())
    }
}

fn nets(table: &[(&str, &'static str)]) -> Vec<(IpNet, &'static str)> {
    // The tables are constants above; a typo there fails the unit tests, never a request.
    table.iter().filter_map(|(net, why)| net.parse().ok().map(|n| (n, *why))).collect()
}

impl EgressPolicy {
    pub fn new(settings: EgressSettings) -> Self {
        Self { settings, always_denied: nets(&ALWAYS_DENIED), private: nets(&PRIVATE) }
    }

    /// Checks a host name (lower case, no brackets) and port before any lookup.
    pub fn check_host(&self, host: &str, port: u16) -> Result<(), Denied> {
        let host = normalize_host(host);
        let deny = |rule: String| Err(Denied { target: format!("{host}:{port}"), rule });
        if !self.settings.allowed_ports.is_empty() && !self.settings.allowed_ports.contains(&port) {
            return deny(format!("port {port} is not in the allowed ports"));
        }
        if let Some(rule) = self.host_rule(&self.settings.deny, &host, port) {
            return deny(format!("deny rule {rule}"));
        }
        let allowed_by_name = self.host_rule(&self.settings.allow, &host, port).is_some();
        if METADATA_HOSTS.contains(&host.as_str()) && !allowed_by_name {
            return deny("cloud metadata host".into());
        }
        let loopback_name = host::is_within(&host, "localhost");
        if loopback_name && !self.settings.allow_private_networks && !allowed_by_name {
            return deny("loopback name (allow private networks to reach it)".into());
        }
        Ok(())
    }

    /// Checks one resolved address of `host`.
    pub fn check_ip(&self, host: &str, port: u16, ip: IpAddr) -> Result<(), Denied> {
        let host = normalize_host(host);
        let ip = normalize_ip(ip);
        let deny = |rule: String| Err(Denied { target: format!("{host}:{port} ({ip})"), rule });
        if let Some(rule) =
            self.settings.deny.iter().find(|r| matches!(r, EgressRule::Net(n) if n.contains(&ip)))
        {
            return deny(format!("deny rule {rule}"));
        }
        let allowed_net =
            self.settings.allow.iter().any(|r| matches!(r, EgressRule::Net(n) if n.contains(&ip)));
        if allowed_net {
            return Ok(());
        }
        if let Some((net, why)) = self.always_denied.iter().find(|(n, _)| n.contains(&ip)) {
            return deny(format!("{why} {net}"));
        }
        if !self.settings.allow_private_networks {
            if let Some((net, why)) = self.private.iter().find(|(n, _)| n.contains(&ip)) {
                return deny(format!("{why} {net} (allow private networks to reach it)"));
            }
        }
        if !self.settings.allow.is_empty() && self.host_rule(&self.settings.allow, &host, port).is_none() {
            return deny("not in the allow list".into());
        }
        Ok(())
    }

    fn host_rule<'a>(&self, rules: &'a [EgressRule], host: &str, port: u16) -> Option<&'a EgressRule> {
        rules.iter().find(|r| matches!(r, EgressRule::Host(p) if p.matches(host, port)))
    }
}

/// A network as the rules see it: IPv4 written in IPv6 (`::ffff:10.0.0.0/104`) is the IPv4
/// network it covers, since addresses are checked after `normalize_ip` and would otherwise
/// never match it.
fn normalize_net(net: IpNet) -> IpNet {
    let IpNet::V6(v6) = net else { return net };
    let prefix = v6.prefix_len();
    match (normalize_ip(IpAddr::V6(v6.network())), normalize_ip(IpAddr::V6(v6.broadcast()))) {
        (IpAddr::V4(first), IpAddr::V4(_)) if prefix >= 96 => {
            ipnet::Ipv4Net::new(first, prefix - 96).map(IpNet::V4).unwrap_or(net)
        }
        _ => net,
    }
}

/// An address as the rules see it: IPv4 carried in IPv6 (mapped `::ffff:a.b.c.d`, compatible
/// `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`) is checked as the IPv4 address it reaches.
pub fn normalize_ip(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let s = v6.segments();
    let embedded = || Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    // ::a.b.c.d (deprecated "compatible" form), but not :: or ::1 themselves.
    if s[..6] == [0; 6] && v6 != Ipv6Addr::UNSPECIFIED && v6 != Ipv6Addr::LOCALHOST {
        return IpAddr::V4(embedded());
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return IpAddr::V4(embedded());
    }
    ip
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn policy(settings: EgressSettings) -> EgressPolicy {
        EgressPolicy::new(settings)
    }

    #[test]
    fn the_tables_parse() {
        let p = EgressPolicy::default();
        assert_eq!(p.always_denied.len(), ALWAYS_DENIED.len());
        assert_eq!(p.private.len(), PRIVATE.len());
    }

    #[test]
    fn defaults_allow_public_and_deny_metadata_link_local_private_and_loopback() {
        let p = EgressPolicy::default();
        assert!(p.check_ip("example.com", 443, ip("93.184.216.34")).is_ok());
        assert!(p.check_ip("example.com", 443, ip("2606:2800:220:1::1")).is_ok());
        for (addr, why) in [
            ("169.254.169.254", "cloud metadata"),
            ("fd00:ec2::254", "cloud metadata"),
            ("169.254.1.1", "link-local"),
            ("fe80::1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("127.0.0.1", "loopback"),
            ("::1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.20.0.1", "private"),
            ("192.168.1.1", "private"),
            ("fd12::1", "unique local"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "cloud metadata"),
            ("::127.0.0.1", "loopback"),
            ("64:ff9b::a9fe:a9fe", "cloud metadata"),
        ] {
            let err = p.check_ip("h", 80, ip(addr)).unwrap_err();
            assert!(err.rule.contains(why), "{addr}: {err}");
        }
        let err = p.check_host("Metadata.Google.Internal.", 80).unwrap_err();
        assert_eq!(err.to_string(), "egress policy denies metadata.google.internal:80: cloud metadata host");
        assert!(p.check_host("localhost", 80).is_err());
        // Found by the egress_addr fuzz target: a bracket between trailing dots made the name
        // normalise differently the second time.
        let odd = "metadata.goog...]....";
        assert_eq!(normalize_host(odd), normalize_host(&normalize_host(odd)));
        assert!(p.check_host(odd, 80).is_err());
    }

    #[test]
    fn private_networks_open_with_one_setting_but_metadata_stays_closed() {
        let p = policy(EgressSettings { allow_private_networks: true, ..Default::default() });
        assert!(p.check_ip("h", 80, ip("127.0.0.1")).is_ok());
        assert!(p.check_ip("h", 80, ip("10.0.0.1")).is_ok());
        assert!(p.check_host("localhost", 80).is_ok());
        assert!(p.check_ip("h", 80, ip("169.254.169.254")).is_err());
    }

    #[test]
    fn operator_rules_deny_first_and_allow_lists_restrict() {
        let p = policy(EgressSettings {
            allow: vec![
                "*.corp.test".parse().unwrap(),
                "203.0.113.0/24".parse().unwrap(),
                "169.254.169.254".parse().unwrap(),
            ],
            deny: vec!["bad.corp.test".parse().unwrap(), "203.0.113.66".parse().unwrap()],
            allowed_ports: vec![443, 8443],
            ..Default::default()
        });
        assert!(p.check_host("api.corp.test", 443).is_ok());
        assert!(p.check_host("api.corp.test", 80).unwrap_err().rule.contains("port 80"));
        assert!(p.check_host("bad.corp.test", 443).unwrap_err().rule.contains("deny rule bad.corp.test"));
        assert!(p.check_ip("api.corp.test", 443, ip("198.51.100.1")).is_ok(), "allowed by name");
        assert!(p.check_ip("other.test", 443, ip("198.51.100.1")).unwrap_err().rule.contains("allow list"));
        assert!(p.check_ip("other.test", 443, ip("203.0.113.5")).is_ok(), "allowed by CIDR");
        assert!(p.check_ip("other.test", 443, ip("203.0.113.66")).unwrap_err().rule.contains("deny rule"));
        assert!(p.check_ip("x", 443, ip("169.254.169.254")).is_ok(), "an explicit allow opens metadata");
        // A name allowed by pattern does not open private ranges it resolves to.
        assert!(p.check_ip("api.corp.test", 443, ip("10.0.0.1")).is_err());
    }

    #[test]
    fn rules_parse_hosts_cidrs_and_bare_addresses() {
        assert_eq!("10.0.0.0/8".parse::<EgressRule>().unwrap().to_string(), "10.0.0.0/8");
        assert_eq!("10.1.2.3/8".parse::<EgressRule>().unwrap().to_string(), "10.0.0.0/8");
        assert_eq!("[::1]".parse::<EgressRule>().unwrap().to_string(), "::1/128");
        assert_eq!("::ffff:10.0.0.1".parse::<EgressRule>().unwrap().to_string(), "10.0.0.1/32");
        // Found writing the egress_addr fuzz target (seed fuzz/seeds/egress_addr/mapped_cidr):
        // an IPv4-mapped CIDR never matched.
        assert_eq!("::ffff:10.0.0.0/104".parse::<EgressRule>().unwrap().to_string(), "10.0.0.0/8");
        assert_eq!("64:ff9b::a9fe:a9fe/128".parse::<EgressRule>().unwrap().to_string(), "169.254.169.254/32");
        assert_eq!("::1/128".parse::<EgressRule>().unwrap().to_string(), "::1/128");
        assert_eq!("::ffff:0:0/95".parse::<EgressRule>().unwrap().to_string(), "::fffe:0:0/95");
        let p = policy(EgressSettings {
            allow_private_networks: true,
            deny: vec!["::ffff:10.0.0.0/104".parse().unwrap()],
            ..Default::default()
        });
        assert!(p.check_ip("h", 80, ip("10.1.2.3")).is_err());
        assert!(p.check_ip("h", 80, ip("::ffff:10.1.2.3")).is_err());
        assert!(p.check_ip("h", 80, ip("192.168.1.1")).is_ok());
        assert!(matches!("*.example.com".parse::<EgressRule>().unwrap(), EgressRule::Host(_)));
        assert!("a.*.com".parse::<EgressRule>().is_err());
    }
}
