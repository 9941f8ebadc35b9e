//! Debian's Transmission (transmission-daemon with default settings) downloads a shard from our
//! .torrent. Transmission ignores peers on 127.x, so it runs in a network namespace this test
//! makes (root and iproute2 needed), linked to the seeder by a veth pair on a 198.18.0.0/15
//! (benchmarking range) /30 that exists only on this machine, with no route anywhere else.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{real_shards, sha256, tool, Server};

/// A network namespace with one veth link to the host, removed on drop.
struct Netns {
    name: String,
    host_ip: String,
}

fn ip(args: &[&str]) {
    let o = tool("ip", args);
    assert!(
        o.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}

impl Netns {
    fn new() -> Netns {
        let id = std::process::id() % 16_000;
        let name = format!("ssw-t{id}");
        let (host_if, ns_if) = (format!("sswh{id}"), format!("sswn{id}"));
        // A /30 of 198.18.0.0/15 per test process: .1 for the host, .2 for the namespace.
        let b = id as u16 * 4;
        let host_ip = format!("198.18.{}.{}", b >> 8, (b & 0xff) + 1);
        let ns_ip = format!("198.18.{}.{}", b >> 8, (b & 0xff) + 2);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns {
            name: name.clone(),
            host_ip: host_ip.clone(),
        };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &ns_if,
        ]);
        ip(&["-n", &name, "link", "set", &ns_if, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ns
    }

    fn exec(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn transmission_daemon_downloads_a_shard_in_a_network_namespace() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test makes a network namespace: run it as root (CI does)"
    );
    let seed = real_shards();
    let state = tempfile::tempdir().unwrap();
    let ns = Netns::new();
    let server = Server::start_with(
        seed.path(),
        state.path(),
        &[
            "--listen-addr",
            &ns.host_ip,
            "--port",
            "0",
            "--http-port",
            "0",
        ],
        &[],
    );
    assert_eq!(server.http.ip().to_string(), ns.host_ip);

    let name = "shard-2.gguf";
    let (status, torrent) = server.get(&format!("/torrents/{name}.torrent"));
    assert_eq!(status, 200);
    let work = tempfile::tempdir().unwrap();
    let torrent_path = work.path().join("t.torrent");
    std::fs::write(&torrent_path, &torrent).unwrap();
    let (config, download) = (work.path().join("config"), work.path().join("download"));
    std::fs::create_dir_all(&download).unwrap();

    let daemon = Daemon(
        ns.exec(&[
            "transmission-daemon",
            "--foreground",
            "--config-dir",
            config.to_str().unwrap(),
            "--download-dir",
            download.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("transmission-daemon (apt-get install transmission-daemon)"),
    );
    let remote = |args: &[&str]| {
        let mut all = vec!["transmission-remote", "127.0.0.1:9091"];
        all.extend_from_slice(args);
        ns.exec(&all).output().unwrap()
    };
    // Wait (bounded) for its RPC port, then add the torrent.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !remote(&["-l"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "transmission-daemon RPC never came up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let added = remote(&["-a", torrent_path.to_str().unwrap()]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let info = String::from_utf8_lossy(&remote(&["-t", "all", "-i"]).stdout).into_owned();
        if info.contains("Percent Done: 100%") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Transmission did not finish in 180 s:\n{info}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        sha256(&download.join(name)),
        sha256(&seed.path().join(name))
    );
    drop(daemon);
}
