//! `shard_loader`: cut models into stage shards, map split sets, validate shard directories,
//! follow a swarm filling up, and make or inspect `.torrent` files. A thin layer over the
//! `torrents` library: [`cli`] holds the flags, each subcommand a file of its own.

mod cli;
mod inspect;
mod split;
mod torrent;
mod validate;
mod watch;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use cli::{Cli, Command, TorrentCommand};

fn main() -> ExitCode {
    // Exit quietly when stdout is closed early (`shard_loader torrent show X | head`), as
    // other command-line tools do, instead of panicking on a broken pipe.
    // SAFETY: setting a signal disposition at start-up, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    daemon::init_logging_with("info", daemon::LogTime::Hidden);
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
        } => split::split(&model, shards, &target_dir, &exactness)?,
        Command::Map {
            metadata_dir,
            source_dir,
            target_dir,
            shards,
            exactness,
        } => split::map(metadata_dir, &source_dir, &target_dir, shards, &exactness)?,
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
        } => return validate::validate(&target_dir, expected_shards, json),
        Command::Torrent(TorrentCommand::Create(args)) => torrent::create(args)?,
        Command::Torrent(TorrentCommand::Edit {
            file,
            announce,
            web_seed,
            comment,
            output,
        }) => torrent::edit(file, announce, web_seed, comment, output)?,
        Command::Torrent(TorrentCommand::Show { file, json }) => torrent::show(&file, json)?,
        Command::Inspect { file, json } => inspect::inspect(&file, json)?,
        Command::Join {
            blocks_dir,
            ranges,
            stage,
            out,
            exactness,
        } => split::join(&blocks_dir, &ranges, stage, &out, &exactness)?,
        Command::Architectures => print!("{}", torrents::arch::markdown_table()),
    }
    Ok(ExitCode::SUCCESS)
}
