//! What the whole-system tests share: our binaries as real processes (waiting for their
//! `[READY]` lines, never sleeping), the real model split into shards, and bounded polling.

pub mod api;
pub mod browser;
pub mod default_model;
pub mod delay;
pub mod nat;
pub mod netns;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Whole-swarm tests run one at a time (two cores): each holds this while it runs.
pub fn swarm_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The path of one of our binaries (package `package`, binary `name`), never older than its
/// sources: cargo builds a package's binaries only for that package's own integration tests
/// (`CARGO_BIN_EXE_*` does not reach this crate), and an old binary would test old code. A
/// missing binary, or one older than a source file of the crates binaries are built from, is
/// built first (`cargo build --workspace --bins` in this profile, as .ci/run does, so the
/// features are the same); an up-to-date one is used as it is, without running cargo.
pub fn bin(package: &str, name: &str) -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let exe = std::env::current_exe().expect("test executable");
    // A test runs from target/<profile>/deps, a binary of this crate from target/<profile>.
    let dir = exe
        .parent()
        .map(|d| match d.file_name() {
            Some(name) if name == "deps" => d.parent().unwrap_or(d),
            _ => d,
        })
        .expect("target/<profile>");
    let path = dir.join(name);
    let _one = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    if built.is_none_or(|b| newest_source() > Some(b)) {
        let profile = dir
            .file_name()
            .and_then(|p| p.to_str())
            .unwrap_or("release");
        let mut build = Command::new(env!("CARGO"));
        build
            .args(["build", "--workspace", "--bins"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        // Cargo gives this test process its package's variables (CARGO_MANIFEST_DIR,
        // CARGO_PKG_NAME, …). Build scripts such as ring's rerun when those change, so passed
        // on they rebuilt ring, rustls, axum and all above them here, and again at the next
        // `cargo build` from a shell: minutes of both cores in the middle of a test run.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            let from_cargo_test = [
                "CARGO_PKG_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_MANIFEST_",
            ]
            .iter()
            .any(|p| key.starts_with(p))
                || ["CARGO_TARGET_TMPDIR", "CARGO_PRIMARY_PACKAGE", "OUT_DIR"].contains(&&*key);
            if from_cargo_test {
                build.env_remove(&*key);
            }
        }
        if profile == "release" {
            build.arg("--release");
        }
        assert!(
            build.status().expect("cargo build").success(),
            "building {name} (package {package})"
        );
    }
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// The newest modification time of the sources our binaries are built from.
fn newest_source() -> Option<std::time::SystemTime> {
    fn walk(path: &Path, newest: &mut Option<std::time::SystemTime>) {
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
                walk(&entry.path(), newest);
            }
        } else if let Ok(t) = meta.modified() {
            *newest = (*newest).max(Some(t));
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut newest = None;
    for krate in CRATES.iter().filter(|k| **k != "tests") {
        walk(&root.join(krate).join("src"), &mut newest);
        walk(&root.join(krate).join("Cargo.toml"), &mut newest);
    }
    newest
}

/// The workspace's crates (each a folder at the top of the repository with `src/`).
pub const CRATES: &[&str] = &[
    "torrents",
    "shard_loader",
    "protocol",
    "daemon",
    "llm",
    "seeder",
    "swarm",
    "coordinator",
    "node",
    "deploy",
    "tests",
    "report",
];

/// A running process of ours, killed on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
    /// The `[READY] …` line's `key=value` words.
    pub ready: Vec<(String, String)>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// The threads reading stdout and stderr: they end when the process closes its pipes.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Proc {
    /// Start `program args` and wait (bounded) for a stdout line starting with `[READY]`.
    pub fn start(name: &str, program: &Path, args: &[String]) -> Proc {
        let mut child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "info,librqbit=warn,librqbit_dht=warn")
            // Ours to write to (or not): never the test's own stdin.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let lines = stdout.clone();
        let out_reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.starts_with("[READY]") {
                    let _ = tx.send(line.clone());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let err = child.stderr.take().unwrap();
        let lines = stderr.clone();
        let err_reader = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "{name} never printed [READY]; stderr:\n{}",
                    stderr.lock().unwrap().join("\n")
                );
            }
        };
        let ready = line
            .split_whitespace()
            .skip(1)
            .filter_map(|w| w.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect();
        Proc {
            child,
            name: name.to_owned(),
            ready,
            stdout,
            stderr,
            readers: vec![out_reader, err_reader],
        }
    }

    /// A `[READY]` field.
    pub fn field(&self, key: &str) -> &str {
        &self
            .ready
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("{} has no {key}", self.name))
            .1
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Whether the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kill at once (SIGKILL), as a crash would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait (bounded) for the exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("{} did not stop within 15 s of SIGTERM", self.name);
    }

    /// Wait (bounded) for the process to exit on its own.
    pub fn wait_exit(mut self, limit: Duration) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                // The pipes are closed: the readers end once they have read everything.
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                return (s, self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{} did not exit within {limit:?}", self.name);
    }
}

/// How many of a process's last log lines a failing test shows.
const TAIL_ON_FAILURE: usize = 40;

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A test that failed shows what each of its processes said last: CI keeps nothing else.
        if std::thread::panicking() {
            let lines = self.stderr.lock().map(|l| l.clone()).unwrap_or_default();
            let tail = &lines[lines.len().saturating_sub(TAIL_ON_FAILURE)..];
            eprintln!(
                "--- {} (last {} lines) ---\n{}",
                self.name,
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// Poll `f` every 200 ms until it returns `Some`, at most `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How many nodes in a coordinator's `/status` hold at least one shard with every shard
/// loaded (none fetching or waiting).
pub fn nodes_fully_loaded(status: &serde_json::Value) -> usize {
    status["nodes"].as_array().map_or(0, |nodes| {
        nodes
            .iter()
            .filter(|n| {
                n["shards"]
                    .as_object()
                    .is_some_and(|s| !s.is_empty() && s.values().all(|h| h["state"] == "loaded"))
            })
            .count()
    })
}

/// Every shard each node of a coordinator's `/status` holds is loaded and equals the seeder's
/// file (`seed`); `data_dirs` maps node names to data dirs.
pub fn assert_node_files(status: &serde_json::Value, seed: &Path, data_dirs: &[(String, PathBuf)]) {
    for n in status["nodes"].as_array().unwrap() {
        let name = n["name"].as_str().unwrap();
        let dir = &data_dirs.iter().find(|(d, _)| d == name).unwrap().1;
        for (shard, h) in n["shards"].as_object().unwrap() {
            assert_eq!(h["state"], "loaded", "{name} shard {shard}: {h}");
            let file = format!("shard-{shard}.gguf");
            assert_eq!(
                sha256_of(&dir.join("shards").join(&file)),
                sha256_of(&seed.join(&file)),
                "{name}'s {file}"
            );
        }
    }
}

fn sha256_of(path: &Path) -> String {
    torrents::hashing::sha256_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `program args --print-config` with `env`, expecting success: the settings it prints.
pub fn print_config(program: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .arg("--print-config")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// GET a JSON document.
pub fn get_json(url: &str) -> serde_json::Value {
    reqwest::blocking::get(url)
        .and_then(|r| r.json())
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// A `/status` document's route edges in order: into each stage (from the coordinator for
/// stage 0), then the coordinator's answer lane to the last stage; empty without a route.
pub fn route_edges(status: &serde_json::Value) -> Vec<serde_json::Value> {
    let Some(stages) = status["route"].as_array() else {
        return Vec::new();
    };
    let mut edges: Vec<_> = stages.iter().map(|s| s["edge"].clone()).collect();
    edges.extend(stages.last().map(|last| last["answers_edge"].clone()));
    edges
}

/// The real model split into `n` shards in a fresh directory.
pub fn real_shards(n: usize) -> tempfile::TempDir {
    let model_path = crate::default_model::require().unwrap_or_else(|e| panic!("{e}"));
    shards_of(&model_path, n)
}

/// `model` split into `n` shards in a fresh directory.
pub fn shards_of(model: &Path, n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let gguf = torrents::gguf::GgufModel::open(model).unwrap();
    let source = torrents::map::gguf_source(&gguf).unwrap();
    torrents::split::split_model(
        &gguf,
        n,
        dir.path(),
        source,
        Default::default(),
        &torrents::progress::Quiet,
    )
    .unwrap_or_else(|e| panic!("splitting {} into {n}: {e}", model.display()));
    dir
}

/// The second real architecture: Gemma 3 270M (Q4_K_M, `gemma3`, windowed layers), fetched by
/// `deploy/fetch-model.sh --model gemma3-270m` (.ci/run does) into the model cache, or
/// `$SHARDSWARM_GEMMA3_MODEL`.
pub fn gemma3_model() -> PathBuf {
    let path = std::env::var_os("SHARDSWARM_GEMMA3_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::default_model::path().with_file_name("gemma-3-270m-q4_k_m.gguf"));
    assert!(
        path.is_file(),
        "{} missing: run deploy/fetch-model.sh --model gemma3-270m (.ci/run does)",
        path.display()
    );
    path
}

/// The Python with the pinned test packages (tests/requirements.txt): `$SHARDSWARM_PYTHON`,
/// else `<repo>/.venv/bin/python` (made by .ci/run).
pub fn python() -> PathBuf {
    let p = std::env::var_os("SHARDSWARM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
    assert!(
        p.exists(),
        "{} missing: python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt (.ci/run does this)",
        p.display()
    );
    p
}

/// Run tests/scripts/`script` with the test Python and `args`; fails the test (with the
/// script's stderr) unless it succeeds.
pub fn python_script<S: AsRef<std::ffi::OsStr>>(script: &str, args: &[S]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(script);
    let result = Command::new(python())
        .arg(path)
        .args(args)
        .output()
        .expect("run python");
    assert!(
        result.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&result.stderr)
    );
}

/// A tiny random-weight model of `arch` written by tests/scripts/make_synthetic_model.py
/// (the `gguf` package, seeded) at `out`, with `layers` blocks.
pub fn synthetic_model(arch: &str, layers: usize, out: &Path) {
    let out = out.display().to_string();
    let layers = layers.to_string();
    python_script(
        "make_synthetic_model.py",
        &[arch, out.as_str(), "--layers", layers.as_str()],
    );
}

/// `server` flags for loopback with ports the kernel picks.
pub const SEEDER_ON_LOOPBACK: [&str; 6] = [
    "--listen-addr",
    "127.0.0.1",
    "--port",
    "0",
    "--http-port",
    "0",
];

/// A seeder on loopback serving `seed_dir`, with extra flags.
pub fn seeder(seed_dir: &Path, state_dir: &Path, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = SEEDER_ON_LOOPBACK.iter().map(|s| s.to_string()).collect();
    args.push("--seed-dir".into());
    args.push(seed_dir.display().to_string());
    args.push("--state-dir".into());
    args.push(state_dir.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::start("seeder", &bin("seeder", "server"), &args)
}

/// A coordinator for `seeder_http` listening on `listen` (e.g. 127.0.0.1:0).
pub fn coordinator(listen: &str, seeder_http: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "--listen".to_string(),
        listen.to_owned(),
        "--seeder".into(),
        format!("http://{seeder_http}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::start("coordinator", &bin("coordinator", "coordinator"), &args)
}

/// A node on loopback, with one thread unless `extra` says otherwise, for the coordinator at
/// `coordinator_http` (an address, for http://, or a whole URL).
pub fn node(name: &str, coordinator_http: &str, data_dir: &Path, extra: &[&str]) -> Proc {
    let mut with: Vec<&str> = Vec::new();
    if !extra.contains(&"--threads") {
        with.extend(["--threads", "1"]);
    }
    with.extend(extra);
    node_as_given(name, coordinator_http, data_dir, &with)
}

/// [`node`] with only the settings in `extra`: with neither `--threads` nor `--pin-threads`,
/// the node measures its decode-thread policy.
pub fn node_as_given(name: &str, coordinator_http: &str, data_dir: &Path, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = vec![
        "--coordinator".into(),
        if coordinator_http.contains("://") {
            coordinator_http.to_owned()
        } else {
            format!("http://{coordinator_http}")
        },
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--name".into(),
        name.into(),
        "--listen-addr".into(),
        "127.0.0.1".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::start(name, &bin("node", "node"), &args)
}

/// Sum of a Prometheus counter's samples whose line contains `filter`.
pub fn metric_sum(text: &str, name: &str, filter: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The common start of a whole-swarm test: the real model split into `shards`, a work
/// directory, and a seeder serving the shards.
pub struct Bed {
    pub seed: tempfile::TempDir,
    pub work: tempfile::TempDir,
    pub seeder: Proc,
}

impl Bed {
    pub fn new(shards: usize, seeder_flags: &[&str]) -> Bed {
        Bed::serving(real_shards(shards), seeder_flags)
    }

    /// A bed whose seeder serves the shards in `seed`.
    pub fn serving(seed: tempfile::TempDir, seeder_flags: &[&str]) -> Bed {
        let work = tempfile::tempdir().unwrap();
        let seeder = seeder(seed.path(), &work.path().join("seeder"), seeder_flags);
        Bed { seed, work, seeder }
    }

    /// A coordinator for this seeder on `listen`, caching in the work dir.
    pub fn coordinator(&self, listen: &str, flags: &[&str]) -> Proc {
        let cache = self.work.path().join("cache").display().to_string();
        let mut all = vec!["--cache-dir", cache.as_str()];
        all.extend_from_slice(flags);
        coordinator(listen, self.seeder.field("http"), &all)
    }

    /// (name, data dir) of nodes n0..n{count-1}.
    pub fn node_dirs(&self, count: usize) -> Vec<(String, PathBuf)> {
        (0..count)
            .map(|i| (format!("n{i}"), self.work.path().join(format!("n{i}"))))
            .collect()
    }
}
