//! STOMP protocol versions and their negotiation.
//!
//! In: `accept-version` header values and WebSocket subprotocol names. Out: a [`Version`],
//! which decides how headers are escaped.

use std::fmt;
use std::str::FromStr;

/// A STOMP protocol version. Ordered: `V1_0 < V1_1 < V1_2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    /// STOMP 1.0: no header escaping, LF line ends.
    V1_0,
    /// STOMP 1.1: escapes `\n`, `\c` (colon) and `\\` in headers.
    V1_1,
    /// STOMP 1.2: the 1.1 escapes plus `\r`; lines may end in CRLF.
    V1_2,
}

impl Version {
    /// Every version, oldest first.
    pub const ALL: [Version; 3] = [Version::V1_0, Version::V1_1, Version::V1_2];

    /// The version as written in `version` and `accept-version` headers.
    pub const fn as_str(self) -> &'static str {
        match self {
            Version::V1_0 => "1.0",
            Version::V1_1 => "1.1",
            Version::V1_2 => "1.2",
        }
    }

    /// The WebSocket subprotocol that names this version (`v12.stomp`, ...).
    pub const fn subprotocol(self) -> &'static str {
        match self {
            Version::V1_0 => "v10.stomp",
            Version::V1_1 => "v11.stomp",
            Version::V1_2 => "v12.stomp",
        }
    }

    /// Reads a WebSocket subprotocol name (`v12.stomp`, ...).
    pub fn from_subprotocol(name: &str) -> Option<Version> {
        Version::ALL
            .into_iter()
            .find(|v| v.subprotocol().eq_ignore_ascii_case(name.trim()))
    }

    /// Picks the highest version that both the client's `accept-version` and `supported`
    /// name. A missing header means the client speaks 1.0 only (1.1 "Protocol Negotiation").
    /// Unknown entries in the header are ignored.
    pub fn negotiate(accept_version: Option<&str>, supported: &[Version]) -> Option<Version> {
        let Some(accepted) = accept_version else {
            return supported.contains(&Version::V1_0).then_some(Version::V1_0);
        };
        accepted
            .split(',')
            .filter_map(|v| v.trim().parse::<Version>().ok())
            .filter(|v| supported.contains(v))
            .max()
    }

    /// Whether header values and names are escaped (`\n`, `\c`, `\\`, and `\r` in 1.2).
    pub const fn escapes(self) -> bool {
        !matches!(self, Version::V1_0)
    }
}

/// The error for a string that names no STOMP version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown STOMP version {0:?}")]
pub struct UnknownVersion(pub String);

impl FromStr for Version {
    type Err = UnknownVersion;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "1.0" => Ok(Version::V1_0),
            "1.1" => Ok(Version::V1_1),
            "1.2" => Ok(Version::V1_2),
            other => Err(UnknownVersion(other.to_owned())),
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_accept_version_means_1_0() {
        assert_eq!(Version::negotiate(None, &Version::ALL), Some(Version::V1_0));
        assert_eq!(Version::negotiate(None, &[Version::V1_2]), None);
    }

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        let all = &Version::ALL;
        assert_eq!(
            Version::negotiate(Some("1.0,1.1,1.2"), all),
            Some(Version::V1_2)
        );
        assert_eq!(
            Version::negotiate(Some("1.2,1.0"), all),
            Some(Version::V1_2)
        );
        assert_eq!(
            Version::negotiate(Some("1.1, 1.0"), all),
            Some(Version::V1_1)
        );
        assert_eq!(
            Version::negotiate(Some("1.1,1.2"), &[Version::V1_0, Version::V1_1]),
            Some(Version::V1_1)
        );
    }

    #[test]
    fn no_common_version_is_none() {
        assert_eq!(Version::negotiate(Some("2.0,3.1"), &Version::ALL), None);
        assert_eq!(Version::negotiate(Some(""), &Version::ALL), None);
    }

    #[test]
    fn subprotocols_round_trip() {
        for v in Version::ALL {
            assert_eq!(Version::from_subprotocol(v.subprotocol()), Some(v));
        }
        assert_eq!(Version::from_subprotocol("stomp"), None);
    }
}
