//! A serving swarm and its OpenAI-compatible API, as the inference tests use them: start
//! seeder, coordinator and nodes and wait until they serve; post requests; read SSE streams.

use std::time::Duration;

use serde_json::Value;

use crate::{get_json, node, wait_for, Bed, Proc};

/// A running swarm with `n` shards on `n` nodes, serving.
pub struct Swarm {
    pub bed: Bed,
    /// The coordinator, then the nodes.
    pub procs: Vec<Proc>,
    pub coordinator: String,
}

impl Swarm {
    /// The coordinator fetched the split's vocabulary file for its tokens and no weight
    /// shard: its cache holds `vocab.gguf` only, under 5% of `model`'s bytes.
    pub fn assert_coordinator_fetched_only_the_vocabulary(&self, model: &std::path::Path) {
        let cache = self.bed.work.path().join("cache");
        let files: Vec<(String, u64)> = std::fs::read_dir(&cache)
            .unwrap_or_else(|e| panic!("{}: {e}", cache.display()))
            .flatten()
            .map(|e| {
                let size = e.metadata().map_or(0, |m| m.len());
                (e.file_name().to_string_lossy().into_owned(), size)
            })
            .collect();
        assert!(
            files
                .iter()
                .any(|(name, _)| name == torrents::split::VOCAB_FILE),
            "no vocabulary file in the coordinator's cache: {files:?}"
        );
        assert!(
            !files.iter().any(|(name, _)| name.starts_with("shard-")),
            "the coordinator fetched a weight shard: {files:?}"
        );
        let fetched: u64 = files.iter().map(|(_, size)| size).sum();
        let whole = std::fs::metadata(model).unwrap().len();
        assert!(
            fetched * 20 < whole,
            "the coordinator fetched {fetched} bytes, not under 5% of the model's {whole}: {files:?}"
        );
        eprintln!(
            "the coordinator fetched {fetched} bytes ({:.2}% of the model)",
            fetched as f64 * 100.0 / whole as f64
        );
    }
}

/// A swarm of `n` nodes for the real model cut into `n` shards.
pub fn swarm(n: usize) -> Swarm {
    swarm_serving(crate::real_shards(n), n, &[])
}

/// A swarm of `n` nodes for the `n` shards in `seed`, the coordinator started with `flags`.
pub fn swarm_serving(seed: tempfile::TempDir, n: usize, flags: &[&str]) -> Swarm {
    let bed = Bed::serving(seed, &[]);
    let n_text = n.to_string();
    let mut all = vec!["--min-nodes", n_text.as_str()];
    all.extend_from_slice(flags);
    let c = bed.coordinator("127.0.0.1:0", &all);
    let addr = c.field("http").to_owned();
    let mut procs = vec![c];
    procs.extend(
        bed.node_dirs(n)
            .iter()
            .map(|(name, dir)| node(name, &addr, dir, &[])),
    );
    wait_for("the pipeline serving", Duration::from_secs(180), || {
        (get_json(&format!("http://{addr}/status"))["serving"] == true).then_some(())
    });
    Swarm {
        bed,
        procs,
        coordinator: addr,
    }
}

/// Read an SSE completion stream to its `[DONE]`, handing each chunk's text (completions) or
/// delta (chat) to `piece`; a chunk with an error fails the test.
pub fn read_stream(resp: reqwest::blocking::Response, mut piece: impl FnMut(&str)) {
    use std::io::BufRead;
    for line in std::io::BufReader::new(resp).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        assert!(v.get("error").is_none(), "the stream failed: {v}");
        let choice = &v["choices"][0];
        let text = choice["text"]
            .as_str()
            .or(choice["delta"]["content"].as_str());
        piece(text.unwrap_or(""));
    }
}

/// POST `body` as JSON to the coordinator at `addr` (bounded: 120 s).
pub fn send(addr: &str, path: &str, body: &Value) -> reqwest::blocking::Response {
    reqwest::blocking::Client::new()
        .post(format!("http://{addr}{path}"))
        .json(body)
        .timeout(Duration::from_secs(120))
        .send()
        .unwrap()
}

/// POST and read the whole JSON answer: (status, body).
pub fn post(addr: &str, path: &str, body: Value) -> (u16, Value) {
    let r = send(addr, path, &body);
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

/// The default real model (SmolLM2), fetched by `.ci/run`; the tests fail without it.
pub fn model() -> std::path::PathBuf {
    crate::default_model::require().unwrap_or_else(|e| panic!("{e}"))
}

/// Prompts of different lengths and kinds (plain text, a story opening, a ChatML turn).
pub const PROMPTS: [&str; 3] = [
    "The capital of France is",
    "Once upon a time, in a land of many small machines that shared the work of one large model, there lived a careful engineer who",
    "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
];

/// Run tests/scripts/openai_client.py (the official `openai` package): one chat completion of
/// `prompt` and one streamed, against `base_url` (…/v1), with `env` set (OPENAI_API_KEY,
/// SSL_CERT_FILE). Returns the process's output; its stdout is `{"chat", "streamed", "usage"}`.
pub fn openai_client(
    base_url: &str,
    model: &str,
    prompt: &str,
    max_tokens: u32,
    env: &[(&str, &str)],
) -> std::process::Output {
    let python = crate::python();
    std::process::Command::new(&python)
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/openai_client.py"))
        .args([base_url, model, prompt, &max_tokens.to_string()])
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (.ci/run makes the venv)", python.display()))
}

/// The JSON the openai client printed, after checking that it succeeded.
pub fn openai_client_answer(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "the openai client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Greedy completions of `prompts` (16 tokens) through the API at `base` (http or https URL,
/// with `key` as bearer if given) equal the whole model's in one llama.cpp process.
pub fn assert_texts_equal_the_whole_model(
    client: &reqwest::blocking::Client,
    base: &str,
    key: Option<&str>,
    prompts: &[&str],
) {
    for prompt in prompts {
        let reference = llm::reference_completion(&model(), prompt, 16, 1).unwrap();
        let mut req = client
            .post(format!("{base}/v1/completions"))
            .json(&serde_json::json!({"prompt": prompt, "max_tokens": 16, "temperature": 0}));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        let body: Value = req.send().unwrap().json().unwrap();
        assert_eq!(
            body["choices"][0]["text"],
            reference.text.as_str(),
            "{prompt:?}: {body}"
        );
    }
}
