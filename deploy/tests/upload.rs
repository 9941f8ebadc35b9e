//! `upload_shards` against a real OpenSSH server on loopback, started by the test with its own
//! keys and config (root needed, as in CI): rsync and scp both deliver a valid shard set, and
//! an invalid set is never uploaded.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

struct Sshd(Child);

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An sshd on 127.0.0.1 accepting `dir/user_key` for root.
fn sshd(dir: &Path) -> (Sshd, u16) {
    for key in ["host_key", "user_key"] {
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(dir.join(key)));
    }
    std::fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys")).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
         PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
         UsePAM no\nStrictModes no\nPidFile {d}/sshd.pid\nSubsystem sftp /usr/lib/openssh/sftp-server\n",
        d = dir.display()
    );
    std::fs::write(dir.join("sshd_config"), config).unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap(); // privilege separation directory
    let child = Command::new("/usr/sbin/sshd")
        .arg("-D")
        .arg("-E")
        .arg(dir.join("sshd.log"))
        .arg("-f")
        .arg(dir.join("sshd_config"))
        .spawn()
        .expect("/usr/sbin/sshd (apt-get install openssh-server; .ci/run does)");
    let server = Sshd(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sshd did not listen on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    (server, port)
}

fn upload(
    source: &Path,
    remote: &Path,
    key: &Path,
    port: u16,
    extra: &[&str],
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_upload_shards"))
        .arg("--source-dir")
        .arg(source)
        .args([
            "--remote-user",
            "root",
            "--remote-host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--remote-dir",
        ])
        .arg(remote)
        .arg("--identity")
        .arg(key)
        .args([
            "--ssh-option",
            "StrictHostKeyChecking=no",
            "--ssh-option",
            "UserKnownHostsFile=/dev/null",
        ])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn uploads_a_valid_set_with_rsync_and_scp_and_refuses_an_invalid_one() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test runs an sshd: run it as root (CI does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let (_server, port) = sshd(dir.path());
    let key = dir.path().join("user_key");

    let shards = tempfile::tempdir().unwrap();
    let model_path = tests::default_model::require().unwrap_or_else(|e| panic!("{e}"));
    let model = torrents::gguf::GgufModel::open(&model_path).unwrap();
    let source = torrents::map::gguf_source(&model).unwrap();
    torrents::split::split_model(
        &model,
        2,
        shards.path(),
        source,
        Default::default(),
        &torrents::progress::Quiet,
    )
    .unwrap();

    for (mode, extra) in [("rsync", vec![]), ("scp", vec!["--scp"])] {
        let remote = dir.path().join(format!("remote {mode}"));
        let out = upload(shards.path(), &remote, &key, port, &extra);
        assert!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report = torrents::validate::validate(&remote, 2).unwrap();
        assert!(report.ok, "{mode}: {:?}", report.problems);
        // Progress as plain lines (no terminal here): hashing before, and rsync's upload.
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("hashing: 100%"), "{mode}: {said}");
        if mode == "rsync" {
            // Ours, not rsync's own carriage-return lines ("… 45%  11.77MB/s  0:00:01").
            assert!(
                said.contains("uploading: 100%") && !said.contains("B/s"),
                "{said:?}"
            );
        }
        assert!(
            !remote.join(".upload-staging").exists(),
            "{mode}: staging left behind"
        );
    }

    // A corrupt set is not uploaded at all.
    let shard = shards.path().join("shard-1.gguf");
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    let remote = dir.path().join("remote bad");
    let out = upload(shards.path(), &remote, &key, port, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("shard-1.gguf") && err.contains("not uploading"),
        "{err}"
    );
    assert!(!remote.exists());
}
