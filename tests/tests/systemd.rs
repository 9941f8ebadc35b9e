//! The service units in deploy/systemd pass `systemd-analyze verify` with `ExecStart` pointed at
//! the binaries just built, keep their hardening, and the example settings in deploy/config are
//! accepted by the service each is for.

use std::path::Path;
use std::process::Command;

use tests::{bin, print_config};

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
fn the_example_settings_are_what_their_services_use() {
    for (_, package, name, config) in UNITS {
        let path = deploy().join("config").join(config);
        let printed = print_config(
            &bin(package, name),
            &["--config", path.to_str().unwrap()],
            &[],
        );
        // Every setting the example makes is what the service will use.
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            let setting = line.split(" #").next().unwrap().trim();
            if !setting.is_empty() {
                assert!(
                    printed.lines().any(|l| l == setting),
                    "{config}: {setting:?} is not in the settings printed:\n{printed}"
                );
            }
        }
    }
}
