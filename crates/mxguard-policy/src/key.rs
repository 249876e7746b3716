//! Client keys: a client's address and the prefixes it shares with its
//! neighbours, in one small hashable value.
//!
//! A botnet spreads its connections over many addresses of the same
//! networks, so limits apply per address and per prefix: IPv4 /24, IPv6
//! /64 (one customer's LAN) and /48 (one site) by default. An IPv4-mapped
//! IPv6 address (`::ffff:192.0.2.1`, what a dual-stack socket reports for
//! an IPv4 client) is the IPv4 client it maps, so a client cannot escape
//! its IPv4 limits by arriving on the other listener.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::Error;

/// The address family of a key or prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Family {
    #[serde(rename = "ipv4")]
    V4,
    #[serde(rename = "ipv6")]
    V6,
}

impl Family {
    pub const fn bits(self) -> u8 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }

    pub const fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        })
    }
}

/// The address itself, with an IPv4-mapped IPv6 address turned into the
/// IPv4 address it carries.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_canonical(),
        v4 => v4,
    }
}

/// A prefix with IPv4-mapped IPv6 ranges (`::ffff:0:0/96` and longer)
/// written as the IPv4 prefix they cover, and host bits cleared.
pub fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if v6.prefix_len() >= 96 {
            if let Some(v4) = v6.addr().to_ipv4_mapped() {
                if let Ok(n) = IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96) {
                    return n.trunc();
                }
            }
        }
    }
    net.trunc()
}

/// A prefix length for one family, checked against the family's width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrefixLength {
    family: Family,
    len: u8,
}

impl PrefixLength {
    /// IPv4 /24, IPv6 /64, IPv6 /48: a subscriber's network on either
    /// family and a site's allocation on IPv6.
    pub const DEFAULTS: [PrefixLength; 3] = [
        PrefixLength {
            family: Family::V4,
            len: 24,
        },
        PrefixLength {
            family: Family::V6,
            len: 64,
        },
        PrefixLength {
            family: Family::V6,
            len: 48,
        },
    ];

    pub fn new(family: Family, len: u8) -> Result<Self, Error> {
        if len > family.bits() {
            return Err(Error::invalid(
                "prefix length",
                format!("/{len} is longer than an {family} address"),
            ));
        }
        Ok(Self { family, len })
    }

    pub fn v4(len: u8) -> Result<Self, Error> {
        Self::new(Family::V4, len)
    }

    pub fn v6(len: u8) -> Result<Self, Error> {
        Self::new(Family::V6, len)
    }

    pub const fn family(self) -> Family {
        self.family
    }

    /// The length in bits.
    pub const fn bits(self) -> u8 {
        self.len
    }

    /// Whether this is the whole address (/32 or /128).
    pub const fn is_full(self) -> bool {
        self.len == self.family.bits()
    }
}

impl fmt::Display for PrefixLength {
    /// `ipv4/24`, `ipv6/64`: short, and a bounded set fit for a metric
    /// label.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.family, self.len)
    }
}

/// An address or a prefix of one, as the key of a per-client table.
///
/// 18 bytes, no heap: the octets (IPv4 in the first four), the prefix
/// length and the family. Host bits are always zero, so two addresses of
/// one /24 give equal /24 keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientKey {
    octets: [u8; 16],
    len: u8,
    family: Family,
}

impl ClientKey {
    /// The key of the address itself (/32 or /128), IPv4-mapped addresses
    /// as IPv4.
    pub fn address(ip: IpAddr) -> Self {
        match canonical_ip(ip) {
            IpAddr::V4(v4) => Self::v4(v4, 32),
            IpAddr::V6(v6) => Self::v6(v6, 128),
        }
    }

    /// The key of the prefix of `ip` of `length`, or `None` when `ip` is
    /// of the other family (after unmapping).
    pub fn prefix(ip: IpAddr, length: PrefixLength) -> Option<Self> {
        match (canonical_ip(ip), length.family) {
            (IpAddr::V4(v4), Family::V4) => Some(Self::v4(v4, length.len)),
            (IpAddr::V6(v6), Family::V6) => Some(Self::v6(v6, length.len)),
            _ => None,
        }
    }

    /// The key of a prefix (IPv4-mapped ranges as IPv4).
    pub fn from_net(net: IpNet) -> Self {
        match canonical_net(net) {
            IpNet::V4(n) => Self::v4(n.network(), n.prefix_len()),
            IpNet::V6(n) => Self::v6(n.network(), n.prefix_len()),
        }
    }

    fn v4(addr: Ipv4Addr, len: u8) -> Self {
        let masked = u32::from(addr) & mask_u32(len);
        let mut octets = [0; 16];
        octets[..4].copy_from_slice(&masked.to_be_bytes());
        Self {
            octets,
            len,
            family: Family::V4,
        }
    }

    fn v6(addr: Ipv6Addr, len: u8) -> Self {
        let masked = u128::from(addr) & mask_u128(len);
        Self {
            octets: masked.to_be_bytes(),
            len,
            family: Family::V6,
        }
    }

    pub fn family(&self) -> Family {
        self.family
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether the key is a whole address rather than a prefix.
    pub fn is_address(&self) -> bool {
        self.len == self.family.bits()
    }

    /// The first address of the key's range.
    pub fn network(&self) -> IpAddr {
        match self.family {
            Family::V4 => IpAddr::V4(Ipv4Addr::new(
                self.octets[0],
                self.octets[1],
                self.octets[2],
                self.octets[3],
            )),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(self.octets)),
        }
    }

    pub fn to_net(&self) -> IpNet {
        // The length never exceeds the family's width (every constructor
        // checks or derives it), so `new` cannot fail; the fallback keeps
        // the code free of a panic path all the same.
        IpNet::new(self.network(), self.len).unwrap_or_else(|_| IpNet::from(self.network()))
    }
}

/// The keys a client is counted under: its address, then its prefixes of
/// the lengths given that match its family, in the order given.
pub fn client_keys(ip: IpAddr, lengths: &[PrefixLength]) -> impl Iterator<Item = ClientKey> + '_ {
    std::iter::once(ClientKey::address(ip)).chain(
        lengths
            .iter()
            .filter_map(move |l| ClientKey::prefix(ip, *l)),
    )
}

pub(crate) fn mask_u32(len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0)
}

pub(crate) fn mask_u128(len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(len.min(128)))
        .unwrap_or(0)
}

impl From<IpAddr> for ClientKey {
    fn from(ip: IpAddr) -> Self {
        Self::address(ip)
    }
}

impl fmt::Display for ClientKey {
    /// A bare address for an address key, CIDR for a prefix:
    /// `192.0.2.7`, `192.0.2.0/24`, `2001:db8::/48`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_address() {
            write!(f, "{}", self.network())
        } else {
            write!(f, "{}/{}", self.network(), self.len)
        }
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientKey({self})")
    }
}

impl FromStr for ClientKey {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Self::address(ip));
        }
        s.parse::<IpNet>()
            .map(Self::from_net)
            .map_err(|_| Error::invalid("client key", format!("`{s}` is not an address or prefix")))
    }
}

impl Serialize for ClientKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ClientKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn neighbours_share_the_prefix_key_but_not_the_address_key() {
        let v4_24 = PrefixLength::v4(24).unwrap();
        let a = ClientKey::prefix(ip("192.0.2.7"), v4_24).unwrap();
        let b = ClientKey::prefix(ip("192.0.2.200"), v4_24).unwrap();
        let c = ClientKey::prefix(ip("192.0.3.7"), v4_24).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(
            ClientKey::address(ip("192.0.2.7")),
            ClientKey::address(ip("192.0.2.200"))
        );
        assert_eq!(a.to_string(), "192.0.2.0/24");
        assert_eq!(a.network(), ip("192.0.2.0"));
    }

    #[test]
    fn ipv6_keys_at_64_and_48() {
        let keys: Vec<String> = client_keys(ip("2001:db8:1:2:3:4:5:6"), &PrefixLength::DEFAULTS)
            .map(|k| k.to_string())
            .collect();
        assert_eq!(
            keys,
            [
                "2001:db8:1:2:3:4:5:6",
                "2001:db8:1:2::/64",
                "2001:db8:1::/48"
            ]
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_is_the_ipv4_client() {
        let mapped = ip("::ffff:192.0.2.7");
        assert_eq!(
            ClientKey::address(mapped),
            ClientKey::address(ip("192.0.2.7"))
        );
        let keys: Vec<String> = client_keys(mapped, &PrefixLength::DEFAULTS)
            .map(|k| k.to_string())
            .collect();
        assert_eq!(keys, ["192.0.2.7", "192.0.2.0/24"]);
        assert_eq!(ClientKey::address(mapped).family(), Family::V4);
        // A mapped prefix is the IPv4 prefix it covers.
        assert_eq!(
            canonical_net("::ffff:192.0.2.0/120".parse().unwrap()).to_string(),
            "192.0.2.0/24"
        );
        // IPv4-compatible (deprecated, `::a.b.c.d`) is not mapped: it stays IPv6.
        assert_eq!(ClientKey::address(ip("::192.0.2.7")).family(), Family::V6);
    }

    #[test]
    fn lengths_are_checked_against_the_family() {
        assert!(PrefixLength::v4(33).is_err());
        assert!(PrefixLength::v6(129).is_err());
        assert!(PrefixLength::v4(0).is_ok());
        assert!(PrefixLength::v6(128).unwrap().is_full());
        assert_eq!(PrefixLength::v6(64).unwrap().to_string(), "ipv6/64");
        // A length of the other family yields no key.
        assert!(ClientKey::prefix(ip("192.0.2.1"), PrefixLength::v6(64).unwrap()).is_none());
    }

    #[test]
    fn zero_length_prefixes_cover_everything() {
        let all = PrefixLength::v4(0).unwrap();
        assert_eq!(
            ClientKey::prefix(ip("203.0.113.9"), all),
            ClientKey::prefix(ip("192.0.2.1"), all)
        );
        assert_eq!(
            ClientKey::prefix(ip("203.0.113.9"), all)
                .unwrap()
                .to_string(),
            "0.0.0.0/0"
        );
    }

    #[test]
    fn keys_are_small_and_round_trip_as_text() {
        assert_eq!(std::mem::size_of::<ClientKey>(), 18);
        for s in ["192.0.2.7", "192.0.2.0/24", "2001:db8::/48", "2001:db8::1"] {
            let key: ClientKey = s.parse().unwrap();
            assert_eq!(key.to_string(), s);
            let json = serde_json::to_string(&key).unwrap();
            assert_eq!(serde_json::from_str::<ClientKey>(&json).unwrap(), key);
        }
        // Host bits of a prefix are cleared.
        assert_eq!(
            "192.0.2.77/24".parse::<ClientKey>().unwrap().to_string(),
            "192.0.2.0/24"
        );
        assert!("not-an-ip".parse::<ClientKey>().is_err());
    }
}
