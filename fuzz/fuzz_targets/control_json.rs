//! Control-channel commands (JSON text frames from nodes): decoded into typed messages.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = protocol::Control::decode(text) {
            // What decodes encodes, and decodes again to the same command.
            let again = protocol::Control::decode(&c.encode()).expect("re-encoded command decodes");
            assert_eq!(again.message.command(), c.message.command());
        }
    }
});
