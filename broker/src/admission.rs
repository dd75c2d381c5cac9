//! Where connections may come from, and how many (`../shared/design/security.md`, "Where
//! connections may come from").
//!
//! In: a request's `Origin` and `Host`, a connection's address. Out: whether a browser page
//! of that origin may open a WebSocket here (cross-site WebSocket hijacking), and a
//! [`Ticket`] for each client connection while `--max-connections` and
//! `--max-connections-per-ip` allow one (given back when the connection ends).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use url::Url;

/// Why the allowed origins cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid origin {0:?} in --allowed-origins: give scheme://host[:port], or *")]
pub struct OriginError(String);

/// The origins a browser page may connect from, besides the broker's own.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    any: bool,
    allowed: Vec<String>,
}

/// An origin as `scheme://host[:port]`, lowercase, the port left out when it is the
/// scheme's default: the form browsers send, whatever form it was written in.
fn normalized(origin: &str) -> Option<String> {
    let url = Url::parse(origin).ok()?;
    let origin = url.origin();
    origin.is_tuple().then(|| origin.ascii_serialization())
}

impl Origins {
    /// The origins of `--allowed-origins` (comma-separated; `*` allows all).
    ///
    /// # Errors
    /// An entry that is no origin.
    pub fn parse(list: &str) -> Result<Origins, OriginError> {
        let mut origins = Origins::default();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry == "*" {
                origins.any = true;
                continue;
            }
            let origin = normalized(entry).ok_or_else(|| OriginError(entry.to_owned()))?;
            origins.allowed.push(origin);
        }
        Ok(origins)
    }

    /// The pages that may frame the broker's SockJS iframe: its own and the allowed
    /// origins (a CSP `frame-ancestors` source list).
    pub fn frame_ancestors(&self) -> String {
        if self.any {
            return "*".to_owned();
        }
        std::iter::once("'self'")
            .chain(self.allowed.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Whether a request with `origin` (its `Origin` header, if any) to the host `host` (its
    /// `Host` header) over `scheme` may go on: no `Origin` (not a browser), the broker's
    /// own origin, or one of the list.
    pub fn allows(&self, origin: Option<&str>, scheme: &str, host: Option<&str>) -> bool {
        let Some(origin) = origin else {
            return true;
        };
        if self.any {
            return true;
        }
        let Some(origin) = normalized(origin) else {
            return false;
        };
        if host
            .and_then(|host| normalized(&format!("{scheme}://{host}")))
            .is_some_and(|own| own == origin)
        {
            return true;
        }
        self.allowed.contains(&origin)
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// Counts of client connections, all transports together.
#[derive(Debug)]
pub struct Admission {
    max: usize,
    per_ip: usize,
    open: AtomicUsize,
    by_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// A connection's place in the counts, given back when dropped.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Admission {
    /// At most `max` connections and `per_ip` from one address (0: no limit).
    pub fn new(max: usize, per_ip: usize) -> Admission {
        Admission {
            max,
            per_ip,
            open: AtomicUsize::new(0),
            by_ip: Mutex::new(HashMap::new()),
        }
    }

    fn by_ip(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.by_ip
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place for a connection from `ip`, if the limits leave one; `None` when there are
    /// no limits (nothing is counted, and the connection holds nothing). Existing
    /// connections are never dropped to make room.
    ///
    /// # Errors
    /// [`Busy`] when a limit is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Option<Box<Ticket>>, Busy> {
        if self.max == 0 && self.per_ip == 0 {
            return Ok(None);
        }
        self.take(ip).map(|ticket| Some(Box::new(ticket)))
    }

    fn take(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Busy> {
        let open = self.open.fetch_add(1, Ordering::AcqRel);
        if self.max > 0 && open >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Busy);
        }
        if self.per_ip > 0 {
            let mut by_ip = self.by_ip();
            let count = by_ip.entry(ip).or_insert(0);
            if *count >= self.per_ip {
                drop(by_ip);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(Busy);
            }
            *count += 1;
        }
        Ok(Ticket {
            admission: self.clone(),
            ip,
        })
    }

    /// Client connections open now (counted only when there is a limit).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let admission = &self.admission;
        admission.open.fetch_sub(1, Ordering::AcqRel);
        if admission.per_ip > 0 {
            let mut by_ip = admission.by_ip();
            if let Some(count) = by_ip.get_mut(&self.ip) {
                *count -= 1;
                if *count == 0 {
                    by_ip.remove(&self.ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn origins_are_compared_as_browsers_send_them() {
        let origins = Origins::parse("https://chat.example.com, http://localhost:3000").unwrap();
        let own = Some("127.0.0.1:8080");
        assert!(
            origins.allows(None, "http", own),
            "no Origin: not a browser"
        );
        assert!(
            origins.allows(Some("http://127.0.0.1:8080"), "http", own),
            "its own"
        );
        assert!(origins.allows(Some("https://chat.example.com"), "http", own));
        assert!(origins.allows(Some("https://CHAT.example.com:443"), "http", own));
        assert!(origins.allows(Some("http://localhost:3000"), "http", own));
        assert!(!origins.allows(Some("http://localhost:3001"), "http", own));
        assert!(!origins.allows(Some("https://evil.example"), "http", own));
        assert!(!origins.allows(Some("null"), "http", own));
        assert!(
            !origins.allows(Some("https://127.0.0.1:8080"), "http", own),
            "scheme counts"
        );
        let example = Some("example.com");
        assert!(origins.allows(Some("http://example.com:80"), "http", example));
        assert!(
            Origins::parse("*")
                .unwrap()
                .allows(Some("https://evil.example"), "http", own)
        );
        assert!(Origins::parse("not an origin").is_err());
    }

    #[test]
    fn tickets_count_connections_in_all_and_per_address() {
        let admission = Arc::new(Admission::new(3, 2));
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let first = admission.admit(a).unwrap();
        let _second = admission.admit(a).unwrap();
        assert_eq!(admission.admit(a).unwrap_err(), Busy, "two per address");
        let _third = admission.admit(b).unwrap();
        assert_eq!(admission.admit(b).unwrap_err(), Busy, "three in all");
        drop(first);
        let _fourth = admission.admit(b).unwrap();
        assert_eq!(admission.open(), 3, "a place given back is taken again");
        let unlimited = Arc::new(Admission::new(0, 0));
        assert!(unlimited.admit(a).unwrap().is_none(), "nothing to hold");
    }
}
