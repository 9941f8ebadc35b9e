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
/// Every how many progress reports a fetch logs where its bytes came from.
const LOG_EVERY_REPORTS: u64 = 10;
/// How often a fetch looks at its progress.
const PROGRESS_CHECK: Duration = Duration::from_millis(250);

/// What a fetch reports to the control channel.
#[derive(Debug)]
pub enum FetchEvent {
    /// The stage of a ROUTE is loaded: (request id, stage, how its decodes use threads).
    Routed(String, u32, protocol::DecodeThreads),
    Progress(ShardProgressParams),
    Loaded(ShardLoadedParams),
    Failed(ShardFailedParams),
}

/// How a torrent was added: with the tracker on or not, and the peers it was given. A LOAD_SHARD
/// that changes either adds it again (the data on disk is kept).
type AddedAs = (bool, Vec<String>);

/// The node's BitTorrent side.
pub struct Fetcher {
    pub session: Arc<Session>,
    pub data: Arc<DataDir>,
    /// Info hash → how this process added it.
    modes: Mutex<HashMap<[u8; 20], AddedAs>>,
}

impl Fetcher {
    /// Start the session listening on `listen`, with `upnp` asking the router to forward it.
    pub async fn start(data: Arc<DataDir>, listen: SocketAddr, upnp: bool) -> Result<Fetcher> {
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
                    enable_upnp_port_forwarding: upnp,
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

    /// What the session uploads right now, in Mbit/s (librqbit's estimate is in MiB/s).
    fn upload_mbit(&self) -> u32 {
        (self.session.stats_snapshot().upload_speed.mbps * 8.0 * 1.048_576).round() as u32
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
                    by_source: Default::default(),
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
        let mut tick = tokio::time::interval(PROGRESS_CHECK);
        let mut last_report: Option<tokio::time::Instant> = None;
        let mut sources = SourceBytes::default();
        let mut reports = 0u64;
        let stats = loop {
            tick.tick().await;
            let stats = handle.stats();
            sources.update(&handle);
            if let Some(e) = stats.error {
                return Err(self.failed(p, e).await);
            }
            let now = tokio::time::Instant::now();
            if last_report.is_none_or(|t| now - t >= PROGRESS_EVERY) {
                last_report = Some(now);
                let (from_seeder, from_peers) = sources.split(p.seeder_peer.as_deref());
                reports += 1;
                if reports % LOG_EVERY_REPORTS == 1 {
                    tracing::info!(
                        "{}: {} of {} bytes; from {}",
                        p.file,
                        verified_bytes(&stats),
                        stats.total_bytes,
                        sources.describe(p.seeder_peer.as_deref())
                    );
                }
                let _ = events.send(FetchEvent::Progress(ShardProgressParams {
                    shard_id: p.shard_id,
                    bytes: verified_bytes(&stats),
                    total: stats.total_bytes,
                    from_seeder,
                    from_peers,
                    by_source: sources.totals(),
                    upload_mbit: Some(self.upload_mbit()),
                }));
            }
            if stats.finished {
                break stats;
            }
        };
        let (from_seeder, from_peers) = sources.split(p.seeder_peer.as_deref());
        // Chunks of a piece another peer had already sent (librqbit "stealing" a slow piece,
        // off for shards since patch 0004) arrive all the same and are dropped.
        let used = stats.live.as_ref().map_or(0, |l| l.snapshot.fetched_bytes);
        let received = from_seeder + from_peers;
        if received > used + used / 50 {
            tracing::info!(
                "{}: received {received} bytes, used {used}: the rest came for pieces another peer had already sent",
                p.file
            );
        }
        let path = self.data.shards_dir().join(&p.file);
        let check = path.clone();
        let sha = tokio::task::spawn_blocking(move || torrents::hashing::sha256_file(&check))
            .await
            .map_err(|e| ("verify", Error::Shard(format!("hashing {}: {e}", p.file))))?
            .map_err(|e| ("verify", Error::from(e)))?;
        if sha != p.sha256 {
            // Not the manifest's file: stop sharing it and delete it, so it is neither loaded
            // nor served to other nodes.
            if let Ok(h) = info_hash(&p.info_hash) {
                let _ = self.session.delete(Id20::new(h).into(), false).await;
                self.modes.lock().unwrap().remove(&h);
            }
            let _ = self.data.forget(&p.file, true);
            return Err((
                "sha256_mismatch",
                Error::Shard(format!(
                    "{} has sha256 {sha}, expected {}: deleted",
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
            by_source: sources.totals(),
        })
    }

    /// A fetch librqbit gave up on: take its torrent out of the session (a later LOAD_SHARD
    /// adds it afresh, keeping and checking what is on disk), and say why in words an
    /// operator can act on. librqbit's error names the file but not the cause; a full disk
    /// is by far the likeliest, so the free space is checked and named.
    async fn failed(&self, p: &LoadShardParams, e: String) -> (&'static str, Error) {
        if let Ok(h) = info_hash(&p.info_hash) {
            let _ = self.session.delete(Id20::new(h).into(), false).await;
            self.modes.lock().unwrap().remove(&h);
        }
        let have = std::fs::metadata(self.data.shards_dir().join(&p.file)).map_or(0, |m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512 // what the file takes on disk (it is sparse while it fills)
        });
        let free = self.data.disk_free();
        let missing = p.size.saturating_sub(have);
        if e.contains("writing") && free < missing.max(1 << 20) {
            return (
                "no_space",
                Error::Shard(format!(
                    "disk full while fetching {}: {missing} more bytes needed, {free} free in {} ({e})",
                    p.file,
                    self.data.shards_dir().display()
                )),
            );
        }
        ("torrent", Error::Torrent(e))
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
        let mode = (p.use_tracker, p.peers.clone());
        let known_mode = self.modes.lock().unwrap().get(&h).cloned();
        if let Some(existing) = self.session.get(id.into()) {
            if known_mode.as_ref() == Some(&mode) {
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
        // Bounded in time and size: a .torrent of even a huge shard is well under 1 MiB.
        const TORRENT_MAX: u64 = 16 << 20;
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| Error::http(url, e))?;
        let response = client
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| Error::http(url, e))?;
        if response.content_length().is_some_and(|n| n > TORRENT_MAX) {
            return Err(Error::Shard(format!(
                "{url} is larger than any .torrent ({TORRENT_MAX} bytes)"
            )));
        }
        let bytes = response.bytes().await.map_err(|e| Error::http(url, e))?;
        let meta = torrents::metainfo::parse(&bytes)?;
        if meta.info_hash != h || meta.name != p.file || meta.length != p.size {
            return Err(Error::Shard(format!(
                "{} is not the torrent of {} ({})",
                p.torrent_url, p.file, p.info_hash
            )));
        }
        let mut peers: Vec<SocketAddr> = p.peers.iter().filter_map(|a| a.parse().ok()).collect();
        if p.use_tracker {
            peers.extend(
                p.seeder_peer
                    .as_deref()
                    .and_then(|a| a.parse::<SocketAddr>().ok()),
            );
        }
        // A replica fetches from the shard's other holders and those that fetch it with it,
        // never from the seeder, so the seeder sends each piece about once: it has no tracker.
        // Holders that come later connect to it. Peer exchange is off for every shard (our
        // librqbit patch 0003): the coordinator names each node's peers, and exchange would
        // hand a replica the seeder's address through the first holder.
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
            disable_pex: true,
            disable_steal: true,
            ..Default::default()
        };
        let handle = self
            .session
            .add_torrent(AddTorrent::from_bytes(bytes), Some(opts))
            .await
            .map_err(Error::torrent)?
            .into_handle()
            .ok_or_else(|| Error::Torrent("librqbit did not add the torrent".into()))?;
        self.modes.lock().unwrap().insert(h, mode);
        Ok(handle)
    }
}

/// Bytes a fetch got from each peer address. librqbit counts per connection, so a peer that
/// reconnects starts from zero: what its earlier connections brought is kept here.
#[derive(Default)]
struct SourceBytes {
    /// The count of the current connection, and the sum of the closed ones.
    by_addr: HashMap<String, (u64, u64)>,
}

impl SourceBytes {
    fn update(&mut self, handle: &librqbit::ManagedTorrent) {
        let Some(live) = handle.live() else {
            return;
        };
        // PeerStatsFilter is not nameable outside librqbit; it deserialises from {"state":"all"}.
        let Ok(filter) = serde_json::from_value(serde_json::json!({"state": "all"})) else {
            return;
        };
        for (addr, stats) in live.per_peer_stats_snapshot(filter).peers {
            let now = stats.counters.fetched_bytes;
            let (current, closed) = self.by_addr.entry(addr).or_default();
            if now < *current {
                *closed += *current;
            }
            *current = now;
        }
    }

    /// Bytes from each address that sent any.
    fn totals(&self) -> std::collections::BTreeMap<String, u64> {
        self.by_addr
            .iter()
            .map(|(addr, (current, closed))| (addr.clone(), current + closed))
            .filter(|(_, bytes)| *bytes > 0)
            .collect()
    }

    /// "seeder 1000, 127.0.0.1:6881 2000" (or "nobody yet").
    fn describe(&self, seeder: Option<&str>) -> String {
        let totals = self.totals();
        if totals.is_empty() {
            return "nobody yet".into();
        }
        totals
            .iter()
            .map(|(addr, bytes)| match Some(addr.as_str()) == seeder {
                true => format!("seeder {bytes}"),
                false => format!("{addr} {bytes}"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// (from the seeder's address, from everyone else).
    fn split(&self, seeder: Option<&str>) -> (u64, u64) {
        self.totals().iter().fold((0, 0), |(s, p), (addr, bytes)| {
            match Some(addr.as_str()) == seeder {
                true => (s + bytes, p),
                false => (s, p + bytes),
            }
        })
    }
}

/// The bytes of the shard verified so far. While librqbit checks what is on disk (a torrent
/// being added), its `progress_bytes` counts the bytes *checked*, which reach the whole size
/// whatever the file holds: that is not progress, so it counts as none.
fn verified_bytes(stats: &librqbit::TorrentStats) -> u64 {
    match stats.state {
        librqbit::TorrentStatsState::Initializing { .. } => 0,
        _ => stats.progress_bytes,
    }
}

fn info_hash(hex_hash: &str) -> Result<[u8; 20]> {
    let mut h = [0u8; 20];
    hex::decode_to_slice(hex_hash, &mut h)
        .map_err(|e| Error::Shard(format!("info hash {hex_hash:?}: {e}")))?;
    Ok(h)
}
