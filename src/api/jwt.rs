//! Bearer-token (JWT) verification for the Roster API.
//!
//! Only HS256, RS256 and ES256 are accepted, and each only when a key for it
//! is configured, so an attacker cannot pick the algorithm that is easiest to
//! forge. Every token must carry `exp`, `aud` and `sub`; `nbf` is enforced
//! whenever present.

// Verification runs on every request: a panic here would take a worker down
// on attacker-controlled input.
#![deny(clippy::unwrap_used, clippy::expect_used)]

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

/// Shorter HMAC secrets are brute-forceable offline from a single token
/// (RFC 7518 §3.2 asks for at least the hash size, 256 bits).
pub const MIN_HS256_SECRET_BYTES: usize = 32;

/// Caps per-request work: every candidate key costs a signature check, and
/// real access tokens are far smaller.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// A larger window would make `exp` meaningless; it also keeps
/// jsonwebtoken's unsigned `now - leeway` arithmetic far from underflow.
const MAX_LEEWAY_SECS: u64 = 600;

/// aws-lc refuses RSA keys outside this range at verification time; checking
/// at load turns a per-request `token_bad_signature` into a startup error.
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 8192;

fn default_tenant_claim() -> String {
    "tenant".to_owned()
}

fn default_leeway_secs() -> u64 {
    30
}

/// `[api.jwt]` in config.toml.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Accepted `aud` values; at least one required.
    pub audience: Vec<String>,
    /// Required `iss` value, if set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Claim carrying the tenant id. Default "tenant".
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// Env var holding an HS256 shared secret (raw bytes, not base64).
    #[serde(default)]
    pub hs256_secret_env: Option<String>,
    /// PEM files of RS256 or ES256 public keys (kind detected from the PEM).
    #[serde(default)]
    pub public_keys: Vec<PathBuf>,
    /// A JWKS (RFC 7517) JSON file; keys are matched by `kid`.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Clock skew allowed for exp/nbf, seconds. Default 30.
    #[serde(default = "default_leeway_secs")]
    pub leeway_secs: u64,
    /// Refuse a token that expires more than this many seconds from now. A token is
    /// revoked only by rotating its key, so one minted to live for years (by mistake, or
    /// by whoever holds the HS256 secret) stays a standing credential once leaked; an
    /// IdP's access tokens live an hour. Unset: no limit.
    #[serde(default)]
    pub max_lifetime_secs: Option<u64>,
}

impl JwtConfig {
    /// What the section lets through that is probably not meant: `check-config` prints
    /// these, and `serve` logs them at WARN.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.issuer.is_none() && (!self.public_keys.is_empty() || self.jwks_file.is_some()) {
            // One key set serves every tenant; an IdP whose signing keys its other
            // customers share signs their tokens too (RFC 8725 §3.8).
            out.push("[api.jwt]: public keys are set but `issuer` is not: a token any issuer signed with one of these keys is taken; set `issuer` to your identity provider's `iss`".to_owned());
        }
        out
    }
}

/// Access level granted by a token. `Admin ⊇ Write ⊇ Read`, which the
/// derived ordering encodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read,
    Write,
    Admin,
}

impl Scope {
    /// The OAuth scope name, for messages such as "requires roster:write".
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "roster:read",
            Scope::Write => "roster:write",
            Scope::Admin => "roster:admin",
        }
    }

    pub fn from_name(name: &str) -> Option<Scope> {
        match name {
            "roster:read" => Some(Scope::Read),
            "roster:write" => Some(Scope::Write),
            "roster:admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    pub tenant: String,
    // Scopes are nested, so the highest one granted says everything.
    highest: Option<Scope>,
}

impl Principal {
    pub fn has(&self, s: Scope) -> bool {
        self.highest.is_some_and(|h| h >= s)
    }

    /// Highest scope granted, `None` if the token carried no roster scope.
    pub fn highest_scope(&self) -> Option<Scope> {
        self.highest
    }

    /// Actor string recorded in audit/history entries.
    pub fn actor(&self) -> String {
        format!("user:{}", self.subject)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    // ---- configuration (startup) errors ----
    #[error("[api.jwt] audience must list at least one value")]
    NoAudience,
    #[error(
        "[api.jwt] configures no verification key (hs256_secret_env, public_keys or jwks_file)"
    )]
    NoKeys,
    #[error("[api.jwt] {field}: {reason}")]
    InvalidSetting { field: &'static str, reason: String },
    #[error(
        "environment variable {} (hs256_secret_env) is not set",
        crate::config::shown_env_name(.var)
    )]
    SecretUnset { var: String },
    #[error(
        "environment variable {var} (hs256_secret_env) holds {len} bytes; \
         an HS256 secret needs at least {MIN_HS256_SECRET_BYTES}"
    )]
    SecretTooShort { var: String, len: usize },
    #[error("[api.jwt] {key}: cannot read {}: {source}", .path.display())]
    KeyFileUnreadable {
        /// The setting that names the file.
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("public key {}: {reason}", .path.display())]
    InvalidKeyFile { path: PathBuf, reason: String },
    #[error("JWKS file {}: {reason}", .path.display())]
    InvalidJwks { path: PathBuf, reason: String },

    // ---- token (per-request) errors ----
    #[error("no bearer token")]
    Missing,
    #[error("token is not a well-formed JWS compact JWT")]
    Malformed,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("token audience is not accepted")]
    WrongAudience,
    #[error("token issuer is not accepted")]
    WrongIssuer,
    #[error("token lacks the tenant claim `{claim}` (must be a non-empty string)")]
    NoTenant { claim: String },
    /// `why` is set for a claim that is there but names nothing usable (a blank `sub`):
    /// to the caller, as good as missing, and told why.
    #[error("token lacks the required claim `{claim}`{}", .why.map(|w| format!(": {w}")).unwrap_or_default())]
    MissingClaim {
        claim: String,
        why: Option<&'static str>,
    },
    #[error("token claim `{0}` has an invalid value")]
    InvalidClaim(String),
    #[error("no configured key matches the token's kid")]
    UnknownKey,
    #[error("token algorithm `{0}` is not accepted")]
    UnsupportedAlgorithm(String),
    #[error("token is signed {alg}, but its kid {kid:?} names a key for {key_alg}")]
    NotTheKeysAlgorithm {
        alg: String,
        kid: String,
        key_alg: String,
    },
    #[error("token type (typ) `{0}` is not an access token; expected JWT or at+jwt")]
    WrongType(String),
    #[error(
        "token expires more than {max} s from now, which [api.jwt] max_lifetime_secs does not allow; use a token that expires sooner"
    )]
    LivesTooLong { max: u64 },
}

/// The codes of the per-request errors (a refused or missing token), as 401 bodies
/// carry them.
pub const TOKEN_CODES: &[&str] = &[
    "token_missing",
    "token_malformed",
    "token_bad_signature",
    "token_expired",
    "token_not_yet_valid",
    "token_wrong_audience",
    "token_wrong_issuer",
    "token_no_tenant",
    "token_missing_claim",
    "token_invalid_claim",
    "token_unknown_key",
    "token_unsupported_algorithm",
    "token_wrong_type",
    "token_lives_too_long",
];

impl JwtError {
    /// Stable snake_case code for API error bodies and logs.
    pub fn code(&self) -> &'static str {
        match self {
            JwtError::NoAudience => "jwt_config_no_audience",
            JwtError::NoKeys => "jwt_config_no_keys",
            JwtError::InvalidSetting { .. } => "jwt_config_invalid",
            JwtError::SecretUnset { .. } => "jwt_config_secret_unset",
            JwtError::SecretTooShort { .. } => "jwt_config_secret_too_short",
            JwtError::KeyFileUnreadable { .. } => "jwt_config_key_unreadable",
            JwtError::InvalidKeyFile { .. } => "jwt_config_key_invalid",
            JwtError::InvalidJwks { .. } => "jwt_config_jwks_invalid",
            JwtError::Missing => "token_missing",
            JwtError::Malformed => "token_malformed",
            JwtError::BadSignature => "token_bad_signature",
            JwtError::Expired => "token_expired",
            JwtError::NotYetValid => "token_not_yet_valid",
            JwtError::WrongAudience => "token_wrong_audience",
            JwtError::WrongIssuer => "token_wrong_issuer",
            JwtError::NoTenant { .. } => "token_no_tenant",
            JwtError::MissingClaim { .. } => "token_missing_claim",
            JwtError::InvalidClaim(_) => "token_invalid_claim",
            JwtError::UnknownKey => "token_unknown_key",
            JwtError::UnsupportedAlgorithm(_) | JwtError::NotTheKeysAlgorithm { .. } => {
                "token_unsupported_algorithm"
            }
            JwtError::WrongType(_) => "token_wrong_type",
            JwtError::LivesTooLong { .. } => "token_lives_too_long",
        }
    }

    /// True for errors raised while loading the configuration, which are the
    /// operator's problem (startup failure / 500), not the caller's (401).
    pub fn is_config(&self) -> bool {
        self.code().starts_with("jwt_config_")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    Hs256,
    Rs256,
    Es256,
}

impl Alg {
    fn from_header(name: &str) -> Option<Alg> {
        match name {
            "HS256" => Some(Alg::Hs256),
            "RS256" => Some(Alg::Rs256),
            "ES256" => Some(Alg::Es256),
            _ => None,
        }
    }

    fn library(self) -> Algorithm {
        match self {
            Alg::Hs256 => Algorithm::HS256,
            Alg::Rs256 => Algorithm::RS256,
            Alg::Es256 => Algorithm::ES256,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Alg::Hs256 => "HS256",
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
        }
    }
}

#[derive(Debug)]
struct VerifyKey {
    // Bound at load time so a key is only ever used with its own algorithm.
    alg: Alg,
    // Only JWKS keys carry one.
    kid: Option<String>,
    key: DecodingKey,
}

/// Verifies bearer tokens against the configured keys. Build once at startup
/// and share (`Send + Sync`, immutable).
#[derive(Debug)]
pub struct JwtVerifier {
    keys: Vec<VerifyKey>,
    // One per algorithm: jsonwebtoken refuses a token whose header `alg` is
    // not in the list, which pins each key to its own algorithm.
    hs256: Validation,
    rs256: Validation,
    es256: Validation,
    tenant_claim: String,
    max_lifetime_secs: Option<u64>,
    leeway_secs: u64,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<JwtVerifier>();
};

impl JwtVerifier {
    /// Relative paths resolve against `base_dir` (the config file's
    /// directory); `env` reads environment variables (injectable for tests).
    pub fn from_config(
        cfg: &JwtConfig,
        base_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<JwtVerifier, JwtError> {
        install_crypto_provider();

        if cfg.audience.is_empty() {
            return Err(JwtError::NoAudience);
        }
        if cfg.audience.iter().any(|a| a.is_empty()) {
            return Err(invalid_setting("audience", "values must not be empty"));
        }
        if cfg.issuer.as_deref() == Some("") {
            return Err(invalid_setting("issuer", "must not be empty"));
        }
        if cfg.tenant_claim.is_empty() {
            return Err(invalid_setting("tenant_claim", "must not be empty"));
        }
        if cfg.leeway_secs > MAX_LEEWAY_SECS {
            return Err(invalid_setting(
                "leeway_secs",
                &format!("must be at most {MAX_LEEWAY_SECS}"),
            ));
        }
        // Past a year the limit holds nothing back (`rosterd token jwt` mints at most a
        // year), and it keeps `now + limit` far from overflowing.
        const MAX_LIFETIME_SECS: u64 = 366 * 24 * 3600;
        if cfg
            .max_lifetime_secs
            .is_some_and(|m| m == 0 || m > MAX_LIFETIME_SECS)
        {
            return Err(invalid_setting(
                "max_lifetime_secs",
                &format!(
                    "must be between 1 and {MAX_LIFETIME_SECS} (a year); leave it out for no limit"
                ),
            ));
        }

        let mut keys = Vec::new();
        for path in &cfg.public_keys {
            keys.push(load_pem_key(&base_dir.join(path))?);
        }
        if let Some(path) = &cfg.jwks_file {
            keys.extend(load_jwks(&base_dir.join(path))?);
        }
        if let Some(var) = &cfg.hs256_secret_env {
            match load_hs256_secret(var, env) {
                Ok(k) => keys.push(k),
                // The public keys still verify their tokens: an unset secret turns off
                // HS256 only, not the whole API.
                Err(e @ JwtError::SecretUnset { .. }) if !keys.is_empty() => {
                    tracing::warn!(error = %e, "HS256 tokens are refused until it is set; RS256/ES256 keys are in use.");
                }
                Err(e) => return Err(e),
            }
        }
        if keys.is_empty() {
            return Err(JwtError::NoKeys);
        }

        let validation = |alg: Alg| {
            let mut v = Validation::new(alg.library());
            v.leeway = cfg.leeway_secs;
            v.validate_exp = true;
            // Off by default in jsonwebtoken; without it a not-yet-valid
            // token would be accepted.
            v.validate_nbf = true;
            v.validate_aud = true;
            v.set_audience(&cfg.audience);
            let mut required = vec!["exp", "aud", "sub"];
            if let Some(iss) = &cfg.issuer {
                v.set_issuer(&[iss]);
                // jsonwebtoken only compares `iss` when the token has one.
                required.push("iss");
            }
            v.set_required_spec_claims(&required);
            v
        };

        Ok(JwtVerifier {
            keys,
            hs256: validation(Alg::Hs256),
            rs256: validation(Alg::Rs256),
            es256: validation(Alg::Es256),
            tenant_claim: cfg.tenant_claim.clone(),
            max_lifetime_secs: cfg.max_lifetime_secs,
            leeway_secs: cfg.leeway_secs,
        })
    }

    /// Whether HS256 tokens verify: the secret was configured and set.
    pub fn accepts_hs256(&self) -> bool {
        self.keys.iter().any(|k| k.alg == Alg::Hs256)
    }

    /// Verify a compact JWT (without the "Bearer " prefix).
    pub fn verify(&self, token: &str) -> Result<Principal, JwtError> {
        if token.is_empty() {
            return Err(JwtError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtError::Malformed);
        }
        let header = parse_header(token)?;
        let candidates = self.candidates(header.alg, header.kid.as_deref())?;
        let validation = match header.alg {
            Alg::Hs256 => &self.hs256,
            Alg::Rs256 => &self.rs256,
            Alg::Es256 => &self.es256,
        };

        let mut claims = None;
        for key in candidates {
            match jsonwebtoken::decode::<Value>(token, &key.key, validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                // The next candidate may be the signer. Key-format errors
                // concern this key only (load-time checks should make them
                // impossible), so they must not stop the search either.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::InvalidSignature
                            | ErrorKind::InvalidKeyFormat
                            | ErrorKind::InvalidRsaKey(_)
                            | ErrorKind::InvalidEcdsaKey
                    ) => {}
                // Anything else was raised by the key that verified the
                // signature (claims) or concerns the token itself; another
                // key cannot change the outcome.
                Err(e) => {
                    return Err(match map_library_error(e.kind(), header.alg) {
                        // jsonwebtoken calls an `exp` it cannot read as a number missing
                        // or the token malformed; the caller should hear which claim is
                        // there but wrong.
                        JwtError::MissingClaim { claim, .. } if payload_has(token, &claim) => {
                            JwtError::InvalidClaim(claim)
                        }
                        JwtError::Malformed => {
                            match payload(token).as_ref().and_then(mistyped_claim) {
                                Some(c) => JwtError::InvalidClaim(c.to_owned()),
                                None => JwtError::Malformed,
                            }
                        }
                        other => other,
                    });
                }
            }
        }
        // A kid we hold no key for, and no key without a kid signed it either: most
        // likely the issuer rotated to a key the JWKS file does not have yet, which
        // "no key matches the kid" tells the operator; "bad signature" says tampering.
        let unknown_kid = header
            .kid
            .as_deref()
            .is_some_and(|kid| !self.keys.iter().any(|k| k.kid.as_deref() == Some(kid)));
        let claims = claims.ok_or(if unknown_kid {
            JwtError::UnknownKey
        } else {
            JwtError::BadSignature
        })?;
        // Verified, so the payload decodes; jsonwebtoken kept the last of a repeated
        // claim (a second `tenant` or `scope` won), and no copy is to be trusted.
        let once =
            payload_bytes(token).is_some_and(|b| crate::server::json::request_body(&b).is_ok());
        if !once {
            return Err(JwtError::Malformed);
        }
        // The leeway, as for `exp` itself: an issuer whose clock runs ahead mints tokens
        // that look that much longer-lived.
        if let Some(max) = self.max_lifetime_secs
            && let Some(exp) = claims.get("exp").and_then(Value::as_f64)
            && exp > (unix_now() + max + self.leeway_secs) as f64
        {
            return Err(JwtError::LivesTooLong { max });
        }
        self.principal(&claims)
    }

    fn candidates(&self, alg: Alg, kid: Option<&str>) -> Result<Vec<&VerifyKey>, JwtError> {
        let of_alg: Vec<&VerifyKey> = self.keys.iter().filter(|k| k.alg == alg).collect();
        if of_alg.is_empty() {
            return Err(JwtError::UnsupportedAlgorithm(alg.name().to_owned()));
        }
        let Some(kid) = kid else {
            return Ok(of_alg);
        };
        let picked: Vec<&VerifyKey> =
            if let Some(named) = self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)) {
                // A kid we know names exactly one key; if that key is for another
                // algorithm the token is inconsistent, never "try the others", and said so:
                // "no key matches the kid" would send the operator after a key rotation.
                if named.alg != alg {
                    return Err(JwtError::NotTheKeysAlgorithm {
                        alg: alg.name().to_owned(),
                        kid: kid.to_owned(),
                        key_alg: named.alg.name().to_owned(),
                    });
                }
                vec![named]
            } else {
                // An unknown kid may just be the issuer's label for a key we hold
                // as a PEM or secret, which have no kid.
                of_alg.into_iter().filter(|k| k.kid.is_none()).collect()
            };
        if picked.is_empty() {
            Err(JwtError::UnknownKey)
        } else {
            Ok(picked)
        }
    }

    fn principal(&self, claims: &Value) -> Result<Principal, JwtError> {
        // Claims jsonwebtoken lets through with the wrong type: `iss` must be one
        // StringOrURI (it also takes an array and passes it when any entry matches,
        // RFC 7519 §4.1.1), `iat` a NumericDate (it reads only exp and nbf, §4.1.6).
        if let Some(claim) = mistyped_claim(claims) {
            return Err(JwtError::InvalidClaim(claim.to_owned()));
        }
        // The subject is who acts: overrides and governance events record it as
        // `user:<sub>`, which a blank one would leave naming no one, and a line break or
        // other control character would split or disguise in the logs and exports that
        // show it.
        let refuse = |why| JwtError::MissingClaim {
            claim: "sub".to_owned(),
            why,
        };
        let subject = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => match subject_problem(s) {
                Some(why) => return Err(refuse(Some(why))),
                None => s.clone(),
            },
            _ => return Err(refuse(None)),
        };
        let tenant = match claims.get(&self.tenant_claim) {
            Some(Value::String(t)) if !t.is_empty() => t.clone(),
            _ => {
                return Err(JwtError::NoTenant {
                    claim: self.tenant_claim.clone(),
                });
            }
        };

        // OAuth 2.0 uses a space-separated `scope` string; Azure AD and
        // others send `scp`, as an array or a string. Honour both. The separator
        // is the space (RFC 6749 §3.3), not any Unicode blank: "roster:admin\u{a0}x"
        // is one unknown scope.
        let mut names: Vec<&str> = Vec::new();
        for claim in ["scope", "scp"] {
            match claims.get(claim) {
                Some(Value::String(s)) => names.extend(s.split(' ').filter(|n| !n.is_empty())),
                Some(Value::Array(items)) => names.extend(items.iter().filter_map(Value::as_str)),
                // A scope claim of any other type grants nothing.
                _ => {}
            }
        }
        let highest = names.into_iter().filter_map(Scope::from_name).max();

        Ok(Principal {
            subject,
            tenant,
            highest,
        })
    }
}

/// jsonwebtoken only falls back to its feature-selected provider if none is
/// installed, and that fallback panics when another crate in the build enables
/// its second backend. Installing ours explicitly keeps that from ever
/// reaching a request.
fn install_crypto_provider() {
    // Err only means a provider is installed already, which is fine.
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn invalid_setting(field: &'static str, reason: &str) -> JwtError {
    JwtError::InvalidSetting {
        field,
        reason: reason.to_owned(),
    }
}

/// Why a non-empty `sub` names no one readably, if it does not: blank, or holding a
/// character that breaks or hides text where the actor is shown (a control character, a
/// line or paragraph separator, a zero-width or bidirectional format character: `x\u{2028}INFO …`
/// forges a log line, `\u{202E}` reverses what follows).
pub fn subject_problem(sub: &str) -> Option<&'static str> {
    if sub.chars().any(crate::text::breaks_line) {
        return Some(
            "it holds a control character or a line break; it must name the caller on one line",
        );
    }
    if sub.chars().any(crate::text::is_invisible) {
        return Some(
            "it holds an invisible or text-direction character; it must name the caller as it reads",
        );
    }
    // Drawn as blank though neither space nor ignorable: the braille blank and the
    // musical null notehead, the two a blank-looking name is made of once the others
    // are refused.
    if sub
        .chars()
        .all(|c| c.is_whitespace() || matches!(c, '\u{2800}' | '\u{1D159}'))
    {
        return Some("it is blank; it must name the caller");
    }
    None
}

fn map_library_error(kind: &ErrorKind, alg: Alg) -> JwtError {
    match kind {
        ErrorKind::InvalidSignature => JwtError::BadSignature,
        ErrorKind::ExpiredSignature => JwtError::Expired,
        ErrorKind::ImmatureSignature => JwtError::NotYetValid,
        ErrorKind::InvalidAudience => JwtError::WrongAudience,
        ErrorKind::InvalidIssuer => JwtError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => JwtError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) if c == "iss" => JwtError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(c) => JwtError::MissingClaim {
            claim: c.clone(),
            why: None,
        },
        ErrorKind::InvalidClaimFormat(c) => JwtError::InvalidClaim(c.clone()),
        // Only reachable if jsonwebtoken read the header differently from
        // `parse_header`; refuse either way.
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            JwtError::UnsupportedAlgorithm(alg.name().to_owned())
        }
        // Undecodable base64/JSON/UTF-8, wrong shape, and anything a future
        // jsonwebtoken adds: reject without detail.
        _ => JwtError::Malformed,
    }
}

/// The token's payload (its claims), decoded from base64url, not parsed.
fn payload_bytes(token: &str) -> Option<Vec<u8>> {
    token
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
}

fn payload(token: &str) -> Option<Value> {
    payload_bytes(token).and_then(|b| serde_json::from_slice::<Value>(&b).ok())
}

/// Whether the token's payload has the claim `name` with a value (of whatever type).
fn payload_has(token: &str, name: &str) -> bool {
    payload(token).is_some_and(|v| v.get(name).is_some_and(|c| !c.is_null()))
}

/// A registered claim of the wrong JSON type: a NumericDate (RFC 7519 §2) that is not a
/// number, a `sub` or `iss` that is not one string. jsonwebtoken calls some of these a
/// malformed token; the caller should hear which claim is wrong.
fn mistyped_claim(claims: &Value) -> Option<&'static str> {
    type TypeCheck = fn(&Value) -> bool;
    let typed: [(&'static str, TypeCheck); 5] = [
        ("exp", Value::is_number),
        ("nbf", Value::is_number),
        ("iat", Value::is_number),
        ("sub", Value::is_string),
        ("iss", Value::is_string),
    ];
    typed.into_iter().find_map(|(c, right_type)| {
        claims
            .get(c)
            .is_some_and(|v| !v.is_null() && !right_type(v))
            .then_some(c)
    })
}

struct TokenHeader {
    alg: Alg,
    kid: Option<String>,
}

/// Reads the header ourselves because jsonwebtoken cannot represent
/// `alg: none` or unknown algorithms and would report them as mere JSON
/// errors; callers deserve `token_unsupported_algorithm`.
fn parse_header(token: &str) -> Result<TokenHeader, JwtError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        // JWE (5 parts) and unsigned forms land here too.
        return Err(JwtError::Malformed);
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| JwtError::Malformed)?;
    // A key given twice is refused, in the header and in the claims: which copy a
    // gateway or an audit tool reads is anyone's guess (serde_json keeps the last).
    let Ok(Value::Object(header)) = crate::server::json::request_body(&bytes) else {
        return Err(JwtError::Malformed);
    };
    // RFC 7515 §4.1.11: extensions listed in `crit` must be understood, and
    // we understand none.
    if header.contains_key("crit") {
        return Err(JwtError::Malformed);
    }
    let alg = match header.get("alg") {
        Some(Value::String(name)) => {
            Alg::from_header(name).ok_or_else(|| JwtError::UnsupportedAlgorithm(name.clone()))?
        }
        _ => return Err(JwtError::Malformed),
    };
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(JwtError::Malformed),
    };
    // RFC 8725 §3.11: a JWT made for something else (an ID token's sibling such as a
    // logout or DPoP proof, signed by the same key) says so in `typ`, and must not pass
    // for an access token. No `typ` at all is common and stays accepted.
    match header.get("typ") {
        None => {}
        Some(Value::String(typ)) if is_access_token_type(typ) => {}
        Some(Value::String(typ)) => return Err(JwtError::WrongType(typ.clone())),
        Some(_) => return Err(JwtError::Malformed),
    }
    Ok(TokenHeader { alg, kid })
}

/// `JWT` (RFC 7519) or `at+jwt` (RFC 9068), with or without the `application/` that
/// RFC 7515 §4.1.9 lets a sender leave out, in any case.
fn is_access_token_type(typ: &str) -> bool {
    let t = typ.to_ascii_lowercase();
    let t = t.strip_prefix("application/").unwrap_or(&t);
    t == "jwt" || t == "at+jwt"
}

fn load_hs256_secret(
    var: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<VerifyKey, JwtError> {
    if var.is_empty() {
        return Err(invalid_setting("hs256_secret_env", "must name a variable"));
    }
    let secret = env(var).ok_or_else(|| JwtError::SecretUnset {
        var: var.to_owned(),
    })?;
    if secret.len() < MIN_HS256_SECRET_BYTES {
        return Err(JwtError::SecretTooShort {
            var: var.to_owned(),
            len: secret.len(),
        });
    }
    Ok(VerifyKey {
        alg: Alg::Hs256,
        kid: None,
        key: DecodingKey::from_secret(secret.as_bytes()),
    })
}

fn read_file(key: &'static str, path: &Path) -> Result<Vec<u8>, JwtError> {
    crate::config::read_file(path, crate::config::FileKind::Key).map_err(|source| {
        JwtError::KeyFileUnreadable {
            key,
            path: path.to_owned(),
            source,
        }
    })
}

// DER encodings (contents only) of the OIDs that identify the key kinds.
const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

const DER_SEQUENCE: u8 = 0x30;
const DER_INTEGER: u8 = 0x02;
const DER_BIT_STRING: u8 = 0x03;
const DER_OID: u8 = 0x06;

fn load_pem_key(path: &Path) -> Result<VerifyKey, JwtError> {
    let bad = |reason: &str| JwtError::InvalidKeyFile {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let bytes = read_file("public_keys", path)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("not a PEM text file"))?;
    let (label, der) = single_pem_block(text).map_err(|reason| bad(&reason))?;

    // jsonwebtoken accepts private keys and certificates here too, and would
    // then fail on every request; classify first to fail at startup instead.
    let alg = match label.as_str() {
        "RSA PUBLIC KEY" => {
            check_rsa_public_key(&der).map_err(|r| bad(&r))?;
            Alg::Rs256
        }
        "PUBLIC KEY" => classify_spki(&der).map_err(|r| bad(&r))?,
        l if l.contains("PRIVATE KEY") => {
            return Err(bad(
                "holds a private key; configure the public key (openssl pkey -pubout)",
            ));
        }
        "CERTIFICATE" => {
            return Err(bad(
                "holds a certificate; extract its key with `openssl x509 -pubkey -noout`",
            ));
        }
        other => return Err(bad(&format!("unsupported PEM block `{other}`"))),
    };
    let key = match alg {
        Alg::Rs256 => DecodingKey::from_rsa_pem(&bytes),
        _ => DecodingKey::from_ec_pem(&bytes),
    }
    .map_err(|e| bad(&e.to_string()))?;
    Ok(VerifyKey {
        alg,
        kid: None,
        key,
    })
}

/// Requires exactly one PEM block so that the block we classify is the one
/// jsonwebtoken (which takes the first) loads.
fn single_pem_block(text: &str) -> Result<(String, Vec<u8>), String> {
    let mut blocks = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("-----BEGIN ") {
            let label = rest.strip_suffix("-----").ok_or("malformed BEGIN line")?;
            if current.is_some() {
                return Err("unterminated PEM block".to_owned());
            }
            current = Some((label.to_owned(), String::new()));
        } else if let Some(rest) = line.strip_prefix("-----END ") {
            let (label, body) = current.take().ok_or("END line without BEGIN")?;
            if rest.strip_suffix("-----") != Some(label.as_str()) {
                return Err(format!("BEGIN {label} closed by a different END line"));
            }
            blocks.push((label, body));
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
        }
    }
    if current.is_some() {
        return Err("unterminated PEM block".to_owned());
    }
    let mut blocks = blocks.into_iter();
    match (blocks.next(), blocks.next()) {
        (Some((label, body)), None) => {
            let der = base64::engine::general_purpose::STANDARD
                .decode(body)
                .map_err(|_| format!("{label} block is not valid base64"))?;
            Ok((label, der))
        }
        (None, _) => Err("no PEM block found".to_owned()),
        (Some(_), Some(_)) => Err("holds more than one PEM block; use one file per key".to_owned()),
    }
}

/// Reads one DER element: `(tag, contents, rest)`.
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        // Public keys never need more than 4 length bytes.
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (len_bytes, rest) = rest.split_at(n);
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    let (contents, rest) = rest.split_at(len);
    Some((tag, contents, rest))
}

fn der_expect(input: &[u8], tag: u8) -> Result<(&[u8], &[u8]), String> {
    match der_next(input) {
        Some((t, contents, rest)) if t == tag => Ok((contents, rest)),
        _ => Err("malformed DER key data".to_owned()),
    }
}

/// SubjectPublicKeyInfo (RFC 5280): decide RS256 vs ES256 from the key OID.
fn classify_spki(der: &[u8]) -> Result<Alg, String> {
    let (spki, _) = der_expect(der, DER_SEQUENCE)?;
    let (alg_id, rest) = der_expect(spki, DER_SEQUENCE)?;
    let (bits, _) = der_expect(rest, DER_BIT_STRING)?;
    let (oid, params) = der_expect(alg_id, DER_OID)?;
    if oid == OID_RSA_ENCRYPTION {
        // The first BIT STRING byte counts unused bits; it is 0 for keys.
        let key = bits.get(1..).ok_or("empty RSA key")?;
        check_rsa_public_key(key)?;
        Ok(Alg::Rs256)
    } else if oid == OID_EC_PUBLIC_KEY {
        match der_expect(params, DER_OID) {
            Ok((curve, _)) if curve == OID_P256 => {
                check_p256_point(bits.get(1..).ok_or("empty EC key")?)?;
                Ok(Alg::Es256)
            }
            _ => Err("EC key is not on P-256; only ES256 is supported".to_owned()),
        }
    } else {
        Err("neither an RSA nor an EC P-256 public key".to_owned())
    }
}

/// PKCS#1 RSAPublicKey: checks the modulus size aws-lc will accept.
fn check_rsa_public_key(der: &[u8]) -> Result<(), String> {
    let (seq, _) = der_expect(der, DER_SEQUENCE)?;
    let (modulus, rest) = der_expect(seq, DER_INTEGER)?;
    let exponent = der_expect(rest, DER_INTEGER)?.0;
    // DER writes an integer in as few bytes as it takes: a zero byte first is there only
    // to keep a high bit from reading as a sign. aws-lc refuses other encodings when it
    // verifies, so such a key would answer every token `token_bad_signature`.
    for (what, int) in [("modulus", modulus), ("exponent", exponent)] {
        if let [0, next, ..] = int
            && next & 0x80 == 0
        {
            return Err(format!(
                "RSA key's {what} is not in DER's shortest form (a needless leading zero byte); no token could verify against it"
            ));
        }
    }
    check_rsa_modulus(modulus)?;
    check_rsa_exponent(exponent)
}

/// A key that can never verify a token is refused when loaded: accepted, it answered
/// every token with "token signature does not verify", which points at a forgery rather
/// than at the key file. aws-lc verifies with an odd exponent of 3 to 33 bits.
fn check_rsa_exponent(e: &[u8]) -> Result<(), String> {
    let start = e.iter().position(|&b| b != 0).unwrap_or(e.len());
    let e = &e[start..];
    let value = (e.len() <= 5).then(|| e.iter().fold(0u64, |v, &b| (v << 8) | u64::from(b)));
    match value {
        Some(v) if v >= 3 && v % 2 == 1 && v < 1 << 33 => Ok(()),
        _ => Err(
            "RSA key's public exponent is not an odd number from 3 to 2^33 - 1 (65537 is usual); no token could verify against it"
                .to_owned(),
        ),
    }
}

/// [`check_rsa_exponent`]'s rule for an EC key: its point must be on the curve.
fn check_p256_point(point: &[u8]) -> Result<(), String> {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, ParsedPublicKey};
    ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
        .map(drop)
        .map_err(|_| "EC key's point is not on P-256; no token could verify against it".to_owned())
}

fn check_rsa_modulus(modulus: &[u8]) -> Result<(), String> {
    let start = modulus
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(modulus.len());
    let significant = &modulus[start..];
    let bits = match significant.first() {
        Some(&top) => (significant.len() - 1) * 8 + (8 - top.leading_zeros() as usize),
        None => 0,
    };
    if (RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
        Ok(())
    } else {
        Err(format!(
            "RSA key has {bits} bits; {RSA_MIN_BITS} to {RSA_MAX_BITS} are accepted"
        ))
    }
}

fn load_jwks(path: &Path) -> Result<Vec<VerifyKey>, JwtError> {
    let bad = |reason: String| JwtError::InvalidJwks {
        path: path.to_owned(),
        reason,
    };
    let bytes = read_file("jwks_file", path)?;
    let doc: Value = serde_json::from_slice(&bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
    let entries = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("has no \"keys\" array".to_owned()))?;

    let mut keys: Vec<VerifyKey> = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let name = match entry.get("kid").and_then(Value::as_str) {
            Some(kid) => format!("key \"{kid}\""),
            None => format!("keys[{i}]"),
        };
        let Some(alg) = jwk_algorithm(entry).map_err(|r| bad(format!("{name}: {r}")))? else {
            continue;
        };
        let kid = match entry.get("kid") {
            None => None,
            Some(Value::String(kid)) => Some(kid.clone()),
            Some(_) => return Err(bad(format!("{name}: kid is not a string"))),
        };
        if let Some(kid) = &kid
            && keys.iter().any(|k| k.kid.as_ref() == Some(kid))
        {
            // With two keys per kid, which one a token means is ambiguous.
            return Err(bad(format!("{name}: duplicate kid")));
        }
        let jwk: Jwk = serde_json::from_value(entry.clone())
            .map_err(|e| bad(format!("{name}: invalid JWK: {e}")))?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| bad(format!("{name}: {e}")))?;
        keys.push(VerifyKey { alg, kid, key });
    }
    if keys.is_empty() {
        return Err(bad("holds no RS256 or ES256 signing key".to_owned()));
    }
    Ok(keys)
}

/// Which of our algorithms a JWK serves. `Ok(None)` skips keys that are
/// legitimately present in a provider's JWKS but not for us (encryption keys,
/// other algorithms or curves); `Err` flags keys that are unsafe or broken.
fn jwk_algorithm(jwk: &Value) -> Result<Option<Alg>, String> {
    let field = |name: &str| jwk.get(name).and_then(Value::as_str);
    if field("use").is_some_and(|u| u != "sig") {
        return Ok(None);
    }
    // RFC 7517 §4.3: a key whose operations do not include verifying is not for us.
    if let Some(ops) = jwk.get("key_ops") {
        let verifies = ops
            .as_array()
            .is_some_and(|ops| ops.iter().any(|o| o == "verify"));
        if !verifies {
            return Ok(None);
        }
    }
    let kty = field("kty").ok_or("has no kty")?;
    if kty == "oct" {
        return Err(
            "symmetric keys are not accepted from a JWKS file; use hs256_secret_env".into(),
        );
    }
    // A verifier has no business holding private keys; refuse rather than
    // spread them further.
    if jwk.get("d").is_some() {
        return Err("contains private key material (\"d\")".into());
    }
    let declared = field("alg");
    let alg = match kty {
        "RSA" if declared.is_none_or(|a| a == "RS256") => Alg::Rs256,
        "EC" if field("crv") == Some("P-256") && declared.is_none_or(|a| a == "ES256") => {
            Alg::Es256
        }
        _ => return Ok(None),
    };
    let b64 = |name: &str| -> Result<Vec<u8>, String> {
        let text = field(name).ok_or_else(|| format!("has no \"{name}\""))?;
        URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| format!("\"{name}\" is not base64url"))
    };
    match alg {
        Alg::Rs256 => {
            let (n, e) = (b64("n")?, b64("e")?);
            // RFC 7518 §6.3.1: "the minimum number of octets"; aws-lc holds a key to it.
            if n.first() == Some(&0) || e.first() == Some(&0) {
                return Err("\"n\" or \"e\" starts with a zero byte, where RFC 7518 asks for the fewest bytes; no token could verify against it".into());
            }
            check_rsa_modulus(&n)?;
            check_rsa_exponent(&e)?;
        }
        _ => {
            let (x, y) = (b64("x")?, b64("y")?);
            if x.len() != 32 || y.len() != 32 {
                return Err("P-256 coordinates must be 32 bytes each".into());
            }
            check_p256_point(&[&[0x04][..], &x, &y].concat())?;
        }
    }
    Ok(Some(alg))
}

/// Token minting for tests of code that sits behind the verifier.
pub mod testing {
    use super::{Principal, Scope};
    use jsonwebtoken::{Algorithm, EncodingKey, Header};

    /// A throwaway P-256 key pair, generated with openssl for tests only.
    pub const EC_P256_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgx0qERD2wWyt4Kz00
gcuhW/n4xTn8xAemxuE+9yudQDahRANCAATv6tLktbE4wBrHRhaUYAt9hmdWI78W
AnzPhEq7uVTNy6/8GWNEZdXYck136snOT5UCuWUXyU6dm9biw8syLyB+
-----END PRIVATE KEY-----
";
    pub const EC_P256_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE7+rS5LWxOMAax0YWlGALfYZnViO/
FgJ8z4RKu7lUzcuv/BljRGXV2HJNd+rJzk+VArllF8lOnZvW4sPLMi8gfg==
-----END PUBLIC KEY-----
";

    /// An HS256 token over `claims`, signed with `secret`.
    pub fn hs256_token(secret: &[u8], claims: &serde_json::Value) -> String {
        let key = EncodingKey::from_secret(secret);
        match jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key) {
            Ok(token) => token,
            // Serializing a JSON value and HMAC-signing cannot fail; if a
            // future jsonwebtoken changes that, the test using this must stop.
            Err(e) => panic!("minting an HS256 test token failed: {e}"),
        }
    }

    /// A principal as the verifier would produce it, for handler tests that
    /// do not care about tokens.
    pub fn principal(subject: &str, tenant: &str, scopes: &[Scope]) -> Principal {
        Principal {
            subject: subject.to_owned(),
            tenant: tenant.to_owned(),
            highest: scopes.iter().copied().max(),
        }
    }
}

/// The verifier in force, and what its key files held when it was built. Identity
/// providers rotate their signing keys; the files were read only at start, so after a
/// rotation every token with the new key was refused (401 `token_unknown_key`) until a
/// restart. A reload re-reads the files and rebuilds the verifier when they changed.
pub struct Verifiers {
    current: std::sync::RwLock<Option<std::sync::Arc<JwtVerifier>>>,
    files: std::sync::Mutex<Vec<u8>>,
}

/// What `public_keys` and `jwks_file` hold now (a file that cannot be read as its error).
/// Read as the build reads them, bounded and without waiting: a pipe put in place of a
/// key file held the reload (and the worker under it) until something wrote to it, and
/// a file of gigabytes was read whole, before the build refused it.
fn key_files(cfg: &JwtConfig, base_dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for path in cfg.public_keys.iter().chain(&cfg.jwks_file) {
        let path = base_dir.join(path);
        out.extend(path.to_string_lossy().as_bytes());
        out.push(0);
        match crate::config::read_file(&path, crate::config::FileKind::Key) {
            Ok(bytes) => out.extend(bytes),
            Err(e) => out.extend(e.to_string().as_bytes()),
        }
        out.push(0);
    }
    out
}

impl Verifiers {
    /// `verifier` as built at start from `cfg` (None: the Roster API is off).
    pub fn new(verifier: Option<JwtVerifier>, cfg: Option<&JwtConfig>, base_dir: &Path) -> Self {
        Verifiers {
            current: std::sync::RwLock::new(verifier.map(std::sync::Arc::new)),
            files: std::sync::Mutex::new(cfg.map(|c| key_files(c, base_dir)).unwrap_or_default()),
        }
    }

    pub fn get(&self) -> Option<std::sync::Arc<JwtVerifier>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Rebuild from `cfg` if its key files changed since the last build: whether it did.
    /// A build that fails (a file broken mid-edit) keeps the verifier in force, and the
    /// next reload tries again. Only a verifier the start built is replaced: an API off
    /// for want of keys or a secret takes a restart, as its config does.
    pub fn reload(
        &self,
        cfg: &JwtConfig,
        base_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<bool, JwtError> {
        if cfg.public_keys.is_empty() && cfg.jwks_file.is_none() || self.get().is_none() {
            return Ok(false);
        }
        let now = key_files(cfg, base_dir);
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        if *files == now {
            return Ok(false);
        }
        let verifier = JwtVerifier::from_config(cfg, base_dir, env)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) =
            Some(std::sync::Arc::new(verifier));
        *files = now;
        Ok(true)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};

    // Throwaway keys generated with openssl for these tests only.
    const RSA1_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCqVRX7Qepl7vKJ
+9CZ4krQkOil+EFXYijVTKiij5l9Zqin6Fa0JxDsvb2mZvqU7o/9IWNNPJ40sgJA
2Punknef+5zQykohIUVhu5cikkP2+PLd/P6tpk1rAxyCLiTZlEiD31SRRobv4N6W
mEzD5O/5VccaIP3Whc3xdKQimJ1ydnhBc1e07CoaC9xCUdY1sCrY6efYq3gYwnq1
eeedsLC38RMsD+EhdyVqOfsRik59tIIZYcVP0bn1m7JfgBzuVKpSj3lgUjQ5nNRA
wiAGEtXaweQG/gFEA6/jg5Q/sazHWwAtvItmWpPO+yX4//L84JF2mg2Shpv+qC4L
g9xvUe2LAgMBAAECggEAPiWIPSHKK4HYtVaOwC6r/Ff6wl+HO6JBYr2zA4jgSDw2
Cfk/9UARsUbzVKza/Y7jM0jEye/1iyVtpApnGzdZ9SGhEB7WmCri/SssE/2I1an0
NuFxbJsyQPqkIq1CXa54HMFVwiGY5xnFLO4JiCnWEsNkvxhNdUFhqBjWMBc9zv5p
Ib702hDq3lnQrrfS2WBCmIvLZNL/eFjxoQYiUS7Sm0+lfv97hROQ+WKGNlqBxa0x
PlNvQWJ79x5VjjkA71voPMIqPwoYMVtE2KgnaJHFIso5eNCkD7+KtacLgmSVaB4h
7609xThXHG2rD05Hq4DO/HpJIBeJGWJD3+Fkf2O5/QKBgQDXpRLRsnTD83bfDHhe
YcSpBengX+VdEz/ZRgvG4He1+RYIZcAvQusB38QzVE0p0yMhnk5hlX6RmRdJOqjW
kgoQWhwbF8+4OJCFbC+iup4vB4Lzbd4kmjTYQX2iz1bFMeWbujaJYfLzGwaisLOW
jIYvWWvVGjlgfXHRcxrEJxT9dwKBgQDKNTjuXLjAAobue9MlN5D0cOEkgWzybOv+
0enHvE5Cm+3yI2VoG9QWxNn2QjvMWsv487+HByZKMRRFzsNLpT1K7N4ehUYt9lDJ
oXHtDcaRSgQXOFsS2SpenofA3wHpdIrG/35kGhrfMRzB4au/bMRIgHdoHRQIZloi
LlpDRmkFjQKBgEkX9OcLPDTnI1W7Xllvfj9kd7/MAWypB61X5soEb89InMU/6AKd
Bhdeh5x2aKlSncfZZuwAxiQH5jK2JWCFo8+jG3+7dHcXBTWUVBkudEuwmhx1EyUI
9/yNRk6XROwWW6OLXMz4XGc2s+sVReozu4/1GW3kM6qXGqtJ/rqaHK1FAoGBAL3W
qdRfCLR7quJLLjhKqrRTJYx4VihjSky6FpmGmJLAgexKfvH27m9R8K/aDvoUZFsd
vDqw46nT2gyPyZpDT///0aklxnVwQviJscO0oy/UJXMHXbmcWMLsYtcYh1r+Jywc
wjSIraHNIgqELBJTsxO+SFxesGgSb5yXl/aBLCghAoGAZWDVgroqP5FBF9eFXHq8
ncSmlI/un3+2cNmGPD7GlfUKGfzwQAZzTp22RiqFl6BOTjdG7Q7OKSoe8/YO7Aoa
/HVGcurMeCrAjNuRBvEPd2tW7uEN4Ctsn3qc2MWcvaltW3gU6ZjND7suRX6cqbk0
e20HqcZVW3b171XyoXdbVBk=
-----END PRIVATE KEY-----
";
    const RSA1_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAqlUV+0HqZe7yifvQmeJK
0JDopfhBV2Io1Uyooo+ZfWaop+hWtCcQ7L29pmb6lO6P/SFjTTyeNLICQNj7p5J3
n/uc0MpKISFFYbuXIpJD9vjy3fz+raZNawMcgi4k2ZRIg99UkUaG7+DelphMw+Tv
+VXHGiD91oXN8XSkIpidcnZ4QXNXtOwqGgvcQlHWNbAq2Onn2Kt4GMJ6tXnnnbCw
t/ETLA/hIXclajn7EYpOfbSCGWHFT9G59ZuyX4Ac7lSqUo95YFI0OZzUQMIgBhLV
2sHkBv4BRAOv44OUP7Gsx1sALbyLZlqTzvsl+P/y/OCRdpoNkoab/qguC4Pcb1Ht
iwIDAQAB
-----END PUBLIC KEY-----
";
    // The same key as RSA1_PUBLIC, in PKCS#1 form.
    const RSA1_PUBLIC_PKCS1: &str = "-----BEGIN RSA PUBLIC KEY-----
MIIBCgKCAQEAqlUV+0HqZe7yifvQmeJK0JDopfhBV2Io1Uyooo+ZfWaop+hWtCcQ
7L29pmb6lO6P/SFjTTyeNLICQNj7p5J3n/uc0MpKISFFYbuXIpJD9vjy3fz+raZN
awMcgi4k2ZRIg99UkUaG7+DelphMw+Tv+VXHGiD91oXN8XSkIpidcnZ4QXNXtOwq
GgvcQlHWNbAq2Onn2Kt4GMJ6tXnnnbCwt/ETLA/hIXclajn7EYpOfbSCGWHFT9G5
9ZuyX4Ac7lSqUo95YFI0OZzUQMIgBhLV2sHkBv4BRAOv44OUP7Gsx1sALbyLZlqT
zvsl+P/y/OCRdpoNkoab/qguC4Pcb1HtiwIDAQAB
-----END RSA PUBLIC KEY-----
";
    const RSA1_N: &str = "qlUV-0HqZe7yifvQmeJK0JDopfhBV2Io1Uyooo-ZfWaop-hWtCcQ7L29pmb6lO6P_SFjTTyeNLICQNj7p5J3n_uc0MpKISFFYbuXIpJD9vjy3fz-raZNawMcgi4k2ZRIg99UkUaG7-DelphMw-Tv-VXHGiD91oXN8XSkIpidcnZ4QXNXtOwqGgvcQlHWNbAq2Onn2Kt4GMJ6tXnnnbCwt_ETLA_hIXclajn7EYpOfbSCGWHFT9G59ZuyX4Ac7lSqUo95YFI0OZzUQMIgBhLV2sHkBv4BRAOv44OUP7Gsx1sALbyLZlqTzvsl-P_y_OCRdpoNkoab_qguC4Pcb1Htiw";

    const RSA2_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDWax/hI0WxO1Q3
1hvKLVdA0vASNPAuJI029KTbyzTrWYmKQ+S9f9JvCUzJtFKQndOWa4elszetXR4X
6t/AWmO4PU37utHwrJt3jl6EF8kSUgFVLDdZZq/NoEOSQWlKueSnnjntBT1P6/9r
s8PagbVuT065kS7JBfbtXfjuG28leMXnJCFEmGNeDZ3WbbyKojFiM5RVE165ohyg
EmL4ePpRPHeVBA+A95igjdJB1E4GEiBdZR9Z+9q1/C4uWywiJPhmfRrPGtnP+EtX
XHNoo0Gu4Ca2FucjvQPwmWNOhWq3n7gZ+OR7mdabgtH1TMh/BCSQqvleUPt92aSn
L6zlcs1FAgMBAAECggEAEZroGi8wOLYbWx5MV9RTNrJbHdOU6OT9Z0a9BoLvzGck
oOKkNF77YzyLPoB8yvz6c35Ou+80IhrkLqiNSJjjWSxHa+TR+gXiGfXpksT1MHjl
PR4NSVziEGsZQTf3sjgDKzQVo31rpFVHOoufCCDgSbdfSmM+SSkhNioiF0LPZG8Y
ooTD6e9VmTzFg/Yf5SIWAk1On0iwKeJL2mCOslDrFFQHdgm3AbsNwVCrw2Ipcir7
M3MGVmDH1g0nwjFQVB3lKGxlOCnN2DmGuGK5qVYQvjPdHXHaPa8rchXY2c1pAaas
WjdJT26DG6kNC3wOkIeDLq7xY7IULe4JL+3aD/pAnQKBgQD2nC+S12XFj7byDoJd
g1sifKo9vIPJ/JWbgkdD+M2fyuMIXc4gZPvEApWceLbcGzWpfkelp8gAujMH9zLG
dPWtmdPMGTkv3ZpqV/f3Hyf8iEfl9BR5NPXZrnorz2UB0/9SAv0Y5qU90YqthvE5
JYVrJtIJXrNWZloOkZmgcT33RwKBgQDelScnxj714yihX/AisPpQMshtEhmG0cUD
DwaWCXDFLP+rukVYm+jTOEgt+xJ2nJSPr2MKNY0LR24Zo5/5tXO9P9BJyJ/2chZg
aDnnX/9VgPU/IClcTfSj8UdHHiggPVH+z2aTXKKluJjRAcmAw4kb+qi9okyhhfTy
nnT8DHp1EwKBgQCZGBrckQWoIPDU0jcSMJKqFTRmgRpbkYea88SkKNgWJBDPR9TH
/YjihSw16Ca0+9tTboayCze5Y958SnTmCQPfksiOQvZihbLv486XRms/dacU1XLE
UCFz0sIbYnP1L5OoaRyQkdbxSp1J3qTv8iAihgYMNRMmRwIPW0pA9SwfzwKBgG0v
875CNN6AKY1IN898y74Nu14t89G8E44Vj+CIDwbatSzzulLmYIdE47uSn5MJ6qK1
obr/XAo9ZxgyuSZQyc77f9zCCx5lBu8SEd2brPCvyx7FUyTRpQHLOXD8rShrjE6Y
RTRiy/LJpEVbQBLnWNod0yr7c+YEhY2DB9Yg9O17AoGBANlLa53tdGrGRNXrq6+q
GzbcMFPqJ9c3xytJw8OecSs21+Kqefbm1DC5+dUa38G46h8oEoIMMpT23fJYpf/J
fWy7cg3J0U9ts74uUJduj6qciP1zlm/tl/MQDXe3LD1QfVeMy0rNpS0sevcsAmf4
8z0y3S2LKlcjxokZzORghCTz
-----END PRIVATE KEY-----
";
    const RSA2_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA1msf4SNFsTtUN9Ybyi1X
QNLwEjTwLiSNNvSk28s061mJikPkvX/SbwlMybRSkJ3TlmuHpbM3rV0eF+rfwFpj
uD1N+7rR8Kybd45ehBfJElIBVSw3WWavzaBDkkFpSrnkp5457QU9T+v/a7PD2oG1
bk9OuZEuyQX27V347htvJXjF5yQhRJhjXg2d1m28iqIxYjOUVRNeuaIcoBJi+Hj6
UTx3lQQPgPeYoI3SQdROBhIgXWUfWfvatfwuLlssIiT4Zn0azxrZz/hLV1xzaKNB
ruAmthbnI70D8JljToVqt5+4Gfjke5nWm4LR9UzIfwQkkKr5XlD7fdmkpy+s5XLN
RQIDAQAB
-----END PUBLIC KEY-----
";
    const RSA2_N: &str = "1msf4SNFsTtUN9Ybyi1XQNLwEjTwLiSNNvSk28s061mJikPkvX_SbwlMybRSkJ3TlmuHpbM3rV0eF-rfwFpjuD1N-7rR8Kybd45ehBfJElIBVSw3WWavzaBDkkFpSrnkp5457QU9T-v_a7PD2oG1bk9OuZEuyQX27V347htvJXjF5yQhRJhjXg2d1m28iqIxYjOUVRNeuaIcoBJi-Hj6UTx3lQQPgPeYoI3SQdROBhIgXWUfWfvatfwuLlssIiT4Zn0azxrZz_hLV1xzaKNBruAmthbnI70D8JljToVqt5-4Gfjke5nWm4LR9UzIfwQkkKr5XlD7fdmkpy-s5XLNRQ";

    use testing::{EC_P256_PRIVATE as EC1_PRIVATE, EC_P256_PUBLIC as EC1_PUBLIC};
    const EC1_X: &str = "7-rS5LWxOMAax0YWlGALfYZnViO_FgJ8z4RKu7lUzcs";
    const EC1_Y: &str = "r_wZY0Rl1dhyTXfqyc5PlQK5ZRfJTp2b1uLDyzIvIH4";

    const EC384_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEbas0p6Ki5CRBsGGpgyRRIsu15KzlYZxI
MYGfQmPLiXKWeLxtTxZbu4R1k7ECzJL8piA/lAftwZ0SYL2xp953iudwJfyeGp5P
NFLuONGG/t8RUHEEba4KV/aTs9rYPJGg
-----END PUBLIC KEY-----
";
    const RSA1024_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQC3AviVtZfzXGHHqrCsE3uKeXkz
J7SMDRwFOGpyD935FueqWUu2Qub0iQbHxp8/oxM6Q/+Rm7AvcvvpmbzNcDypeYV/
4JdjHZOsStbBzaTHt+R8o03dd402V3QKVvEbJyl5MOOYKqzTlnpnTf1uUFWXQIrf
wUxy2SJnKlwFKtLGhwIDAQAB
-----END PUBLIC KEY-----
";

    const SECRET: &str = "0123456789abcdef0123456789abcdef-test-only";
    const SECRET_VAR: &str = "ROSTERD_TEST_JWT_SECRET";

    /// A scratch directory removed on drop (no tempfile dependency).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "jwtmod-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn write(&self, name: &str, contents: &str) -> PathBuf {
            std::fs::write(self.0.join(name), contents).unwrap();
            PathBuf::from(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn env_with_secret(name: &str) -> Option<String> {
        (name == SECRET_VAR).then(|| SECRET.to_owned())
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn base_cfg() -> JwtConfig {
        serde_json::from_value(json!({ "audience": ["roster"] })).unwrap()
    }

    fn hs_cfg() -> JwtConfig {
        JwtConfig {
            hs256_secret_env: Some(SECRET_VAR.to_owned()),
            ..base_cfg()
        }
    }

    fn build(cfg: &JwtConfig, dir: &TempDir) -> Result<JwtVerifier, JwtError> {
        JwtVerifier::from_config(cfg, &dir.0, &env_with_secret)
    }

    /// A verifier trusting the given PEM public keys (and nothing else).
    fn pem_verifier(pems: &[&str]) -> JwtVerifier {
        let dir = TempDir::new();
        let cfg = JwtConfig {
            public_keys: pems
                .iter()
                .enumerate()
                .map(|(i, pem)| dir.write(&format!("key{i}.pem"), pem))
                .collect(),
            ..base_cfg()
        };
        build(&cfg, &dir).unwrap()
    }

    fn hs_verifier() -> JwtVerifier {
        build(&hs_cfg(), &TempDir::new()).unwrap()
    }

    fn claims() -> Value {
        json!({
            "sub": "alice",
            "tenant": "acme",
            "aud": "roster",
            "exp": now() + 600,
            "scope": "roster:read",
        })
    }

    fn with(mut base: Value, changes: Value) -> Value {
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                base.as_object_mut().unwrap().remove(k);
            } else {
                base[k] = v.clone();
            }
        }
        base
    }

    fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
        let header = Header {
            kid: kid.map(str::to_owned),
            ..Header::new(alg)
        };
        jsonwebtoken::encode(&header, claims, key).unwrap()
    }

    fn rs256(private_pem: &str, kid: Option<&str>, claims: &Value) -> String {
        let key = EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap();
        sign(Algorithm::RS256, &key, kid, claims)
    }

    fn es256(kid: Option<&str>, claims: &Value) -> String {
        let key = EncodingKey::from_ec_pem(EC1_PRIVATE.as_bytes()).unwrap();
        sign(Algorithm::ES256, &key, kid, claims)
    }

    fn hs256(claims: &Value) -> String {
        testing::hs256_token(SECRET.as_bytes(), claims)
    }

    /// A token with an arbitrary header and a junk signature.
    fn raw_token(header: &Value, claims: &Value, signature: &str) -> String {
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            signature
        )
    }

    fn code_of(r: Result<Principal, JwtError>) -> &'static str {
        r.map(|p| panic!("expected an error, got {p:?}"))
            .unwrap_err()
            .code()
    }

    fn jwks_json() -> Value {
        json!({ "keys": [
            { "kty": "RSA", "kid": "r1", "use": "sig", "alg": "RS256", "n": RSA1_N, "e": "AQAB" },
            { "kty": "RSA", "kid": "r2", "n": RSA2_N, "e": "AQAB" },
            { "kty": "EC", "kid": "e1", "crv": "P-256", "x": EC1_X, "y": EC1_Y },
            // Present in real provider JWKS files, irrelevant to us: skipped.
            { "kty": "RSA", "kid": "enc", "use": "enc", "n": RSA1_N, "e": "AQAB" },
            { "kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": EC1_X },
        ]})
    }

    fn jwks_verifier(extra: impl FnOnce(JwtConfig, &TempDir) -> JwtConfig) -> JwtVerifier {
        let dir = TempDir::new();
        let path = dir.write("jwks.json", &jwks_json().to_string());
        let cfg = extra(
            JwtConfig {
                jwks_file: Some(path),
                ..base_cfg()
            },
            &dir,
        );
        build(&cfg, &dir).unwrap()
    }

    #[test]
    fn jwks_keys_whose_operations_exclude_verify_are_not_used() {
        let dir = TempDir::new();
        let jwks = json!({ "keys": [
            { "kty": "RSA", "kid": "r1", "key_ops": ["encrypt"], "n": RSA1_N, "e": "AQAB" },
            { "kty": "RSA", "kid": "r2", "key_ops": ["verify"], "n": RSA2_N, "e": "AQAB" },
        ]});
        let cfg = JwtConfig {
            jwks_file: Some(dir.write("jwks.json", &jwks.to_string())),
            ..base_cfg()
        };
        let v = build(&cfg, &dir).unwrap();
        assert!(
            v.verify(&rs256(RSA2_PRIVATE, Some("r2"), &claims()))
                .is_ok()
        );
        assert_eq!(
            code_of(v.verify(&rs256(RSA1_PRIVATE, Some("r1"), &claims()))),
            "token_unknown_key"
        );
    }

    #[test]
    fn an_unset_secret_only_turns_off_hs256_when_public_keys_are_configured() {
        let dir = TempDir::new();
        let cfg = JwtConfig {
            hs256_secret_env: Some("UNSET".into()),
            public_keys: vec![dir.write("rsa1.pem", RSA1_PUBLIC)],
            ..base_cfg()
        };
        let v = JwtVerifier::from_config(&cfg, &dir.0, &no_env).unwrap();
        assert!(v.verify(&rs256(RSA1_PRIVATE, None, &claims())).is_ok());
        assert_eq!(
            code_of(v.verify(&hs256(&claims()))),
            "token_unsupported_algorithm"
        );
        // With nothing else to verify with, the unset secret is the answer.
        let alone = JwtConfig {
            hs256_secret_env: Some("UNSET".into()),
            ..base_cfg()
        };
        assert!(matches!(
            JwtVerifier::from_config(&alone, &dir.0, &no_env),
            Err(JwtError::SecretUnset { .. })
        ));
    }

    // ---- valid tokens ----

    #[test]
    fn hs256_token_verifies() {
        let p = hs_verifier().verify(&hs256(&claims())).unwrap();
        assert_eq!(p.subject, "alice");
        assert_eq!(p.tenant, "acme");
        assert_eq!(p.actor(), "user:alice");
        assert!(p.has(Scope::Read));
        assert!(!p.has(Scope::Write));
    }

    #[test]
    fn rs256_token_verifies_with_spki_and_pkcs1_pem() {
        let token = rs256(RSA1_PRIVATE, None, &claims());
        for pem in [RSA1_PUBLIC, RSA1_PUBLIC_PKCS1] {
            let p = pem_verifier(&[pem]).verify(&token).unwrap();
            assert_eq!(p.subject, "alice");
        }
    }

    #[test]
    fn es256_token_verifies() {
        let p = pem_verifier(&[EC1_PUBLIC])
            .verify(&es256(None, &claims()))
            .unwrap();
        assert_eq!(p.tenant, "acme");
    }

    #[test]
    fn several_pems_are_tried_by_algorithm() {
        let v = pem_verifier(&[RSA1_PUBLIC, EC1_PUBLIC, RSA2_PUBLIC]);
        assert!(v.verify(&rs256(RSA1_PRIVATE, None, &claims())).is_ok());
        assert!(v.verify(&rs256(RSA2_PRIVATE, None, &claims())).is_ok());
        assert!(v.verify(&es256(None, &claims())).is_ok());
    }

    /// A token expiring further ahead than `max_lifetime_secs` (plus the leeway) is
    /// refused whatever else it carries; without the setting, a year-long one passes.
    #[test]
    fn a_token_living_longer_than_max_lifetime_secs_is_refused() {
        let dir = TempDir::new();
        let capped = build(
            &JwtConfig {
                max_lifetime_secs: Some(3600),
                ..hs_cfg()
            },
            &dir,
        )
        .unwrap();
        let expiring = |secs: u64| hs256(&with(claims(), json!({ "exp": now() + secs })));
        assert!(capped.verify(&expiring(3600)).is_ok());
        // Within the 30 s leeway, as for `exp` itself.
        assert!(capped.verify(&expiring(3620)).is_ok());
        let long = capped.verify(&expiring(3700)).unwrap_err();
        assert_eq!(long.code(), "token_lives_too_long");
        assert!(long.to_string().contains("3600 s"), "{long}");
        assert_eq!(
            code_of(capped.verify(&expiring(366 * 24 * 3600))),
            "token_lives_too_long"
        );
        // A fractional `exp` is a NumericDate too.
        let fractional = hs256(&with(claims(), json!({ "exp": now() as f64 + 7200.5 })));
        assert_eq!(code_of(capped.verify(&fractional)), "token_lives_too_long");
        assert!(hs_verifier().verify(&expiring(366 * 24 * 3600)).is_ok());
        for bad in [0, 366 * 24 * 3600 + 1] {
            let e = build(
                &JwtConfig {
                    max_lifetime_secs: Some(bad),
                    ..hs_cfg()
                },
                &dir,
            )
            .unwrap_err();
            assert!(e.to_string().contains("max_lifetime_secs"), "{e}");
        }
    }

    #[test]
    fn leeway_tolerates_small_clock_skew() {
        let v = hs_verifier();
        let late = with(claims(), json!({ "exp": now() - 10 }));
        let early = with(claims(), json!({ "nbf": now() + 10 }));
        assert!(v.verify(&hs256(&late)).is_ok());
        assert!(v.verify(&hs256(&early)).is_ok());
    }

    #[test]
    fn audience_may_be_an_array_and_any_configured_value_matches() {
        let cfg = JwtConfig {
            audience: vec!["roster".into(), "roster-admin".into()],
            ..hs_cfg()
        };
        let v = build(&cfg, &TempDir::new()).unwrap();
        let arr = with(claims(), json!({ "aud": ["other", "roster-admin"] }));
        assert!(v.verify(&hs256(&arr)).is_ok());
    }

    // ---- JWKS ----

    /// An issuer's key rotation: a reload re-reads the key files and rebuilds the
    /// verifier when they changed; a broken file keeps the keys in force.
    #[test]
    fn a_reload_takes_keys_added_to_the_jwks_file() {
        let dir = TempDir::new();
        let one = json!({ "keys": [jwks_json()["keys"][0].clone()] });
        let path = dir.write("jwks.json", &one.to_string());
        let cfg = JwtConfig {
            jwks_file: Some(path),
            ..base_cfg()
        };
        let v = Verifiers::new(Some(build(&cfg, &dir).unwrap()), Some(&cfg), &dir.0);
        let rotated = rs256(RSA2_PRIVATE, Some("r2"), &claims());
        let verify = |t: &str| v.get().unwrap().verify(t).map(|_| ()).map_err(|e| e.code());
        assert_eq!(verify(&rotated), Err("token_unknown_key"));
        let reload = || {
            v.reload(&cfg, &dir.0, &env_with_secret)
                .map_err(|e| e.to_string())
        };
        assert_eq!(reload(), Ok(false));
        dir.write("jwks.json", &jwks_json().to_string());
        assert_eq!(reload(), Ok(true));
        assert_eq!(verify(&rotated), Ok(()));
        assert_eq!(reload(), Ok(false));
        dir.write("jwks.json", "{ not json");
        assert!(reload().is_err());
        assert_eq!(verify(&rotated), Ok(()));
        // Tried again at the next reload, once fixed.
        dir.write("jwks.json", &one.to_string());
        assert_eq!(reload(), Ok(true));
        assert_eq!(verify(&rotated), Err("token_unknown_key"));
    }

    #[test]
    fn jwks_kid_selects_the_key() {
        let v = jwks_verifier(|c, _| c);
        assert!(
            v.verify(&rs256(RSA1_PRIVATE, Some("r1"), &claims()))
                .is_ok()
        );
        assert!(
            v.verify(&rs256(RSA2_PRIVATE, Some("r2"), &claims()))
                .is_ok()
        );
        assert!(v.verify(&es256(Some("e1"), &claims())).is_ok());
        // The kid pins the key: a valid signature by another JWKS key fails.
        assert_eq!(
            code_of(v.verify(&rs256(RSA2_PRIVATE, Some("r1"), &claims()))),
            "token_bad_signature"
        );
        // A kid naming a key of another algorithm is not a match, and is said as such:
        // the key is there, the algorithm is what is wrong.
        let e = v
            .verify(&rs256(RSA1_PRIVATE, Some("e1"), &claims()))
            .unwrap_err();
        assert_eq!(e.code(), "token_unsupported_algorithm");
        assert_eq!(
            e.to_string(),
            "token is signed RS256, but its kid \"e1\" names a key for ES256"
        );
    }

    #[test]
    fn jwks_without_token_kid_tries_keys_of_the_alg() {
        let v = jwks_verifier(|c, _| c);
        assert!(v.verify(&rs256(RSA1_PRIVATE, None, &claims())).is_ok());
        assert!(v.verify(&rs256(RSA2_PRIVATE, None, &claims())).is_ok());
        assert!(v.verify(&es256(None, &claims())).is_ok());
    }

    #[test]
    fn unknown_kid_is_refused() {
        let v = jwks_verifier(|c, _| c);
        let token = rs256(RSA1_PRIVATE, Some("nope"), &claims());
        assert_eq!(code_of(v.verify(&token)), "token_unknown_key");
    }

    #[test]
    fn unknown_kid_falls_back_to_keys_without_kid() {
        let v = jwks_verifier(|c, dir| JwtConfig {
            public_keys: vec![dir.write("rsa2.pem", RSA2_PUBLIC)],
            ..c
        });
        assert!(
            v.verify(&rs256(RSA2_PRIVATE, Some("rotated"), &claims()))
                .is_ok()
        );
        // ...but never to JWKS keys that have a kid of their own; when no fallback
        // verifies, the kid is what is wrong (a JWKS file behind the issuer's rotation).
        assert_eq!(
            code_of(v.verify(&rs256(RSA1_PRIVATE, Some("rotated"), &claims()))),
            "token_unknown_key"
        );
        // A kid we hold, with a signature by another key, stays a bad signature.
        assert_eq!(
            code_of(v.verify(&rs256(RSA1_PRIVATE, Some("r2"), &claims()))),
            "token_bad_signature"
        );
    }

    // ---- time claims ----

    #[test]
    fn expired_token_is_refused() {
        let t = hs256(&with(claims(), json!({ "exp": now() - 3600 })));
        assert_eq!(code_of(hs_verifier().verify(&t)), "token_expired");
    }

    #[test]
    fn missing_or_malformed_exp_is_refused() {
        let v = hs_verifier();
        let missing = hs256(&with(claims(), json!({ "exp": null })));
        assert!(
            matches!(v.verify(&missing), Err(JwtError::MissingClaim { claim, .. }) if claim == "exp")
        );
        // Older jsonwebtoken releases skipped validation of a malformed exp.
        // 10.x reports it as missing (its required-claims check runs first)
        // or malformed; any refusal is fine, acceptance is not.
        for exp in [
            json!("tomorrow"),
            json!(-5),
            json!({ "t": 1 }),
            json!(f64::MAX),
        ] {
            let garbled = hs256(&with(claims(), json!({ "exp": exp })));
            let code = code_of(v.verify(&garbled));
            assert!(
                [
                    "token_missing_claim",
                    "token_invalid_claim",
                    "token_malformed"
                ]
                .contains(&code),
                "exp {exp}: {code}"
            );
        }
        // Present but not a number: invalid, not missing.
        for exp in [json!("tomorrow"), json!({ "t": 1 })] {
            let garbled = hs256(&with(claims(), json!({ "exp": exp })));
            assert_eq!(code_of(v.verify(&garbled)), "token_invalid_claim", "{exp}");
        }
        for iat in [json!("1796199230"), json!({ "x": 1 })] {
            let garbled = hs256(&with(claims(), json!({ "iat": iat })));
            assert_eq!(code_of(v.verify(&garbled)), "token_invalid_claim", "{iat}");
        }
        let fine = hs256(&with(claims(), json!({ "iat": now() })));
        assert!(v.verify(&fine).is_ok());
    }

    #[test]
    fn future_nbf_is_refused() {
        let v = hs_verifier();
        let t = hs256(&with(claims(), json!({ "nbf": now() + 3600 })));
        assert_eq!(code_of(v.verify(&t)), "token_not_yet_valid");
        let garbled = hs256(&with(claims(), json!({ "nbf": "soon" })));
        assert_eq!(code_of(v.verify(&garbled)), "token_invalid_claim");
    }

    // ---- audience, issuer, subject, tenant ----

    #[test]
    fn wrong_or_missing_audience_is_refused() {
        let v = hs_verifier();
        for aud in [json!("other"), json!(["a", "b"]), json!([]), json!(null)] {
            let t = hs256(&with(claims(), json!({ "aud": aud })));
            assert_eq!(code_of(v.verify(&t)), "token_wrong_audience", "aud {aud}");
        }
    }

    #[test]
    fn issuer_is_checked_when_configured() {
        let cfg = JwtConfig {
            issuer: Some("https://idp.example".into()),
            ..hs_cfg()
        };
        let v = build(&cfg, &TempDir::new()).unwrap();
        let good = hs256(&with(claims(), json!({ "iss": "https://idp.example" })));
        assert!(v.verify(&good).is_ok());
        let wrong = hs256(&with(claims(), json!({ "iss": "https://evil.example" })));
        assert_eq!(code_of(v.verify(&wrong)), "token_wrong_issuer");
        assert_eq!(code_of(v.verify(&hs256(&claims()))), "token_wrong_issuer");
    }

    #[test]
    fn public_keys_without_an_issuer_are_warned_of() {
        assert!(hs_cfg().warnings().is_empty());
        let keys = JwtConfig {
            jwks_file: Some("keys.json".into()),
            ..hs_cfg()
        };
        let said = keys.warnings();
        assert!(
            said.len() == 1 && said[0].contains("`issuer` is not"),
            "{said:?}"
        );
        let pinned = JwtConfig {
            issuer: Some("https://idp.example".into()),
            ..keys
        };
        assert!(pinned.warnings().is_empty());
    }

    #[test]
    fn issuer_is_ignored_when_not_configured() {
        let t = hs256(&with(claims(), json!({ "iss": "anyone" })));
        assert!(hs_verifier().verify(&t).is_ok());
    }

    #[test]
    fn missing_tenant_is_refused() {
        let v = hs_verifier();
        for tenant in [json!(null), json!(42), json!("")] {
            let t = hs256(&with(claims(), json!({ "tenant": tenant })));
            assert_eq!(code_of(v.verify(&t)), "token_no_tenant", "tenant {tenant}");
        }
    }

    #[test]
    fn tenant_claim_name_is_configurable() {
        let cfg = JwtConfig {
            tenant_claim: "org_id".into(),
            ..hs_cfg()
        };
        let v = build(&cfg, &TempDir::new()).unwrap();
        let t = hs256(&with(claims(), json!({ "org_id": "globex" })));
        assert_eq!(v.verify(&t).unwrap().tenant, "globex");
    }

    #[test]
    fn missing_subject_is_refused() {
        let v = hs_verifier();
        for sub in [
            json!(null),
            json!(""),
            json!(" "),
            json!("\u{3000}\t"),
            json!("\u{2800}"),
            json!(" \u{1D159} "),
        ] {
            let t = hs256(&with(claims(), json!({ "sub": sub })));
            assert_eq!(code_of(v.verify(&t)), "token_missing_claim", "sub {sub}");
        }
        // Named, but not on one line: refused the same way, saying why.
        for sub in [
            "a\nb",
            "alice\u{7f}",
            "\u{1b}[31malice",
            "x\u{2028}INFO fake",
        ] {
            let t = hs256(&with(claims(), json!({ "sub": sub })));
            let e = v.verify(&t).unwrap_err();
            assert_eq!(e.code(), "token_missing_claim", "sub {sub:?}");
            assert!(e.to_string().contains("control character"), "{e}");
        }
        // Every character that shows as nothing, as the bundle refuses them in ids: the
        // soft hyphen and the tag characters make an `ad\u{AD}min` that reads as `admin`.
        for sub in [
            "\u{200B}",
            "admin\u{202E}nimda",
            "\u{FEFF}alice",
            "ad\u{AD}min",
            "admin\u{E0041}",
            "ali\u{180E}ce",
        ] {
            let t = hs256(&with(claims(), json!({ "sub": sub })));
            let e = v.verify(&t).unwrap_err();
            assert_eq!(e.code(), "token_missing_claim", "sub {sub:?}");
            assert!(e.to_string().contains("invisible"), "{e}");
        }
        // Blanks around a name are no reason to refuse it.
        let t = hs256(&with(claims(), json!({ "sub": " alice " })));
        assert!(v.verify(&t).is_ok());
        // There, but not a string: named as such.
        for sub in [json!(7), json!(["alice"]), json!({ "name": "alice" })] {
            let t = hs256(&with(claims(), json!({ "sub": sub })));
            let e = v.verify(&t).unwrap_err();
            assert_eq!(e.code(), "token_invalid_claim", "sub {sub}");
            assert!(e.to_string().contains("sub"), "{e}");
        }
    }

    // ---- signatures and algorithms ----

    #[test]
    fn bad_signatures_are_refused() {
        let v = hs_verifier();
        let other = testing::hs256_token(b"another-secret-that-is-32-bytes-long!", &claims());
        assert_eq!(code_of(v.verify(&other)), "token_bad_signature");

        // Swap in a payload granting admin, keeping the original signature.
        let token = hs256(&claims());
        let parts: Vec<&str> = token.split('.').collect();
        let forged = with(claims(), json!({ "scope": "roster:admin" }));
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(forged.to_string()),
            parts[2]
        );
        assert_eq!(code_of(v.verify(&tampered)), "token_bad_signature");

        let rsa = pem_verifier(&[RSA1_PUBLIC]);
        let by_other_key = rs256(RSA2_PRIVATE, None, &claims());
        assert_eq!(code_of(rsa.verify(&by_other_key)), "token_bad_signature");
    }

    #[test]
    fn alg_none_is_refused() {
        let v = hs_verifier();
        for alg in ["none", "None", "NONE"] {
            let t = raw_token(&json!({ "alg": alg, "typ": "JWT" }), &claims(), "");
            assert!(
                matches!(v.verify(&t), Err(JwtError::UnsupportedAlgorithm(a)) if a == alg),
                "alg {alg}"
            );
        }
    }

    #[test]
    fn other_algorithms_are_refused() {
        let v = hs_verifier();
        for alg in ["HS384", "HS512", "RS512", "PS256", "ES384", "EdDSA"] {
            let t = raw_token(&json!({ "alg": alg }), &claims(), "c2ln");
            assert_eq!(
                code_of(v.verify(&t)),
                "token_unsupported_algorithm",
                "{alg}"
            );
        }
        // Configured algorithms only: no secret means no HS256, no RSA key
        // means no RS256.
        assert_eq!(
            code_of(pem_verifier(&[EC1_PUBLIC]).verify(&hs256(&claims()))),
            "token_unsupported_algorithm"
        );
        assert_eq!(
            code_of(v.verify(&rs256(RSA1_PRIVATE, None, &claims()))),
            "token_unsupported_algorithm"
        );
    }

    #[test]
    fn algorithm_confusion_is_refused() {
        // The classic attack: HMAC-sign with the server's RSA public key.
        let forged = testing::hs256_token(RSA1_PUBLIC.as_bytes(), &claims());
        let rsa_only = pem_verifier(&[RSA1_PUBLIC]);
        assert_eq!(
            code_of(rsa_only.verify(&forged)),
            "token_unsupported_algorithm"
        );

        // With a secret also configured, HS256 is allowed but only with it.
        let dir = TempDir::new();
        let cfg = JwtConfig {
            public_keys: vec![dir.write("rsa.pem", RSA1_PUBLIC)],
            ..hs_cfg()
        };
        let both = build(&cfg, &dir).unwrap();
        assert_eq!(code_of(both.verify(&forged)), "token_bad_signature");
        let pkcs1 = testing::hs256_token(RSA1_PUBLIC_PKCS1.as_bytes(), &claims());
        assert_eq!(code_of(both.verify(&pkcs1)), "token_bad_signature");
    }

    /// A claim or header parameter given twice is refused: jsonwebtoken kept the last
    /// `tenant` or `scope`, while a gateway reading the first would see another.
    #[test]
    fn a_key_given_twice_is_malformed() {
        let v = hs_verifier();
        let signed = |header: &str, payload: &str| {
            let input = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header),
                URL_SAFE_NO_PAD.encode(payload)
            );
            let key = EncodingKey::from_secret(SECRET.as_bytes());
            let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::HS256).unwrap();
            format!("{input}.{sig}")
        };
        let exp = now() + 600;
        let payload = |extra: &str| {
            format!(
                r#"{{"sub":"alice","aud":"roster","exp":{exp},"tenant":"acme","scope":"roster:read"{extra}}}"#
            )
        };
        let header = r#"{"alg":"HS256","typ":"JWT"}"#;
        assert!(v.verify(&signed(header, &payload(""))).is_ok());
        for extra in [
            r#","tenant":"beta""#,
            r#","scope":"roster:admin""#,
            r#","sub":"bob""#,
        ] {
            let t = signed(header, &payload(extra));
            assert_eq!(code_of(v.verify(&t)), "token_malformed", "{extra}");
        }
        let twice = r#"{"alg":"HS256","typ":"JWT","typ":"JWT"}"#;
        assert_eq!(
            code_of(v.verify(&signed(twice, &payload("")))),
            "token_malformed"
        );
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let v = hs_verifier();
        assert_eq!(code_of(v.verify("")), "token_missing");
        let good = hs256(&claims());
        let cases = [
            "garbage".to_owned(),
            "a.b".to_owned(),
            "a.b.c.d.e".to_owned(),
            format!("Bearer {good}"),
            format!("!!!.{}", good.split_once('.').unwrap().1),
            raw_token(&json!(["HS256"]), &claims(), "c2ln"),
            raw_token(&json!({ "alg": 256 }), &claims(), "c2ln"),
            raw_token(&json!({ "alg": "HS256", "kid": 1 }), &claims(), "c2ln"),
            raw_token(&json!({ "alg": "HS256", "typ": 1 }), &claims(), "c2ln"),
            raw_token(
                &json!({ "alg": "HS256", "crit": ["exp"] }),
                &claims(),
                "c2ln",
            ),
            format!("{good}{}", "A".repeat(MAX_TOKEN_BYTES)),
        ];
        for t in cases {
            assert_eq!(code_of(v.verify(&t)), "token_malformed", "{t:.60}");
        }
    }

    #[test]
    fn typ_must_name_an_access_token_when_present() {
        let v = hs_verifier();
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let with_typ = |typ: Option<&str>| {
            let header = Header {
                typ: typ.map(str::to_owned),
                ..Header::new(Algorithm::HS256)
            };
            jsonwebtoken::encode(&header, &claims(), &key).unwrap()
        };
        for typ in [
            None,
            Some("JWT"),
            Some("jwt"),
            Some("at+jwt"),
            Some("application/at+JWT"),
        ] {
            assert!(v.verify(&with_typ(typ)).is_ok(), "{typ:?}");
        }
        for typ in ["dpop+jwt", "logout+jwt", "secevent+jwt", "JWS", ""] {
            assert_eq!(
                code_of(v.verify(&with_typ(Some(typ)))),
                "token_wrong_type",
                "{typ}"
            );
        }
    }

    // ---- scopes ----

    #[test]
    fn scopes_from_scope_string() {
        let v = hs_verifier();
        let t = hs256(&with(
            claims(),
            json!({ "scope": "openid roster:write profile roster:bogus" }),
        ));
        let p = v.verify(&t).unwrap();
        assert_eq!(p.highest_scope(), Some(Scope::Write));
        assert!(p.has(Scope::Read) && p.has(Scope::Write) && !p.has(Scope::Admin));
    }

    #[test]
    fn scopes_from_scp_array_or_string() {
        let v = hs_verifier();
        let arr = hs256(&with(
            claims(),
            json!({ "scope": null, "scp": ["email", "roster:admin", 5] }),
        ));
        assert_eq!(v.verify(&arr).unwrap().highest_scope(), Some(Scope::Admin));
        let s = hs256(&with(
            claims(),
            json!({ "scope": null, "scp": "roster:write" }),
        ));
        assert_eq!(v.verify(&s).unwrap().highest_scope(), Some(Scope::Write));
        // Both claims are honoured; the higher grant wins.
        let both = hs256(&with(claims(), json!({ "scp": ["roster:write"] })));
        assert_eq!(v.verify(&both).unwrap().highest_scope(), Some(Scope::Write));
    }

    #[test]
    fn no_or_unusable_scope_grants_nothing() {
        let v = hs_verifier();
        for scope in [json!(null), json!("openid ROSTER:READ roster:"), json!(7)] {
            let t = hs256(&with(claims(), json!({ "scope": scope })));
            let p = v.verify(&t).unwrap();
            assert!(!p.has(Scope::Read), "scope {scope}");
            assert_eq!(p.highest_scope(), None);
        }
    }

    #[test]
    fn admin_implies_write_implies_read() {
        assert!(Scope::Admin > Scope::Write && Scope::Write > Scope::Read);
        let admin = testing::principal("root", "acme", &[Scope::Admin]);
        assert!(admin.has(Scope::Read) && admin.has(Scope::Write) && admin.has(Scope::Admin));
        let writer = testing::principal("w", "acme", &[Scope::Read, Scope::Write]);
        assert!(writer.has(Scope::Read) && writer.has(Scope::Write) && !writer.has(Scope::Admin));
        let reader = testing::principal("r", "acme", &[Scope::Read]);
        assert!(reader.has(Scope::Read) && !reader.has(Scope::Write));
        assert!(!testing::principal("n", "acme", &[]).has(Scope::Read));
        assert_eq!(Scope::Write.to_string(), "roster:write");
    }

    // ---- configuration ----

    #[test]
    fn config_defaults_and_unknown_fields() {
        let cfg = base_cfg();
        assert_eq!(cfg.tenant_claim, "tenant");
        assert_eq!(cfg.leeway_secs, 30);
        assert!(cfg.issuer.is_none() && cfg.public_keys.is_empty() && cfg.jwks_file.is_none());
        let typo =
            serde_json::from_value::<JwtConfig>(json!({ "audience": ["a"], "audiance": ["b"] }));
        assert!(typo.is_err());
    }

    #[test]
    fn config_needs_audience_and_keys() {
        let dir = TempDir::new();
        let no_aud = JwtConfig {
            audience: vec![],
            ..hs_cfg()
        };
        assert!(matches!(build(&no_aud, &dir), Err(JwtError::NoAudience)));
        let blank_aud = JwtConfig {
            audience: vec![String::new()],
            ..hs_cfg()
        };
        assert_eq!(
            build(&blank_aud, &dir).unwrap_err().code(),
            "jwt_config_invalid"
        );
        assert!(matches!(build(&base_cfg(), &dir), Err(JwtError::NoKeys)));
    }

    #[test]
    fn config_rejects_bad_settings() {
        let dir = TempDir::new();
        for cfg in [
            JwtConfig {
                leeway_secs: MAX_LEEWAY_SECS + 1,
                ..hs_cfg()
            },
            JwtConfig {
                tenant_claim: String::new(),
                ..hs_cfg()
            },
            JwtConfig {
                issuer: Some(String::new()),
                ..hs_cfg()
            },
            JwtConfig {
                hs256_secret_env: Some(String::new()),
                ..hs_cfg()
            },
        ] {
            assert_eq!(build(&cfg, &dir).unwrap_err().code(), "jwt_config_invalid");
        }
    }

    #[test]
    fn secret_env_must_be_set_and_long_enough() {
        let dir = TempDir::new();
        let err = JwtVerifier::from_config(&hs_cfg(), &dir.0, &no_env).unwrap_err();
        assert!(matches!(err, JwtError::SecretUnset { .. }));
        assert!(err.to_string().contains(SECRET_VAR), "{err}");

        let short = |_: &str| Some("x".repeat(MIN_HS256_SECRET_BYTES - 1));
        let err = JwtVerifier::from_config(&hs_cfg(), &dir.0, &short).unwrap_err();
        assert!(matches!(err, JwtError::SecretTooShort { len: 31, .. }));
        assert!(err.to_string().contains(SECRET_VAR), "{err}");

        let exact = |_: &str| Some("x".repeat(MIN_HS256_SECRET_BYTES));
        assert!(JwtVerifier::from_config(&hs_cfg(), &dir.0, &exact).is_ok());
    }

    #[test]
    fn key_paths_resolve_against_base_dir() {
        let dir = TempDir::new();
        let relative = dir.write("rsa.pem", RSA1_PUBLIC);
        let absolute = dir.0.join(dir.write("ec.pem", EC1_PUBLIC));
        let cfg = JwtConfig {
            public_keys: vec![relative, absolute],
            ..base_cfg()
        };
        // Absolute paths ignore base_dir.
        assert!(JwtVerifier::from_config(&cfg, &dir.0, &no_env).is_ok());
        let elsewhere = JwtVerifier::from_config(&cfg, Path::new("/nonexistent"), &no_env);
        let err = elsewhere.unwrap_err();
        assert_eq!(err.code(), "jwt_config_key_unreadable");
        assert!(err.to_string().contains("/nonexistent/rsa.pem"), "{err}");
    }

    /// `pem` with its DER edited by `edit`.
    fn edited_pem(pem: &str, edit: impl FnOnce(&mut Vec<u8>)) -> String {
        use base64::engine::general_purpose::STANDARD;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let mut der = STANDARD.decode(body).unwrap();
        edit(&mut der);
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            STANDARD.encode(der)
        )
    }

    #[test]
    fn unusable_pem_files_are_rejected_with_their_path() {
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let two = format!("{RSA1_PUBLIC}{EC1_PUBLIC}");
        // The exponent 65537 (01 00 01) ends the RSA key; the point's y ends the EC one.
        let exponent = |e: [u8; 3]| {
            edited_pem(RSA1_PUBLIC, |der| {
                let n = der.len();
                assert_eq!(der[n - 3..], [1, 0, 1]);
                der[n - 3..].copy_from_slice(&e);
            })
        };
        let (e_even, e_padded) = (exponent([1, 0, 0]), exponent([0, 0, 1]));
        let off_curve = edited_pem(EC1_PUBLIC, |der| *der.last_mut().unwrap() ^= 1);
        let cases: [(&str, &str); 10] = [
            (&e_even, "public exponent"),
            (&e_padded, "shortest form"),
            (&off_curve, "not on P-256"),
            (RSA1_PRIVATE, "private key"),
            (EC1_PRIVATE, "private key"),
            (EC384_PUBLIC, "P-256"),
            (RSA1024_PUBLIC, "1024 bits"),
            (cert, "certificate"),
            (&two, "more than one"),
            ("hello", "no PEM block"),
        ];
        for (i, (pem, reason)) in cases.into_iter().enumerate() {
            let dir = TempDir::new();
            let name = format!("bad{i}.pem");
            let cfg = JwtConfig {
                public_keys: vec![dir.write(&name, pem)],
                ..base_cfg()
            };
            let err = build(&cfg, &dir).unwrap_err();
            let msg = err.to_string();
            assert_eq!(err.code(), "jwt_config_key_invalid", "{msg}");
            assert!(msg.contains(&name) && msg.contains(reason), "{msg}");
        }
    }

    #[test]
    fn bad_jwks_files_are_rejected() {
        let rsa = |extra: Value| {
            with(
                json!({ "kty": "RSA", "kid": "k", "n": RSA1_N, "e": "AQAB" }),
                extra,
            )
        };
        let cases = [
            ("not json".to_owned(), "not JSON"),
            (json!({ "key": [] }).to_string(), "\"keys\""),
            (json!({ "keys": [] }).to_string(), "no RS256 or ES256"),
            (
                json!({ "keys": [rsa(json!({ "use": "enc" }))] }).to_string(),
                "no RS256 or ES256",
            ),
            (
                json!({ "keys": [{ "kty": "oct", "k": "c2VjcmV0" }] }).to_string(),
                "symmetric",
            ),
            (
                json!({ "keys": [rsa(json!({ "d": "AAAA" }))] }).to_string(),
                "private",
            ),
            (
                json!({ "keys": [rsa(json!({})), rsa(json!({}))] }).to_string(),
                "duplicate kid",
            ),
            (
                json!({ "keys": [rsa(json!({ "n": "AQAB" }))] }).to_string(),
                "bits",
            ),
            (
                json!({ "keys": [rsa(json!({ "kid": 3 }))] }).to_string(),
                "kid is not a string",
            ),
            (
                json!({ "keys": [{ "kty": "EC", "crv": "P-256", "x": "AAAA", "y": EC1_Y }] })
                    .to_string(),
                "32 bytes",
            ),
            // Keys no token could verify against: e = 1, an even e, a point off the curve.
            (
                json!({ "keys": [rsa(json!({ "e": "AQ" }))] }).to_string(),
                "public exponent",
            ),
            (
                json!({ "keys": [rsa(json!({ "e": "AQA" }))] }).to_string(),
                "public exponent",
            ),
            (
                json!({ "keys": [rsa(json!({ "e": "AAEAAQ" }))] }).to_string(),
                "fewest bytes",
            ),
            (
                json!({ "keys": [{ "kty": "EC", "crv": "P-256",
                    "x": URL_SAFE_NO_PAD.encode([1u8; 32]), "y": URL_SAFE_NO_PAD.encode([2u8; 32]) }] })
                .to_string(),
                "not on P-256",
            ),
        ];
        for (text, reason) in cases {
            let dir = TempDir::new();
            let cfg = JwtConfig {
                jwks_file: Some(dir.write("jwks.json", &text)),
                ..base_cfg()
            };
            let err = build(&cfg, &dir).unwrap_err();
            let msg = err.to_string();
            assert_eq!(err.code(), "jwt_config_jwks_invalid", "{msg}");
            assert!(msg.contains("jwks.json") && msg.contains(reason), "{msg}");
        }
    }

    #[test]
    fn error_codes_are_distinct_snake_case() {
        let io = || std::io::Error::other("x");
        let all = [
            JwtError::NoAudience,
            JwtError::NoKeys,
            invalid_setting("f", "r"),
            JwtError::SecretUnset { var: "V".into() },
            JwtError::SecretTooShort {
                var: "V".into(),
                len: 1,
            },
            JwtError::KeyFileUnreadable {
                key: "public_keys",
                path: "p".into(),
                source: io(),
            },
            JwtError::InvalidKeyFile {
                path: "p".into(),
                reason: "r".into(),
            },
            JwtError::InvalidJwks {
                path: "p".into(),
                reason: "r".into(),
            },
            JwtError::Missing,
            JwtError::Malformed,
            JwtError::BadSignature,
            JwtError::Expired,
            JwtError::NotYetValid,
            JwtError::WrongAudience,
            JwtError::WrongIssuer,
            JwtError::NoTenant { claim: "t".into() },
            JwtError::MissingClaim {
                claim: "sub".into(),
                why: None,
            },
            JwtError::InvalidClaim("exp".into()),
            JwtError::UnknownKey,
            JwtError::UnsupportedAlgorithm("none".into()),
            JwtError::WrongType("dpop+jwt".into()),
            JwtError::LivesTooLong { max: 3600 },
        ];
        let codes: std::collections::HashSet<&str> = all.iter().map(JwtError::code).collect();
        assert_eq!(codes.len(), all.len());
        for e in &all {
            let code = e.code();
            assert!(
                code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{code}"
            );
            assert_eq!(e.is_config(), code.starts_with("jwt_config_"));
            assert_eq!(!e.is_config(), TOKEN_CODES.contains(&code), "{code}");
        }
        assert_eq!(
            all.iter().filter(|e| !e.is_config()).count(),
            TOKEN_CODES.len()
        );
        assert!(JwtError::NoKeys.is_config() && !JwtError::Expired.is_config());
    }

    #[test]
    fn verifier_is_shareable_across_threads() {
        let v = std::sync::Arc::new(hs_verifier());
        let token = hs256(&claims());
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let (v, token) = (v.clone(), token.clone());
                std::thread::spawn(move || v.verify(&token).map(|p| p.subject))
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap().unwrap(), "alice");
        }
    }
}
