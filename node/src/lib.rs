//! Swarm node: registers with the coordinator, fetches its shards with an embedded librqbit
//! client (from the seeder and from other nodes), verifies them, keeps seeding them, opens
//! them with llama.cpp (llm), and runs them as pipeline stages (stage).

pub mod agent;
pub mod fetch;
pub mod llm;
pub mod serve;
pub mod stage;
pub mod store;
