#![no_main]
//! Small parsers of untrusted or semi-trusted strings. First byte selects:
//! 0 TokenHash::parse (config token_hashes), 1 parse_retry_after (a target's Retry-After
//! and Date headers, split on NUL), 2 Signer::parse + sign (webhook secret from env),
//! 3 shown_url / recorded_url (URLs from connector files and redirects),
//! 4-5 redact / kept_answer of a downstream answer (secret NUL body); invariant: a
//! secret of >= 8 token characters never survives in what is kept.
use libfuzzer_sys::fuzz_target;
use rosterd::connectors::http::{kept_answer, parse_retry_after, recorded_url, redact, shown_url};
use rosterd::connectors::webhook::Signer;
use rosterd::server::auth::TokenHash;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 6 {
        0 => {
            let Ok(s) = std::str::from_utf8(rest) else {
                return;
            };
            if let Ok(h) = TokenHash::parse(s) {
                assert_eq!(TokenHash::parse(&h.to_string()).ok(), Some(h));
            }
        }
        1 => {
            let Ok(s) = std::str::from_utf8(rest) else {
                return;
            };
            let mut it = s.splitn(2, '\0');
            let v = it.next().unwrap_or("");
            let d = it.next();
            let _ = parse_retry_after(v, d);
        }
        2 => {
            let Ok(s) = std::str::from_utf8(rest) else {
                return;
            };
            if let Some(sg) = Signer::parse(s) {
                let _ = sg.headers("msg_1", b"{}");
                let _ = sg.sign("id", i64::MAX, b"x");
            }
        }
        3 => {
            let Ok(s) = std::str::from_utf8(rest) else {
                return;
            };
            let _ = shown_url(s);
            let _ = recorded_url(s);
        }
        _ => {
            let Some(nul) = rest.iter().position(|&b| b == 0) else {
                return;
            };
            let (secret, body) = (&rest[..nul], &rest[nul + 1..]);
            let Ok(secret) = std::str::from_utf8(secret) else {
                return;
            };
            let limit = body.len() / 2 + (sel as usize % 7);
            let kept = kept_answer(body, limit, &[secret]);
            let text = String::from_utf8_lossy(body);
            let red = redact(&text, &[secret]);
            let tokenish = secret.len() >= 8
                && secret
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b));
            if tokenish {
                assert!(
                    !red.contains(secret),
                    "secret survives redact: {secret:?} in {text:?} -> {red:?}"
                );
                assert!(
                    !kept.contains(secret),
                    "secret survives kept_answer: {secret:?} -> {kept:?}"
                );
            }
        }
    }
});
