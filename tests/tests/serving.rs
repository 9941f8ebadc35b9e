//! Serving many users at once through the pipeline: continuous batching (each request equal
//! to its text alone), admission (429, a client that leaves, a deadline), the prompt cache,
//! and failover with several streams running. Real swarms on loopback, one at a time.

use std::time::Duration;

use serde_json::{json, Value};
use tests::api::{model, post, read_stream, send, swarm, swarm_serving, PROMPTS};
use tests::{get_json, node, swarm_lock, wait_for, Bed, Proc};

/// Stream a completion: its text, and when its first and last pieces came (from `started`).
fn stream_timed(
    addr: &str,
    body: &Value,
    started: std::time::Instant,
) -> (String, Duration, Duration) {
    let (mut text, mut first, mut last) = (String::new(), None, None);
    read_stream(send(addr, "/v1/completions", body), |piece| {
        if !piece.is_empty() {
            first.get_or_insert(started.elapsed());
            last = Some(started.elapsed());
        }
        text.push_str(piece);
    });
    (text, first.expect("a token"), last.expect("a token"))
}

/// Eight streamed requests at once, with different prompts and lengths: each text equals the
/// same request alone, and they are served side by side (a later request's first token comes
/// before an earlier one has finished), not one after another.
#[test]
fn eight_concurrent_streams_overlap_and_each_equals_its_request_alone() {
    let _one = swarm_lock();
    let s = swarm(4);
    let prompts: Vec<String> = (0..8)
        .map(|k| format!("{} Story number {k}:", PROMPTS[k % PROMPTS.len()]))
        .collect();
    let started = std::time::Instant::now();
    let handles: Vec<_> = (0..8)
        .map(|k| {
            let (addr, prompt) = (s.coordinator.clone(), prompts[k].clone());
            std::thread::spawn(move || {
                let body = json!({"prompt": prompt, "max_tokens": 12 + 2 * k, "temperature": 0, "stream": true});
                stream_timed(&addr, &body, started)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (k, (text, _, _)) in results.iter().enumerate() {
        let alone = llm::reference_completion(&model(), &prompts[k], 12 + 2 * k, 1).unwrap();
        assert_eq!(
            text, &alone.text,
            "stream {k} differs from its request alone"
        );
    }
    // A second round reuses the cached prefixes, so its steps mix prompt remainders of
    // different lengths with decode rows (what once swapped two sequences' hidden states).
    let again: Vec<_> = (0..8)
        .map(|k| {
            let (addr, prompt) = (s.coordinator.clone(), format!("{} Again, {k}:", prompts[k]));
            std::thread::spawn(move || {
                let body =
                    json!({"prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": true});
                (prompt, stream_timed(&addr, &body, started).0)
            })
        })
        .collect();
    for (k, h) in again.into_iter().enumerate() {
        let (prompt, text) = h.join().unwrap();
        let alone = llm::reference_completion(&model(), &prompt, 16, 1).unwrap();
        assert_eq!(text, alone.text, "second round, stream {k}");
    }
    let overlapping = results.iter().any(|(_, first_a, last_a)| {
        results
            .iter()
            .any(|(_, first_b, _)| first_b > first_a && first_b < last_a)
    });
    let times: Vec<_> = results.iter().map(|(_, f, l)| (f, l)).collect();
    assert!(overlapping, "the streams ran one after another: {times:?}");
    // Every stage did work, and /status says how much.
    let batching = &get_json(&format!("http://{}/status", s.coordinator))["batching"];
    let busy = batching["stage_busy_seconds"].as_array().unwrap();
    assert_eq!(busy.len(), 4, "{batching}");
    assert!(busy.iter().all(|b| b.as_f64().unwrap() > 0.0), "{batching}");
}

/// A chat's next turn extends the cached sequence of the turn before: the stages keep its KV,
/// only the new tokens go through, `usage.prompt_tokens_details.cached_tokens` says how many
/// were reused, and the text is the whole model's for the full prompt (as without a cache).
#[test]
fn a_chats_second_turn_reuses_the_cached_prompt_and_gives_the_same_text() {
    let _one = swarm_lock();
    let s = swarm(4);
    let addr = s.coordinator.as_str();
    let first = PROMPTS[2];
    let (status, a) = post(
        addr,
        "/v1/completions",
        json!({"prompt": first, "max_tokens": 24, "temperature": 0}),
    );
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let answer = a["choices"][0]["text"].as_str().unwrap();
    let second = format!(
        "{first}{answer}<|im_end|>\n<|im_start|>user\nAnd three animals?<|im_end|>\n<|im_start|>assistant\n"
    );
    let (status, b) = post(
        addr,
        "/v1/completions",
        json!({"prompt": second, "max_tokens": 24, "temperature": 0}),
    );
    assert_eq!(status, 200, "{b}");
    let cached = b["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let (first_len, second_len) = (
        a["usage"]["prompt_tokens"].as_u64().unwrap(),
        b["usage"]["prompt_tokens"].as_u64().unwrap(),
    );
    assert!(
        cached >= first_len && cached < second_len,
        "cached {cached} of {second_len} prompt tokens; the first turn's prompt had {first_len}"
    );
    let without_cache = llm::reference_completion(&model(), &second, 24, 1).unwrap();
    assert_eq!(b["choices"][0]["text"], without_cache.text.as_str());
    // The chat API reports it too: the same conversation's next turn reuses this one's cache.
    let turn = |messages: Value| {
        let (status, v) = post(
            addr,
            "/v1/chat/completions",
            json!({"messages": messages, "max_tokens": 8, "temperature": 0}),
        );
        assert_eq!(status, 200, "{v}");
        v
    };
    let mut messages = json!([{"role": "user", "content": "Name a fruit."}]);
    let one = turn(messages.clone());
    let reply = one["choices"][0]["message"]["content"].as_str().unwrap();
    messages.as_array_mut().unwrap().extend([
        json!({"role": "assistant", "content": reply}),
        json!({"role": "user", "content": "Another one?"}),
    ]);
    let two = turn(messages);
    let cached = two["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached >= one["usage"]["prompt_tokens"].as_u64().unwrap(),
        "{two}"
    );
}

/// With one request served and one waiting, more are refused at once: 429 in OpenAI's error
/// shape with `Retry-After`. A streaming client that goes away frees its slot at once: the next
/// request is served without waiting for the abandoned one's tokens.
#[test]
fn a_full_queue_answers_429_and_a_client_that_leaves_frees_its_slot() {
    let _one = swarm_lock();
    let s = swarm_serving(
        tests::real_shards(2),
        2,
        &["--parallel", "1", "--queue", "1"],
    );
    let addr = s.coordinator.as_str();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let addr = addr.to_owned();
            std::thread::spawn(move || {
                let body = json!({"prompt": PROMPTS[1], "max_tokens": 120, "temperature": 0});
                let r = send(&addr, "/v1/completions", &body);
                let retry_after = r.headers().get("retry-after").cloned();
                (r.status().as_u16(), retry_after, r.json::<Value>().unwrap())
            })
        })
        .collect();
    let answers: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let refused: Vec<_> = answers.iter().filter(|a| a.0 == 429).collect();
    assert!(
        !refused.is_empty() && answers.iter().any(|a| a.0 == 200),
        "{:?}",
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    for (_, retry_after, body) in refused {
        assert_eq!(body["error"]["type"], "rate_limit_exceeded", "{body}");
        assert!(retry_after.is_some(), "429 without Retry-After");
    }
    // A long stream, left after its first pieces.
    let generated = || {
        get_json(&format!("http://{addr}/status"))["batching"]["generated_tokens"]
            .as_u64()
            .unwrap()
    };
    let before = generated();
    let long = json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 3000, "temperature": 0, "stream": true});
    let resp = send(addr, "/v1/completions", &long);
    {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(resp).lines();
        let pieces = lines
            .by_ref()
            .map_while(Result::ok)
            .filter(|l| l.starts_with("data: {"))
            .take(3)
            .count();
        assert_eq!(pieces, 3, "the long stream ended early");
    } // the client goes away here
    let (status, body) = post(
        addr,
        "/v1/completions",
        json!({"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(status, 200, "{body}");
    let spent = generated() - before;
    assert!(
        spent < 1000,
        "{spent} tokens were generated: the abandoned stream kept its slot"
    );
    assert!(s.procs[0].stderr_text().contains("the client went away"));
}

/// A request past `--deadline` ends with an error naming the deadline.
#[test]
fn a_request_past_its_deadline_fails_with_a_clear_error() {
    let _one = swarm_lock();
    let s = swarm_serving(tests::real_shards(2), 2, &["--deadline", "2"]);
    let (status, body) = post(
        &s.coordinator,
        "/v1/completions",
        json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 3500, "temperature": 0}),
    );
    assert_eq!(status, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("deadline"), "{message}");
}

/// Four streams run when the node of stage 1 is killed: every one finishes through the
/// replica of that shard with exactly the whole model's text.
#[test]
fn four_streams_survive_a_killed_stage_through_its_replica() {
    let _one = swarm_lock();
    let bed = Bed::new(4, &[]);
    let c = bed.coordinator("127.0.0.1:0", &["--min-nodes", "4"]);
    let addr = c.field("http").to_owned();
    let mut nodes: Vec<Option<Proc>> = (0..8)
        .map(|i| {
            let dir = bed.work.path().join(format!("n{i}"));
            Some(node(&format!("n{i}"), &addr, &dir, &[]))
        })
        .collect();
    let status = wait_for(
        "8 nodes, every shard twice, serving",
        Duration::from_secs(240),
        || {
            let st = get_json(&format!("http://{addr}/status"));
            (st["serving"] == true && tests::nodes_fully_loaded(&st) == 8).then_some(st)
        },
    );
    let prompts: Vec<String> = (0..4)
        .map(|k| format!("{} Chapter {k}.", PROMPTS[1]))
        .collect();
    let references: Vec<String> = prompts
        .iter()
        .map(|p| llm::reference_completion(&model(), p, 48, 1).unwrap().text)
        .collect();
    // The node running stage 1 of the route.
    let hop = status["route"][1]["node_id"].clone();
    let victim = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == hop)
        .unwrap()["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let (first_piece, streaming) = std::sync::mpsc::channel();
    let handles: Vec<_> = prompts
        .iter()
        .map(|prompt| {
            let (addr, first_piece) = (addr.clone(), first_piece.clone());
            let body =
                json!({"prompt": prompt, "max_tokens": 48, "temperature": 0, "stream": true});
            std::thread::spawn(move || {
                let mut text = String::new();
                read_stream(send(&addr, "/v1/completions", &body), |piece| {
                    text.push_str(piece);
                    let _ = first_piece.send(());
                });
                text
            })
        })
        .collect();
    streaming
        .recv_timeout(Duration::from_secs(120))
        .expect("a first piece");
    let k: usize = victim[1..].parse().unwrap();
    nodes[k].take().unwrap().kill();
    let texts: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (k, text) in texts.iter().enumerate() {
        assert_eq!(
            text, &references[k],
            "stream {k}, replayed, differs from the whole model"
        );
    }
    let st = get_json(&format!("http://{addr}/status"));
    assert!(
        st["route"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["node_id"] != hop),
        "the route still uses the dead node"
    );
    // The lane broke under running requests, or the route changed under them first (the
    // coordinator saw the node go before the lane did): either way they started again.
    let log = c.stderr_text();
    let moved = log.lines().any(|l| {
        l.contains("running requests start again on a new route")
            || (l.contains("running request(s) start again on the new one")
                && !l.contains("changed; 0 running"))
    });
    assert!(moved, "the kill did not land mid-request: {log}");
}
