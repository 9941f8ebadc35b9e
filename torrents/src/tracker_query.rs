//! Tracker queries (BEP 3 announce, BEP 48 scrape) as the tracker receives them: parsed
//! here, apart from the tracker's server, so that the parser can be fuzzed on its own and
//! any tracker can use it.

use std::net::IpAddr;

use percent_encoding::percent_decode_str;

/// Peers an announce gets when it does not say (`numwant`), and the most it may ask for.
pub const DEFAULT_NUMWANT: usize = 50;
pub const MAX_NUMWANT: usize = 200;

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
}
