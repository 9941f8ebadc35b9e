//! Helpers shared by the `torrents` integration tests: running our binary and the third-party
//! tools we check ourselves against. A missing tool fails the test (with how to install it):
//! a test that skips itself cannot fail.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The default real model, fetched by `deploy/fetch-model.sh`.
pub fn model() -> PathBuf {
    tests::default_model::require().unwrap_or_else(|e| panic!("{e}"))
}

/// Run `shard_loader` with `args`.
pub fn shard_loader<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_shard_loader"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run shard_loader")
}

/// Run `shard_loader split --model MODEL --shards N --target-dir TARGET` (N as given, so bad
/// values can be tried too).
pub fn split(model: &Path, shards: &str, target: &Path) -> Output {
    shard_loader([
        "split".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--shards".as_ref(),
        shards.as_ref(),
        "--target-dir".as_ref(),
        target.as_os_str(),
    ])
}

/// Run a third-party tool, failing clearly when it is not installed.
pub fn tool(name: &str, args: &[&str]) -> Output {
    Command::new(name).args(args).output().unwrap_or_else(|e| {
        panic!("{name} could not run ({e}): install it (.ci/run does: apt-get install aria2 transmission-cli mktorrent ctorrent)")
    })
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The Python with the pinned test packages (tests/requirements.txt): `$SHARDSWARM_PYTHON`,
/// else `<repo>/.venv/bin/python` (made by .ci/run).
pub fn python() -> PathBuf {
    let p = std::env::var_os("SHARDSWARM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "{} missing: python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt (.ci/run does this)",
        p.display()
    );
    p
}

/// Run one of tests/scripts/*.py with the test Python.
pub fn python_script(script: &str, args: &[&Path]) {
    let out = Command::new(python())
        .arg(repo().join("tests/scripts").join(script))
        .args(args)
        .output()
        .expect("run python");
    assert!(out.status.success(), "{script} failed: {}", stderr(&out));
}

/// Files in `dir`, sorted by name.
pub fn list_dir(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
