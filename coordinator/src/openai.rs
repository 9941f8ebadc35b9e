//! The OpenAI-compatible API: `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions` (with `stream: true` as server-sent events ending in
//! `data: [DONE]`). 503 with a JSON error until the swarm is ready; 400 for bad requests.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use protocol::data::Sampling;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::engine::Job;
use crate::hub::Hub;
use crate::infer::{Event, Request};

/// An API error in OpenAI's shape: `{"error": {"message", "type", "code"}}`.
struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.2, "type": self.1, "code": self.0.as_u16()}});
        (self.0, Json(body)).into_response()
    }
}

fn invalid(message: &str) -> ApiError {
    ApiError(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        message.to_owned(),
    )
}

fn error(status: StatusCode, kind: &'static str, message: &str) -> Response {
    ApiError(status, kind, message.to_owned()).into_response()
}

fn bad(message: &str) -> Response {
    invalid(message).into_response()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub async fn models(State(hub): State<Arc<Hub>>) -> Response {
    match &hub.vocab {
        Some(v) => Json(json!({"object": "list", "data": [{"id": v.model_id, "name": v.model_name, "object": "model", "created": 0, "owned_by": "shardswarm"}]}))
            .into_response(),
        None => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the model's vocabulary is not loaded"),
    }
}

/// The parts of a request both endpoints share.
struct Common {
    max_tokens: usize,
    sampling: Sampling,
    stop: Vec<String>,
    stream: bool,
}

/// `model` may name anything (as llama-server allows): OpenAI clients are set up with some
/// model name, and a swarm serves one model. Answers carry the swarm's own id.
fn common(body: &Value) -> Result<Common, ApiError> {
    if body
        .get("model")
        .is_some_and(|m| !m.is_string() && !m.is_null())
    {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "`model` must be a string".into(),
        ));
    }
    let max_tokens = match body
        .get("max_tokens")
        .or_else(|| body.get("max_completion_tokens"))
    {
        None | Some(Value::Null) => 16,
        Some(v) => match v.as_i64() {
            Some(n) if n >= 0 => n as usize,
            _ => return Err(invalid("max_tokens must be a non-negative integer")),
        },
    };
    let number = |key: &str, default: f64, max: f64| -> Result<f64, ApiError> {
        match body.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| (0.0..=max).contains(x))
                .ok_or_else(|| invalid(&format!("{key} must be a number from 0 to {max}"))),
        }
    };
    let temperature = number("temperature", 1.0, 2.0)?;
    let top_p = number("top_p", 1.0, 1.0)?;
    let seed = match body.get("seed") {
        None | Some(Value::Null) => crate::infer::random_u64(),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| invalid("seed must be a non-negative integer"))?,
    };
    let stop = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(Value::is_string) => a
            .iter()
            .map(|s| s.as_str().unwrap_or_default().to_owned())
            .collect(),
        _ => {
            return Err(invalid(
                "stop must be a string or a list of at most 4 strings",
            ))
        }
    };
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    Ok(Common {
        max_tokens,
        sampling: Sampling {
            temperature: temperature as f32,
            top_p: top_p as f32,
            seed,
        },
        stop,
        stream,
    })
}

pub async fn completions(
    State(hub): State<Arc<Hub>>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(body)) = body else {
        return bad("the body is not a JSON object");
    };
    let prompt = match body.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_owned()
        }
        _ => return bad("prompt must be a string"),
    };
    serve(hub, body, prompt, false).await
}

pub async fn chat_completions(
    State(hub): State<Arc<Hub>>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(body)) = body else {
        return bad("the body is not a JSON object");
    };
    let Some(messages) = body
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
    else {
        return bad("messages must be a non-empty list");
    };
    let mut chat = Vec::new();
    for m in messages {
        match (
            m.get("role").and_then(Value::as_str),
            m.get("content").and_then(Value::as_str),
        ) {
            (Some(r), Some(c)) if ["system", "user", "assistant"].contains(&r) => {
                chat.push((r.to_owned(), c.to_owned()))
            }
            _ => {
                return bad(
                    "each message needs a role (system, user, assistant) and string content",
                )
            }
        }
    }
    let Some(vocab) = hub.vocab.clone() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the model's vocabulary is not loaded",
        );
    };
    match vocab.chat_prompt(&chat) {
        Ok(prompt) => serve(hub, body, prompt, true).await,
        Err(e) => bad(&format!("chat template: {e:#}")),
    }
}

async fn serve(hub: Arc<Hub>, body: Value, prompt: String, chat: bool) -> Response {
    let Some(vocab) = hub.vocab.clone() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the model's vocabulary is not loaded",
        );
    };
    let c = match common(&body) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let tokens = vocab.tokenize(&prompt);
    if tokens.is_empty() {
        return bad("the prompt has no tokens");
    }
    let context = vocab.context() as usize;
    if tokens.len() + c.max_tokens > context {
        return bad(&format!(
            "{} prompt tokens + max_tokens {} is over the context of {context}",
            tokens.len(),
            c.max_tokens
        ));
    }
    if hub.swarm.lock().unwrap().serving_route().is_none() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the swarm is not ready: not every shard is loaded on a node and in llama.cpp",
        );
    }
    let prompt_tokens = tokens.len();
    let req = Request {
        prompt: tokens,
        max_tokens: c.max_tokens,
        sampling: c.sampling,
        stop: c.stop,
    };
    let Some(in_line) = hub.queue.enter() else {
        let mut response = error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            &format!(
                "{} requests are already waiting for the pipeline: try again shortly",
                hub.queue.waiting()
            ),
        );
        response
            .headers_mut()
            .insert(axum::http::header::RETRY_AFTER, 1.into());
        return response;
    };
    let Some(engine) = hub.engine.as_ref() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the coordinator has no vocabulary, so no inference",
        );
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let job = Job {
        req,
        events: tx,
        arrived: Instant::now(),
        deadline: Instant::now() + hub.deadline,
        in_line: Some(in_line),
    };
    if !engine.submit(job) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "pipeline_error",
            "the pipeline stopped",
        );
    }
    let id = format!(
        "{}-{}",
        if chat { "chatcmpl" } else { "cmpl" },
        uuid::Uuid::new_v4().simple()
    );
    let model_id = hub
        .vocab
        .as_ref()
        .map(|v| v.model_id.clone())
        .unwrap_or_default();
    let created = now();
    if c.stream {
        let chunk = move |text: Option<&str>, finish: Option<&str>, first: bool| -> Value {
            if chat {
                let mut delta = json!({});
                if first {
                    delta["role"] = "assistant".into();
                }
                if let Some(t) = text {
                    delta["content"] = t.into();
                }
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            } else {
                json!({"id": id, "object": "text_completion", "created": created, "model": model_id,
                       "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}]})
            }
        };
        let stream = async_stream(rx, chunk);
        return Sse::new(stream).into_response();
    }
    let mut text = String::new();
    let (finish, completion_tokens, cached_tokens) = loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done {
                finish,
                completion_tokens,
                cached_tokens,
            }) => break (finish, completion_tokens, cached_tokens),
            Some(Event::Failed(e)) => {
                return error(StatusCode::SERVICE_UNAVAILABLE, "pipeline_error", &e)
            }
            None => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "pipeline_error",
                    "the pipeline stopped",
                )
            }
        }
    };
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens,
                       "prompt_tokens_details": {"cached_tokens": cached_tokens}});
    let choice = if chat {
        json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish.as_str()})
    } else {
        json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish.as_str()})
    };
    let object = if chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    Json(json!({"id": id, "object": object, "created": created, "model": model_id, "choices": [choice], "usage": usage})).into_response()
}

/// Server-sent events from generation events: a chunk per piece of text, a last chunk with the
/// finish reason, then `[DONE]`.
fn async_stream(
    rx: mpsc::UnboundedReceiver<Event>,
    chunk: impl Fn(Option<&str>, Option<&str>, bool) -> Value + Send + 'static,
) -> impl futures::Stream<Item = Result<SseEvent, Infallible>> {
    let mut first = true;
    let mut done = false;
    tokio_stream_from(rx).flat_map(move |ev| {
        let items: Vec<SseEvent> = match ev {
            _ if done => Vec::new(),
            Event::Text(t) => {
                let v = chunk(Some(&t), None, first);
                first = false;
                vec![SseEvent::default().data(v.to_string())]
            }
            Event::Done { finish, .. } => {
                done = true;
                let v = chunk(None, Some(finish.as_str()), first);
                vec![
                    SseEvent::default().data(v.to_string()),
                    SseEvent::default().data("[DONE]"),
                ]
            }
            Event::Failed(e) => {
                done = true;
                vec![SseEvent::default()
                    .data(json!({"error": {"message": e, "type": "pipeline_error"}}).to_string())]
            }
        };
        futures::stream::iter(items.into_iter().map(Ok))
    })
}

fn tokio_stream_from(mut rx: mpsc::UnboundedReceiver<Event>) -> impl futures::Stream<Item = Event> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
