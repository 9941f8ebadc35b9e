//! The coordinator: nodes register over a WebSocket control channel (`/control`, JSON
//! commands); it learns the shards from the seeder, places them, sends `LOAD_SHARD`, tracks
//! progress and broadcasts `SWARM_READY` once enough nodes are up and every shard is loaded;
//! then it serves the OpenAI API through the pipeline of stage nodes.
//!
//! Layers, each importing only those above it: the leaves ([`swarm`], the IO-free swarm
//! rules, in a crate of their own; [`text`], the vocabulary; [`metrics`]' live counters; the [`verify`] sampler and
//! judge; [`ca`], [`access`], [`seeder_client`]) → [`engine`] (the serving) → [`hub`] (which
//! only assembles) → its users ([`server`] and its control channel, [`openai`], [`status`],
//! [`dashboard`], the [`checker`]).
//!
//! Tasks:
//! - the HTTP server: one task per connection; a registered node's connection has a reader
//!   and a writer fed by an outbound channel ([`hub::CONTROL_QUEUE`] deep);
//! - the heartbeat sweeper, once a second;
//! - the engine, which owns the serving state, with one reader task per lane connection
//!   (stage 0 and the last stage's answer lane);
//! - the checker, replaying sampled requests through every holder on probe lanes;
//! - the referee computations, on blocking threads.
//!
//! Locks: `Hub::swarm`, `Hub::conns`, the engine's `stats` and the checks' `verify_stats`
//! are std mutexes held only for a step of bookkeeping: none is held while another is taken
//! or across an `.await`. The messages a swarm event produces are sent after its lock is
//! released ([`hub::Hub::dispatch`]).

pub mod access;
pub mod ca;
pub mod checker;
pub mod dashboard;
pub mod engine;
pub mod error;
pub mod hub;
pub mod metrics;
pub mod openai;
pub mod seeder_client;
pub mod server;
pub mod status;
pub mod text;
/// The IO-free swarm rules, a crate of their own (fuzzed without llama.cpp).
pub use swarm;
pub mod verify;

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

pub use error::{Error, Result};

/// Coordinator configuration: flags, `SHARDSWARM_COORDINATOR_<FLAG>` environment variables, or
/// a TOML file (`--config`; see `daemon::config`).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "coordinator",
    version,
    about = "shardswarm coordinator: places shards on nodes and reports when the swarm is ready",
    long_about = "Nodes connect to ws://ADDR/control and REGISTER; the coordinator learns the shards \
from the seeder's /manifest and /files, places every shard on at least one node (extra nodes get \
replicas, fetched from the first holder rather than the seeder), sends LOAD_SHARD, and broadcasts \
SWARM_READY once --min-nodes nodes are registered and every shard is loaded.\n\nHTTP: GET /status \
(JSON), GET /healthz, the OpenAI API under /v1. Prints `[READY] http=ADDR` once serving.\n\n\
Access: on loopback with no token or API key set, everything is open. On any other address a \
missing token and API key are made, kept in --state-dir and printed once ([TOKEN], [API-KEY]), and \
only TLS is served: --tls-cert/--tls-key, or else the swarm's own CA ([CA] STATE/ca.pem), which \
nodes with the token fetch and pin. --insecure runs open and plain there."
)]
pub struct Config {
    /// Address to listen on (port 0: any free port).
    #[arg(
        long,
        default_value = "0.0.0.0:51830",
        env = "SHARDSWARM_COORDINATOR_LISTEN"
    )]
    pub listen: SocketAddr,
    /// The seeder's HTTP base URL.
    #[arg(
        long,
        default_value = "http://127.0.0.1:51821",
        env = "SHARDSWARM_COORDINATOR_SEEDER"
    )]
    pub seeder: String,
    /// The seeder's public key (its log's `[SEEDER-KEY]`): the manifest and file list are
    /// used only if signed with it, so that nobody between the two can swap the shards'
    /// sha256s (which every node checks against).
    #[arg(long, env = "SHARDSWARM_SEEDER_KEY")]
    pub seeder_key: Option<String>,
    /// Nodes that must be registered for the swarm to be ready.
    #[arg(long, default_value_t = 4)]
    pub min_nodes: usize,
    /// Shared secret nodes must present (params.token or `Authorization: Bearer`). On an
    /// address other than loopback, one is made and kept in --state-dir when none is given.
    #[arg(long, env = "SHARDSWARM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the token from this file (its first line) instead.
    #[arg(long, env = "SHARDSWARM_COORDINATOR_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// An API key clients must present as `Authorization: Bearer KEY` on /v1/*, /status and
    /// /metrics (repeat for several). On an address other than loopback, one is made and kept
    /// in --state-dir when none is given.
    #[arg(
        long,
        env = "SHARDSWARM_COORDINATOR_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_key: Vec<String>,
    /// Read API keys from this file, one per line (`#` comments and blank lines skipped).
    #[arg(long, env = "SHARDSWARM_COORDINATOR_API_KEY_FILE")]
    pub api_key_file: Vec<std::path::PathBuf>,
    /// Run open (no token, no API key) on an address other than loopback. Anyone who can
    /// reach the port can then join the swarm and use the API.
    #[arg(long, env = "SHARDSWARM_COORDINATOR_INSECURE")]
    pub insecure: bool,
    /// Where the coordinator keeps what it makes (token, API key) across restarts (default:
    /// $STATE_DIRECTORY, else $XDG_STATE_HOME or ~/.local/state, /shardswarm-coordinator).
    #[arg(long, env = "SHARDSWARM_COORDINATOR_STATE_DIR")]
    pub state_dir: Option<std::path::PathBuf>,
    /// Seconds between node heartbeats.
    #[arg(long, default_value_t = 2)]
    pub heartbeat_interval: u64,
    /// Seconds of silence after which a node is dropped and its shards re-placed.
    #[arg(long, default_value_t = 10)]
    pub heartbeat_timeout: u64,
    /// Requests the pipeline serves at once (each stage keeps this many sequences, each with
    /// the model's context); more wait in line.
    #[arg(long, default_value_t = 8, env = "SHARDSWARM_COORDINATOR_PARALLEL")]
    pub parallel: u32,
    /// Requests that may wait for the pipeline beyond those it serves; more are refused at
    /// once with 429 and `Retry-After`.
    #[arg(long, default_value_t = 64, env = "SHARDSWARM_COORDINATOR_QUEUE")]
    pub queue: usize,
    /// Micro-batches in the pipeline at once: the running requests are split into this many
    /// groups, so that stages on different machines work at the same time (0: one per machine
    /// the route's stages run on, since stages sharing a machine share its cores; more where
    /// the route's hops are slow against its compute, as across a WAN).
    #[arg(
        long,
        default_value_t = 0,
        env = "SHARDSWARM_COORDINATOR_MICRO_BATCHES"
    )]
    pub micro_batches: usize,
    /// Seconds a request may take, waiting for a slot included; then it fails with an error.
    #[arg(long, default_value_t = 600, env = "SHARDSWARM_COORDINATOR_DEADLINE")]
    pub deadline: u64,
    /// Fraction of finished requests replayed through every holder of each shard to catch a
    /// node whose outputs differ from the others' (0: never; 1: every request).
    #[arg(
        long,
        default_value_t = 0.01,
        env = "SHARDSWARM_COORDINATOR_VERIFY_FRACTION"
    )]
    pub verify_fraction: f64,
    /// Largest relative L2 difference between two holders' outputs that still counts as
    /// agreement (honest holders differ by floating-point rounding only).
    #[arg(
        long,
        default_value_t = 0.01,
        env = "SHARDSWARM_COORDINATOR_VERIFY_TOLERANCE"
    )]
    pub verify_tolerance: f32,
    /// Serve HTTPS and `wss://` with this certificate chain (PEM; with --tls-key). Nodes then
    /// join with `--coordinator https://…` (and `--ca` for a CA of your own).
    #[arg(long, env = "SHARDSWARM_COORDINATOR_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "SHARDSWARM_COORDINATOR_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// HTTP connections (API clients and nodes) open at once; more wait until one closes.
    #[arg(
        long,
        default_value_t = 1024,
        env = "SHARDSWARM_COORDINATOR_MAX_CONNECTIONS"
    )]
    pub max_connections: usize,
    /// Where the vocabulary file (and shards the checks compute) are cached (default:
    /// <tmp>/shardswarm-coordinator).
    #[arg(long, env = "SHARDSWARM_COORDINATOR_CACHE_DIR")]
    pub cache_dir: Option<std::path::PathBuf>,
    /// What the data channel runs over: `tcp` (each stage's data port; every stage must be
    /// dialable by its caller), `mesh` (iroh: direct, hole-punched or through the swarm's
    /// relay, for nodes behind NAT), or `auto`: the mesh when the seeder runs a relay
    /// (`server --relay-port`), else TCP.
    #[arg(
        long,
        value_enum,
        default_value = "auto",
        env = "SHARDSWARM_COORDINATOR_DATA_TRANSPORT"
    )]
    pub data_transport: DataTransport,
}

/// What the data channel runs over (`--data-transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataTransport {
    Auto,
    Tcp,
    Mesh,
}

/// The flags' defaults, with the seeder on this machine's default port.
impl Default for Config {
    fn default() -> Config {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 51830)),
            seeder: "http://127.0.0.1:51821".into(),
            seeder_key: None,
            min_nodes: 4,
            token: None,
            token_file: None,
            api_key: Vec::new(),
            api_key_file: Vec::new(),
            insecure: false,
            state_dir: None,
            heartbeat_interval: 2,
            heartbeat_timeout: 10,
            parallel: 8,
            queue: 64,
            micro_batches: 0,
            deadline: 600,
            max_connections: 1024,
            tls_cert: None,
            tls_key: None,
            verify_fraction: 0.01,
            verify_tolerance: 0.01,
            cache_dir: None,
            data_transport: DataTransport::Auto,
        }
    }
}

impl Config {
    /// Refuse settings that cannot work, naming the flag.
    pub fn check(&self) -> Result<()> {
        let refuse = |m: String| Err(Error::Config(m));
        if self.min_nodes == 0 {
            return refuse("--min-nodes must be at least 1".into());
        }
        if self.heartbeat_interval == 0 || self.heartbeat_timeout <= self.heartbeat_interval {
            return refuse(
                "--heartbeat-timeout must be longer than --heartbeat-interval (>= 1 s)".into(),
            );
        }
        if !(1..=64).contains(&self.parallel) {
            return refuse(format!("--parallel {} is not within 1..=64", self.parallel));
        }
        if self.max_connections < 8 {
            return refuse(format!(
                "--max-connections {} leaves no room for nodes and clients (at least 8)",
                self.max_connections
            ));
        }
        if !(0.0..=1.0).contains(&self.verify_fraction) {
            return refuse(format!(
                "--verify-fraction {} is not within 0..=1",
                self.verify_fraction
            ));
        }
        if !(self.verify_tolerance > 0.0 && self.verify_tolerance < 1.0) {
            return refuse(format!(
                "--verify-tolerance {} is not between 0 and 1",
                self.verify_tolerance
            ));
        }
        if self.deadline == 0 {
            return refuse("--deadline must be at least 1 second".into());
        }
        if !(self.seeder.starts_with("http://") || self.seeder.starts_with("https://")) {
            return refuse(format!("--seeder {} is not an http:// URL", self.seeder));
        }
        Ok(())
    }

    /// Where made secrets are kept.
    pub fn state_dir(&self) -> std::path::PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(access::default_state_dir)
    }

    pub(crate) fn heartbeat(&self) -> (Duration, Duration) {
        (
            Duration::from_secs(self.heartbeat_interval),
            Duration::from_secs(self.heartbeat_timeout),
        )
    }
}

/// Run until SIGINT/SIGTERM.
pub async fn run(config: Config) -> Result<()> {
    let running = server::start(config).await?;
    println!("[READY] http={} scheme={}", running.http, running.scheme);
    running.wait_for_shutdown_signal().await;
    tracing::info!("shutting down");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Default` restates the flags' defaults for embedders and tests: it must say what clap
    /// says.
    #[test]
    fn the_default_config_is_the_flags_defaults() {
        let parsed = Config::try_parse_from(["coordinator"]).expect("no flag is required");
        assert_eq!(format!("{:?}", Config::default()), format!("{parsed:?}"));
    }
}
