//! Swarm node: registers with the coordinator, fetches its shards with an embedded librqbit
//! client (from the seeder and from other nodes), verifies them, keeps seeding them, and
//! (llm) opens them with llama.cpp.

pub mod agent;
pub mod fetch;
pub mod llm;
pub mod store;
