//! Test harness: the real `server` binary on loopback (port 0, waiting for its `[READY]` line,
//! never sleeping), real shard files, and the third-party clients.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A running `server` process (killed on drop), with its addresses.
pub struct Server {
    pub proc: tests::Proc,
    pub http: SocketAddr,
    pub peer: SocketAddr,
}

impl Server {
    /// Start on loopback with free ports, `seed_dir` and `state_dir`, plus `extra` flags.
    pub fn start(seed_dir: &Path, state_dir: &Path, extra: &[&str]) -> Server {
        Self::start_with(seed_dir, state_dir, &tests::SEEDER_ON_LOOPBACK, extra)
    }

    pub fn start_with(seed_dir: &Path, state_dir: &Path, base: &[&str], extra: &[&str]) -> Server {
        let mut all = base.to_vec();
        all.extend_from_slice(extra);
        Self::start_via(env!("CARGO_BIN_EXE_server"), seed_dir, state_dir, &all)
    }

    /// Start `program args… --seed-dir … --state-dir …` (`program` is the server, or a wrapper
    /// such as setpriv that runs it).
    pub fn start_via(program: &str, seed_dir: &Path, state_dir: &Path, args: &[&str]) -> Server {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend([
            "--seed-dir".into(),
            seed_dir.display().to_string(),
            "--state-dir".into(),
            state_dir.display().to_string(),
        ]);
        let proc = tests::Proc::start("server", Path::new(program), &all);
        let (http, peer) = (
            proc.field("http").parse().unwrap(),
            proc.field("peer").parse().unwrap(),
        );
        Server { proc, http, peer }
    }

    pub fn pid(&self) -> u32 {
        self.proc.child.id()
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
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// Stop with SIGTERM and wait (bounded) for the exit.
    pub fn stop(self) -> std::process::ExitStatus {
        self.proc.terminate()
    }

    pub fn stderr_text(&self) -> String {
        self.proc.stderr_text()
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.proc.stdout_lines()
    }
}

/// The real model split into 4 shards in a fresh directory (the seed dir of most tests).
pub fn real_shards() -> tempfile::TempDir {
    tests::real_shards(4)
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
