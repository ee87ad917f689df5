//! A webhook receiver for integration tests and benchmarks that verifies Standard Webhooks
//! v1 signatures: a real HTTP target on `127.0.0.1:0`.
//!
//! Include it with `#[path = "../support/webhook.rs"] mod webhook;`.
//!
//! Every `POST` (any path) is checked, in this order:
//! 1. `webhook-id` and `webhook-timestamp` (integer unix seconds) present → else 400;
//! 2. `webhook-signature` present and one of its space-separated `v1,<base64>` entries is the
//!    HMAC-SHA256 of `"{id}.{timestamp}.{body}"` under (any of) the secret(s) → else 401;
//! 3. the timestamp within the tolerance (5 minutes) of now → else 400;
//! 4. the body is JSON → else 400.
//!
//! Rejected requests are counted ([`WebhookServer::rejected`]) and never consume a fault.
//! A verified request is an *attempt*: injected faults ([`Fault`]) apply to it, and it is
//! recorded with its attempt number for its `webhook-id` and the status answered. Attempts
//! answered 2xx are *deliveries*. Without a fault the answer is 200 with an empty body.
//! Other methods answer 405.
//!
//! Each attempt also carries two ticks of one logical clock: when it arrived and when its
//! answer went out ([`Delivery::tick`], [`Delivery::answered`]), so a test can tell whether
//! the sender waited for one answer before sending the next without reading the time.
#![allow(dead_code)]

// oneroster.rs includes it as well, and a test binary may take either target or both.
#[allow(clippy::duplicate_mod)]
#[path = "kill.rs"]
mod kill;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use kill::{Conn, KillListener};
use serde_json::Value;
use sha2::Sha256;
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

const MAX_BODY: usize = 16 * 1024 * 1024;

/// The key bytes of a `whsec_<base64>` secret (a secret without the prefix is decoded whole;
/// one that is not base64 is used as raw bytes).
pub fn secret_key(secret: &str) -> Vec<u8> {
    let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
    STANDARD
        .decode(b64)
        .unwrap_or_else(|_| secret.as_bytes().to_vec())
}

fn mac_bytes(key: &[u8], id: &str, ts: i64, body: &[u8]) -> Vec<u8> {
    match <Hmac<Sha256> as KeyInit>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(ts.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            mac.finalize().into_bytes().to_vec()
        }
        // HMAC takes keys of any length; unreachable in practice.
        Err(_) => Vec::new(),
    }
}

/// The `webhook-signature` entry `v1,<base64 HMAC-SHA256 of "{id}.{ts}.{body}">`.
pub fn sign(secret: &str, id: &str, ts: i64, body: &[u8]) -> String {
    format!(
        "v1,{}",
        STANDARD.encode(mac_bytes(&secret_key(secret), id, ts, body))
    )
}

/// A fresh random secret, `whsec_` + base64 of 32 random bytes.
pub fn new_secret() -> String {
    let mut key = Vec::with_capacity(32);
    key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    format!("whsec_{}", STANDARD.encode(key))
}

/// The three Standard Webhooks headers for a body, for tests that play the sender.
pub fn signed_headers(secret: &str, id: &str, ts: i64, body: &[u8]) -> [(&'static str, String); 3] {
    [
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", sign(secret, id, ts, body)),
    ]
}

/// How to start a [`WebhookServer`].
#[derive(Clone, Debug)]
pub struct WebhookOptions {
    /// The signing secret (`whsec_…`).
    pub secret: String,
    /// How far `webhook-timestamp` may be from now.
    pub tolerance: Duration,
    /// The path advertised in [`WebhookServer::url`] (every path is accepted).
    pub path: String,
}

impl Default for WebhookOptions {
    fn default() -> Self {
        WebhookOptions {
            secret: new_secret(),
            tolerance: Duration::from_secs(300),
            path: "/webhook".to_string(),
        }
    }
}

/// What an injected fault does to a verified attempt.
#[derive(Clone, Debug, PartialEq)]
pub enum FaultKind {
    /// Answer this status (e.g. 500, 503, 429, 410) with an optional `Retry-After`.
    Status {
        status: u16,
        retry_after: Option<String>,
    },
    /// Record the attempt as delivered (200), but hold the answer back this long.
    Delay(Duration),
    /// Record the attempt as delivered (200), but hold the answer back until
    /// [`WebhookServer::release`] (or until the server stops).
    Hold,
    /// Close the connection without answering.
    Drop,
}

/// A fault applied to the next `times` verified attempts that match its filter.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub kind: FaultKind,
    /// How many more attempts it applies to (`usize::MAX`: until cleared).
    pub times: usize,
    /// Only requests whose path contains this.
    pub path_contains: Option<String>,
    /// Only requests whose raw body contains every one of these.
    pub body_contains: Vec<String>,
}

impl Fault {
    fn new(kind: FaultKind, times: usize) -> Fault {
        Fault {
            kind,
            times,
            path_contains: None,
            body_contains: Vec::new(),
        }
    }

    /// Answer `status` to the next `times` attempts.
    pub fn status(status: u16, times: usize) -> Fault {
        Fault::new(
            FaultKind::Status {
                status,
                retry_after: None,
            },
            times,
        )
    }

    /// Answer 410 Gone (the endpoint is retired) to the next `times` attempts.
    pub fn gone(times: usize) -> Fault {
        Fault::status(410, times)
    }

    /// Answer 429 with `Retry-After` to the next `times` attempts.
    pub fn rate_limited(times: usize, retry_after: impl Into<String>) -> Fault {
        Fault::status(429, times).with_retry_after(retry_after)
    }

    /// Hold back the answers to the next `times` attempts.
    pub fn delay(delay: Duration, times: usize) -> Fault {
        Fault::new(FaultKind::Delay(delay), times)
    }

    /// Hold back the answers to the next `times` attempts until [`WebhookServer::release`].
    pub fn hold(times: usize) -> Fault {
        Fault::new(FaultKind::Hold, times)
    }

    /// Close the connection of the next `times` attempts without answering.
    pub fn drop_connection(times: usize) -> Fault {
        Fault::new(FaultKind::Drop, times)
    }

    /// Add a `Retry-After` header to a status fault.
    pub fn with_retry_after(mut self, value: impl Into<String>) -> Fault {
        if let FaultKind::Status { retry_after, .. } = &mut self.kind {
            *retry_after = Some(value.into());
        }
        self
    }

    /// Only apply to requests whose path contains `needle`.
    pub fn on_path(mut self, needle: impl Into<String>) -> Fault {
        self.path_contains = Some(needle.into());
        self
    }

    /// Only apply to requests whose raw body contains `needle` (and every other needle
    /// given), e.g. `"type":"roster.user_created"` and a user name to pick one event.
    pub fn on_body(mut self, needle: impl Into<String>) -> Fault {
        self.body_contains.push(needle.into());
        self
    }

    /// Apply until [`WebhookServer::clear_faults`].
    pub fn forever(mut self) -> Fault {
        self.times = usize::MAX;
        self
    }
}

/// One verified attempt.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// `webhook-id`.
    pub id: String,
    /// `webhook-timestamp`.
    pub timestamp: i64,
    pub path: String,
    /// The body parsed as JSON.
    pub body: Value,
    /// The body as received.
    pub raw: Bytes,
    /// 1 for the first attempt with this id, 2 for the next, …
    pub attempt: u32,
    /// The status answered; `None` when the connection was dropped.
    pub status: Option<u16>,
    /// The receiver's logical clock when the attempt arrived (after verification).
    pub tick: u64,
    /// The receiver's logical clock when the answer went out; `None` while a fault holds
    /// it back, or when the connection was dropped. An attempt whose `tick` is above this
    /// was sent after the sender could have read this answer.
    pub answered: Option<u64>,
    pub received_at: DateTime<Utc>,
    /// Every request header (lower-case names).
    pub headers: Vec<(String, String)>,
}

impl Delivery {
    /// Whether it was answered 2xx.
    pub fn accepted(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }

    /// A request header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One rejected request.
#[derive(Clone, Debug)]
pub struct Rejection {
    /// 400 or 401.
    pub status: u16,
    pub reason: String,
    /// `webhook-id`, when there was one.
    pub id: Option<String>,
    pub received_at: DateTime<Utc>,
}

#[derive(Default)]
struct Log {
    attempts: Vec<Delivery>,
    per_id: HashMap<String, u32>,
    rejections: Vec<Rejection>,
    requests: u64,
}

struct Shared {
    secrets: Mutex<Vec<Vec<u8>>>,
    tolerance: Duration,
    faults: Mutex<Vec<Fault>>,
    log: Mutex<Log>,
    notify: Notify,
    /// The logical clock of [`Delivery::tick`]; not reset by [`WebhookServer::clear`], so
    /// an answer recorded after a clear never matches a later attempt.
    clock: AtomicU64,
    /// Bumped by [`WebhookServer::release`]: a held answer goes out once it moves past
    /// the value it saw when its attempt arrived.
    release: watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running webhook receiver; stops when dropped (or with [`WebhookServer::shutdown`]).
pub struct WebhookServer {
    /// The bound address.
    pub addr: SocketAddr,
    /// `http://127.0.0.1:port`.
    pub base_url: String,
    /// `base_url` + the configured path: the URL to give the sender.
    pub url: String,
    /// The secret the server was started with.
    pub secret: String,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl WebhookServer {
    /// Bind `127.0.0.1:0` and serve; panics when the socket cannot be bound.
    pub async fn start(opts: WebhookOptions) -> WebhookServer {
        match Self::try_start(opts).await {
            Ok(s) => s,
            Err(e) => panic!("cannot start the webhook test server: {e}"),
        }
    }

    /// Bind `127.0.0.1:0` and serve.
    pub async fn try_start(opts: WebhookOptions) -> io::Result<WebhookServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            secrets: Mutex::new(vec![secret_key(&opts.secret)]),
            tolerance: opts.tolerance,
            faults: Mutex::new(Vec::new()),
            log: Mutex::new(Log::default()),
            notify: Notify::new(),
            clock: AtomicU64::new(0),
            release: watch::Sender::new(0),
        });
        let app = Router::new()
            .fallback(handle)
            .with_state(shared.clone())
            .into_make_service_with_connect_info::<Conn>();
        let (shutdown_tx, mut shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let signal = async move {
                let _ = shutdown_rx.wait_for(|stop| *stop).await;
            };
            let _ = axum::serve(KillListener(listener), app)
                .with_graceful_shutdown(signal)
                .await;
        });
        let base_url = format!("http://{addr}");
        Ok(WebhookServer {
            addr,
            url: format!("{base_url}/{}", opts.path.trim_start_matches('/')),
            base_url,
            secret: opts.secret,
            shared,
            shutdown_tx,
            task: Mutex::new(Some(task)),
        })
    }

    /// Stop accepting connections and close the open ones; later attempts are refused.
    pub async fn shutdown(&self) {
        let _ = self.shutdown_tx.send(true);
        self.release();
        let task = lock(&self.task).take();
        if let Some(mut task) = task
            && tokio::time::timeout(Duration::from_secs(2), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }

    /// Also accept signatures made with `secret` (rotation).
    pub fn add_secret(&self, secret: &str) {
        lock(&self.shared.secrets).push(secret_key(secret));
    }

    /// Accept only signatures made with `secret` from now on.
    pub fn set_secret(&self, secret: &str) {
        *lock(&self.shared.secrets) = vec![secret_key(secret)];
    }

    /// Every verified attempt answered 2xx, in arrival order.
    pub fn deliveries(&self) -> Vec<Delivery> {
        lock(&self.shared.log)
            .attempts
            .iter()
            .filter(|d| d.accepted())
            .cloned()
            .collect()
    }

    /// Every verified attempt, whatever it was answered, in arrival order.
    pub fn attempts(&self) -> Vec<Delivery> {
        lock(&self.shared.log).attempts.clone()
    }

    /// The ids of the deliveries (attempts answered 2xx).
    pub fn unique_ids(&self) -> BTreeSet<String> {
        lock(&self.shared.log)
            .attempts
            .iter()
            .filter(|d| d.accepted())
            .map(|d| d.id.clone())
            .collect()
    }

    /// How many verified attempts carried this `webhook-id`.
    pub fn attempt_count(&self, id: &str) -> u32 {
        lock(&self.shared.log).per_id.get(id).copied().unwrap_or(0)
    }

    /// How many requests were rejected (bad or missing headers, signature, timestamp, body).
    pub fn rejected(&self) -> usize {
        lock(&self.shared.log).rejections.len()
    }

    /// The rejected requests with their reasons.
    pub fn rejections(&self) -> Vec<Rejection> {
        lock(&self.shared.log).rejections.clone()
    }

    /// How many requests arrived in all.
    pub fn request_total(&self) -> u64 {
        lock(&self.shared.log).requests
    }

    /// Forget every attempt and rejection.
    pub fn clear(&self) {
        let mut log = lock(&self.shared.log);
        *log = Log::default();
    }

    /// Add a fault; it applies from the next verified attempt on (first matching fault wins).
    pub fn inject(&self, fault: Fault) {
        lock(&self.shared.faults).push(fault);
    }

    /// Remove every pending fault.
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    /// Let every answer held by a [`Fault::hold`] go out.
    pub fn release(&self) {
        self.shared.release.send_modify(|g| *g += 1);
    }

    /// Wait until there are at least `n` deliveries, at most `timeout`; returns the
    /// deliveries at that point (fewer than `n` on timeout).
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Delivery> {
        self.wait_until(|s| s.delivery_count() >= n, timeout).await;
        self.deliveries()
    }

    /// How many deliveries (attempts answered 2xx) there are.
    pub fn delivery_count(&self) -> usize {
        lock(&self.shared.log)
            .attempts
            .iter()
            .filter(|d| d.accepted())
            .count()
    }

    /// Wait until `pred` holds (checked on every request and every 50 ms), at most
    /// `timeout`. Returns whether it held.
    pub async fn wait_until(&self, mut pred: impl FnMut(&Self) -> bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if pred(self) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let step = (deadline - now).min(Duration::from_millis(50));
            let _ = tokio::time::timeout(step, notified).await;
        }
    }
}

impl Drop for WebhookServer {
    fn drop(&mut self) {
        let _ = self.shutdown_tx.send(true);
        // A held answer would otherwise keep its connection, and the server task, alive.
        self.release();
    }
}

// ---------------------------------------------------------------------------------------
// Request handling.

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks 1–4 of the module docs; the parsed body, or the status and reason of a rejection.
fn verify(
    s: &Shared,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(String, i64, Value), (u16, String)> {
    let Some(id) = header_str(headers, "webhook-id") else {
        return Err((400, "missing webhook-id".into()));
    };
    let Some(ts_raw) = header_str(headers, "webhook-timestamp") else {
        return Err((400, "missing webhook-timestamp".into()));
    };
    let Ok(ts) = ts_raw.parse::<i64>() else {
        return Err((
            400,
            format!("webhook-timestamp '{ts_raw}' is not unix seconds"),
        ));
    };
    let Some(sigs) = header_str(headers, "webhook-signature") else {
        return Err((401, "missing webhook-signature".into()));
    };
    let candidates: Vec<Vec<u8>> = sigs
        .split(' ')
        .filter_map(|entry| entry.split_once(','))
        .filter(|(version, _)| *version == "v1")
        .filter_map(|(_, sig)| STANDARD.decode(sig).ok())
        .collect();
    if candidates.is_empty() {
        return Err((401, "no v1 signature in webhook-signature".into()));
    }
    let matched = lock(&s.secrets).iter().any(|key| {
        let expected = mac_bytes(key, id, ts, body);
        candidates.iter().any(|c| constant_time_eq(c, &expected))
    });
    if !matched {
        return Err((401, "no matching signature".into()));
    }
    let skew = (Utc::now().timestamp() - ts).unsigned_abs();
    if skew > s.tolerance.as_secs() {
        return Err((
            400,
            format!("webhook-timestamp {ts} is {skew}s away from now"),
        ));
    }
    match serde_json::from_slice(body) {
        Ok(v) => Ok((id.to_string(), ts, v)),
        Err(e) => Err((400, format!("body is not JSON: {e}"))),
    }
}

fn take_fault(s: &Shared, path: &str, body: &[u8]) -> Option<FaultKind> {
    let body = String::from_utf8_lossy(body);
    let mut faults = lock(&s.faults);
    let i = faults.iter().position(|f| {
        f.times > 0
            && f.path_contains.as_deref().is_none_or(|n| path.contains(n))
            && f.body_contains.iter().all(|n| body.contains(n.as_str()))
    })?;
    let fault = &mut faults[i];
    if fault.times != usize::MAX {
        fault.times -= 1;
    }
    let kind = fault.kind.clone();
    if fault.times == 0 {
        faults.remove(i);
    }
    Some(kind)
}

fn plain(status: StatusCode, msg: String) -> Response {
    (status, msg).into_response()
}

async fn handle(
    State(s): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    lock(&s.log).requests += 1;
    if parts.method != Method::POST {
        s.notify.notify_waiters();
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "use POST".into());
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            s.notify.notify_waiters();
            return plain(StatusCode::PAYLOAD_TOO_LARGE, "body too large".into());
        }
    };
    let (id, timestamp, json) = match verify(&s, &parts.headers, &body) {
        Ok(v) => v,
        Err((status, reason)) => {
            lock(&s.log).rejections.push(Rejection {
                status,
                reason: reason.clone(),
                id: header_str(&parts.headers, "webhook-id").map(str::to_string),
                received_at: Utc::now(),
            });
            s.notify.notify_waiters();
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
            return plain(code, reason);
        }
    };
    let path = parts.uri.path().to_string();
    let fault = take_fault(&s, &path, &body);
    let held_from = *s.release.borrow();
    let (status, response, delay) = match fault {
        None => (Some(200), StatusCode::OK.into_response(), None),
        Some(FaultKind::Drop) => {
            conn.drop_connection();
            (
                None,
                StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                None,
            )
        }
        Some(FaultKind::Delay(d)) => (
            Some(200),
            StatusCode::OK.into_response(),
            Some(Wait::For(d)),
        ),
        Some(FaultKind::Hold) => (
            Some(200),
            StatusCode::OK.into_response(),
            Some(Wait::Release),
        ),
        Some(FaultKind::Status {
            status,
            retry_after,
        }) => {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut r = plain(code, format!("injected fault: {status}"));
            if let Some(v) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            (Some(code.as_u16()), r, None)
        }
    };
    let headers = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let tick = {
        let mut log = lock(&s.log);
        let tick = s.clock.fetch_add(1, Ordering::SeqCst);
        let n = log.per_id.entry(id.clone()).or_insert(0);
        *n += 1;
        let attempt = *n;
        log.attempts.push(Delivery {
            id,
            timestamp,
            path,
            body: json,
            raw: body,
            attempt,
            status,
            tick,
            answered: None,
            received_at: Utc::now(),
            headers,
        });
        tick
    };
    s.notify.notify_waiters();
    match delay {
        Some(Wait::For(d)) => tokio::time::sleep(d).await,
        Some(Wait::Release) => {
            let mut released = s.release.subscribe();
            let _ = released.wait_for(|g| *g > held_from).await;
        }
        None => {}
    }
    if status.is_some() {
        // Taken before the answer is written, so whatever the sender sends after reading
        // it arrives with a higher tick.
        let answered = s.clock.fetch_add(1, Ordering::SeqCst);
        let mut log = lock(&s.log);
        if let Some(d) = log.attempts.iter_mut().rev().find(|d| d.tick == tick) {
            d.answered = Some(answered);
        }
        drop(log);
        s.notify.notify_waiters();
    }
    response
}

/// How long an answer is held back.
enum Wait {
    For(Duration),
    Release,
}
