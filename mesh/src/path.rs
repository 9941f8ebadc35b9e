//! What a mesh connection runs over right now: the kind of its selected path and its measured
//! round-trip time, for `/status` ([`protocol::status::Edge`]).

use std::net::{IpAddr, SocketAddr};

use protocol::status::{Edge, EdgeKind};

/// The kind of a UDP path to `remote`, given the IP addresses of the peer's own interfaces:
/// one of them is a direct path, anything else an address a NAT mapped (a punched hole).
pub fn kind_of_ip(remote: SocketAddr, peers_interfaces: &[IpAddr]) -> EdgeKind {
    if peers_interfaces.contains(&remote.ip()) {
        EdgeKind::Direct
    } else {
        EdgeKind::Holepunched
    }
}

/// How a data-channel lane runs: over the mesh (`watch` on its connection: the path now, None
/// once closed) or, opened without a watch, TCP.
pub fn lane_edge(watch: Option<&PathWatch>) -> Option<Edge> {
    match watch {
        None => Some(Edge {
            kind: EdgeKind::Tcp,
            rtt_us: None,
        }),
        Some(watch) => watch.edge(),
    }
}

/// A live handle on a mesh connection's path (it changes: relayed first, direct once a
/// hole is punched), to read when asked.
#[derive(Clone)]
pub struct PathWatch {
    pub(crate) conn: iroh::endpoint::Connection,
    pub(crate) interfaces: Vec<IpAddr>,
}

impl PathWatch {
    /// The selected path now, None once the connection is closed.
    ///
    /// Each reading also sends the peer a one-byte datagram, which it acknowledges: QUIC
    /// learns the round trip only from acknowledgements of what this side sends, and a lane
    /// that only receives (the coordinator's answer lane) would otherwise report a round trip
    /// from long ago (a 40 ms path still said 14 ms after half a minute of answers). The peer
    /// drops the datagram unread; the next reading has the fresh sample.
    pub fn edge(&self) -> Option<Edge> {
        if self.conn.close_reason().is_some() {
            return None;
        }
        // Best effort: a peer without datagram support still has the older estimate.
        let _ = self.conn.send_datagram(vec![0u8].into());
        let paths = self.conn.paths();
        let selected = paths.iter().find(|p| p.is_selected())?;
        let kind = match selected.remote_addr() {
            iroh::TransportAddr::Ip(addr) => kind_of_ip(*addr, &self.interfaces),
            _ => EdgeKind::Relayed,
        };
        Some(Edge {
            kind,
            rtt_us: Some(u64::try_from(selected.rtt().as_micros()).unwrap_or(u64::MAX)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_to_an_address_of_the_peers_own_is_direct_else_holepunched() {
        let own: Vec<IpAddr> = vec!["10.1.0.2".parse().unwrap()];
        assert_eq!(
            kind_of_ip("10.1.0.2:5000".parse().unwrap(), &own),
            EdgeKind::Direct
        );
        assert_eq!(
            kind_of_ip("198.51.100.7:41000".parse().unwrap(), &own),
            EdgeKind::Holepunched
        );
    }
}
