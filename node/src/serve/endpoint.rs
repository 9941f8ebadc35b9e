//! The node's mesh endpoint (crate `mesh`): started with the node's key, started again on the
//! relay the coordinator names, and accepting data connections as the data port does.

use std::net::SocketAddr;
use std::sync::Arc;

use super::{connection, Arrival, Pipeline, PENDING_HANDSHAKES};
use crate::{Error, Result};

impl Pipeline {
    /// The node's mesh endpoint, if started.
    pub fn mesh(&self) -> Option<mesh::Mesh> {
        self.mesh.read().unwrap().as_ref().map(|(m, _)| m.clone())
    }

    /// Run the mesh endpoint with `secret` on `bind`, homed on `relay`: started on first
    /// call, started again (same key, same endpoint id) when the relay changes. Accepts data
    /// connections on it from then on.
    pub async fn home_mesh(
        self: &Arc<Self>,
        secret: [u8; 32],
        bind: SocketAddr,
        relay: Option<&protocol::RelayInfo>,
    ) -> Result<mesh::Mesh> {
        let old = {
            let current = self.mesh.read().unwrap();
            match current.as_ref() {
                Some((m, homed)) if homed.as_ref() == relay => return Ok(m.clone()),
                other => other.map(|(m, _)| m.clone()),
            }
        };
        if let Some(old) = old {
            old.close().await;
        }
        let started = mesh::Mesh::start(secret, bind, relay)
            .await
            .map_err(|e| Error::Pipeline(e.to_string()))?;
        *self.mesh.write().unwrap() = Some((started.clone(), relay.cloned()));
        tokio::spawn(serve_mesh(started.clone(), self.clone()));
        match relay {
            Some(r) => tracing::info!(
                "mesh endpoint {} homed on the relay {}",
                started.id(),
                r.url
            ),
            None => tracing::info!("mesh endpoint {} (no relay)", started.id()),
        }
        Ok(started)
    }
}

/// Accept data connections over the mesh until its endpoint closes (it is replaced when the
/// node is homed on the swarm's relay). At most [`PENDING_HANDSHAKES`] at once, as on the data
/// port; a mesh peer is named by its endpoint id, which costs nothing to make, so there is no
/// cap per peer.
async fn serve_mesh(endpoint: mesh::Mesh, pipeline: Arc<Pipeline>) {
    let work = pipeline.work.clone();
    let pending = Arc::new(tokio::sync::Semaphore::new(PENDING_HANDSHAKES));
    loop {
        let Ok(permit) = pending.clone().acquire_owned().await else {
            return;
        };
        let Some(incoming) = endpoint.accept().await else {
            return;
        };
        let peer = format!("mesh:{}", incoming.remote_id());
        tokio::spawn(connection(
            Arrival::Mesh(incoming),
            peer,
            pipeline.clone(),
            work.clone(),
            (permit, None),
        ));
    }
}
