//! `shard_loader map` on sets written by other tools: gguf-split parts from the `gguf` Python
//! package (llama.cpp's writer) and a Hugging Face style safetensors set.

mod common;

use torrents::manifest::Manifest;

#[test]
fn gguf_split_parts_map_to_the_same_shards_as_split() {
    let parts = tempfile::tempdir().unwrap();
    common::python_script(
        "make_gguf_split.py",
        &[&common::model(), parts.path(), "3".as_ref()],
    );
    let names = common::list_dir(parts.path());
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names[0].ends_with("-00001-of-00003.gguf"), "{names:?}");

    let mapped = tempfile::tempdir().unwrap();
    let out = common::shard_loader([
        "map".as_ref(),
        "--safetensors-dir".as_ref(),
        parts.path().as_os_str(),
        "--target-dir".as_ref(),
        mapped.path().as_os_str(),
        "--shards".as_ref(),
        "4".as_ref(),
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));

    let split = tempfile::tempdir().unwrap();
    let out = common::split(&common::model(), "4", split.path());
    assert!(out.status.success(), "{}", common::stderr(&out));

    let a = Manifest::load(mapped.path()).unwrap();
    let b = Manifest::load(split.path()).unwrap();
    assert_eq!(a.shards, b.shards, "mapped shards differ from split shards");
    assert_eq!(a.split_id, b.split_id);
    assert_eq!(
        a.source.sha256, None,
        "a multi-part source has no single sha256"
    );
    assert_eq!(a.source.files.len(), 3);
    for s in &a.shards {
        let x = std::fs::read(mapped.path().join(&s.file)).unwrap();
        let y = std::fs::read(split.path().join(&s.file)).unwrap();
        assert!(x == y, "{} differs", s.file);
    }

    // Without --shards, one stage per part.
    let default = tempfile::tempdir().unwrap();
    let map_parts = || {
        common::shard_loader([
            "map",
            "--source-dir",
            parts.path().to_str().unwrap(),
            "--target-dir",
            default.path().to_str().unwrap(),
        ])
    };
    let out = map_parts();
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_eq!(Manifest::load(default.path()).unwrap().shards.len(), 3);

    // A missing part is named.
    std::fs::remove_file(parts.path().join(&names[1])).unwrap();
    let out = map_parts();
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("missing part 00002"),
        "{}",
        common::stderr(&out)
    );
}

#[test]
fn safetensors_parts_map_to_shard_files_in_order() {
    let src = tempfile::tempdir().unwrap();
    common::python_script("make_safetensors_set.py", &[src.path(), "3".as_ref()]);
    let target = tempfile::tempdir().unwrap();
    let out = common::shard_loader([
        "map",
        "--metadata-dir",
        src.path().to_str().unwrap(),
        "--safetensors-dir",
        src.path().to_str().unwrap(),
        "--target-dir",
        target.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let m = Manifest::load(target.path()).unwrap();
    assert_eq!(m.shards.len(), 3);
    for (k, s) in m.shards.iter().enumerate() {
        assert_eq!(s.file, format!("shard-{k}.safetensors"));
        assert_eq!(s.layers, None);
        assert_eq!(s.tensor_count, 2);
        let original = std::fs::read(
            src.path()
                .join(format!("model-{:05}-of-00003.safetensors", k + 1)),
        )
        .unwrap();
        assert!(std::fs::read(target.path().join(&s.file)).unwrap() == original);
    }
    let out = common::shard_loader([
        "validate",
        "--target-dir",
        target.path().to_str().unwrap(),
        "--expected-shards",
        "3",
    ]);
    assert!(out.status.success(), "{}", common::stdout(&out));

    // An index that names a tensor the file lacks is refused, naming the file.
    let index = src.path().join("model.safetensors.index.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
    v["weight_map"]["extra.weight"] = "model-00002-of-00003.safetensors".into();
    std::fs::write(&index, v.to_string()).unwrap();
    let other = tempfile::tempdir().unwrap();
    let out = common::shard_loader([
        "map",
        "--safetensors-dir",
        src.path().to_str().unwrap(),
        "--target-dir",
        other.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("model-00002-of-00003.safetensors"),
        "{}",
        common::stderr(&out)
    );
}
