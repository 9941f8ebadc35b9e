//! What the coordinator asks the seeder: the shard manifest with info hashes, the file list
//! (LIST_FILES), and the seeder's own peer address.

use std::time::Duration;

use anyhow::Context;

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

/// GET a JSON document from the seeder.
pub async fn get_json(seeder: &str, path: &str) -> anyhow::Result<serde_json::Value> {
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
    Ok(body)
}

/// Read the split from the seeder's `/manifest` and `/files`.
pub async fn fetch_split(seeder: &str) -> anyhow::Result<SplitInfo> {
    let manifest = get_json(seeder, "/manifest").await?;
    let files = get_json(seeder, "/files").await?;
    let health = get_json(seeder, "/healthz").await.ok();
    let mut shards = Vec::new();
    for (k, s) in manifest["shards"]
        .as_array()
        .context("manifest has no shards")?
        .iter()
        .enumerate()
    {
        let file = s["file"].as_str().context("shard without file")?;
        let listed = files["files"]
            .as_array()
            .and_then(|fs| fs.iter().find(|f| f["name"] == file))
            .with_context(|| format!("the seeder does not serve {file}"))?;
        if listed["sha256"] != s["sha256"] {
            anyhow::bail!("the seeder's {file} does not match its manifest (sha256 differs)");
        }
        let text = |v: &serde_json::Value, what: &str| {
            v.as_str()
                .map(str::to_owned)
                .with_context(|| format!("{file}: no {what}"))
        };
        shards.push(ShardSpec {
            shard_id: k as u32,
            file: file.to_owned(),
            size: s["size"].as_u64().context("shard without size")?,
            sha256: text(&s["sha256"], "sha256")?,
            info_hash: text(&listed["info_hash"], "info_hash")?,
            magnet: text(&listed["magnet"], "magnet")?,
            torrent_url: text(&listed["torrent_url"], "torrent_url")?,
        });
    }
    if shards.is_empty() {
        anyhow::bail!("the seeder's manifest lists no shards");
    }
    let split_id = manifest["split_id"]
        .as_str()
        .context("manifest without split_id")?
        .to_owned();
    Ok(SplitInfo {
        model_name: manifest["source"]["name"]
            .as_str()
            .unwrap_or("model")
            .to_owned(),
        model_sha256: manifest["source"]["sha256"]
            .as_str()
            .unwrap_or(&split_id)
            .to_owned(),
        split_id,
        shards,
        seeder_peer: health.and_then(|h| h["peer"].as_str().map(str::to_owned)),
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
