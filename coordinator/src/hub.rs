//! What the coordinator's tasks share, assembled in one place: the swarm, the node
//! connections' outbound channels, the inference engine with its vocabulary, and the serving
//! route as a watch channel (the one source of readiness: the engine admits requests by it,
//! and a request that lost a stage wakes when it changes rather than polling). The hub only
//! assembles; the control channel, the API, the checker and `/metrics` use it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use protocol::Control;
use tokio::sync::{mpsc, watch};

use crate::engine::{Engine, EngineSettings};
use crate::metrics::Live;
use crate::swarm::{Outbox, RouteHop, Swarm};
use crate::text::Vocab;
use crate::verify::{Sampler, VerifyStats};

/// Commands that may wait to be written to one node. A node reads its control channel all
/// the time; one that lets this many pile up is stuck (or hostile) and is disconnected
/// rather than allowed to grow the coordinator's memory.
pub const CONTROL_QUEUE: usize = 256;

/// A registered node's connection: its id, its outbound channel, and the token that ends it.
struct Conn {
    id: u64,
    tx: mpsc::Sender<Control>,
    close: tokio_util::sync::CancellationToken,
}

/// Shared state: the swarm and the connections.
pub struct Hub {
    pub swarm: Mutex<Swarm>,
    /// node id → (connection id, outbound channel).
    conns: Mutex<HashMap<String, Conn>>,
    next_conn: AtomicU64,
    /// The seeder's HTTP base URL.
    pub seeder: String,
    /// The OpenAI API's serving, or why there is none.
    pub inference: Inference,
    /// The route while every stage on it is loaded ([`Swarm::serving_route`]).
    route: watch::Sender<Option<Vec<RouteHop>>>,
    /// What the checks of holders' outputs found ([`crate::verify`]).
    pub verify_stats: Arc<Mutex<VerifyStats>>,
    /// The swarm's CA, which signs the nodes' data-channel certificates (TLS swarms only).
    ca: Option<Arc<crate::ca::SwarmCa>>,
    /// What the coordinator trusts on the data channel (the swarm's CA), built once.
    data_tls: Option<protocol::data::io::ClientTls>,
    /// The measurements taken as requests are served (`/metrics`).
    pub live: Arc<Live>,
    /// The coordinator's mesh endpoint, when the data channel runs over the mesh.
    pub mesh: Option<mesh::Mesh>,
    /// The swarm's relay members home on (with the mesh only).
    pub relay: Option<protocol::RelayInfo>,
}

/// Whether the coordinator can serve inference: both the vocabulary and the engine, or
/// neither.
pub enum Inference {
    Ready {
        vocab: Arc<Vocab>,
        engine: Engine,
    },
    /// No vocabulary could be loaded (the reason), so no API.
    Off(String),
}

impl Hub {
    pub fn new(
        swarm: Swarm,
        seeder: String,
        vocab: Result<Arc<Vocab>, String>,
        engine: EngineSettings,
        (sampler, verify_stats): (Option<Sampler>, Arc<Mutex<VerifyStats>>),
        (ca, data_tls): (
            Option<Arc<crate::ca::SwarmCa>>,
            Option<protocol::data::io::ClientTls>,
        ),
        (mesh, relay): (Option<mesh::Mesh>, Option<protocol::RelayInfo>),
    ) -> Hub {
        let live = engine.live.clone();
        let route = watch::Sender::new(swarm.serving_route());
        let inference = match vocab {
            Ok(vocab) => Inference::Ready {
                engine: Engine::start(engine, vocab.clone(), route.subscribe(), sampler),
                vocab,
            },
            Err(why) => Inference::Off(why),
        };
        Hub {
            live,
            route,
            swarm: Mutex::new(swarm),
            conns: Mutex::default(),
            next_conn: AtomicU64::new(1),
            seeder,
            inference,
            verify_stats,
            ca,
            data_tls,
            mesh,
            relay,
        }
    }

    /// The engine, when the coordinator serves inference.
    pub fn engine(&self) -> Option<&Engine> {
        match &self.inference {
            Inference::Ready { engine, .. } => Some(engine),
            Inference::Off(_) => None,
        }
    }

    /// The model id the API answers with (empty without a vocabulary).
    pub fn model_id(&self) -> &str {
        match &self.inference {
            Inference::Ready { vocab, .. } => &vocab.model_id,
            Inference::Off(_) => "",
        }
    }

    /// The data-channel TLS of a node registering with `p`, in a TLS swarm and when it has a
    /// data address: a certificate of the key it named. Err (for `bad_params`) when that key is
    /// missing or not a key, or the CA fails.
    pub fn node_tls(
        &self,
        p: &protocol::RegisterParams,
    ) -> Result<Option<protocol::NodeTls>, String> {
        let Some(ca) = self.ca.as_ref() else {
            return Ok(None);
        };
        if p.data_addr.is_none() {
            return Ok(None);
        }
        let key = p.tls_public_key.as_deref().ok_or(
            "this swarm runs TLS: REGISTER must name tls_public_key, the public half of the \
             node's data-channel key",
        )?;
        ca.node_tls(&p.node_id, key)
            .map_err(|e| e.to_string())
            .map(Some)
    }

    /// What the coordinator trusts on the data channel: the swarm's CA (TLS swarms only).
    pub fn data_tls(&self) -> Option<&protocol::data::io::ClientTls> {
        self.data_tls.as_ref()
    }

    /// A fresh id for a new connection.
    pub fn next_connection_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// `node` registered on connection `conn`: its messages go to `tx` from now on.
    /// `close` ends the connection when the coordinator drops the node.
    pub fn connected(
        &self,
        node: &str,
        conn: u64,
        tx: mpsc::Sender<Control>,
        close: tokio_util::sync::CancellationToken,
    ) {
        let old = self.conns.lock().unwrap().insert(
            node.to_owned(),
            Conn {
                id: conn,
                tx,
                close,
            },
        );
        if let Some(old) = old {
            old.close.cancel(); // the same node on a new connection: the old one is stale
        }
    }

    /// Connection `conn` of `node` closed (a newer connection of the same node stays).
    pub fn closed(&self, node: &str, conn: u64) {
        let mut conns = self.conns.lock().unwrap();
        if conns.get(node).is_some_and(|c| c.id == conn) {
            conns.remove(node);
        }
    }

    /// End `node`'s connection.
    pub fn disconnect(&self, node: &str) {
        if let Some(c) = self.conns.lock().unwrap().remove(node) {
            c.close.cancel();
        }
    }

    /// Send each message to its node, or to every registered node for a broadcast; then
    /// publish the serving route if the event changed it. Called after every swarm event.
    pub fn dispatch(&self, out: Outbox) {
        {
            let mut conns = self.conns.lock().unwrap();
            let mut stuck = Vec::new();
            for (to, msg) in out {
                let targets: Vec<&String> = if to == protocol::BROADCAST {
                    conns.keys().collect()
                } else {
                    conns
                        .get_key_value(&to)
                        .map(|(k, _)| k)
                        .into_iter()
                        .collect()
                };
                for node in targets {
                    use mpsc::error::TrySendError::Full;
                    if let Err(Full(_)) = conns[node].tx.try_send(msg.clone()) {
                        stuck.push(node.clone());
                    }
                }
            }
            for node in stuck {
                if let Some(c) = conns.remove(&node) {
                    c.close.cancel();
                    // The same words as the connection's own check (`server::queue`):
                    // whichever notices first, it is one event.
                    tracing::warn!(
                        "{node} let {CONTROL_QUEUE} commands pile up unread: disconnecting it"
                    );
                }
            }
        }
        let serving = self.swarm.lock().unwrap().serving_route();
        self.route.send_if_modified(|r| {
            let changed = *r != serving;
            *r = serving;
            changed
        });
    }
}
