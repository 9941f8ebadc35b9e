//! `.torrent` files from anyone: parsed strictly, and what parses has a consistent shape.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(m) = torrents::metainfo::parse(data) {
        // Whatever was accepted can be described without panicking.
        let _ = m.magnet();
        for i in 0..m.piece_count.min(4) {
            assert!(m.piece_hash(i).is_some() && m.piece_size(i).is_some());
        }
    }
});
