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
use percent_encoding::percent_decode_str;

/// Announce interval while a swarm has leechers: short, so peers find each other quickly.
pub const INTERVAL_FORMING: Duration = Duration::from_secs(15);
/// Announce interval for a swarm of seeds only.
pub const INTERVAL_SETTLED: Duration = Duration::from_secs(120);
/// Peers that miss this many intervals (plus a grace period) are dropped.
const EXPIRY_INTERVALS: u32 = 2;
const EXPIRY_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_NUMWANT: usize = 50;
const MAX_NUMWANT: usize = 200;

/// `event=` of an announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    None,
    Started,
    Completed,
    Stopped,
}

/// A parsed announce query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnounceRequest {
    pub info_hash: [u8; 20],
    pub peer_id: [u8; 20],
    pub port: u16,
    pub left: u64,
    pub event: Event,
    pub compact: bool,
    pub no_peer_id: bool,
    pub numwant: usize,
    /// `ip=`: honoured only for announces from loopback (a local proxy or test).
    pub ip: Option<IpAddr>,
}

/// Query pairs with percent-decoding to bytes (info_hash and peer_id are binary).
fn query_pairs(query: &str) -> Vec<(String, Vec<u8>)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = percent_decode_str(k).decode_utf8_lossy().into_owned();
            (k, percent_decode_str(v).collect())
        })
        .collect()
}

fn hash20(v: &[u8], what: &str) -> Result<[u8; 20], String> {
    v.try_into()
        .map_err(|_| format!("{what} must be 20 bytes, got {}", v.len()))
}

fn number<T: std::str::FromStr>(v: &[u8], what: &str) -> Result<T, String> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{what} is not a valid number"))
}

/// Parse an announce query string.
pub fn parse_announce(query: &str) -> Result<AnnounceRequest, String> {
    let mut info_hash = None;
    let mut peer_id = None;
    let mut port = None;
    let mut left = 0;
    let mut event = Event::None;
    let mut compact = false;
    let mut no_peer_id = false;
    let mut numwant = DEFAULT_NUMWANT;
    let mut ip = None;
    for (k, v) in query_pairs(query) {
        match k.as_str() {
            "info_hash" => info_hash = Some(hash20(&v, "info_hash")?),
            "peer_id" => peer_id = Some(hash20(&v, "peer_id")?),
            "port" => port = Some(number::<u16>(&v, "port")?),
            "left" => left = number(&v, "left")?,
            "compact" => compact = v == b"1",
            "no_peer_id" => no_peer_id = v == b"1",
            "numwant" => numwant = number::<usize>(&v, "numwant")?.min(MAX_NUMWANT),
            "ip" => ip = std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()),
            "event" => {
                event = match v.as_slice() {
                    b"started" => Event::Started,
                    b"completed" => Event::Completed,
                    b"stopped" => Event::Stopped,
                    b"" | b"empty" | b"paused" => Event::None,
                    _ => return Err("event must be started, completed or stopped".into()),
                }
            }
            "uploaded" | "downloaded" => {
                number::<u64>(&v, &k)?;
            }
            _ => {}
        }
    }
    let port = port.ok_or("port missing")?;
    if port == 0 {
        return Err("port 0".into());
    }
    Ok(AnnounceRequest {
        info_hash: info_hash.ok_or("info_hash missing")?,
        peer_id: peer_id.ok_or("peer_id missing")?,
        port,
        left,
        event,
        compact,
        no_peer_id,
        numwant,
        ip,
    })
}

/// The info hashes of a scrape query (possibly none: scrape everything).
pub fn parse_scrape(query: &str) -> Result<Vec<[u8; 20]>, String> {
    query_pairs(query)
        .into_iter()
        .filter(|(k, _)| k == "info_hash")
        .map(|(_, v)| hash20(&v, "info_hash"))
        .collect()
}

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
    /// Announces answered (including refusals).
    pub announces: AtomicU64,
    pub scrapes: AtomicU64,
}

/// The peer id under which the seeder lists itself.
const SELF_ID: [u8; 20] = *b"-SS0100-shardswarm00";

impl Tracker {
    /// A tracker for the torrents we serve, or for any info hash when `open`.
    pub fn new(open: bool) -> Tracker {
        Tracker {
            swarms: Mutex::default(),
            served: Mutex::default(),
            open,
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
    fn parses_binary_hashes_and_refuses_bad_queries() {
        let q = format!("info_hash={HASH}&peer_id=-AR0001-abcdefghijkl&port=6881&left=10&compact=1&event=started");
        let r = parse_announce(&q).unwrap();
        assert_eq!(r.info_hash[0], 1);
        assert_eq!(r.info_hash[19], 0x14);
        assert_eq!(
            (r.port, r.left, r.compact, r.event),
            (6881, 10, true, Event::Started)
        );
        for bad in [
            "peer_id=-AR0001-abcdefghijkl&port=1",
            "info_hash=abc&peer_id=-AR0001-abcdefghijkl&port=1",
            &format!("info_hash={HASH}&peer_id=-AR0001-abcdefghijkl&port=99999"),
            &format!("info_hash={HASH}&peer_id=-AR0001-abcdefghijkl&port=1&event=bogus"),
            &format!("info_hash={HASH}&peer_id=-AR0001-abcdefghijkl&port=1&left=-3"),
        ] {
            assert!(parse_announce(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn seeder_is_listed_first_and_requester_is_not_listed() {
        let t = Tracker::new(false);
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
}
