//! The service units in deploy/systemd pass `systemd-analyze verify` with `ExecStart` pointed at
//! the binaries just built, keep their hardening, and the example settings in deploy/config are
//! accepted by the service each is for.

use std::path::Path;
use std::process::Command;

use tests::bin;

const UNITS: [(&str, &str, &str, &str); 3] = [
    (
        "shardswarm-seeder.service",
        "seeder",
        "server",
        "seeder.toml",
    ),
    (
        "shardswarm-coordinator.service",
        "coordinator",
        "coordinator",
        "coordinator.toml",
    ),
    ("shardswarm-node.service", "node", "node", "node.toml"),
];

fn deploy() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy"))
}

#[test]
fn units_verify_with_the_built_binaries_and_keep_their_hardening() {
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for (unit, package, name, _) in UNITS {
        let text = std::fs::read_to_string(deploy().join("systemd").join(unit)).unwrap();
        for needed in [
            "User=shardswarm",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "Restart=on-failure",
            "StateDirectory=shardswarm/",
        ] {
            assert!(text.contains(needed), "{unit} lacks {needed}");
        }
        let exec = format!("ExecStart=/usr/local/bin/{name} ");
        assert!(text.contains(&exec), "{unit}: {exec}");
        let local = text.replace(
            &exec,
            &format!("ExecStart={} ", bin(package, name).display()),
        );
        let path = dir.path().join(unit);
        std::fs::write(&path, local).unwrap();
        units.push(path);
    }
    let seeder =
        std::fs::read_to_string(deploy().join("systemd/shardswarm-seeder.service")).unwrap();
    assert!(
        seeder.contains("ReadOnlyPaths=/srv/shardswarm/seed"),
        "the seed dir must be read-only"
    );

    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .expect("systemd-analyze (apt install systemd)");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );

    // The check is real: a unit with a mistake fails it.
    let broken = dir.path().join("broken.service");
    std::fs::write(
        &broken,
        "[Service]\nExecStart=/nonexistent/binary\nRestart=sometimes\n",
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&broken)
        .output()
        .unwrap();
    assert!(!out.status.success() || !out.stderr.is_empty());
}

#[test]
fn the_example_settings_are_accepted_by_their_services() {
    for (_, package, name, config) in UNITS {
        let path = deploy().join("config").join(config);
        let out = Command::new(bin(package, name))
            .args([
                "--config".as_ref(),
                path.as_os_str(),
                "--print-config".as_ref(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{config}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
