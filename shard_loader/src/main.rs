//! `shard_loader`: cut models into stage shards, map split sets, validate shard directories,
//! and make or inspect `.torrent` files. A thin layer over the `torrents` library.

mod watch;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use torrents::gguf::GgufModel;
use torrents::manifest::Manifest;
use torrents::map::{find_split_set, gguf_source, map_gguf_split, map_safetensors, SplitSet};
use torrents::metainfo::{self, CreateOptions, Metainfo};
use torrents::progress::Progress as _;
use torrents::split::{split_model, SplitOptions};

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
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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

/// Whether to cut architectures that are not verified to split exactly.
#[derive(Args)]
struct Exactness {
    /// Cut an architecture that is not verified to give the whole model's output as stages
    /// (see `shard_loader architectures`). Its stages are marked unverified; `validate` and
    /// the node warn about them. Refused architectures stay refused.
    #[arg(long)]
    allow_unverified: bool,
}

impl Exactness {
    fn options(&self) -> SplitOptions {
        SplitOptions {
            allow_unverified: self.allow_unverified,
        }
    }
}

#[derive(Subcommand)]
enum TorrentCommand {
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
struct CreateArgs {
    /// The file to share (one file per torrent).
    path: PathBuf,
    /// Tracker announce URL (repeat for more; each becomes its own tier).
    #[arg(short, long = "announce")]
    announce: Vec<String>,
    /// Web seed URL, BEP 19 url-list (repeat for more).
    #[arg(short, long = "web-seed")]
    web_seed: Vec<String>,
    /// Mark the torrent private (BEP 27): clients use only its trackers.
    #[arg(short, long)]
    private: bool,
    /// Piece length in bytes (power of two, 16K..256M; suffixes K and M allowed).
    /// Default: the power of two giving 1000-2000 pieces.
    #[arg(short = 'l', long, value_parser = parse_size)]
    piece_length: Option<u64>,
    #[arg(short, long)]
    comment: Option<String>,
    /// Name in the torrent (default: the file's name).
    #[arg(short, long)]
    name: Option<String>,
    /// Leave out the creation date, so the same input always gives the same file.
    #[arg(long)]
    no_date: bool,
    /// Hashing threads (default: one per core).
    #[arg(short, long, default_value_t = 0)]
    threads: usize,
    /// Output file (default: PATH.torrent).
    #[arg(short, long)]
    output: Option<PathBuf>,
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

fn main() -> ExitCode {
    // Exit quietly when stdout is closed early (`shard_loader torrent show X | head`), as
    // other command-line tools do, instead of panicking on a broken pipe.
    // SAFETY: setting a signal disposition at start-up, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Split {
            model,
            shards,
            target_dir,
            exactness,
        } => {
            let m = GgufModel::open(&model)?;
            eprintln!(
                "splitting {} ({} layers, {} tensors) into {shards} shards in {}",
                model.display(),
                m.block_count()?,
                m.tensors.len(),
                target_dir.display()
            );
            let source = gguf_source(&m)?;
            let reporter = report::Reporter::new();
            let manifest = split_model(
                &m,
                shards,
                &target_dir,
                source,
                exactness.options(),
                &reporter,
            )?;
            print_manifest_summary(&manifest, &target_dir);
        }
        Command::Map {
            metadata_dir,
            source_dir,
            target_dir,
            shards,
            exactness,
        } => {
            let manifest = match find_split_set(&source_dir)? {
                SplitSet::Gguf(parts) => {
                    eprintln!(
                        "mapping {} gguf-split parts from {}",
                        parts.len(),
                        source_dir.display()
                    );
                    map_gguf_split(
                        &parts,
                        shards,
                        &target_dir,
                        exactness.options(),
                        &report::Reporter::new(),
                    )?
                }
                SplitSet::Safetensors(parts) => {
                    if shards.is_some_and(|n| n != parts.len()) {
                        bail!(
                            "safetensors parts map one to one: --shards must be {} or left out",
                            parts.len()
                        );
                    }
                    eprintln!(
                        "mapping {} safetensors parts from {}",
                        parts.len(),
                        source_dir.display()
                    );
                    let meta = metadata_dir.unwrap_or_else(|| source_dir.clone());
                    map_safetensors(&parts, &meta, &target_dir, &report::Reporter::new())?
                }
            };
            print_manifest_summary(&manifest, &target_dir);
        }
        Command::Watch {
            coordinator,
            api_key,
            ca,
            until,
            timeout,
        } => {
            watch::check_url(&coordinator)?;
            watch::watch(
                &coordinator,
                (watch::api_key(api_key).as_deref(), ca.as_deref()),
                until,
                std::time::Duration::from_secs(timeout),
            )?;
        }
        Command::Validate {
            target_dir,
            expected_shards,
            json,
        } => {
            let report = torrents::validate::validate_with(
                &target_dir,
                expected_shards,
                &report::Reporter::new(),
            )?;
            if !json {
                for w in &report.warnings {
                    eprintln!(
                        "WARNING: {}: {}",
                        w.file.as_deref().unwrap_or("-"),
                        w.message
                    );
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else if report.ok {
                println!(
                    "OK: {} shards in {} (split {})",
                    report.shards_ok,
                    report.target_dir,
                    report.split_id.as_deref().unwrap_or("-")
                );
            } else {
                println!(
                    "INVALID: {} problem(s) in {}",
                    report.problems.len(),
                    report.target_dir
                );
                for p in &report.problems {
                    match &p.file {
                        Some(f) => println!("  {f}: {}", p.message),
                        None => println!("  {}", p.message),
                    }
                }
            }
            return Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Command::Torrent(TorrentCommand::Create(args)) => create_torrent(args)?,
        Command::Torrent(TorrentCommand::Edit {
            file,
            announce,
            web_seed,
            comment,
            output,
        }) => {
            let old = metainfo::read_file(&file)?;
            let opts = CreateOptions {
                announce,
                web_seeds: web_seed,
                comment,
                ..Default::default()
            };
            let (bytes, m) = metainfo::rewrap(&old, &opts)?;
            let output = output.unwrap_or(file);
            torrents::manifest::write_atomically(&output, &bytes)?;
            eprintln!("wrote {}", output.display());
            print_metainfo(&m);
        }
        Command::Torrent(TorrentCommand::Show { file, json })
            if file.to_string_lossy().starts_with("magnet:") =>
        {
            let m = torrents::magnet::parse(&file.to_string_lossy())?;
            if json {
                let v = serde_json::json!({
                    "info_hash": m.info_hash_hex(),
                    "name": m.name,
                    "length": m.length,
                    "trackers": m.trackers,
                    "web_seeds": m.web_seeds,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("info hash  {}", m.info_hash_hex());
                println!("name       {}", m.name.as_deref().unwrap_or("-"));
                println!(
                    "length     {}",
                    m.length.map_or("-".into(), |l| format!("{l} bytes"))
                );
                m.trackers.iter().for_each(|t| println!("tracker    {t}"));
                m.web_seeds.iter().for_each(|w| println!("web seed   {w}"));
            }
        }
        Command::Torrent(TorrentCommand::Show { file, json }) => {
            let m = metainfo::read_file(&file)?;
            if json {
                let mut v = serde_json::to_value(&m)?;
                v["magnet"] = m.magnet().into();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_metainfo(&m);
            }
        }
        Command::Inspect { file, json } => inspect(&file, json)?,
        Command::Architectures => print!("{}", torrents::arch::markdown_table()),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_manifest_summary(m: &Manifest, dir: &Path) {
    for s in &m.shards {
        let layers = s
            .layers
            .map_or("-".to_string(), |r| format!("{}-{}", r.first, r.last));
        println!(
            "{:<22} layers {:<7} {:>12} bytes  sha256 {}",
            s.file, layers, s.size, s.sha256
        );
    }
    println!(
        "wrote {} shards and {} (split {})",
        m.shards.len(),
        dir.join("shards.json").display(),
        m.split_id
    );
}

fn create_torrent(args: CreateArgs) -> Result<()> {
    let output = args.output.clone().unwrap_or_else(|| {
        let mut o = args.path.clone().into_os_string();
        o.push(".torrent");
        PathBuf::from(o)
    });
    let opts = CreateOptions {
        announce: args.announce,
        web_seeds: args.web_seed,
        private: args.private,
        piece_length: args.piece_length,
        comment: args.comment,
        name: args.name,
        creation_date: (!args.no_date).then(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        }),
        threads: args.threads,
    };
    let total = std::fs::metadata(&args.path)
        .with_context(|| format!("{}", args.path.display()))?
        .len();
    let reporter = report::Reporter::new();
    reporter.start("hashing", total);
    let started = std::time::Instant::now();
    let (bytes, m) = metainfo::create(&args.path, &opts, &|done| reporter.set_done(done))?;
    reporter.finish();
    let secs = started.elapsed().as_secs_f64();
    torrents::manifest::write_atomically(&output, &bytes)?;
    eprintln!(
        "hashed {} bytes in {:.2} s ({:.0} MiB/s), wrote {}",
        m.length,
        secs,
        m.length as f64 / (1 << 20) as f64 / secs.max(1e-9),
        output.display()
    );
    print_metainfo(&m);
    Ok(())
}

fn print_metainfo(m: &Metainfo) {
    println!("name:         {}", m.name);
    println!("info hash:    {}", m.info_hash_hex());
    println!("size:         {} bytes", m.length);
    println!("piece length: {} bytes", m.piece_length);
    println!("pieces:       {}", m.piece_count);
    println!("private:      {}", if m.private { "yes" } else { "no" });
    for f in &m.files {
        println!("file:         {} ({} bytes)", f.path.join("/"), f.length);
    }
    for (i, tier) in m.trackers.iter().enumerate() {
        println!("tracker:      tier {i}: {}", tier.join(" "));
    }
    for ws in &m.web_seeds {
        println!("web seed:     {ws}");
    }
    if let Some(c) = &m.comment {
        println!("comment:      {c}");
    }
    println!("magnet:       {}", m.magnet());
}

fn inspect(file: &Path, json: bool) -> Result<()> {
    let m = GgufModel::open(file)?;
    let data: u64 = m.tensors.iter().map(|t| t.size).sum();
    let layers = m.block_count().ok();
    let keys: Vec<serde_json::Value> = m
        .kvs
        .iter()
        .map(|(k, v)| {
            let shown = match v {
                torrents::gguf::Value::Array(_, items) => format!("[{} items]", items.len()),
                torrents::gguf::Value::String(s) => {
                    let s = String::from_utf8_lossy(s);
                    if s.len() > 60 {
                        format!("{:?}…", &s[..s.floor_char_boundary(60)])
                    } else {
                        format!("{s:?}")
                    }
                }
                other => format!("{other:?}")
                    .split(['(', ')'])
                    .nth(1)
                    .unwrap_or_default()
                    .to_owned(),
            };
            serde_json::json!({ "key": k, "value": shown })
        })
        .collect();
    if json {
        let tensors: Vec<_> = m
            .tensors
            .iter()
            .map(|t| serde_json::json!({"name": t.name, "dims": t.dims, "type": t.ggml_type, "bytes": t.size}))
            .collect();
        let out = serde_json::json!({
            "file": file.display().to_string(), "version": m.version,
            "architecture": m.architecture().ok(), "layers": layers,
            "tensor_count": m.tensors.len(), "tensor_bytes": data, "alignment": m.alignment,
            "metadata": keys, "tensors": tensors,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("file:         {}", file.display());
        println!(
            "architecture: {}",
            m.architecture().unwrap_or_else(|_| "-".into())
        );
        println!(
            "layers:       {}",
            layers.map_or("-".into(), |l| l.to_string())
        );
        println!("tensors:      {} ({} bytes)", m.tensors.len(), data);
        for k in keys {
            println!(
                "  {} = {}",
                k["key"].as_str().unwrap_or(""),
                k["value"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}
