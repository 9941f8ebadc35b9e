//! Two members on loopback, homed on a relay of the swarm's own: the data channel's handshake
//! and frames run over a mesh stream, bound to its QUIC session, with a direct path.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use mesh::relay::RelayServer;
use mesh::Mesh;
use protocol::data::io::Connection;
use protocol::data::{Frame, Hello, LaneKind};
use protocol::status::EdgeKind;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn hello() -> Hello {
    Hello {
        model_sha256: "m".into(),
        split_id: "s".into(),
        stage: 1,
        nonce: "00".repeat(16),
        kind: LaneKind::Probe,
    }
}

fn key(seed: u8) -> [u8; 32] {
    [seed; 32]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hop_runs_over_a_mesh_stream_homed_on_the_swarms_relay() {
    let state = tempfile::tempdir().unwrap();
    let relay = RelayServer::start(LOOPBACK, 0, "127.0.0.1", state.path())
        .await
        .unwrap();
    assert!(
        relay.info.url.starts_with("https://127.0.0.1:"),
        "{}",
        relay.info.url
    );
    // The certificate is kept: a second start for the same host serves the same one.
    let pem = std::fs::read_to_string(state.path().join("relay.pem")).unwrap();
    assert_eq!(pem, relay.info.cert_pem);

    let bind = SocketAddr::new(LOOPBACK, 0);
    let callee = Mesh::start(key(1), bind, Some(&relay.info)).await.unwrap();
    let caller = Mesh::start(key(2), bind, Some(&relay.info)).await.unwrap();
    let to = callee.addr();
    assert_eq!(to.relay_url.as_deref(), Some(relay.info.url.as_str()));
    assert!(!to.addrs.is_empty(), "{to:?}");

    let caller_id = caller.id();
    let serve = tokio::spawn(async move {
        let incoming = callee.accept().await.expect("a connection");
        assert_eq!(incoming.remote_id(), caller_id);
        let accepted = incoming.stream().await.unwrap();
        let (mut conn, hello) =
            Connection::accept(accepted, "caller".into(), |_| Ok("hop-key".into()))
                .await
                .unwrap();
        assert_eq!(hello.stage, 1);
        let frame = conn.receive().await.unwrap();
        conn.send(&frame).await.unwrap();
        // Keep the endpoint until the caller has read the echo.
        let _ = conn.receive_or_end().await;
        callee
    });
    let (stream, binding) = caller.dial(&to).await.unwrap();
    assert_ne!(binding, protocol::data::auth::UNBOUND);
    let watch = stream.watch(&to);
    let mut conn = Connection::open_over(
        Box::new(stream),
        binding,
        "callee".into(),
        hello(),
        "hop-key",
    )
    .await
    .unwrap();
    conn.send(&Frame::Error("ping".into())).await.unwrap();
    assert_eq!(conn.receive().await.unwrap(), Frame::Error("ping".into()));
    // On loopback the two reach each other directly.
    let edge = watch.edge().expect("a selected path");
    assert_eq!(edge.kind, EdgeKind::Direct, "{edge:?}");
    assert!(edge.rtt_us.is_some());
    drop(conn);
    serve.await.unwrap();
}

/// A caller holding the wrong hop key is refused over the mesh as over TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_hop_key_is_refused_over_the_mesh() {
    let bind = SocketAddr::new(LOOPBACK, 0);
    let callee = Mesh::start(key(3), bind, None).await.unwrap();
    let caller = Mesh::start(key(4), bind, None).await.unwrap();
    let to = callee.addr();
    let serve = tokio::spawn(async move {
        let accepted = callee.accept().await.unwrap().stream().await.unwrap();
        let refused = Connection::accept(accepted, "caller".into(), |_| Ok("right".into())).await;
        assert!(refused.is_err());
        callee
    });
    let (stream, binding) = caller.dial(&to).await.unwrap();
    let opened =
        Connection::open_over(Box::new(stream), binding, "callee".into(), hello(), "wrong").await;
    assert!(opened.is_err());
    serve.await.unwrap();
}
