//! The two secret primitives every side needs, here at the bottom of the crate graph so that
//! the IO-free swarm rules use them without the services' edges (`daemon`, which re-exports
//! them with the rest of its secret handling).

/// `bytes` random bytes from the OS, as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // The OS random source fails only on a broken system; nothing secret can be made then.
    getrandom::fill(&mut buf).expect("the OS random source");
    hex::encode(buf)
}

/// Whether two secrets are equal, in time that depends only on their lengths.
pub fn same_secret(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.as_bytes().ct_eq(b.as_bytes()).into()
}
