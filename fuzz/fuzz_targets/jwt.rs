#![no_main]
//! Roster API bearer tokens (Authorization: Bearer ... on /api/v1/roster/*), verified by
//! an HS256 JwtVerifier (audience "rosterd", issuer "https://idp.example").
//! First byte even: the rest is the token as sent. Odd: the rest is a JSON claims set,
//! signed with the right secret, so the claim checks after the signature are reached.
use libfuzzer_sys::fuzz_target;
use rosterd::api::jwt::{JwtConfig, JwtVerifier, testing::hs256_token};
use serde_json::{Value, json};
use std::sync::OnceLock;

const SECRET: &str = "0123456789abcdef0123456789abcdef-fuzz";

fn verifier() -> &'static JwtVerifier {
    static V: OnceLock<JwtVerifier> = OnceLock::new();
    V.get_or_init(|| {
        let cfg: JwtConfig = serde_json::from_value(json!({
            "audience": ["rosterd"],
            "issuer": "https://idp.example",
            "hs256_secret_env": "FUZZ_HS256"
        }))
        .expect("jwt config");
        JwtVerifier::from_config(&cfg, std::path::Path::new("/tmp"), &|_| {
            Some(SECRET.to_owned())
        })
        .expect("verifier")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let v = verifier();
    if sel % 2 == 0 {
        let Ok(tok) = std::str::from_utf8(rest) else {
            return;
        };
        let _ = v.verify(tok);
    } else {
        let Ok(claims) = serde_json::from_slice::<Value>(rest) else {
            return;
        };
        let tok = hs256_token(SECRET.as_bytes(), &claims);
        if let Ok(p) = v.verify(&tok) {
            let _ = p.actor();
            let _ = p.highest_scope();
        }
    }
});
