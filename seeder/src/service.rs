//! The running seeder: start-up order, the librqbit session, rescans, shutdown.
//!
//! Start-up order matters to clients: the catalog is scanned and every torrent added to
//! librqbit and listed in the tracker (with the seeder as a seed at its public address)
//! *before* the HTTP listener serves anything, so no client ever fetches a `.torrent` whose
//! first announce returns an empty peer list.
//!
//! Tasks: the axum server and the rescan loop. The catalog itself is owned by the rescan loop
//! (behind a tokio mutex, held across the blocking scan only); readers use [`Snapshot`]s.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use librqbit::dht::Id20;
use librqbit::storage::StorageFactoryExt;
use librqbit::{
    AddTorrent, AddTorrentOptions, ListenerMode, ListenerOptions, Session, SessionOptions,
};
use tokio::sync::{mpsc, Mutex};

/// The catalog, shared with the blocking tasks that scan it.
type SharedCatalog = Arc<std::sync::Mutex<Catalog>>;
use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, ScanDiff, SeedFile};
use crate::storage::{FileRegistry, ReadOnlyStorageFactory};
use crate::tracker::Tracker;
use crate::{Bound, Config, Error, Result, Transport};

/// The served files at one moment.
#[derive(Default)]
pub struct Snapshot {
    pub by_name: BTreeMap<String, SeedFile>,
    pub by_hash: HashMap<[u8; 20], String>,
}

impl Snapshot {
    fn new(files: &BTreeMap<String, SeedFile>) -> Snapshot {
        Snapshot {
            by_name: files.clone(),
            by_hash: files
                .values()
                .map(|f| (f.torrent.info_hash, f.name.clone()))
                .collect(),
        }
    }

    /// A served file by info hash.
    pub fn by_hash(&self, h: &[u8; 20]) -> Option<&SeedFile> {
        self.by_hash.get(h).and_then(|n| self.by_name.get(n))
    }
}

/// Bytes sent other than over the peer wire, per info hash.
#[derive(Default)]
pub struct HttpCounters {
    pub webseed: RwLock<HashMap<[u8; 20], Arc<AtomicU64>>>,
    pub piece_api: RwLock<HashMap<[u8; 20], Arc<AtomicU64>>>,
}

impl HttpCounters {
    /// The counter for `h` in `map`, created on first use.
    pub fn counter(map: &RwLock<HashMap<[u8; 20], Arc<AtomicU64>>>, h: [u8; 20]) -> Arc<AtomicU64> {
        if let Some(c) = map.read().unwrap().get(&h) {
            return c.clone();
        }
        map.write().unwrap().entry(h).or_default().clone()
    }
}

/// Shared state of a running seeder.
pub struct Seeder {
    pub config: Config,
    pub bound: Bound,
    /// Signs `/manifest` and `/files`, so that a coordinator given the public key can tell
    /// them from a swapped copy (plain HTTP crosses networks in between).
    pub signer: protocol::data::seal::SigningKey,
    pub session: Arc<Session>,
    pub tracker: Tracker,
    pub snapshot: RwLock<Arc<Snapshot>>,
    pub counters: HttpCounters,
    /// Where the seeder lists itself in its tracker.
    pub self_peer: SocketAddr,
    catalog: SharedCatalog,
    /// One rescan at a time.
    rescan_lock: Mutex<()>,
    registry: FileRegistry,
    /// Ask the rescan loop for a scan now.
    pub rescan_tx: mpsc::Sender<()>,
    /// The swarm's relay (`--relay-port`), running as long as the seeder.
    _relay: Option<mesh::relay::RelayServer>,
}

/// The seeder's document-signing key, kept in `state_dir` (`documents.key`, PKCS#8 as hex,
/// owner-only), made on first use: the same public key at every start.
fn document_key(state_dir: &std::path::Path) -> Result<protocol::data::seal::SigningKey> {
    use protocol::data::seal::SigningKey;
    let path = state_dir.join("documents.key");
    if path.exists() {
        let text = daemon::secret::read_secret_file(&path)?;
        return hex::decode(text.trim())
            .ok()
            .and_then(|pkcs8| SigningKey::from_pkcs8(&pkcs8))
            .ok_or_else(|| {
                Error::Config(format!(
                    "{} is not a signing key: delete it to make a new one (and give \
                     coordinators the new --seeder-key)",
                    path.display()
                ))
            });
    }
    let key = SigningKey::generate();
    daemon::secret::write_private(&path, &hex::encode(key.to_pkcs8()))?;
    tracing::info!("made the seeder's signing key: {}", path.display());
    Ok(key)
}

impl Seeder {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap().clone()
    }

    /// Rescan the seed dir and apply the changes to librqbit, the tracker and the snapshot.
    pub async fn rescan(self: &Arc<Self>) -> Result<ScanDiff> {
        let _one_at_a_time = self.rescan_lock.lock().await;
        let catalog = self.catalog.clone();
        let diff = tokio::task::spawn_blocking(move || catalog.lock().unwrap().scan())
            .await
            .map_err(|e| Error::Config(format!("the scan's task failed: {e}")))??;
        if diff.is_empty() {
            return Ok(diff);
        }
        for old in diff
            .removed
            .iter()
            .chain(diff.changed.iter().map(|(old, _)| old))
        {
            let h = old.torrent.info_hash;
            self.tracker.remove_torrent(&h);
            if let Err(e) = self.session.delete(Id20::new(h).into(), false).await {
                tracing::warn!("removing {} from the session: {e:#}", old.name);
            }
            self.registry.remove(&Id20::new(h));
            tracing::info!(
                "[TORRENT] no longer serving {} ({})",
                old.name,
                old.info_hash_hex()
            );
        }
        for new in diff
            .added
            .iter()
            .chain(diff.changed.iter().map(|(_, new)| new))
        {
            if let Err(e) = self.add(new).await {
                tracing::warn!("cannot seed {}: {e:#}", new.name);
            }
        }
        let snapshot = Snapshot::new(self.catalog.lock().unwrap().files());
        println!(
            "[TORRENT] Loaded {} file(s) for sharing",
            snapshot.by_name.len()
        );
        *self.snapshot.write().unwrap() = Arc::new(snapshot);
        Ok(diff)
    }

    /// Seed one file and list the seeder for it in the tracker.
    async fn add(&self, file: &SeedFile) -> Result<()> {
        let h = file.torrent.info_hash;
        self.registry.insert(Id20::new(h), file.path.clone());
        let opts = AddTorrentOptions {
            overwrite: true,
            output_folder: Some(
                file.path
                    .parent()
                    .unwrap_or(self.config.seed_dir.as_path())
                    .display()
                    .to_string(),
            ),
            ..Default::default()
        };
        let handle = self
            .session
            .add_torrent(
                AddTorrent::from_bytes(file.torrent_bytes.as_ref().clone()),
                Some(opts),
            )
            .await
            .map_err(Error::torrent)?
            .into_handle()
            .ok_or_else(|| Error::Torrent("librqbit did not add the torrent".into()))?;
        handle
            .wait_until_initialized()
            .await
            .map_err(Error::torrent)?;
        let stats = handle.stats();
        if !stats.finished {
            return Err(Error::NotServable(format!(
                "{}: only {} of {} bytes match the torrent (changed while hashing?)",
                file.name, stats.progress_bytes, stats.total_bytes
            )));
        }
        self.tracker.add_torrent(h, self.self_peer);
        tracing::info!(
            "[TORRENT] Found file: {} ({} bytes, info hash {})",
            file.name,
            file.size,
            file.info_hash_hex()
        );
        Ok(())
    }

    pub fn bound(&self) -> &Bound {
        &self.bound
    }
}

/// A started seeder: its state and how to stop it.
pub struct Running {
    pub seeder: Arc<Seeder>,
    cancel: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn bound(&self) -> &Bound {
        &self.seeder.bound
    }

    /// Wait for SIGINT or SIGTERM.
    pub async fn wait_for_shutdown_signal(&self) {
        tokio::select! {
            _ = daemon::shutdown_signal() => {}
            _ = self.cancel.cancelled() => {}
        }
    }

    /// Stop serving and close the session.
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.server.await;
        self.seeder.session.stop().await;
    }
}

/// Scan, seed, list in the tracker, then serve HTTP with the router `http` makes (the API
/// module's, passed in so that this module does not depend on the API built on top of it):
/// see the module doc for why in that order.
pub async fn start(
    config: Config,
    http: impl FnOnce(Arc<Seeder>) -> axum::Router,
) -> Result<Running> {
    config.check()?;
    if config.transport == Transport::Quic {
        tracing::warn!("--transport quic: BitTorrent has no QUIC transport; using TCP and uTP");
    }
    let state_dir = config.state_dir()?;
    let signer = document_key(&state_dir)?;
    let http_listener = tokio::net::TcpListener::bind((config.listen_addr, config.http_port()))
        .await
        .map_err(|e| {
            let what = format!(
                "binding HTTP on {}:{}",
                config.listen_addr,
                config.http_port()
            );
            daemon::IoError::new(what, e)
        })?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|e| daemon::IoError::new("the HTTP address", e))?;
    let host = crate::net::advertised_host(config.listen_addr);
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| crate::net::http_url(host, http_addr.port()))
        .trim_end_matches('/')
        .to_owned();
    tracing::info!("public URL {public_url}");

    let relay = match config.relay_port {
        None => None,
        Some(port) => {
            let host = crate::net::url_host(&public_url);
            let relay =
                mesh::relay::RelayServer::start(config.listen_addr, port, &host, &state_dir)
                    .await
                    .map_err(|e| Error::Config(e.to_string()))?;
            tracing::info!("the swarm's relay: {} (on {})", relay.info.url, relay.addr);
            Some(relay)
        }
    };

    let mut catalog = Catalog::new(&config.seed_dir, &state_dir, &public_url)?;
    let registry = FileRegistry::default();
    // Hashing is blocking work: off the async threads.
    let (catalog, initial) = tokio::task::spawn_blocking(move || {
        let diff = catalog.scan();
        (catalog, diff)
    })
    .await
    .map_err(|e| Error::Config(format!("the first scan's task failed: {e}")))?;
    let initial = initial?;
    for f in &initial.added {
        registry.insert(Id20::new(f.torrent.info_hash), f.path.clone());
    }

    let mode = match config.transport {
        Transport::Tcp => ListenerMode::TcpOnly,
        Transport::Utp => ListenerMode::UtpOnly,
        Transport::Both | Transport::Quic => ListenerMode::TcpAndUtp,
    };
    let session_dir = state_dir.join("session");
    std::fs::create_dir_all(&session_dir)
        .map_err(|e| daemon::IoError::new(session_dir.display().to_string(), e))?;
    let session = Session::new_with_opts(
        config.seed_dir.clone(),
        SessionOptions {
            dht: if config.dht {
                Some(Default::default())
            } else {
                None
            },
            disable_trackers: true, // we are the tracker, and list ourselves in it
            disable_local_service_discovery: !config.dht,
            fastresume: true,
            persistence: Some(librqbit::SessionPersistenceConfig::Json {
                folder: Some(session_dir),
            }),
            listen: Some(ListenerOptions {
                mode,
                listen_addr: SocketAddr::new(config.listen_addr, config.port),
                ipv4_only: config.listen_addr.is_ipv4(),
                ..Default::default()
            }),
            default_storage_factory: Some(
                ReadOnlyStorageFactory {
                    files: registry.clone(),
                }
                .boxed(),
            ),
            ratelimits: librqbit::limits::LimitsConfig {
                upload_bps: config.upload_limit.and_then(std::num::NonZeroU32::new),
                download_bps: None,
            },
            ..Default::default()
        },
    )
    .await
    .map_err(|e| Error::torrent(format_args!("starting the BitTorrent session: {e:#}")))?;
    let peer_addr = session
        .listen_addr()
        .ok_or_else(|| Error::Torrent("librqbit is not listening".into()))?;
    let self_ip = crate::net::public_url_ip(&public_url).await.unwrap_or(host);
    let self_peer = SocketAddr::new(crate::tracker::canonical(self_ip), peer_addr.port());

    // Drop torrents librqbit restored from its state that are no longer in the directory.
    let stale: Vec<Id20> = session.with_torrents(|ts| {
        ts.map(|(_, t)| t.info_hash())
            .filter(|h| !catalog.files().values().any(|f| f.torrent.info_hash == h.0))
            .collect()
    });
    for h in stale {
        let _ = session.delete(h.into(), false).await;
    }

    let (rescan_tx, rescan_rx) = mpsc::channel(4);
    let seeder = Arc::new(Seeder {
        bound: Bound {
            http: http_addr,
            peer: SocketAddr::new(config.listen_addr, peer_addr.port()),
            public_url,
            key: signer.public_hex(),
            relay: relay.as_ref().map(|r| r.info.clone()),
        },
        _relay: relay,
        signer,
        config: config.clone(),
        session,
        tracker: Tracker::new(
            config.open_tracker,
            crate::tracker::Limits {
                announce_rate: config.announce_rate,
                max_peers: config.max_peers,
                max_peers_per_ip: config.max_peers_per_ip,
            },
        ),
        snapshot: RwLock::new(Arc::new(Snapshot::default())),
        counters: HttpCounters::default(),
        self_peer,
        catalog: Arc::new(std::sync::Mutex::new(catalog)),
        rescan_lock: Mutex::new(()),
        registry,
        rescan_tx,
    });
    let mut loaded = BTreeMap::new();
    for f in &initial.added {
        match seeder.add(f).await {
            Ok(()) => {
                loaded.insert(f.name.clone(), f.clone());
            }
            Err(e) => tracing::warn!("cannot seed {}: {e:#}", f.name),
        }
    }
    *seeder.snapshot.write().unwrap() = Arc::new(Snapshot::new(&loaded));
    println!("[TORRENT] Loaded {} file(s) for sharing", loaded.len());

    let cancel = CancellationToken::new();
    tokio::spawn(rescan_loop(seeder.clone(), rescan_rx, cancel.clone()));
    let server = daemon::serve_http(
        http_listener,
        http(seeder.clone()),
        cancel.clone(),
        daemon::HttpLimits::default(),
        None,
    )?;
    Ok(Running {
        seeder,
        cancel,
        server,
    })
}

/// Rescan on a timer, on SIGHUP and on request.
async fn rescan_loop(
    seeder: Arc<Seeder>,
    mut requests: mpsc::Receiver<()>,
    cancel: CancellationToken,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let mut timer = tokio::time::interval(crate::rescan_period(&seeder.config));
    timer.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = timer.tick() => {}
            _ = hup.recv() => tracing::info!("SIGHUP: rescanning"),
            Some(()) = requests.recv() => {}
        }
        if let Err(e) = seeder.rescan().await {
            tracing::warn!("rescan failed: {e:#}");
        }
    }
}
