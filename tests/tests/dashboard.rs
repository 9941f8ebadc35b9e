//! The coordinator's dashboard and chat page in a real browser (headless Chromium): it shows
//! the 4 nodes and "ready" without waiting for a script (`--dump-dom`), updates live, and the
//! chat streams the model's answer, the same text the API gives. Behind an API key, the page
//! shows nothing of the swarm until the key is given.

use std::time::Duration;

use serde_json::json;
use tests::api::{post, swarm};
use tests::browser::{dump_dom, Browser};
use tests::swarm_lock;

#[test]
fn the_dashboard_shows_the_swarm_live_and_the_chat_streams_the_models_answer() {
    let _one = swarm_lock();
    let sw = swarm(4);
    let url = format!("http://{}/", sw.coordinator);

    // Rendered by the coordinator: a browser that runs no update sees nodes and readiness.
    let dom = dump_dom(&url);
    assert_eq!(dom.matches("class=\"node\"").count(), 4, "{dom}");
    assert!(
        dom.contains("id=\"readiness\" class=\"ready\">ready<"),
        "{dom}"
    );

    let mut b = Browser::start();
    b.navigate(&url);
    b.wait_until(
        "4 nodes and ready",
        "document.querySelectorAll('#nodes tr.node').length === 4 && \
         document.getElementById('readiness')?.textContent === 'ready'",
        Duration::from_secs(30),
    );
    // A live update has come (the rate needs two of them).
    b.wait_until(
        "a live update",
        "document.getElementById('tps')?.textContent !== '–'",
        Duration::from_secs(30),
    );
    assert_eq!(b.eval("document.querySelectorAll('#route li').length"), 4);

    let question = "What is the capital of France?";
    b.eval(&format!(
        "document.getElementById('prompt').value = {}; document.getElementById('send').click(); true",
        json!(question)
    ));
    b.wait_until(
        "the streamed answer",
        "document.getElementById('answer').dataset.done !== '0'",
        Duration::from_secs(120),
    );
    assert_eq!(
        b.eval("document.getElementById('answer').dataset.done"),
        "1"
    );
    let shown = b.eval("document.getElementById('answer').textContent");
    let (status, api) = post(
        &sw.coordinator,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": question}], "max_tokens": 256, "temperature": 0}),
    );
    assert_eq!(status, 200, "{api}");
    assert!(!shown.as_str().unwrap().is_empty());
    assert_eq!(
        shown, api["choices"][0]["message"]["content"],
        "the page shows other text than the API gives"
    );

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    b.screenshot(&shot);
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    println!("screenshot: {}", shot.display());
}

#[test]
fn behind_an_api_key_the_page_shows_nothing_of_the_swarm_without_the_key() {
    let bed = tests::Bed::new(2, &[]);
    let c = bed.coordinator("127.0.0.1:0", &["--api-key", "dash-key"]);
    let addr = c.field("http");
    let page = reqwest::blocking::get(format!("http://{addr}/"))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        page.contains("enter the API key") && !page.contains("class=\"summary\""),
        "{page}"
    );
    let get = |key: Option<&str>| {
        let mut r = reqwest::blocking::Client::new().get(format!("http://{addr}/dashboard"));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send().unwrap()
    };
    assert_eq!(get(None).status().as_u16(), 401);
    assert_eq!(get(Some("wrong")).status().as_u16(), 401);
    let live = get(Some("dash-key")).text().unwrap();
    assert!(live.contains("not ready"), "{live}");
}
