//! Catching nodes that compute wrong outputs (broken, or lying).
//!
//! A sampled fraction of finished requests (`--verify-fraction`) is replayed, whole, through
//! every holder of each shard that runs its stage: the route's node and the replicas. Stage by
//! stage, each holder gets the same input (the route's output of the stage before) on a probe
//! lane and answers with its output; the outputs are compared by relative L2 error, and on
//! the last stage also by their greedy token. Honest holders differ only by floating-point
//! rounding (different CPUs and SIMD paths add up in different orders); the tolerance
//! (`--verify-tolerance`) sits far above that and far below any real error. When all holders
//! agree, the check goes on. Any disagreement is settled by the coordinator's own computation
//! of the stage, from the seeder's file (checked by sha256), never by a majority (two
//! colluding liars would be one): every holder that differs from it is evicted (dropped,
//! refused from then on, listed in `/status`); should it match no holder, the disagreement is
//! reported (`/status` `verify.disputes`, the log) and nobody is evicted.
//!
//! The replay alone cannot catch a node that answers probes honestly and lies on the route's
//! lanes. So the check also judges what was served: the signed steps each stage received for
//! the request (recalled right after it finished) against the replay's outputs, and each
//! sampled token against the last stage's logits computed here ([`served`]).
//!
//! Here: [`sampler`] picks the requests (the engine offers each finished one) and keeps the
//! findings, [`judge`] and [`served`] decide from the outputs alone. All are leaves;
//! [`crate::checker`] does the probing and recalling through the hub and acts on the verdicts.

pub mod judge;
pub mod sampler;
pub mod served;

pub use sampler::{new, Checks, Hop, Sampler, Served, Trace, VerifyStats};
