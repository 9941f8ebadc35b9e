//! Settings files, environment and flags for the three services, as an operator uses them:
//! `--print-config` shows what a service will use, its output read back with `--config` gives
//! the same settings, flags win over the environment and the environment over the file,
//! secrets are never printed, unknown keys are named, and a service really runs from a file.

use std::process::Command;

use tests::{bin, get_json, print_config, Proc};

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn printed_defaults_read_back_to_the_same_settings_for_every_service() {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().to_str().unwrap();
    for (package, name, args) in [
        ("seeder", "server", vec!["--seed-dir", seed]),
        ("coordinator", "coordinator", vec![]),
        ("node", "node", vec![]),
    ] {
        let program = bin(package, name);
        let defaults = print_config(&program, &args, &[]);
        assert!(defaults.lines().count() > 10, "{defaults}");
        let file = write(&dir, &format!("{name}.toml"), &defaults);
        let again = print_config(&program, &["--config", &file], &[]);
        assert_eq!(
            defaults, again,
            "{name}: the printed defaults read back differently"
        );
    }
}

#[test]
fn flags_win_over_the_environment_and_the_environment_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "coordinator.toml",
        "min_nodes = 3\nparallel = 5\nqueue = 7\nverify-fraction = 0.5\napi_key = [\"file-key\"]\n",
    );
    let printed = print_config(
        &bin("coordinator", "coordinator"),
        &["--config", &file, "--queue", "9"],
        &[
            ("SHARDSWARM_COORDINATOR_PARALLEL", "6"),
            ("SHARDSWARM_COORDINATOR_QUEUE", "8"),
            ("SHARDSWARM_TOKEN", "sw-secret-token"),
        ],
    );
    for line in [
        "min_nodes = 3",
        "parallel = 6",
        "queue = 9",
        "verify_fraction = 0.5",
        "# token = (set, not shown)",
        "# api_key = (set, not shown)",
    ] {
        assert!(
            printed.lines().any(|l| l == line),
            "no `{line}` in:\n{printed}"
        );
    }
    assert!(!printed.contains("sw-secret-token") && !printed.contains("file-key"));
}

#[test]
fn unknown_keys_and_bad_values_are_named() {
    let dir = tempfile::tempdir().unwrap();
    for (text, says) in [
        ("threads = 2\nthread = 3\n", "unknown key `thread`"),
        ("threads = \"many\"\n", "many"),
        ("threads = [\n", "config file"),
    ] {
        let file = write(&dir, "node.toml", text);
        let out = Command::new(bin("node", "node"))
            .args(["--config", &file, "--print-config"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {stderr}");
        assert!(stderr.contains(says), "{text}: {stderr}");
    }
}

#[test]
fn a_seeder_runs_from_its_config_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let seed = tests::real_shards(2);
    let file = write(
        &dir,
        "seeder.toml",
        &format!(
            "listen-addr = \"127.0.0.1\"\nport = 0\nhttp_port = 0\nseed_dir = {:?}\nstate_dir = {:?}\n",
            seed.path(),
            dir.path().join("state")
        ),
    );
    let seeder = Proc::start(
        "seeder",
        &bin("seeder", "server"),
        &["--config".to_owned(), file],
    );
    let files = get_json(&format!("http://{}/files", seeder.field("http")));
    // The two shards and the vocabulary file.
    assert_eq!(files["files"].as_array().map(Vec::len), Some(3), "{files}");
}
