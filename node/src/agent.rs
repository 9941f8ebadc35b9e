//! The node's control-channel client: connect to the coordinator, REGISTER with the verified
//! shards held, obey LOAD_SHARD / UNLOAD_SHARD, heartbeat, and reconnect with backoff when the
//! coordinator goes away (re-registering with what is held, so nothing is fetched again).
//!
//! Tasks: one connection loop (frames in and out, heartbeats, fetch events forwarded), and one
//! task per shard being fetched. Fetch tasks outlive connections: their events queue in a
//! channel and are sent once connected again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use protocol::{
    code, Capacity, Control, HeartbeatParams, HeldShard, Message as M, RegisterParams, Route,
    RouteLoadedParams, UnloadShardParams, COORDINATOR, PROTOCOL_VERSION,
};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::fetch::{FetchEvent, Fetcher};
use crate::store::DataDir;
use crate::{Config, Error, Result};

/// What a control-channel session works with.
struct Links<'a> {
    data: &'a Arc<DataDir>,
    fetcher: &'a Arc<Fetcher>,
    pipeline: &'a Arc<crate::serve::Pipeline>,
    data_addr: SocketAddr,
    /// TLS for a `wss://` coordinator.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The mesh endpoint's key and where its socket binds.
    mesh: (&'a [u8; 32], SocketAddr),
}

/// Fetch tasks by shard id.
type Tasks = std::collections::HashMap<u32, tokio::task::AbortHandle>;

fn control_url(coordinator: &str) -> String {
    let base = coordinator.trim_end_matches('/');
    let ws = if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        base.to_owned()
    };
    if ws.ends_with("/control") {
        ws
    } else {
        format!("{ws}/control")
    }
}

/// The swarm's CA for a `wss://` coordinator given no `--ca`: the one pinned in the data dir,
/// else fetched from the coordinator's `/ca.pem` and kept only if its tag checks out under the
/// swarm token (so a machine in the middle cannot slip in its own). None when the coordinator
/// says, under the token, that it serves an operator's certificate (the system's roots then),
/// or when the node has no token to check anything with and the coordinator offers no CA.
async fn pinned_ca(
    control_url: &str,
    data: &DataDir,
    token: Option<&str>,
) -> Result<Option<std::path::PathBuf>> {
    let pinned = data.root().join("coordinator-ca.pem");
    if pinned.exists() {
        return Ok(Some(pinned));
    }
    let base = control_url
        .replacen("wss://", "https://", 1)
        .trim_end_matches("/control")
        .to_owned();
    let url = format!("{base}/ca.pem");
    let refuse = |m: String| Error::Config(format!("{url}: {m}"));
    // Not verified yet: what it sends is checked with the token below.
    let client = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| refuse(e.to_string()))?;
    let response = client
        .get(&url)
        .send()
        .await
        .map_err(|e| refuse(e.to_string()))?;
    let status = response.status();
    let tag = response
        .headers()
        .get(protocol::CA_TAG_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let pem = response.text().await.map_err(|e| refuse(e.to_string()))?;
    let Some(token) = token else {
        if status == reqwest::StatusCode::OK {
            return Err(refuse(
                "the coordinator has a CA of its own: give it with --ca, or the swarm token to fetch it".into(),
            ));
        }
        // Nothing can be checked without the token: the system's roots, as any client.
        return Ok(None);
    };
    let vouched = |label: &str, data: &[u8]| {
        tag.as_deref()
            .is_some_and(|t| daemon::secret::is_tag(token, label, data, t))
    };
    match status {
        reqwest::StatusCode::OK if vouched(protocol::CA_TAG_LABEL, pem.as_bytes()) => {}
        reqwest::StatusCode::NO_CONTENT if vouched(protocol::CA_OPERATOR_TAG_LABEL, b"") => {
            tracing::info!(
                "the coordinator serves a certificate of its operator's: trusting the system's roots"
            );
            return Ok(None);
        }
        reqwest::StatusCode::OK | reqwest::StatusCode::NO_CONTENT => return Err(refuse(
            "its CA does not check out under the swarm token: wrong token, or not the coordinator"
                .into(),
        )),
        // A 404 would otherwise make the node trust the system's roots: refused, since a
        // machine in the middle could answer it.
        other => {
            return Err(refuse(format!(
                "answered {other}, neither the swarm's CA nor an operator's certificate vouched \
                 for under the swarm token: not the coordinator, or one older than this node \
                 (give the CA to trust with --ca)"
            )))
        }
    }
    torrents::manifest::write_atomically(&pinned, pem.as_bytes())?;
    tracing::info!("pinned the swarm's CA in {}", pinned.display());
    Ok(Some(pinned))
}

/// The mesh endpoint's secret key, kept in the data dir (`mesh.key`, hex, owner-only) so that
/// the node keeps its endpoint id across restarts; made on first use.
fn mesh_secret(data: &DataDir) -> Result<[u8; 32]> {
    let path = data.root().join("mesh.key");
    if !path.exists() {
        daemon::secret::write_private(&path, &protocol::secret::random_hex(32))?;
    }
    let text = daemon::secret::read_secret_file(&path)?;
    let mut key = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut key).map_err(|_| {
        Error::Config(format!(
            "{}: not a mesh key (64 hex digits); delete it to make a new one",
            path.display()
        ))
    })?;
    Ok(key)
}

/// Run the node until a signal, or until the coordinator refuses it.
pub(crate) async fn run(mut config: Config) -> Result<()> {
    let required = |flag: &str| Error::Config(format!("{flag} is required"));
    if let Some(file) = &config.token_file {
        if config.token.is_some() {
            return Err(Error::Config(
                "give the token by --token (or SHARDSWARM_TOKEN) or by --token-file, not both"
                    .into(),
            ));
        }
        config.token = Some(daemon::secret::read_secret_file(file)?);
    }
    let coordinator = config
        .coordinator
        .clone()
        .ok_or_else(|| required("--coordinator"))?;
    let data_dir = config
        .data_dir
        .clone()
        .ok_or_else(|| required("--data-dir"))?;
    let data = Arc::new(DataDir::open(&data_dir)?);
    let fetcher = Arc::new(
        Fetcher::start(
            data.clone(),
            SocketAddr::new(config.listen_addr, config.peer_port),
            config.upnp,
        )
        .await?,
    );
    let threads = crate::serve::threads::ThreadSettings {
        threads: config.threads,
        pin: config.pin_threads,
    };
    let hostility = crate::serve::lie::Hostility {
        lie: config.test_lie,
        attack: config.test_attack,
    };
    let pipeline = crate::serve::Pipeline::new(data.clone(), threads, hostility)?;
    let what = format!(
        "binding the data channel on {}:{}",
        config.listen_addr, config.data_port
    );
    let data_listener = tokio::net::TcpListener::bind((config.listen_addr, config.data_port))
        .await
        .map_err(|e| daemon::IoError::new(what.clone(), e))?;
    let data_addr = data_listener
        .local_addr()
        .map_err(|e| daemon::IoError::new(what, e))?;
    tokio::spawn(crate::serve::serve(data_listener, pipeline.clone()));
    // The mesh endpoint runs from the start (its addresses go in REGISTER); it is homed on
    // the swarm's relay once the coordinator names one.
    let mesh_secret = mesh_secret(&data)?;
    let mesh_bind = SocketAddr::new(config.listen_addr, 0);
    pipeline.home_mesh(mesh_secret, mesh_bind, None).await?;
    let stop_metrics = tokio_util::sync::CancellationToken::new();
    let _stop_metrics_on_exit = stop_metrics.clone().drop_guard();
    if let Some(addr) = config.metrics_listen {
        let what = format!("binding --metrics-listen {addr}");
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| daemon::IoError::new(what, e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| daemon::IoError::new("the metrics address", e))?;
        crate::metrics::serve(listener, pipeline.metrics.clone(), stop_metrics)?;
        tracing::info!("metrics at http://{bound}/metrics");
        println!("[METRICS] http={bound}");
    }
    let name = config.name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "node".into())
    });
    tracing::info!(
        "node {} ({name}) peer port {}, data dir {}",
        data.node_id,
        fetcher.peer_port(),
        data_dir.display()
    );
    println!(
        "[READY] node={} peer_port={}",
        data.node_id,
        fetcher.peer_port()
    );
    let (events_tx, mut events_rx) = mpsc::unbounded_channel::<FetchEvent>();
    let mut tasks = Tasks::default();
    let url = control_url(&coordinator);
    let tls = if url.starts_with("wss://") {
        let ca = match &config.ca {
            Some(ca) => Some(ca.clone()),
            None => pinned_ca(&url, &data, config.token.as_deref()).await?,
        };
        Some(daemon::tls::client_config(ca.as_deref()).map_err(|e| Error::Config(e.to_string()))?)
    } else {
        None
    };
    let mut backoff = Duration::from_millis(250);
    let shutdown = daemon::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let links = Links {
            data: &data,
            fetcher: &fetcher,
            pipeline: &pipeline,
            data_addr,
            tls: tls.clone(),
            mesh: (&mesh_secret, mesh_bind),
        };
        let session = session(
            &config,
            &name,
            &url,
            &links,
            (&events_tx, &mut events_rx),
            &mut tasks,
        );
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("shutting down");
                fetcher.session.stop().await;
                return Ok(());
            }
            result = session => match result {
                Ok(()) => backoff = Duration::from_millis(250),
                Err(e @ Error::Refused { .. }) => {
                    fetcher.session.stop().await;
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!("{e}; reconnecting in {:.1} s", backoff.as_secs_f64());
                }
            }
        }
        tokio::select! {
            _ = &mut shutdown => {
                fetcher.session.stop().await;
                return Ok(());
            }
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One connection to the coordinator, from REGISTER until it closes.
async fn session(
    config: &Config,
    name: &str,
    url: &str,
    links: &Links<'_>,
    (events_tx, events_rx): (
        &mpsc::UnboundedSender<FetchEvent>,
        &mut mpsc::UnboundedReceiver<FetchEvent>,
    ),
    tasks: &mut Tasks,
) -> Result<()> {
    let mut request = url.into_client_request().map_err(Error::control)?;
    if let Some(t) = &config.token {
        let bearer = format!("Bearer {t}")
            .parse()
            .map_err(|_| Error::Config("the token is not a valid HTTP header value".into()))?;
        request.headers_mut().insert("Authorization", bearer);
    }
    let connector = links.tls.clone().map(tokio_tungstenite::Connector::Rustls);
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async_tls_with_config(request, None, false, connector),
    )
    .await
    .map_err(|_| Error::control(format!("connecting to {url} timed out")))?
    .map_err(|e| Error::control(format!("connecting to {url}: {e}")))?;
    let (mut sink, mut stream) = ws.split();
    let (data, fetcher) = (links.data, links.fetcher);
    let me = data.node_id.clone();
    let held: Vec<HeldShard> = data
        .verified()
        .into_iter()
        .filter_map(|(file, sha256)| {
            torrents::split::parse_shard_file_name(&file).map(|(k, _)| HeldShard {
                shard_id: k,
                sha256,
            })
        })
        .collect();
    let register = RegisterParams {
        node_id: me.clone(),
        protocol_version: PROTOCOL_VERSION,
        name: name.to_owned(),
        peer_port: fetcher.peer_port(),
        data_addr: Some(links.data_addr.to_string()),
        shards: held,
        signing_key: Some(links.pipeline.signing_key()),
        tls_public_key: Some(links.pipeline.tls_public_key()),
        capacity: Capacity {
            ram_bytes: crate::store::ram_available(),
            disk_free_bytes: data.disk_free(),
            threads: config.threads.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
            }),
            uplink_mbit: config.uplink_mbit,
            downlink_mbit: config.downlink_mbit,
        },
        token: config.token.clone(),
        mesh: links.pipeline.mesh().map(|m| m.addr()),
    };
    let send = |c: Control| Message::Text(c.encode().into());
    sink.send(send(Control::new(&me, COORDINATOR, M::Register(register))))
        .await
        .map_err(Error::control)?;
    let routes = apply_routes_in_order(links.pipeline.clone(), events_tx.clone());
    let mut heartbeat = tokio::time::interval(Duration::from_secs(2));
    let mut last_heard = tokio::time::Instant::now();
    let mut registered = false;
    loop {
        tokio::select! {
            frame = stream.next() => {
                let text = match frame {
                    Some(Ok(Message::Text(t))) => t.to_string(),
                    Some(Ok(Message::Close(_))) | None => return Err(Error::control("the coordinator closed the connection")),
                    Some(Err(e)) => return Err(Error::control(format!("the connection failed: {e}"))),
                    Some(Ok(_)) => continue,
                };
                last_heard = tokio::time::Instant::now();
                let msg = match Control::decode(&text) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!("unreadable message from the coordinator: {e}");
                        continue;
                    }
                };
                let command = msg.message.command();
                match msg.message {
                    M::Registered(p) => {
                        if let Some(tls) = &p.tls {
                            links.pipeline.set_tls(tls)?;
                            tracing::info!("the data channel runs over TLS (the swarm's CA)");
                        }
                        let (secret, bind) = links.mesh;
                        links.pipeline.home_mesh(*secret, bind, p.relay.as_ref()).await?;
                        registered = true;
                        heartbeat = tokio::time::interval(Duration::from_secs(p.heartbeat_interval_secs.max(1)));
                        tracing::info!("registered: split {} of model {}", p.split_id, p.model_sha256);
                    }
                    M::LoadShard(p) => {
                        tracing::info!("LOAD_SHARD {} ({}){}", p.shard_id, p.file, if p.use_tracker { "" } else { " from peers" });
                        let shard_id = p.shard_id;
                        let task = tokio::spawn(fetcher.clone().load(p, events_tx.clone()));
                        // A new LOAD_SHARD for a shard replaces the fetch already running.
                        if let Some(old) = tasks.insert(shard_id, task.abort_handle()) {
                            old.abort();
                        }
                    }
                    M::UnloadShard(p) => {
                        if let Some(task) = tasks.remove(&p.shard_id) {
                            task.abort();
                        }
                        unload(fetcher, data, p).await;
                    }
                    M::SwarmReady(p) | M::SwarmNotReady(p) => tracing::info!("{command}: {p:?}"),
                    M::ProveShard(protocol::ProveShard::Challenge(c)) => {
                        let proof = prove(data, &c).await;
                        let reply = Control::reply_to(&msg.request_id, &me, COORDINATOR, M::ProveShard(protocol::ProveShard::Proof(proof)));
                        sink.send(send(reply)).await.map_err(Error::control)?;
                    }
                    M::Route(Route::Assign(p)) => {
                        let _ = routes.send((msg.request_id.clone(), p));
                    }
                    M::Error(e) => {
                        if !registered && [code::UNAUTHORIZED, code::FOREIGN_SHARDS, code::PROTOCOL_VERSION, code::EVICTED].contains(&e.code.as_str()) {
                            return Err(Error::Refused { code: e.code, message: e.message });
                        }
                        tracing::warn!("coordinator error {}: {}", e.code, e.message);
                    }
                    _ => {}
                }
            }
            Some(event) = events_rx.recv(), if registered => {
                let c = match event {
                    FetchEvent::Routed(request_id, stage, decode) => Control::reply_to(
                        &request_id,
                        &me,
                        COORDINATOR,
                        M::Route(Route::Loaded(RouteLoadedParams { stage, loaded: true, decode: Some(decode) })),
                    ),
                    FetchEvent::Progress(p) => {
                        links.pipeline.metrics.fetch_progress(p.shard_id, p.from_seeder, p.from_peers);
                        Control::new(&me, COORDINATOR, M::ShardProgress(p))
                    }
                    FetchEvent::Loaded(p) => {
                        links.pipeline.metrics.fetch_progress(p.shard_id, p.from_seeder, p.from_peers);
                        Control::new(&me, COORDINATOR, M::ShardLoaded(p))
                    }
                    FetchEvent::Failed(p) => Control::new(&me, COORDINATOR, M::ShardFailed(p)),
                };
                sink.send(send(c)).await.map_err(Error::control)?;
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > Duration::from_secs(30) {
                    return Err(Error::control("nothing heard from the coordinator for 30 s"));
                }
                if registered {
                    sink.send(send(Control::new(&me, COORDINATOR, M::Heartbeat(HeartbeatParams { mesh: links.pipeline.mesh().map(|m| m.addr()), next_edge: links.pipeline.next_edge() })))).await.map_err(Error::control)?;
                }
            }
        }
    }
}

/// The answer to a challenge for a shard this node claimed: the digest of the range of its
/// verified file (an empty digest when it has no such file, or cannot read it).
async fn prove(data: &DataDir, c: &protocol::ShardChallenge) -> protocol::ShardProof {
    let file = data.verified().into_iter().find(|(f, _)| {
        torrents::split::parse_shard_file_name(f).is_some_and(|(k, _)| k == c.shard_id)
    });
    let path = file.map(|(f, _)| data.shards_dir().join(f));
    let (offset, length, nonce) = (c.offset, c.length, c.nonce.clone());
    let digest = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        use std::io::{Read, Seek};
        let Some(path) = path else {
            return Ok(String::new());
        };
        let mut f = std::fs::File::open(path)?;
        f.seek(std::io::SeekFrom::Start(offset))?;
        let mut bytes = Vec::new();
        f.take(u64::from(length.min(protocol::MAX_CHALLENGE_BYTES)))
            .read_to_end(&mut bytes)?;
        Ok(protocol::possession_digest(&nonce, &bytes))
    })
    .await;
    let digest = match digest {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => {
            tracing::warn!("proving shard {}: {e}", c.shard_id);
            String::new()
        }
        Err(_) => String::new(),
    };
    protocol::ShardProof {
        shard_id: c.shard_id,
        digest,
    }
}

async fn unload(fetcher: &Fetcher, data: &DataDir, p: UnloadShardParams) {
    let Some((file, _)) = data.verified().into_iter().find(|(f, _)| {
        torrents::split::parse_shard_file_name(f).is_some_and(|(k, _)| k == p.shard_id)
    }) else {
        return;
    };
    let handles: Vec<_> = fetcher.session.with_torrents(|ts| {
        ts.filter(|(_, t)| t.name().as_deref() == Some(file.as_str()))
            .map(|(id, _)| id)
            .collect()
    });
    for id in handles {
        let _ = fetcher.session.delete(id.into(), false).await;
    }
    if let Err(e) = data.forget(&file, p.delete) {
        tracing::warn!("unloading {file}: {e:#}");
    }
    tracing::info!(
        "unloaded shard {} ({file}){}",
        p.shard_id,
        if p.delete { ", deleted" } else { "" }
    );
}

/// Applies the coordinator's `ROUTE`s one at a time, in the order they came, and acknowledges
/// each: a stage takes seconds to load, and two loads racing could leave the older route in
/// place (a replica's route without hop keys over the route's own, say). When several wait,
/// only the newest is applied. The task ends when the connection's sender is dropped.
fn apply_routes_in_order(
    pipeline: Arc<crate::serve::Pipeline>,
    events: mpsc::UnboundedSender<FetchEvent>,
) -> mpsc::UnboundedSender<(String, protocol::RouteParams)> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, protocol::RouteParams)>();
    tokio::spawn(async move {
        while let Some(mut next) = rx.recv().await {
            while let Ok(newer) = rx.try_recv() {
                next = newer;
            }
            let (request_id, route) = next;
            let stage = route.stage;
            match pipeline.set_route(route).await {
                Ok(decode) => {
                    let _ = events.send(FetchEvent::Routed(request_id, stage, decode));
                }
                Err(e) => tracing::error!("cannot run my stage: {e:#}"),
            }
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::control_url;

    #[test]
    fn control_urls() {
        assert_eq!(
            control_url("http://127.0.0.1:5/"),
            "ws://127.0.0.1:5/control"
        );
        assert_eq!(control_url("ws://h:1/control"), "ws://h:1/control");
        assert_eq!(control_url("https://h"), "wss://h/control");
    }
}
