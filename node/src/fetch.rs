//! Fetching shards with an embedded librqbit client and seeding them on.
//!
//! One librqbit session per node, listening on the node's peer port so other nodes can fetch
//! from it, with fast resume in the data dir so a restarted node continues a download without
//! fetching verified pieces again. A fetch reports progress at most once a second, then checks
//! the sha256 and the GGUF header before the shard counts as loaded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use librqbit::dht::Id20;
use librqbit::{
    AddTorrent, AddTorrentOptions, ListenerMode, ListenerOptions, Session, SessionOptions,
};
use protocol::{LoadShardParams, ShardFailedParams, ShardLoadedParams, ShardProgressParams};
use tokio::sync::mpsc;

use crate::store::DataDir;
use crate::{Error, Result};

/// How often a fetch reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How often a fetch looks at its progress.
const STALL_CHECK: Duration = Duration::from_millis(250);
/// A replica that has made no progress for this long reconnects to its source. It trails a
/// node that is still fetching, and librqbit 9.1 loses track of that node's new pieces in two
/// ways: a piece the source completes between sending its bitfield and receiving ours is never
/// announced (no HAVE goes to a peer whose bitfield it lacks), and a peer that had nothing to
/// request sleeps 5 s before it looks again (a HAVE does not wake it). Both leave the replica
/// idle while its source has what it needs; a new connection starts with the source's whole
/// bitfield and asks at once. bench/swarm.py at N=8: 1.5 s gave 1.44x the bound (median of
/// 3), 750 ms 1.27x; a replica gets ~30 pieces a second while it trails, so 750 ms without
/// one is idleness.
const STALL_AFTER: Duration = Duration::from_millis(750);
/// The longest a replica waits between reconnects while its source has nothing new.
const STALL_AFTER_MAX: Duration = Duration::from_secs(8);

/// What a fetch reports to the control channel.
#[derive(Debug)]
pub enum FetchEvent {
    /// The stage of a ROUTE is loaded: (request id, stage).
    Routed(String, u32),
    Progress(ShardProgressParams),
    Loaded(ShardLoadedParams),
    Failed(ShardFailedParams),
}

/// The node's BitTorrent side.
pub struct Fetcher {
    pub session: Arc<Session>,
    pub data: Arc<DataDir>,
    /// Info hash → whether this process added it with the tracker on.
    modes: Mutex<HashMap<[u8; 20], bool>>,
}

impl Fetcher {
    /// Start the session listening on `listen`.
    pub async fn start(data: Arc<DataDir>, listen: SocketAddr) -> Result<Fetcher> {
        std::fs::create_dir_all(data.session_dir())
            .map_err(|e| daemon::IoError::new(data.session_dir().display().to_string(), e))?;
        let session = Session::new_with_opts(
            data.shards_dir(),
            SessionOptions {
                dht: None,
                disable_local_service_discovery: true,
                fastresume: true,
                persistence: Some(librqbit::SessionPersistenceConfig::Json {
                    folder: Some(data.session_dir()),
                }),
                listen: Some(ListenerOptions {
                    mode: ListenerMode::TcpAndUtp,
                    listen_addr: listen,
                    ipv4_only: listen.is_ipv4(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| Error::torrent(format_args!("starting the BitTorrent session: {e:#}")))?;
        Ok(Fetcher {
            session,
            data,
            modes: Mutex::default(),
        })
    }

    /// The BitTorrent port other nodes reach us on.
    pub fn peer_port(&self) -> u16 {
        self.session.listen_addr().map_or(0, |a| a.port())
    }

    /// Fetch, verify and keep seeding one shard, reporting through `events`.
    pub async fn load(
        self: Arc<Self>,
        p: LoadShardParams,
        events: mpsc::UnboundedSender<FetchEvent>,
    ) {
        let shard_id = p.shard_id;
        let result = self.load_inner(&p, &events).await;
        let event = match result {
            Ok(loaded) => FetchEvent::Loaded(loaded),
            Err((code, e)) => {
                tracing::warn!("shard {shard_id}: {e:#}");
                FetchEvent::Failed(ShardFailedParams {
                    shard_id,
                    code: code.into(),
                    message: format!("{e:#}"),
                })
            }
        };
        let _ = events.send(event);
    }

    async fn load_inner(
        &self,
        p: &LoadShardParams,
        events: &mpsc::UnboundedSender<FetchEvent>,
    ) -> Result<ShardLoadedParams, (&'static str, Error)> {
        if torrents::split::parse_shard_file_name(&p.file).is_none() {
            return Err((
                "bad_params",
                Error::Shard(format!("{:?} is not a shard file name", p.file)),
            ));
        }
        if let Some((_, sha)) = self.data.verified().into_iter().find(|(n, _)| *n == p.file) {
            if sha == p.sha256 {
                self.seed_existing(p).await.map_err(|e| ("torrent", e))?;
                tracing::info!("[TORRENT] Found file: {} (already verified)", p.file);
                return Ok(ShardLoadedParams {
                    shard_id: p.shard_id,
                    sha256: sha,
                    from_seeder: 0,
                    from_peers: 0,
                });
            }
        }
        let have = std::fs::metadata(self.data.shards_dir().join(&p.file)).map_or(0, |m| m.len());
        let free = self.data.disk_free();
        if free + have < p.size {
            return Err((
                "no_space",
                Error::Shard(format!("{} needs {} bytes, {free} free", p.file, p.size)),
            ));
        }
        let handle = self.add(p).await.map_err(|e| ("torrent", e))?;
        let replica = !p.use_tracker && !p.peers.is_empty();
        let seeder: Option<String> = p.seeder_peer.clone();
        let mut tick = tokio::time::interval(STALL_CHECK);
        let mut last_report: Option<tokio::time::Instant> = None;
        let mut last_progress = (0, tokio::time::Instant::now());
        let mut stall_after = STALL_AFTER;
        // Bytes counted on connections a reconnect has closed (librqbit's per-peer counters
        // start again with each connection).
        let mut earlier = (0, 0);
        let (mut from_seeder, mut from_peers);
        loop {
            tick.tick().await;
            let stats = handle.stats();
            let now_counted = split_by_source(&handle, seeder.as_deref());
            (from_seeder, from_peers) = (earlier.0 + now_counted.0, earlier.1 + now_counted.1);
            if let Some(e) = stats.error {
                return Err(("torrent", Error::Torrent(e)));
            }
            let now = tokio::time::Instant::now();
            if last_report.is_none_or(|t| now - t >= PROGRESS_EVERY) {
                last_report = Some(now);
                let _ = events.send(FetchEvent::Progress(ShardProgressParams {
                    shard_id: p.shard_id,
                    bytes: stats.progress_bytes,
                    total: stats.total_bytes,
                    from_seeder,
                    from_peers,
                }));
            }
            if stats.finished {
                break;
            }
            if stats.progress_bytes != last_progress.0 {
                last_progress = (stats.progress_bytes, now);
                stall_after = STALL_AFTER;
            } else if replica && now - last_progress.1 >= stall_after {
                // See STALL_AFTER: a new connection brings the source's whole bitfield.
                tracing::debug!(
                    "shard {}: no progress, reconnecting to its source",
                    p.shard_id
                );
                earlier = (from_seeder, from_peers);
                last_progress.1 = now;
                // A source with nothing new (itself waiting for the seeder) is not asked
                // again and again: the wait doubles until progress resumes.
                stall_after = (stall_after * 2).min(STALL_AFTER_MAX);
                self.reconnect(&handle).await.map_err(|e| ("torrent", e))?;
            }
        }
        let path = self.data.shards_dir().join(&p.file);
        let check = path.clone();
        let sha = tokio::task::spawn_blocking(move || torrents::hashing::sha256_file(&check))
            .await
            .map_err(|e| ("verify", Error::Shard(format!("hashing {}: {e}", p.file))))?
            .map_err(|e| ("verify", Error::from(e)))?;
        if sha != p.sha256 {
            return Err((
                "sha256_mismatch",
                Error::Shard(format!(
                    "{} has sha256 {sha}, expected {}",
                    p.file, p.sha256
                )),
            ));
        }
        if p.file.ends_with(".gguf") {
            let header = path.clone();
            tokio::task::spawn_blocking(move || torrents::gguf::GgufModel::open(&header))
                .await
                .map_err(|e| {
                    (
                        "bad_header",
                        Error::Shard(format!("reading {}: {e}", p.file)),
                    )
                })?
                .map_err(|e| ("bad_header", Error::from(e)))?;
        }
        self.data
            .record_verified(&p.file, &sha)
            .map_err(|e| ("store", e))?;
        tracing::info!("[TORRENT] Found file: {} ({from_seeder} bytes from the seeder, {from_peers} from peers)", p.file);
        Ok(ShardLoadedParams {
            shard_id: p.shard_id,
            sha256: sha,
            from_seeder,
            from_peers,
        })
    }

    /// The torrent of a shard we hold, verified and complete: make sure it is seeded.
    async fn seed_existing(&self, p: &LoadShardParams) -> Result<()> {
        let h = info_hash(&p.info_hash)?;
        if self.session.get(Id20::new(h).into()).is_none() {
            self.add(p).await?;
        }
        Ok(())
    }

    /// Add (or re-add, when its sources changed) the shard's torrent.
    async fn add(&self, p: &LoadShardParams) -> Result<Arc<librqbit::ManagedTorrent>> {
        let h = info_hash(&p.info_hash)?;
        let id = Id20::new(h);
        let known_mode = self.modes.lock().unwrap().get(&h).copied();
        if let Some(existing) = self.session.get(id.into()) {
            if known_mode == Some(p.use_tracker) {
                return Ok(existing);
            }
            // Restored from fast resume, or its sources changed: add it again with the new
            // peers and tracker setting; the data on disk is kept and checked, not fetched.
            self.session
                .delete(id.into(), false)
                .await
                .map_err(Error::torrent)?;
        }
        let url = &p.torrent_url;
        let response = reqwest::get(url)
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| Error::http(url, e))?;
        let bytes = response.bytes().await.map_err(|e| Error::http(url, e))?;
        let meta = torrents::metainfo::parse(&bytes)?;
        if meta.info_hash != h || meta.name != p.file || meta.length != p.size {
            return Err(Error::Shard(format!(
                "{} is not the torrent of {} ({})",
                p.torrent_url, p.file, p.info_hash
            )));
        }
        let mut peers: Vec<SocketAddr> = p.peers.iter().filter_map(|a| a.parse().ok()).collect();
        let replica = !p.use_tracker && !peers.is_empty();
        if replica {
            if let Err(e) = self.prime_first_piece(&meta).await {
                // Not fatal: reconnecting on a stall still brings the source's pieces, only
                // in steps.
                tracing::warn!("{}: no first piece from the web seed: {e:#}", p.file);
            }
        }
        if p.use_tracker {
            peers.extend(
                p.seeder_peer
                    .as_deref()
                    .and_then(|a| a.parse::<SocketAddr>().ok()),
            );
        }
        // A replica talks to the nodes it was given and no one else: without the cap, peer
        // exchange (always on in librqbit) would hand it the seeder's address and it would pull
        // half the shard from there, which is what replicas are for avoiding.
        let peer_limit = replica.then_some(peers.len());
        // librqbit 9.1 ignores `disable_trackers` per torrent (only the session's counts), so a
        // torrent that must not use the tracker is added without its announce URLs; the info
        // dictionary, and so the info hash, is the same.
        let bytes = if p.use_tracker {
            bytes.to_vec()
        } else {
            let opts = torrents::metainfo::CreateOptions {
                web_seeds: meta.web_seeds.clone(),
                ..Default::default()
            };
            torrents::metainfo::rewrap(&meta, &opts)?.0
        };
        let opts = AddTorrentOptions {
            overwrite: true,
            output_folder: Some(self.data.shards_dir().display().to_string()),
            disable_trackers: !p.use_tracker,
            initial_peers: Some(peers),
            peer_limit,
            ..Default::default()
        };
        let handle = self
            .session
            .add_torrent(AddTorrent::from_bytes(bytes), Some(opts))
            .await
            .map_err(Error::torrent)?
            .into_handle()
            .ok_or_else(|| Error::Torrent("librqbit did not add the torrent".into()))?;
        self.modes.lock().unwrap().insert(h, p.use_tracker);
        Ok(handle)
    }
}

impl Fetcher {
    /// Drop the torrent's connections and connect again (to its initial peers; replicas have no
    /// tracker). Pausing keeps the verified pieces, so nothing is checked or fetched again.
    async fn reconnect(&self, handle: &Arc<librqbit::ManagedTorrent>) -> Result<()> {
        self.session.pause(handle).await.map_err(Error::torrent)?;
        self.session.unpause(handle).await.map_err(Error::torrent)
    }

    /// Give an empty replica its first piece from the torrent's web seed (BEP 19) before it
    /// meets its source. librqbit (9.1) sends a bitfield only when it holds a piece, and sends
    /// HAVE only to peers whose bitfield it has, so a source would never tell an empty replica
    /// about the pieces it gets while the replica trails it. One piece from the seeder (32 KiB
    /// of a 48 MB shard) makes the source announce every later piece.
    async fn prime_first_piece(&self, meta: &torrents::metainfo::Metainfo) -> Result<()> {
        let path = self.data.shards_dir().join(&meta.name);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() > 0) {
            return Ok(()); // resuming: librqbit's check finds the pieces already there
        }
        let Some(web_seed) = meta.web_seeds.first() else {
            return Ok(()); // no web seed: the replica still fetches, only without trailing
        };
        let len = meta
            .piece_size(0)
            .ok_or_else(|| Error::Shard(format!("the torrent of {} has no pieces", meta.name)))?;
        let response = reqwest::Client::new()
            .get(web_seed)
            .header(reqwest::header::RANGE, format!("bytes=0-{}", len - 1))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| Error::http(web_seed, e))?;
        let bytes = response
            .bytes()
            .await
            .map_err(|e| Error::http(web_seed, e))?;
        use sha1::Digest;
        if bytes.len() as u64 != len
            || meta.piece_hash(0) != Some(sha1::Sha1::digest(&bytes).as_slice())
        {
            return Err(Error::http(web_seed, "a bad first piece"));
        }
        let file = path.clone();
        let size = meta.length;
        let what = format!("writing the first piece of {}", meta.name);
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&file)?;
            f.write_all(&bytes)?;
            f.set_len(size)
        })
        .await
        .map_err(|e| Error::Shard(format!("{what}: {e}")))?
        .map_err(|e| daemon::IoError::new(what, e).into())
    }
}

/// Bytes fetched this session from the seeder's address and from everyone else.
fn split_by_source(handle: &librqbit::ManagedTorrent, seeder: Option<&str>) -> (u64, u64) {
    let Some(live) = handle.live() else {
        return (0, 0);
    };
    // PeerStatsFilter is not nameable outside librqbit; it deserialises from {"state":"all"}.
    let Ok(filter) = serde_json::from_value(serde_json::json!({"state": "all"})) else {
        return (0, 0);
    };
    let snapshot = live.per_peer_stats_snapshot(filter);
    let (mut s, mut p) = (0, 0);
    for (addr, stats) in &snapshot.peers {
        if Some(addr.as_str()) == seeder {
            s += stats.counters.fetched_bytes;
        } else {
            p += stats.counters.fetched_bytes;
        }
    }
    (s, p)
}

fn info_hash(hex_hash: &str) -> Result<[u8; 20]> {
    let mut h = [0u8; 20];
    hex::decode_to_slice(hex_hash, &mut h)
        .map_err(|e| Error::Shard(format!("info hash {hex_hash:?}: {e}")))?;
    Ok(h)
}
