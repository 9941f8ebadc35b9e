//! Headless Chromium (Debian's `chromium`) driven over the DevTools protocol, so that a test
//! can load a page, wait for its live updates, act on it and take a screenshot.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// The browser binary (`$SHARDSWARM_CHROMIUM`, else `chromium`).
pub fn chromium() -> String {
    std::env::var("SHARDSWARM_CHROMIUM").unwrap_or_else(|_| "chromium".into())
}

/// Common flags: headless, as root in a container, nothing from the network but our page.
fn flags(profile: &Path) -> Vec<String> {
    vec![
        "--headless".into(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--no-first-run".into(),
        "--disable-extensions".into(),
        "--disable-background-networking".into(),
        "--disable-component-update".into(),
        "--disable-sync".into(),
        "--window-size=1200,900".into(),
        format!("--user-data-dir={}", profile.display()),
    ]
}

/// `chromium --dump-dom URL`: the DOM once the page has loaded, without waiting for anything
/// the page fetches later.
pub fn dump_dom(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium())
        .args(flags(profile.path()))
        .args(["--dump-dom", url])
        .stderr(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e} (apt install chromium)", chromium()));
    assert!(out.status.success(), "chromium --dump-dom {url} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One browser with one page.
pub struct Browser {
    child: Child,
    page: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Start Chromium and attach to its first page.
    pub fn start() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(chromium())
            .args(flags(profile.path()))
            .args(["--remote-debugging-port=0", "about:blank"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e} (apt install chromium)", chromium()));
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/…"
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut port = None;
        for line in stderr.by_ref().map_while(Result::ok).take(200) {
            if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                port = rest.split('/').next().map(str::to_owned);
                break;
            }
        }
        let port = port.expect("chromium did not say where DevTools listen");
        // Keep reading its log, so that it never blocks on a full pipe.
        std::thread::spawn(move || stderr.map_while(Result::ok).for_each(drop));
        let targets: Value = crate::wait_for("the browser's page", Duration::from_secs(20), || {
            reqwest::blocking::get(format!("http://127.0.0.1:{port}/json/list"))
                .and_then(|r| r.json::<Value>())
                .ok()
                .filter(|t| {
                    t.as_array()
                        .is_some_and(|a| a.iter().any(|t| t["type"] == "page"))
                })
        });
        let url = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .unwrap()
            .to_owned();
        let (page, _) = tungstenite::connect(url).expect("connecting to the page");
        if let MaybeTlsStream::Plain(s) = page.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        }
        let mut b = Browser {
            child,
            page,
            next_id: 1,
            _profile: profile,
        };
        b.call("Page.enable", json!({}));
        b
    }

    /// Call a DevTools method and wait for its result (events in between are skipped).
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.page.send(Message::text(msg)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let Message::Text(text) = self.page.read().expect("the page's DevTools connection")
            else {
                continue;
            };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
        panic!("{method}: no answer within 60 s");
    }

    pub fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
    }

    /// Evaluate a JS expression in the page (promises awaited): its value.
    pub fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expression}: {r}");
        r["result"]["value"].clone()
    }

    /// Poll a JS condition until it is true (bounded).
    pub fn wait_until(&mut self, what: &str, condition: &str, limit: Duration) {
        crate::wait_for(what, limit, || (self.eval(condition) == true).then_some(()));
    }

    /// Save a PNG screenshot of the page.
    pub fn screenshot(&mut self, path: &Path) {
        use base64::Engine as _;
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
