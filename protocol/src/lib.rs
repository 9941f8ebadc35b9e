//! Message types shared by the coordinator and nodes. No IO here: only shapes and their codecs.

use serde::{Deserialize, Serialize};

/// The envelope of every control-channel message, kept from the seed system:
/// `{command, request_id, from, to, timestamp, params}`. A reply reuses the request's `request_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Upper-case command name, e.g. `LOAD_SHARD`.
    pub command: String,
    /// Correlates a reply with its request.
    pub request_id: String,
    /// Sender id (node id or `coordinator`).
    pub from: String,
    /// Receiver id, or `*` for a broadcast.
    pub to: String,
    /// RFC 3339 UTC.
    pub timestamp: String,
    /// Command-specific parameters.
    #[serde(default)]
    pub params: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_with_seed_field_names() {
        let text = r#"{"command":"LOAD_SHARD","request_id":"r1","from":"coordinator","to":"n1","timestamp":"2026-01-01T00:00:00Z","params":{"shard_id":0}}"#;
        let cmd: Command = serde_json::from_str(text).unwrap();
        assert_eq!(cmd.command, "LOAD_SHARD");
        assert_eq!(cmd.params["shard_id"], 0);
        let back: serde_json::Value = serde_json::to_value(&cmd).unwrap();
        let orig: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(back, orig);
    }
}
