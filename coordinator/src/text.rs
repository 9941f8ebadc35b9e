//! Tokens and text, in one place: the model's vocabulary and chat template (loaded
//! vocab-only, no weights, from the split's vocabulary file as fetched from the seeder's web
//! seed and checked by sha256), tokenizing, detokenizing, stop strings and what a generation reports. The
//! pipeline only ever sees token ids.

use std::path::{Path, PathBuf};

use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use protocol::data::Sampling;

use crate::seeder_client::RemoteFile;
use crate::{Error, Result};

/// Why the vocabulary or chat template cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum VocabError {
    #[error("the seeder lists no web seed for {0}")]
    NoWebSeed(String),
    #[error("{}: {source}", path.display())]
    Load {
        path: PathBuf,
        #[source]
        source: llama_cpp_2::LlamaModelLoadError,
    },
    #[error("the model has no chat template: {0}")]
    NoTemplate(#[source] llama_cpp_2::ChatTemplateError),
    #[error("a chat message cannot be used: {0}")]
    Message(#[source] llama_cpp_2::NewLlamaChatMessageError),
    #[error("the chat template failed: {0}")]
    Template(#[source] llama_cpp_2::ApplyChatTemplateError),
}

/// The model's vocabulary and chat template.
pub struct Vocab {
    model: LlamaModel,
    /// The model id in the OpenAI API.
    pub model_id: String,
    /// The model's own name (`general.name`), for people.
    pub model_name: String,
}

/// A file of the split from the seeder's web seed, kept in `cache_dir` (fetched unless
/// already there with the manifest's sha256): the vocabulary file, and the shards the checks
/// compute on the coordinator to settle a dispute between two holders.
pub async fn fetch_file(file: &RemoteFile, cache_dir: &Path) -> Result<std::path::PathBuf> {
    std::fs::create_dir_all(cache_dir)
        .map_err(|e| daemon::IoError::new(format!("cache dir {}", cache_dir.display()), e))?;
    let path = cache_dir.join(&file.file);
    let ok = |p: &Path| torrents::hashing::sha256_file(p).is_ok_and(|h| h == file.sha256);
    if !ok(&path) {
        let url = file
            .web_seed
            .as_deref()
            .ok_or_else(|| VocabError::NoWebSeed(file.file.clone()))?;
        tracing::info!("fetching {url}");
        // A shard can take minutes to come, but never a minute without a byte.
        let client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .read_timeout(std::time::Duration::from_secs(60))
            .build()
            .map_err(|e| Error::seeder(url, e))?;
        let response = client
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| Error::seeder(url, e))?;
        let bytes = response.bytes().await.map_err(|e| Error::seeder(url, e))?;
        torrents::manifest::write_atomically(&path, &bytes)?;
        if !ok(&path) {
            return Err(Error::seeder(url, "does not match the manifest's sha256"));
        }
    }
    Ok(path)
}

impl Vocab {
    /// Fetch `file` (the split's vocabulary file, or shard 0 of a split made before there was
    /// one) from its web seed into `cache_dir` (unless already there with the right sha256)
    /// and load its vocabulary.
    pub async fn fetch(
        file: &RemoteFile,
        cache_dir: &Path,
        model_id: String,
        model_name: String,
    ) -> Result<Vocab> {
        let path = fetch_file(file, cache_dir).await?;
        let mut vocab = Self::load(&path, model_id)?;
        vocab.model_name = model_name;
        Ok(vocab)
    }

    /// Load the vocabulary of a GGUF file.
    pub fn load(path: &Path, model_id: String) -> Result<Vocab> {
        let params = LlamaModelParams::default().with_vocab_only(true);
        let model =
            LlamaModel::load_from_file(llm::backend()?, path, &params).map_err(|source| {
                VocabError::Load {
                    path: path.to_owned(),
                    source,
                }
            })?;
        Ok(Vocab {
            model,
            model_name: model_id.clone(),
            model_id,
        })
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

    /// Token ids are `0..n_vocab`; llama.cpp must never be asked about another (it aborts).
    pub fn n_vocab(&self) -> i32 {
        self.model.n_vocab()
    }

    /// Whether `id` names a token of this vocabulary.
    pub fn is_token(&self, id: i32) -> bool {
        (0..self.n_vocab()).contains(&id)
    }

    pub fn is_end(&self, id: i32) -> bool {
        self.model.vocab().is_eog(LlamaToken(id))
    }

    /// The chat messages as a prompt, through the model's own chat template.
    pub fn chat_prompt(&self, messages: &[(String, String)]) -> Result<String> {
        let template = self
            .model
            .chat_template(None)
            .map_err(VocabError::NoTemplate)?;
        let chat = messages
            .iter()
            .map(|(role, content)| LlamaChatMessage::new(role.clone(), content.clone()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(VocabError::Message)?;
        Ok(self
            .model
            .apply_chat_template(&template, &chat, true)
            .map_err(VocabError::Template)?)
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
        /// Prompt tokens whose KV the stages still held from an earlier request.
        cached_tokens: usize,
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

/// The text side of one generation: tokens in, text out, with stop strings and partial
/// characters held back until they are settled. It survives a replay: text the client already
/// has (`sent`, from an attempt that failed part-way) is not sent again, since the same request
/// gives the same tokens (greedy, or the same seed).
pub struct Generation {
    generated: Vec<i32>,
    sent: String,
}

/// What one more token did.
pub struct Progress {
    /// New text for the client.
    pub text: Option<String>,
    /// Set when the generation is over.
    pub finish: Option<Finish>,
}

impl Generation {
    pub fn new() -> Generation {
        Generation {
            generated: Vec::new(),
            sent: String::new(),
        }
    }

    /// Tokens generated so far (in this attempt).
    pub fn len(&self) -> usize {
        self.generated.len()
    }

    pub fn is_empty(&self) -> bool {
        self.generated.is_empty()
    }

    /// Start again from the prompt (a replay through another route), keeping what was sent.
    pub fn restart(&mut self) {
        self.generated.clear();
    }

    /// Take the token the pipeline chose.
    pub fn push(&mut self, vocab: &Vocab, req: &Request, token: i32) -> Progress {
        if vocab.is_end(token) {
            return self.finish(vocab, Finish::Stop);
        }
        self.generated.push(token);
        let text = vocab.detokenize(&self.generated);
        if let Some(cut) = req
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            let mut out = None;
            if cut > self.sent.len() && text.is_char_boundary(cut) {
                out = Some(text[self.sent.len()..cut].to_owned());
                self.sent = text[..cut].to_owned();
            }
            return Progress {
                text: out,
                finish: Some(Finish::Stop),
            };
        }
        if self.generated.len() >= req.max_tokens {
            return self.finish(vocab, Finish::Length);
        }
        // Hold back text that might still turn into a stop string or is a partial character.
        let hold = req
            .stop
            .iter()
            .map(|s| s.len().saturating_sub(1))
            .max()
            .unwrap_or(0);
        let mut upto = text.len().saturating_sub(hold);
        while upto > self.sent.len() && !text.is_char_boundary(upto) {
            upto -= 1;
        }
        let mut out = None;
        if upto > self.sent.len()
            && text.starts_with(self.sent.as_str())
            && !text[..upto].ends_with('\u{FFFD}')
        {
            out = Some(text[self.sent.len()..upto].to_owned());
            self.sent = text[..upto].to_owned();
        }
        Progress {
            text: out,
            finish: None,
        }
    }

    /// The end: the text not sent yet (held back for a possible stop string or a partial
    /// character).
    fn finish(&mut self, vocab: &Vocab, finish: Finish) -> Progress {
        let text = vocab.detokenize(&self.generated);
        let mut out = None;
        if text.len() > self.sent.len() && text.starts_with(self.sent.as_str()) {
            out = Some(text[self.sent.len()..].to_owned());
            self.sent = text;
        }
        Progress {
            text: out,
            finish: Some(finish),
        }
    }
}

impl Default for Generation {
    fn default() -> Self {
        Generation::new()
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
