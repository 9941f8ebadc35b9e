//! TLS on the coordinator: HTTPS for the API and `wss://` for the control channel, with a CA
//! of the operator's (made here with openssl). Nodes trust it with `--ca`; the official
//! `openai` client trusts it through SSL_CERT_FILE; the text is the whole model's, token for
//! token, as over plain HTTP.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use tests::api::{
    assert_texts_equal_the_whole_model, openai_client, openai_client_answer, PROMPTS,
};
use tests::{node, swarm_lock, Bed};

/// A CA, and a certificate for 127.0.0.1 signed by it: (ca.pem, server.pem, server.key).
fn make_certificates(dir: &Path) -> (String, String, String) {
    let script = "set -e
        ec='-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes'
        openssl req -x509 $ec -keyout ca.key -out ca.pem -days 2 -subj '/CN=shardswarm test CA'
        openssl req $ec -keyout server.key -out server.csr -subj /CN=127.0.0.1
        echo subjectAltName=IP:127.0.0.1 > san.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
            -out server.pem -days 2 -extfile san.ext";
    let out = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "openssl (.ci/run installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = |name: &str| dir.join(name).display().to_string();
    (p("ca.pem"), p("server.pem"), p("server.key"))
}

/// The swarm token of the test's coordinator.
const TOKEN: &str = "tls-test-token";

#[test]
fn https_and_wss_with_the_operators_certificate_give_the_same_tokens() {
    let _one = swarm_lock();
    let bed = Bed::new(2, &[]);
    let (ca, cert, key) = make_certificates(bed.work.path());
    let state = bed
        .work
        .path()
        .join("coordinator-state")
        .display()
        .to_string();
    let c = bed.coordinator(
        "127.0.0.1:0",
        &[
            "--min-nodes",
            "2",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--state-dir",
            &state,
            "--token",
            TOKEN,
        ],
    );
    assert_eq!(c.field("scheme"), "https");
    let base = format!("https://{}", c.field("http"));
    let client = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let status = || -> Value {
        client
            .get(format!("{base}/status"))
            .send()
            .unwrap()
            .json()
            .unwrap()
    };

    // Plain HTTP on the TLS port gets nowhere.
    let plain = reqwest::blocking::Client::new()
        .get(format!("http://{}/healthz", c.field("http")))
        .timeout(Duration::from_secs(10))
        .send();
    assert!(plain.is_err() || !plain.unwrap().status().is_success());

    // A node that does not trust the CA cannot join; nodes given it can. Without `--ca`, the
    // coordinator's `/ca.pem` tells a node with the token, vouched for under it, to trust the
    // system's roots (which do not hold this CA).
    let dirs = bed.node_dirs(3);
    let stranger = node("untrusting", &base, &dirs[2].1, &["--token", TOKEN]);
    let _nodes: Vec<_> = dirs[..2]
        .iter()
        .map(|(n, d)| node(n, &base, d, &["--ca", &ca, "--token", TOKEN]))
        .collect();
    // Waited for with `shard_loader watch` trusting the operator's CA (without it: refused).
    let watch = |ca_flag: &[&str], timeout: &str| {
        std::process::Command::new(tests::bin("shard_loader", "shard_loader"))
            .args(["watch", "--coordinator", &base, "--timeout", timeout])
            .args(ca_flag)
            .output()
            .unwrap()
    };
    let untrusting = watch(&[], "1");
    let said = String::from_utf8_lossy(&untrusting.stderr);
    assert!(
        !untrusting.status.success() && said.contains("did not answer"),
        "{said}"
    );
    let out = watch(&["--ca", &ca], "180");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.contains("serving after"),
        "{said}"
    );
    assert_eq!(status()["serving"], true);
    let names: Vec<Value> = status()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].clone())
        .collect();
    assert!(!names.contains(&json!("untrusting")), "{names:?}");
    let log = stranger.stderr_text();
    assert!(
        log.contains("certificate") || log.contains("UnknownIssuer"),
        "{log}"
    );
    assert!(
        log.contains("serves a certificate of its operator's: trusting the system's roots"),
        "{log}"
    );

    // The whole model's text over HTTPS.
    assert_texts_equal_the_whole_model(&client, &base, None, &PROMPTS);

    // The official openai client, trusting the CA; the same chat as asked directly.
    let model_id = client
        .get(format!("{base}/v1/models"))
        .send()
        .unwrap()
        .json::<Value>()
        .unwrap()["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = openai_client(
        &format!("{base}/v1"),
        &model_id,
        "Name a colour.",
        12,
        &[("SSL_CERT_FILE", &ca)],
    );
    let v = openai_client_answer(&out);
    let direct: Value = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 12, "temperature": 0}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(v["chat"], direct["choices"][0]["message"]["content"]);
    assert_eq!(v["chat"], v["streamed"]);
}
