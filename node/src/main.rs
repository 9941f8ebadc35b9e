//! `node`: a swarm node (`node --coordinator URL --data-dir D`), plus `node model-info`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "node",
    version,
    about = "shardswarm node: fetches and seeds its shards, and runs pipeline stages",
    long_about = "Run a node: `node --coordinator http://HOST:PORT --data-dir DIR`. It registers \
with the coordinator, fetches the shards it is given over BitTorrent (from the seeder and other \
nodes), verifies them, keeps seeding them, and reconnects with backoff if the coordinator goes \
away.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    node: node::Config,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Complete a prompt with the whole model in one llama.cpp process (greedy): the reference
    /// the swarm's pipeline must equal token for token.
    Reference {
        /// The whole model (GGUF).
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// CPU threads.
        #[arg(long, default_value_t = 1)]
        threads: i32,
        /// Sampling temperature (0: greedy).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Nucleus sampling: keep the most likely tokens up to this probability mass.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Seed of the sampler (the same seed gives the same completion here and in the swarm).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print {"text", "token_ids", "prompt_ids", timings}.
        #[arg(long)]
        json: bool,
    },
    /// Load a GGUF file (a whole model or one stage shard) with llama.cpp and print what it holds.
    ModelInfo {
        /// The GGUF file.
        #[arg(long)]
        model: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn model_info(model: PathBuf, json: bool) -> Result<()> {
    let info = llm::inspect_model(&model)?;
    // A stage file: say what a node would say of it (refused, or unverified).
    let header = torrents::gguf::GgufModel::open(&model)?;
    if header.get(torrents::split::KEY_STAGE_INDEX).is_some() {
        let findings = torrents::arch::check_stage(&header);
        for p in findings.problems {
            eprintln!("problem: {p}: a node refuses this stage");
        }
        for w in findings.warnings {
            eprintln!("warning: {w}");
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("architecture: {}", info.architecture);
        println!("layers:       {}", info.n_layer);
        println!("embedding:    {}", info.n_embd);
        println!("vocabulary:   {}", info.n_vocab);
        println!("parameters:   {}", info.n_params);
    }
    Ok(())
}

fn reference(
    model: &std::path::Path,
    prompt: &str,
    max_tokens: usize,
    threads: i32,
    sampling: protocol::data::Sampling,
    json: bool,
) -> Result<()> {
    let c = llm::reference_completion_with(model, prompt, max_tokens, threads, sampling)?;
    if json {
        println!("{}", serde_json::to_string(&c)?);
    } else {
        println!("{}", c.text);
    }
    Ok(())
}

/// llama.cpp runs each decode's threads as an OpenMP team, and libgomp's default lets idle
/// threads spin for about 300,000 rounds (milliseconds) after every decode. A stage waits for
/// its neighbours between steps, and nodes may share a machine's cores: spinning threads take
/// the cores the working stage needs. Sleeping at once (`OMP_WAIT_POLICY=PASSIVE`) is no
/// better: ggml meets at an OpenMP barrier after every operation, and a futex wake-up at each
/// made SmolLM2 with 2 threads 2.7x slower (50 against 134 tokens/s). A short spin covers the
/// gaps inside a decode but not those between steps: with `GOMP_SPINCOUNT=10000` the whole
/// model gave 145 tokens/s. libgomp reads its environment only when it is loaded (before
/// `main`), so unless the caller chose, run again with it set.
fn short_openmp_spin() {
    const SPIN: &str = "GOMP_SPINCOUNT";
    if std::env::var_os(SPIN).is_some() || std::env::var_os("OMP_WAIT_POLICY").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    use std::os::unix::process::CommandExt;
    let error = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(SPIN, "10000")
        .exec();
    // exec returns only when it failed: carry on with the default policy.
    eprintln!("warning: could not run again with {SPIN}=10000: {error}");
}

fn main() -> std::process::ExitCode {
    short_openmp_spin();
    daemon::init_logging("info,librqbit=warn,librqbit_dht=warn");
    let cli: Cli = daemon::config::parse("node");
    let result = match cli.command {
        Some(Command::ModelInfo { model, json }) => model_info(model, json),
        Some(Command::Reference {
            model,
            prompt,
            max_tokens,
            threads,
            temperature,
            top_p,
            seed,
            json,
        }) => {
            let sampling = protocol::data::Sampling {
                temperature,
                top_p,
                seed,
            };
            reference(&model, &prompt, max_tokens, threads, sampling, json)
        }
        // One async thread: librqbit then writes and reads blocks inline rather than through
        // block_in_place (see the seeder's main.rs for the measured cost).
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| Ok(rt.block_on(node::run(cli.node))?)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
