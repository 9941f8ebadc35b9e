//! The OpenAI-compatible API: `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions` (with `stream: true` as server-sent events ending in
//! `data: [DONE]`). 400 for bad requests, 503 with a JSON error until the swarm is ready,
//! 429 when too many requests wait. The bodies' shapes are in [`wire`].

pub mod wire;

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use protocol::data::Sampling;
use tokio::sync::mpsc;

use crate::engine::Refused;
use crate::hub::{Hub, Inference};
use crate::text::{Event, Request};
use wire::{
    ChatChoice, ChatDeltaChoice, ChatMessage, ChatRequest, Completion, CompletionRequest, Delta,
    ErrorBody, ErrorCode, ErrorDetail, Model, ModelList, Options, Prompt, PromptTokensDetails,
    Role, Stop, TextChoice, Usage,
};

/// An API error: its status, OpenAI's error type, and the message.
#[derive(Debug)]
pub struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.2,
                kind: self.1,
                code: ErrorCode::Status(self.0.as_u16()),
            },
        };
        let mut response = (self.0, Json(body)).into_response();
        if self.0 == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, 1.into());
        }
        response
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        message.into(),
    )
}

fn unavailable(kind: &'static str, message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, kind, message.into())
}

impl From<Refused> for ApiError {
    fn from(r: Refused) -> ApiError {
        match r {
            Refused::Full { .. } => ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                r.to_string(),
            ),
            Refused::NotReady => unavailable("unavailable", r.to_string()),
            Refused::Stopped => unavailable("pipeline_error", r.to_string()),
        }
    }
}

/// A body that is not the expected JSON: 400, naming what is wrong.
impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        invalid(r.body_text())
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The vocabulary and engine, or 503 with why there are none.
fn ready(hub: &Hub) -> Result<(&Arc<crate::text::Vocab>, &crate::engine::Engine), ApiError> {
    match &hub.inference {
        Inference::Ready { vocab, engine } => Ok((vocab, engine)),
        Inference::Off(why) => Err(unavailable(
            "unavailable",
            format!("the model's vocabulary is not loaded: {why}"),
        )),
    }
}

pub async fn models(State(hub): State<Arc<Hub>>) -> Result<Json<ModelList>, ApiError> {
    let (vocab, _) = ready(&hub)?;
    Ok(Json(ModelList {
        object: "list",
        data: vec![Model {
            id: vocab.model_id.clone(),
            name: vocab.model_name.clone(),
            object: "model",
            created: 0,
            owned_by: "shardswarm",
        }],
    }))
}

/// The request's settings, checked.
struct Settings {
    max_tokens: usize,
    sampling: Sampling,
    stop: Vec<String>,
    stream: bool,
}

fn settings(o: Options) -> Result<Settings, ApiError> {
    let max_tokens = o.max_tokens.or(o.max_completion_tokens).unwrap_or(16);
    let number = |key: &str, value: Option<f64>, default: f64, max: f64| match value {
        None => Ok(default),
        Some(x) if (0.0..=max).contains(&x) => Ok(x),
        Some(_) => Err(invalid(format!("{key} must be a number from 0 to {max}"))),
    };
    let temperature = number("temperature", o.temperature, 1.0, 2.0)?;
    let top_p = number("top_p", o.top_p, 1.0, 1.0)?;
    let stop = match o.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::List(list)) if list.len() <= 4 => list,
        Some(Stop::List(_)) => {
            return Err(invalid(
                "stop must be a string or a list of at most 4 strings",
            ))
        }
    };
    Ok(Settings {
        max_tokens: usize::try_from(max_tokens).unwrap_or(usize::MAX),
        sampling: Sampling {
            temperature: temperature as f32,
            top_p: top_p as f32,
            seed: o.seed.unwrap_or_else(crate::text::random_u64),
        },
        stop,
        stream: o.stream.unwrap_or(false),
    })
}

pub async fn completions(
    State(hub): State<Arc<Hub>>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let prompt = match body.prompt {
        Prompt::One(s) => s,
        Prompt::List(mut list) if list.len() == 1 => list.remove(0),
        Prompt::List(_) => return Err(invalid("prompt must be a string")),
    };
    serve(hub, body.options, prompt, false).await
}

pub async fn chat_completions(
    State(hub): State<Arc<Hub>>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    if body.messages.is_empty() {
        return Err(invalid("messages must be a non-empty list"));
    }
    let (vocab, _) = ready(&hub)?;
    let chat: Vec<(String, String)> = body
        .messages
        .iter()
        .map(|m| (m.role.as_str().to_owned(), m.content.clone()))
        .collect();
    let prompt = vocab
        .chat_prompt(&chat)
        .map_err(|e| invalid(format!("chat template: {e:#}")))?;
    serve(hub, body.options, prompt, true).await
}

async fn serve(
    hub: Arc<Hub>,
    options: Options,
    prompt: String,
    chat: bool,
) -> Result<Response, ApiError> {
    let (vocab, engine) = ready(&hub)?;
    let s = settings(options)?;
    let tokens = vocab.tokenize(&prompt);
    if tokens.is_empty() {
        return Err(invalid("the prompt has no tokens"));
    }
    let context = vocab.context() as usize;
    if tokens.len().saturating_add(s.max_tokens) > context {
        return Err(invalid(format!(
            "{} prompt tokens + max_tokens {} is over the context of {context}",
            tokens.len(),
            s.max_tokens
        )));
    }
    let prompt_tokens = tokens.len();
    let rx = engine.submit(Request {
        prompt: tokens,
        max_tokens: s.max_tokens,
        sampling: s.sampling,
        stop: s.stop,
    })?;
    let answer = Answer {
        id: format!(
            "{}-{}",
            if chat { "chatcmpl" } else { "cmpl" },
            uuid::Uuid::new_v4().simple()
        ),
        model: vocab.model_id.clone(),
        created: now(),
        chat,
    };
    if s.stream {
        return Ok(Sse::new(answer.stream(rx)).into_response());
    }
    answer.whole(rx, prompt_tokens).await
}

/// What every answer to one request carries.
struct Answer {
    id: String,
    model: String,
    created: u64,
    chat: bool,
}

impl Answer {
    fn completion<C>(
        &self,
        object: &'static str,
        choice: C,
        usage: Option<Usage>,
    ) -> Completion<C> {
        Completion {
            id: self.id.clone(),
            object,
            created: self.created,
            model: self.model.clone(),
            choices: vec![choice],
            usage,
        }
    }

    /// The whole answer once the generation is done.
    async fn whole(
        self,
        mut rx: mpsc::UnboundedReceiver<Event>,
        prompt_tokens: usize,
    ) -> Result<Response, ApiError> {
        let mut text = String::new();
        let (finish, completion_tokens, cached_tokens) = loop {
            match rx.recv().await {
                Some(Event::Text(t)) => text.push_str(&t),
                Some(Event::Done {
                    finish,
                    completion_tokens,
                    cached_tokens,
                }) => break (finish, completion_tokens, cached_tokens),
                Some(Event::Failed(e)) => return Err(unavailable("pipeline_error", e)),
                None => return Err(Refused::Stopped.into()),
            }
        };
        let usage = Some(Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        });
        let finish_reason = finish.as_str();
        Ok(if self.chat {
            let message = ChatMessage {
                role: Role::Assistant,
                content: text,
            };
            let choice = ChatChoice {
                index: 0,
                message,
                finish_reason,
            };
            Json(self.completion("chat.completion", choice, usage)).into_response()
        } else {
            let choice = TextChoice {
                index: 0,
                text,
                logprobs: None,
                finish_reason: Some(finish_reason),
            };
            Json(self.completion("text_completion", choice, usage)).into_response()
        })
    }

    /// One streamed chunk: new text, or the end (`finish`); the first chat chunk names the
    /// role.
    fn chunk(&self, text: Option<String>, finish: Option<&'static str>, first: bool) -> String {
        let json = if self.chat {
            let delta = Delta {
                role: first.then_some(Role::Assistant),
                content: text,
            };
            let choice = ChatDeltaChoice {
                index: 0,
                delta,
                finish_reason: finish,
            };
            serde_json::to_string(&self.completion("chat.completion.chunk", choice, None))
        } else {
            let choice = TextChoice {
                index: 0,
                text: text.unwrap_or_default(),
                logprobs: None,
                finish_reason: finish,
            };
            serde_json::to_string(&self.completion("text_completion", choice, None))
        };
        json.unwrap_or_default()
    }

    /// Server-sent events from generation events: a chunk per piece of text, a last chunk
    /// with the finish reason, then `[DONE]`.
    fn stream(
        self,
        mut rx: mpsc::UnboundedReceiver<Event>,
    ) -> impl futures::Stream<Item = Result<SseEvent, Infallible>> {
        let mut first = true;
        let mut done = false;
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).flat_map(move |ev| {
            let items: Vec<SseEvent> = match ev {
                _ if done => Vec::new(),
                Event::Text(t) => {
                    let data = self.chunk(Some(t), None, first);
                    first = false;
                    vec![SseEvent::default().data(data)]
                }
                Event::Done { finish, .. } => {
                    done = true;
                    let data = self.chunk(None, Some(finish.as_str()), first);
                    vec![
                        SseEvent::default().data(data),
                        SseEvent::default().data("[DONE]"),
                    ]
                }
                Event::Failed(e) => {
                    done = true;
                    let error = ErrorBody {
                        error: ErrorDetail {
                            message: e,
                            kind: "pipeline_error",
                            code: ErrorCode::Status(503),
                        },
                    };
                    let data = serde_json::to_string(&error).unwrap_or_default();
                    vec![SseEvent::default().data(data)]
                }
            };
            futures::stream::iter(items.into_iter().map(Ok))
        })
    }
}
