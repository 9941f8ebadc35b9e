//! BitTorrent v1 metainfo: creating `.torrent` files, parsing untrusted ones, magnet links.
//!
//! Not `librqbit::create_torrent` (design.md): in 9.x it adds a spurious empty piece hash when
//! the length is a multiple of the piece length, writes no top-level `announce`, fixes the piece
//! length at 2 MiB, has no `private`/`url-list`, and does not percent-encode magnet trackers. Here
//! the info dictionary is exactly `{length, name, piece length, pieces[, private]}` with sorted
//! keys, the same bytes `mktorrent` writes, so both give the same info hash.

use std::collections::HashMap;
use std::path::Path;

use lava_torrent::bencode::BencodeElem;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Serialize;
use sha1::{Digest, Sha1};

use crate::bencode::{self, Node};
use crate::error::{Error, Result};
use crate::hashing::piece_hashes;

/// Largest `.torrent` we parse.
pub const MAX_TORRENT_BYTES: usize = 64 << 20;
/// Smallest piece length we make or accept (BitTorrent's block size).
pub const MIN_PIECE_LENGTH: u64 = 16 << 10;
/// Largest piece length we make or accept (mktorrent's limit, 2^28).
pub const MAX_PIECE_LENGTH: u64 = 1 << 28;
/// Files in a multi-file torrent we accept.
const MAX_FILES: usize = 100_000;

/// Piece length for a file of `size` bytes when none is given: the power of two that gives
/// 1000–2000 pieces, within 32 KiB..16 MiB (as mktorrent and libtorrent choose). Deterministic,
/// so the same file gets the same info hash everywhere.
pub fn default_piece_length(size: u64) -> u64 {
    size.div_ceil(2000)
        .next_power_of_two()
        .clamp(32 << 10, 16 << 20)
}

/// What to put in a new torrent besides the file.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Tracker URLs; the first is `announce`, and with more than one each is a tier of
    /// `announce-list` (BEP 12).
    pub announce: Vec<String>,
    /// BEP 19 web seed URLs (`url-list`).
    pub web_seeds: Vec<String>,
    /// BEP 27 private flag (in the info dictionary, so it changes the info hash).
    pub private: bool,
    /// Piece length; `None` = [`default_piece_length`].
    pub piece_length: Option<u64>,
    pub comment: Option<String>,
    /// Name in the info dictionary; `None` = the file's name.
    pub name: Option<String>,
    /// `creation date` (Unix seconds); `None` leaves it out, which keeps the file deterministic.
    pub creation_date: Option<i64>,
    /// Hashing threads; 0 = one per core.
    pub threads: usize,
}

/// One file of a multi-file torrent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileEntry {
    pub path: Vec<String>,
    pub length: u64,
}

/// A parsed and checked `.torrent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Metainfo {
    /// v1 info hash: SHA-1 of the info dictionary's bytes as they appear in the file.
    #[serde(serialize_with = "hex_ser")]
    pub info_hash: [u8; 20],
    pub name: String,
    /// Total bytes.
    pub length: u64,
    pub piece_length: u64,
    pub piece_count: u64,
    pub private: bool,
    /// Tracker tiers (announce-list, or the single announce).
    pub trackers: Vec<Vec<String>>,
    pub web_seeds: Vec<String>,
    /// Empty for a single-file torrent.
    pub files: Vec<FileEntry>,
    pub comment: Option<String>,
    pub created_by: Option<String>,
    pub creation_date: Option<i64>,
    #[serde(skip)]
    pub pieces: Vec<u8>,
    /// The bencoded info dictionary (what `ut_metadata` and REQUEST_METADATA hand out).
    #[serde(skip)]
    pub info_bytes: Vec<u8>,
}

fn hex_ser<S: serde::Serializer>(h: &[u8; 20], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(h))
}

/// Characters left as they are in magnet parameters (RFC 3986 unreserved).
const MAGNET_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

impl Metainfo {
    /// The info hash as 40 lower-case hex digits.
    pub fn info_hash_hex(&self) -> String {
        hex::encode(self.info_hash)
    }

    /// Every tracker URL, tiers flattened, without repeats.
    pub fn tracker_urls(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for url in self.trackers.iter().flatten() {
            if !out.contains(url) {
                out.push(url.clone());
            }
        }
        out
    }

    /// SHA-1 of piece `index`.
    pub fn piece_hash(&self, index: u64) -> Option<&[u8]> {
        let i = usize::try_from(index).ok()?;
        self.pieces.get(i * 20..i * 20 + 20)
    }

    /// Byte length of piece `index` (the last may be short).
    pub fn piece_size(&self, index: u64) -> Option<u64> {
        (index < self.piece_count).then(|| {
            self.piece_length
                .min(self.length - index * self.piece_length)
        })
    }

    /// `magnet:?xt=urn:btih:…&dn=…&xl=…&tr=…&ws=…` with every value percent-encoded.
    pub fn magnet(&self) -> String {
        let enc = |s: &str| utf8_percent_encode(s, MAGNET_SET).to_string();
        let mut m = format!(
            "magnet:?xt=urn:btih:{}&dn={}&xl={}",
            self.info_hash_hex(),
            enc(&self.name),
            self.length
        );
        for tr in self.tracker_urls() {
            m.push_str("&tr=");
            m.push_str(&enc(&tr));
        }
        for ws in &self.web_seeds {
            m.push_str("&ws=");
            m.push_str(&enc(ws));
        }
        m
    }
}

fn check_piece_length(p: u64) -> Result<()> {
    if !p.is_power_of_two() || !(MIN_PIECE_LENGTH..=MAX_PIECE_LENGTH).contains(&p) {
        return Err(Error::Argument(format!(
            "piece length {p} must be a power of two from {MIN_PIECE_LENGTH} to {MAX_PIECE_LENGTH}"
        )));
    }
    Ok(())
}

/// Check a name (or path component) that a client will turn into a file name.
fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(format!("file name {name:?} is not usable"));
    }
    if name.contains(['/', '\\', '\0']) {
        return Err(format!(
            "file name {name:?} contains a path separator or NUL"
        ));
    }
    Ok(())
}

/// Hash `path` and make its `.torrent`. Returns the bencoded file and its parsed form.
pub fn create(
    path: &Path,
    opts: &CreateOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(Vec<u8>, Metainfo)> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::Argument(format!(
            "{}: not a regular file (one file per torrent)",
            path.display()
        )));
    }
    if meta.len() == 0 {
        return Err(Error::Argument(format!(
            "{}: empty file: nothing to share",
            path.display()
        )));
    }
    let piece_length = opts
        .piece_length
        .unwrap_or_else(|| default_piece_length(meta.len()));
    check_piece_length(piece_length)?;
    let name = match &opts.name {
        Some(n) => n.clone(),
        None => path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::Argument(format!("{}: file name is not UTF-8", path.display())))?
            .to_owned(),
    };
    check_name(&name).map_err(Error::Argument)?;
    check_urls(opts)?;
    let (length, pieces) = piece_hashes(path, piece_length, opts.threads, progress)?;
    encode(&name, length, piece_length, pieces, opts)
}

fn check_urls(opts: &CreateOptions) -> Result<()> {
    for url in opts.announce.iter().chain(&opts.web_seeds) {
        if url.trim().is_empty() || url.contains(char::is_whitespace) {
            return Err(Error::Argument(format!(
                "URL {url:?} is empty or has spaces"
            )));
        }
    }
    Ok(())
}

/// The same torrent with other trackers, web seeds, comment or date: the info dictionary, and
/// so the info hash, stay as they are and nothing is hashed again.
pub fn rewrap(existing: &Metainfo, opts: &CreateOptions) -> Result<(Vec<u8>, Metainfo)> {
    check_urls(opts)?;
    if !existing.files.is_empty() {
        return Err(Error::Argument(
            "only single-file torrents can be rewrapped".into(),
        ));
    }
    let opts = CreateOptions {
        private: existing.private,
        ..opts.clone()
    };
    encode(
        &existing.name,
        existing.length,
        existing.piece_length,
        existing.pieces.clone(),
        &opts,
    )
}

fn encode(
    name: &str,
    length: u64,
    piece_length: u64,
    pieces: Vec<u8>,
    opts: &CreateOptions,
) -> Result<(Vec<u8>, Metainfo)> {
    let mut info: HashMap<String, BencodeElem> = HashMap::new();
    info.insert("length".into(), BencodeElem::Integer(length as i64));
    info.insert("name".into(), BencodeElem::String(name.to_owned()));
    info.insert(
        "piece length".into(),
        BencodeElem::Integer(piece_length as i64),
    );
    info.insert("pieces".into(), BencodeElem::Bytes(pieces));
    if opts.private {
        info.insert("private".into(), BencodeElem::Integer(1));
    }
    let mut top: HashMap<String, BencodeElem> = HashMap::new();
    if let Some(first) = opts.announce.first() {
        top.insert("announce".into(), BencodeElem::String(first.clone()));
    }
    if opts.announce.len() > 1 {
        let tiers = opts
            .announce
            .iter()
            .map(|u| BencodeElem::List(vec![BencodeElem::String(u.clone())]))
            .collect();
        top.insert("announce-list".into(), BencodeElem::List(tiers));
    }
    match opts.web_seeds.as_slice() {
        [] => {}
        [one] => {
            top.insert("url-list".into(), BencodeElem::String(one.clone()));
        }
        many => {
            let list = many
                .iter()
                .map(|u| BencodeElem::String(u.clone()))
                .collect();
            top.insert("url-list".into(), BencodeElem::List(list));
        }
    }
    if let Some(c) = &opts.comment {
        top.insert("comment".into(), BencodeElem::String(c.clone()));
    }
    top.insert(
        "created by".into(),
        BencodeElem::String(concat!("shardswarm ", env!("CARGO_PKG_VERSION")).into()),
    );
    if let Some(d) = opts.creation_date {
        top.insert("creation date".into(), BencodeElem::Integer(d));
    }
    top.insert("info".into(), BencodeElem::Dictionary(info));
    let bytes = BencodeElem::Dictionary(top).encode();
    let parsed = parse(&bytes)?;
    Ok((bytes, parsed))
}

/// Parse and check an untrusted `.torrent`: size and depth limits, a usable name (no `..`, no
/// separators, no absolute paths), a power-of-two piece length, `pieces` a multiple of 20 that
/// matches the length.
pub fn parse(bytes: &[u8]) -> Result<Metainfo> {
    let bad = |m: String| Error::Metainfo(m);
    if bytes.len() > MAX_TORRENT_BYTES {
        return Err(bad(format!(
            "{} bytes is larger than the {MAX_TORRENT_BYTES}-byte limit",
            bytes.len()
        )));
    }
    let root = bencode::decode(bytes).map_err(|e| bad(e.to_string()))?;
    if !matches!(root.value, bencode::Bencode::Dict(_)) {
        return Err(bad("top level is not a dictionary".into()));
    }
    let info = root
        .get("info")
        .ok_or_else(|| bad("no info dictionary".into()))?;
    if !matches!(info.value, bencode::Bencode::Dict(_)) {
        return Err(bad("info is not a dictionary".into()));
    }
    let info_bytes = bytes[info.span.clone()].to_vec();
    let info_hash: [u8; 20] = Sha1::digest(&info_bytes).into();
    let name = info
        .get("name")
        .and_then(Node::as_str)
        .ok_or_else(|| bad("info.name missing or not UTF-8".into()))?
        .to_owned();
    check_name(&name).map_err(bad)?;
    let piece_length = positive(info, "piece length")?;
    check_piece_length(piece_length)
        .map_err(|e| bad(e.to_string().replace("invalid argument: ", "")))?;
    let pieces = info
        .get("pieces")
        .and_then(Node::as_bytes)
        .ok_or_else(|| bad("info.pieces missing".into()))?;
    if pieces.len() % 20 != 0 {
        return Err(bad(format!(
            "info.pieces is {} bytes, not a multiple of 20",
            pieces.len()
        )));
    }
    let (length, files) = match (info.get("length"), info.get("files")) {
        (Some(_), None) => (positive(info, "length")?, Vec::new()),
        (None, Some(list)) => {
            let list = list
                .as_list()
                .ok_or_else(|| bad("info.files is not a list".into()))?;
            if list.is_empty() || list.len() > MAX_FILES {
                return Err(bad(format!("info.files has {} entries", list.len())));
            }
            let mut files = Vec::with_capacity(list.len());
            let mut total: u64 = 0;
            for f in list {
                let length = f
                    .get("length")
                    .and_then(Node::as_int)
                    .and_then(|l| u64::try_from(l).ok())
                    .ok_or_else(|| bad("a file has no valid length".into()))?;
                let path = f
                    .get("path")
                    .and_then(Node::as_list)
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| bad("a file has no path".into()))?
                    .iter()
                    .map(|c| {
                        let c = c
                            .as_str()
                            .ok_or_else(|| bad("path component not UTF-8".into()))?;
                        check_name(c).map_err(bad)?;
                        Ok(c.to_owned())
                    })
                    .collect::<Result<Vec<_>>>()?;
                total = total
                    .checked_add(length)
                    .ok_or_else(|| bad("file lengths overflow".into()))?;
                files.push(FileEntry { path, length });
            }
            if total == 0 {
                return Err(bad("all files are empty".into()));
            }
            (total, files)
        }
        (Some(_), Some(_)) => return Err(bad("info has both length and files".into())),
        (None, None) => return Err(bad("info has neither length nor files".into())),
    };
    let piece_count = length.div_ceil(piece_length);
    if pieces.len() as u64 != piece_count * 20 {
        return Err(bad(format!(
            "{} piece hashes for {length} bytes in {piece_length}-byte pieces (expected {piece_count})",
            pieces.len() / 20
        )));
    }
    let private = match info.get("private").map(Node::as_int) {
        None => false,
        Some(Some(0)) => false,
        Some(Some(1)) => true,
        Some(_) => return Err(bad("info.private is not 0 or 1".into())),
    };
    let mut trackers: Vec<Vec<String>> = Vec::new();
    if let Some(list) = root.get("announce-list").and_then(Node::as_list) {
        for tier in list {
            let urls: Vec<String> = tier
                .as_list()
                .ok_or_else(|| bad("announce-list tier is not a list".into()))?
                .iter()
                .filter_map(|u| u.as_str().map(str::to_owned))
                .collect();
            if !urls.is_empty() {
                trackers.push(urls);
            }
        }
    }
    if trackers.is_empty() {
        if let Some(a) = root.get("announce").and_then(Node::as_str) {
            trackers.push(vec![a.to_owned()]);
        }
    }
    let web_seeds = match root.get("url-list") {
        None => Vec::new(),
        Some(n) => match (n.as_str(), n.as_list()) {
            (Some(""), _) => Vec::new(),
            (Some(s), _) => vec![s.to_owned()],
            (_, Some(l)) => l
                .iter()
                .filter_map(|u| u.as_str().map(str::to_owned))
                .collect(),
            _ => return Err(bad("url-list is neither a string nor a list".into())),
        },
    };
    Ok(Metainfo {
        info_hash,
        name,
        length,
        piece_length,
        piece_count,
        private,
        trackers,
        web_seeds,
        files,
        comment: root
            .get("comment")
            .and_then(Node::as_str)
            .map(str::to_owned),
        created_by: root
            .get("created by")
            .and_then(Node::as_str)
            .map(str::to_owned),
        creation_date: root.get("creation date").and_then(Node::as_int),
        pieces: pieces.to_vec(),
        info_bytes,
    })
}

fn positive(dict: &Node<'_>, key: &str) -> Result<u64> {
    dict.get(key)
        .and_then(Node::as_int)
        .and_then(|v| u64::try_from(v).ok())
        .filter(|&v| v > 0)
        .ok_or_else(|| Error::Metainfo(format!("info.{key} missing or not a positive integer")))
}

/// Read and parse a `.torrent` file, refusing oversized ones before reading them.
pub fn read_file(path: &Path) -> Result<Metainfo> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if len > MAX_TORRENT_BYTES as u64 {
        return Err(Error::Metainfo(format!(
            "{}: {len} bytes is too large for a .torrent",
            path.display()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse(&bytes).map_err(|e| match e {
        Error::Metainfo(m) => Error::Metainfo(format!("{}: {m}", path.display())),
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_piece_lengths() {
        assert_eq!(default_piece_length(1), 32 << 10);
        assert_eq!(default_piece_length(1 << 30), 1 << 20);
        assert_eq!(default_piece_length(1 << 40), 16 << 20);
        for size in [1u64 << 26, 3 << 28, 123_456_789] {
            let n = size.div_ceil(default_piece_length(size));
            assert!((1000..=2000).contains(&n), "{size}: {n} pieces");
        }
    }

    fn tmp_file(len: usize) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(f.path(), data).unwrap();
        f
    }

    #[test]
    fn create_round_trips_and_counts_pieces_exactly() {
        let p = 32 << 10;
        for len in [1, p - 1, p, 3 * p, 3 * p + 1] {
            let f = tmp_file(len as usize);
            let opts = CreateOptions {
                announce: vec!["http://a/announce".into(), "http://b/announce".into()],
                web_seeds: vec!["http://w/seed/x%20y".into()],
                piece_length: Some(p),
                name: Some("x y".into()),
                ..Default::default()
            };
            let (bytes, m) = create(f.path(), &opts, &|_| {}).unwrap();
            assert_eq!(m.length, len);
            assert_eq!(m.piece_count, len.div_ceil(p));
            assert_eq!(m.pieces.len() as u64, m.piece_count * 20);
            assert_eq!(parse(&bytes).unwrap(), m);
            assert!(m.magnet().contains("&dn=x%20y&xl="));
            assert!(m
                .magnet()
                .contains("&tr=http%3A%2F%2Fa%2Fannounce&tr=http%3A%2F%2Fb%2Fannounce"));
        }
    }

    #[test]
    fn hostile_metainfo_is_refused() {
        let mk = |info: &str| format!("d4:info{info}e").into_bytes();
        let cases = [
            (mk("d6:lengthi1e4:name2:..12:piece lengthi32768e6:pieces20:aaaaaaaaaaaaaaaaaaaae"), "not usable"),
            (mk("d6:lengthi1e4:name3:a/b12:piece lengthi32768e6:pieces20:aaaaaaaaaaaaaaaaaaaae"), "separator"),
            (mk("d6:lengthi1e4:name1:a12:piece lengthi0e6:pieces20:aaaaaaaaaaaaaaaaaaaae"), "piece length"),
            (mk("d6:lengthi1e4:name1:a12:piece lengthi32768e6:pieces19:aaaaaaaaaaaaaaaaaaae"), "multiple of 20"),
            (mk("d6:lengthi99999999e4:name1:a12:piece lengthi32768e6:pieces20:aaaaaaaaaaaaaaaaaaaae"), "expected"),
            (mk("d5:filesld6:lengthi1e4:pathl2:..eee4:name1:a12:piece lengthi32768e6:pieces20:aaaaaaaaaaaaaaaaaaaae"), "not usable"),
            (b"le".to_vec(), "not a dictionary"),
        ];
        for (bytes, want) in cases {
            let e = parse(&bytes).unwrap_err().to_string();
            assert!(e.contains(want), "{e} lacks {want}");
        }
    }
}
