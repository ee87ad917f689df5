//! SCIM bearer tokens: generated high-entropy, stored only as SHA-256 hashes, compared in
//! constant time. A fast hash is enough because tokens are 256-bit random values, not
//! passwords a person chose.

use base64::Engine;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use subtle::ConstantTimeEq;

use crate::config::TenantConfig;

const HASH_PREFIX: &str = "sha256:";
const TOKEN_PREFIX: &str = "rsd_";

#[derive(Debug, thiserror::Error)]
pub enum TokenHashError {
    #[error("a token hash must look like `sha256:<64 hex digits>`")]
    Format,
}

#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenHash({HASH_PREFIX}…)")
    }
}

impl TokenHash {
    pub fn of(token: &str) -> TokenHash {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }

    pub fn parse(s: &str) -> Result<TokenHash, TokenHashError> {
        let hex_part = s.strip_prefix(HASH_PREFIX).ok_or(TokenHashError::Format)?;
        let bytes = hex::decode(hex_part).map_err(|_| TokenHashError::Format)?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| TokenHashError::Format)?;
        Ok(TokenHash(arr))
    }

    fn ct_eq(&self, other: &TokenHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl std::fmt::Display for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{HASH_PREFIX}{}", hex::encode(self.0))
    }
}

/// A fresh random token and the hash to paste into the config.
pub fn new_token() -> (String, TokenHash) {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    let token = format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let hash = TokenHash::of(&token);
    (token, hash)
}

#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error(
        "tenant {tenant:?}: environment variable {} (token_env) is not set or empty; set it where the daemon runs (under systemd: /etc/rosterd/env, the unit's EnvironmentFile) and start it again",
        crate::config::shown_env_name(.var)
    )]
    MissingEnv { tenant: String, var: String },
    #[error("tenant {tenant:?}: {source}")]
    BadHash {
        tenant: String,
        source: TokenHashError,
    },
    #[error(
        "tenants {tenant:?} and {other:?} have the same SCIM token (a token_env variable's value or a token_hashes entry): it would open both tenants; give each tenant a token of its own (`rosterd token new`)"
    )]
    Shared { tenant: String, other: String },
    #[error(
        "tenant {other:?} is given a SCIM token of tenant {removed:?}, which config.toml no longer names but this daemon serves, with its tokens, until the restart its removal waits for: the token would open both tenants until then; restart first (which removes {removed:?}), or give {other:?} a token of its own (`rosterd token new`)"
    )]
    SharedWithRemoved { removed: String, other: String },
}

/// A token shorter than this is said to be guessable: nothing limits how often a client
/// may try one (an audit tried 1,000 a second), so a word a person chose falls in
/// minutes. `rosterd token new` gives 47 characters.
pub const SHORT_TOKEN: usize = 20;

/// What to say of the tenants whose `token_env` holds a token shorter than
/// [`SHORT_TOKEN`]: one line each, naming the variable, never the token. A warning, not
/// a refusal: a daemon that ran yesterday must start today.
pub fn short_tokens(tenants: &[TenantConfig], env: impl Fn(&str) -> Option<String>) -> Vec<String> {
    tenants
        .iter()
        .filter_map(|t| {
            let var = t.token_env.as_ref()?;
            let len = env(var)?.trim().chars().count();
            (len > 0 && len < SHORT_TOKEN).then(|| {
                format!(
                    "tenant {:?}: the SCIM token in {} is {len} characters long: a client can try tokens as fast as rosterd answers, and one that short may be guessed; give it one from `rosterd token new`",
                    t.id,
                    crate::config::shown_env_name(var)
                )
            })
        })
        .collect()
}

/// Outcome of checking a bearer token against a tenant.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthOutcome {
    Allowed,
    /// The token is valid, but for another tenant.
    OtherTenant,
    /// No such token.
    Denied,
}

/// Every tenant's token hashes. A reload replaces those of the tenants the daemon started
/// with, so a leaked token is rotated without a restart.
#[derive(Debug, Default)]
pub struct TokenRegistry {
    by_tenant: std::sync::RwLock<ByTenant>,
    /// Each tenant's `token_env` whose value (read at start) is in force: a reload may
    /// take it out of force, never put one back (see
    /// [`crate::config::Config::tenants_for_token_reload`]).
    envs: std::sync::RwLock<HashMap<String, Option<String>>>,
}

type ByTenant = HashMap<String, Vec<TokenHash>>;

impl TokenRegistry {
    /// Resolve each tenant's `token_env` and `token_hashes` with `env` as the environment.
    pub fn from_config(
        tenants: &[TenantConfig],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<TokenRegistry, AuthSetupError> {
        Ok(TokenRegistry {
            by_tenant: std::sync::RwLock::new(Self::resolve(tenants, env)?),
            envs: std::sync::RwLock::new(
                tenants
                    .iter()
                    .map(|t| (t.id.clone(), t.token_env.clone()))
                    .collect(),
            ),
        })
    }

    /// Each tenant's `token_env` in force.
    pub fn envs_in_force(&self) -> HashMap<String, Option<String>> {
        self.envs.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The tokens `tenants` (the config file as it is now) give the tenants this daemon
    /// started with; a tenant added or removed waits for a restart. All or nothing: on an
    /// error the tokens in force stay. Returns the tenants whose tokens changed.
    pub fn reload(
        &self,
        tenants: &[TenantConfig],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Vec<String>, AuthSetupError> {
        let fresh = Self::resolve(tenants, env)?;
        // A tenant taken out of the file keeps its tokens until the restart, beyond what
        // `resolve` compares.
        for (removed, held) in self.map().iter().filter(|(t, _)| !fresh.contains_key(*t)) {
            if let Some(other) = fresh
                .iter()
                .find(|(_, hashes)| hashes.iter().any(|h| held.contains(h)))
                .map(|(t, _)| t)
            {
                return Err(AuthSetupError::SharedWithRemoved {
                    removed: removed.clone(),
                    other: other.clone(),
                });
            }
        }
        let mut envs = self.envs.write().unwrap_or_else(|e| e.into_inner());
        for t in tenants {
            if let Some(held) = envs.get_mut(&t.id) {
                held.clone_from(&t.token_env);
            }
        }
        drop(envs);
        let mut map = self.by_tenant.write().unwrap_or_else(|e| e.into_inner());
        let mut changed = Vec::new();
        for (tenant, hashes) in fresh {
            if let Some(held) = map.get_mut(&tenant) {
                // "Changed" is said of the tokens a tenant accepts, not of the list: the
                // hash of its own `token_env` token added to `token_hashes` (README's
                // first step of moving a token into the file) opens nothing new.
                let accepted = |h: &[TokenHash]| h.iter().cloned().collect::<HashSet<_>>();
                if accepted(held) != accepted(&hashes) {
                    changed.push(tenant);
                }
                *held = hashes;
            }
        }
        changed.sort();
        Ok(changed)
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, ByTenant> {
        self.by_tenant.read().unwrap_or_else(|e| e.into_inner())
    }

    fn resolve(
        tenants: &[TenantConfig],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ByTenant, AuthSetupError> {
        let mut by_tenant = HashMap::new();
        for t in tenants {
            let mut hashes = Vec::new();
            if let Some(var) = &t.token_env {
                match env(var).filter(|v| !v.trim().is_empty()) {
                    Some(token) => hashes.push(TokenHash::of(token.trim())),
                    None => {
                        return Err(AuthSetupError::MissingEnv {
                            tenant: t.id.clone(),
                            var: var.clone(),
                        });
                    }
                }
            }
            for h in &t.token_hashes {
                hashes.push(
                    TokenHash::parse(h).map_err(|source| AuthSetupError::BadHash {
                        tenant: t.id.clone(),
                        source,
                    })?,
                );
            }
            by_tenant.insert(t.id.clone(), hashes);
        }
        // One token under two tenants opens both, which a tenant's token must never do:
        // a copy-paste slip while rotating, or two variables holding one value.
        let mut owner: HashMap<&TokenHash, &str> = HashMap::new();
        for t in tenants {
            for h in by_tenant.get(&t.id).into_iter().flatten() {
                if let Some(other) = owner.insert(h, &t.id)
                    && other != t.id
                {
                    return Err(AuthSetupError::Shared {
                        tenant: other.to_owned(),
                        other: t.id.clone(),
                    });
                }
            }
        }
        Ok(by_tenant)
    }

    pub fn has_tenant(&self, tenant: &str) -> bool {
        self.map().contains_key(tenant)
    }

    pub fn tenant_count(&self) -> usize {
        self.map().len()
    }

    /// Check `token` for `tenant`. Every stored hash is compared so the time taken does not
    /// depend on which one (if any) matched.
    pub fn check(&self, tenant: &str, token: &str) -> AuthOutcome {
        let presented = TokenHash::of(token);
        let mut own = false;
        let mut other = false;
        for (t, hashes) in self.map().iter() {
            for h in hashes {
                if h.ct_eq(&presented) {
                    if t == tenant {
                        own = true;
                    } else {
                        other = true;
                    }
                }
            }
        }
        if own {
            AuthOutcome::Allowed
        } else if other {
            AuthOutcome::OtherTenant
        } else {
            AuthOutcome::Denied
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(id: &str, env: Option<&str>, hashes: Vec<String>) -> TenantConfig {
        TenantConfig {
            id: id.into(),
            token_env: env.map(Into::into),
            token_hashes: hashes,
            bundle: None,
            review_threshold: None,
            allow_overrides: true,
            group_rules: vec![],
            idp: None,
            group_roles: vec![],
        }
    }

    #[test]
    fn tokens_open_only_their_tenant() {
        let (ta, ha) = new_token();
        let (tb, _) = new_token();
        let reg = TokenRegistry::from_config(
            &[
                tenant("a", None, vec![ha.to_string()]),
                tenant("b", Some("B_TOKEN"), vec![]),
            ],
            |v| (v == "B_TOKEN").then(|| tb.clone()),
        )
        .unwrap();
        assert_eq!(reg.check("a", &ta), AuthOutcome::Allowed);
        assert_eq!(reg.check("b", &tb), AuthOutcome::Allowed);
        assert_eq!(reg.check("b", &ta), AuthOutcome::OtherTenant);
        assert_eq!(reg.check("a", "rsd_nope"), AuthOutcome::Denied);
    }

    #[test]
    fn a_short_token_is_said_without_being_shown() {
        let tenants = [
            tenant("a", Some("A_TOKEN"), vec![]),
            tenant("b", Some("B_TOKEN"), vec![]),
            tenant("c", None, vec![new_token().1.to_string()]),
        ];
        let (long, _) = new_token();
        let said = short_tokens(&tenants, |v| match v {
            "A_TOKEN" => Some(" change-me ".to_owned()),
            _ => Some(long.clone()),
        });
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0].contains("tenant \"a\"")
                && said[0].contains("A_TOKEN is 9 characters")
                && said[0].contains("rosterd token new")
                && !said[0].contains("change-me"),
            "{said:?}"
        );
        let nineteen = "x".repeat(SHORT_TOKEN - 1);
        assert_eq!(
            short_tokens(&tenants[..1], |_| Some(nineteen.clone())).len(),
            1
        );
        let twenty = "x".repeat(SHORT_TOKEN);
        assert!(short_tokens(&tenants[..1], |_| Some(twenty.clone())).is_empty());
    }

    #[test]
    fn one_token_under_two_tenants_is_refused() {
        let (t, h) = new_token();
        let err = TokenRegistry::from_config(
            &[
                tenant("a", Some("A_TOKEN"), vec![]),
                tenant("b", Some("B_TOKEN"), vec![]),
            ],
            |_| Some(t.clone()),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("\"a\" and \"b\""), "{err}");
        assert!(!err.contains(&t), "the token itself is never said: {err}");
        let reg = TokenRegistry::from_config(
            &[
                tenant("a", None, vec![h.to_string()]),
                tenant("b", Some("B"), vec![]),
            ],
            |_| Some(new_token().0),
        )
        .unwrap();
        // A reload that would share it is refused whole: the tokens in force stay.
        let shared = [
            tenant("a", None, vec![h.to_string()]),
            tenant("b", Some("B"), vec![]),
        ];
        assert!(reg.reload(&shared, |_| Some(t.clone())).is_err());
        assert_eq!(reg.check("a", &t), AuthOutcome::Allowed);
        assert_eq!(reg.check("b", &t), AuthOutcome::OtherTenant);
    }

    #[test]
    fn a_reload_says_changed_only_of_tenants_whose_accepted_tokens_changed() {
        let (env_token, env_hash) = new_token();
        let (_, other) = new_token();
        let env = |_: &str| Some(env_token.clone());
        let reg =
            TokenRegistry::from_config(&[tenant("a", Some("A"), vec![other.to_string()])], env)
                .unwrap();
        // The env token's own hash listed beside it, and the list reordered: the same
        // tokens open the tenant.
        let same = [tenant(
            "a",
            Some("A"),
            vec![
                env_hash.to_string(),
                other.to_string(),
                env_hash.to_string(),
            ],
        )];
        assert_eq!(reg.reload(&same, env).unwrap(), Vec::<String>::new());
        let without_other = [tenant("a", Some("A"), vec![env_hash.to_string()])];
        assert_eq!(reg.reload(&without_other, env).unwrap(), vec!["a"]);
        assert_eq!(reg.check("a", &env_token), AuthOutcome::Allowed);
    }

    #[test]
    fn hash_round_trips_and_rejects_garbage() {
        let (_, h) = new_token();
        assert_eq!(TokenHash::parse(&h.to_string()).unwrap(), h);
        assert!(TokenHash::parse("sha256:abcd").is_err());
        assert!(TokenHash::parse("plain").is_err());
    }

    #[test]
    fn missing_env_is_an_error() {
        let err =
            TokenRegistry::from_config(&[tenant("a", Some("NOPE"), vec![])], |_| None).unwrap_err();
        assert!(err.to_string().contains("NOPE"));
    }
}
