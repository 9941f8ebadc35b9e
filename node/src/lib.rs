//! Swarm node library. For now it holds the llama.cpp side: opening a (stage) GGUF file and
//! reporting what llama.cpp made of it; the control-channel client comes with the swarm issue.

pub mod llm;
