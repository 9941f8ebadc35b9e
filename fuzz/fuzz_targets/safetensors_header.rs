//! safetensors headers (Hugging Face parts mapped into shards).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = torrents::safetensors::tensor_names_in(data);
});
