//! Swarm node: registers with the coordinator, fetches its shards with an embedded librqbit
//! client (from the seeder and from other nodes), verifies them, keeps seeding them, and runs
//! them as pipeline stages (llama.cpp through the `llm` crate).

pub mod agent;
pub mod error;
pub mod fetch;
pub mod metrics;
pub mod serve;
pub mod store;

pub use error::{Error, Result};

use std::net::IpAddr;
use std::path::PathBuf;

/// Node configuration: flags, `SHARDSWARM_NODE_<FLAG>` environment variables, or a TOML file
/// (`--config`; see `daemon::config`).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// The coordinator (http://HOST:PORT or ws://HOST:PORT/control).
    #[arg(long, env = "SHARDSWARM_NODE_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Where shards, the node id and resume state are kept (locked while the node runs).
    #[arg(long, env = "SHARDSWARM_NODE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// A name for logs and /status (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Shared secret of the swarm (the coordinator prints it as `[JOIN]`).
    #[arg(long, env = "SHARDSWARM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the token from this file (its first line) instead.
    #[arg(long, env = "SHARDSWARM_NODE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Trust this CA (PEM) for an `https://` coordinator, instead of the system's roots.
    #[arg(long, env = "SHARDSWARM_NODE_CA")]
    pub ca: Option<PathBuf>,
    /// BitTorrent port other nodes fetch shards from (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub peer_port: u16,
    /// Ask the home router (UPnP IGD) to forward the BitTorrent port to this node, so that
    /// nodes outside its network can fetch from it too. Off by default: it changes the
    /// router's settings. Without it, a node behind NAT still fetches (its connections are
    /// outbound) but only nodes it dials get shards from it.
    #[arg(long, env = "SHARDSWARM_NODE_UPNP")]
    pub upnp: bool,
    /// Address the BitTorrent port listens on.
    #[arg(long, default_value = "0.0.0.0")]
    pub listen_addr: IpAddr,
    /// CPU threads a stage's decodes use (llama.cpp's team). Unset: the node measures one
    /// thread against a team of every core it may run on when a stage loads, and keeps the
    /// faster (`/status` shows the choice and the times).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub threads: Option<u32>,
    /// Pin each thread of a stage's team to a core of its own (llama.cpp's `--cpu-strict`;
    /// stage S takes the cores from S × threads on, wrapping), or leave the team free. Unset:
    /// the node measures both when a stage loads and keeps the faster. Pinning wins on kernels
    /// that pack virtual CPUs onto few cores; it loses on a machine shared with other work.
    #[arg(long, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub pin_threads: Option<bool>,
    /// Port of the inference data channel (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub data_port: u16,
    /// This node's uplink in Mbit/s, if known: the coordinator gives first copies of shards to
    /// fast uplinks and lets slow nodes trail as replicas.
    #[arg(long, env = "SHARDSWARM_NODE_UPLINK_MBIT")]
    pub uplink_mbit: Option<u32>,
    /// This node's downlink in Mbit/s, if known (shown in the coordinator's /status).
    #[arg(long, env = "SHARDSWARM_NODE_DOWNLINK_MBIT")]
    pub downlink_mbit: Option<u32>,
    /// Serve Prometheus metrics at http://ADDR/metrics (off unless set; e.g. 127.0.0.1:9101).
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// For tests of the coordinator's checks only: corrupt every output this node computes
    /// by about this fraction of its size (a lying or broken node).
    #[arg(long, default_value_t = 0.0, hide = true)]
    pub test_lie: f32,
    /// For tests of the coordinator's defences only: break the protocol this way.
    #[arg(long, value_enum, hide = true)]
    pub test_attack: Option<serve::lie::Attack>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            coordinator: None,
            data_dir: None,
            name: None,
            token: None,
            token_file: None,
            ca: None,
            peer_port: 0,
            upnp: false,
            listen_addr: IpAddr::from([0, 0, 0, 0]),
            threads: None,
            pin_threads: None,
            data_port: 0,
            uplink_mbit: None,
            downlink_mbit: None,
            metrics_listen: None,
            test_lie: 0.0,
            test_attack: None,
        }
    }
}

/// Run the node until SIGINT/SIGTERM, or until the coordinator refuses it.
pub async fn run(config: Config) -> Result<()> {
    agent::run(config).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        config: Config,
    }

    /// `Default` restates the flags' defaults for embedders and tests: it must say what clap
    /// says.
    #[test]
    fn the_default_config_is_the_flags_defaults() {
        use clap::Parser as _;
        let parsed = Flags::try_parse_from(["node"]).expect("no flag is required");
        assert_eq!(
            format!("{:?}", Config::default()),
            format!("{:?}", parsed.config)
        );
    }
}
