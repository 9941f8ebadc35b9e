//! HTTP endpoints: tracker, web seed, LIST_FILES / REQUEST_METADATA / REQUEST_PIECE, manifest,
//! metrics and health. Files are looked up by exact name in the catalog snapshot, never by
//! joining a request path onto the seed dir, so nothing outside it can be served.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt;
use protocol::seeder::{FileEntry, FileList, Health};
use serde_json::json;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::catalog::{url_path_encode, SeedFile};
use crate::service::{HttpCounters, Seeder};
use crate::tracker;

type AppState = Arc<Seeder>;

/// All routes.
pub fn router(seeder: Arc<Seeder>) -> Router {
    Router::new()
        .route("/announce", get(announce))
        .route("/scrape", get(scrape))
        .route("/files", get(list_files))
        .route("/manifest", get(manifest))
        .route("/relay", get(relay))
        .route("/torrents/{name}", get(torrent_file))
        .route("/metadata/{info_hash}", get(metadata))
        .route("/pieces/{info_hash}/{index}", get(piece))
        .route("/seed/{name}", get(web_seed).head(web_seed))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .with_state(seeder)
}

/// An API error: rendered as `{"error":{"code","message"}}` with its status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

/// An [`ApiError`].
pub fn error(status: StatusCode, code: &'static str, message: &str) -> ApiError {
    ApiError {
        status,
        code,
        message: message.to_owned(),
    }
}

type ApiResult = Result<Response, ApiError>;

fn bencoded(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

async fn announce(
    State(s): State<AppState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    RawQuery(q): RawQuery,
) -> Response {
    let ip = tracker::canonical(remote.ip());
    if !s.tracker.allow(ip) {
        return throttled();
    }
    match tracker::parse_announce(q.as_deref().unwrap_or("")) {
        Ok(req) => bencoded(StatusCode::OK, s.tracker.announce(&req, ip)),
        Err(e) => bencoded(
            StatusCode::BAD_REQUEST,
            tracker::failure(&format!("bad announce: {e}")),
        ),
    }
}

async fn scrape(
    State(s): State<AppState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    RawQuery(q): RawQuery,
) -> Response {
    if !s.tracker.allow(tracker::canonical(remote.ip())) {
        return throttled();
    }
    match tracker::parse_scrape(q.as_deref().unwrap_or("")) {
        Ok(hashes) => bencoded(StatusCode::OK, s.tracker.scrape(&hashes)),
        Err(e) => bencoded(
            StatusCode::BAD_REQUEST,
            tracker::failure(&format!("bad scrape: {e}")),
        ),
    }
}

/// A BEP 3 refusal for an address over its announce rate.
fn throttled() -> Response {
    bencoded(
        StatusCode::OK,
        tracker::failure("too many announces from this address; wait and announce again"),
    )
}

fn file_entry(s: &Seeder, f: &SeedFile) -> FileEntry {
    FileEntry {
        name: f.name.clone(),
        size: f.size,
        sha256: f.sha256.clone(),
        info_hash: f.info_hash_hex(),
        magnet: f.torrent.magnet(),
        torrent_url: format!(
            "{}/torrents/{}.torrent",
            s.bound.public_url,
            url_path_encode(&f.name)
        ),
        web_seed: f.torrent.web_seeds.first().cloned(),
        shard: f.shard,
    }
}

/// LIST_FILES.
async fn list_files(State(s): State<AppState>) -> Response {
    let snap = s.snapshot();
    let files = snap.by_name.values().map(|f| file_entry(&s, f)).collect();
    signed(&s, "/files", &FileList { files })
}

/// The swarm's relay: its URL and certificate, signed like `/manifest` (a coordinator hands
/// them to members, who trust exactly that certificate). 404 without `--relay-port`.
async fn relay(State(s): State<AppState>) -> ApiResult {
    match &s.bound.relay {
        Some(info) => Ok(signed(&s, "/relay", info)),
        None => Err(error(
            StatusCode::NOT_FOUND,
            "no_relay",
            "this seeder runs no relay (--relay-port)",
        )),
    }
}

/// The seed dir's shards.json with each shard's (and the vocabulary file's) info hash.
async fn manifest(State(s): State<AppState>) -> ApiResult {
    let mut manifest = match torrents::manifest::Manifest::load(&s.config.seed_dir) {
        Ok(m) => m,
        Err(torrents::Error::Io { .. }) => {
            return Err(error(
                StatusCode::NOT_FOUND,
                "no_manifest",
                "the seed dir has no shards.json",
            ))
        }
        Err(e) => {
            return Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "bad_manifest",
                &e.to_string(),
            ))
        }
    };
    let snap = s.snapshot();
    for shard in &mut manifest.shards {
        shard.info_hash = snap.by_name.get(&shard.file).map(SeedFile::info_hash_hex);
    }
    if let Some(vocab) = &mut manifest.vocab {
        vocab.info_hash = snap.by_name.get(&vocab.file).map(SeedFile::info_hash_hex);
    }
    Ok(signed(&s, "/manifest", &manifest))
}

/// `document` as JSON, signed as `name` with the seeder's key
/// ([`protocol::data::seal::SIGNATURE_HEADER`]).
fn signed(s: &AppState, name: &str, document: &impl serde::Serialize) -> Response {
    let body = serde_json::to_vec(document).expect("a document serialises");
    let signature = s.signer.sign_document(name, &body);
    (
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/json".to_owned(),
            ),
            (
                axum::http::HeaderName::from_static(protocol::data::seal::SIGNATURE_HEADER),
                signature,
            ),
        ],
        body,
    )
        .into_response()
}

async fn torrent_file(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult {
    let snap = s.snapshot();
    let f = name
        .strip_suffix(".torrent")
        .and_then(|n| snap.by_name.get(n))
        .ok_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                "unknown_file",
                &format!("no torrent named {name}"),
            )
        })?;
    Ok((
        [(header::CONTENT_TYPE, "application/x-bittorrent")],
        f.torrent_bytes.as_ref().clone(),
    )
        .into_response())
}

fn parse_hash(hex_hash: &str) -> Result<[u8; 20], ApiError> {
    let mut h = [0u8; 20];
    hex::decode_to_slice(hex_hash, &mut h).map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            "bad_info_hash",
            "an info hash is 40 hex digits",
        )
    })?;
    Ok(h)
}

/// A served file by info hash.
fn file_by_hash(s: &Seeder, h: &[u8; 20]) -> Result<SeedFile, ApiError> {
    s.snapshot().by_hash(h).cloned().ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            "unknown_info_hash",
            "no torrent with that info hash",
        )
    })
}

/// REQUEST_METADATA: the info dictionary as JSON, or bencoded with `?format=bencode`.
async fn metadata(
    State(s): State<AppState>,
    Path(hash): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let f = file_by_hash(&s, &parse_hash(&hash)?)?;
    let t = &f.torrent;
    match q.as_deref() {
        None | Some("") | Some("format=json") => Ok(Json(json!({
            "info_hash": t.info_hash_hex(),
            "name": t.name,
            "length": t.length,
            "piece length": t.piece_length,
            "piece_count": t.piece_count,
            "private": t.private,
            "pieces": t.pieces.chunks(20).map(hex::encode).collect::<Vec<_>>(),
        }))
        .into_response()),
        Some("format=bencode") => Ok((
            [(header::CONTENT_TYPE, "application/x-bittorrent")],
            t.info_bytes.clone(),
        )
            .into_response()),
        Some(other) => Err(error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            &format!("unknown query {other:?}: use format=json or format=bencode"),
        )),
    }
}

/// REQUEST_PIECE: one piece's bytes, checked against its SHA-1 before they are sent.
async fn piece(
    State(s): State<AppState>,
    Path((hash, index)): Path<(String, String)>,
) -> ApiResult {
    let h = parse_hash(&hash)?;
    let index: u64 = index.parse().map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            "bad_piece_index",
            "the piece index is a whole number",
        )
    })?;
    let f = file_by_hash(&s, &h)?;
    let size = f.torrent.piece_size(index).ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            "unknown_piece",
            &format!("the torrent has {} pieces", f.torrent.piece_count),
        )
    })?;
    let offset = index * f.torrent.piece_length;
    let read = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&f.path)?;
        let mut buf = vec![0u8; size as usize];
        file.read_exact_at(&mut buf, offset)?;
        let ok = f.torrent.piece_hash(index) == Some(Sha1::digest(&buf).as_slice());
        Ok::<_, std::io::Error>((buf, ok))
    })
    .await;
    match read {
        Ok(Ok((buf, true))) => {
            HttpCounters::counter(&s.counters.piece_api, h)
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], buf).into_response())
        }
        Ok(Ok((_, false))) => {
            let _ = s.rescan_tx.try_send(());
            Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "file_changed",
                "the file no longer matches its torrent; rescanning",
            ))
        }
        _ => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "read_failed",
            "could not read the piece",
        )),
    }
}

/// A parsed `Range: bytes=…` header (one range; a list is answered with its first).
fn parse_range(value: &str, len: u64) -> Option<(u64, u64)> {
    let spec = value.strip_prefix("bytes=")?.split(',').next()?.trim();
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            if n == 0 {
                return None;
            }
            (len.saturating_sub(n), len - 1)
        }
        (a, "") => (a.parse().ok()?, len.checked_sub(1)?),
        (a, b) => (
            a.parse().ok()?,
            b.parse::<u64>().ok()?.min(len.checked_sub(1)?),
        ),
    };
    (start <= end && start < len).then_some((start, end))
}

/// BEP 19 web seed: the file with HTTP Range support.
async fn web_seed(
    State(s): State<AppState>,
    Path(name): Path<String>,
    method: axum::http::Method,
    headers: HeaderMap,
) -> ApiResult {
    let f = s.snapshot().by_name.get(&name).cloned().ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            "unknown_file",
            &format!("no file named {name:?} is served"),
        )
    })?;
    let len = f.size;
    let (status, start, end) = match headers.get(header::RANGE).map(|v| v.to_str().unwrap_or("")) {
        None => (StatusCode::OK, 0, len - 1),
        Some(r) => match parse_range(r, len) {
            Some((a, b)) => (StatusCode::PARTIAL_CONTENT, a, b),
            None => {
                let mut resp = error(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "bad_range",
                    &format!("range {r:?} is not within 0..{len}"),
                )
                .into_response();
                let all = HeaderValue::from_str(&format!("bytes */{len}")).expect("ASCII header");
                resp.headers_mut().insert(header::CONTENT_RANGE, all);
                return Ok(resp);
            }
        },
    };
    let count = end - start + 1;
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, count);
    if status == StatusCode::PARTIAL_CONTENT {
        builder = builder.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"));
    }
    if method == axum::http::Method::HEAD {
        return Ok(builder.body(Body::empty()).expect("valid response"));
    }
    let read_failed = |e: std::io::Error| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "read_failed",
            &e.to_string(),
        )
    };
    let mut file = tokio::fs::File::open(&f.path).await.map_err(read_failed)?;
    file.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(read_failed)?;
    let counter = HttpCounters::counter(&s.counters.webseed, f.torrent.info_hash);
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(count), 256 << 10).map(
        move |chunk| {
            if let Ok(c) = &chunk {
                counter.fetch_add(c.len() as u64, Ordering::Relaxed);
            }
            chunk
        },
    );
    Ok(builder
        .body(Body::from_stream(stream))
        .expect("valid response"))
}

async fn healthz(State(s): State<AppState>) -> Response {
    Json(Health {
        status: "ok".into(),
        files: s.snapshot().by_name.len(),
        peer: s.self_peer.to_string(),
    })
    .into_response()
}

/// Prometheus text exposition.
async fn metrics(State(s): State<AppState>) -> Response {
    let snap = s.snapshot();
    let sum = |m: &std::sync::RwLock<HashMap<[u8; 20], Arc<std::sync::atomic::AtomicU64>>>,
               h: &[u8; 20]| {
        m.read()
            .unwrap()
            .get(h)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    };
    let mut m = SeederMetrics::default();
    for f in snap.by_name.values() {
        let h = f.torrent.info_hash;
        let file = vec![("file", f.name.clone()), ("info_hash", f.info_hash_hex())];
        let labels = |(key, value): (&'static str, &str)| {
            let mut l = file.clone();
            l.push((key, value.to_owned()));
            l
        };
        let stats = s
            .session
            .get(librqbit::dht::Id20::new(h).into())
            .map(|t| t.stats());
        let bt = stats.as_ref().map_or(0, |st| st.uploaded_bytes);
        let live = stats
            .as_ref()
            .and_then(|st| st.live.as_ref())
            .map_or(0, |l| l.snapshot.peer_stats.live);
        m.uploaded.push((labels(("source", "bittorrent")), bt));
        m.uploaded
            .push((labels(("source", "webseed")), sum(&s.counters.webseed, &h)));
        m.uploaded.push((
            labels(("source", "piece_api")),
            sum(&s.counters.piece_api, &h),
        ));
        m.peers.push((file.clone(), live as i64));
        if let Some(c) = s.tracker.counts(&h) {
            m.tracker_peers
                .push((labels(("state", "seeder")), c.complete as i64));
            m.tracker_peers
                .push((labels(("state", "leecher")), c.incomplete as i64));
        }
    }
    m.announces = s.tracker.announces.load(Ordering::Relaxed);
    m.scrapes = s.tracker.scrapes.load(Ordering::Relaxed);
    m.throttled = s.tracker.throttled.load(Ordering::Relaxed);
    m.files = snap.by_name.len() as i64;
    daemon::metrics::answer(daemon::metrics::encode_collected("shardswarm", m))
}

/// A family of one sample without labels.
fn one_sample<V>(value: V) -> [(Vec<(&'static str, String)>, V); 1] {
    [(Vec::new(), value)]
}

/// The seeder's numbers at one scrape.
#[derive(Debug, Default)]
struct SeederMetrics {
    uploaded: Vec<(Vec<(&'static str, String)>, u64)>,
    peers: Vec<(Vec<(&'static str, String)>, i64)>,
    tracker_peers: Vec<(Vec<(&'static str, String)>, i64)>,
    announces: u64,
    scrapes: u64,
    throttled: u64,
    files: i64,
}

impl daemon::metrics::Collector for SeederMetrics {
    fn encode(&self, mut e: daemon::metrics::DescriptorEncoder) -> std::fmt::Result {
        use daemon::metrics::{family, ConstCounter, ConstGauge};
        family(&mut e, ConstCounter::new, "seeder_uploaded_bytes", "Bytes sent, by file and source (bittorrent: peer wire; webseed: /seed; piece_api: /pieces)", None, &self.uploaded)?;
        family(
            &mut e,
            ConstGauge::new,
            "seeder_peers",
            "Peers connected to the seeder over the peer wire",
            None,
            &self.peers,
        )?;
        family(
            &mut e,
            ConstGauge::new,
            "tracker_peers",
            "Peers in the tracker's swarms (the seeder included)",
            None,
            &self.tracker_peers,
        )?;
        family(
            &mut e,
            ConstCounter::new,
            "tracker_announces",
            "Announces answered",
            None,
            &one_sample(self.announces),
        )?;
        family(
            &mut e,
            ConstCounter::new,
            "tracker_scrapes",
            "Scrapes answered",
            None,
            &one_sample(self.scrapes),
        )?;
        family(
            &mut e,
            ConstCounter::new,
            "tracker_throttled",
            "Announces and scrapes refused for their address's rate",
            None,
            &one_sample(self.throttled),
        )?;
        family(
            &mut e,
            ConstGauge::new,
            "seeder_files",
            "Files served",
            None,
            &one_sample(self.files),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=50-500", 100), Some((50, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=9-3", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=-0", 100), None);
    }
}
