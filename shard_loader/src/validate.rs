//! `validate`: check a shard directory and list every problem with the file at fault.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

/// Validate `target_dir`; success only when every check holds.
pub fn validate(target_dir: &Path, expected_shards: usize, json: bool) -> Result<ExitCode> {
    let report =
        torrents::validate::validate_with(target_dir, expected_shards, &report::Reporter::new())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for w in &report.warnings {
            eprintln!(
                "WARNING: {}: {}",
                w.file.as_deref().unwrap_or("-"),
                w.message
            );
        }
        if report.ok {
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
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
