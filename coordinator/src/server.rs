//! The coordinator's sockets: the `/control` WebSocket, `/status`, `/healthz`, and the
//! heartbeat sweeper. Each connection has a task reading frames and an outbound channel;
//! [`Hub::dispatch`] routes what the swarm rules produce to those channels.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::{SinkExt, StreamExt};
use protocol::{
    cmd, code, Command, RegisterParams, ShardFailedParams, ShardLoadedParams, ShardProgressParams,
    COORDINATOR,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::swarm::{Outbox, Swarm};
use crate::Config;

/// Shared state: the swarm and the connections.
pub struct Hub {
    pub swarm: Mutex<Swarm>,
    /// node id → (connection id, outbound channel).
    conns: Mutex<HashMap<String, (u64, mpsc::UnboundedSender<Command>)>>,
    next_conn: AtomicU64,
    seeder: String,
    /// The model's vocabulary (from shard 0), for the OpenAI API.
    pub vocab: Option<Arc<crate::infer::Vocab>>,
    /// Held by the request running through the pipeline: the others queue.
    pub pipeline: tokio::sync::Mutex<()>,
}

impl Hub {
    /// Send each message to its node, or to every registered node for a broadcast.
    pub fn dispatch(&self, out: Outbox) {
        let conns = self.conns.lock().unwrap();
        for (to, msg) in out {
            if to == protocol::BROADCAST {
                for (_, tx) in conns.values() {
                    let _ = tx.send(msg.clone());
                }
            } else if let Some((_, tx)) = conns.get(&to) {
                let _ = tx.send(msg);
            }
        }
    }
}

/// A started coordinator.
pub struct Running {
    pub http: SocketAddr,
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
pub async fn start(config: Config) -> anyhow::Result<Running> {
    config.check()?;
    let split = crate::seeder_client::fetch_split_with_retry(&config.seeder).await?;
    tracing::info!(
        "split {} of model {}: {} shards",
        split.split_id,
        split.model_sha256,
        split.shards.len()
    );
    let (interval, timeout) = config.heartbeat();
    let cache_dir = config
        .cache_dir
        .clone()
        .unwrap_or_else(crate::infer::default_cache_dir);
    let model_id = split.model_name.clone();
    let vocab =
        match crate::infer::Vocab::fetch(&config.seeder, &split.shards[0], &cache_dir, model_id)
            .await
        {
            Ok(v) => Some(Arc::new(v)),
            Err(e) => {
                tracing::warn!("no vocabulary, so no inference API: {e:#}");
                None
            }
        };
    let hub = Arc::new(Hub {
        swarm: Mutex::new(Swarm {
            shards: split.shards,
            nodes: Default::default(),
            min_nodes: config.min_nodes,
            ready: false,
            model_sha256: split.model_sha256,
            split_id: split.split_id,
            seeder_peer: split.seeder_peer,
            token: config.token.clone(),
            heartbeat_interval: interval,
            heartbeat_timeout: timeout,
            route: None,
            route_loaded: Default::default(),
            settle_until: std::time::Instant::now() + timeout,
        }),
        conns: Mutex::default(),
        next_conn: AtomicU64::new(1),
        seeder: config.seeder.clone(),
        vocab,
        pipeline: tokio::sync::Mutex::new(()),
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", config.listen))?;
    let http = listener.local_addr()?;
    let cancel = CancellationToken::new();
    let app = Router::new()
        .route("/control", get(control))
        .route("/status", get(status))
        .route("/v1/models", get(crate::openai::models))
        .route(
            "/v1/completions",
            axum::routing::post(crate::openai::completions),
        )
        .route(
            "/v1/chat/completions",
            axum::routing::post(crate::openai::chat_completions),
        )
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .with_state(hub.clone());
    let stop = cancel.clone();
    tokio::spawn(async move {
        let serve = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { stop.cancelled().await });
        if let Err(e) = serve.await {
            tracing::error!("HTTP server: {e}");
        }
    });
    tokio::spawn(sweep_heartbeats(hub.clone(), cancel.clone()));
    Ok(Running { http, hub, cancel })
}

async fn status(State(hub): State<Arc<Hub>>) -> Json<serde_json::Value> {
    Json(hub.swarm.lock().unwrap().status())
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
        if !dead.is_empty() {
            let mut conns = hub.conns.lock().unwrap();
            for id in dead {
                conns.remove(&id); // dropping the sender ends that connection's writer
            }
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
        .on_upgrade(move |socket| connection(socket, hub, remote, bearer))
        .into_response()
}

/// One node connection: frames in, commands out, until either side closes.
async fn connection(socket: WebSocket, hub: Arc<Hub>, remote: SocketAddr, bearer: Option<String>) {
    let conn = hub.next_conn.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Command>();
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
    while let Some(frame) = stream.next().await {
        let text = match frame {
            Ok(Message::Text(t)) => t.to_string(),
            Ok(Message::Binary(_)) => {
                let _ = tx.send(Command::error(
                    "",
                    COORDINATOR,
                    "",
                    code::BAD_JSON,
                    "binary frames are not commands",
                ));
                continue;
            }
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        let req = match Command::decode(&text) {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.send(Command::error(
                    "",
                    COORDINATOR,
                    node.as_deref().unwrap_or(""),
                    code::BAD_JSON,
                    &e.to_string(),
                ));
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
            &tx,
        )
        .await
        {
            Ok(Some(registered)) => node = Some(registered),
            Ok(None) => {}
            Err(Close) => break,
        }
    }
    if let Some(id) = node {
        let out = {
            let mut conns = hub.conns.lock().unwrap();
            if conns.get(&id).is_some_and(|(c, _)| *c == conn) {
                conns.remove(&id);
            }
            drop(conns);
            hub.swarm.lock().unwrap().disconnected(&id, conn)
        };
        hub.dispatch(out);
    }
    drop(tx);
    let _ = writer.await;
}

/// Close the connection (after a refused registration).
struct Close;

/// Handle one command. Returns the node id when this command registered the connection.
async fn handle(
    hub: &Hub,
    req: &Command,
    node: Option<&str>,
    ip: std::net::IpAddr,
    conn: u64,
    bearer: Option<&str>,
    tx: &mpsc::UnboundedSender<Command>,
) -> Result<Option<String>, Close> {
    let from = node.unwrap_or(&req.from);
    let reply_error = |code: &str, message: &str| {
        let _ = tx.send(Command::error(
            &req.request_id,
            COORDINATOR,
            from,
            code,
            message,
        ));
    };
    if req.command == cmd::REGISTER {
        let p: RegisterParams = match req.params() {
            Ok(p) => p,
            Err(e) => {
                reply_error(code::BAD_PARAMS, &e.to_string());
                return Ok(None);
            }
        };
        let result = hub
            .swarm
            .lock()
            .unwrap()
            .register(req, &p, ip, conn, bearer);
        return match result {
            Ok(out) => {
                // The reply goes out first, on this connection, then the placements.
                let (mine, rest): (Outbox, Outbox) = out
                    .into_iter()
                    .partition(|(to, c)| to == &p.node_id && c.command == cmd::REGISTERED);
                for (_, c) in mine {
                    let _ = tx.send(c);
                }
                hub.conns
                    .lock()
                    .unwrap()
                    .insert(p.node_id.clone(), (conn, tx.clone()));
                hub.dispatch(rest);
                Ok(Some(p.node_id))
            }
            Err((code, message)) => {
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
    hub.swarm.lock().unwrap().seen(node);
    macro_rules! params {
        ($t:ty) => {
            match req.params::<$t>() {
                Ok(p) => p,
                Err(e) => {
                    reply_error(code::BAD_PARAMS, &e.to_string());
                    return Ok(None);
                }
            }
        };
    }
    let out = match req.command.as_str() {
        cmd::HEARTBEAT => {
            let _ = tx.send(Command::reply_to(
                &req.request_id,
                cmd::HEARTBEAT,
                COORDINATOR,
                node,
                serde_json::json!({}),
            ));
            Vec::new()
        }
        cmd::ROUTE => {
            hub.swarm.lock().unwrap().route_acked(node);
            Vec::new()
        }
        cmd::SHARD_PROGRESS => {
            let p = params!(ShardProgressParams);
            hub.swarm.lock().unwrap().progress(node, &p)
        }
        cmd::SHARD_LOADED => {
            let p = params!(ShardLoadedParams);
            hub.swarm.lock().unwrap().loaded(node, &p)
        }
        cmd::SHARD_FAILED => {
            let p = params!(ShardFailedParams);
            hub.swarm.lock().unwrap().failed(node, &p)
        }
        cmd::LIST_FILES => {
            match crate::seeder_client::get_json(&hub.seeder, "/files").await {
                Ok(files) => {
                    let _ = tx.send(Command::reply_to(
                        &req.request_id,
                        cmd::LIST_FILES,
                        COORDINATOR,
                        node,
                        files,
                    ));
                }
                Err(e) => reply_error(code::SEEDER_UNAVAILABLE, &format!("{e:#}")),
            }
            Vec::new()
        }
        other => {
            reply_error(code::UNKNOWN_COMMAND, &format!("unknown command {other:?}"));
            Vec::new()
        }
    };
    hub.dispatch(out);
    Ok(None)
}
