//! What a mesh connection runs over right now: the kind of its selected path and its measured
//! round-trip time, for `/status` and placement.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a connection reaches its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    /// UDP to an address the peer has on one of its own interfaces: no NAT between them.
    Direct,
    /// UDP to an address a NAT mapped for the peer (learned through the relay, not one of its
    /// interfaces): the two punched a hole.
    Holepunched,
    /// Through the swarm's relay: nothing direct works (yet).
    Relayed,
}

impl PathKind {
    /// The kind of a UDP path to `remote`, given the addresses the peer has on its own
    /// interfaces (as it announced them).
    pub fn of_ip(remote: SocketAddr, peers_own: &[SocketAddr]) -> PathKind {
        if peers_own.iter().any(|own| own.ip() == remote.ip()) {
            PathKind::Direct
        } else {
            PathKind::Holepunched
        }
    }
}

/// A connection's selected path: its kind and round-trip time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgePath {
    pub kind: PathKind,
    /// Microseconds.
    pub rtt_us: u64,
}

impl EdgePath {
    pub fn new(kind: PathKind, rtt: Duration) -> EdgePath {
        EdgePath {
            kind,
            rtt_us: u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_to_an_address_of_the_peers_own_is_direct_else_holepunched() {
        let own: Vec<SocketAddr> = vec!["10.1.0.2:5000".parse().unwrap()];
        assert_eq!(
            PathKind::of_ip("10.1.0.2:5000".parse().unwrap(), &own),
            PathKind::Direct
        );
        // Same host, a port its NAT chose: still its own address.
        assert_eq!(
            PathKind::of_ip("10.1.0.2:6001".parse().unwrap(), &own),
            PathKind::Direct
        );
        assert_eq!(
            PathKind::of_ip("198.51.100.7:41000".parse().unwrap(), &own),
            PathKind::Holepunched
        );
    }
}
