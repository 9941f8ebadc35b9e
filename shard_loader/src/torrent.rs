//! `torrent create|edit|show`: standard v1 .torrent files (and magnet links) made and read
//! with the `torrents` library.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;
use torrents::metainfo::{self, CreateOptions, Metainfo};
use torrents::progress::Progress as _;

use crate::cli::CreateArgs;

/// `torrent create`: hash the file and write its .torrent.
pub fn create(args: CreateArgs) -> Result<()> {
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

/// `torrent edit`: new trackers and web seeds around the same info dictionary.
pub fn edit(
    file: PathBuf,
    announce: Vec<String>,
    web_seed: Vec<String>,
    comment: Option<String>,
    output: Option<PathBuf>,
) -> Result<()> {
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
    Ok(())
}

/// What `torrent show --json` prints of a magnet link.
#[derive(Serialize)]
struct MagnetShown<'a> {
    info_hash: String,
    name: &'a Option<String>,
    length: Option<u64>,
    trackers: &'a [String],
    web_seeds: &'a [String],
}

/// What `torrent show --json` prints of a .torrent: its metainfo and magnet link.
#[derive(Serialize)]
struct TorrentShown<'a> {
    #[serde(flatten)]
    metainfo: &'a Metainfo,
    magnet: String,
}

/// `torrent show`: a .torrent file's contents, or what a magnet link says.
pub fn show(file: &std::path::Path, json: bool) -> Result<()> {
    let text = file.to_string_lossy();
    if text.starts_with("magnet:") {
        let m = torrents::magnet::parse(&text)?;
        if json {
            let shown = MagnetShown {
                info_hash: m.info_hash_hex(),
                name: &m.name,
                length: m.length,
                trackers: &m.trackers,
                web_seeds: &m.web_seeds,
            };
            println!("{}", serde_json::to_string_pretty(&shown)?);
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
        return Ok(());
    }
    let m = metainfo::read_file(file)?;
    if json {
        let shown = TorrentShown {
            metainfo: &m,
            magnet: m.magnet(),
        };
        println!("{}", serde_json::to_string_pretty(&shown)?);
    } else {
        print_metainfo(&m);
    }
    Ok(())
}
