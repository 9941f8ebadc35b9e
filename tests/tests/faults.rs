//! Faults: a shard damaged while its node was down, and processes killed with SIGKILL at
//! (seeded) random moments. After each, the swarm is whole again, no file is corrupt, and
//! nothing already complete is downloaded again. Processes on loopback, one test at a time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tests::{
    assert_node_files, bin, get_json, node, nodes_fully_loaded, swarm_lock, wait_for, Bed, Proc,
};

const WITHIN: Duration = Duration::from_secs(120);

fn status(addr: &str) -> Value {
    get_json(&format!("http://{addr}/status"))
}

/// Ready, with `count` nodes and every one of them holding only loaded shards.
fn whole(addr: &str, count: usize) -> Option<Value> {
    let st = status(addr);
    (st["ready"] == true
        && st["nodes"].as_array().unwrap().len() == count
        && nodes_fully_loaded(&st) == count)
        .then_some(st)
}

/// (node name, shard) → bytes that node fetched for it this session, from a `/status`.
fn fetched(st: &Value) -> std::collections::BTreeMap<(String, String), u64> {
    let mut out = std::collections::BTreeMap::new();
    for n in st["nodes"].as_array().unwrap() {
        for (shard, h) in n["shards"].as_object().unwrap() {
            let bytes =
                h["from_seeder"].as_u64().unwrap_or(0) + h["from_peers"].as_u64().unwrap_or(0);
            out.insert(
                (n["name"].as_str().unwrap().to_owned(), shard.clone()),
                bytes,
            );
        }
    }
    out
}

#[test]
fn a_shard_truncated_while_its_node_was_down_is_fetched_again_not_loaded() {
    let _one = swarm_lock();
    let bed = Bed::new(2, &[]);
    let c = bed.coordinator("127.0.0.1:0", &["--min-nodes", "2"]);
    let addr = c.field("http").to_owned();
    let dirs = bed.node_dirs(2);
    let mut nodes: Vec<Proc> = dirs.iter().map(|(n, d)| node(n, &addr, d, &[])).collect();
    let st = wait_for("the swarm whole", WITHIN, || whole(&addr, 2));
    let shard = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "n0")
        .unwrap()["shards"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();

    // n0 goes down; its shard loses its second half; n0 comes back.
    assert!(nodes.remove(0).terminate().success());
    let file = dirs[0].1.join("shards").join(format!("shard-{shard}.gguf"));
    let size = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(size / 2)
        .unwrap();
    let back = node("n0", &addr, &dirs[0].1, &[]);
    let st = wait_for("the swarm whole again", WITHIN, || {
        let st = whole(&addr, 2)?;
        // n0 fetched the shard again (it did not register with it).
        (fetched(&st)[&("n0".to_owned(), shard.clone())] > 0).then_some(st)
    });
    assert_node_files(&st, bed.seed.path(), &dirs);
    let log = back.stderr_text();
    assert!(!log.contains("cannot run my stage"), "{log}");
}

/// The seeder's flags on fixed loopback ports, so that a restarted seeder is where nodes and
/// torrents expect it.
fn seeder_args(bed: &Bed, ports: (u16, u16)) -> Vec<String> {
    [
        "--listen-addr",
        "127.0.0.1",
        "--port",
        &ports.0.to_string(),
        "--http-port",
        &ports.1.to_string(),
        "--seed-dir",
        &bed.seed.path().display().to_string(),
        "--state-dir",
        &bed.work.path().join("seeder-fixed").display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A small deterministic generator (xorshift), so a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn sigkill_of_seeder_coordinator_and_nodes_at_random_moments_leaves_nothing_corrupt() {
    let _one = swarm_lock();
    let bed = Bed::new(3, &[]);
    // Our own seeder on fixed ports (the bed's stays, unused by this swarm).
    let ports = (free_port(), free_port());
    let start_seeder = || {
        Proc::start(
            "seeder2",
            &bin("seeder", "server"),
            &seeder_args(&bed, ports),
        )
    };
    let mut seeder = Some(start_seeder());
    let seeder_http = format!("127.0.0.1:{}", ports.1);
    let coord_addr = format!("127.0.0.1:{}", free_port());
    let flags = [
        "--min-nodes",
        "4",
        "--heartbeat-interval",
        "1",
        "--heartbeat-timeout",
        "4",
    ];
    let start_coordinator = || {
        let cache = bed.work.path().join("cache").display().to_string();
        let mut all = vec!["--cache-dir", cache.as_str()];
        all.extend_from_slice(&flags);
        tests::coordinator(&coord_addr, &seeder_http, &all)
    };
    let mut coordinator = Some(start_coordinator());
    let dirs = bed.node_dirs(4);
    let mut nodes: Vec<Option<Proc>> = dirs
        .iter()
        .map(|(n, d)| Some(node(n, &coord_addr, d, &[])))
        .collect();

    let mut rng = Rng(0x5eed_cafe_f00d_1234);
    let mut before: Option<std::collections::BTreeMap<(String, String), u64>> = None;
    for round in 0..5 {
        // The first kill comes while the nodes are still fetching; the others once whole.
        std::thread::sleep(Duration::from_millis(rng.below(3000)));
        // Each kind in turn (a node, the seeder, the coordinator, …), the node at random.
        let victim = match round % 3 {
            0 => 2 + rng.below(4),
            k => k - 1,
        };
        let what = match victim {
            0 => {
                seeder.take().unwrap().kill();
                seeder = Some(start_seeder());
                "the seeder".to_owned()
            }
            1 => {
                coordinator.take().unwrap().kill();
                coordinator = Some(start_coordinator());
                "the coordinator".to_owned()
            }
            k => {
                let i = (k - 2) as usize;
                nodes[i].take().unwrap().kill();
                nodes[i] = Some(node(&dirs[i].0, &coord_addr, &dirs[i].1, &[]));
                format!("node {}", dirs[i].0)
            }
        };
        eprintln!("round {round}: killed {what} (SIGKILL) and started it again");
        let st = wait_for(
            &format!("the swarm whole after round {round}"),
            WITHIN,
            || whole(&coord_addr, 4),
        );
        assert_node_files(&st, bed.seed.path(), &dirs);
        // A shard complete before this round was not fetched again: what a node reports having
        // fetched for it is what it reported before, or 0 (a restarted node or coordinator).
        let now = fetched(&st);
        if let Some(before) = &before {
            for (key, bytes) in &now {
                if let Some(was) = before.get(key) {
                    assert!(
                        *bytes == *was || *bytes == 0,
                        "round {round}: {key:?} fetched {bytes} bytes after holding it whole ({was} before)"
                    );
                }
            }
        }
        before = Some(now);
    }
    drop(nodes);
}

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs (this test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_disk_that_fills_up_during_a_fetch_gives_a_clear_failure_and_no_complete_looking_file() {
    let _one = swarm_lock();
    // Three shards of about 33 MB, sent at 4 MB/s, to a node on a 48 MiB disk: it is given
    // one shard (the second would not fit), and the disk fills up while it fetches.
    let bed = Bed::new(3, &["--upload-limit", "4194304"]);
    let c = bed.coordinator("127.0.0.1:0", &["--min-nodes", "1"]);
    let addr = c.field("http").to_owned();
    let disk = Tmpfs::mount(&bed.work.path().join("small-disk"), "48m");
    let data = disk.0.join("node");
    let n = node("n0", &addr, &data, &[]);
    let shard = wait_for("the fetch under way", WITHIN, || {
        let st = status(&addr);
        let node = st["nodes"].as_array()?.first()?.clone();
        let (id, h) = node["shards"]
            .as_object()?
            .iter()
            .next()
            .map(|(k, v)| (k.clone(), v.clone()))?;
        (h["state"] == "fetching" && h["bytes"].as_u64()? > 0).then_some(id)
    });
    // Fill what is left of the disk.
    {
        use std::io::Write;
        let mut filler = std::fs::File::create(disk.0.join("filler")).unwrap();
        let block = vec![0u8; 1 << 20];
        for _ in 0..64 {
            if filler
                .write_all(&block)
                .and_then(|_| filler.flush())
                .is_err()
            {
                break;
            }
        }
    }
    let deadline = std::time::Instant::now() + WITHIN;
    let failure = loop {
        let st = status(&addr);
        let h = st["nodes"][0]["shards"][&shard].clone();
        if h["state"] == "failed" {
            break h;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no SHARD_FAILED within {WITHIN:?}: {h}\nthe node's log:\n{}",
            n.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let message = failure["message"].as_str().unwrap().to_lowercase();
    assert!(
        message.contains("space") || message.contains("disk"),
        "not a clear failure: {failure}"
    );
    // Nothing claims to be complete: the node has not recorded the shard as verified.
    let verified = std::fs::read_to_string(data.join("verified.json")).unwrap_or_default();
    assert!(
        !verified.contains(&format!("shard-{shard}.gguf")),
        "{verified}"
    );
    assert!(
        n.stderr_text().to_lowercase().contains("space"),
        "{}",
        n.stderr_text()
    );
    drop(n);
}

/// A hostile BitTorrent peer: it says it has every piece of the torrents it is asked for and
/// answers every request with garbage. Counts connections and the bytes it sent.
struct BogusPeer {
    port: u16,
    connections: std::sync::Arc<std::sync::atomic::AtomicU64>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    _runtime: tokio::runtime::Runtime,
}

impl BogusPeer {
    /// `pieces`: info hash → piece count of the torrents it pretends to seed.
    fn start(pieces: std::collections::HashMap<[u8; 20], u64>) -> BogusPeer {
        use std::sync::atomic::{AtomicU64, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let (connections, sent) = (
            std::sync::Arc::new(AtomicU64::new(0)),
            std::sync::Arc::new(AtomicU64::new(0)),
        );
        let (c, b) = (connections.clone(), sent.clone());
        runtime.spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::Relaxed);
                let (pieces, sent) = (pieces.clone(), b.clone());
                tokio::spawn(async move {
                    let mut hs = [0u8; 68];
                    if s.read_exact(&mut hs).await.is_err() {
                        return;
                    }
                    let info_hash: [u8; 20] = hs[28..48].try_into().unwrap();
                    let Some(&count) = pieces.get(&info_hash) else {
                        return;
                    };
                    let mut reply = hs;
                    reply[20..28].fill(0); // no extensions
                    reply[48..68].copy_from_slice(b"-XX0001-bogusbogus00");
                    let mut bitfield = vec![0u8; count.div_ceil(8) as usize];
                    for i in 0..count as usize {
                        bitfield[i / 8] |= 0x80 >> (i % 8);
                    }
                    let mut out = reply.to_vec();
                    out.extend(((bitfield.len() + 1) as u32).to_be_bytes());
                    out.push(5);
                    out.extend(&bitfield);
                    out.extend([0, 0, 0, 1, 1]); // unchoke
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                    loop {
                        let mut len = [0u8; 4];
                        if s.read_exact(&mut len).await.is_err() {
                            return;
                        }
                        let len = u32::from_be_bytes(len) as usize;
                        if len == 0 || len > 1 << 20 {
                            continue;
                        }
                        let mut msg = vec![0u8; len];
                        if s.read_exact(&mut msg).await.is_err() {
                            return;
                        }
                        if msg[0] == 6 && len == 13 {
                            // request(index, begin, length): a piece of garbage.
                            let want = u32::from_be_bytes(msg[9..13].try_into().unwrap()) as usize;
                            let mut piece = ((9 + want) as u32).to_be_bytes().to_vec();
                            piece.push(7);
                            piece.extend(&msg[1..9]);
                            piece.extend(std::iter::repeat_n(0xAB, want));
                            if s.write_all(&piece).await.is_err() {
                                return;
                            }
                            sent.fetch_add(want as u64, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        BogusPeer {
            port,
            connections,
            sent,
            _runtime: runtime,
        }
    }
}

#[test]
fn a_peer_that_serves_corrupt_pieces_is_dropped_and_the_shard_comes_whole() {
    use std::sync::atomic::Ordering;
    let _one = swarm_lock();
    // The seeder sends at 4 MB/s, so the node asks the (fast) bogus peer for much.
    let bed = Bed::new(2, &["--upload-limit", "4000000"]);
    let seeder = bed.seeder.field("http").to_owned();
    let files: Value = get_json(&format!("http://{seeder}/files"));
    let mut pieces = std::collections::HashMap::new();
    let mut hashes = Vec::new();
    for f in files["files"].as_array().unwrap() {
        let torrent = reqwest::blocking::get(f["torrent_url"].as_str().unwrap())
            .unwrap()
            .bytes()
            .unwrap();
        let meta = torrents::metainfo::parse(&torrent).unwrap();
        pieces.insert(meta.info_hash, meta.piece_count);
        hashes.push(meta.info_hash);
    }
    let bogus = BogusPeer::start(pieces);
    // It announces itself to the seeder's tracker as a seed of every shard.
    for h in &hashes {
        let enc: String = h.iter().map(|b| format!("%{b:02x}")).collect();
        let url = format!(
            "http://{seeder}/announce?info_hash={enc}&peer_id=-XX0001-bogusbogus00&port={}&left=0&event=started&compact=1",
            bogus.port
        );
        let body = reqwest::blocking::get(url).unwrap().bytes().unwrap();
        assert!(
            !String::from_utf8_lossy(&body).contains("failure"),
            "{body:?}"
        );
    }
    let c = bed.coordinator("127.0.0.1:0", &["--min-nodes", "1"]);
    let addr = c.field("http").to_owned();
    let dirs = bed.node_dirs(1);
    let n = node("n0", &addr, &dirs[0].1, &[]);
    let st = wait_for("the node whole", WITHIN, || whole(&addr, 1));
    assert_node_files(&st, bed.seed.path(), &dirs);
    // It did offer garbage, librqbit caught it and dropped the peer each time.
    let (connections, sent) = (
        bogus.connections.load(Ordering::Relaxed),
        bogus.sent.load(Ordering::Relaxed),
    );
    eprintln!("the bogus peer: {connections} connection(s), {sent} bytes of garbage sent");
    assert!(
        connections >= 1 && sent > 0,
        "the node never asked the bogus peer"
    );
    let log = n.stderr_text();
    assert!(log.contains("did not validate"), "{log}");
    // Each connection ends at its first bad piece: a few pieces' worth at most, not the shard.
    let shard_bytes: u64 = files["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["size"].as_u64().unwrap())
        .sum();
    assert!(
        sent < shard_bytes / 4,
        "{sent} bytes of garbage taken of {shard_bytes}"
    );
}
