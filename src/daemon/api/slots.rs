//! Open connections, counted per source address and in all, so one address can
//! hold at most its share of the listener and never all of it.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The key a source address is counted under: an IPv4 address as it is (also
/// when it arrives IPv4-mapped), an IPv6 address by its /64, the block one host
/// is given, so a single client cannot take a share per address it can pick.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[derive(Debug)]
pub struct ConnectionSlots {
    total: usize,
    per_address: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// This address already holds its share.
    Address,
    /// The listener holds as many connections as it serves.
    Total,
}

impl Full {
    pub fn label(self) -> &'static str {
        match self {
            Full::Address => "address",
            Full::Total => "total",
        }
    }
}

/// One open connection; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<ConnectionSlots>,
    ip: IpAddr,
}

impl ConnectionSlots {
    /// `per_address` is clamped to `total`.
    pub fn new(total: usize, per_address: usize) -> Arc<Self> {
        let total = total.max(1);
        Arc::new(Self {
            total,
            per_address: per_address.clamp(1, total),
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// Takes a slot for a connection from `ip` (counted under [`client_key`]).
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Full> {
        let ip = client_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (all, by_ip) = &mut *open;
        let mine = by_ip.get(&ip).copied().unwrap_or(0);
        if mine >= self.per_address {
            return Err(Full::Address);
        }
        if *all >= self.total {
            return Err(Full::Total);
        }
        *all += 1;
        by_ip.insert(ip, mine + 1);
        Ok(Slot {
            slots: self.clone(),
            ip,
        })
    }

    /// Connections open now (in all, from `ip`).
    pub fn open(&self, ip: IpAddr) -> (usize, usize) {
        let ip = client_key(ip);
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        (open.0, open.1.get(&ip).copied().unwrap_or(0))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        let (all, by_ip) = &mut *open;
        *all = all.saturating_sub(1);
        if let Some(n) = by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                by_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_gets_its_share_and_slots_come_back() {
        let s = ConnectionSlots::new(4, 2);
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "127.0.0.1".parse().unwrap(),
            "127.0.0.2".parse().unwrap(),
            "127.0.0.3".parse().unwrap(),
        );
        let a1 = s.try_acquire(a).unwrap();
        let _a2 = s.try_acquire(a).unwrap();
        assert_eq!(s.try_acquire(a).unwrap_err(), Full::Address);
        let _b1 = s.try_acquire(b).unwrap();
        let _b2 = s.try_acquire(b).unwrap();
        assert_eq!(s.try_acquire(c).unwrap_err(), Full::Total);
        drop(a1);
        assert_eq!(s.open(a), (3, 1));
        let _c1 = s.try_acquire(c).unwrap();
        assert_eq!(s.try_acquire(a).unwrap_err(), Full::Total);
    }

    #[test]
    fn an_ipv6_host_is_one_client_across_its_64() {
        let s = ConnectionSlots::new(100, 2);
        let ip = |t: &str| t.parse::<IpAddr>().unwrap();
        let _x = s.try_acquire(ip("2001:db8:1:2::1")).unwrap();
        let _y = s.try_acquire(ip("2001:db8:1:2:ffff::9")).unwrap();
        assert_eq!(
            s.try_acquire(ip("2001:db8:1:2:abcd::1")).unwrap_err(),
            Full::Address
        );
        let _z = s.try_acquire(ip("2001:db8:1:3::1")).unwrap();
        // IPv4-mapped is the IPv4 address.
        let _v4 = s.try_acquire(ip("192.0.2.7")).unwrap();
        let _m = s.try_acquire(ip("::ffff:192.0.2.7")).unwrap();
        assert_eq!(s.try_acquire(ip("192.0.2.7")).unwrap_err(), Full::Address);
        assert_eq!(client_key(ip("127.0.0.2")), ip("127.0.0.2"));
    }
}
