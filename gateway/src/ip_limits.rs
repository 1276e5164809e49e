//! Limits per source address, checked at accept: connections held at once,
//! new connections per second, and failed logins per minute.
//!
//! An IPv6 client is counted by its /64 (one subscriber's prefix: a host
//! picks any address in it at will); an IPv4-mapped IPv6 address counts as
//! its IPv4 address. Loopback is exempt unless `limit_loopback` is set: the
//! bench harness and a TLS proxy on the same host arrive from 127.0.0.0/8
//! with every client behind them.
//!
//! The table lives in a few mutex-guarded shards; an entry exists while the
//! address holds connections or has counts in the current window, and the
//! heartbeat task's [`IpLimits::sweep`] drops the rest, so its size is
//! bounded by the open connections plus the addresses seen in the last
//! minute.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use ferry_protocol::ErrorCode;

/// The per-address limits (0 = no limit).
#[derive(Debug, Clone, Copy)]
pub struct IpLimitConfig {
    /// Connections one address may hold at once.
    pub max_connections_per_ip: u32,
    /// New connections one address may open per second.
    pub max_connects_per_sec_per_ip: u32,
    /// Failed logins (bad or expired token, bad Auth) one address may make
    /// per minute before its new connections are refused for the rest of
    /// the minute.
    pub max_auth_failures_per_min_per_ip: u32,
    /// Apply the limits to loopback clients too.
    pub limit_loopback: bool,
}

/// Which limit refused a connection: the `limit` label of
/// `ferry_ip_limit_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpRefusal {
    /// `max_connections_per_ip`.
    Connections,
    /// `max_connects_per_sec_per_ip`.
    ConnectRate,
    /// `max_auth_failures_per_min_per_ip`.
    AuthFailures,
}

impl IpRefusal {
    /// Every kind, for registering the counters.
    pub const ALL: [IpRefusal; 3] = [
        IpRefusal::Connections,
        IpRefusal::ConnectRate,
        IpRefusal::AuthFailures,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            IpRefusal::Connections => "connections_per_ip",
            IpRefusal::ConnectRate => "connects_per_sec_per_ip",
            IpRefusal::AuthFailures => "auth_failures_per_ip",
        }
    }

    /// The error code and message the client gets (plaintext port).
    pub fn error(self) -> (ErrorCode, &'static str) {
        match self {
            IpRefusal::Connections => (
                ErrorCode::TooManyConnections,
                "too many connections from your address",
            ),
            IpRefusal::ConnectRate => (
                ErrorCode::RateLimited,
                "too many new connections per second from your address; retry with back-off",
            ),
            IpRefusal::AuthFailures => (
                ErrorCode::RateLimited,
                "too many failed logins from your address; retry in a minute",
            ),
        }
    }
}

#[derive(Debug, Default)]
struct Entry {
    open: u32,
    /// Coarse second of `connects`.
    connect_sec: u32,
    connects: u32,
    /// Minute (coarse seconds / 60) of `failures`.
    failure_min: u32,
    failures: u32,
}

impl Entry {
    fn idle(&self, now: u32) -> bool {
        self.open == 0
            && self.connect_sec != now
            && (self.failures == 0 || self.failure_min != now / 60)
    }
}

const SHARDS: usize = 16;

/// The per-address counters of one server.
pub struct IpLimits {
    config: IpLimitConfig,
    shards: [Mutex<HashMap<IpAddr, Entry>>; SHARDS],
}

/// One admitted connection's place in its address's count; released on drop.
pub struct IpSlot {
    limits: Arc<IpLimits>,
    key: Option<IpAddr>,
}

impl IpSlot {
    /// The address the limits count this connection under (`None`: exempt).
    pub fn key(&self) -> Option<IpAddr> {
        self.key
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            let mut shard = self.limits.shard(key);
            if let Some(entry) = shard.get_mut(&key) {
                entry.open = entry.open.saturating_sub(1);
            }
        }
    }
}

impl IpLimits {
    /// A table enforcing `config`.
    pub fn new(config: IpLimitConfig) -> Arc<IpLimits> {
        Arc::new(IpLimits {
            config,
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        })
    }

    /// The address `ip` is counted under, or `None` if it is exempt.
    pub fn key(&self, ip: IpAddr) -> Option<IpAddr> {
        let ip = match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let s = v6.segments();
                    IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
                }
            },
            v4 => v4,
        };
        if ip.is_loopback() && !self.config.limit_loopback {
            return None;
        }
        Some(ip)
    }

    fn shard(&self, key: IpAddr) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        let index = match key {
            IpAddr::V4(v4) => u32::from(v4) as usize,
            IpAddr::V6(v6) => (u128::from(v6) >> 64) as usize,
        };
        let index = index.wrapping_mul(0x9E37_79B9) >> 7;
        self.shards[index % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new connection from `ip` at coarse second `now`, or says
    /// which limit refuses it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: u32) -> Result<IpSlot, IpRefusal> {
        let Some(key) = self.key(ip) else {
            return Ok(IpSlot {
                limits: self.clone(),
                key: None,
            });
        };
        let c = self.config;
        let mut shard = self.shard(key);
        let entry = shard.entry(key).or_default();
        if c.max_auth_failures_per_min_per_ip > 0
            && entry.failure_min == now / 60
            && entry.failures >= c.max_auth_failures_per_min_per_ip
        {
            return Err(IpRefusal::AuthFailures);
        }
        if entry.connect_sec != now {
            entry.connect_sec = now;
            entry.connects = 0;
        }
        if c.max_connects_per_sec_per_ip > 0 && entry.connects >= c.max_connects_per_sec_per_ip {
            return Err(IpRefusal::ConnectRate);
        }
        entry.connects += 1;
        if c.max_connections_per_ip > 0 && entry.open >= c.max_connections_per_ip {
            return Err(IpRefusal::Connections);
        }
        entry.open += 1;
        drop(shard);
        Ok(IpSlot {
            limits: self.clone(),
            key: Some(key),
        })
    }

    /// A login from the address of `slot` failed at coarse second `now`.
    pub fn auth_failed(&self, slot: &IpSlot, now: u32) {
        let Some(key) = slot.key else { return };
        let mut shard = self.shard(key);
        let entry = shard.entry(key).or_default();
        if entry.failure_min != now / 60 {
            entry.failure_min = now / 60;
            entry.failures = 0;
        }
        entry.failures = entry.failures.saturating_add(1);
    }

    /// Drops the entries of addresses with nothing open and nothing counted
    /// in the current second or minute.
    pub fn sweep(&self, now: u32) {
        for shard in &self.shards {
            shard
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|_, e| !e.idle(now));
        }
    }

    /// Addresses in the table (for tests and a gauge).
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(conns: u32, rate: u32, failures: u32) -> Arc<IpLimits> {
        IpLimits::new(IpLimitConfig {
            max_connections_per_ip: conns,
            max_connects_per_sec_per_ip: rate,
            max_auth_failures_per_min_per_ip: failures,
            limit_loopback: false,
        })
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn connections_per_address_are_capped_and_released_on_drop() {
        let l = limits(2, 0, 0);
        let one = l.admit(A, 0).unwrap();
        let _two = l.admit(A, 0).unwrap();
        assert_eq!(l.admit(A, 0).err(), Some(IpRefusal::Connections));
        let _other = l.admit(B, 0).unwrap();
        drop(one);
        assert!(l.admit(A, 0).is_ok());
    }

    #[test]
    fn new_connections_per_second_are_capped_per_second() {
        let l = limits(0, 3, 0);
        let held: Vec<_> = (0..3).map(|_| l.admit(A, 5).unwrap()).collect();
        assert_eq!(l.admit(A, 5).err(), Some(IpRefusal::ConnectRate));
        assert!(l.admit(A, 6).is_ok(), "a new second");
        drop(held);
    }

    #[test]
    fn failed_logins_lock_the_address_out_for_the_rest_of_the_minute() {
        let l = limits(0, 0, 2);
        let s = l.admit(A, 60).unwrap();
        l.auth_failed(&s, 60);
        l.auth_failed(&s, 61);
        assert_eq!(l.admit(A, 62).err(), Some(IpRefusal::AuthFailures));
        assert!(l.admit(B, 62).is_ok(), "other addresses are not affected");
        assert!(l.admit(A, 120).is_ok(), "the next minute");
    }

    #[test]
    fn loopback_is_exempt_and_ipv6_counts_by_its_64() {
        let l = limits(1, 1, 1);
        let lo: IpAddr = "127.0.0.9".parse().unwrap();
        let held: Vec<_> = (0..10).map(|_| l.admit(lo, 0).unwrap()).collect();
        assert_eq!(l.tracked(), 0);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let _a = l.admit(a, 0).unwrap();
        assert_eq!(l.admit(b, 1).err(), Some(IpRefusal::Connections));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(l.key(mapped), Some(A));
        drop(held);
    }

    #[test]
    fn the_sweep_forgets_idle_addresses() {
        let l = limits(5, 5, 5);
        let s = l.admit(A, 0).unwrap();
        l.sweep(0);
        assert_eq!(l.tracked(), 1, "open");
        drop(s);
        l.sweep(1);
        assert_eq!(l.tracked(), 0);
    }
}
