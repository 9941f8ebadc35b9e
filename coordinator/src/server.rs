//! The coordinator's sockets: the `/control` WebSocket, `/status`, `/healthz`, and the
//! heartbeat sweeper. Each connection has a task reading frames and an outbound channel;
//! [`Hub::dispatch`] routes what the swarm rules produce to those channels.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::{SinkExt, StreamExt};
use protocol::{code, Control, COORDINATOR};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;
use crate::status::full_status;
use crate::swarm::{Outbox, Refusal, Swarm, SwarmSettings};
use crate::{Config, Result};

mod vetting;

/// A started coordinator.
pub struct Running {
    pub http: SocketAddr,
    /// `https` with `--tls-cert`, else `http`.
    pub scheme: &'static str,
    pub hub: Arc<Hub>,
    cancel: CancellationToken,
}

impl Running {
    pub async fn wait_for_shutdown_signal(&self) {
        tokio::select! {
            _ = daemon::shutdown_signal() => {}
            _ = self.cancel.cancelled() => {}
        }
    }

    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

/// Learn the split from the seeder, then listen.
pub async fn start(config: Config) -> Result<Running> {
    config.check()?;
    let access = Arc::new(crate::access::Access::resolve(&config)?);
    let tls = crate::ca::choose(&config)?;
    let key = config.seeder_key.as_deref();
    if key.is_none() && !crate::seeder_client::is_local(&config.seeder) {
        tracing::warn!(
            "no --seeder-key: the manifest from {} is taken as it comes (give the key the seeder \
             prints as [SEEDER-KEY], so that nobody in between can swap it)",
            config.seeder
        );
    }
    let split = crate::seeder_client::fetch_split_with_retry(&config.seeder, key).await?;
    tracing::info!(
        "split {} of model {}: {} shards",
        split.split_id,
        split.model_sha256,
        split.shards.len()
    );
    let relay = crate::seeder_client::fetch_relay(&config.seeder, key).await?;
    let mesh = match (config.data_transport, &relay) {
        (crate::DataTransport::Tcp, _) | (crate::DataTransport::Auto, None) => None,
        (crate::DataTransport::Mesh | crate::DataTransport::Auto, relay) => {
            // A fresh key at every start: nodes know the coordinator by its hop keys.
            let secret = mesh::random_secret();
            let bind = std::net::SocketAddr::new(config.listen.ip(), 0);
            let mesh = mesh::Mesh::start(secret, bind, relay.as_ref())
                .await
                .map_err(|e| crate::Error::Config(e.to_string()))?;
            match relay {
                Some(r) => tracing::info!("the data channel runs over the mesh, relay {}", r.url),
                None => tracing::info!("the data channel runs over the mesh, without a relay"),
            }
            Some(mesh)
        }
    };
    // Members home on the relay only when the data channel runs over the mesh.
    let relay = mesh.as_ref().and(relay);
    let (interval, timeout) = config.heartbeat();
    let cache_dir = config
        .cache_dir
        .clone()
        .unwrap_or_else(crate::text::default_cache_dir);
    let (model_id, model_name) = (split.model_id.clone(), split.model_name.clone());
    // The vocabulary file (megabytes), or shard 0 of a split made before there was one.
    let vocab_file = split.vocab.clone().unwrap_or_else(|| {
        tracing::warn!(
            "the split has no vocabulary file (made by an older `split`): fetching shard 0 for the vocabulary"
        );
        crate::seeder_client::RemoteFile::from(&split.shards[0])
    });
    let vocab = crate::text::Vocab::fetch(&vocab_file, &cache_dir, model_id, model_name)
        .await
        .map(Arc::new)
        .map_err(|e| {
            tracing::warn!("no vocabulary, so no inference API: {e}");
            e.to_string()
        });
    let swarm = Swarm::new(
        split.shards,
        SwarmSettings {
            min_nodes: config.min_nodes,
            model_sha256: split.model_sha256,
            split_id: split.split_id,
            seeder_peer: split.seeder_peer,
            token: access.token.clone(),
            heartbeat_interval: interval,
            heartbeat_timeout: timeout,
            parallel: config.parallel,
            mesh: mesh.is_some(),
        },
    );
    let (verify, verify_stats) = crate::verify::new(
        config.verify_fraction,
        config.verify_tolerance,
        cache_dir.join("referee"),
    );
    let (sampler, checks) = verify.unzip();
    let (breaches, breached) = tokio::sync::mpsc::unbounded_channel();
    let engine = crate::engine::EngineSettings {
        model_sha256: swarm.settings.model_sha256.clone(),
        split_id: swarm.settings.split_id.clone(),
        parallel: config.parallel as usize,
        micro_batches: config.micro_batches,
        queue: config.queue,
        deadline: Duration::from_secs(config.deadline),
        tls: tls.data_client.clone(),
        mesh: mesh.clone(),
        edges: Default::default(),
        chain_wire_us: Default::default(),
        live: Default::default(),
        breaches: Some(breaches),
    };
    let hub = Arc::new(Hub::new(
        swarm,
        config.seeder.clone(),
        vocab,
        engine,
        (sampler, verify_stats),
        (tls.ca.clone(), tls.data_client.clone()),
        (mesh, relay),
    ));
    let metrics = Arc::new(crate::metrics::registry(
        &hub.live,
        Box::new(crate::status::SwarmCollector(hub.clone())),
    ));
    tokio::spawn(evict_breaches(hub.clone(), breached));
    if let Some(checks) = checks {
        crate::checker::spawn(checks, hub.clone());
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| daemon::IoError::new(format!("binding {}", config.listen), e))?;
    let http = listener
        .local_addr()
        .map_err(|e| daemon::IoError::new("the listening address", e))?;
    let cancel = CancellationToken::new();
    // Behind an API key when one is set: the API, and what /status tells about the swarm.
    let api = Router::new()
        .route("/status", get(status))
        .route(
            "/metrics",
            get(move || async move { daemon::metrics::answer(crate::metrics::encode(&metrics)) }),
        )
        .route("/dashboard", get(dashboard_live))
        .route("/v1/models", get(crate::openai::models))
        .route(
            "/v1/completions",
            axum::routing::post(crate::openai::completions),
        )
        .route(
            "/v1/chat/completions",
            axum::routing::post(crate::openai::chat_completions),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            access.clone(),
            crate::access::require_api_key,
        ))
        // Outermost, so refusals (401) are counted too.
        .route_layer(axum::middleware::from_fn_with_state(
            hub.clone(),
            count_requests,
        ));
    let app = Router::new()
        .route("/control", get(control))
        .route(
            "/",
            get({
                let open = access.api_keys.is_empty();
                move |State(hub): State<Arc<Hub>>| dashboard_page(hub, open)
            }),
        )
        .merge(api)
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .with_state(hub.clone());
    let limits = daemon::HttpLimits {
        max_connections: config.max_connections,
        ..daemon::HttpLimits::default()
    };
    let app = match (&tls.ca, tls.serve_ca) {
        (Some(ca), true) => crate::ca::route(app, Some(ca), access.token.as_deref()),
        (Some(_), false) => crate::ca::route(app, None, access.token.as_deref()),
        (None, _) => app,
    };
    let scheme = if tls.server.is_some() {
        "https"
    } else {
        "http"
    };
    daemon::serve_http(listener, app, cancel.clone(), limits, tls.server.clone())?;
    tokio::spawn(sweep_heartbeats(hub.clone(), cancel.clone()));
    Ok(Running {
        http,
        scheme,
        hub,
        cancel,
    })
}

/// Evict each node the engine reports for breaking the protocol, until the engine stops.
async fn evict_breaches(
    hub: Arc<Hub>,
    mut breached: mpsc::UnboundedReceiver<crate::engine::Breach>,
) {
    while let Some(b) = breached.recv().await {
        let out = hub
            .swarm
            .lock()
            .unwrap()
            .evict(&b.node_id, b.shard_id, b.reason);
        hub.disconnect(&b.node_id);
        hub.dispatch(out);
    }
}

/// Count each API answer by route and status code (`/metrics`).
async fn count_requests(
    State(hub): State<Arc<Hub>>,
    matched: axum::extract::MatchedPath,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = matched.as_str().to_owned();
    let response = next.run(request).await;
    if route.starts_with("/v1/") {
        hub.live
            .requests
            .get_or_create(&vec![
                ("route", route),
                ("code", response.status().as_u16().to_string()),
            ])
            .inc();
    }
    response
}

/// The dashboard (`/`): with the swarm in it where the API is open, else a page that asks
/// for the key.
async fn dashboard_page(hub: Arc<Hub>, open: bool) -> axum::response::Html<String> {
    let status = open.then(|| full_status(&hub));
    axum::response::Html(crate::dashboard::page(status.as_ref(), hub.model_id()))
}

/// The dashboard's live part, which the page fetches every second.
async fn dashboard_live(State(hub): State<Arc<Hub>>) -> axum::response::Html<String> {
    axum::response::Html(crate::dashboard::live(&full_status(&hub)))
}

async fn status(State(hub): State<Arc<Hub>>) -> Json<protocol::status::Status> {
    Json(full_status(&hub))
}

/// Drop silent nodes once a second.
async fn sweep_heartbeats(hub: Arc<Hub>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (out, dead) = hub.swarm.lock().unwrap().expire(std::time::Instant::now());
        for id in dead {
            hub.disconnect(&id); // dropping the sender ends that connection's writer
        }
        hub.dispatch(out);
    }
}

async fn control(
    ws: WebSocketUpgrade,
    State(hub): State<Arc<Hub>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    ws.max_message_size(1 << 20)
        .max_frame_size(1 << 20)
        .on_upgrade(move |socket| connection(socket, hub, remote, bearer))
        .into_response()
}

/// Queue `msg` for a connection; one whose queue is full (a peer that does not read) is
/// closed instead.
fn queue(tx: &mpsc::Sender<Control>, close: &CancellationToken, msg: Control) {
    if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(msg) {
        if !close.is_cancelled() {
            tracing::warn!(
                "a control connection let {} replies pile up unread: closing it",
                crate::hub::CONTROL_QUEUE
            );
        }
        close.cancel();
    }
}

/// How long a new control connection may go without registering: one that does not is
/// closed, so that unregistered sockets cannot pile up.
const REGISTER_WITHIN: Duration = Duration::from_secs(10);

/// One node connection: frames in, commands out, until either side closes.
async fn connection(socket: WebSocket, hub: Arc<Hub>, remote: SocketAddr, bearer: Option<String>) {
    let conn = hub.next_connection_id();
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Control>(crate::hub::CONTROL_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if sink.send(Message::Text(msg.encode().into())).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let ip = match remote.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(remote.ip(), std::net::IpAddr::V4),
        ip => ip,
    };
    let mut node: Option<String> = None;
    // Cancelled when the coordinator drops the node (silent, stuck, or registered anew).
    let close = CancellationToken::new();
    let register_by = tokio::time::Instant::now() + REGISTER_WITHIN;
    loop {
        let frame = tokio::select! {
            frame = stream.next() => frame,
            _ = close.cancelled() => break,
            _ = tokio::time::sleep_until(register_by), if node.is_none() => {
                let msg = Control::error(
                    "",
                    COORDINATOR,
                    "",
                    code::NOT_REGISTERED,
                    &format!("no REGISTER within {REGISTER_WITHIN:?}: closing"),
                );
                queue(&tx, &close, msg);
                break;
            }
        };
        let Some(frame) = frame else { break };
        let text = match frame {
            Ok(Message::Text(t)) => t.to_string(),
            Ok(Message::Binary(_)) => {
                let msg = Control::error(
                    "",
                    COORDINATOR,
                    "",
                    code::BAD_JSON,
                    "binary frames are not commands",
                );
                queue(&tx, &close, msg);
                continue;
            }
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        let req = match Control::decode(&text) {
            Ok(c) => c,
            Err(e) => {
                queue(&tx, &close, undecodable(&e, node.as_deref()));
                continue;
            }
        };
        match handle(
            &hub,
            &req,
            node.as_deref(),
            ip,
            conn,
            bearer.as_deref(),
            (&tx, &close),
        )
        .await
        {
            Ok(Some(registered)) => {
                vetting::registered(&hub, &registered);
                node = Some(registered);
            }
            Ok(None) => {
                // A shard reported loaded counts once proved, like one claimed at REGISTER.
                if let (Some(n), protocol::Message::ShardLoaded(_)) = (&node, &req.message) {
                    tokio::spawn(vetting::challenge_claims(hub.clone(), n.clone()));
                }
            }
            Err(Close) => break,
        }
    }
    if let Some(id) = node {
        hub.closed(&id, conn);
        let out = hub.swarm.lock().unwrap().disconnected(&id, conn);
        hub.dispatch(out);
    }
    drop(tx);
    let _ = writer.await;
}

/// The `ERROR` answering a frame that is not a usable command. Before REGISTER, anything but
/// REGISTER is answered `not_registered`, whatever else is wrong with it.
fn undecodable(e: &protocol::DecodeError, node: Option<&str>) -> Control {
    let (request_id, from) = e.request().unwrap_or(("", ""));
    let to = node.unwrap_or(from);
    match e.command() {
        Some(c) if node.is_none() && c != protocol::cmd::REGISTER => Control::error(
            request_id,
            COORDINATOR,
            to,
            code::NOT_REGISTERED,
            "send REGISTER first",
        ),
        _ => Control::error(request_id, COORDINATOR, to, e.code(), &e.to_string()),
    }
}

/// Close the connection (after a refused registration).
struct Close;

/// Handle one command. Returns the node id when this command registered the connection.
async fn handle(
    hub: &Hub,
    req: &Control,
    node: Option<&str>,
    ip: std::net::IpAddr,
    conn: u64,
    bearer: Option<&str>,
    (tx, close): (&mpsc::Sender<Control>, &CancellationToken),
) -> Result<Option<String>, Close> {
    let from = node.unwrap_or(&req.from);
    let reply = |message: protocol::Message| {
        let msg = Control::reply_to(&req.request_id, COORDINATOR, from, message);
        queue(tx, close, msg);
    };
    let reply_error = |code: &str, message: &str| {
        let msg = Control::error(&req.request_id, COORDINATOR, from, code, message);
        queue(tx, close, msg);
    };
    if let protocol::Message::Register(p) = &req.message {
        let tls = match hub.node_tls(p) {
            Ok(tls) => tls,
            Err(message) => {
                tracing::warn!("refused registration of {} from {ip}: {message}", p.node_id);
                reply_error(code::BAD_PARAMS, &message);
                return Ok(None);
            }
        };
        let result = hub
            .swarm
            .lock()
            .unwrap()
            .register(&req.request_id, p, ip, conn, bearer);
        return match result {
            Ok(out) => {
                // The reply goes out first, on this connection, then the placements.
                let (mine, rest): (Outbox, Outbox) = out.into_iter().partition(|(to, c)| {
                    to == &p.node_id && matches!(c.message, protocol::Message::Registered(_))
                });
                for (_, mut c) in mine {
                    if let protocol::Message::Registered(r) = &mut c.message {
                        r.tls = tls.clone();
                        r.relay = hub.relay.clone();
                    }
                    queue(tx, close, c);
                }
                hub.connected(&p.node_id, conn, tx.clone(), close.clone());
                hub.dispatch(rest);
                Ok(Some(p.node_id.clone()))
            }
            Err(Refusal(code, message)) => {
                tracing::warn!("refused registration of {} from {ip}: {message}", p.node_id);
                reply_error(code, &message);
                if code == code::UNAUTHORIZED || code == code::FOREIGN_SHARDS {
                    Err(Close)
                } else {
                    Ok(None)
                }
            }
        };
    }
    let Some(node) = node else {
        reply_error(code::NOT_REGISTERED, "send REGISTER first");
        return Ok(None);
    };
    let taken = hub.swarm.lock().unwrap().take(node, &req.message);
    if let Some(out) = taken {
        hub.dispatch(out);
        return Ok(None);
    }
    use protocol::Message as M;
    let out = match &req.message {
        M::Heartbeat(p) => {
            let heard = {
                let mut swarm = hub.swarm.lock().unwrap();
                swarm.heard(node, p).map(|out| (out, swarm.chain_wire()))
            };
            let (out, wire) = match heard {
                Ok(heard) => heard,
                Err(why) => {
                    reply_error(code::BAD_PARAMS, &why);
                    return Ok(None);
                }
            };
            if let Some(engine) = hub.engine() {
                engine.chain_wire_us.store(
                    wire.as_micros() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            hub.dispatch(out);
            reply(M::Heartbeat(protocol::HeartbeatParams::default()));
            Vec::new()
        }
        M::ListFiles(_) => {
            match crate::seeder_client::get_json(&hub.seeder, "/files").await {
                Ok(files) => reply(M::ListFiles(protocol::ListFiles::Reply(files))),
                Err(e) => reply_error(code::SEEDER_UNAVAILABLE, &format!("{e:#}")),
            }
            Vec::new()
        }
        other => {
            reply_error(
                code::UNKNOWN_COMMAND,
                &format!("{} is not a command the coordinator takes", other.command()),
            );
            Vec::new()
        }
    };
    hub.dispatch(out);
    Ok(None)
}
