//! The control channel between the coordinator and nodes: message shapes and their JSON
//! codec. No IO here.
//!
//! Every message is the seed system's envelope `{command, request_id, from, to, timestamp,
//! params}` sent as one WebSocket text frame; a reply reuses its request's `request_id`.
//! Services speak [`Control`]: the envelope around one typed [`Message`] (the command name and
//! its params). [`Command`] is the raw envelope with untyped params, for tools and tests that
//! write the wire by hand.

pub mod data;
mod params;
mod possession;
pub mod secret;
pub mod seeder;
pub mod status;

pub use params::*;
pub use possession::*;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Bumped when a message changes meaning; a node and coordinator must agree on it.
pub const PROTOCOL_VERSION: u32 = 1;

/// Sender/receiver id of the coordinator.
pub const COORDINATOR: &str = "coordinator";
/// Receiver id of a broadcast.
pub const BROADCAST: &str = "*";

/// The header with which the coordinator serves its CA (`GET /ca.pem`): HMAC-SHA256 of
/// [`CA_TAG_LABEL`] and the PEM under the swarm token, in hex, so that a node with the token
/// can check it.
pub const CA_TAG_HEADER: &str = "x-shardswarm-ca-tag";

/// The label of the CA's tag (`daemon::secret::tag`): what the tag vouches for.
pub const CA_TAG_LABEL: &str = "shardswarm swarm CA v1";

/// The label of the tag a coordinator serving an operator's certificate sends with an empty
/// `/ca.pem` (204): "trust the system's roots" is vouched for under the token too, so that a
/// machine in the middle cannot make a node drop the swarm's CA by answering 404.
pub const CA_OPERATOR_TAG_LABEL: &str = "shardswarm operator certificate v1";

/// Command names.
pub mod cmd {
    pub const REGISTER: &str = "REGISTER";
    pub const REGISTERED: &str = "REGISTERED";
    pub const HEARTBEAT: &str = "HEARTBEAT";
    pub const LIST_FILES: &str = "LIST_FILES";
    pub const LOAD_SHARD: &str = "LOAD_SHARD";
    pub const SHARD_PROGRESS: &str = "SHARD_PROGRESS";
    pub const SHARD_LOADED: &str = "SHARD_LOADED";
    pub const SHARD_FAILED: &str = "SHARD_FAILED";
    pub const UNLOAD_SHARD: &str = "UNLOAD_SHARD";
    pub const SWARM_READY: &str = "SWARM_READY";
    pub const SWARM_NOT_READY: &str = "SWARM_NOT_READY";
    pub const ROUTE: &str = "ROUTE";
    pub const PROVE_SHARD: &str = "PROVE_SHARD";
    pub const ERROR: &str = "ERROR";
}

/// Error codes in `ERROR` params.
pub mod code {
    pub const BAD_JSON: &str = "bad_json";
    pub const BAD_PARAMS: &str = "bad_params";
    pub const UNKNOWN_COMMAND: &str = "unknown_command";
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const NOT_REGISTERED: &str = "not_registered";
    pub const PROTOCOL_VERSION: &str = "protocol_version";
    pub const FOREIGN_SHARDS: &str = "foreign_shards";
    /// The coordinator caught this node computing wrong outputs and will not take it back.
    pub const EVICTED: &str = "evicted";
    pub const SEEDER_UNAVAILABLE: &str = "seeder_unavailable";
}

/// The envelope of every control-channel message.
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

/// Why a frame is not a usable message. Past the envelope, the error keeps the request's id and
/// sender, so the reply can name the request it refuses.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a JSON command envelope: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unknown command {command:?}")]
    UnknownCommand {
        command: String,
        request_id: String,
        from: String,
    },
    #[error("bad params for {command}: {source}")]
    Params {
        command: String,
        request_id: String,
        from: String,
        source: serde_json::Error,
    },
}

impl DecodeError {
    /// The `ERROR` code this error is answered with.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::Json(_) => code::BAD_JSON,
            DecodeError::UnknownCommand { .. } => code::UNKNOWN_COMMAND,
            DecodeError::Params { .. } => code::BAD_PARAMS,
        }
    }

    /// The command name, when the envelope could be read.
    pub fn command(&self) -> Option<&str> {
        match self {
            DecodeError::Json(_) => None,
            DecodeError::UnknownCommand { command, .. } | DecodeError::Params { command, .. } => {
                Some(command)
            }
        }
    }

    /// The refused request's id and sender, when the envelope could be read.
    pub fn request(&self) -> Option<(&str, &str)> {
        match self {
            DecodeError::Json(_) => None,
            DecodeError::UnknownCommand {
                request_id, from, ..
            }
            | DecodeError::Params {
                request_id, from, ..
            } => Some((request_id, from)),
        }
    }
}

/// The host of an address as nodes give it (`HOST:PORT`, `[IPv6]:PORT`, `[IPv6]`, a bare host
/// or IPv6 address), without port or brackets: what a certificate names, what TLS checks, and
/// what tells whether two stages share a machine.
/// The name a node's data-channel certificate carries: derived from its node id, never from
/// an address it claims, and in a domain no real host has (`.invalid`, RFC 2606), so that the
/// swarm's CA never vouches for a node as any other machine (the coordinator above all).
pub fn node_tls_name(node_id: &str) -> String {
    format!("{node_id}.node.shardswarm.invalid")
}

/// Whether `node_id` can name a node's certificate: a DNS label (letters, digits and
/// hyphens, at most 63, not starting or ending with a hyphen). Node ids are UUIDs.
pub fn is_node_id(node_id: &str) -> bool {
    (1..=63).contains(&node_id.len())
        && node_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !node_id.starts_with('-')
        && !node_id.ends_with('-')
}

pub fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((host, _)) if !host.contains(':') => host,
        _ => addr,
    }
}

/// Now as RFC 3339 UTC.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("formatting the current time")
}

impl Command {
    /// A new request with a fresh `request_id`.
    pub fn new(command: &str, from: &str, to: &str, params: impl Serialize) -> Command {
        Self::reply_to(&uuid::Uuid::new_v4().to_string(), command, from, to, params)
    }

    /// A reply carrying `request_id`.
    pub fn reply_to(
        request_id: &str,
        command: &str,
        from: &str,
        to: &str,
        params: impl Serialize,
    ) -> Command {
        Command {
            command: command.to_owned(),
            request_id: request_id.to_owned(),
            from: from.to_owned(),
            to: to.to_owned(),
            timestamp: now_rfc3339(),
            params: serde_json::to_value(params).expect("params serialise"),
        }
    }

    /// An `ERROR` reply to `request_id`.
    pub fn error(request_id: &str, from: &str, to: &str, code: &str, message: &str) -> Command {
        Self::reply_to(
            request_id,
            cmd::ERROR,
            from,
            to,
            ErrorParams {
                code: code.into(),
                message: message.into(),
            },
        )
    }

    /// Parse one frame.
    pub fn decode(text: &str) -> Result<Command, DecodeError> {
        Ok(serde_json::from_str(text)?)
    }

    /// The frame's text.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("command serialises")
    }

    /// The params as `T`.
    pub fn params<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        serde_json::from_value(self.params.clone()).map_err(|source| DecodeError::Params {
            command: self.command.clone(),
            request_id: self.request_id.clone(),
            from: self.from.clone(),
            source,
        })
    }
}

/// Params of a command that takes none (`{}` on the wire; anything else is ignored).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// One control message: the command and its params, typed. Serialised adjacently tagged, so
/// `Message::LoadShard(p)` is `{"command":"LOAD_SHARD","params":{…}}` on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "command",
    content = "params",
    rename_all = "SCREAMING_SNAKE_CASE"
)]
pub enum Message {
    /// Node → coordinator: who I am and what I hold.
    Register(RegisterParams),
    /// Coordinator → node: accepted.
    Registered(RegisteredParams),
    /// Both ways: I am alive (the coordinator answers each one).
    Heartbeat(HeartbeatParams),
    /// Node → coordinator asks (empty params); the reply carries the seeder's file list.
    ListFiles(ListFiles),
    LoadShard(LoadShardParams),
    ShardProgress(ShardProgressParams),
    ShardLoaded(ShardLoadedParams),
    ShardFailed(ShardFailedParams),
    UnloadShard(UnloadShardParams),
    SwarmReady(SwarmStateParams),
    SwarmNotReady(SwarmStateParams),
    /// Coordinator → node: the route (the node's stage); node → coordinator: its stage is
    /// loaded (same command name, as the seed protocol answers with the request's name).
    Route(Route),
    /// Coordinator → node: prove you hold a shard you claimed (a range's digest); node →
    /// coordinator: the digest (same command name).
    ProveShard(ProveShard),
    Error(ErrorParams),
}

impl Message {
    /// Every command name a [`Message`] can carry.
    pub const COMMANDS: [&'static str; 14] = [
        cmd::REGISTER,
        cmd::REGISTERED,
        cmd::HEARTBEAT,
        cmd::LIST_FILES,
        cmd::LOAD_SHARD,
        cmd::SHARD_PROGRESS,
        cmd::SHARD_LOADED,
        cmd::SHARD_FAILED,
        cmd::UNLOAD_SHARD,
        cmd::SWARM_READY,
        cmd::SWARM_NOT_READY,
        cmd::ROUTE,
        cmd::PROVE_SHARD,
        cmd::ERROR,
    ];

    /// The wire name of this message's command.
    pub fn command(&self) -> &'static str {
        match self {
            Message::Register(_) => cmd::REGISTER,
            Message::Registered(_) => cmd::REGISTERED,
            Message::Heartbeat(_) => cmd::HEARTBEAT,
            Message::ListFiles(_) => cmd::LIST_FILES,
            Message::LoadShard(_) => cmd::LOAD_SHARD,
            Message::ShardProgress(_) => cmd::SHARD_PROGRESS,
            Message::ShardLoaded(_) => cmd::SHARD_LOADED,
            Message::ShardFailed(_) => cmd::SHARD_FAILED,
            Message::UnloadShard(_) => cmd::UNLOAD_SHARD,
            Message::SwarmReady(_) => cmd::SWARM_READY,
            Message::SwarmNotReady(_) => cmd::SWARM_NOT_READY,
            Message::Route(_) => cmd::ROUTE,
            Message::ProveShard(_) => cmd::PROVE_SHARD,
            Message::Error(_) => cmd::ERROR,
        }
    }
}

/// `LIST_FILES` params: empty in the request, the seeder's `/files` in the reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ListFiles {
    Reply(seeder::FileList),
    Request(Empty),
}

/// `ROUTE` params: the route in the coordinator's request, the stage's acknowledgement in the
/// node's reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Route {
    Assign(RouteParams),
    Loaded(RouteLoadedParams),
}

/// A node's `ROUTE` reply: its stage is loaded and serving.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteLoadedParams {
    pub stage: u32,
    pub loaded: bool,
    /// How the stage's decodes use threads (left out by older nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<DecodeThreads>,
}

/// A control message in its envelope: what the coordinator and nodes send and receive.
#[derive(Debug, Clone, PartialEq)]
pub struct Control {
    /// Correlates a reply with its request.
    pub request_id: String,
    /// Sender id (node id or `coordinator`).
    pub from: String,
    /// Receiver id, or `*` for a broadcast.
    pub to: String,
    /// RFC 3339 UTC.
    pub timestamp: String,
    pub message: Message,
}

impl Control {
    /// A new request with a fresh `request_id`.
    pub fn new(from: &str, to: &str, message: Message) -> Control {
        Self::reply_to(&uuid::Uuid::new_v4().to_string(), from, to, message)
    }

    /// A reply carrying `request_id`.
    pub fn reply_to(request_id: &str, from: &str, to: &str, message: Message) -> Control {
        Control {
            request_id: request_id.to_owned(),
            from: from.to_owned(),
            to: to.to_owned(),
            timestamp: now_rfc3339(),
            message,
        }
    }

    /// An `ERROR` reply to `request_id`.
    pub fn error(request_id: &str, from: &str, to: &str, code: &str, message: &str) -> Control {
        Self::reply_to(
            request_id,
            from,
            to,
            Message::Error(ErrorParams {
                code: code.into(),
                message: message.into(),
            }),
        )
    }

    /// Parse one frame: the envelope first, then the command name, then its params, so each
    /// failure gets its own error (and the last two keep the request's id).
    pub fn decode(text: &str) -> Result<Control, DecodeError> {
        let raw = Command::decode(text)?;
        if !Message::COMMANDS.contains(&raw.command.as_str()) {
            return Err(DecodeError::UnknownCommand {
                command: raw.command,
                request_id: raw.request_id,
                from: raw.from,
            });
        }
        let params = match raw.params {
            serde_json::Value::Null => serde_json::json!({}),
            p => p,
        };
        let tagged = serde_json::json!({"command": raw.command, "params": params});
        match serde_json::from_value(tagged) {
            Ok(message) => Ok(Control {
                request_id: raw.request_id,
                from: raw.from,
                to: raw.to,
                timestamp: raw.timestamp,
                message,
            }),
            Err(source) => Err(DecodeError::Params {
                command: raw.command,
                request_id: raw.request_id,
                from: raw.from,
                source,
            }),
        }
    }

    /// The frame's text (the same envelope as [`Command::encode`]).
    pub fn encode(&self) -> String {
        Command::from(self.clone()).encode()
    }
}

impl From<Control> for Command {
    fn from(c: Control) -> Command {
        let mut tagged = serde_json::to_value(&c.message).expect("messages serialise");
        Command {
            command: c.message.command().to_owned(),
            request_id: c.request_id,
            from: c.from,
            to: c.to,
            timestamp: c.timestamp,
            params: tagged["params"].take(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_id_is_a_dns_label_and_names_a_certificate_no_real_host_has() {
        assert!(is_node_id("6addd700-894c-4b31-974d-ffba0a716d5b"));
        assert!(is_node_id("n0"));
        for bad in [
            "",
            "-a",
            "a-",
            "a.b",
            "a b",
            "a_b",
            "10.0.0.1",
            &"a".repeat(64),
        ] {
            assert!(!is_node_id(bad), "{bad:?}");
        }
        assert_eq!(node_tls_name("n0"), "n0.node.shardswarm.invalid");
    }

    #[test]
    fn the_host_of_an_address_has_no_port_or_brackets() {
        assert_eq!(host_of("10.0.0.7:51841"), "10.0.0.7");
        assert_eq!(host_of("node-3.example.net:51841"), "node-3.example.net");
        assert_eq!(host_of("node-3.example.net"), "node-3.example.net");
        assert_eq!(host_of("[fd00::7]:51841"), "fd00::7");
        assert_eq!(host_of("[fd00::7]"), "fd00::7");
        assert_eq!(host_of("fd00::7"), "fd00::7");
    }

    #[test]
    fn envelope_round_trips_with_seed_field_names() {
        let text = r#"{"command":"LOAD_SHARD","request_id":"r1","from":"coordinator","to":"n1","timestamp":"2026-01-01T00:00:00Z","params":{"shard_id":0}}"#;
        let cmd = Command::decode(text).unwrap();
        assert_eq!(cmd.command, "LOAD_SHARD");
        assert_eq!(cmd.params["shard_id"], 0);
        let back: serde_json::Value = serde_json::from_str(&cmd.encode()).unwrap();
        let orig: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(back, orig);
    }

    #[test]
    fn replies_keep_the_request_id_and_errors_have_code_and_message() {
        let req = Command::new(cmd::HEARTBEAT, "n1", COORDINATOR, serde_json::json!({}));
        let err = Command::error(&req.request_id, COORDINATOR, "n1", code::BAD_PARAMS, "no");
        assert_eq!(err.request_id, req.request_id);
        let p: ErrorParams = err.params().unwrap();
        assert_eq!(p.code, "bad_params");
        assert!(time::OffsetDateTime::parse(
            &err.timestamp,
            &time::format_description::well_known::Rfc3339
        )
        .is_ok());
    }

    #[test]
    fn typed_messages_keep_the_wire_format() {
        let text = r#"{"command":"ROUTE","request_id":"r1","from":"n1","to":"coordinator","timestamp":"2026-01-01T00:00:00Z","params":{"stage":2,"loaded":true}}"#;
        let c = Control::decode(text).unwrap();
        assert_eq!(
            c.message,
            Message::Route(Route::Loaded(RouteLoadedParams {
                stage: 2,
                loaded: true,
                decode: None,
            }))
        );
        let back: serde_json::Value = serde_json::from_str(&c.encode()).unwrap();
        assert_eq!(
            back,
            serde_json::from_str::<serde_json::Value>(text).unwrap()
        );
        // A heartbeat without params is a heartbeat; its encoding has `{}`.
        let hb = Control::decode(
            r#"{"command":"HEARTBEAT","request_id":"h","from":"n","to":"coordinator","timestamp":"t"}"#,
        )
        .unwrap();
        assert_eq!(hb.message, Message::Heartbeat(HeartbeatParams::default()));
        assert!(hb.encode().contains(r#""params":{}"#));
        for name in Message::COMMANDS {
            assert!(!name.is_empty());
        }
    }

    #[test]
    fn unknown_commands_and_bad_params_keep_the_request_id() {
        let unknown = Control::decode(
            r#"{"command":"DANCE","request_id":"r9","from":"n","to":"c","timestamp":"t"}"#,
        )
        .unwrap_err();
        assert_eq!(unknown.code(), code::UNKNOWN_COMMAND);
        assert_eq!(unknown.request(), Some(("r9", "n")));
        let bad = Control::decode(
            r#"{"command":"SHARD_LOADED","request_id":"r8","from":"n","to":"c","timestamp":"t","params":{"shard_id":"x"}}"#,
        )
        .unwrap_err();
        assert_eq!(bad.code(), code::BAD_PARAMS);
        assert_eq!(bad.request(), Some(("r8", "n")));
        assert_eq!(Control::decode("{").unwrap_err().code(), code::BAD_JSON);
    }

    #[test]
    fn load_shard_defaults_to_using_the_tracker() {
        let p: LoadShardParams = serde_json::from_value(serde_json::json!({
            "shard_id": 1, "file": "shard-1.gguf", "size": 5, "info_hash": "ab", "magnet": "m",
            "torrent_url": "u", "sha256": "s"
        }))
        .unwrap();
        assert!(p.use_tracker);
        assert!(p.peers.is_empty());
        assert!(Command::decode("{not json").is_err());
    }
}
