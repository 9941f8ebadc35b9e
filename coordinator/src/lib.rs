//! Coordinator: control channel, shard placement, readiness and the inference router (later issue).
