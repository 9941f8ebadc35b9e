//! Magnet links (`shard_loader torrent show magnet:?…`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(link) = std::str::from_utf8(data) {
        let _ = torrents::magnet::parse(link);
    }
});
