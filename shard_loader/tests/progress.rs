//! Progress output of the long commands: a bar (indicatif) on a terminal, here a pseudo-TTY
//! made by `script`, and plain lines, one per tenth of the work, when stderr is not a terminal.

mod common;

use std::path::Path;
use std::process::Command;

/// The commands with progress, as argument lists: split into `dir`, then validate and hash it.
fn commands(dir: &Path) -> Vec<(&'static str, Vec<String>)> {
    let model = common::model().display().to_string();
    let d = dir.display().to_string();
    vec![
        (
            "splitting",
            vec![
                "split".into(),
                "--model".into(),
                model,
                "--shards".into(),
                "3".into(),
                "--target-dir".into(),
                d.clone(),
            ],
        ),
        (
            "hashing",
            vec![
                "validate".into(),
                "--target-dir".into(),
                d.clone(),
                "--expected-shards".into(),
                "3".into(),
            ],
        ),
        (
            "hashing",
            vec![
                "torrent".into(),
                "create".into(),
                format!("{d}/shard-0.gguf"),
                "-o".into(),
                format!("{d}/s0.torrent"),
            ],
        ),
    ]
}

#[test]
fn without_a_terminal_progress_is_plain_lines() {
    let dir = tempfile::tempdir().unwrap();
    for (what, args) in commands(dir.path()) {
        let out = common::shard_loader(&args);
        let stderr = common::stderr(&out);
        assert!(out.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("{what}: 100% (")),
            "{args:?}: {stderr}"
        );
        assert!(
            stderr.contains(&format!("{what}: 50% (")),
            "{args:?}: {stderr}"
        );
        assert!(
            !stderr.contains('\r') && !stderr.contains('\x1b'),
            "{args:?}: {stderr:?}"
        );
    }
}

#[test]
fn on_a_terminal_progress_is_a_bar() {
    let dir = tempfile::tempdir().unwrap();
    for (what, args) in commands(dir.path()) {
        let line = std::iter::once(env!("CARGO_BIN_EXE_shard_loader").to_owned())
            .chain(args.iter().map(|a| format!("'{a}'")))
            .collect::<Vec<_>>()
            .join(" ");
        // script(1) runs the command on a pseudo-terminal and copies what it shows.
        let out = Command::new("script")
            .args(["-q", "-e", "-c", &line, "/dev/null"])
            .output()
            .expect("script (util-linux)");
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{line}: {shown}");
        assert!(shown.contains(&format!("{what} [")), "{line}: {shown:?}");
        assert!(
            shown.contains("=>") || shown.contains("=]"),
            "no bar: {shown:?}"
        );
        assert!(
            !shown.contains(&format!("{what}: 100%")),
            "plain lines on a terminal: {shown:?}"
        );
    }
}
