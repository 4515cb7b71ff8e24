//! Connections that have not finished their TLS handshake: anyone who can open
//! a TCP connection can make one, so they get a pool of their own, bounded per
//! source address and in all, apart from the connections that completed
//! (mutual) TLS. A full pool never turns the newcomer away: it closes the
//! pending connection that has gone longest without sending a byte (one that
//! never started TLS before one that stalled in it). A flood of idle or stalled
//! connections thus only ever displaces itself, also when it comes from the
//! address of a real client, whose handshake is short and keeps sending.
use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::client_key;

/// Why a pending connection was closed before it finished its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Displaced {
    /// Its address held its share of pending handshakes.
    Address,
    /// The pool held as many pending handshakes as it allows.
    Total,
}

impl Displaced {
    pub fn label(self) -> &'static str {
        match self {
            Displaced::Address => "address",
            Displaced::Total => "total",
        }
    }
}

#[derive(Debug)]
struct Entry {
    ip: IpAddr,
    /// Nanoseconds since the pool's epoch at accept, and of the last byte
    /// received (0: none yet).
    accepted: u64,
    progress: Arc<AtomicU64>,
    /// Dropped to close the connection.
    _close: oneshot::Sender<()>,
}

#[derive(Debug, Default)]
struct Pending {
    next: u64,
    entries: HashMap<u64, Entry>,
    by_ip: HashMap<IpAddr, usize>,
}

impl Pending {
    fn remove(&mut self, id: u64) -> bool {
        let Some(e) = self.entries.remove(&id) else {
            return false;
        };
        if let Some(n) = self.by_ip.get_mut(&e.ip) {
            *n -= 1;
            if *n == 0 {
                self.by_ip.remove(&e.ip);
            }
        }
        true
    }

    /// The entry to close for a newcomer: the one (of `ip`, or of all) that
    /// has gone longest without sending anything, silent ones first.
    fn victim(&self, ip: Option<IpAddr>) -> Option<u64> {
        self.entries
            .iter()
            .filter(|(_, e)| ip.is_none_or(|ip| e.ip == ip))
            .min_by_key(|(_, e)| match e.progress.load(Ordering::Relaxed) {
                0 => (false, e.accepted),
                last => (true, last),
            })
            .map(|(id, _)| *id)
    }
}

/// The pool of pending handshakes of one listener.
#[derive(Debug)]
pub struct Handshakes {
    total: usize,
    per_address: usize,
    deadline: Duration,
    epoch: Instant,
    pending: Mutex<Pending>,
}

/// A place in the pool; leaving it (drop) frees it.
#[derive(Debug)]
pub struct Ticket {
    pool: Arc<Handshakes>,
    id: u64,
    progress: Arc<AtomicU64>,
    closed: oneshot::Receiver<()>,
}

/// Why a handshake did not complete.
#[derive(Debug)]
pub enum Failed {
    /// Another connection took its place.
    Displaced,
    /// It was not done within the deadline.
    Late,
    /// TLS refused it (no or a wrong client certificate, not TLS at all).
    Tls(io::Error),
}

impl Handshakes {
    /// `per_address` is clamped to `total`; `deadline` bounds one handshake.
    pub fn new(total: usize, per_address: usize, deadline: Duration) -> Arc<Self> {
        let total = total.max(1);
        Arc::new(Self {
            total,
            per_address: per_address.clamp(1, total),
            deadline,
            epoch: Instant::now(),
            pending: Mutex::new(Pending::default()),
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Takes a place for a connection from `ip` (counted under [`client_key`]),
    /// closing another pending connection when the address or the pool is
    /// full. `sent` says the connection already has bytes waiting to be read.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, sent: bool) -> (Ticket, Option<Displaced>) {
        let ip = client_key(ip);
        let now = self.now();
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let displaced = if p.by_ip.get(&ip).copied().unwrap_or(0) >= self.per_address {
            Some((p.victim(Some(ip)), Displaced::Address))
        } else if p.entries.len() >= self.total {
            Some((p.victim(None), Displaced::Total))
        } else {
            None
        };
        if let Some((Some(id), _)) = displaced {
            p.remove(id);
        }
        let (close, closed) = oneshot::channel();
        let progress = Arc::new(AtomicU64::new(if sent { now } else { 0 }));
        let id = p.next;
        p.next += 1;
        p.entries.insert(
            id,
            Entry {
                ip,
                accepted: now,
                progress: progress.clone(),
                _close: close,
            },
        );
        *p.by_ip.entry(ip).or_default() += 1;
        let ticket = Ticket {
            pool: self.clone(),
            id,
            progress,
            closed,
        };
        (ticket, displaced.map(|(_, why)| why))
    }

    /// Pending handshakes now, in all and from `ip`.
    pub fn pending(&self, ip: IpAddr) -> (usize, usize) {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        (
            p.entries.len(),
            p.by_ip.get(&client_key(ip)).copied().unwrap_or(0),
        )
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut p = self.pool.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.remove(self.id);
    }
}

impl Ticket {
    /// Runs the TLS handshake on `tcp` within the pool's deadline, unless the
    /// connection is displaced first; the place is freed either way.
    pub async fn handshake(
        mut self,
        acceptor: &tokio_rustls::TlsAcceptor,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::server::TlsStream<Watched>, Failed> {
        let watched = Watched {
            inner: tcp,
            progress: self.progress.clone(),
            pool: self.pool.clone(),
        };
        let deadline = self.pool.deadline;
        tokio::select! {
            _ = &mut self.closed => Err(Failed::Displaced),
            r = tokio::time::timeout(deadline, acceptor.accept(watched)) => match r {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(Failed::Tls(e)),
                Err(_) => Err(Failed::Late),
            },
        }
    }
}

/// Whether bytes are already waiting on a just-accepted connection (a real
/// client sends its ClientHello at once), without reading them.
pub fn has_sent(tcp: TcpStream) -> io::Result<(TcpStream, bool)> {
    let std = tcp.into_std()?;
    let mut b = [0u8; 1];
    let sent = matches!(std.peek(&mut b), Ok(n) if n > 0);
    Ok((TcpStream::from_std(std)?, sent))
}

/// A TCP stream that notes when bytes arrive, for the pool to tell a
/// handshake in progress from a silent connection.
#[derive(Debug)]
pub struct Watched {
    inner: TcpStream,
    progress: Arc<AtomicU64>,
    pool: Arc<Handshakes>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.progress.store(self.pool.now(), Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn open(t: &Ticket) -> bool {
        let p = t.pool.pending.lock().unwrap();
        p.entries.contains_key(&t.id)
    }

    #[test]
    fn a_full_address_displaces_its_own_silent_connection_first() {
        let pool = Handshakes::new(100, 3, Duration::from_secs(2));
        let (a, b) = (ip("127.0.0.1"), ip("127.0.0.2"));
        let (real, _) = pool.admit(a, true);
        let (idle1, _) = pool.admit(a, false);
        let (idle2, _) = pool.admit(a, false);
        let (other, _) = pool.admit(b, false);
        // a is full: its oldest silent connection goes, not the one that sent.
        let (idle3, why) = pool.admit(a, false);
        assert_eq!(why, Some(Displaced::Address));
        assert!(!open(&idle1) && open(&idle2) && open(&idle3) && open(&real));
        assert!(open(&other), "another address keeps its place");
        assert_eq!(pool.pending(a), (4, 3));
        // Only once nothing of a's is silent does the oldest sender go.
        idle2.progress.store(pool.now(), Ordering::Relaxed);
        idle3.progress.store(pool.now(), Ordering::Relaxed);
        let (_late, why) = pool.admit(a, true);
        assert_eq!(why, Some(Displaced::Address));
        assert!(!open(&real) && open(&idle2) && open(&idle3));
    }

    #[test]
    fn a_full_pool_displaces_the_silent_anywhere_and_places_come_back() {
        let pool = Handshakes::new(3, 3, Duration::from_secs(2));
        let (first, _) = pool.admit(ip("127.0.0.2"), true);
        let (silent, _) = pool.admit(ip("127.0.0.3"), false);
        let (third, _) = pool.admit(ip("127.0.0.4"), true);
        let (fourth, why) = pool.admit(ip("127.0.0.5"), true);
        assert_eq!(why, Some(Displaced::Total));
        assert!(open(&first) && !open(&silent) && open(&third) && open(&fourth));
        drop(first);
        let (_sixth, why) = pool.admit(ip("127.0.0.6"), false);
        assert_eq!(why, None);
        drop(silent);
        assert_eq!(pool.pending(ip("127.0.0.3")), (3, 0));
    }
}
