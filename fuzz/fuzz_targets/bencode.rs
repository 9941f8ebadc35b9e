//! Bencode (every .torrent and tracker answer): no panic, no hang, whatever the bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = torrents::bencode::decode(data);
});
