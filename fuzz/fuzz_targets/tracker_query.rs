//! Announce and scrape queries, as the tracker gets them from any client.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(query) = std::str::from_utf8(data) {
        if let Ok(req) = torrents::tracker_query::parse_announce(query) {
            assert!(req.numwant <= torrents::tracker_query::MAX_NUMWANT);
            assert_ne!(req.port, 0);
        }
        let _ = torrents::tracker_query::parse_scrape(query);
    }
});
