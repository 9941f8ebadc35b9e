//! The OpenAI API's bodies, typed: what clients send (fields we do not use are ignored, as
//! OpenAI clients send many) and what we answer, in OpenAI's shapes.

use serde::{Deserialize, Serialize};

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    #[serde(flatten)]
    pub options: Options,
}

/// A completion's prompt: one string, or a list holding one.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    List(Vec<String>),
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub options: Options,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// What both endpoints take besides the prompt. `model` may name anything (as llama-server
/// allows): OpenAI clients are set up with some model name, and a swarm serves one model.
#[derive(Debug, Default, Deserialize)]
pub struct Options {
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    /// The newer name of `max_tokens`.
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub stream: Option<bool>,
}

/// Stop strings: one, or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    List(Vec<String>),
}

/// `GET /v1/models`.
#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<Model>,
}

#[derive(Debug, Serialize)]
pub struct Model {
    pub id: String,
    pub name: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

/// A whole answer (`object`: `text_completion` or `chat.completion`).
#[derive(Debug, Serialize)]
pub struct Completion<C> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A `text_completion` choice (whole, or a streamed chunk's).
#[derive(Debug, Serialize)]
pub struct TextChoice {
    pub index: u32,
    pub text: String,
    /// Always null: log-probabilities are not offered.
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
}

/// A `chat.completion` choice.
#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatMessage,
    pub finish_reason: &'static str,
}

/// A `chat.completion.chunk` choice: what the message gained.
#[derive(Debug, Serialize)]
pub struct ChatDeltaChoice {
    pub index: u32,
    pub delta: Delta,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV the stages still held from an earlier request.
    pub cached_tokens: usize,
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "code"}}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The HTTP status, or (for a refused key) a name such as `invalid_api_key`.
    pub code: ErrorCode,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum ErrorCode {
    Status(u16),
    Name(&'static str),
}
