//! Bad input: every case gets a clear message naming the problem, a non-zero exit, no panic,
//! and no partial output file.

mod common;

use std::path::Path;
use std::process::Output;

/// Assert a failed run: non-zero exit, not a panic, and stderr naming `want`.
fn fails_with(out: &Output, want: &str) {
    let err = common::stderr(out) + &common::stdout(out);
    assert!(
        !out.status.success(),
        "succeeded, expected failure with {want:?}"
    );
    // 1 for errors, 2 for command-line usage errors (clap); 101 would be a panic.
    assert!(
        matches!(out.status.code(), Some(1 | 2)),
        "exit code for {want:?}: {err}"
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.contains(want), "message lacks {want:?}: {err}");
}

/// Nothing but what was there: no shard files, no temp files.
fn assert_empty(dir: &Path) {
    if dir.exists() {
        assert_eq!(
            common::list_dir(dir),
            Vec::<String>::new(),
            "output left in {}",
            dir.display()
        );
    }
}

#[test]
fn split_refuses_bad_models_and_counts() {
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("out");

    fails_with(
        &common::split(&work.path().join("nope.gguf"), "4", &target),
        "nope.gguf",
    );
    assert_empty(&target);

    let text = work.path().join("notes.gguf");
    std::fs::write(
        &text,
        "just some text, long enough to have a header's worth of bytes",
    )
    .unwrap();
    fails_with(&common::split(&text, "4", &target), "bad magic");
    assert_empty(&target);

    let model = std::fs::read(common::model()).unwrap();
    let truncated = work.path().join("truncated.gguf");
    std::fs::write(&truncated, &model[..model.len() / 2]).unwrap();
    fails_with(&common::split(&truncated, "4", &target), "truncated");
    std::fs::write(&truncated, &model[..1000]).unwrap();
    fails_with(&common::split(&truncated, "4", &target), "truncated");
    assert_empty(&target);

    // Absurd tensor and metadata counts in an otherwise valid header.
    let mut absurd = model[..64].to_vec();
    absurd[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let absurd_path = work.path().join("absurd.gguf");
    std::fs::write(&absurd_path, &absurd).unwrap();
    fails_with(&common::split(&absurd_path, "4", &target), "absurd counts");
    let mut long_string = model[..100_000].to_vec();
    long_string[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes()); // first key's length
    std::fs::write(&absurd_path, &long_string).unwrap();
    fails_with(
        &common::split(&absurd_path, "4", &target),
        "runs past the end",
    );
    assert_empty(&target);

    fails_with(&common::split(&common::model(), "0", &target), "use 1..=30");
    fails_with(
        &common::split(&common::model(), "31", &target),
        "use 1..=30",
    );
    assert_empty(&target);
}

#[test]
fn validate_names_each_problem_and_file() {
    let work = tempfile::tempdir().unwrap();
    let missing = work.path().join("missing");
    let out = common::shard_loader([
        "validate",
        "--target-dir",
        missing.to_str().unwrap(),
        "--expected-shards",
        "4",
    ]);
    fails_with(&out, "missing");

    let empty = work.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = common::shard_loader([
        "validate",
        "--target-dir",
        empty.to_str().unwrap(),
        "--expected-shards",
        "4",
    ]);
    fails_with(&out, "expected 4 shard files, found 0");

    let dir = work.path().join("shards");
    let o = common::split(&common::model(), "4", &dir);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let d = dir.to_str().unwrap();
    let out = common::shard_loader(["validate", "--target-dir", d, "--expected-shards", "3"]);
    fails_with(&out, "expected 3 shard files, found 4");

    // Flip one byte in the middle of shard-2's weights.
    let victim = dir.join("shard-2.gguf");
    let mut bytes = std::fs::read(&victim).unwrap();
    let at = bytes.len() - 1000;
    bytes[at] ^= 0x40;
    std::fs::write(&victim, &bytes).unwrap();
    let out = common::shard_loader([
        "validate",
        "--target-dir",
        d,
        "--expected-shards",
        "4",
        "--json",
    ]);
    assert!(!out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0]["file"], "shard-2.gguf");
    assert!(problems[0]["message"].as_str().unwrap().contains("sha256"));
    assert_eq!(report["shards_ok"], 3);

    // A truncated shard and a missing one are both named.
    std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::remove_file(dir.join("shard-3.gguf")).unwrap();
    let out = common::shard_loader(["validate", "--target-dir", d, "--expected-shards", "4"]);
    fails_with(&out, "shard-2.gguf: size");
    fails_with(&out, "shard-3 is missing");
}

#[test]
fn map_refuses_dirs_without_a_set() {
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("out");
    let t = target.to_str().unwrap();
    let out = common::shard_loader([
        "map",
        "--safetensors-dir",
        work.path().join("nope").to_str().unwrap(),
        "--target-dir",
        t,
    ]);
    fails_with(&out, "nope");
    let out = common::shard_loader([
        "map",
        "--safetensors-dir",
        work.path().to_str().unwrap(),
        "--target-dir",
        t,
    ]);
    fails_with(&out, "no split parts");
    assert_empty(&target);
}

#[test]
fn torrent_create_and_show_refuse_bad_input() {
    let work = tempfile::tempdir().unwrap();
    let w = |name: &str| work.path().join(name);
    let out_file = w("out.torrent");
    let o = out_file.to_str().unwrap();

    let create = |path: &Path, extra: &[&str]| {
        let mut args = vec!["torrent", "create", path.to_str().unwrap(), "-o", o];
        args.extend_from_slice(extra);
        common::shard_loader(args)
    };
    fails_with(&create(&w("absent.bin"), &[]), "absent.bin");
    std::fs::write(w("empty.bin"), b"").unwrap();
    fails_with(&create(&w("empty.bin"), &[]), "empty file");
    fails_with(&create(work.path(), &[]), "not a regular file");
    std::fs::write(w("data.bin"), vec![7u8; 100_000]).unwrap();
    fails_with(
        &create(&w("data.bin"), &["--piece-length", "100000"]),
        "power of two",
    );
    fails_with(
        &create(&w("data.bin"), &["--piece-length", "1K"]),
        "power of two",
    );
    fails_with(
        &create(&w("data.bin"), &["--piece-length", "lots"]),
        "not a size",
    );
    assert!(!out_file.exists(), "a failed create left {o}");

    let show = |bytes: &[u8]| {
        std::fs::write(w("bad.torrent"), bytes).unwrap();
        common::shard_loader(["torrent", "show", w("bad.torrent").to_str().unwrap()])
    };
    fails_with(&show(b"this is not bencode"), "bencode error");
    fails_with(
        &show(&[b"l".repeat(100_000), b"e".repeat(100_000)].concat()),
        "nested too deep",
    );
    fails_with(&show(b"d4:infod6:lengthi5e4:name5:../..12:piece lengthi32768e6:pieces20:aaaaaaaaaaaaaaaaaaaaee"), "path separator");
    fails_with(
        &show(b"d4:infod6:lengthi5e4:name1:a12:piece lengthi0e6:pieces20:aaaaaaaaaaaaaaaaaaaaee"),
        "piece length",
    );
    fails_with(
        &show(
            b"d4:infod6:lengthi-5e4:name1:a12:piece lengthi32768e6:pieces20:aaaaaaaaaaaaaaaaaaaaee",
        ),
        "length",
    );
    fails_with(&show(b"d4:infod6:lengthi999999999999e4:name1:a12:piece lengthi32768e6:pieces20:aaaaaaaaaaaaaaaaaaaaee"), "piece hashes");
    fails_with(&show(b"d4:infod6:lengthi5e4:name1:a12:piece lengthi32768e6:pieces20:aaaaaaaaaaaaaaaaaaaaeeTRAILING"), "trailing");
    fails_with(
        &show(b"d8:announce3:abc4:info3:xyze"),
        "info is not a dictionary",
    );
    fails_with(
        &common::shard_loader(["torrent", "show", w("none.torrent").to_str().unwrap()]),
        "none.torrent",
    );
}
