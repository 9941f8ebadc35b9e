//! GGUF headers (models and shards from anyone): counts, strings, arrays, tensor ranges.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(m) = torrents::gguf::GgufModel::parse(data) {
        // Every tensor the parser accepted lies within the bytes.
        for t in &m.tensors {
            assert!(t
                .offset
                .checked_add(t.size)
                .is_some_and(|end| end <= data.len() as u64));
        }
    }
});
