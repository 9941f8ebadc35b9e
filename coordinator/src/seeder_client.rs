//! What the coordinator asks the seeder: the shard manifest with info hashes, the file list
//! (LIST_FILES), and the seeder's own peer address.

use std::time::Duration;

use anyhow::Context;
use protocol::seeder::{FileList, Health};
use serde::de::DeserializeOwned;
use torrents::manifest::Manifest;

use crate::swarm::ShardSpec;

/// The served split.
#[derive(Debug, Clone)]
pub struct SplitInfo {
    pub shards: Vec<ShardSpec>,
    pub model_sha256: String,
    pub split_id: String,
    pub seeder_peer: Option<String>,
    /// The source model's name (the model id of the OpenAI API).
    pub model_name: String,
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client")
}

/// GET a JSON document of type `T` from the seeder.
pub async fn get_json<T: DeserializeOwned>(seeder: &str, path: &str) -> anyhow::Result<T> {
    let url = format!("{}{path}", seeder.trim_end_matches('/'));
    let resp = client()
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    let body: serde_json::Value = resp
        .json()
        .await
        .with_context(|| format!("GET {url}: not JSON"))?;
    if !status.is_success() {
        anyhow::bail!("GET {url}: {status}: {}", body["error"]["message"]);
    }
    serde_json::from_value(body).with_context(|| format!("GET {url}: unexpected document"))
}

/// Read the split from the seeder's `/manifest` and `/files`.
pub async fn fetch_split(seeder: &str) -> anyhow::Result<SplitInfo> {
    let manifest: Manifest = get_json(seeder, "/manifest").await?;
    let files: FileList = get_json(seeder, "/files").await?;
    let health: Option<Health> = get_json(seeder, "/healthz").await.ok();
    let mut shards = Vec::new();
    for (k, s) in manifest.shards.iter().enumerate() {
        let listed = files
            .files
            .iter()
            .find(|f| f.name == s.file)
            .with_context(|| format!("the seeder does not serve {}", s.file))?;
        if listed.sha256 != s.sha256 {
            anyhow::bail!(
                "the seeder's {} does not match its manifest (sha256 differs)",
                s.file
            );
        }
        shards.push(ShardSpec {
            shard_id: k as u32,
            file: s.file.clone(),
            size: s.size,
            sha256: s.sha256.clone(),
            info_hash: listed.info_hash.clone(),
            magnet: listed.magnet.clone(),
            torrent_url: listed.torrent_url.clone(),
        });
    }
    if shards.is_empty() {
        anyhow::bail!("the seeder's manifest lists no shards");
    }
    Ok(SplitInfo {
        model_name: manifest.source.name,
        model_sha256: manifest
            .source
            .sha256
            .unwrap_or_else(|| manifest.split_id.clone()),
        split_id: manifest.split_id,
        shards,
        seeder_peer: health.map(|h| h.peer),
    })
}

/// Fetch the split, retrying with backoff (bounded: about two minutes) while the seeder starts.
pub async fn fetch_split_with_retry(seeder: &str) -> anyhow::Result<SplitInfo> {
    let mut delay = Duration::from_millis(250);
    let mut last = None;
    for _ in 0..20 {
        match fetch_split(seeder).await {
            Ok(s) => return Ok(s),
            Err(e) => {
                tracing::warn!("seeder not ready: {e:#}");
                last = Some(e);
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(8));
    }
    Err(last.expect("at least one attempt")).context("the seeder never answered with a manifest")
}
