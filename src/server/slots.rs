//! Open connections, counted per source address and in all, so one address can
//! hold at most its share of the listener and never all of it.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

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

    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Full> {
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
}
