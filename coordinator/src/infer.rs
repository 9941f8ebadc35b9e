//! Inference through the pipeline of stage nodes.
//!
//! Tokens and text live here, in one place: the coordinator loads the vocabulary (vocab-only,
//! no weights) of shard 0, which it fetches from the seeder's web seed and checks by sha256, and
//! does the chat template, tokenizing, detokenizing, stop strings and usage counts. A request
//! goes to stage 0 over the data channel as token ids; each stage passes hidden states on; the
//! last samples the next token, which comes back up the chain. Requests run one at a time
//! (a queue): every stage has one KV cache, for the current session.

use std::path::{Path, PathBuf};

use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use protocol::data::io::Connection;
use protocol::data::{Frame, Hello, Payload, Sampling};
use tokio::sync::mpsc;

use crate::swarm::{RouteHop, ShardSpec};
use crate::{Error, Result};

/// The model's vocabulary and chat template.
pub struct Vocab {
    model: LlamaModel,
    /// The model id in the OpenAI API.
    pub model_id: String,
}

impl Vocab {
    /// Fetch shard 0 from its web seed into `cache_dir` (unless already there with the right
    /// sha256) and load its vocabulary.
    pub async fn fetch(shard: &ShardSpec, cache_dir: &Path, model_id: String) -> Result<Vocab> {
        std::fs::create_dir_all(cache_dir)
            .map_err(|e| daemon::IoError::new(format!("cache dir {}", cache_dir.display()), e))?;
        let path = cache_dir.join(&shard.file);
        let ok = |p: &Path| torrents::hashing::sha256_file(p).is_ok_and(|h| h == shard.sha256);
        if !ok(&path) {
            let url = shard.web_seed.as_deref().ok_or_else(|| {
                Error::Vocab(format!("the seeder lists no web seed for {}", shard.file))
            })?;
            tracing::info!("fetching the vocabulary from {url}");
            let response = reqwest::get(url)
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| Error::seeder(url, e))?;
            let bytes = response.bytes().await.map_err(|e| Error::seeder(url, e))?;
            torrents::manifest::write_atomically(&path, &bytes)
                .map_err(|e| Error::Vocab(e.to_string()))?;
            if !ok(&path) {
                return Err(Error::seeder(url, "does not match the manifest's sha256"));
            }
        }
        Self::load(&path, model_id)
    }

    /// Load the vocabulary of a GGUF file.
    pub fn load(path: &Path, model_id: String) -> Result<Vocab> {
        let params = LlamaModelParams::default().with_vocab_only(true);
        let model = LlamaModel::load_from_file(llm::backend()?, path, &params)
            .map_err(|e| Error::Vocab(format!("{}: {e}", path.display())))?;
        Ok(Vocab { model, model_id })
    }

    /// Token ids of a prompt (special tokens such as `<|im_start|>` are parsed).
    pub fn tokenize(&self, text: &str) -> Vec<i32> {
        let vocab = self.model.vocab();
        vocab
            .tokenize(text.as_bytes(), vocab.should_add_bos(), true)
            .into_iter()
            .map(|t| t.0)
            .collect()
    }

    pub fn detokenize(&self, ids: &[i32]) -> String {
        let tokens: Vec<LlamaToken> = ids.iter().map(|t| LlamaToken(*t)).collect();
        String::from_utf8_lossy(&self.model.vocab().detokenize(&tokens, false, false)).into_owned()
    }

    /// The context every stage keeps: the model's trained length, capped.
    pub fn context(&self) -> u32 {
        protocol::data::stage_context(self.model.n_ctx_train())
    }

    pub fn is_end(&self, id: i32) -> bool {
        self.model.vocab().is_eog(LlamaToken(id))
    }

    /// The chat messages as a prompt, through the model's own chat template.
    pub fn chat_prompt(&self, messages: &[(String, String)]) -> Result<String> {
        let vocab_error = |e: &dyn std::fmt::Display| Error::Vocab(e.to_string());
        let template = self
            .model
            .chat_template(None)
            .map_err(|e| Error::Vocab(format!("the model has no chat template: {e}")))?;
        let chat = messages
            .iter()
            .map(|(role, content)| LlamaChatMessage::new(role.clone(), content.clone()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| vocab_error(&e))?;
        self.model
            .apply_chat_template(&template, &chat, true)
            .map_err(|e| vocab_error(&e))
    }
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What a generation reports as it goes.
#[derive(Debug)]
pub enum Event {
    /// New text.
    Text(String),
    Done {
        finish: Finish,
        completion_tokens: usize,
    },
    Failed(String),
}

/// A request to the pipeline.
pub struct Request {
    pub prompt: Vec<i32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub stop: Vec<String>,
}

/// A data-channel connection to stage 0.
async fn connect(route: &[RouteHop], model_sha256: &str, split_id: &str) -> Result<Connection> {
    let first = route
        .first()
        .ok_or_else(|| Error::Pipeline("empty route".into()))?;
    let hello = Hello {
        model_sha256: model_sha256.into(),
        split_id: split_id.into(),
        stage: 0,
    };
    Ok(Connection::open(&first.data_addr, hello).await?)
}

/// Send a frame into the pipeline and take its answer.
async fn call(conn: &mut Connection, frame: &Frame) -> Result<Frame> {
    conn.send(frame).await?;
    Ok(conn.receive().await?)
}

/// Why an attempt ended without a completion.
pub enum AttemptError {
    /// The client went away: stop.
    ClientGone,
    /// The pipeline failed (a stage died or refused): another route may finish the request.
    Pipeline(Error),
}

/// One attempt at `req` through `route`. Text the client already has (`sent`, from an earlier
/// attempt that failed part-way) is not sent again: the same request gives the same tokens
/// (greedy, or the same seed), so a replay continues where the failed attempt stopped.
pub async fn attempt(
    vocab: &Vocab,
    route: &[RouteHop],
    ids: (&str, &str),
    req: &Request,
    sent: &mut String,
    events: &mpsc::Sender<Event>,
) -> Result<(Finish, usize), AttemptError> {
    let mut conn = connect(route, ids.0, ids.1)
        .await
        .map_err(AttemptError::Pipeline)?;
    let session = random_u64();
    let result = run(vocab, &mut conn, session, req, sent, events).await;
    // Free the session on every stage, whatever happened.
    let _ = call(&mut conn, &Frame::End { session }).await;
    result
}

async fn run(
    vocab: &Vocab,
    conn: &mut Connection,
    session: u64,
    req: &Request,
    sent: &mut String,
    events: &mpsc::Sender<Event>,
) -> Result<(Finish, usize), AttemptError> {
    let pipeline = AttemptError::Pipeline;
    let mut generated: Vec<i32> = Vec::new();
    let mut input = Payload::Tokens(req.prompt.clone());
    let mut pos = 0u32;
    let n_input = |p: &Payload| match p {
        Payload::Tokens(t) => t.len() as u32,
        Payload::Hidden { .. } => 0,
    };
    for _ in 0..req.max_tokens {
        let step = n_input(&input);
        let frame = Frame::Forward {
            session,
            pos0: pos,
            sampling: req.sampling,
            payload: input,
        };
        let token = match call(conn, &frame).await.map_err(pipeline)? {
            Frame::Token { token, .. } => token,
            Frame::Error(e) => return Err(pipeline(Error::Pipeline(format!("it failed: {e}")))),
            other => {
                return Err(pipeline(Error::Pipeline(format!(
                    "unexpected answer {other:?}"
                ))))
            }
        };
        pos += step;
        if vocab.is_end(token) {
            flush(vocab, &generated, sent, events).await;
            return Ok((Finish::Stop, generated.len()));
        }
        generated.push(token);
        let text = vocab.detokenize(&generated);
        if let Some(cut) = req
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            if cut > sent.len() && text.is_char_boundary(cut) {
                let _ = events
                    .send(Event::Text(text[sent.len()..cut].to_owned()))
                    .await;
                *sent = text[..cut].to_owned();
            }
            return Ok((Finish::Stop, generated.len()));
        }
        // Hold back text that might still turn into a stop string or is a partial character.
        let hold = req
            .stop
            .iter()
            .map(|s| s.len().saturating_sub(1))
            .max()
            .unwrap_or(0);
        let mut upto = text.len().saturating_sub(hold);
        while upto > sent.len() && !text.is_char_boundary(upto) {
            upto -= 1;
        }
        if upto > sent.len()
            && text.starts_with(sent.as_str())
            && !text[..upto].ends_with('\u{FFFD}')
        {
            if events
                .send(Event::Text(text[sent.len()..upto].to_owned()))
                .await
                .is_err()
            {
                return Err(AttemptError::ClientGone);
            }
            *sent = text[..upto].to_owned();
        }
        input = Payload::Tokens(vec![token]);
    }
    flush(vocab, &generated, sent, events).await;
    Ok((Finish::Length, generated.len()))
}

/// Send the text not sent yet (held back for a possible stop string or a partial character)
/// once generation has ended.
async fn flush(vocab: &Vocab, generated: &[i32], sent: &mut String, events: &mpsc::Sender<Event>) {
    let text = vocab.detokenize(generated);
    if text.len() > sent.len() && text.starts_with(sent.as_str()) {
        let _ = events
            .send(Event::Text(text[sent.len()..].to_owned()))
            .await;
        *sent = text;
    }
}

/// A random u64 (session ids, default seeds).
pub fn random_u64() -> u64 {
    let id = uuid::Uuid::new_v4();
    u64::from_le_bytes(id.as_bytes()[..8].try_into().expect("16 bytes"))
}

/// Where the coordinator caches shard 0 by default.
pub fn default_cache_dir() -> PathBuf {
    std::env::temp_dir().join("shardswarm-coordinator")
}
