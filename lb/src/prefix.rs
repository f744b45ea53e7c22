//! IP prefixes (`192.0.2.0/24`, `2001:db8::/32`, or a bare address) and the client "network"
//! an address belongs to, as access lists and response rate limiting see clients.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// An address prefix: the network bits of `addr`, `len` of them.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl Prefix {
    /// The prefix of `len` bits containing `ip` (host bits cleared; at most the address's
    /// length). An IPv4 address in IPv6 form (`::ffff:a.b.c.d`, from a dual-stack socket) is
    /// taken as the IPv4 address.
    pub fn of(ip: IpAddr, len: u8) -> Prefix {
        let ip = canonical(ip);
        let len = len.min(max_len(&ip));
        Prefix {
            addr: mask(ip, len),
            len,
        }
    }

    /// The client network `ip` belongs to: its first `ipv4_len` bits for an IPv4 address
    /// (including one in IPv6 form, from a dual-stack socket), its first `ipv6_len` bits for
    /// an IPv6 address. How rate limiting and the TCP connection limit count clients.
    pub fn network(ip: IpAddr, ipv4_len: u8, ipv6_len: u8) -> Prefix {
        let ip = canonical(ip);
        let len = if ip.is_ipv4() { ipv4_len } else { ipv6_len };
        Prefix::of(ip, len)
    }

    /// True if `ip` is in this prefix. An IPv4 address in IPv6 form (`::ffff:a.b.c.d`) counts
    /// as the IPv4 address.
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }

    pub fn len(&self) -> u8 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The network bits as (high, low) 64-bit halves, and whether it is IPv4 (in `low`).
    pub fn bits(&self) -> (u64, u64, bool) {
        match self.addr {
            IpAddr::V4(a) => (0, u64::from(u32::from(a)), true),
            IpAddr::V6(a) => {
                let b = u128::from(a);
                ((b >> 64) as u64, b as u64, false)
            }
        }
    }

    /// A 128-bit key for hashing: the network bits, with the family and length mixed in.
    #[inline]
    pub fn key(&self) -> u128 {
        let bits = match self.addr {
            IpAddr::V4(a) => u128::from(u32::from(a)) | (1u128 << 127),
            IpAddr::V6(a) => u128::from(a),
        };
        bits ^ u128::from(self.len)
    }
}

/// True if any prefix of `list` contains `ip`.
#[inline]
pub fn any_contains(list: &[Prefix], ip: IpAddr) -> bool {
    list.iter().any(|p| p.contains(ip))
}

fn max_len(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// An IPv4 address in IPv6 form (`::ffff:a.b.c.d`) as the IPv4 address; others unchanged.
#[inline]
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn mask(ip: IpAddr, len: u8) -> IpAddr {
    match canonical(ip) {
        IpAddr::V4(a) => {
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len.min(32)))
            };
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len.min(128)))
            };
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

impl FromStr for Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Prefix, String> {
        let t = s.trim();
        let (ip, len) = match t.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (t, None),
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("`{s}` is not an address or prefix (e.g. 192.0.2.0/24)"))?;
        let ip = canonical(ip);
        let max = max_len(&ip);
        let len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0..={max}"))?,
        };
        Ok(Prefix::of(ip, len))
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl fmt::Debug for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Prefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_matches() {
        let p: Prefix = "192.0.2.77/24".parse().unwrap();
        assert_eq!(p.to_string(), "192.0.2.0/24");
        assert!(p.contains(ip("192.0.2.1")) && !p.contains(ip("192.0.3.1")));
        assert!(p.contains(ip("::ffff:192.0.2.9")), "v4-mapped counts as v4");
        assert!(!p.contains(ip("2001:db8::1")));
        let host: Prefix = "2001:db8::1".parse().unwrap();
        assert_eq!(host.len(), 128);
        assert!(host.contains(ip("2001:db8::1")) && !host.contains(ip("2001:db8::2")));
        let all: Prefix = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.1")));
        assert!("10.0.0.0/33".parse::<Prefix>().is_err());
        assert!("nonsense".parse::<Prefix>().is_err());
        let a = Prefix::of(ip("2001:db8:1:203::1"), 56);
        assert_eq!(a, Prefix::of(ip("2001:db8:1:2ff::9"), 56));
        assert_ne!(a.key(), Prefix::of(ip("2001:db8:1:300::"), 56).key());
        assert_ne!(
            Prefix::of(ip("10.0.0.0"), 8).key(),
            Prefix::of(ip("10.0.0.0"), 16).key()
        );
    }

    #[test]
    fn network_takes_the_length_of_the_family() {
        assert_eq!(
            Prefix::network(ip("192.0.2.77"), 24, 56).to_string(),
            "192.0.2.0/24"
        );
        assert_eq!(
            Prefix::network(ip("::ffff:192.0.2.77"), 24, 56).to_string(),
            "192.0.2.0/24"
        );
        assert_eq!(
            Prefix::network(ip("2001:db8:1:2ff::9"), 24, 56).to_string(),
            "2001:db8:1:200::/56"
        );
    }

    #[test]
    fn a_v4_mapped_address_is_taken_as_ipv4() {
        // A client on a dual-stack socket with an IPv6 prefix length: the IPv4 network, not a
        // shift past 32 bits.
        let p = Prefix::of(ip("::ffff:192.0.2.77"), 56);
        assert_eq!(p, Prefix::of(ip("192.0.2.77"), 32));
        assert_eq!(p.to_string(), "192.0.2.77/32");
        assert_eq!(
            Prefix::of(ip("::ffff:192.0.2.77"), 24).to_string(),
            "192.0.2.0/24"
        );
    }
}
