//! HTTP tracker: announce (BEP 3, compact peers per BEP 23 and BEP 7) and scrape (BEP 48).
//!
//! Parsing and encoding are plain functions; [`Tracker`] holds the swarms behind one mutex,
//! taken only for the short, non-blocking bookkeeping of one request. The seeder lists itself
//! in every swarm it serves as a permanent seed at its public address, so the first announce
//! of any client already returns a peer.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lava_torrent::bencode::BencodeElem;

/// Announce interval while a swarm has leechers: short, so peers find each other quickly.
pub const INTERVAL_FORMING: Duration = Duration::from_secs(15);
/// Announce interval for a swarm of seeds only.
pub const INTERVAL_SETTLED: Duration = Duration::from_secs(120);
/// Peers that miss this many intervals (plus a grace period) are dropped.
const EXPIRY_INTERVALS: u32 = 2;
const EXPIRY_GRACE: Duration = Duration::from_secs(30);

pub use torrents::tracker_query::{parse_announce, parse_scrape, AnnounceRequest, Event};

/// A bencoded `failure reason` response.
pub fn failure(reason: &str) -> Vec<u8> {
    let mut d = HashMap::new();
    d.insert(
        "failure reason".to_owned(),
        BencodeElem::String(reason.to_owned()),
    );
    BencodeElem::Dictionary(d).encode()
}

#[derive(Debug, Clone)]
struct Peer {
    addr: SocketAddr,
    left: u64,
    expires: Option<Instant>,
}

#[derive(Debug, Default)]
struct Swarm {
    peers: HashMap<[u8; 20], Peer>,
    downloaded: u64,
}

impl Swarm {
    fn expire(&mut self, now: Instant) {
        self.peers.retain(|_, p| p.expires.is_none_or(|e| e > now));
    }

    fn counts(&self) -> (usize, usize) {
        let seeds = self.peers.values().filter(|p| p.left == 0).count();
        (seeds, self.peers.len() - seeds)
    }
}

/// Per-swarm counts, for scrape and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwarmCounts {
    pub complete: usize,
    pub incomplete: usize,
    pub downloaded: u64,
}

/// The tracker's state.
pub struct Tracker {
    swarms: Mutex<HashMap<[u8; 20], Swarm>>,
    served: Mutex<HashSet<[u8; 20]>>,
    open: bool,
    limits: Limits,
    /// Each address's announce allowance (a token bucket).
    allowance: Mutex<HashMap<IpAddr, Bucket>>,
    /// Announces and scrapes refused for their rate.
    pub throttled: AtomicU64,
    /// Announces answered (including refusals).
    pub announces: AtomicU64,
    pub scrapes: AtomicU64,
}

/// What one address may do to the tracker: a tracker on an open network must not let one
/// client flood a swarm with made-up peers or keep the tracker busy.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Announces and scrapes per second per IP on average (0: unlimited).
    pub announce_rate: u32,
    /// Peers per swarm.
    pub max_peers: usize,
    /// Peers per IP per swarm (loopback exempt).
    pub max_peers_per_ip: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            announce_rate: 10,
            max_peers: 5000,
            max_peers_per_ip: 32,
        }
    }
}

/// Seconds of the average rate a burst may use at once.
const BURST_SECONDS: f64 = 10.0;
/// Addresses whose allowance is remembered; beyond it, full (idle) buckets are forgotten.
const REMEMBERED_ADDRESSES: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The peer id under which the seeder lists itself.
const SELF_ID: [u8; 20] = *b"-SS0100-shardswarm00";

impl Tracker {
    /// A tracker for the torrents we serve, or for any info hash when `open`.
    pub fn new(open: bool, limits: Limits) -> Tracker {
        Tracker {
            swarms: Mutex::default(),
            served: Mutex::default(),
            open,
            limits,
            allowance: Mutex::default(),
            throttled: AtomicU64::new(0),
            announces: AtomicU64::new(0),
            scrapes: AtomicU64::new(0),
        }
    }

    /// Serve `info_hash`, listing the seeder at `addr` as a permanent seed.
    pub fn add_torrent(&self, info_hash: [u8; 20], seeder: SocketAddr) {
        self.served.lock().unwrap().insert(info_hash);
        let mut swarms = self.swarms.lock().unwrap();
        let swarm = swarms.entry(info_hash).or_default();
        swarm.peers.insert(
            SELF_ID,
            Peer {
                addr: seeder,
                left: 0,
                expires: None,
            },
        );
    }

    /// Stop serving `info_hash`.
    pub fn remove_torrent(&self, info_hash: &[u8; 20]) {
        self.served.lock().unwrap().remove(info_hash);
        self.swarms.lock().unwrap().remove(info_hash);
    }

    /// Whether `ip` may make one more announce or scrape now (and count it).
    pub fn allow(&self, ip: IpAddr) -> bool {
        let rate = f64::from(self.limits.announce_rate);
        if rate == 0.0 {
            return true;
        }
        let burst = rate * BURST_SECONDS;
        let now = Instant::now();
        let mut buckets = self.allowance.lock().unwrap();
        if buckets.len() >= REMEMBERED_ADDRESSES {
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        // Per client: an IPv6 host has a whole /64 to announce from.
        let b = buckets.entry(daemon::client_of(ip)).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            self.throttled.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    fn accepts(&self, info_hash: &[u8; 20]) -> bool {
        self.open || self.served.lock().unwrap().contains(info_hash)
    }

    /// Answer an announce from `remote`. Returns the bencoded body; refusals are bencoded
    /// `failure reason`s as BEP 3 has them.
    pub fn announce(&self, req: &AnnounceRequest, remote: IpAddr) -> Vec<u8> {
        self.announces.fetch_add(1, Ordering::Relaxed);
        if !self.accepts(&req.info_hash) {
            return failure("unregistered torrent: this tracker serves only the seeder's files");
        }
        let ip = match (req.ip, remote.is_loopback()) {
            (Some(ip), true) => ip,
            _ => remote,
        };
        let now = Instant::now();
        let mut swarms = self.swarms.lock().unwrap();
        let swarm = swarms.entry(req.info_hash).or_default();
        swarm.expire(now);
        let interval = if swarm.counts().1 > 0 || req.left > 0 {
            INTERVAL_FORMING
        } else {
            INTERVAL_SETTLED
        };
        let known = swarm.peers.get(&req.peer_id);
        if known.is_some_and(|p| p.expires.is_none() || p.addr.ip() != ip) {
            // A peer id is its first address's (the seeder's never expires): an announce from
            // elsewhere could otherwise stop it or point it at another address.
            return failure("this peer id announces from another address");
        }
        let new_peer = known.is_none();
        if new_peer && req.event != Event::Stopped {
            if swarm.peers.len() >= self.limits.max_peers {
                return failure("this swarm is full; try again later");
            }
            let client = daemon::client_of(ip);
            let from_ip = swarm
                .peers
                .values()
                .filter(|p| daemon::client_of(p.addr.ip()) == client)
                .count();
            if !ip.is_loopback() && from_ip >= self.limits.max_peers_per_ip {
                return failure("too many peers from this address in this swarm");
            }
        }
        if req.event == Event::Stopped {
            swarm.peers.remove(&req.peer_id);
        } else {
            if req.event == Event::Completed {
                swarm.downloaded += 1;
            }
            let expires = now + interval * EXPIRY_INTERVALS + EXPIRY_GRACE;
            swarm.peers.insert(
                req.peer_id,
                Peer {
                    addr: SocketAddr::new(ip, req.port),
                    left: req.left,
                    expires: Some(expires),
                },
            );
        }
        let mut others: Vec<(&[u8; 20], &Peer)> = swarm
            .peers
            .iter()
            .filter(|(id, _)| **id != req.peer_id)
            .collect();
        // The seeder first, then the freshest peers.
        others.sort_by_key(|(id, p)| (p.expires.is_some(), std::cmp::Reverse(p.expires), **id));
        others.truncate(req.numwant);
        let (complete, incomplete) = swarm.counts();

        let mut d = HashMap::new();
        d.insert(
            "interval".to_owned(),
            BencodeElem::Integer(interval.as_secs() as i64),
        );
        d.insert("min interval".to_owned(), BencodeElem::Integer(5));
        d.insert("complete".to_owned(), BencodeElem::Integer(complete as i64));
        d.insert(
            "incomplete".to_owned(),
            BencodeElem::Integer(incomplete as i64),
        );
        if req.compact {
            let mut v4 = Vec::new();
            let mut v6 = Vec::new();
            for (_, p) in &others {
                match canonical(p.addr.ip()) {
                    IpAddr::V4(a) => v4.extend_from_slice(&a.octets()),
                    IpAddr::V6(a) => v6.extend_from_slice(&a.octets()),
                }
                let port = p.addr.port().to_be_bytes();
                if canonical(p.addr.ip()).is_ipv4() {
                    v4.extend_from_slice(&port)
                } else {
                    v6.extend_from_slice(&port)
                }
            }
            d.insert("peers".to_owned(), BencodeElem::Bytes(v4));
            if !v6.is_empty() {
                d.insert("peers6".to_owned(), BencodeElem::Bytes(v6));
            }
        } else {
            let list = others
                .iter()
                .map(|(id, p)| {
                    let mut pd = HashMap::new();
                    pd.insert(
                        "ip".to_owned(),
                        BencodeElem::String(canonical(p.addr.ip()).to_string()),
                    );
                    pd.insert(
                        "port".to_owned(),
                        BencodeElem::Integer(i64::from(p.addr.port())),
                    );
                    if !req.no_peer_id {
                        pd.insert("peer id".to_owned(), BencodeElem::Bytes(id.to_vec()));
                    }
                    BencodeElem::Dictionary(pd)
                })
                .collect();
            d.insert("peers".to_owned(), BencodeElem::List(list));
        }
        BencodeElem::Dictionary(d).encode()
    }

    /// Counts for one served swarm.
    pub fn counts(&self, info_hash: &[u8; 20]) -> Option<SwarmCounts> {
        let mut swarms = self.swarms.lock().unwrap();
        let swarm = swarms.get_mut(info_hash)?;
        swarm.expire(Instant::now());
        let (complete, incomplete) = swarm.counts();
        Some(SwarmCounts {
            complete,
            incomplete,
            downloaded: swarm.downloaded,
        })
    }

    /// Answer a scrape for `hashes` (all served swarms when empty). Unknown hashes are left
    /// out, as BEP 48 allows.
    pub fn scrape(&self, hashes: &[[u8; 20]]) -> Vec<u8> {
        self.scrapes.fetch_add(1, Ordering::Relaxed);
        let wanted: Vec<[u8; 20]> = if hashes.is_empty() {
            self.served.lock().unwrap().iter().copied().collect()
        } else {
            hashes.to_vec()
        };
        let mut files = HashMap::new();
        for h in wanted {
            if !self.accepts(&h) {
                continue;
            }
            if let Some(c) = self.counts(&h) {
                let mut d = HashMap::new();
                d.insert(
                    "complete".to_owned(),
                    BencodeElem::Integer(c.complete as i64),
                );
                d.insert(
                    "incomplete".to_owned(),
                    BencodeElem::Integer(c.incomplete as i64),
                );
                d.insert(
                    "downloaded".to_owned(),
                    BencodeElem::Integer(c.downloaded as i64),
                );
                files.insert(h.to_vec(), BencodeElem::Dictionary(d));
            }
        }
        let mut top = HashMap::new();
        top.insert("files".to_owned(), BencodeElem::RawDictionary(files));
        BencodeElem::Dictionary(top).encode()
    }
}

/// IPv4-mapped IPv6 addresses as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "%01%02%03%04%05%06%07%08%09%0a%0b%0c%0d%0e%0f%10%11%12%13%14";

    #[test]
    fn seeder_is_listed_first_and_requester_is_not_listed() {
        let t = Tracker::new(false, Limits::default());
        let ih = [1u8; 20];
        t.add_torrent(ih, "198.18.0.1:51820".parse().unwrap());
        let q = format!("info_hash={HASH}&peer_id=-AR0001-abcdefghijkl&port=7000&left=5&compact=1");
        let mut req = parse_announce(&q).unwrap();
        req.info_hash = ih;
        let body = t.announce(&req, "127.0.0.1".parse().unwrap());
        let root = torrents::bencode::decode(&body).unwrap();
        assert_eq!(
            root.get("peers").unwrap().as_bytes().unwrap(),
            [198, 18, 0, 1, 0xca, 0x6c] // port 51820
        );
        assert_eq!(root.get("incomplete").unwrap().as_int(), Some(1));
        assert_eq!(root.get("interval").unwrap().as_int(), Some(15));
        assert_eq!(
            t.counts(&ih),
            Some(SwarmCounts {
                complete: 1,
                incomplete: 1,
                downloaded: 0
            })
        );
        req.event = Event::Stopped;
        t.announce(&req, "127.0.0.1".parse().unwrap());
        assert_eq!(t.counts(&ih).unwrap().incomplete, 0);
        req.info_hash = [9; 20];
        let refused = t.announce(&req, "127.0.0.1".parse().unwrap());
        assert!(String::from_utf8_lossy(&refused).contains("failure reason"));
    }

    fn announce_from(t: &Tracker, ih: [u8; 20], peer: u8, ip: &str) -> String {
        let mut peer_id = [b'p'; 20];
        peer_id[19] = peer;
        let req = AnnounceRequest {
            info_hash: ih,
            peer_id,
            port: 7000,
            left: 1,
            event: Event::Started,
            compact: true,
            no_peer_id: true,
            numwant: 50,
            ip: None,
        };
        String::from_utf8_lossy(&t.announce(&req, ip.parse().unwrap())).into_owned()
    }

    #[test]
    fn swarms_and_addresses_are_capped() {
        let limits = Limits {
            announce_rate: 0,
            max_peers: 5,
            max_peers_per_ip: 2,
        };
        let t = Tracker::new(false, limits);
        let ih = [1u8; 20];
        t.add_torrent(ih, "198.18.0.1:51820".parse().unwrap());
        // Two peers from one address, a third refused; an existing peer may announce again.
        assert!(!announce_from(&t, ih, 1, "10.0.0.1").contains("failure"));
        assert!(!announce_from(&t, ih, 2, "10.0.0.1").contains("failure"));
        assert!(announce_from(&t, ih, 3, "10.0.0.1").contains("too many peers from this address"));
        assert!(!announce_from(&t, ih, 2, "10.0.0.1").contains("failure"));
        // The swarm (the seeder and four peers) fills up; loopback is not limited per address.
        assert!(!announce_from(&t, ih, 4, "127.0.0.1").contains("failure"));
        assert!(!announce_from(&t, ih, 5, "127.0.0.1").contains("failure"));
        assert!(announce_from(&t, ih, 6, "127.0.0.1").contains("this swarm is full"));
        assert_eq!(t.counts(&ih).unwrap().incomplete, 4);
    }

    #[test]
    fn an_address_over_its_rate_is_refused_and_others_are_not() {
        let t = Tracker::new(
            false,
            Limits {
                announce_rate: 2,
                ..Limits::default()
            },
        );
        let flood = "10.0.0.9".parse().unwrap();
        // A burst of 10 s worth (20), then refusals; nowhere near enough time passes here
        // to earn another (0.5 s per announce).
        let allowed = (0..100).filter(|_| t.allow(flood)).count();
        assert!((20..=21).contains(&allowed), "{allowed}");
        assert_eq!(t.throttled.load(Ordering::Relaxed), 100 - allowed as u64);
        assert!(t.allow("10.0.0.10".parse().unwrap()));
        assert!(Tracker::new(
            false,
            Limits {
                announce_rate: 0,
                ..Limits::default()
            }
        )
        .allow(flood));
    }

    #[test]
    fn a_peer_id_is_changed_or_stopped_only_from_its_own_address() {
        let t = Tracker::new(false, Limits::default());
        let ih = [2u8; 20];
        t.add_torrent(ih, "198.18.0.1:51820".parse().unwrap());
        // Anyone may send `stopped` with the seeder's (public) peer id: it stays listed.
        let stop_seeder = AnnounceRequest {
            info_hash: ih,
            peer_id: SELF_ID,
            port: 1,
            left: 0,
            event: Event::Stopped,
            compact: true,
            no_peer_id: true,
            numwant: 50,
            ip: None,
        };
        let refused = t.announce(&stop_seeder, "10.0.0.66".parse().unwrap());
        assert!(String::from_utf8_lossy(&refused).contains("another address"));
        assert_eq!(
            t.counts(&ih).unwrap().complete,
            1,
            "the seeder is still listed"
        );
        // A peer's id, announced from elsewhere, is refused; from its own address it works.
        assert!(!announce_from(&t, ih, 1, "10.0.0.1").contains("failure"));
        assert!(announce_from(&t, ih, 1, "10.0.0.2").contains("another address"));
        assert!(!announce_from(&t, ih, 1, "10.0.0.1").contains("failure"));
    }

    #[test]
    fn an_ipv6_host_is_one_client_across_its_slash_64() {
        let t = Tracker::new(
            false,
            Limits {
                announce_rate: 2,
                ..Limits::default()
            },
        );
        // Each announce from a different address of one /64: they share one bucket...
        let allowed = (0..100u16)
            .filter(|i| t.allow(format!("2001:db8:0:1::{i:x}").parse().unwrap()))
            .count();
        assert!((20..=21).contains(&allowed), "{allowed}");
        assert!(t.allow("2001:db8:0:2::1".parse().unwrap()), "another /64");
        // ...and one share of a swarm's places.
        let t = Tracker::new(
            false,
            Limits {
                max_peers_per_ip: 2,
                ..Limits::default()
            },
        );
        let ih = [3u8; 20];
        t.add_torrent(ih, "198.18.0.1:51820".parse().unwrap());
        assert!(!announce_from(&t, ih, 1, "2001:db8:0:1::1").contains("failure"));
        assert!(!announce_from(&t, ih, 2, "2001:db8:0:1::2").contains("failure"));
        let third = announce_from(&t, ih, 3, "2001:db8:0:1::3");
        assert!(
            third.contains("too many peers from this address"),
            "{third}"
        );
    }
}
