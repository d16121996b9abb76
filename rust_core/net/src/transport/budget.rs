//! In-flight byte budgets of a server: how many bytes of requests it holds (received and not yet answered) per
//! connection, per peer (certificate fingerprint) and in all. Bytes are charged as receive buffers grow, that is
//! as data actually arrives, never from what a peer declares; a stream whose next bytes would overrun a budget is
//! refused with an error naming the limit, and its bytes are given back when the request is answered or dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::error::{Error, Result};

/// One budget: a limit and the bytes charged against it.
#[derive(Debug)]
pub struct Budget {
    /// What is limited, as the user sees it ("this connection", "peer 1a2b..").
    scope: String,
    /// The `Limits` field that sets the limit.
    field: &'static str,
    limit: u64,
    used: AtomicU64,
    /// The most ever charged at once.
    peak: AtomicU64,
}

impl Budget {
    pub fn new(scope: impl Into<String>, field: &'static str, limit: u64) -> Arc<Budget> {
        Arc::new(Budget { scope: scope.into(), field, limit, used: AtomicU64::new(0), peak: AtomicU64::new(0) })
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// The most bytes ever charged at once.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    fn try_charge(&self, n: u64) -> bool {
        match self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_add(n).filter(|&t| t <= self.limit)) {
            Ok(before) => {
                self.peak.fetch_max(before + n, Ordering::Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    fn release(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// The bytes one request holds, charged against every budget it falls under; given back on drop.
#[derive(Debug, Default)]
pub struct Reservation {
    budgets: Vec<Arc<Budget>>,
    held: u64,
}

impl Reservation {
    /// A reservation against `budgets` (none: unbounded, as on a client reading its own replies).
    pub fn new(budgets: Vec<Arc<Budget>>) -> Reservation {
        Reservation { budgets, held: 0 }
    }

    /// Bytes held.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Charges `n` more bytes, or refuses (charging nothing) with a `LimitExceeded` naming the budget.
    pub fn grow(&mut self, n: u64) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        for (i, b) in self.budgets.iter().enumerate() {
            if !b.try_charge(n) {
                for done in &self.budgets[..i] {
                    done.release(n);
                }
                return Err(Error::LimitExceeded(format!(
                    "{} would hold more than {} bytes of requests in flight ({} held, {n} more arriving); the limit is {} ({})",
                    b.scope,
                    b.limit,
                    b.used(),
                    b.limit,
                    b.field
                )));
            }
        }
        self.held += n;
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        for b in &self.budgets {
            b.release(self.held);
        }
    }
}

/// The per-peer budgets of a server, by certificate fingerprint; a peer's budget lives while any of its
/// connections or requests does.
#[derive(Debug, Default)]
pub struct PeerBudgets {
    map: Mutex<HashMap<String, Weak<Budget>>>,
}

impl PeerBudgets {
    /// The budget of the peer `fingerprint` (created with `limit` if it has none).
    pub fn get(&self, fingerprint: &str, limit: u64) -> Arc<Budget> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = map.get(fingerprint).and_then(Weak::upgrade) {
            return b;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let short: String = fingerprint.chars().take(16).collect();
        let b = Budget::new(format!("peer {short}.. (all its connections)"), "max_inflight_bytes_per_peer", limit);
        map.insert(fingerprint.to_string(), Arc::downgrade(&b));
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_charge_refuse_and_release() {
        let global = Budget::new("this server", "max_inflight_bytes", 100);
        let conn = Budget::new("this connection", "max_inflight_bytes_per_connection", 60);
        let mut a = Reservation::new(vec![conn.clone(), global.clone()]);
        a.grow(50).unwrap();
        let e = a.grow(20).unwrap_err();
        assert!(matches!(e, Error::LimitExceeded(ref m) if m.contains("max_inflight_bytes_per_connection")), "{e:?}");
        // A refusal charges nothing anywhere.
        assert_eq!((conn.used(), global.used(), a.held()), (50, 50, 50));
        let mut b = Reservation::new(vec![global.clone()]);
        b.grow(50).unwrap();
        let e = b.grow(1).unwrap_err();
        assert!(matches!(e, Error::LimitExceeded(ref m) if m.contains("(max_inflight_bytes)")), "{e:?}");
        drop(a);
        assert_eq!((conn.used(), global.used()), (0, 50));
        b.grow(50).unwrap();
        drop(b);
        assert_eq!((global.used(), global.peak()), (0, 100));
        let peers = PeerBudgets::default();
        let p = peers.get("abcdef", 10);
        assert!(Arc::ptr_eq(&p, &peers.get("abcdef", 10)));
        drop(p);
        assert_eq!(peers.get("abcdef", 10).used(), 0);
    }
}
