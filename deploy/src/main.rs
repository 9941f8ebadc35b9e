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
    about = "Upload shard-K.gguf/.safetensors files, vocab.gguf and shards.json to a server over ssh",
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
    let expected = files
        .iter()
        .filter_map(|f| f.file_name()?.to_str())
        .filter(|name| torrents::split::parse_shard_file_name(name).is_some())
        .count();
    let report =
        torrents::validate::validate_with(&cli.source_dir, expected, &report::Reporter::new())?;
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
        let status = if step[0] == "rsync" {
            let total = files
                .iter()
                .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
                .sum();
            rsync_with_progress(&step, total)?
        } else {
            Command::new(&step[0])
                .args(&step[1..])
                .status()
                .with_context(|| format!("{} could not start", step[0]))?
        };
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

/// The shard files, the vocabulary file and the manifest in `dir`, sorted.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if torrents::split::parse_shard_file_name(&name).is_some()
            || name == "shards.json"
            || name == torrents::split::VOCAB_FILE
        {
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

/// Run rsync with `--info=progress2` and show its progress our way (a bar on a terminal, a line
/// per tenth otherwise) instead of its carriage-return lines, which make a mess of logs.
fn rsync_with_progress(step: &[String], total: u64) -> Result<std::process::ExitStatus> {
    use std::io::Read;
    use torrents::progress::Progress;
    let mut child = Command::new(&step[0])
        .args(&step[1..])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("{} could not start", step[0]))?;
    let reporter = report::Reporter::new();
    reporter.start("uploading", total);
    let mut out = child.stdout.take().expect("piped");
    let (mut pending, mut buf) = (String::new(), [0u8; 4096]);
    loop {
        let n = out.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        pending.push_str(&String::from_utf8_lossy(&buf[..n]));
        // progress2 rewrites one line with \r: "  1,234,567  45%  12.34MB/s  0:00:10 …".
        while let Some(cut) = pending.find(['\r', '\n']) {
            let line: String = pending.drain(..=cut).collect();
            if let Some(bytes) = rsync_bytes(&line) {
                reporter.set_done(bytes);
            }
        }
    }
    reporter.finish();
    Ok(child.wait()?)
}

/// The bytes done in one rsync `--info=progress2` line.
fn rsync_bytes(line: &str) -> Option<u64> {
    let mut words = line.split_whitespace();
    let bytes = words.next()?.replace(',', "");
    words.next()?.strip_suffix('%')?;
    bytes.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn rsync_progress_lines_give_the_bytes_done() {
        assert_eq!(
            super::rsync_bytes("     12,345,678  45%   11.77MB/s    0:00:01 (xfr#1, to-chk=2/4)"),
            Some(12_345_678)
        );
        assert_eq!(super::rsync_bytes("sending incremental file list"), None);
        assert_eq!(super::rsync_bytes(""), None);
    }
}
