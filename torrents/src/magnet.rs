//! Magnet links (BEP 9), parsed strictly: what `shard_loader torrent show` reads when given a
//! link instead of a file, and what a fuzz target feeds with garbage. A link names one v1
//! torrent by its info hash (`xt=urn:btih:`, 40 hex digits or 32 base32 characters), with
//! optional display name (`dn`), length (`xl`), trackers (`tr`) and web seeds (`ws`).

use percent_encoding::percent_decode_str;

use crate::error::{Error, Result};

/// Links longer than this are refused (real ones are a few hundred bytes).
pub const MAX_LINK: usize = 64 << 10;
/// Trackers or web seeds one link may list.
pub const MAX_URLS: usize = 100;

/// What a magnet link says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Magnet {
    pub info_hash: [u8; 20],
    pub name: Option<String>,
    pub length: Option<u64>,
    pub trackers: Vec<String>,
    pub web_seeds: Vec<String>,
}

impl Magnet {
    /// The info hash as 40 lower-case hex digits.
    pub fn info_hash_hex(&self) -> String {
        hex::encode(self.info_hash)
    }
}

fn bad(message: impl Into<String>) -> Error {
    Error::Metainfo(format!("magnet link: {}", message.into()))
}

/// Parse a `magnet:?…` link.
pub fn parse(link: &str) -> Result<Magnet> {
    if link.len() > MAX_LINK {
        return Err(bad(format!("{} bytes is over the limit", link.len())));
    }
    let query = link
        .strip_prefix("magnet:?")
        .ok_or_else(|| bad("does not start with magnet:?"))?;
    let mut info_hash = None;
    let mut other_xt = None;
    let (mut name, mut length) = (None, None);
    let (mut trackers, mut web_seeds) = (Vec::new(), Vec::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| bad(format!("parameter {pair:?} has no value")))?;
        let value = percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| bad(format!("{key} is not UTF-8 once decoded")))?;
        match key {
            "xt" => match value.strip_prefix("urn:btih:") {
                Some(hash) => {
                    if info_hash.replace(btih(hash)?).is_some() {
                        return Err(bad("more than one urn:btih info hash"));
                    }
                }
                None => other_xt = Some(value.into_owned()),
            },
            "dn" => name = Some(value.into_owned()),
            "xl" => {
                length = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| bad(format!("xl {value:?} is not a byte count")))?,
                )
            }
            "tr" | "ws" => {
                let list = if key == "tr" {
                    &mut trackers
                } else {
                    &mut web_seeds
                };
                if !(value.starts_with("http://")
                    || value.starts_with("https://")
                    || (key == "tr" && value.starts_with("udp://")))
                {
                    return Err(bad(format!("{key} {value:?} is not a usable URL")));
                }
                if list.len() == MAX_URLS {
                    return Err(bad(format!("more than {MAX_URLS} {key} URLs")));
                }
                list.push(value.into_owned());
            }
            _ => {} // BEP 9 and later BEPs define more (x.pe, so, …): not needed to fetch.
        }
    }
    let info_hash = info_hash.ok_or_else(|| match other_xt {
        Some(xt) => bad(format!(
            "{xt:?} is not a BitTorrent v1 info hash (urn:btih:); v2-only torrents are not supported"
        )),
        None => bad("no xt=urn:btih: info hash"),
    })?;
    Ok(Magnet {
        info_hash,
        name,
        length,
        trackers,
        web_seeds,
    })
}

/// A v1 info hash: 40 hex digits, or 32 base32 characters (BEP 9 allows both).
fn btih(s: &str) -> Result<[u8; 20]> {
    let bytes = match s.len() {
        40 => hex::decode(s).map_err(|_| bad(format!("info hash {s:?} is not hex")))?,
        32 => data_encoding::BASE32
            .decode(s.to_ascii_uppercase().as_bytes())
            .map_err(|_| bad(format!("info hash {s:?} is not base32")))?,
        n => {
            return Err(bad(format!(
                "info hash of {n} characters (40 hex or 32 base32)"
            )))
        }
    };
    bytes
        .try_into()
        .map_err(|_| bad("info hash is not 20 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_we_make_parse_back_and_bad_ones_are_refused() {
        let link = "magnet:?xt=urn:btih:0102030405060708090a0b0c0d0e0f1011121314&dn=shard-0.gguf\
                    &xl=1048576&tr=http%3A%2F%2F127.0.0.1%3A51821%2Fannounce&ws=http%3A%2F%2Fh%2Ff";
        let m = parse(link).unwrap();
        assert_eq!(
            m.info_hash_hex(),
            "0102030405060708090a0b0c0d0e0f1011121314"
        );
        assert_eq!(m.name.as_deref(), Some("shard-0.gguf"));
        assert_eq!(m.length, Some(1 << 20));
        assert_eq!(m.trackers, ["http://127.0.0.1:51821/announce"]);
        assert_eq!(m.web_seeds, ["http://h/f"]);
        // Base32, as some clients write it.
        let b32 = data_encoding::BASE32.encode(&m.info_hash).to_lowercase();
        assert_eq!(
            parse(&format!("magnet:?xt=urn:btih:{b32}"))
                .unwrap()
                .info_hash,
            m.info_hash
        );
        for (bad_link, why) in [
            ("http://x", "magnet:?"),
            ("magnet:?dn=x", "no xt"),
            ("magnet:?xt=urn:btmh:1220abcd", "v2-only"),
            ("magnet:?xt=urn:btih:0102", "4 characters"),
            (
                "magnet:?xt=urn:btih:zz02030405060708090a0b0c0d0e0f1011121314",
                "not hex",
            ),
            (
                "magnet:?xt=urn:btih:0102030405060708090a0b0c0d0e0f1011121314&xl=-1",
                "byte count",
            ),
            (
                "magnet:?xt=urn:btih:0102030405060708090a0b0c0d0e0f1011121314&tr=file%3A%2F%2Fx",
                "usable URL",
            ),
            (
                "magnet:?xt=urn:btih:0102030405060708090a0b0c0d0e0f1011121314&dn=%FF",
                "UTF-8",
            ),
            ("magnet:?xt", "no value"),
        ] {
            let e = parse(bad_link).unwrap_err().to_string();
            assert!(e.contains(why), "{bad_link}: {e}");
        }
    }
}
