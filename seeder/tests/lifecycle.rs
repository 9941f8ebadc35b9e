//! Rescans (timer and SIGHUP), restarts without re-hashing, shutdown, and bad input.

mod common;

use std::time::Duration;

use common::{real_shards, Server};

/// Poll `/files` until `pred` holds (bounded: 15 s).
fn wait_for_files(
    server: &Server,
    pred: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    tests::wait_for(
        "/files to reach the expected state",
        Duration::from_secs(15),
        || {
            let files = server.get_json("/files")["files"]
                .as_array()
                .unwrap()
                .clone();
            pred(&files).then_some(files)
        },
    )
}

fn names(files: &[serde_json::Value]) -> Vec<&str> {
    files.iter().map(|f| f["name"].as_str().unwrap()).collect()
}

#[test]
fn rescan_follows_added_removed_and_changed_files() {
    let seed = tempfile::tempdir().unwrap();
    std::fs::write(seed.path().join("a.gguf"), vec![1u8; 300_000]).unwrap();
    std::fs::write(seed.path().join("b.safetensors"), vec![2u8; 200_000]).unwrap();
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(seed.path(), state.path(), &["--rescan-interval", "3600"]);
    let files = server.get_json("/files")["files"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(names(&files), ["a.gguf", "b.safetensors"]);
    let old_a = files[0]["info_hash"].as_str().unwrap().to_owned();

    std::fs::write(seed.path().join("c.gguf"), vec![3u8; 100_000]).unwrap();
    std::fs::remove_file(seed.path().join("b.safetensors")).unwrap();
    std::fs::write(seed.path().join("a.gguf"), vec![9u8; 310_000]).unwrap();
    server.signal(libc::SIGHUP);
    let files = wait_for_files(&server, |f| {
        names(f) == ["a.gguf", "c.gguf"] && f[0]["info_hash"] != old_a.as_str()
    });
    assert_eq!(files[0]["size"], 310_000);
    let new_a = files[0]["info_hash"].as_str().unwrap();
    let (status, _) = server.get(&format!("/metadata/{old_a}"));
    assert_eq!(
        status, 404,
        "the old torrent of a changed file is no longer served"
    );
    assert_eq!(
        server.get_json(&format!("/metadata/{new_a}"))["length"],
        310_000
    );
    assert!(server
        .stdout_lines()
        .contains(&"[TORRENT] Loaded 2 file(s) for sharing".to_string()));
    let (status, body) = server.get("/seed/b.safetensors");
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
}

#[test]
fn the_timer_rescans_too() {
    let seed = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(seed.path(), state.path(), &["--rescan-interval", "1"]);
    assert!(server
        .stdout_lines()
        .contains(&"[TORRENT] Loaded 0 file(s) for sharing".to_string()));
    std::fs::write(seed.path().join("late.gguf"), vec![5u8; 50_000]).unwrap();
    wait_for_files(&server, |f| names(f) == ["late.gguf"]);
}

/// Bytes the process read through read(2)-family calls: a whole re-hash would read every file.
fn rchar(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn restart_does_not_rehash_and_shutdown_is_clean() {
    let seed = real_shards();
    let total: u64 = (0..4)
        .map(|k| {
            std::fs::metadata(seed.path().join(format!("shard-{k}.gguf")))
                .unwrap()
                .len()
        })
        .sum();
    let state = tempfile::tempdir().unwrap();
    let first = Server::start(seed.path(), state.path(), &[]);
    let hashes = first.get_json("/files");
    assert!(first.stderr_text().contains("hashing shard-0.gguf"));
    let read_first = rchar(first.pid());
    assert!(
        read_first > total,
        "the first start hashes everything ({read_first} of {total} bytes read)"
    );
    let (http, peer) = (first.http.port().to_string(), first.peer.port().to_string());
    assert!(first.stop().success(), "SIGTERM gives a clean exit");

    // Same ports, same public URL: the cached torrents are used as they are.
    let second = Server::start_with(
        seed.path(),
        state.path(),
        &[
            "--listen-addr",
            "127.0.0.1",
            "--port",
            &peer,
            "--http-port",
            &http,
        ],
        &[],
    );
    assert_eq!(second.get_json("/files"), hashes);
    assert!(
        !second.stderr_text().contains("hashing"),
        "{}",
        second.stderr_text()
    );
    let read_second = rchar(second.pid());
    assert!(
        read_second < total / 4,
        "the restart read {read_second} bytes of {total}: it re-hashed"
    );
    drop(second);

    // Another port changes the public URL: torrents are rewritten, not re-hashed.
    let third = Server::start(seed.path(), state.path(), &[]);
    let files = third.get_json("/files");
    for (a, b) in files["files"]
        .as_array()
        .unwrap()
        .iter()
        .zip(hashes["files"].as_array().unwrap())
    {
        assert_eq!(a["info_hash"], b["info_hash"]);
        assert_ne!(a["torrent_url"], b["torrent_url"]);
    }
    assert!(
        !third.stderr_text().contains("hashing"),
        "{}",
        third.stderr_text()
    );
}

#[test]
fn bad_input() {
    let work = tempfile::tempdir().unwrap();
    // Missing dir: a clear error and a non-zero exit.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_server"))
        .args(tests::SEEDER_ON_LOOPBACK)
        .arg("--seed-dir")
        .arg(work.path().join("missing"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--seed-dir") && err.contains("missing") && !err.contains("panicked"),
        "{err}"
    );
    for (flag, value, want) in [
        ("--upload-limit", "100", "16384"),
        ("--transport", "carrier-pigeon", "carrier-pigeon"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_server"))
            .args(["--port", "0", "--http-port", "0", flag, value, "--seed-dir"])
            .arg(work.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(want),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Empty dir: runs, loads 0 files. Broken entries are skipped with a warning.
    let seed = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        seed.path().join("nowhere"),
        seed.path().join("dangling.gguf"),
    )
    .unwrap();
    std::fs::create_dir(seed.path().join("dir.gguf")).unwrap();
    std::fs::write(seed.path().join("empty.gguf"), b"").unwrap();
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(seed.path(), state.path(), &["--transport", "quic"]);
    assert!(server
        .stdout_lines()
        .contains(&"[TORRENT] Loaded 0 file(s) for sharing".to_string()));
    assert_eq!(
        server.get_json("/files")["files"].as_array().unwrap().len(),
        0
    );
    let (status, _) = server.get("/manifest");
    assert_eq!(status, 404);
    let err = server.stderr_text();
    assert!(err.contains("skipping dangling.gguf"), "{err}");
    assert!(err.contains("skipping empty.gguf"), "{err}");
    assert!(err.contains("no QUIC transport"), "{err}");
}

#[test]
fn unreadable_files_are_skipped_with_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    // Root reads everything, so run the server as nobody (setpriv, util-linux) when we are root.
    let as_root = unsafe { libc::geteuid() } == 0;
    let seed = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    for dir in [seed.path(), state.path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    std::fs::write(seed.path().join("ok.gguf"), vec![1u8; 40_000]).unwrap();
    std::fs::write(seed.path().join("locked.gguf"), vec![2u8; 40_000]).unwrap();
    std::fs::set_permissions(
        seed.path().join("ok.gguf"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::set_permissions(
        seed.path().join("locked.gguf"),
        std::fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    let server = if as_root {
        let bin = env!("CARGO_BIN_EXE_server");
        let home = state.path().to_str().unwrap().to_owned();
        let mut base = vec!["--reuid=65534", "--regid=65534", "--clear-groups", "env"];
        let home_var = format!("HOME={home}");
        base.push(&home_var);
        base.push(bin);
        base.extend(tests::SEEDER_ON_LOOPBACK);
        common::Server::start_via("setpriv", seed.path(), state.path(), &base)
    } else {
        Server::start(seed.path(), state.path(), &[])
    };
    assert_eq!(
        names(server.get_json("/files")["files"].as_array().unwrap()),
        ["ok.gguf"]
    );
    assert!(
        server
            .stderr_text()
            .contains("skipping locked.gguf: cannot read it"),
        "{}",
        server.stderr_text()
    );
}
