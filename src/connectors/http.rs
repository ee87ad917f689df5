//! One HTTP request to a target and what its answer means for delivery. The retry
//! decision lives here (retry 408, 425, 429, 5xx but 501, and transport errors; honour
//! `Retry-After`); the waiting between attempts is the dispatcher's.

use chrono::Utc;
use reqwest::{Method, StatusCode};
use std::time::Duration;

use crate::store::{SentRequest, TargetResponse};

/// Longest `Retry-After` honoured; a target asking for more is treated as asking for this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// How much of a target's error body is kept in a dead letter.
const KEPT_BODY: usize = 4096;

/// Check a target URL from a connector file: an http(s) URL with a host. `"http://"` or
/// `"not a url"` would otherwise pass the check and fail every delivery until the
/// connector paused. A base URL that paths are appended to takes no query either.
pub(super) fn check_url(key: &str, url: &str, base: bool) -> Result<(), String> {
    let ok = reqwest::Url::parse(url).is_ok_and(|u| {
        matches!(u.scheme(), "http" | "https")
            && u.host_str().is_some_and(|h| !h.is_empty())
            && u.fragment().is_none()
            && !(base && u.query().is_some())
    });
    if ok {
        Ok(())
    } else {
        // Shown by scheme and host alone: the URL may carry credentials.
        let shown = match reqwest::Url::parse(url) {
            Ok(_) => shown_url(url),
            Err(_) => format!("a value of {} characters", url.chars().count()),
        };
        Err(format!(
            "key `{key}`: {shown} is not an http(s) URL with a host{}",
            if base {
                " (and no query or fragment)"
            } else {
                " (and no fragment)"
            }
        ))
    }
}

/// A request a connector wants sent. Built once, sent as often as retries need.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    pub url: String,
    /// JSON body.
    pub body: Option<Vec<u8>>,
    /// A DELETE whose object is already gone (404) succeeded.
    pub absent_ok: bool,
    /// The webhook message id, when this is a webhook delivery (it is signed per attempt).
    pub message_id: Option<String>,
}

impl Request {
    pub fn put(url: String, body: &serde_json::Value) -> Request {
        Request {
            method: Method::PUT,
            url,
            body: Some(body.to_string().into_bytes()),
            absent_ok: false,
            message_id: None,
        }
    }

    pub fn delete(url: String) -> Request {
        Request {
            method: Method::DELETE,
            url,
            body: None,
            absent_ok: true,
            message_id: None,
        }
    }

    pub fn get(url: String) -> Request {
        Request {
            method: Method::GET,
            url,
            body: None,
            absent_ok: false,
            message_id: None,
        }
    }

    /// The request as a dead letter records it.
    pub fn record(&self) -> SentRequest {
        SentRequest {
            method: self.method.to_string(),
            url: recorded_url(&self.url),
            body: self
                .body
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned()),
        }
    }
}

/// What one attempt came to.
#[derive(Debug)]
pub enum Outcome {
    /// 2xx (or 404 for a DELETE of something already gone). Body and headers are kept
    /// for GETs (a list's total comes in `X-Total-Count`).
    Delivered {
        status: u16,
        headers: reqwest::header::HeaderMap,
        body: bytes::Bytes,
    },
    /// Worth trying again later.
    Retry {
        reason: String,
        retry_after: Option<Duration>,
        response: Option<TargetResponse>,
    },
    /// 401: the credentials need refreshing; then it is worth another try.
    Unauthorized { response: TargetResponse },
    /// 410: the target says this endpoint is gone for good (webhooks).
    Gone { response: TargetResponse },
    /// The target refused this request and would refuse it again: a dead letter.
    Refused {
        reason: String,
        response: TargetResponse,
    },
}

/// Send one attempt. `extra` are headers added per attempt (authorization, signatures).
pub async fn send(
    client: &reqwest::Client,
    req: &Request,
    extra: Vec<(&'static str, String)>,
    timeout: Duration,
) -> Outcome {
    let mut b = client
        .request(req.method.clone(), &req.url)
        .timeout(timeout);
    if let Some(body) = &req.body {
        b = b
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone());
    }
    for (k, v) in &extra {
        b = b.header(*k, v.as_str());
    }
    let mut resp = match b.send().await {
        Ok(r) => r,
        Err(e) => {
            let what = if e.is_timeout() {
                "timed out"
            } else if e.is_connect() {
                "could not connect"
            } else {
                "transport error"
            };
            return Outcome::Retry {
                reason: format!("{what}: {}", transport_error(e, &req.url)),
                retry_after: None,
                response: None,
            };
        }
    };
    let status = resp.status();
    let header = |name| resp.headers().get(name).and_then(|v| v.to_str().ok());
    let retry_after = header(reqwest::header::RETRY_AFTER)
        .and_then(|v| parse_retry_after(v, header(reqwest::header::DATE)));
    let headers = std::mem::take(resp.headers_mut());
    // Only a read-back's 2xx is used whole; of any other answer no more is looked at
    // than is searched for secrets.
    let limit = if status.is_success() && req.method == Method::GET {
        MAX_READ_ANSWER
    } else {
        SEARCHED_BODY
    };
    let body = match read_capped(&mut resp, limit).await {
        Ok(Answer::Whole(b)) => b,
        Ok(Answer::Cut(b)) if limit == SEARCHED_BODY => b,
        Ok(Answer::Cut(_)) => {
            return Outcome::Retry {
                reason: format!(
                    "answer {status} is larger than {} MiB, more than a page of `limit=1000` objects needs; rosterd stopped reading it",
                    MAX_READ_ANSWER >> 20
                ),
                retry_after,
                response: None,
            };
        }
        Err(e) => {
            return Outcome::Retry {
                reason: format!("answer {status} cut off: {}", body_error(e, &req.url)),
                retry_after,
                response: None,
            };
        }
    };
    classify(req, status, retry_after, headers, body, &extra)
}

/// The largest answer read whole: a read-back's page of 1,000 users is about 1 MB.
const MAX_READ_ANSWER: usize = 32 << 20;

/// An answer as far as it was read.
pub(super) enum Answer {
    Whole(bytes::Bytes),
    /// The first `limit` bytes of a longer answer. The rest is left unread and the
    /// connection closed, rather than drained.
    Cut(bytes::Bytes),
}

/// The most room an answer is given before its bytes arrive.
const PRESIZED_MAX: usize = 4 << 20;

/// Reads at most `limit` bytes of an answer. A target that answered with a body of a
/// gigabyte, or one without end, was read whole into memory (a 16 MiB error answer took
/// the daemon from 73 to 152 MB), or read until the timeout.
pub(super) async fn read_capped(
    resp: &mut reqwest::Response,
    limit: usize,
) -> Result<Answer, reqwest::Error> {
    // Sized up front when the length is given, so that a large page is not copied from
    // buffer to doubled buffer as it arrives; but only so far, as a target that
    // announces 40 MB and sends little would otherwise be given the whole limit at once.
    let announced = resp
        .content_length()
        .map_or(0, |n| n.min(limit.min(PRESIZED_MAX) as u64) as usize);
    let mut buf = bytes::BytesMut::with_capacity(announced);
    while let Some(chunk) = resp.chunk().await? {
        let room = limit - buf.len();
        if chunk.len() > room {
            buf.extend_from_slice(&chunk[..room]);
            return Ok(Answer::Cut(buf.freeze()));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Answer::Whole(buf.freeze()))
}

/// What a target that echoes requests back would put in its answer, to be kept out of
/// dead letters, `last_error` and the log (see [`redact`]): the `Authorization` value and
/// its credentials alone, and, for a target that takes its credentials in the URL
/// (`?token=…`) and echoes the path, what [`crate::config::url_secrets`] finds there. Gathered only
/// for an answer that is kept, not for every delivery.
fn sent_credentials(req: &Request, extra: &[(&'static str, String)]) -> Vec<String> {
    let mut secrets: Vec<String> = extra
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .flat_map(|(_, v)| {
            let credentials = v.split_once(' ').map(|(_, c)| c.to_owned());
            [Some(v.clone()), credentials].into_iter().flatten()
        })
        .collect();
    if let Ok(u) = reqwest::Url::parse(&req.url) {
        secrets.extend(crate::config::url_secrets(&u));
    }
    secrets
}

fn classify(
    req: &Request,
    status: StatusCode,
    retry_after: Option<Duration>,
    headers: reqwest::header::HeaderMap,
    body: bytes::Bytes,
    extra: &[(&'static str, String)],
) -> Outcome {
    let response = || {
        let secrets = sent_credentials(req, extra);
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        TargetResponse {
            status: status.as_u16(),
            body: kept_answer(&body, KEPT_BODY, &secrets),
        }
    };
    let code = status.as_u16();
    if status.is_success() || (req.absent_ok && code == 404) {
        return Outcome::Delivered {
            status: code,
            headers,
            body,
        };
    }
    if status.is_redirection() && !matches!(code, 301 | 302 | 303 | 307 | 308) {
        // 300, 304 (which answers only a conditional GET), 305, 306: no redirect to name.
        return Outcome::Retry {
            reason: format!(
                "target answered {status}, which is no answer to a {}",
                req.method
            ),
            retry_after,
            response: Some(response()),
        };
    }
    if status.is_redirection() {
        // Not followed (the client is built so): reqwest would send a PUT redirected by
        // 301 or 302 on as a GET without its body, and count the GET's 200 as delivered;
        // and a 307 or 308 takes the body, roster data, to whatever host it names. Every
        // request to that URL would be redirected alike, so it is retried until the
        // connector pauses, saying where the target points.
        return Outcome::Retry {
            reason: format!(
                "target answered {status}, redirecting to {}: rosterd does not follow redirects; set the connector's URL to the address the target means",
                redirect_target(&headers)
            ),
            retry_after,
            response: Some(response()),
        };
    }
    match code {
        401 => Outcome::Unauthorized {
            response: response(),
        },
        410 if req.message_id.is_some() => Outcome::Gone {
            response: response(),
        },
        501 => Outcome::Refused {
            reason: format!("target answered {status}: it does not implement this request"),
            response: response(),
        },
        408 | 425 | 429 | 500..=599 => {
            let response = response();
            Outcome::Retry {
                reason: with_answer(format!("target answered {status}"), &response.body),
                retry_after,
                response: Some(response),
            }
        }
        _ => Outcome::Refused {
            reason: match code {
                403 => format!("target answered {status}: this object is not ours to change"),
                404 => format!("target answered {status}: the object or a reference is missing"),
                409 => format!("target answered {status}: conflict"),
                _ => format!("target answered {status}"),
            },
            response: response(),
        },
    }
}

/// Why a target's answer is not the JSON expected, without quoting it: serde's words may
/// hold a value (`invalid type: string "ada@…"`), and the reason reaches `/status`, which
/// takes no token. Then only what kind of error, and where.
pub fn json_error_unquoted(e: &serde_json::Error) -> String {
    let said = e.to_string();
    if !said.contains(['"', '`']) {
        return said;
    }
    let kind = match e.classify() {
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Eof => "JSON cut short",
        serde_json::error::Category::Data => "JSON of another shape",
        serde_json::error::Category::Io => "unreadable",
    };
    format!("{kind} at line {} column {}", e.line(), e.column())
}

/// A retried failure's reason with the start of what the target said: a retry keeps no
/// dead letter, and "target answered 500" alone sent the operator to the target's logs to
/// learn which object and why. Blanks run together, so an HTML page reads on one line.
pub fn with_answer(reason: String, body: &str) -> String {
    match brief_answer(body) {
        Some(brief) => format!("{reason}: {brief}"),
        None => reason,
    }
}

/// The start of a target's answer as [`with_answer`] quotes it; None for an empty one.
pub fn brief_answer(body: &str) -> Option<String> {
    const SHOWN: usize = 200;
    let brief = body.split_whitespace().collect::<Vec<_>>().join(" ");
    if brief.is_empty() {
        return None;
    }
    Some(match brief.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{}…", &brief[..end]),
        None => brief,
    })
}

/// `Retry-After` as delay-seconds or an HTTP date. A date is measured from the answer's
/// own `Date` when it has one (RFC 9110 §10.2.3): the target meant its clock, and ours may
/// be a day off, which made a wait of ten seconds one of an hour (the cap) or none.
pub fn parse_retry_after(v: &str, date: Option<&str>) -> Option<Duration> {
    let v = v.trim();
    let d = if let Ok(secs) = v.parse::<u64>() {
        Duration::from_secs(secs)
    } else if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // More seconds than a u64 holds is still a wait longer than the cap, not none.
        MAX_RETRY_AFTER
    } else {
        let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
        let sent = date
            .and_then(|d| chrono::DateTime::parse_from_rfc2822(d.trim()).ok())
            .map_or_else(Utc::now, |d| d.with_timezone(&Utc));
        (at.with_timezone(&Utc) - sent)
            .to_std()
            .unwrap_or(Duration::ZERO)
    };
    Some(d.min(MAX_RETRY_AFTER))
}

/// How much of an answer is searched for secrets before it is cut to what is kept: a
/// secret straddling the cut would otherwise keep its first part.
pub(super) const SEARCHED_BODY: usize = 64 * 1024;

/// Up to `limit` bytes of a target's answer, as kept in a dead letter, `last_error` and
/// the log: the credentials the request carried (`secrets`) replaced by `[redacted]`
/// first, then cut, and a cut that leaves the start of a secret at the end drops it too.
pub fn kept_answer(body: &[u8], limit: usize, secrets: &[&str]) -> String {
    let text = redact(
        &String::from_utf8_lossy(&body[..body.len().min(SEARCHED_BODY)]),
        secrets,
    );
    if text.len() <= limit {
        return text;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut kept = text[..end].to_owned();
    // A secret the cut splits: its echoed start, from a point where the rest of the
    // kept text reads as the secret's first characters.
    for secret in secrets.iter().filter(|s| s.len() >= MIN_SECRET) {
        let wanted: Vec<char> = secret.chars().collect();
        // No escape is longer than 12 bytes a character.
        let from = kept.len().saturating_sub(12 * wanted.len());
        let split = (from..kept.len())
            .filter(|&at| kept.is_char_boundary(at))
            .find(|&at| echoed_start_to_end(&kept, at, &wanted));
        if let Some(at) = split {
            kept.truncate(at);
            kept.push_str("[redacted]");
        }
    }
    kept
}

/// Shorter values are not taken for secrets: replacing them would garble the text.
const MIN_SECRET: usize = 8;
/// The shortest start of a secret left at a cut that is taken for one.
const MIN_PARTIAL: usize = 4;

/// `text` (a target's answer, an error) with every secret in it replaced by `[redacted]`,
/// however the target wrote it back. A target that echoes what it was sent (many answer
/// a 400 or a 401 with the request's headers or form) would otherwise put the bearer
/// token or the client secret in dead letters, which `roster:read` lists, and in the log
/// and `/status`, which need no token. Each character of the secret may be echoed as it
/// is, in the other case, or escaped as any encoder writes it (see [`echoed_chars`]), so
/// PHP's `\/`, .NET's `\u002B`, Python's `quote` and HTML all match; and the secret may
/// be echoed in base64.
pub fn redact(text: &str, secrets: &[&str]) -> String {
    let mut secrets: Vec<&str> = secrets
        .iter()
        .copied()
        .filter(|s| s.len() >= MIN_SECRET)
        .collect();
    // Longest first: one secret may hold another (a Basic header holds the URL's user
    // name and password, in base64). The user name's base64 taken out of the header's
    // first left it no longer whole, and a letter of it between two `[redacted]`.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut out = text.to_owned();
    for secret in secrets {
        out = redact_one(&out, secret);
    }
    out
}

fn redact_one(text: &str, secret: &str) -> String {
    use base64::Engine as _;
    let wanted: Vec<char> = secret.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    while at < text.len() {
        // A target that echoes a credential cut short ("invalid token 'abcd…'"): a start
        // of it long enough to narrow a guess goes too.
        let end = match walk_echo(text, at, &wanted) {
            Walk::Whole(end) => Some(end),
            Walk::Start(n, end) if n >= MIN_ECHOED_START.max(wanted.len() / 2) => Some(end),
            _ => None,
        };
        if let Some(end) = end {
            out.push_str("[redacted]");
            at = end;
            continue;
        }
        let c = text[at..].chars().next().unwrap_or_default();
        out.push(c);
        at += c.len_utf8().max(1);
    }
    for encoded in [
        base64::engine::general_purpose::STANDARD.encode(secret),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret),
    ] {
        if out.contains(&encoded) {
            out = out.replace(&encoded, "[redacted]");
        }
    }
    out
}

/// Whether `text` from `at` to its end is an echo of the start of `wanted` (at least
/// [`MIN_PARTIAL`] characters of it, not all): what a cut leaves of a secret.
fn echoed_start_to_end(text: &str, at: usize, wanted: &[char]) -> bool {
    matches!(walk_echo(text, at, wanted), Walk::CutAfter(n) if n >= MIN_PARTIAL)
}

enum Walk {
    /// The whole secret, ending here.
    Whole(usize),
    /// The text ended after this many of its characters.
    CutAfter(usize),
    /// Only this many of its first characters, ending here.
    Start(usize, usize),
    No,
}

/// The shortest start of a credential, echoed inside an answer, that is taken for one.
const MIN_ECHOED_START: usize = 12;

/// Read `text` from `at` as an echo of `wanted`. A position may read two ways, as
/// written and as an escape (`%25` is `%`, and `%` followed by `25`; `&amp;`, `\\`), and
/// a secret may hold either, so both are tried, within a bound on the steps.
fn walk_echo(text: &str, at: usize, wanted: &[char]) -> Walk {
    // Most positions start nothing like the secret: answered before anything is allocated.
    let first = |c: char| wanted.first().is_some_and(|&w| reads_as(c, w));
    let starts = text[at..].chars().next().is_some_and(first)
        || echoed_chars(&text[at..]).into_iter().any(|(c, _)| first(c));
    if !starts {
        return Walk::No;
    }
    let mut todo = vec![(at, 0usize)];
    let mut longest_cut = None;
    let mut longest_start = (0, at);
    let mut steps = 0;
    while let Some((pos, n)) = todo.pop() {
        if n == wanted.len() {
            return Walk::Whole(pos);
        }
        if n > longest_start.0 {
            longest_start = (n, pos);
        }
        if pos == text.len() {
            longest_cut = longest_cut.max(Some(n));
            continue;
        }
        steps += 1;
        if steps > 8 * wanted.len() + 64 {
            break;
        }
        let same = |c: char| reads_as(c, wanted[n]);
        let Some(literal) = text[pos..].chars().next() else {
            continue;
        };
        // Pushed last, tried first: the escape.
        if same(literal) {
            todo.push((pos + literal.len_utf8(), n + 1));
        }
        for (c, taken) in echoed_chars(&text[pos..]) {
            if same(c) {
                todo.push((pos + taken, n + 1));
            }
        }
    }
    match (longest_cut, longest_start) {
        (Some(n), _) => Walk::CutAfter(n),
        (None, (0, _)) => Walk::No,
        (None, (n, end)) => Walk::Start(n, end),
    }
}

/// Whether an echoed character `c` stands for the secret's `w`: the same, in the other
/// case, or a form's `+` decoded to a space by a target that echoes the decoded value.
fn reads_as(c: char, w: char) -> bool {
    c == w || c.to_lowercase().eq(w.to_lowercase()) || (w == '+' && c == ' ')
}

/// The characters an escape at the start of `s` may stand for, each with its length:
/// `\/`, `\"`, `\\`, `\uXXXX`, `\xXX`, the same escaped again (JSON inside a JSON
/// string), `%XX` (a UTF-8 sequence of them, or of `%25XX` when encoded twice), `+` (a
/// space, in a form), `&#NN;`, `&#xNN;`, `&amp;`, `&lt;`, `&gt;`, `&quot;`, `&apos;`. A
/// position can read more than one way (`%2525` is `%25` encoded once, or `%` twice), so
/// every reading is given.
fn echoed_chars(s: &str) -> Vec<(char, usize)> {
    let b = s.as_bytes();
    let hex = |from: usize, n: usize| {
        s.get(from..from + n)
            .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
            .and_then(|h| u32::from_str_radix(h, 16).ok())
    };
    let mut found = Vec::new();
    match b.first() {
        Some(b'\\') => {
            let escape = |k: usize| match *b.get(k)? {
                c @ (b'/' | b'"' | b'\\' | b'\'') => Some((c as char, k + 1)),
                b'u' => Some((char::from_u32(hex(k + 1, 4)?)?, k + 5)),
                b'x' => Some((char::from_u32(hex(k + 1, 2)?)?, k + 3)),
                _ => None,
            };
            let run = b.iter().take_while(|&&c| c == b'\\').count();
            // Once (`\\` a backslash, `\/`), twice (`\\\\` a backslash, `\\\/`, `\\u002B`).
            found.extend(escape(1));
            if run >= 3 {
                found.extend(escape(3));
            }
            if run >= 2 && run != 3 {
                found.extend(escape(2).filter(|&(c, _)| c != '\\'));
            }
            if run >= 4 {
                found.push(('\\', 4));
            }
        }
        Some(b'%') => {
            for step in [3, 5] {
                let mut bytes = Vec::new();
                while bytes.len() < 4 {
                    let at = step * bytes.len();
                    let marker = if step == 3 { "%" } else { "%25" };
                    let Some(v) = s
                        .get(at..)
                        .filter(|t| t.starts_with(marker))
                        .and_then(|_| hex(at + step - 2, 2))
                    else {
                        break;
                    };
                    bytes.push(v as u8);
                    if let Ok(t) = std::str::from_utf8(&bytes) {
                        found.extend(t.chars().next().map(|c| (c, step * bytes.len())));
                        break;
                    }
                }
            }
        }
        Some(b'+') => found.push((' ', 1)),
        Some(b'&') => {
            let entity = || {
                let end = s.char_indices().take(12).find(|&(_, c)| c == ';')?.0;
                let name = &s[1..end];
                let c = match name {
                    "amp" => '&',
                    "lt" => '<',
                    "gt" => '>',
                    "quot" => '"',
                    "apos" => '\'',
                    _ => {
                        let code = match name.strip_prefix("#x").or_else(|| name.strip_prefix("#X"))
                        {
                            Some(h) => u32::from_str_radix(h, 16).ok()?,
                            None => name.strip_prefix('#')?.parse().ok()?,
                        };
                        char::from_u32(code)?
                    }
                };
                Some((c, end + 1))
            };
            found.extend(entity());
        }
        _ => {}
    }
    found
}

/// A URL for the log and `/status`: its scheme, host and port, the rest elided. A
/// target's credentials are often in the URL itself: a user name or password, a query
/// (`?token=…`), or the path (a Slack-style `/services/…/SECRET` webhook). The
/// connector's name says which URL it is.
pub fn shown_url(url: &str) -> String {
    let Ok(u) = reqwest::Url::parse(url) else {
        return "an address that is not a URL".to_owned();
    };
    let mut out = format!("{}://", u.scheme());
    if !u.username().is_empty() || u.password().is_some() {
        out.push_str("redacted@");
    }
    out.push_str(u.host_str().unwrap_or_default());
    if let Some(port) = u.port() {
        out.push_str(&format!(":{port}"));
    }
    if u.path() != "/" || u.query().is_some() || u.fragment().is_some() {
        out.push_str("/…");
    }
    out
}

/// A reqwest error for the log and `/status`: its causes, and the URL it was about as
/// [`shown_url`] shows it (reqwest's own text carries the whole URL, credentials and all).
pub(super) fn transport_error(e: reqwest::Error, url: &str) -> String {
    let chain = error_chain(&e.without_url());
    format!("{chain} ({}){}", shown_url(url), scheme_hint(&chain, url))
}

/// [`transport_error`] once the answer's status line was read: the target spoke HTTP on
/// that scheme, so a reset is no hint that it speaks another.
pub(super) fn body_error(e: reqwest::Error, url: &str) -> String {
    format!("{} ({})", error_chain(&e.without_url()), shown_url(url))
}

/// A URL whose scheme the target does not speak fails with an error that does not say
/// so ("invalid HTTP version parsed", "connection reset", a TLS message): which one it
/// likely is, for the operator to check.
fn scheme_hint(chain: &str, url: &str) -> &'static str {
    let lower = chain.to_ascii_lowercase();
    if url.starts_with("http://")
        && ["invalid http version", "connection reset"]
            .iter()
            .any(|s| lower.contains(s))
    {
        "; does the target speak https://? The URL says http://, and a TLS server answers plain HTTP so (a plain HTTP server whose answer broke HTTP, a body sent with a 204 say, does too)"
    } else if url.starts_with("https://")
        && [
            "invalidcontenttype",
            "corrupt message",
            "invalid message",
            "wrong version",
        ]
        .iter()
        .any(|s| lower.contains(s))
    {
        "; does the target speak http://? The URL says https://, and a server without TLS answers it so"
    } else {
        ""
    }
}

/// Where a 3xx answer points, as [`shown_url`] shows it.
pub(super) fn redirect_target(headers: &reqwest::header::HeaderMap) -> String {
    match headers.get(reqwest::header::LOCATION) {
        None => "nowhere (no Location header)".to_owned(),
        Some(v) => match v.to_str() {
            Ok(to) => shown_url(to),
            // Its bytes may hold credentials as well as any URL: not shown.
            Err(_) => "a Location that is not visible ASCII (not shown)".to_owned(),
        },
    }
}

/// A request's URL as a dead letter keeps it: the path (which names the object) stays,
/// and user name, password and the query's values are replaced by `redacted`.
pub fn recorded_url(url: &str) -> String {
    let Ok(mut u) = reqwest::Url::parse(url) else {
        return url.to_owned();
    };
    if !u.username().is_empty() {
        let _ = u.set_username("redacted");
    }
    if u.password().is_some() {
        let _ = u.set_password(Some("redacted"));
    }
    if let Some(q) = u.query() {
        let shown = q
            .split('&')
            .map(|pair| format!("{}=redacted", pair.split_once('=').map_or(pair, |(k, _)| k)))
            .collect::<Vec<_>>()
            .join("&");
        u.set_query(Some(&shown));
    }
    u.set_fragment(None);
    u.to_string()
}

/// reqwest's errors hide the useful part ("connection refused") in their sources.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A `Location` that is not visible ASCII was reported as "redirecting to nowhere",
    /// sending the operator to look for a header that was there.
    #[test]
    fn a_redirect_says_where_it_points_or_why_it_does_not() {
        use reqwest::header::{HeaderMap, HeaderValue, LOCATION};
        let mut h = HeaderMap::new();
        assert_eq!(redirect_target(&h), "nowhere (no Location header)");
        h.insert(
            LOCATION,
            HeaderValue::from_bytes(b"https://h.example/\xff").unwrap(),
        );
        assert_eq!(
            redirect_target(&h),
            "a Location that is not visible ASCII (not shown)"
        );
        h.insert(
            LOCATION,
            HeaderValue::from_static("https://u:secret@h.example/x?token=t1"),
        );
        let shown = redirect_target(&h);
        assert!(
            shown.contains("h.example") && !shown.contains("secret") && !shown.contains("t1"),
            "{shown}"
        );
    }

    fn outcome(method: Method, code: u16) -> Outcome {
        let req = Request {
            absent_ok: method == Method::DELETE,
            method,
            url: "http://x/".into(),
            body: None,
            message_id: None,
        };
        classify(
            &req,
            StatusCode::from_u16(code).unwrap(),
            None,
            reqwest::header::HeaderMap::new(),
            bytes::Bytes::new(),
            &[],
        )
    }

    #[test]
    fn retry_decision_follows_the_status() {
        for code in [408, 425, 429, 500, 502, 503, 504] {
            assert!(
                matches!(outcome(Method::PUT, code), Outcome::Retry { .. }),
                "{code}"
            );
        }
        for code in [400, 403, 409, 422, 501] {
            assert!(
                matches!(outcome(Method::PUT, code), Outcome::Refused { .. }),
                "{code}"
            );
        }
        assert!(matches!(
            outcome(Method::PUT, 401),
            Outcome::Unauthorized { .. }
        ));
        assert!(matches!(
            outcome(Method::DELETE, 404),
            Outcome::Delivered { .. }
        ));
        assert!(matches!(
            outcome(Method::PUT, 201),
            Outcome::Delivered { .. }
        ));
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        assert_eq!(parse_retry_after("7", None), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("999999", None), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", None),
            Some(Duration::ZERO)
        );
        let later = (Utc::now() + chrono::Duration::seconds(120)).to_rfc2822();
        let d = parse_retry_after(&later, None).unwrap();
        assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120));
        assert_eq!(parse_retry_after("soon", None), None);
        // Too many seconds for a u64 is a long wait, not none; a negative one is none.
        assert_eq!(
            parse_retry_after("99999999999999999999", None),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(parse_retry_after("-5", None), None);
        // A date is read against the answer's Date, whatever our clock says: ten seconds
        // from a target whose clock reads 2015.
        assert_eq!(
            parse_retry_after(
                "Wed, 21 Oct 2015 07:28:10 GMT",
                Some("Wed, 21 Oct 2015 07:28:00 GMT")
            ),
            Some(Duration::from_secs(10))
        );
        // An unreadable Date falls back to our clock.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", Some("yesterday")),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn a_basic_header_echoed_back_is_redacted_whole() {
        // The URL's user name and password are secrets, and so is the header made of
        // them; the user name's base64 is the header's start.
        let header = "Basic aG9va3VzZXI6aG9va3Bhc3N3MHJkOTk=";
        let echoed = format!("{{\"authorization\": \"{header}\"}}");
        let shown = redact(&echoed, &["hookuser", "hookpassw0rd99", header]);
        assert_eq!(shown, "{\"authorization\": \"[redacted]\"}");
        // As a webhook whose URL carries them gathers them (reqwest makes the header).
        let url = reqwest::Url::parse("http://hookuser:hookpassw0rd99@127.0.0.1/h").unwrap();
        let secrets = crate::config::url_secrets(&url);
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        assert_eq!(
            redact(&echoed, &secrets),
            "{\"authorization\": \"Basic [redacted]\"}"
        );
    }

    #[test]
    fn secrets_are_redacted_in_every_form_a_target_echoes_them() {
        use base64::Engine as _;
        let secret = "S3cret value/+=";
        let echoes = [
            format!("Bearer {secret}"),
            format!(
                "client_secret={}&x=1",
                form_urlencoded::byte_serialize(secret.as_bytes()).collect::<String>()
            ),
            // Python's quote (keeps `/`), lower-case hex, and `-`-style over-encoding.
            "S3cret%20value/%2B%3D".to_owned(),
            "S3cret%20value%2f%2b%3d".to_owned(),
            "%53%33cret value/+=".to_owned(),
            // PHP, .NET (only `+`), everything escaped, and HTML.
            "S3cret value\\/+=".to_owned(),
            "S3cret value/\\u002B=".to_owned(),
            "\\u0053\\u0033cret\\u0020value\\u002f\\u002b\\u003d".to_owned(),
            "S3cret value&#x2F;&#43;&#61;".to_owned(),
            "s3CRET VALUE/+=".to_owned(),
            base64::engine::general_purpose::STANDARD.encode(secret),
        ];
        for echoed in &echoes {
            let shown = redact(&format!("{{\"seen\": \"{echoed}\"}}"), &[secret, "short"]);
            assert!(
                !shown.to_lowercase().contains("s3cret") && shown.contains("[redacted]"),
                "{echoed}: {shown}"
            );
        }
        // Characters JSON and HTML escape, and letters beyond ASCII.
        let odd = "CANARY\"Q\\uo<t&e>9-ïé";
        for echoed in [
            serde_json::to_string(odd).unwrap(),
            "CANARY&quot;Q\\uo&lt;t&amp;e&gt;9-ïé".to_owned(),
            "CANARY%22Q%5Cuo%3Ct%26e%3E9-%C3%AF%C3%A9".to_owned(),
        ] {
            let shown = redact(&echoed, &[odd]);
            assert!(!shown.contains("CANARY"), "{echoed}: {shown}");
        }
        // A secret that itself reads like an escape, echoed as it is.
        for odd in [
            "CANARY%25Pct-4f1e9a",
            "CANARY&amp;Amp-81cd",
            "CANARY\\BackSl-77ab",
        ] {
            for echoed in [odd.to_owned(), serde_json::to_string(odd).unwrap()] {
                let shown = redact(&echoed, &[odd]);
                assert!(!shown.contains("CANARY"), "{echoed}: {shown}");
            }
        }
        // The same secrets and others encoded again: percent-encoded (`%` as `%25`),
        // JSON inside a JSON string, and non-ASCII encoded twice.
        for (odd, echoed) in [
            ("CANARY%25Pct-4f1e9a", "CANARY%2525Pct-4f1e9a".to_owned()),
            (
                "CANARY%+&\\x-Mix-93",
                serde_json::to_string(&serde_json::to_string("CANARY%+&\\x-Mix-93").unwrap())
                    .unwrap(),
            ),
            (
                "CANARY%+&\\x-Mix-93",
                serde_json::to_string("CANARY%\\u002B&\\\\x-Mix-93").unwrap(),
            ),
            (
                "CANARY-Clïent-Sécret-x",
                "CANARY-Cl%25C3%25AFent-S%25C3%25A9cret-x".to_owned(),
            ),
        ] {
            let shown = redact(&echoed, &[odd]);
            assert!(!shown.contains("CANARY"), "{echoed}: {shown}");
        }
        // Encoded twice, JSON inside JSON, and a form's `+` echoed decoded.
        for echoed in [
            "S3cret%2520value%252F%252B%253D",
            "S3cret value\\\\\\/\\\\u002B=",
            "S3cret value/ =",
        ] {
            let shown = redact(echoed, &[secret]);
            assert!(!shown.contains("S3cret"), "{echoed}: {shown}");
        }
        // Echoed cut short inside the answer: a start of half or more goes; a few
        // characters alike do not.
        let token = "CANARY-static-token-0451-abcdef";
        assert_eq!(
            redact("invalid token 'CANARY-static-token-04…'", &[token]),
            "invalid token '[redacted]…'"
        );
        assert_eq!(redact("CANARY-st and more", &[token]), "CANARY-st and more");
        // Too short to be a secret, and replacing it would garble the text.
        assert_eq!(redact("a short answer", &["short"]), "a short answer");
        // Text that only starts like the secret stays.
        assert_eq!(redact("S3cret valu", &[secret]), "S3cret valu");
    }

    #[test]
    fn an_answer_is_redacted_before_it_is_cut_and_a_cut_secret_goes_too() {
        let secret = "CANARY-access-token-0451";
        let body = format!("{}{secret}{}", "x".repeat(90), "y".repeat(50));
        // Cut inside the secret: neither its start nor the rest is kept.
        let kept = kept_answer(body.as_bytes(), 100, &[secret]);
        assert!(!kept.contains("CANARY"), "{kept}");
        assert!(
            kept.starts_with(&"x".repeat(90)) && kept.ends_with("[redacted]"),
            "{kept}"
        );
        // Whole within the limit, redacted in place.
        let kept = kept_answer(body.as_bytes(), 1000, &[secret]);
        assert_eq!(
            kept,
            format!("{}[redacted]{}", "x".repeat(90), "y".repeat(50))
        );
        // Cut at a character boundary.
        assert_eq!(kept_answer("ééé".as_bytes(), 3, &[]), "é");
    }

    #[test]
    fn a_url_is_shown_by_its_host_alone() {
        assert_eq!(
            shown_url("https://u:pw@hooks.example.com/in?token=abc&x=1"),
            "https://redacted@hooks.example.com/…"
        );
        assert_eq!(
            shown_url("https://token@hooks.slack.com/services/T0/B0/SECRET"),
            "https://redacted@hooks.slack.com/…"
        );
        assert_eq!(shown_url("http://127.0.0.1:9/"), "http://127.0.0.1:9");
        assert_eq!(shown_url("::"), "an address that is not a URL");
        // A dead letter keeps the path, which names the object.
        assert_eq!(
            recorded_url("https://u:pw@or.example/v1p2/users/abc?token=t1#f"),
            "https://redacted:redacted@or.example/v1p2/users/abc?token=redacted"
        );
    }

    #[test]
    fn a_redirect_is_retried_naming_where_it_points_not_delivered() {
        let req = Request::put("http://x/users/1".into(), &serde_json::json!({}));
        for code in [301, 302, 303, 307, 308] {
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert(
                reqwest::header::LOCATION,
                "https://other.example/users/1?sig=abc".parse().unwrap(),
            );
            match classify(
                &req,
                StatusCode::from_u16(code).unwrap(),
                None,
                headers,
                bytes::Bytes::new(),
                &[],
            ) {
                Outcome::Retry { reason, .. } => assert!(
                    reason.contains("https://other.example/…")
                        && !reason.contains("sig=")
                        && reason.contains("does not follow redirects"),
                    "{code}: {reason}"
                ),
                other => panic!("{code}: {other:?}"),
            }
        }
        // A 304 is no redirect, and names none.
        match classify(
            &req,
            StatusCode::NOT_MODIFIED,
            None,
            reqwest::header::HeaderMap::new(),
            bytes::Bytes::new(),
            &[],
        ) {
            Outcome::Retry { reason, .. } => assert_eq!(
                reason,
                "target answered 304 Not Modified, which is no answer to a PUT"
            ),
            other => panic!("{other:?}"),
        }
    }

    /// An answer cut short is reported without the URL's credentials, as a failure to
    /// connect is (reqwest's own text names the whole URL).
    #[tokio::test]
    async fn an_answer_cut_off_names_the_url_without_its_credentials() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = socket.read(&mut buf).await;
            let _ = socket
                .write_all(
                    b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 100\r\n\r\nshort",
                )
                .await;
        });
        let req = Request::get(format!("http://{addr}/hook?token=CANARY-query-token-1"));
        let client = reqwest::Client::new();
        match send(&client, &req, Vec::new(), Duration::from_secs(5)).await {
            Outcome::Retry { reason, .. } => assert!(
                reason.contains("cut off")
                    && reason.contains(&format!("http://{addr}/…"))
                    && !reason.contains("CANARY"),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
    }

    /// A target that echoes the request line keeps out of the kept answer every
    /// credential the URL carried: user name, password, and a query value as written
    /// (`%2B`) and decoded (`+`).
    #[tokio::test]
    async fn an_echoed_url_keeps_its_credentials_out_of_the_answer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 8192];
            let n = socket.read(&mut buf).await.unwrap();
            let head = String::from_utf8_lossy(&buf[..n]).into_owned();
            let line = head.lines().next().unwrap_or_default();
            let authorization = head
                .lines()
                .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
                .unwrap_or_default();
            let body = format!(
                "bad request: {line}; decoded token CANARY+query-3; user CANARY-user-1; {authorization}"
            );
            let answer = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(answer.as_bytes()).await;
        });
        let url = format!("http://CANARY-user-1:CANARY-pass-2@{addr}/hook?token=CANARY%2Bquery-3");
        let req = Request::get(url);
        let client = reqwest::Client::new();
        match send(&client, &req, Vec::new(), Duration::from_secs(5)).await {
            Outcome::Refused { response, .. } => {
                let kept = format!("{response:?}");
                assert!(kept.contains("bad request: GET /hook"), "{kept}");
                assert!(!kept.contains("CANARY"), "{kept}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A loopback server whose every answer is `head` and then a chunked body without
    /// end. Returns its address and the bytes of body it managed to write, summed over
    /// connections, once the client has hung up on it.
    pub(crate) async fn endless_answer(
        head: &'static str,
    ) -> (
        std::net::SocketAddr,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let total = written.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let total = total.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 8192];
                    let _ = socket.read(&mut buf).await;
                    let head = format!("{head}\r\ntransfer-encoding: chunked\r\n\r\n");
                    if socket.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let data = vec![b'x'; 64 * 1024];
                    let chunk =
                        [format!("{:x}\r\n", data.len()).as_bytes(), &data, b"\r\n"].concat();
                    while socket.write_all(&chunk).await.is_ok() {
                        total.fetch_add(data.len(), Ordering::Relaxed);
                    }
                });
            }
        });
        (addr, written)
    }

    #[test]
    fn a_retried_failure_says_what_the_target_answered_on_one_line() {
        let r = || "target answered 503 Service Unavailable".to_owned();
        assert_eq!(with_answer(r(), " \n "), r());
        assert_eq!(
            with_answer(r(), "<html>\n  <h1>Down</h1>\r\n\tfor upgrade </html>"),
            format!("{}: <html> <h1>Down</h1> for upgrade </html>", r())
        );
        let long = "é".repeat(500);
        let shown = with_answer(r(), &long);
        assert_eq!(shown, format!("{}: {}…", r(), "é".repeat(200)));
    }

    #[tokio::test]
    async fn an_answer_without_end_is_read_no_further_than_it_is_used() {
        let client = reqwest::Client::new();
        // Long enough that reading on to the timeout (the old way) could not pass.
        let timeout = Duration::from_secs(20);
        let put = |addr| Request::put(format!("http://{addr}/users/u1"), &serde_json::json!({}));

        // An error answer: the first 4 KiB are kept, as for any error.
        let (addr, written) = endless_answer("HTTP/1.1 500 Internal Server Error").await;
        match send(&client, &put(addr), Vec::new(), timeout).await {
            Outcome::Retry {
                reason,
                response: Some(r),
                ..
            } => {
                // With the start of the answer, cut short.
                assert!(
                    reason.starts_with("target answered 500 Internal Server Error: "),
                    "{reason}"
                );
                assert!(reason.ends_with('…') && reason.len() < 300, "{reason}");
                assert_eq!(r.body.len(), KEPT_BODY);
            }
            other => panic!("{other:?}"),
        }
        // Loopback buffers hold a few MiB the server wrote and nobody read.
        let sent = written.load(std::sync::atomic::Ordering::Relaxed);
        assert!(sent < 16 << 20, "{sent} bytes were taken from the target");

        // A PUT's 2xx: delivered, whatever follows.
        let (addr, _) = endless_answer("HTTP/1.1 200 OK").await;
        let out = send(&client, &put(addr), Vec::new(), timeout).await;
        assert!(
            matches!(out, Outcome::Delivered { status: 200, .. }),
            "{out:?}"
        );

        // A read-back's 2xx is read whole, up to a bound.
        let (addr, written) = endless_answer("HTTP/1.1 200 OK").await;
        let get = Request::get(format!("http://{addr}/users?limit=1000"));
        match send(&client, &get, Vec::new(), timeout).await {
            Outcome::Retry { reason, .. } => {
                assert!(reason.contains("larger than 32 MiB"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let sent = written.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            (MAX_READ_ANSWER..MAX_READ_ANSWER + (16 << 20)).contains(&sent),
            "{sent} bytes were taken from the target"
        );
    }

    /// A loopback server that answers whatever it is sent with `answer`, then closes.
    async fn answering(answer: &'static [u8]) -> std::net::SocketAddr {
        answering_then(answer, false).await
    }

    /// [`answering`], closing with a reset (RST, not FIN) when `reset`.
    async fn answering_then(answer: &'static [u8], reset: bool) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let _ = socket.write_all(answer).await;
                if reset {
                    let _ = socket.flush().await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    // A zero linger sends RST on close.
                    let _ = socket.set_zero_linger();
                }
            }
        });
        addr
    }

    /// A reset after the status line is an answer cut off, not a sign of the wrong scheme.
    #[tokio::test]
    async fn a_reset_after_the_status_line_names_no_scheme() {
        let addr = answering_then(
            b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n{\"a\":",
            true,
        )
        .await;
        let client = reqwest::Client::new();
        let req = Request::put(format!("http://{addr}/users/1"), &serde_json::json!({}));
        match send(&client, &req, Vec::new(), Duration::from_secs(5)).await {
            Outcome::Retry { reason, .. } => {
                assert!(reason.starts_with("answer 200 OK cut off: "), "{reason}");
                assert!(!reason.contains("does the target speak"), "{reason}");
                assert!(
                    reason.to_ascii_lowercase().contains("connection reset"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    /// `http://` to a server speaking TLS, and `https://` to one speaking plain HTTP, read
    /// as "connection reset" or "invalid HTTP version": the error says which it likely is.
    #[tokio::test]
    async fn a_scheme_the_target_does_not_speak_is_named() {
        let client = reqwest::Client::new();
        // A TLS alert (handshake failure), as a TLS server answers bytes that are no
        // ClientHello.
        let tls = answering(b"\x15\x03\x01\x00\x02\x02\x28").await;
        let plain = answering(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
        for (url, wanted) in [
            (format!("http://{tls}/users/1"), "https://"),
            (format!("https://{plain}/users/1"), "http://"),
        ] {
            let req = Request::put(url.clone(), &serde_json::json!({}));
            match send(&client, &req, Vec::new(), Duration::from_secs(5)).await {
                Outcome::Retry { reason, .. } => assert!(
                    reason.contains(&format!("does the target speak {wanted}")),
                    "{reason}"
                ),
                other => panic!("{other:?}"),
            }
        }
    }
}
