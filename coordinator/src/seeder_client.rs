//! What the coordinator asks the seeder: the shard manifest with info hashes, the file list
//! (LIST_FILES), and the seeder's own peer address.

use std::time::Duration;

use protocol::seeder::{FileList, Health};
use serde::de::DeserializeOwned;
use torrents::manifest::Manifest;

use crate::swarm::ShardSpec;
use crate::{Error, Result};

/// The served split.
#[derive(Debug, Clone)]
pub struct SplitInfo {
    pub shards: Vec<ShardSpec>,
    pub model_sha256: String,
    pub split_id: String,
    pub seeder_peer: Option<String>,
    /// The model id of the OpenAI API: the source file's stem (see `SourceModel::id`).
    pub model_id: String,
    /// The source model's `general.name`, for people (`/v1/models`' `name`, the dashboard).
    pub model_name: String,
    /// The split's vocabulary file (tokenizer and chat template, no weights), when it has one.
    pub vocab: Option<RemoteFile>,
}

/// A file the seeder serves (its web seed) and the manifest vouches for (its sha256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    pub file: String,
    pub size: u64,
    pub sha256: String,
    pub web_seed: Option<String>,
}

impl From<&ShardSpec> for RemoteFile {
    fn from(shard: &ShardSpec) -> RemoteFile {
        RemoteFile {
            file: shard.file.clone(),
            size: shard.size,
            sha256: shard.sha256.clone(),
            web_seed: shard.web_seed.clone(),
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client")
}

/// GET a JSON document of type `T` from the seeder.
pub async fn get_json<T: DeserializeOwned>(seeder: &str, path: &str) -> Result<T> {
    get_document(seeder, path, None).await
}

/// Whether the seeder's URL names this machine (nothing in between to swap documents).
pub fn is_local(seeder: &str) -> bool {
    let host = seeder
        .split("://")
        .nth(1)
        .unwrap_or(seeder)
        .split('/')
        .next()
        .unwrap_or_default();
    let host = protocol::host_of(host);
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The seeder's answer to a GET of one of its documents, not yet judged.
struct Answer {
    url: String,
    path: String,
    status: reqwest::StatusCode,
    /// The document's signature header, if any.
    signature: Option<String>,
    bytes: Vec<u8>,
}

/// GET `path` from the seeder.
async fn ask(seeder: &str, path: &str) -> Result<Answer> {
    let url = format!("{}{path}", seeder.trim_end_matches('/'));
    let resp = client()
        .get(&url)
        .send()
        .await
        .map_err(|e| Error::seeder(&url, e))?;
    let status = resp.status();
    let signature = resp
        .headers()
        .get(protocol::data::seal::SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| Error::seeder(&url, e))?
        .to_vec();
    Ok(Answer {
        url,
        path: path.to_owned(),
        status,
        signature,
        bytes,
    })
}

/// GET a JSON document of type `T` from the seeder; with `signer` (its public key), only if
/// the seeder signed it.
async fn get_document<T: DeserializeOwned>(
    seeder: &str,
    path: &str,
    signer: Option<&str>,
) -> Result<T> {
    document(ask(seeder, path).await?, signer)
}

/// The document in `answer`: a refusal is an error naming the seeder's message; with `signer`
/// (its public key), only a document the seeder signed.
fn document<T: DeserializeOwned>(answer: Answer, signer: Option<&str>) -> Result<T> {
    let Answer {
        url,
        path,
        status,
        signature,
        bytes,
    } = answer;
    let body: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::seeder(&url, format!("not JSON: {e}")))?;
    if !status.is_success() {
        /// The seeder's error body: `{"error": {"message"}}`.
        #[derive(serde::Deserialize)]
        struct Refusal {
            error: Message,
        }
        #[derive(serde::Deserialize)]
        struct Message {
            message: String,
        }
        let said = serde_json::from_value::<Refusal>(body)
            .map_or_else(|_| "no error message".to_owned(), |r| r.error.message);
        return Err(Error::seeder(&url, format!("{status}: {said}")));
    }
    if let Some(key) = signer {
        let signed = |s: &str| protocol::data::seal::document_signed(key, &path, &bytes, s);
        if !signature.is_some_and(|s| signed(&s)) {
            return Err(Error::Unsigned { url });
        }
    }
    serde_json::from_value(body)
        .map_err(|e| Error::seeder(&url, format!("unexpected document: {e}")))
}

/// `length` bytes at `offset` of a shard, from the seeder's web seed (an HTTP range).
pub async fn fetch_range(spec: &ShardSpec, offset: u64, length: u32) -> Result<Vec<u8>> {
    let url = spec
        .web_seed
        .as_deref()
        .ok_or_else(|| Error::seeder(&spec.file, "the seeder has no web seed for it"))?;
    let end = offset + u64::from(length.max(1)) - 1;
    let resp = client()
        .get(url)
        .header(reqwest::header::RANGE, format!("bytes={offset}-{end}"))
        .send()
        .await
        .map_err(|e| Error::seeder(url, e))?;
    if resp.status() != reqwest::StatusCode::PARTIAL_CONTENT {
        return Err(Error::seeder(
            url,
            format!("answered {} to a range", resp.status()),
        ));
    }
    let bytes = resp.bytes().await.map_err(|e| Error::seeder(url, e))?;
    if bytes.len() != length as usize {
        return Err(Error::seeder(
            url,
            format!("{} bytes for a range of {length}", bytes.len()),
        ));
    }
    Ok(bytes.to_vec())
}

/// Read the split from the seeder's `/manifest` and `/files` (signed with `signer`, when
/// given).
pub async fn fetch_split(seeder: &str, signer: Option<&str>) -> Result<SplitInfo> {
    let manifest: Manifest = get_document(seeder, "/manifest", signer).await?;
    let files: FileList = get_document(seeder, "/files", signer).await?;
    let health: Option<Health> = get_json(seeder, "/healthz").await.ok();
    // Each file the manifest names, as the seeder lists it, with the same sha256.
    let listed = |name: &str, sha256: &str| {
        let listed =
            files.files.iter().find(|f| f.name == name).ok_or_else(|| {
                Error::seeder(seeder, format!("the seeder does not serve {name}"))
            })?;
        if listed.sha256 != sha256 {
            return Err(Error::seeder(
                seeder,
                format!("{name} does not match its manifest (sha256 differs)"),
            ));
        }
        Ok(listed)
    };
    let mut shards = Vec::new();
    for (k, s) in manifest.shards.iter().enumerate() {
        let listed = listed(&s.file, &s.sha256)?;
        shards.push(ShardSpec {
            shard_id: k as u32,
            file: s.file.clone(),
            size: s.size,
            sha256: s.sha256.clone(),
            info_hash: listed.info_hash.clone(),
            magnet: listed.magnet.clone(),
            torrent_url: listed.torrent_url.clone(),
            web_seed: listed.web_seed.clone(),
        });
    }
    if shards.is_empty() {
        return Err(Error::seeder(seeder, "the manifest lists no shards"));
    }
    let vocab = match &manifest.vocab {
        Some(v) => Some(RemoteFile {
            file: v.file.clone(),
            size: v.size,
            sha256: v.sha256.clone(),
            web_seed: listed(&v.file, &v.sha256)?.web_seed.clone(),
        }),
        None => None,
    };
    Ok(SplitInfo {
        model_id: manifest.source.id(),
        model_name: manifest.source.name,
        model_sha256: manifest
            .source
            .sha256
            .unwrap_or_else(|| manifest.split_id.clone()),
        split_id: manifest.split_id,
        shards,
        seeder_peer: health.map(|h| h.peer),
        vocab,
    })
}

/// The seeder's relay (`/relay`, signed with `signer` when given), or None when it runs none.
pub async fn fetch_relay(
    seeder: &str,
    signer: Option<&str>,
) -> Result<Option<protocol::RelayInfo>> {
    let answer = ask(seeder, "/relay").await?;
    if answer.status == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    document(answer, signer).map(Some)
}

/// Fetch the split, retrying with backoff (bounded: about two minutes) while the seeder starts.
pub async fn fetch_split_with_retry(seeder: &str, signer: Option<&str>) -> Result<SplitInfo> {
    let mut delay = Duration::from_millis(250);
    let mut last = None;
    for _ in 0..20 {
        match fetch_split(seeder, signer).await {
            Ok(s) => return Ok(s),
            Err(e @ Error::Unsigned { .. }) => return Err(e),
            Err(e) => {
                tracing::warn!("seeder not ready: {e}");
                last = Some(e);
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(8));
    }
    let last = last.expect("at least one attempt");
    Err(Error::seeder(
        seeder,
        format!("never answered with a manifest: {last}"),
    ))
}
