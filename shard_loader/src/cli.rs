//! The command line: every subcommand and its flags, with the help text users read.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use torrents::manifest::LayerRange;
use torrents::split::SplitOptions;

use crate::watch;

#[derive(Parser)]
#[command(
    name = "shard_loader",
    version,
    about = "Cut GGUF models into pipeline-stage shards and make BitTorrent files for them",
    long_about = "Cut GGUF models into pipeline-stage shards (shard-0.gguf … shard-N.gguf, each a model \
llama.cpp opens on its own), map sets split by other tools, validate shard directories, and make or \
inspect standard BitTorrent v1 .torrent files.\n\nTypical use:\n  shard_loader split --model M.gguf \
--shards 4 --target-dir shards\n  shard_loader validate --target-dir shards --expected-shards 4\n  \
shard_loader torrent create shards/shard-0.gguf --announce http://HOST:51821/announce"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Cut a GGUF model into N contiguous layer ranges, one stage file each, plus shards.json.
    Split {
        /// The whole model (GGUF).
        #[arg(long)]
        model: PathBuf,
        /// Number of shards, from 1 to the model's layer count.
        #[arg(long, default_value_t = 4)]
        shards: usize,
        /// Directory for shard-K.gguf and shards.json (created if missing).
        #[arg(long)]
        target_dir: PathBuf,
        #[command(flatten)]
        exactness: Exactness,
    },
    /// Turn a set split by another tool into shard-K files: gguf-split parts
    /// (NAME-00001-of-0000N.gguf) or Hugging Face safetensors parts (model-00001-of-0000N.safetensors).
    Map {
        /// Directory with model.safetensors.index.json (safetensors sets; default: the source dir).
        #[arg(long)]
        metadata_dir: Option<PathBuf>,
        /// Directory with the parts (gguf-split or safetensors).
        #[arg(long = "safetensors-dir", visible_alias = "source-dir")]
        source_dir: PathBuf,
        /// Directory for the shard-K files and shards.json.
        #[arg(long)]
        target_dir: PathBuf,
        /// Stage shards to cut gguf-split input into (default: as many as there are parts).
        #[arg(long)]
        shards: Option<usize>,
        #[command(flatten)]
        exactness: Exactness,
    },
    /// Write one stage of a plan from layer blocks (the shards of a finer split) and that
    /// split's vocab.gguf, without the whole model: byte for byte the file `split` writes for
    /// that stage of that plan. Prints its size and sha256.
    Join {
        /// Directory of the block split (shard-K.gguf, vocab.gguf and shards.json).
        #[arg(long)]
        blocks_dir: PathBuf,
        /// The plan: every stage's layer range, in order, e.g. 0-8,9-20,21-29. Each stage's
        /// range must be a run of whole blocks.
        #[arg(long, value_delimiter = ',', value_parser = parse_layer_range, required = true)]
        ranges: Vec<LayerRange>,
        /// Which stage of the plan to write (0 is the first).
        #[arg(long)]
        stage: usize,
        /// Where to write the stage file (whole or not at all).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        exactness: Exactness,
    },
    /// List the model architectures split and map accept (stages verified to compute exactly
    /// what the whole model computes) and those they refuse, with the reason.
    Architectures,
    /// Check a shard directory: count, headers, sizes, sha256s and layer ranges. Exits 0 only
    /// when all hold; otherwise lists every problem with the file at fault.
    Validate {
        #[arg(long)]
        target_dir: PathBuf,
        #[arg(long)]
        expected_shards: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow a swarm filling up: a bar per node (its shards' bytes) from the coordinator's
    /// /status, until the swarm is ready or serving. Exits 1 on --timeout.
    Watch {
        /// The coordinator (http://HOST:PORT).
        #[arg(long)]
        coordinator: String,
        /// The API key, where the coordinator has keys (default: $SHARDSWARM_API_KEY).
        #[arg(long)]
        api_key: Option<String>,
        /// Trust this CA (PEM) for an https:// coordinator: the swarm's own CA is
        /// STATE_DIR/ca.pem on the coordinator's machine.
        #[arg(long)]
        ca: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "serving")]
        until: watch::Until,
        /// Seconds to wait at most.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Make or inspect .torrent files.
    #[command(subcommand)]
    Torrent(TorrentCommand),
    /// Print a GGUF file's metadata and tensor summary (no weights are read).
    Inspect {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// `A-B` (inclusive source layers, A <= B).
fn parse_layer_range(text: &str) -> Result<LayerRange, String> {
    let (a, b) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?}: a layer range is FIRST-LAST, e.g. 0-9"))?;
    let number = |s: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|_| format!("{text:?}: {s:?} is not a layer number"))
    };
    let (first, last) = (number(a)?, number(b)?);
    if last < first {
        return Err(format!("{text:?}: the last layer comes before the first"));
    }
    Ok(LayerRange { first, last })
}

/// Whether to cut architectures that are not verified to split exactly.
#[derive(Args)]
pub struct Exactness {
    /// Cut an architecture that is not verified to give the whole model's output as stages
    /// (see `shard_loader architectures`). Its stages are marked unverified; `validate` and
    /// the node warn about them. Refused architectures stay refused.
    #[arg(long)]
    pub allow_unverified: bool,
}

impl Exactness {
    pub fn options(&self) -> SplitOptions {
        SplitOptions {
            allow_unverified: self.allow_unverified,
        }
    }
}

#[derive(Subcommand)]
pub enum TorrentCommand {
    /// Hash a file (on every core) and write a standard v1 .torrent for it.
    Create(CreateArgs),
    /// Rewrite a .torrent's trackers and web seeds without hashing again: the info
    /// dictionary, and so the info hash, stay as they are. The given lists replace the old
    /// ones (none given: none kept).
    Edit {
        file: PathBuf,
        /// Tracker announce URL (repeat for more).
        #[arg(short, long = "announce")]
        announce: Vec<String>,
        /// Web seed URL (repeat for more).
        #[arg(short, long = "web-seed")]
        web_seed: Vec<String>,
        #[arg(short, long)]
        comment: Option<String>,
        /// Output file (default: overwrite FILE).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Show what a .torrent holds: name, info hash, size, pieces, trackers, web seeds, magnet.
    /// Given a magnet link instead, show what the link says.
    Show {
        /// A .torrent file, or a `magnet:?` link.
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    /// The file to share (one file per torrent).
    pub path: PathBuf,
    /// Tracker announce URL (repeat for more; each becomes its own tier).
    #[arg(short, long = "announce")]
    pub announce: Vec<String>,
    /// Web seed URL, BEP 19 url-list (repeat for more).
    #[arg(short, long = "web-seed")]
    pub web_seed: Vec<String>,
    /// Mark the torrent private (BEP 27): clients use only its trackers.
    #[arg(short, long)]
    pub private: bool,
    /// Piece length in bytes (power of two, 16K..256M; suffixes K and M allowed).
    /// Default: the power of two giving 1000-2000 pieces.
    #[arg(short = 'l', long, value_parser = parse_size)]
    pub piece_length: Option<u64>,
    #[arg(short, long)]
    pub comment: Option<String>,
    /// Name in the torrent (default: the file's name).
    #[arg(short, long)]
    pub name: Option<String>,
    /// Leave out the creation date, so the same input always gives the same file.
    #[arg(long)]
    pub no_date: bool,
    /// Hashing threads (default: one per core).
    #[arg(short, long, default_value_t = 0)]
    pub threads: usize,
    /// Output file (default: PATH.torrent).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

/// `1048576`, `1024K`, `1M`, `1MiB` → bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.trim_end_matches("iB").trim_end_matches('B') {
        x if x.ends_with(['k', 'K']) => (&x[..x.len() - 1], 1u64 << 10),
        x if x.ends_with(['m', 'M']) => (&x[..x.len() - 1], 1 << 20),
        x => (x, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size in bytes (e.g. 262144, 256K, 1M)"))
}
