//! `rosterd check-config`: everything `serve` reads before it starts, read the same way,
//! so that a restart is not the first to find a bad file.

use anyhow::{Context, Result};
use rosterd::config::Config;
use rosterd::text::terminal_safe;
use std::io::Write as _;
use std::path::PathBuf;

use crate::classify::repeated_examples;
use crate::serve::data_dir_setting;

/// Everything `serve` reads before it can start, read the same way: the config, each
/// tenant's bundle (trained, with its group rules checked against it) and the connector
/// files. A restart must not be the first to find a bad file.
pub(crate) fn check_config(path: PathBuf, data_dir: Option<PathBuf>) -> Result<()> {
    let config = Config::load(&path)?;
    rosterd::config::check_rust_log().map_err(anyhow::Error::msg)?;
    // What `serve` would refuse before opening the store. A damaged log or snapshot
    // shows only when sled reads it, which the running daemon's lock prevents here.
    let (dir, key) = data_dir_setting(&path, &config, data_dir.as_deref())?;
    rosterd::store::Store::check_dir(&dir).with_context(|| key.clone())?;
    outln!("data directory: {}", dir.display())?;
    let mut with_dir = config.clone();
    with_dir.server.data_dir = dir.clone();
    with_dir.check_backup_dir()?;
    if let Some(why) = rosterd::ops::backup::new_store_refused(&dir, &with_dir.backup_dir()) {
        anyhow::bail!("{key}: {why}");
    }
    outln!("backup directory: {}", with_dir.backup_dir().display())?;
    if let Some(w) = rosterd::ops::backup::Plan::of(&with_dir).space_warning() {
        note!("warning: {w}");
    }
    if let Some(why) = rosterd::store::Store::creatable(&dir) {
        note!(
            "warning: {key}: {why}; `serve` cannot start unless something creates it first (systemd's StateDirectory= does)"
        );
    }
    let mut bad_bundles = 0usize;
    // Kept until the end, so that tenants naming one bundle share its training, as in
    // `serve`, and the connectors' roles are checked against them.
    let mut checked = std::collections::HashMap::new();
    for t in &config.tenants {
        match rosterd::classify::TenantPolicy::load(t, &config.base_dir) {
            Ok(Some(p)) => {
                outln!(
                    "tenant {}: bundle version {} ({} archetypes) trained in {:.1} s",
                    t.id,
                    p.bundle().version,
                    p.bundle().archetypes.len(),
                    p.loaded_from().map_or(0.0, |(_, took)| took)
                )?;
                // Meant for an archetype given mostly by group rule or by hand, but a
                // forgotten list looks the same; the classifier still learns its title.
                for a in &p.bundle().archetypes {
                    if a.examples.is_empty() && a.keywords.is_empty() {
                        outln!(
                            "    note: archetype {} has no examples or keywords; the classifier knows it only by its title {:?}",
                            a.id,
                            a.title
                        )?;
                    }
                }
                for note in repeated_examples(p.bundle()) {
                    outln!("    note: {note}")?;
                }
                checked.insert(t.id.as_str(), p);
            }
            Ok(None) => outln!("tenant {}: no bundle (users get no archetype)", t.id)?,
            Err(e) => {
                bad_bundles += 1;
                note!("error: tenant {:?}: {e}", t.id);
            }
        }
    }
    // The keys `serve` would load, loaded the same way: a leeway out of range, a private
    // key where a public one belongs or a JWKS with no usable key stop `serve`.
    let mut bad_jwt = false;
    match &config.api.jwt {
        Some(j) => match rosterd::api::jwt::JwtVerifier::from_config(j, &config.base_dir, &|v| {
            std::env::var(v).ok()
        }) {
            Ok(verifier) => {
                outln!("Roster API: JWT keys load")?;
                for warning in j.warnings() {
                    note!("warning: {warning}");
                }
                if let Some(var) = &j.hs256_secret_env
                    && !verifier.accepts_hs256()
                {
                    note!(
                        "warning: [api.jwt]: {} is not set here: HS256 tokens would be refused (the public keys still verify theirs), and `rosterd job`, `reconcile`, `resume`, `retire` and `dead-letters` cannot mint their own token; give them --token (`rosterd status` needs none)",
                        rosterd::config::shown_env_name(var)
                    );
                }
            }
            Err(e @ rosterd::api::jwt::JwtError::SecretUnset { .. }) => note!(
                "warning: [api.jwt]: {e}; `serve` would start with the Roster API off unless it is set there"
            ),
            Err(e) => {
                bad_jwt = true;
                // Most of its errors name the section already.
                let e = e.to_string();
                if e.starts_with("[api.jwt]") {
                    note!("error: {e}");
                } else {
                    note!("error: [api.jwt]: {e}");
                }
            }
        },
        None => outln!("Roster API: off (no [api.jwt] section)")?,
    }
    let dir_error = match config.check_connectors_dir() {
        Ok(true) => None,
        Ok(false) => {
            outln!(
                "connectors: none ([connectors] dir is not set and {} does not exist)",
                config.connectors_dir().display()
            )?;
            None
        }
        Err(e) => {
            note!("error: {e}");
            Some(e)
        }
    };
    // With the data directory `serve` would use (`--data-dir` included): a `[csv] dir`
    // inside it is refused by that.
    let connectors = if dir_error.is_some() {
        Default::default()
    } else {
        with_dir.load_connectors()
    };
    for e in &connectors.errors {
        note!("error: connector {e}");
    }
    // What was read, and what was not: `hr-events.tml` gave "ok" and a daemon with no
    // connector.
    if dir_error.is_none() {
        let loaded: Vec<String> = connectors
            .connectors
            .iter()
            .map(|c| format!("{} ({}, tenant {})", c.name, c.kind.as_str(), c.tenant))
            .collect();
        if !loaded.is_empty() {
            outln!("connectors: {}", loaded.join(", "))?;
        }
        let skipped = rosterd::connectors::skipped_files(&config.connectors_dir());
        if !skipped.is_empty() {
            note!(
                "note: {} not read as connector files (only *.toml are): {}",
                config.connectors_dir().display(),
                skipped.join(", ")
            );
        }
    }
    // A variable unset here may well be set where `serve` runs (the unit's
    // EnvironmentFile, readable by root only): as for tenant tokens, a warning. A value
    // that is set is checked as `serve` checks it.
    use std::sync::atomic::{AtomicBool, Ordering};
    let asked_unset = std::sync::Arc::new(AtomicBool::new(false));
    let seen = asked_unset.clone();
    let env: rosterd::server::EnvFn = std::sync::Arc::new(move |v: &str| {
        let value = std::env::var(v).ok();
        if value.is_none() {
            seen.store(true, Ordering::Relaxed);
        }
        value
    });
    let mut not_started = 0usize;
    for c in &connectors.connectors {
        for warning in c.warnings() {
            note!("warning: connector {:?}: {warning}", c.name);
        }
        if let Some(p) = checked.get(c.tenant.as_str()) {
            for id in c.unmapped_roles(&p.bundle().archetype_ids()) {
                note!(
                    "warning: connector {:?}: roles names {id:?}, which tenant {:?}'s bundle has no archetype of; it maps only users whose manual override still holds it (a typo gives the users meant default_role)",
                    c.name,
                    c.tenant
                );
            }
        }
        // A relative `dir` copied from the example lands under /etc/rosterd, read-only
        // under the unit: the connector would only retry, then pause.
        if let Some(why) = c
            .csv
            .as_ref()
            .and_then(|s| rosterd::store::Store::unwritable(&s.dir))
        {
            note!(
                "warning: connector {:?}: [csv] dir: {why}; run as the service's user, `serve` would fail to write the files and pause the connector",
                c.name
            );
        }
        asked_unset.store(false, Ordering::Relaxed);
        if let Err(e) = rosterd::dispatch::check_start(c, &env) {
            if !asked_unset.load(Ordering::Relaxed) {
                not_started += 1;
                note!(
                    "error: connector {:?}: `serve` would not start it: {e}",
                    c.name
                );
            } else {
                note!(
                    "warning: connector {:?}: {e} here; `serve` starts it only where that is set",
                    c.name
                );
            }
        }
    }
    if bad_jwt {
        anyhow::bail!(
            "{}: `serve` would refuse to start: [api.jwt] above does not load",
            path.display()
        );
    }
    if dir_error.is_some() {
        anyhow::bail!(
            "{}: `serve` would refuse to start: the connectors directory above is refused",
            path.display()
        );
    }
    if bad_bundles > 0 {
        anyhow::bail!(
            "{}: `serve` would refuse to start: {bad_bundles} tenant(s) above cannot load their bundle and group rules",
            path.display()
        );
    }
    if !connectors.errors.is_empty() || not_started > 0 {
        anyhow::bail!(
            "{}: `serve` would start without the {} connector(s) above",
            path.display(),
            connectors.errors.len() + not_started
        );
    }
    for t in &config.tenants {
        if let Some(var) = &t.token_env
            && std::env::var(var)
                .map(|v| v.trim().is_empty())
                .unwrap_or(true)
        {
            note!(
                "warning: tenant {:?}: environment variable {} is not set here; `serve` needs it",
                t.id,
                rosterd::config::shown_env_name(var)
            );
        }
    }
    // The tokens as `serve` resolves them here: two variables holding one token, or a
    // hash of another tenant's variable, open both tenants, and `serve` refuses them.
    // (Unset variables were said above.)
    let here = |v: &str| std::env::var(v).ok().filter(|t| !t.trim().is_empty());
    let set: Vec<_> = config
        .tenants
        .iter()
        .filter(|t| t.token_env.as_deref().is_none_or(|v| here(v).is_some()))
        .cloned()
        .collect();
    if let Err(e) = rosterd::server::auth::TokenRegistry::from_config(&set, here) {
        anyhow::bail!("{}: {e}", path.display());
    }
    for warning in rosterd::server::auth::short_tokens(&config.tenants, here) {
        note!("warning: {warning}");
    }
    if config.tenants.is_empty() {
        note!(
            "warning: no [[tenants]]: `serve` would start, but every SCIM and Roster API request would be refused"
        );
    }
    outln!(
        "{}: ok ({} tenant{})",
        path.display(),
        config.tenants.len(),
        if config.tenants.len() == 1 { "" } else { "s" }
    )?;
    Ok(())
}
