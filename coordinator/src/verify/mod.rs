//! Catching nodes that compute wrong outputs (broken, or lying).
//!
//! A sampled fraction of finished requests (`--verify-fraction`) is replayed, whole, through
//! every holder of each shard that runs its stage: the route's node and the replicas. Stage by
//! stage, each holder gets the same input (the route's output of the stage before) on a probe
//! lane and answers with its output; the outputs are compared by relative L2 error, and on
//! the last stage also by their greedy token. Honest holders differ only by floating-point
//! rounding (different CPUs and SIMD paths add up in different orders); the tolerance
//! (`--verify-tolerance`) sits far above that and far below any real error. With three or
//! more holders, one that agrees with none of the others while they agree with each other is
//! evicted: dropped, refused from then on, and listed in `/status`. With two that disagree,
//! the coordinator computes the stage itself, from the seeder's file (checked by sha256), and
//! evicts the holder that differs from it; should it differ from both, the disagreement is
//! reported (`/status` `verify.disputes`, the log).
//!
//! Here: [`sampler`] picks the requests (the engine offers each finished one) and keeps the
//! findings, [`judge`] decides from the outputs alone. Both are leaves; [`crate::checker`]
//! does the probing through the hub and acts on the verdicts.

pub mod judge;
pub mod sampler;

pub use sampler::{new, Checks, Sampler, VerifyStats};
