//! `rosterd token jwt`: a Roster API JWT minted from the config's HS256 secret, for the
//! operator, and for the commands that call a running daemon without `--token`.

use anyhow::{Context, Result};
use rosterd::config::Config;
use rosterd::text::terminal_safe;
use std::io::Write as _;

pub(crate) fn jwt(
    config: &std::path::Path,
    tenant: &str,
    scope: &str,
    sub: &str,
    ttl: Option<i64>,
) -> Result<()> {
    let config = Config::load(config)?;
    // The default keeps within the site's limit rather than minting what the daemon
    // refuses; a lifetime asked for explicitly is refused over it instead, below.
    let ttl = ttl.unwrap_or_else(|| within_max_lifetime(&config, 3600));
    outln!("{}", mint_jwt(&config, tenant, scope, sub, ttl)?)?;
    Ok(())
}

/// `secs`, or `[api.jwt] max_lifetime_secs` when shorter: a token's lifetime the daemon
/// takes.
pub(crate) fn within_max_lifetime(config: &Config, secs: u64) -> i64 {
    let max = config.api.jwt.as_ref().and_then(|j| j.max_lifetime_secs);
    max.map_or(secs, |max| max.min(secs)) as i64
}

pub(crate) fn mint_jwt(
    config: &Config,
    tenant: &str,
    scope: &str,
    sub: &str,
    ttl: i64,
) -> Result<String> {
    // The daemon would refuse it with 401: say so now, not at the first call.
    let problem = match sub {
        "" => Some("it is empty"),
        sub => rosterd::api::jwt::subject_problem(sub),
    };
    if let Some(why) = problem {
        anyhow::bail!("--sub {sub:?}: {why}");
    }
    // A token granting nothing, or already expired, would only meet 403 or 401.
    let names: Vec<&str> = scope.split(' ').filter(|n| !n.is_empty()).collect();
    if let Some(bad) = names
        .iter()
        .find(|n| rosterd::api::jwt::Scope::from_name(n).is_none())
    {
        anyhow::bail!(
            "--scope: {bad:?} is no scope of the Roster API (roster:read, roster:write, roster:admin; several are separated by spaces)"
        );
    }
    if names.is_empty() {
        anyhow::bail!("--scope is empty: give roster:read, roster:write or roster:admin");
    }
    if ttl <= 0 {
        anyhow::bail!("--ttl {ttl}: the token would be expired when made; give seconds > 0");
    }
    // An HS256 token cannot be revoked short of rotating the secret for everyone; a year
    // also keeps `now + ttl` far from overflowing.
    const MAX_TTL: i64 = 366 * 24 * 3600;
    if ttl > MAX_TTL {
        anyhow::bail!(
            "--ttl {ttl}: longer than a year ({MAX_TTL} s); a token can only be revoked by rotating the secret, so mint a new one when it expires"
        );
    }
    let jwt = config
        .api
        .jwt
        .as_ref()
        .context("config has no [api.jwt] section")?;
    let var = jwt
        .hs256_secret_env
        .as_ref()
        .context("[api.jwt] has no hs256_secret_env; mint RS256/ES256 tokens with your IdP")?;
    if let Some(max) = jwt.max_lifetime_secs
        && ttl.unsigned_abs() > max
    {
        anyhow::bail!(
            "--ttl {ttl}: longer than [api.jwt] max_lifetime_secs ({max} s) allows, so the daemon would refuse the token; give at most {max}"
        );
    }
    let secret = match std::env::var(var) {
        Ok(s) => s,
        Err(std::env::VarError::NotPresent) => {
            anyhow::bail!(
                "environment variable {} is not set",
                rosterd::config::shown_env_name(var)
            )
        }
        Err(e) => return Err(e).with_context(|| format!("environment variable {var}")),
    };
    // A token the daemon would refuse to verify helps no one.
    if secret.len() < rosterd::api::jwt::MIN_HS256_SECRET_BYTES {
        anyhow::bail!(
            "{var} holds {} bytes; `serve` refuses an HS256 secret under {} bytes, so it would refuse this token too",
            secret.len(),
            rosterd::api::jwt::MIN_HS256_SECRET_BYTES
        );
    }
    if !config.tenants.iter().any(|t| t.id == tenant) {
        anyhow::bail!("tenant {tenant:?} is not declared in the config");
    }
    let now = chrono::Utc::now().timestamp();
    let mut claims = serde_json::json!({
        "sub": sub,
        jwt.tenant_claim.as_str(): tenant,
        "scope": scope,
        "aud": jwt.audience.first().context("[api.jwt] audience is empty")?,
        "iat": now,
        "exp": now + ttl,
    });
    if let Some(iss) = &jwt.issuer {
        claims["iss"] = iss.clone().into();
    }
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?;
    Ok(token)
}
