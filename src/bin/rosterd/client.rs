//! How a command reaches a running daemon: its address and token (from the flags, else
//! from the config), the call, and errors that say what did or did not answer.

use anyhow::{Context, Result};
use rosterd::config::Config;

use crate::args::DaemonArgs;
use crate::causes;
use crate::token::{mint_jwt, within_max_lifetime};

/// Whether `url` names this machine: `localhost`, 127.0.0.0/8 or ::1.
fn on_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    // An IPv6 host is written in brackets.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}

/// Nothing listens there: a TLS hint would mislead.
fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        next = err.source();
    }
    false
}

/// Call a running daemon: `GET`/`POST`/`DELETE` `path`, with an admin token for `tenant`
/// when given. Answers the status and the JSON body.
pub(crate) fn call_daemon(
    daemon: &DaemonArgs,
    tenant: Option<&str>,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(reqwest::StatusCode, serde_json::Value)> {
    call_daemon_within(daemon, tenant, method, path, body, CLI_TIMEOUT)
}

/// [`call_daemon`], waiting `within` for the whole answer.
pub(crate) fn call_daemon_within(
    daemon: &DaemonArgs,
    tenant: Option<&str>,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
    within: std::time::Duration,
) -> Result<(reqwest::StatusCode, serde_json::Value)> {
    // The config is read only for what the flags leave open: the address without --url,
    // the secret to mint a token with without --token. `status --url` must work while
    // config.toml is broken or unreadable to this user, which is when an operator most
    // needs the daemon's view of it (`/status` reports config_file_error).
    const NO_TOKEN: &str =
        "no token given (--token or ROSTERD_API_TOKEN), and none can be minted from the config";
    let load = || Config::load(&daemon.config);
    let from_config = daemon.url.is_none();
    let (base, config) = match &daemon.url {
        // `--url 127.0.0.1:8080`, as `listen` is written, means plain HTTP.
        Some(url) if !url.contains("://") => (format!("http://{url}"), None),
        Some(url) => (url.clone(), None),
        None => {
            // A broken config.toml is when `status` is needed most: say how to do
            // without it.
            let c = load().map_err(|e| {
                anyhow::anyhow!(
                    "{}\n(the daemon's address comes from this config; without it, give the address with --url, e.g. --url 127.0.0.1:8080)",
                    causes(&anyhow::Error::new(e))
                )
            })?;
            (format!("http://{}", c.server.listen), Some(c))
        }
    };
    // An empty ROSTERD_API_TOKEN (`export ROSTERD_API_TOKEN=`) is no token: one is minted,
    // rather than sending an empty one the daemon refuses as missing.
    let given = daemon
        .token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty());
    // Minted here, from the secret as this shell has it: named if the daemon's differs.
    let mut minted_from = None;
    let token = match (given, tenant) {
        (Some(t), _) => Some(t.to_owned()),
        (None, Some(t)) => {
            let config = match config {
                Some(c) => c,
                None => load().context(NO_TOKEN)?,
            };
            // Said first: a tenant mistyped is no token problem.
            if !config.tenants.iter().any(|c| c.id == t) {
                anyhow::bail!(
                    "tenant {t:?} is not declared in {}",
                    daemon.config.display()
                );
            }
            let scopes = "roster:read roster:write roster:admin";
            let ttl = within_max_lifetime(&config, 60);
            let jwt = mint_jwt(&config, t, scopes, "cli", ttl).context(NO_TOKEN)?;
            minted_from = config
                .api
                .jwt
                .as_ref()
                .and_then(|j| j.hs256_secret_env.clone());
            Some(jwt)
        }
        (None, None) => None,
    };
    // `--url http://host:8080/status`, copied from a browser or the README's curl line,
    // means the daemon at that address: the path is the command's to add.
    let base = base.trim_end_matches('/');
    let base = base.strip_suffix("/status").unwrap_or(base);
    // Errors name the address without the user name and password a URL may carry.
    let shown = rosterd::connectors::http::recorded_url(base)
        .trim_end_matches('/')
        .to_owned();
    let parsed = reqwest::Url::parse(base);
    // The client would send them as a Basic header beside the bearer token, and the
    // daemon refuses a request with two (400).
    if parsed
        .as_ref()
        .is_ok_and(|u| !u.username().is_empty() || u.password().is_some())
    {
        anyhow::bail!(
            "--url {shown}: leave the user name and password out; the daemon takes a token (--token or ROSTERD_API_TOKEN)"
        );
    }
    let https = match parsed.as_ref().map(reqwest::Url::scheme) {
        Ok("http") => false,
        Ok("https") => true,
        // The client's own "URL scheme is not allowed" read as the daemon's fault.
        _ => anyhow::bail!(
            "--url {shown}: give the daemon's address as http://HOST:PORT (or HOST:PORT)"
        ),
    };
    // An operator's shell often exports a proxy for the way out (http_proxy, ALL_PROXY),
    // and the client, as curl does, sent even a request for 127.0.0.1 to it unless
    // NO_PROXY named it: the proxy's refusal read as the daemon's. No proxy reaches this
    // machine's loopback.
    let mut client = reqwest::Client::builder();
    if parsed.as_ref().is_ok_and(on_loopback) {
        client = client.no_proxy();
    }
    let client = client.build()?;
    let url = format!("{base}{path}");
    let shown_url = format!("{shown}{path}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut req = client
            .request(method, &url)
            .timeout(within);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        // The tenant named, so that a token of another (ROSTERD_API_TOKEN left exported
        // from other work) is refused (403 tenant_mismatch): without it the daemon took
        // the token's tenant, and `reconcile --tenant demo` reconciled acme and said
        // "succeeded".
        if let Some(t) = tenant {
            req = req.header("x-tenant", t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let unanswered = |e: reqwest::Error| {
            if e.is_timeout() {
                if within == CLI_TIMEOUT {
                    anyhow::anyhow!(
                        "rosterd at {shown_url} did not answer within {} s: it accepted the connection but is stalled; its log says what it last did",
                        within.as_secs()
                    )
                } else {
                    anyhow::anyhow!(
                        "rosterd at {shown_url} did not answer within {} s; its log says what it last did",
                        within.as_secs()
                    )
                }
            } else if https && e.is_connect() && !refused(&e) {
                anyhow::Error::new(e.without_url()).context(format!(
                    "cannot reach rosterd at {shown_url}: is it running, and is TLS ended in front of it? rosterd itself speaks plain http://"
                ))
            } else if from_config && e.is_connect() {
                anyhow::Error::new(e.without_url()).context(format!(
                    "cannot reach rosterd at {shown_url}; is it running? (The address is server.listen in {}: if that was edited since the daemon started, give the address it runs on with --url.)",
                    daemon.config.display()
                ))
            } else {
                anyhow::Error::new(e.without_url())
                    .context(format!("cannot reach rosterd at {shown_url}; is it running?"))
            }
        };
        let resp = req.send().await.map_err(unanswered)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(unanswered)?;
        let mut body = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
            })
        };
        // After a rotation of the HS256 secret, a shell still holding the old value
        // mints tokens the daemon refuses, and "signature does not verify" alone did not
        // say that the command had signed it.
        if let (Some(var), Some(message)) = (&minted_from, body["message"].as_str())
            && body["error"] == "token_bad_signature"
        {
            body["message"] = serde_json::Value::String(format!(
                "{message} (this command signed its token with {} as this shell has it; the daemon checks with the value it started with, so run the command with the daemon's environment, e.g. /etc/rosterd/env, or give a token with --token)",
                rosterd::config::shown_env_name(var)
            ));
        }
        Ok((status, body))
    })
}

/// How long a command waits for the daemon's whole answer.
pub(crate) const CLI_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

pub(crate) fn fail_unless_ok(status: reqwest::StatusCode, body: &serde_json::Value) -> Result<()> {
    if status.is_success() {
        return Ok(());
    }
    if let (Some(error), Some(message)) = (body["error"].as_str(), body["message"].as_str()) {
        anyhow::bail!("rosterd answered {status} ({error}): {message}");
    }
    // Not one of rosterd's error bodies: whatever answered (a proxy, another service
    // at a wrong --url) says what it says.
    anyhow::bail!(
        "{status} from what answered, which is not rosterd's error format (is the address that of rosterd?): {}",
        excerpt(body)
    )
}

/// The start of an answer that is not rosterd's, to show what did answer.
pub(crate) fn excerpt(body: &serde_json::Value) -> String {
    match body {
        serde_json::Value::Null => "no body".to_owned(),
        serde_json::Value::String(text) => text.trim().chars().take(200).collect(),
        other => other.to_string().chars().take(200).collect(),
    }
}
