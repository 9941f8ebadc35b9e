//! Control-channel commands from registered nodes (one per line), fed to the swarm rules:
//! whatever a node says, the coordinator's swarm state must not panic or break.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    swarm::fuzz::control_messages(data);
});
