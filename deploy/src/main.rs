//! `upload_shards`: copy a validated shard directory to a server over ssh, as the seed guide's
//! step 2. Uses rsync when it is installed on both ends (resumable, and it writes each file
//! under a temp name and renames it, so the server never seeds a half-uploaded shard), else
//! scp into a staging directory followed by a rename on the server.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "upload_shards",
    version,
    about = "Upload shard-K.gguf/.safetensors files and shards.json to a server over ssh",
    long_about = "Upload a shard directory (shard-K.gguf or shard-K.safetensors and shards.json) to \
a server over ssh, e.g. the seeder's --seed-dir. The set is validated first; files arrive under a \
temporary name and are renamed, so a running seeder never picks up a partial file.\n\nExample:\n  \
upload_shards --source-dir models_cache/shards --remote-user alice --remote-host seed.example.org \
--remote-dir /srv/shards"
)]
struct Cli {
    /// Local directory holding the shards and shards.json.
    #[arg(long)]
    source_dir: PathBuf,
    /// User on the server.
    #[arg(long)]
    remote_user: String,
    /// Server host name or address.
    #[arg(long)]
    remote_host: String,
    /// Directory on the server (created if missing).
    #[arg(long)]
    remote_dir: String,
    /// ssh port.
    #[arg(long, default_value_t = 22)]
    port: u16,
    /// ssh private key.
    #[arg(long)]
    identity: Option<PathBuf>,
    /// Extra ssh option (`-o KEY=VALUE`), e.g. StrictHostKeyChecking=accept-new (repeatable).
    #[arg(long = "ssh-option")]
    ssh_options: Vec<String>,
    /// Copy with scp even when rsync is available.
    #[arg(long)]
    scp: bool,
    /// Print the commands instead of running them.
    #[arg(long)]
    dry_run: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let files = shard_files(&cli.source_dir)?;
    let expected = files.iter().filter(|f| !f.ends_with("shards.json")).count();
    let report = torrents::validate::validate(&cli.source_dir, expected)?;
    if !report.ok {
        for p in &report.problems {
            eprintln!("  {}: {}", p.file.as_deref().unwrap_or("set"), p.message);
        }
        bail!(
            "{} is not a valid shard set: not uploading",
            cli.source_dir.display()
        );
    }
    let target = format!("{}@{}", cli.remote_user, cli.remote_host);
    let mut ssh = vec!["ssh".to_string(), "-p".into(), cli.port.to_string()];
    let mut options = Vec::new();
    if let Some(id) = &cli.identity {
        options.extend(["-i".to_string(), id.display().to_string()]);
    }
    for o in &cli.ssh_options {
        options.extend(["-o".to_string(), o.clone()]);
    }
    ssh.extend(options.iter().cloned());
    let dir = shell_quote(&cli.remote_dir);
    let use_rsync = !cli.scp && which("rsync");
    let mut steps: Vec<Vec<String>> = Vec::new();
    let paths: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    if use_rsync {
        let mut rsync = vec![
            "rsync".into(),
            "--partial".into(),
            "--times".into(),
            "--mkpath".into(),
        ];
        rsync.extend(["--info=progress2".into(), "-e".into(), ssh.join(" ")]);
        rsync.extend(paths);
        rsync.push(format!("{target}:{}/", cli.remote_dir));
        steps.push(rsync);
    } else {
        let staging = format!("{}/.upload-staging", cli.remote_dir);
        let mut mkdir = ssh.clone();
        mkdir.extend([
            target.clone(),
            format!("mkdir -p {}", shell_quote(&staging)),
        ]);
        steps.push(mkdir);
        let mut scp = vec!["scp".to_string(), "-P".into(), cli.port.to_string()];
        scp.extend(options.iter().cloned());
        scp.extend(paths);
        scp.push(format!("{target}:{staging}/"));
        steps.push(scp);
        let mut publish = ssh.clone();
        publish.extend([
            target.clone(),
            format!("mv -f {0}/* {dir}/ && rmdir {0}", shell_quote(&staging)),
        ]);
        steps.push(publish);
    }
    for step in steps {
        if cli.dry_run {
            println!(
                "{}",
                step.iter()
                    .map(|a| shell_quote(a))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            continue;
        }
        eprintln!("running {}", step[0]);
        let status = Command::new(&step[0])
            .args(&step[1..])
            .status()
            .with_context(|| format!("{} could not start", step[0]))?;
        if !status.success() {
            bail!("{} failed ({status})", step[0]);
        }
    }
    if !cli.dry_run {
        eprintln!(
            "uploaded {expected} shards to {target}:{}; on the server look for \
             \"[TORRENT] Loaded {expected} file(s) for sharing\" after the seeder rescans",
            cli.remote_dir
        );
    }
    Ok(())
}

/// The shard files and the manifest in `dir`, sorted.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if torrents::split::parse_shard_file_name(&name).is_some() || name == "shards.json" {
            files.push(entry.path());
        }
    }
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: no shard files (shard-K.gguf / shard-K.safetensors)",
            dir.display()
        );
    }
    Ok(files)
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join(program).is_file()))
}

/// Quote for a POSIX shell when needed.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@=,+%".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
