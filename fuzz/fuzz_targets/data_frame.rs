//! Data-channel frames (hidden states and tokens between stages): decoded with every length
//! checked; what decodes encodes back to the same frame.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = protocol::data::Frame::decode(data) {
        let again =
            protocol::data::Frame::decode(&frame.encode()).expect("re-encoded frame decodes");
        // NaN hidden states are not equal to themselves: compare the bytes instead.
        assert_eq!(again.encode(), frame.encode());
    }
});
