//! The control channel refuses what it must and survives bad input: wrong tokens, malformed
//! JSON, unknown commands, commands before REGISTER, and a node holding another split's shard.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use protocol::{cmd, code, Capacity, Command, ErrorParams, RegisterParams, PROTOCOL_VERSION};
use tests::{coordinator, node, real_shards, seeder, swarm_lock};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(addr: &str) -> Ws {
    tokio_tungstenite::connect_async(format!("ws://{addr}/control"))
        .await
        .expect("connect")
        .0
}

/// The next command frame (bounded wait), or None when the server closed the connection.
async fn next(ws: &mut Ws) -> Option<Command> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a reply within 10 s")
        {
            Some(Ok(Message::Text(t))) => {
                return Some(Command::decode(&t).expect("the coordinator sends valid commands"))
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

async fn send(ws: &mut Ws, cmd: &Command) {
    ws.send(Message::Text(cmd.encode().into())).await.unwrap();
}

/// A command with empty params from the test node to the coordinator.
fn bare(command: &str) -> Command {
    Command::new(
        command,
        "test-node",
        protocol::COORDINATOR,
        serde_json::json!({}),
    )
}

/// Send `cmd` and return its reply, skipping (at most five) other messages such as placements
/// and broadcasts that arrive in between.
async fn request(ws: &mut Ws, cmd: &Command) -> Command {
    send(ws, cmd).await;
    for _ in 0..5 {
        let m = next(ws).await.expect("the connection stays open");
        if m.request_id == cmd.request_id {
            return m;
        }
    }
    panic!("no reply to {} among the next five messages", cmd.command);
}

fn register(token: &str) -> Command {
    let p = RegisterParams {
        node_id: "test-node".into(),
        protocol_version: PROTOCOL_VERSION,
        name: "test".into(),
        peer_port: 9,
        data_addr: None,
        shards: vec![],
        // No disk: it registers, but is given nothing to fetch.
        capacity: Capacity {
            ram_bytes: 1,
            disk_free_bytes: 0,
            threads: 1,
            uplink_mbit: None,
            downlink_mbit: None,
        },
        token: Some(token.into()),
        signing_key: None,
        tls_public_key: None,
        mesh: None,
    };
    Command::new(cmd::REGISTER, "test-node", protocol::COORDINATOR, &p)
}

fn error_code(c: &Command) -> String {
    assert_eq!(c.command, cmd::ERROR, "{c:?}");
    c.params::<ErrorParams>().unwrap().code
}

#[test]
fn bad_messages_get_errors_and_the_connection_stays_usable() {
    let _one = swarm_lock();
    let seed = real_shards(2);
    let work = tempfile::tempdir().unwrap();
    let s = seeder(seed.path(), &work.path().join("seeder"), &[]);
    let c = coordinator(
        "127.0.0.1:0",
        s.field("http"),
        &["--min-nodes", "1", "--token", "sesame"],
    );
    let addr = c.field("http").to_owned();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Wrong token: refused, and the connection is closed.
        let mut ws = connect(&addr).await;
        let req = register("wrong");
        send(&mut ws, &req).await;
        let reply = next(&mut ws).await.unwrap();
        assert_eq!(error_code(&reply), code::UNAUTHORIZED);
        assert_eq!(
            reply.request_id, req.request_id,
            "a reply reuses the request id"
        );
        assert!(
            next(&mut ws).await.is_none(),
            "a refused node is disconnected"
        );

        // Malformed JSON, commands before REGISTER, unknown commands: an ERROR each, and the
        // same connection then registers fine.
        let mut ws = connect(&addr).await;
        ws.send(Message::Text("{this is not json".into()))
            .await
            .unwrap();
        assert_eq!(error_code(&next(&mut ws).await.unwrap()), code::BAD_JSON);
        send(&mut ws, &bare(cmd::HEARTBEAT)).await;
        assert_eq!(
            error_code(&next(&mut ws).await.unwrap()),
            code::NOT_REGISTERED
        );
        let bad_params = Command::new(
            cmd::REGISTER,
            "x",
            protocol::COORDINATOR,
            serde_json::json!({"node_id": 5}),
        );
        send(&mut ws, &bad_params).await;
        assert_eq!(error_code(&next(&mut ws).await.unwrap()), code::BAD_PARAMS);
        send(&mut ws, &register("sesame")).await;
        let reply = next(&mut ws).await.unwrap();
        assert_eq!(reply.command, cmd::REGISTERED, "{reply:?}");
        let reply = request(&mut ws, &bare("FLY_TO_MOON")).await;
        assert_eq!(error_code(&reply), code::UNKNOWN_COMMAND);
        // LIST_FILES is answered with the seeder's list: the two shards and the vocabulary.
        let files = request(&mut ws, &bare(cmd::LIST_FILES)).await;
        assert_eq!(
            files.params["files"].as_array().unwrap().len(),
            3,
            "{files:?}"
        );
        send(&mut ws, &bare(cmd::HEARTBEAT)).await;
    });
    // The coordinator sees the client's connection close a moment after it closes: ask
    // again for at most 5 s.
    let status = || tests::get_json(&format!("http://{}/status", c.field("http")));
    let mut st = status();
    for _ in 0..50 {
        if st["nodes"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        st = status();
    }
    assert_eq!(
        st["nodes"].as_array().unwrap().len(),
        0,
        "the test client left: {st}"
    );
}

#[test]
fn a_node_holding_another_splits_shard_is_refused_and_says_why() {
    let _one = swarm_lock();
    let seed = real_shards(4);
    let other = real_shards(3); // shard-0 of a 3-way split differs from shard-0 of a 4-way one
    let work = tempfile::tempdir().unwrap();
    let s = seeder(seed.path(), &work.path().join("seeder"), &[]);
    let c = coordinator("127.0.0.1:0", s.field("http"), &["--min-nodes", "1"]);
    let data = work.path().join("foreign");
    std::fs::create_dir_all(data.join("shards")).unwrap();
    std::fs::copy(
        other.path().join("shard-0.gguf"),
        data.join("shards/shard-0.gguf"),
    )
    .unwrap();
    {
        // Let the node verify it the way it verifies its own downloads.
        let d = node::store::DataDir::open(&data).unwrap();
        let sha = torrents::hashing::sha256_file(&data.join("shards/shard-0.gguf")).unwrap();
        d.record_verified("shard-0.gguf", &sha).unwrap();
    }
    let n = node("foreign", c.field("http"), &data, &[]);
    let (status, stderr) = n.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    assert!(
        stderr.contains("foreign_shards") && stderr.contains("not part of split"),
        "{stderr}"
    );
    let st = tests::get_json(&format!("http://{}/status", c.field("http")));
    assert_eq!(
        st["nodes"].as_array().unwrap().len(),
        0,
        "a refused node is never used"
    );

    // A node with the wrong token stops with a clear message too.
    let c2 = coordinator(
        "127.0.0.1:0",
        s.field("http"),
        &["--min-nodes", "1", "--token", "right"],
    );
    let n = node(
        "intruder",
        c2.field("http"),
        &work.path().join("intruder"),
        &["--token", "wrong"],
    );
    let (status, stderr) = n.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    assert!(stderr.contains("unauthorized"), "{stderr}");
}

#[test]
fn a_node_that_never_reads_its_replies_is_disconnected() {
    let _one = swarm_lock();
    let seed = real_shards(2);
    let work = tempfile::tempdir().unwrap();
    let s = seeder(seed.path(), &work.path().join("seeder"), &[]);
    let c = coordinator("127.0.0.1:0", s.field("http"), &["--min-nodes", "1"]);
    let addr = c.field("http").to_owned();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut ws = connect(&addr).await;
        send(&mut ws, &register("any")).await;
        assert_eq!(next(&mut ws).await.unwrap().command, cmd::REGISTERED);
        // Heartbeats, as fast as they go, and not a reply read: the replies fill the socket
        // buffers, then the coordinator's queue for this connection, which closes it.
        let (mut sink, mut stream) = ws.split();
        let flood = tokio::spawn(async move {
            let beat = Message::Text(bare(cmd::HEARTBEAT).encode().into());
            for _ in 0..400_000 {
                if sink.send(beat.clone()).await.is_err() {
                    return true;
                }
            }
            false
        });
        let closed = tokio::time::timeout(Duration::from_secs(120), async {
            let stuck = || c.stderr_text().contains("pile up unread");
            while !stuck() && !flood.is_finished() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Now read: what was queued, then the end of the connection.
            let mut replies = 0u64;
            while let Some(Ok(m)) = stream.next().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
                replies += 1;
            }
            replies
        })
        .await
        .expect("the connection was never closed");
        // The coordinator's log line may reach us a moment after the connection's end.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !c.stderr_text().contains("pile up unread") && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            c.stderr_text().contains("pile up unread"),
            "closed for another reason after {closed} replies"
        );
        let _ = flood.await;
    });
    // The coordinator carries on.
    let st = tests::get_json(&format!("http://{addr}/status"));
    assert_eq!(st["nodes"].as_array().unwrap().len(), 0, "{st}");
}
