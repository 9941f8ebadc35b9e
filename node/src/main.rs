//! `node`: a swarm node. Today: `node model-info` (what llama.cpp makes of a GGUF file).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "node",
    version,
    about = "shardswarm node: holds shards and runs pipeline stages"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::ModelInfo { model, json } => {
            let info = node::llm::inspect_model(&model)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("architecture: {}", info.architecture);
                println!("layers:       {}", info.n_layer);
                println!("embedding:    {}", info.n_embd);
                println!("vocabulary:   {}", info.n_vocab);
                println!("parameters:   {}", info.n_params);
            }
        }
    }
    Ok(())
}
