//! Who may talk to the coordinator. Nodes present the swarm token on the control channel;
//! API clients present an API key (`Authorization: Bearer`) on `/v1/*`, `/status` and
//! `/metrics`. On loopback with nothing set, all stays open (one machine, one user). On any
//! other address the coordinator never runs open by accident: a missing token or API key is
//! made, kept in the state dir (so restarts keep it) and printed with how to use it;
//! `--insecure` is the only way to run open there.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use daemon::secret;

use crate::{Config, Result};

/// The secrets in force.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// What nodes must present to REGISTER (none: any node may).
    pub token: Option<String>,
    /// What API clients must present (none: the API is open).
    pub api_keys: Vec<String>,
}

impl Access {
    /// The token and keys from flags, env and files, plus those made for a public address.
    /// Prints (stdout) what an operator needs to know about made secrets.
    pub fn resolve(config: &Config) -> Result<Access> {
        let mut token = config.token.clone().filter(|t| !t.is_empty());
        if let Some(file) = &config.token_file {
            if token.is_some() {
                return Err(crate::Error::Config(
                    "give the token by --token (or SHARDSWARM_TOKEN) or by --token-file, not both"
                        .into(),
                ));
            }
            token = Some(secret::read_secret_file(file)?);
        }
        let mut api_keys: Vec<String> = config
            .api_key
            .iter()
            .filter(|k| !k.is_empty())
            .cloned()
            .collect();
        for file in &config.api_key_file {
            api_keys.extend(secret::read_secrets_file(file)?);
        }
        let public = !config.listen.ip().is_loopback();
        if public && config.insecure {
            tracing::warn!(
                "--insecure: {} is reachable from other machines{}{}",
                config.listen,
                if token.is_none() {
                    ", any node may join"
                } else {
                    ""
                },
                if api_keys.is_empty() {
                    ", the API is open to anyone"
                } else {
                    ""
                },
            );
        }
        if public && !config.insecure {
            let state = config.state_dir();
            if token.is_none() {
                let path = state.join("token");
                let (made, fresh) = secret::load_or_create_secret(&path)?;
                announce("swarm token", &path, fresh);
                // Not --insecure on a public address: TLS (the operator's or the swarm's CA).
                // The join command names a file, not the token: `ps` shows command lines.
                println!(
                    "[JOIN] node --coordinator https://{} --token-file TOKEN_FILE",
                    join_host(config)
                );
                print_secret("TOKEN", &made, &path, fresh, "each node's TOKEN_FILE");
                token = Some(made);
            }
            if api_keys.is_empty() {
                let path = state.join("api-key");
                let (made, fresh) = secret::load_or_create_secret(&path)?;
                announce("API key", &path, fresh);
                print_secret("API-KEY", &made, &path, fresh, "the API's clients");
                api_keys.push(made);
            }
        }
        Ok(Access { token, api_keys })
    }

    /// Whether a node presenting `presented` may join.
    pub fn node_may_join(&self, presented: Option<&str>) -> bool {
        match (&self.token, presented) {
            (None, _) => true,
            (Some(want), Some(got)) => secret::same_secret(want, got),
            (Some(_), None) => false,
        }
    }
}

/// A secret made now is printed once, for the operator to pass on; at later starts only where
/// it is kept (logs are kept and read by more people than the state dir).
fn print_secret(tag: &str, secret: &str, path: &Path, fresh: bool, for_whom: &str) {
    if fresh {
        println!(
            "[{tag}] {secret} (made now and kept in {}: give it to {for_whom}; it is not printed again)",
            path.display()
        );
    } else {
        println!("[{tag}] kept in {}", path.display());
    }
}

fn announce(what: &str, path: &Path, fresh: bool) {
    if fresh {
        tracing::info!(
            "made a {what} for this public address, kept in {} (set your own with the flags)",
            path.display()
        );
    } else {
        tracing::info!("using the {what} kept in {}", path.display());
    }
}

/// The address nodes reach us at, for the printed join command (this host's name when we
/// listen on every address).
fn join_host(config: &Config) -> String {
    if config.listen.ip().is_unspecified() {
        let host = crate::ca::host_name().unwrap_or_else(|| "THIS-HOST".into());
        format!("{host}:{}", config.listen.port())
    } else {
        config.listen.to_string()
    }
}

/// Where made secrets are kept when `--state-dir` is not given: `$STATE_DIRECTORY` (systemd's
/// `StateDirectory=`), else `$XDG_STATE_HOME/shardswarm-coordinator`, else under `~/.local/state`.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STATE_DIRECTORY") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("shardswarm-coordinator")
}

/// Middleware for the API routes: with API keys set, the request must carry one as
/// `Authorization: Bearer KEY`, else 401 in OpenAI's error shape.
pub async fn require_api_key(
    State(access): State<Arc<Access>>,
    request: Request,
    next: Next,
) -> Response {
    if access.api_keys.is_empty() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(key) if secret::any_secret(&access.api_keys, key) => next.run(request).await,
        _ => unauthorized(presented.is_some()),
    }
}

fn unauthorized(presented: bool) -> Response {
    let message = if presented {
        "Incorrect API key provided."
    } else {
        "You didn't provide an API key: send it as `Authorization: Bearer KEY`."
    };
    let body = serde_json::json!({"error": {
        "message": message,
        "type": "invalid_request_error",
        "param": null,
        "code": "invalid_api_key",
    }});
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        axum::Json(body),
    )
        .into_response()
}
