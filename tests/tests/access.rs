//! Who may use the coordinator: on loopback with nothing set it is open; on any other address
//! it makes a swarm token and an API key, keeps them across restarts and prints how to use
//! them, unless `--insecure`; API keys guard `/v1/*` and `/status` with OpenAI's 401.
//! The "public" coordinator listens on 0.0.0.0 and is reached through loopback only; it
//! serves TLS with a CA of its own, which nodes pin with the token.

use std::time::Duration;

use serde_json::Value;
use tests::api::{openai_client, openai_client_answer, PROMPTS};
use tests::{node, swarm_lock, wait_for, Bed, Proc};

/// A coordinator's HTTP API as a client sees it: its base URL, trusting `ca` when given.
struct Api {
    base: String,
    client: reqwest::blocking::Client,
}

impl Api {
    fn new(base: String, ca: Option<&std::path::Path>) -> Api {
        let mut builder = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30));
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).unwrap();
            builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
        }
        Api {
            base,
            client: builder.build().unwrap(),
        }
    }

    /// GET `path` with an optional bearer key: (status, JSON body or Null).
    fn get(&self, path: &str, key: Option<&str>) -> (u16, Value) {
        let mut req = self.client.get(format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let r = req.send().unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }
}

/// The `[READY]` address of a coordinator on 0.0.0.0, reached through loopback.
fn via_loopback(c: &Proc) -> String {
    let port = c.field("http").rsplit_once(':').unwrap().1;
    format!("127.0.0.1:{port}")
}

/// The value after `prefix` in a stdout line of `c`.
fn printed(c: &Proc, prefix: &str) -> Option<String> {
    c.stdout_lines()
        .iter()
        .find_map(|l| l.strip_prefix(prefix).map(str::to_owned))
}

fn assert_unauthorized(api: &Api, path: &str, key: Option<&str>) {
    let (status, body) = api.get(path, key);
    assert_eq!(status, 401, "{path} with {key:?}: {body}");
    assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

#[test]
fn a_public_coordinator_makes_keeps_and_requires_a_token_and_an_api_key() {
    let _one = swarm_lock();
    let bed = Bed::new(2, &[]);
    let state = bed.work.path().join("coordinator-state");
    let state_flag = state.display().to_string();
    let c = bed.coordinator(
        "0.0.0.0:0",
        &["--min-nodes", "2", "--state-dir", &state_flag],
    );
    let addr = via_loopback(&c);
    // TLS with the swarm's own CA, kept in the state dir.
    let ca = state.join("ca.pem");
    assert_eq!(printed(&c, "[CA] ").unwrap(), ca.display().to_string());
    assert_eq!(c.field("scheme"), "https");
    let api = Api::new(format!("https://{addr}"), Some(&ca));
    let url = format!("https://{addr}");

    // Made, kept in the state dir (owner only), printed with how to use them.
    let join = printed(&c, "[JOIN] ").expect("a [JOIN] line");
    assert!(join.ends_with("--token-file TOKEN_FILE"), "{join}");
    let first_word = |tag: &str| {
        let line = printed(&c, tag).unwrap_or_else(|| panic!("a {tag} line"));
        line.split_whitespace().next().unwrap().to_owned()
    };
    let token = first_word("[TOKEN] ");
    let key = first_word("[API-KEY] ");
    let read = |name: &str| std::fs::read_to_string(state.join(name)).unwrap();
    assert_eq!(read("token").trim(), token);
    assert_eq!(read("api-key").trim(), key);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(state.join("token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the token file is readable by others");

    // The API and /status need the key; /healthz does not.
    for path in ["/status", "/v1/models"] {
        assert_unauthorized(&api, path, None);
        assert_unauthorized(&api, path, Some("not-the-key"));
        assert_eq!(api.get(path, Some(&key)).0, 200, "{path} with the key");
    }
    assert_eq!(api.get("/healthz", None).0, 200);

    // A node without the token is turned away (it cannot even check the CA); a node with a
    // wrong one does not pin it; with the token (from a file) nodes pin the CA and join.
    let dirs = bed.node_dirs(3);
    let (status, stderr) =
        node("stranger", &url, &dirs[2].1, &[]).wait_exit(Duration::from_secs(60));
    assert!(!status.success());
    assert!(stderr.contains("token"), "{stderr}");
    let (status, stderr) =
        node("guesser", &url, &dirs[2].1, &["--token", "guess"]).wait_exit(Duration::from_secs(60));
    assert!(!status.success());
    assert!(stderr.contains("does not check out"), "{stderr}");
    assert!(!dirs[2].1.join("coordinator-ca.pem").exists());
    let token_file = state.join("token").display().to_string();
    let _nodes: Vec<Proc> = dirs[..2]
        .iter()
        .map(|(name, dir)| node(name, &url, dir, &["--token-file", &token_file]))
        .collect();
    wait_for("the pipeline serving", Duration::from_secs(180), || {
        (api.get("/status", Some(&key)).1["serving"] == true).then_some(())
    });
    let pinned = std::fs::read_to_string(dirs[0].1.join("coordinator-ca.pem")).unwrap();
    assert_eq!(pinned, std::fs::read_to_string(&ca).unwrap());
    // The data channel runs over TLS too: a plain connection to a stage gets no frame back.
    let st = api.get("/status", Some(&key)).1;
    let stage0 = st["route"][0]["data_addr"].as_str().unwrap();
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(stage0).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let hello = protocol::data::Frame::Hello(protocol::data::Hello {
            model_sha256: st["model_sha256"].as_str().unwrap().into(),
            split_id: st["split_id"].as_str().unwrap().into(),
            stage: 0,
            nonce: "00".into(),
            kind: protocol::data::LaneKind::Chain {
                lane: String::new(),
            },
        })
        .encode();
        s.write_all(&(hello.len() as u32).to_le_bytes()).unwrap();
        s.write_all(&hello).unwrap();
        let mut answer = Vec::new();
        match s.read_to_end(&mut answer) {
            // A TLS alert at most, never a data-channel frame.
            Ok(_) => assert!(
                protocol::data::Frame::decode(answer.get(4..).unwrap_or_default()).is_err(),
                "a plain frame came back: {answer:?}"
            ),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
    }

    // The official openai client, trusting the CA, with the key gets completions; without
    // the key, an error.
    let model_id = api.get("/v1/models", Some(&key)).1["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let base = format!("{url}/v1");
    let ca_file = ca.display().to_string();
    let client = |api_key: &str| {
        openai_client(
            &base,
            &model_id,
            "Name a colour.",
            8,
            &[("OPENAI_API_KEY", api_key), ("SSL_CERT_FILE", &ca_file)],
        )
    };
    let answer = openai_client_answer(&client(&key));
    assert_eq!(answer["chat"], answer["streamed"]);
    // Over HTTPS, with every hop between stages on TLS: the whole model's text, token for token.
    tests::api::assert_texts_equal_the_whole_model(&api.client, &url, Some(&key), &PROMPTS);
    let refused = client("wrong");
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("401") || why.contains("AuthenticationError"),
        "{why}"
    );

    // A second coordinator on the same state dir uses the same secrets.
    let again = bed.coordinator(
        "0.0.0.0:0",
        &["--min-nodes", "2", "--state-dir", &state_flag],
    );
    // Secrets are printed once, when made: later starts say only where they are kept.
    let kept = |tag: &str, file: &str| {
        let line = printed(&again, tag).unwrap();
        assert_eq!(line, format!("kept in {}", state.join(file).display()));
    };
    kept("[TOKEN] ", "token");
    kept("[API-KEY] ", "api-key");
    assert!(!again.stdout_lines().join("\n").contains(&token));
    let again_api = Api::new(format!("https://{}", via_loopback(&again)), Some(&ca));
    assert_eq!(again_api.get("/status", Some(&key)).0, 200);
}

#[test]
fn insecure_runs_open_and_keys_on_loopback_guard_the_api() {
    let _one = swarm_lock();
    let bed = Bed::new(2, &[]);
    let state = bed.work.path().join("st").display().to_string();

    // --insecure on a public address: nothing made, nothing asked.
    let open = bed.coordinator("0.0.0.0:0", &["--insecure", "--state-dir", &state]);
    let api = Api::new(format!("http://{}", via_loopback(&open)), None);
    assert!(printed(&open, "[JOIN] ").is_none());
    assert_eq!(api.get("/status", None).0, 200);
    assert!(!bed.work.path().join("st/token").exists());
    assert!(open.stderr_text().contains("--insecure"), "no warning");
    drop(open);

    // Loopback with keys from a flag and a file: each key works, nothing else does.
    let keys = bed.work.path().join("keys");
    std::fs::write(&keys, "# team keys\nfile-key\n").unwrap();
    let keys_flag = keys.display().to_string();
    let c = bed.coordinator(
        "127.0.0.1:0",
        &["--api-key", "flag-key", "--api-key-file", &keys_flag],
    );
    let api = Api::new(format!("http://{}", c.field("http")), None);
    assert_unauthorized(&api, "/v1/models", None);
    assert_unauthorized(&api, "/status", Some("flag-keyX"));
    assert_eq!(api.get("/v1/models", Some("flag-key")).0, 200);
    assert_eq!(api.get("/status", Some("file-key")).0, 200);
    assert_eq!(api.get("/healthz", None).0, 200);
    // /metrics needs a key too, and counts the refusals.
    assert_unauthorized(&api, "/metrics", None);
    let metrics = reqwest::blocking::Client::new()
        .get(format!("http://{}/metrics", c.field("http")))
        .bearer_auth("flag-key")
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(
        tests::metric_sum(&metrics, "shardswarm_http_requests_total", "code=\"401\""),
        1,
        "{metrics}"
    );

    // An empty key file is refused at start, naming the file.
    std::fs::write(&keys, "\n# none yet\n").unwrap();
    let mut args = vec![
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--seeder".into(),
        format!("http://{}", bed.seeder.field("http")),
        "--api-key-file".into(),
        keys_flag.clone(),
    ];
    args.push("--cache-dir".into());
    args.push(bed.work.path().join("cache").display().to_string());
    let out = std::process::Command::new(tests::bin("coordinator", "coordinator"))
        .args(&args)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&keys_flag) && err.contains("holds no secret"),
        "{err}"
    );
}
