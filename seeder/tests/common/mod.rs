//! Test harness: the real `server` binary on loopback (port 0, waiting for its `[READY]` line,
//! never sleeping), real shard files, and the third-party clients.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running `server` process, stopped (SIGTERM) on drop.
pub struct Server {
    pub child: Child,
    pub http: SocketAddr,
    pub peer: SocketAddr,
    /// stdout lines seen so far (for `[TORRENT] Loaded …`).
    pub stdout: Arc<Mutex<Vec<String>>>,
    /// stderr lines seen so far.
    pub stderr: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Start on loopback with free ports, `seed_dir` and `state_dir`, plus `extra` flags.
    pub fn start(seed_dir: &Path, state_dir: &Path, extra: &[&str]) -> Server {
        Self::start_with(
            seed_dir,
            state_dir,
            &[
                "--listen-addr",
                "127.0.0.1",
                "--port",
                "0",
                "--http-port",
                "0",
            ],
            extra,
        )
    }

    pub fn start_with(seed_dir: &Path, state_dir: &Path, base: &[&str], extra: &[&str]) -> Server {
        let mut all = base.to_vec();
        all.extend_from_slice(extra);
        Self::start_via(env!("CARGO_BIN_EXE_server"), seed_dir, state_dir, &all)
    }

    /// Start `program args… --seed-dir … --state-dir …` (`program` is the server, or a wrapper
    /// such as setpriv that runs it).
    pub fn start_via(program: &str, seed_dir: &Path, state_dir: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(program)
            .args(args)
            .arg("--seed-dir")
            .arg(seed_dir)
            .arg("--state-dir")
            .arg(state_dir)
            .env("RUST_LOG", "info,librqbit=warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start server");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let lines = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.starts_with("[READY]") {
                    let _ = tx.send(line.clone());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let err = child.stderr.take().unwrap();
        let lines = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let ready = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "server never printed [READY]; stderr:\n{}",
                    stderr.lock().unwrap().join("\n")
                );
            }
        };
        let field = |k: &str| -> SocketAddr {
            ready
                .split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap()
                .parse()
                .unwrap()
        };
        Server {
            http: field("http="),
            peer: field("peer="),
            child,
            stdout,
            stderr,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// GET a path, returning (status, body).
    pub fn get(&self, path: &str) -> (u16, Vec<u8>) {
        let r = reqwest::blocking::get(self.url(path)).expect("GET");
        (r.status().as_u16(), r.bytes().unwrap().to_vec())
    }

    pub fn get_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }

    /// Send a signal to the server.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Stop with SIGTERM and wait (bounded) for a clean exit; returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("server did not stop within 10 s of SIGTERM");
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real model split into 4 shards in a fresh directory (the seed dir of most tests).
pub fn real_shards() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let model_path = torrents::default_model::require().unwrap_or_else(|e| panic!("{e}"));
    let model = torrents::gguf::GgufModel::open(&model_path).unwrap();
    let source = torrents::map::gguf_source(&model).unwrap();
    torrents::split::split_model(&model, 4, dir.path(), source, &|_| {}).unwrap();
    dir
}

/// Run a tool, failing clearly when it is missing.
pub fn tool(name: &str, args: &[&str]) -> Output {
    Command::new(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{name} could not run ({e}): .ci/run installs it"))
}

pub fn sha256(path: &Path) -> String {
    torrents::hashing::sha256_file(path).unwrap()
}

/// aria2c with the flags that keep it to what we give it: no DHT, LPD, PEX or IPv6, exit when
/// done, give up after `timeout` s.
pub fn aria2c(dir: &Path, source: &str, timeout: u32) -> Output {
    tool(
        "aria2c",
        &[
            "-d",
            dir.to_str().unwrap(),
            "--enable-dht=false",
            "--enable-dht6=false",
            "--bt-enable-lpd=false",
            "--enable-peer-exchange=false",
            "--disable-ipv6=true",
            "--seed-time=0",
            &format!("--bt-stop-timeout={timeout}"),
            "--file-allocation=none",
            "--console-log-level=warn",
            "--summary-interval=0",
            "--allow-overwrite=true",
            "--auto-file-renaming=false",
            source,
        ],
    )
}

/// The same .torrent with other trackers and web seeds (the info hash does not change).
pub fn rewrap(
    torrent: &[u8],
    announce: Vec<String>,
    web_seeds: Vec<String>,
    out: &Path,
) -> PathBuf {
    let m = torrents::metainfo::parse(torrent).unwrap();
    let opts = torrents::metainfo::CreateOptions {
        announce,
        web_seeds,
        ..Default::default()
    };
    let (bytes, m2) = torrents::metainfo::rewrap(&m, &opts).unwrap();
    assert_eq!(m.info_hash, m2.info_hash);
    std::fs::write(out, bytes).unwrap();
    out.to_owned()
}

/// (bytes, mtime) of every file in `dir`: what seeding must never change.
pub fn fingerprint(dir: &Path) -> Vec<(String, String, std::time::SystemTime)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let m = std::fs::metadata(&p).unwrap();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                sha256(&p),
                m.modified().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}
