//! The seeder: makes a standard v1 `.torrent` for every `.gguf`/`.safetensors` file in the seed
//! directory, seeds them all with one librqbit session (read-only storage), and serves an HTTP
//! tracker, a BEP 19 web seed and the seed guide's LIST_FILES / REQUEST_METADATA /
//! REQUEST_PIECE as HTTP endpoints. [`run`] is the whole server; `main.rs` only parses flags.
//!
//! Tasks: the axum server, a rescan loop (timer and SIGHUP) and librqbit's own tasks. Shared
//! state lives in [`service::Seeder`]: the catalog snapshot (swapped whole under a `RwLock` after
//! each rescan), the tracker (its own mutex) and atomic counters; no lock is held across an
//! await.

pub mod api;
pub mod catalog;
pub mod error;
pub mod net;
pub mod service;
pub mod storage;
pub mod tracker;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
pub use error::{Error, Result};

/// BitTorrent transports to listen on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    Tcp,
    Utp,
    Both,
    /// Accepted for the seed guide's command line: BitTorrent has no QUIC transport, so this
    /// means `both`.
    Quic,
}

/// Seeder configuration: flags, `SHARDSWARM_SEEDER_<FLAG>` environment variables, or a TOML
/// file (`--config`; see `daemon::config`).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "server",
    version,
    about = "shardswarm seeder: seeds every .gguf/.safetensors in a directory over BitTorrent",
    long_about = "Seeds every .gguf and .safetensors file in --seed-dir over BitTorrent (librqbit, \
read-only), with its own HTTP tracker and a BEP 19 web seed, so any client (aria2c, Transmission, \
qBittorrent, rqbit) can fetch them from a .torrent or a magnet link.\n\nHTTP endpoints (on \
--http-port): /files (LIST_FILES), /manifest, /torrents/NAME.torrent, /metadata/INFOHASH \
(REQUEST_METADATA), /pieces/INFOHASH/INDEX (REQUEST_PIECE), /seed/NAME (web seed), /announce, \
/scrape, /metrics, /healthz, /relay (with --relay-port).\n\nPrints `[READY] http=ADDR peer=ADDR \
key=KEY [relay=URL]` once serving."
)]
pub struct Config {
    /// Address to listen on (BitTorrent and HTTP).
    #[arg(long, default_value = "0.0.0.0", env = "SHARDSWARM_SEEDER_LISTEN_ADDR")]
    pub listen_addr: IpAddr,
    /// BitTorrent peer port (0: any free port).
    #[arg(long, default_value_t = 51820, env = "SHARDSWARM_SEEDER_PORT")]
    pub port: u16,
    /// Directory whose .gguf/.safetensors files are served (top level only; never written to).
    #[arg(long, env = "SHARDSWARM_SEEDER_SEED_DIR")]
    pub seed_dir: PathBuf,
    /// Port of the tracker, HTTP API and web seed (default: --port + 1; 0: any free port).
    #[arg(long, env = "SHARDSWARM_SEEDER_HTTP_PORT")]
    pub http_port: Option<u16>,
    /// BitTorrent transports.
    #[arg(long, value_enum, default_value = "both")]
    pub transport: Transport,
    /// Where torrents, hashes and fast-resume state are kept (default:
    /// ~/.local/state/shardswarm/seeder-<hash of the seed dir>).
    #[arg(long, env = "SHARDSWARM_SEEDER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Base URL put into .torrent files and magnets (default: http://<listen-addr>:<http-port>,
    /// with 0.0.0.0 replaced by this host's first non-loopback address).
    #[arg(long, env = "SHARDSWARM_SEEDER_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Track any info hash, not only the files served here.
    #[arg(long)]
    pub open_tracker: bool,
    /// Join the DHT and local service discovery (off by default: the tracker is enough).
    #[arg(long)]
    pub dht: bool,
    /// Cap BitTorrent upload at this many bytes/s (at least 16384).
    #[arg(long, env = "SHARDSWARM_SEEDER_UPLOAD_LIMIT")]
    pub upload_limit: Option<u32>,
    /// Seconds between rescans of the seed dir (SIGHUP rescans at once).
    #[arg(long, default_value_t = 30)]
    pub rescan_interval: u64,
    /// Announces and scrapes per second one IP address may make on average (bursts of 10 s
    /// worth allowed); beyond it the tracker answers a `failure reason` (0: no limit).
    #[arg(long, default_value_t = 10, env = "SHARDSWARM_SEEDER_ANNOUNCE_RATE")]
    pub announce_rate: u32,
    /// Peers one swarm (torrent) may list; further new peers are refused.
    #[arg(long, default_value_t = 5000, env = "SHARDSWARM_SEEDER_MAX_PEERS")]
    pub max_peers: usize,
    /// Peers one IP address may add to one swarm (loopback is not limited: a test or a
    /// proxy on this machine).
    #[arg(long, default_value_t = 32, env = "SHARDSWARM_SEEDER_MAX_PEERS_PER_IP")]
    pub max_peers_per_ip: usize,
    /// Run the swarm's relay on this port, TCP (HTTPS, relaying) and UDP (QUIC, telling
    /// members the address their NAT maps them to) alike; 0: a port free for both. Off by
    /// default. Members behind NATs reach each other through it, directly once a hole is
    /// punched. Its certificate is made in the state dir for --public-url's host; the
    /// coordinator hands out its URL and certificate (`/relay`, signed like `/manifest`).
    #[arg(long, env = "SHARDSWARM_SEEDER_RELAY_PORT")]
    pub relay_port: Option<u16>,
}

/// The flags' defaults, serving the directory `seeds`.
impl Default for Config {
    fn default() -> Config {
        Config {
            listen_addr: IpAddr::from([0, 0, 0, 0]),
            port: 51820,
            seed_dir: PathBuf::from("seeds"),
            http_port: None,
            transport: Transport::Both,
            state_dir: None,
            public_url: None,
            open_tracker: false,
            announce_rate: 10,
            max_peers: 5000,
            max_peers_per_ip: 32,
            dht: false,
            upload_limit: None,
            rescan_interval: 30,
            relay_port: None,
        }
    }
}

impl Config {
    /// A configuration for `seed_dir` with defaults, listening on loopback with free ports:
    /// what tests and embedders start from.
    pub fn loopback(seed_dir: PathBuf, state_dir: PathBuf) -> Config {
        Config {
            listen_addr: IpAddr::from([127, 0, 0, 1]),
            port: 0,
            seed_dir,
            http_port: Some(0),
            state_dir: Some(state_dir),
            ..Config::default()
        }
    }

    /// The HTTP port to bind.
    pub fn http_port(&self) -> u16 {
        self.http_port.unwrap_or(if self.port == 0 {
            0
        } else {
            self.port.saturating_add(1)
        })
    }

    /// Check what flags cannot check alone.
    pub fn check(&self) -> Result<()> {
        match std::fs::metadata(&self.seed_dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::Config(format!(
                    "--seed-dir {} is not a directory",
                    self.seed_dir.display()
                )))
            }
            Err(e) => {
                let what = format!("--seed-dir {}", self.seed_dir.display());
                return Err(daemon::IoError::new(what, e).into());
            }
        }
        if let Some(limit) = self.upload_limit {
            if limit < 16 * 1024 {
                return Err(Error::Config(format!(
                    "--upload-limit {limit} is below 16384 bytes/s, where librqbit stalls"
                )));
            }
        }
        if self.rescan_interval == 0 {
            return Err(Error::Config(
                "--rescan-interval must be at least 1 second".into(),
            ));
        }
        Ok(())
    }

    /// The state directory, defaulting to one per seed directory under ~/.local/state.
    pub fn state_dir(&self) -> Result<PathBuf> {
        if let Some(d) = &self.state_dir {
            return Ok(d.clone());
        }
        use sha2::Digest;
        let seed = self.seed_dir.canonicalize().map_err(|e| {
            daemon::IoError::new(format!("seed dir {}", self.seed_dir.display()), e)
        })?;
        let tag = hex::encode(&sha2::Sha256::digest(seed.as_os_str().as_encoded_bytes())[..6]);
        let base = std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
            .ok_or_else(|| Error::Config("no HOME: give --state-dir".into()))?;
        Ok(base.join("shardswarm").join(format!("seeder-{tag}")))
    }
}

/// Addresses a running seeder serves on.
#[derive(Debug, Clone)]
pub struct Bound {
    pub http: SocketAddr,
    pub peer: SocketAddr,
    pub public_url: String,
    /// The public key (hex) `/manifest` and `/files` are signed with: what a coordinator is
    /// given as `--seeder-key`.
    pub key: String,
    /// The swarm's relay, when it runs one (`--relay-port`).
    pub relay: Option<protocol::RelayInfo>,
}

/// Run the seeder until SIGINT/SIGTERM (or `shutdown` resolves).
pub async fn run(config: Config) -> Result<()> {
    let server = service::start(config, api::router).await?;
    let b = server.bound().clone();
    let relay = b
        .relay
        .as_ref()
        .map(|r| format!(" relay={}", r.url))
        .unwrap_or_default();
    println!(
        "[READY] http={} peer={} key={}{relay}",
        b.http, b.peer, b.key
    );
    println!(
        "[SEEDER-KEY] {} (give it to the coordinator: --seeder-key; it checks the manifest with it)",
        b.key
    );
    server.wait_for_shutdown_signal().await;
    tracing::info!("shutting down");
    server.stop().await;
    Ok(())
}

/// How often the rescan loop runs.
pub(crate) fn rescan_period(config: &Config) -> Duration {
    Duration::from_secs(config.rescan_interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Default` restates the flags' defaults (with the seed dir `seeds`) for embedders and
    /// tests: it must say what clap says.
    #[test]
    fn the_default_config_is_the_flags_defaults() {
        use clap::Parser as _;
        let parsed = Config::try_parse_from(["server", "--seed-dir", "seeds"])
            .expect("--seed-dir is the one required flag");
        assert_eq!(format!("{:?}", Config::default()), format!("{parsed:?}"));
    }
}
