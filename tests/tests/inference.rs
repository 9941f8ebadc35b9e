//! Distributed inference end to end: seeder + coordinator + nodes on loopback, the real model
//! split into stages, completions through the OpenAI-compatible API equal to one llama.cpp
//! process with the whole model. Nodes run llama.cpp with one thread; one swarm at a time.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tests::api::{
    model, openai_client, openai_client_answer, post, send, swarm, swarm_serving, PROMPTS,
};
use tests::{get_json, swarm_lock, wait_for, Bed};

/// A raw data-channel connection (blocking, reads bounded by 10 s).
fn data_connect(addr: &str) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Send one data-channel frame and read the answer.
fn data_exchange(
    s: &mut std::net::TcpStream,
    frame: &protocol::data::Frame,
) -> protocol::data::Frame {
    use std::io::{Read, Write};
    let payload = frame.encode();
    s.write_all(&(payload.len() as u32).to_le_bytes()).unwrap();
    s.write_all(&payload).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut buf).unwrap();
    protocol::data::Frame::decode(&buf).unwrap()
}

/// Greedy completions through the swarm equal the whole model's, text and token count.
fn check_equal_to_reference(addr: &str, model: &Path) {
    for prompt in PROMPTS {
        let reference = llm::reference_completion(model, prompt, 24, 1).unwrap();
        let (status, body) = post(
            addr,
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 24, "temperature": 0}),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["choices"][0]["text"],
            reference.text.as_str(),
            "prompt {prompt:?}"
        );
        assert_eq!(
            body["usage"]["completion_tokens"],
            reference.token_ids.len(),
            "prompt {prompt:?}"
        );
        assert_eq!(body["usage"]["prompt_tokens"], reference.prompt_ids.len());
        let finish = if reference.token_ids.len() == 24 {
            "length"
        } else {
            "stop"
        };
        assert_eq!(body["choices"][0]["finish_reason"], finish);
        // A stop string that never occurs holds text back while generating; none may be lost.
        let (_, held) = post(
            addr,
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": ["@@@@@@"]}),
        );
        assert_eq!(
            held["choices"][0]["text"],
            reference.text.as_str(),
            "prompt {prompt:?} with a stop string"
        );
    }
}

#[test]
fn four_stage_swarm_matches_the_whole_model_streams_and_serves_the_openai_client() {
    let _one = swarm_lock();
    let sw = swarm(4);
    let addr = sw.coordinator.as_str();
    check_equal_to_reference(addr, &model());
    sw.assert_coordinator_fetched_only_the_vocabulary(&model());

    // Streaming gives the same text as a plain request, and ends with [DONE].
    let body = json!({"prompt": PROMPTS[1], "max_tokens": 20, "temperature": 0, "stream": true});
    let text = send(addr, "/v1/completions", &body).text().unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    let (_, plain) = post(
        addr,
        "/v1/completions",
        json!({"prompt": PROMPTS[1], "max_tokens": 20, "temperature": 0}),
    );
    assert_eq!(streamed, plain["choices"][0]["text"].as_str().unwrap());

    // Two requests at once each get their own answer.
    let handles: Vec<_> = [0usize, 2]
        .into_iter()
        .map(|k| {
            let addr = addr.to_owned();
            std::thread::spawn(move || {
                (
                    k,
                    post(
                        &addr,
                        "/v1/completions",
                        json!({"prompt": PROMPTS[k], "max_tokens": 12, "temperature": 0}),
                    ),
                )
            })
        })
        .collect();
    for h in handles {
        let (k, (status, body)) = h.join().unwrap();
        assert_eq!(status, 200);
        let reference = llm::reference_completion(&model(), PROMPTS[k], 12, 1).unwrap();
        assert_eq!(
            body["choices"][0]["text"],
            reference.text.as_str(),
            "concurrent prompt {k}"
        );
    }

    // A sampled completion with a seed repeats, and equals the whole model's with that seed.
    let sampled = json!({"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0.8, "top_p": 0.9, "seed": 7});
    let (_, first) = post(addr, "/v1/completions", sampled.clone());
    assert_eq!(
        first["choices"],
        post(addr, "/v1/completions", sampled).1["choices"]
    );
    let with_seed = protocol::data::Sampling {
        temperature: 0.8,
        top_p: 0.9,
        seed: 7,
    };
    let reference = llm::reference_completion_with(&model(), PROMPTS[0], 16, 1, with_seed).unwrap();
    assert_eq!(
        first["choices"][0]["text"],
        reference.text.as_str(),
        "sampled with a seed"
    );

    // The data channel takes only the predecessor the coordinator named. What /status
    // publishes is not enough: a Hello for the wrong stage is refused at once; one for the
    // right stage gets a challenge, and a proof made without the route's key is refused.
    let st = get_json(&format!("http://{addr}/status"));
    let stage0 = st["route"][0]["data_addr"].as_str().unwrap();
    let public_hello = |stage| {
        protocol::data::Frame::Hello(protocol::data::Hello {
            model_sha256: st["model_sha256"].as_str().unwrap().into(),
            split_id: st["split_id"].as_str().unwrap().into(),
            stage,
            nonce: "00".into(),
            kind: protocol::data::LaneKind::Chain {
                lane: String::new(),
            },
        })
    };
    let mut s = data_connect(stage0);
    let refused = data_exchange(&mut s, &public_hello(1));
    assert!(
        matches!(&refused, protocol::data::Frame::Error(e) if e.contains("refused")),
        "{refused:?}"
    );
    let mut s = data_connect(stage0);
    let challenge = data_exchange(&mut s, &public_hello(0));
    assert!(
        matches!(challenge, protocol::data::Frame::Challenge { .. }),
        "{challenge:?}"
    );
    let guessed = data_exchange(&mut s, &protocol::data::Frame::Proof([0; 32]));
    assert!(
        matches!(&guessed, protocol::data::Frame::Error(e) if e.contains("route key")),
        "{guessed:?}"
    );
    // Before the handshake, a frame over 16 KiB ends the connection: nothing is allocated
    // for a stranger's 200 MB.
    let mut s = data_connect(stage0);
    use std::io::{Read, Write};
    s.write_all(&(200u32 << 20).to_le_bytes()).unwrap();
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "{rest:?}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    assert!(
        st["route"][0].get("key").is_none(),
        "/status shows a route key"
    );

    // Stop strings cut the text.
    let (_, cut) = post(
        addr,
        "/v1/completions",
        json!({"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "stop": ["."]}),
    );
    assert_eq!(cut["choices"][0]["text"], " Paris");
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");

    // Any model name is served (OpenAI clients come set up with one), answered under the
    // swarm's id: the model file's stem, with `general.name` beside it for people.
    let models = get_json(&format!("http://{addr}/v1/models"));
    assert_eq!(
        models["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1",
        "{models}"
    );
    assert!(models["data"][0]["name"].is_string(), "{models}");
    let (status, other) = post(
        addr,
        "/v1/completions",
        json!({"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "stop": ["."], "model": "gpt-4o"}),
    );
    assert_eq!(status, 200, "{other}");
    assert_eq!(other["choices"][0]["text"], cut["choices"][0]["text"]);
    assert_eq!(other["model"], "SmolLM2-135M-Instruct.Q4_1");

    // The official openai client: a chat completion and a streamed one.
    let model_id = get_json(&format!("http://{addr}/v1/models"))["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = openai_client(
        &format!("http://{addr}/v1"),
        &model_id,
        "Name a colour.",
        12,
        &[],
    );
    let v = openai_client_answer(&out);
    assert!(!v["chat"].as_str().unwrap().is_empty());
    assert_eq!(
        v["chat"], v["streamed"],
        "streamed chat differs from the plain one"
    );

    // Bad requests: 400 with a JSON error, and the swarm still serves.
    for (path, body, status) in [
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": -1}),
            400,
        ),
        ("/v1/completions", json!({"prompt": 5}), 400),
        ("/v1/completions", json!({"prompt": "x", "model": 17}), 400),
        (
            "/v1/completions",
            json!({"prompt": "x", "temperature": 9}),
            400,
        ),
        (
            "/v1/completions",
            json!({"prompt": "word ".repeat(5000), "max_tokens": 10}),
            400,
        ),
        ("/v1/chat/completions", json!({"messages": []}), 400),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            400,
        ),
    ] {
        let (got, v) = post(addr, path, body.clone());
        assert_eq!(got, status, "{body}: {v}");
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    let r = reqwest::blocking::Client::new()
        .post(format!("http://{addr}/v1/completions"))
        .body("{not json")
        .header("content-type", "application/json")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);

    // A client that goes away mid-stream: its slot is freed within a step, and the next
    // request is answered as before.
    {
        use std::io::{BufRead, BufReader};
        let body =
            json!({"prompt": PROMPTS[1], "max_tokens": 200, "temperature": 0, "stream": true});
        let resp = send(addr, "/v1/completions", &body);
        let mut lines = BufReader::new(resp).lines();
        assert!(lines.any(|l| l.is_ok_and(|l| l.starts_with("data: "))));
    } // dropped here: the connection closes
    let coordinator = &sw.procs[0];
    wait_for(
        "the coordinator to see the client leave",
        Duration::from_secs(30),
        || {
            coordinator
                .stderr_text()
                .contains("the client went away")
                .then_some(())
        },
    );
    check_equal_to_reference(addr, &model());
}

/// Gemma 3 270M in 5 stages, whose boundaries fall off gemma3's 6-layer window period: before
/// stages carried their per-layer pattern, this swarm served other text than the whole model.
/// A short prompt (the case that was wrong) and one longer than the 512-token window.
#[test]
fn five_stage_gemma3_swarm_gives_the_whole_models_text() {
    let _one = swarm_lock();
    let model = tests::gemma3_model();
    let s = swarm_serving(tests::shards_of(&model, 5), 5, &[]);
    let long = format!(
        "{}Summary in one sentence:",
        "Every node of the swarm holds a few layers of the model and passes its hidden states on. "
            .repeat(36)
    );
    for (prompt, max_tokens) in [("The three primary colors are", 24), (long.as_str(), 16)] {
        let reference = llm::reference_completion(&model, prompt, max_tokens, 1).unwrap();
        assert!(!reference.token_ids.is_empty());
        let (status, body) = post(
            &s.coordinator,
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["usage"]["prompt_tokens"], reference.prompt_ids.len());
        assert_eq!(
            body["choices"][0]["text"],
            reference.text.as_str(),
            "{} prompt tokens",
            reference.prompt_ids.len()
        );
    }
    assert!(
        llm::tokenize(&model, &long).unwrap().len() > 512,
        "the long prompt must exceed the window"
    );
    s.assert_coordinator_fetched_only_the_vocabulary(&model);
}

#[test]
fn two_and_three_stage_swarms_match_the_whole_model() {
    let _one = swarm_lock();
    for n in [2, 3] {
        let sw = swarm(n);
        check_equal_to_reference(&sw.coordinator, &model());
    }
}

#[test]
fn before_the_swarm_is_ready_requests_get_503() {
    let _one = swarm_lock();
    let bed = Bed::new(4, &[]);
    let c = bed.coordinator("127.0.0.1:0", &["--min-nodes", "4"]);
    let (status, v) = post(
        c.field("http"),
        "/v1/completions",
        json!({"prompt": "hello"}),
    );
    assert_eq!(status, 503, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not ready"));
    let (status, _) = post(
        c.field("http"),
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(status, 503);
}
