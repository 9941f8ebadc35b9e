//! llama.cpp for shardswarm, in one place for the node and the coordinator: the process-wide
//! backend, stages of a pipeline ([`stage`]: hidden states in and out, over llama-cpp-sys-2),
//! the sampler both the last stage and the reference use ([`sample`]), and whole-model
//! references ([`reference`]); where a stage's decode threads run ([`placement`]) and which
//! way is fastest on this machine ([`calibrate`]).

mod backend;
pub mod calibrate;
pub mod placement;
pub mod reference;
pub mod sample;
pub mod stage;

pub use backend::{backend, LlmError};
pub use reference::{
    inspect_model, reference_completion, reference_completion_with, reference_tokens, tokenize,
    Completion, ModelInfo, TokenReference,
};
