//! Every stage shard of the real model opens in llama.cpp on its own, with its own layer count;
//! middle stages load as "no vocab" models, the first and last keep the tokenizer.

use torrents::gguf::GgufModel;
use torrents::map::gguf_source;
use torrents::split::split_model;

#[test]
fn every_shard_loads_with_its_layer_count() {
    let model_path = tests::default_model::require().unwrap_or_else(|e| panic!("{e}"));
    let whole = llm::inspect_model(&model_path).unwrap();
    assert_eq!(u64::from(whole.n_layer), tests::default_model::LAYERS);
    let model = GgufModel::open(&model_path).unwrap();
    let source = gguf_source(&model).unwrap();
    for n in [1usize, 3, 4, 30] {
        let dir = tempfile::tempdir().unwrap();
        let manifest = split_model(
            &model,
            n,
            dir.path(),
            source.clone(),
            Default::default(),
            &torrents::progress::Quiet,
        )
        .unwrap();
        let mut layers = 0;
        for shard in &manifest.shards {
            let info = llm::inspect_model(&dir.path().join(&shard.file))
                .unwrap_or_else(|e| panic!("{n} shards: {e}"));
            let range = shard.layers.unwrap();
            assert_eq!(
                u64::from(info.n_layer),
                range.len(),
                "{n} shards: {}",
                shard.file
            );
            assert_eq!(info.n_embd, whole.n_embd);
            assert_eq!(info.architecture, "llama");
            let k = shard.shard_id as usize;
            let has_tokenizer = k == 0 || k + 1 == n;
            let vocab = if has_tokenizer { whole.n_vocab } else { 1 };
            assert_eq!(info.n_vocab, vocab, "{n} shards: {} vocabulary", shard.file);
            layers += info.n_layer;
        }
        assert_eq!(layers, whole.n_layer, "{n} shards cover every layer once");
    }
}

#[test]
fn a_corrupt_shard_is_refused_by_llama_cpp_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.gguf");
    std::fs::write(&path, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let err = llm::inspect_model(&path).unwrap_err().to_string();
    assert!(err.contains("broken.gguf"), "{err}");
}
