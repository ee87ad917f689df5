//! The HTTP server: routing, request ids and tracing spans, graceful shutdown. Protocol
//! handlers live beside it (`scim`); the protocol rules themselves live in `crate::scim`.

pub mod auth;
mod error;
pub(crate) mod json;
mod scim;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::api::jwt::{JwtError, JwtVerifier};
use crate::api::{RosterState, TenantRoster};
use crate::classify::{ClassifyError, TenantPolicy};
use crate::config::Config;
use crate::store::{Store, StoreError};
use auth::{AuthSetupError, TokenRegistry};
pub use error::ScimFailure;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Opening, reading at startup, or the final flush; the store's errors name the data
    /// directory themselves.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot create the data directory {}: {source}", path.display())]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The store failed while serving (see [`crate::store::StoreFailure`]); the process
    /// exits with an error so that its service manager restarts it.
    #[error(
        "the store in {} failed at {} ({}); rosterd stopped so that it can be restarted with a fresh store handle",
        dir.display(), failure.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true), failure.error
    )]
    StoreFailed {
        dir: std::path::PathBuf,
        failure: crate::store::StoreFailure,
    },
    #[error(transparent)]
    Auth(#[from] AuthSetupError),
    #[error("listener: {0}")]
    Io(std::io::Error),
    #[error("Roster API JWT settings: {0}")]
    Jwt(#[from] JwtError),
    /// A key of config.toml that does not work where the daemon runs (the connectors
    /// directory); `check-config` reports the same.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("tenant {tenant:?}: archetype bundle: {source}")]
    Bundle {
        tenant: String,
        source: ClassifyError,
    },
}

pub use crate::config::EnvFn;

/// What every handler can reach.
pub struct AppState {
    pub store: Store,
    pub tokens: TokenRegistry,
    pub config: Config,
    /// The address the listener is bound to.
    pub local_addr: SocketAddr,
    /// External base URL without a trailing slash.
    pub base_url: String,
    pub roster: RosterState,
    /// The downstream connectors.
    pub dispatch: Arc<crate::dispatch::Dispatcher>,
    /// Cancelled when the daemon starts draining.
    pub shutdown: CancellationToken,
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// The same moment on the monotonic clock: uptime measured on the wall clock went
    /// negative when the clock was stepped back.
    pub started: std::time::Instant,
    /// The run before this one, if it did not stop cleanly.
    pub unclean_stop: Option<crate::store::RunRecord>,
    /// Reloads (SIGHUP) completed.
    pub reloads: std::sync::atomic::AtomicU64,
    /// What the reloads could not apply of the tenants' SCIM tokens and the Roster API's
    /// key files, for `/status` and the metrics.
    pub reload_errors: ReloadErrors,
    /// What a restart would refuse in config.toml as the last reload found it, beyond the
    /// parts in force that `reload_errors` and the bundles' states say (see
    /// [`restart_refusals`]).
    pub restart_refusals: std::sync::Mutex<Vec<String>>,
    pub schedules: crate::schedule::Schedules,
    /// Online backups of the store (`[backup]`, the `backup` schedule, SIGUSR1).
    pub backups: crate::ops::backup::Backups,
    /// The environment secrets are read from; a reload reads SCIM tokens through it.
    pub env: EnvFn,
    /// The share of `max_body_bytes` that large request bodies being handled hold.
    pub large_bodies: BodyBudget,
    /// Jobs (reclassifications, reconciliations) under way: a stop waits for them to
    /// give up before it closes the store, so none writes into a closed one and each says
    /// how it ended before the stop says it is done.
    pub jobs: tokio_util::task::TaskTracker,
    /// How many refusals for credentials this minute were logged, and how many were not.
    pub(crate) refusals: RefusalLog,
}

impl AppState {
    /// The tenants the store holds that `config.toml` does not declare: kept as they
    /// were, served to no one.
    pub(crate) fn undeclared_tenants(&self) -> Vec<String> {
        let mut stored = self.store.stored_tenants();
        stored.retain(|t| !self.config.tenants.iter().any(|c| c.id == *t));
        stored
    }
}

/// A part of the config a reload applies without a restart, and that can fail to apply
/// on its own while the rest reloads. Named by [`Reloadable::as_str`] in `/status` and
/// the metrics alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(into = "&'static str")]
pub enum Reloadable {
    /// The tenants' `token_env` and `token_hashes`.
    ScimTokens,
    /// `[api.jwt]`'s `public_keys` and `jwks_file`.
    ApiKeys,
}

impl Reloadable {
    pub const ALL: [Reloadable; 2] = [Reloadable::ScimTokens, Reloadable::ApiKeys];

    pub fn as_str(self) -> &'static str {
        match self {
            Reloadable::ScimTokens => "scim_tokens",
            Reloadable::ApiKeys => "api_keys",
        }
    }
}

impl From<Reloadable> for &'static str {
    fn from(part: Reloadable) -> Self {
        part.as_str()
    }
}

/// Why a reload did not apply a part, and when: the old tokens or keys stay in force, so
/// an operator who rotated them must see that the rotation did not happen. The log said
/// so once; `/status` and the metrics keep saying it until a reload applies the part.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadError {
    pub error: String,
    pub at: chrono::DateTime<chrono::Utc>,
    /// Whether a restart would fail on what did not reload. Said in words at the end of
    /// `error`, as a bundle's reload error says it; kept for the metrics, whose
    /// `rosterd_config_file_error` is the alert that a restart would fail.
    #[serde(skip)]
    pub restart_fails: bool,
}

/// Why a reload did not apply a part, and whether a restart would fail on it too.
#[derive(Debug)]
pub struct NotApplied {
    pub error: String,
    pub restart_fails: bool,
}

impl NotApplied {
    /// A part a restart reads afresh: what the reload refused says nothing of a restart.
    pub fn for_reload(error: impl std::fmt::Display) -> Self {
        NotApplied {
            error: error.to_string(),
            restart_fails: false,
        }
    }
}

#[derive(Debug, Default)]
pub struct ReloadErrors(std::sync::Mutex<std::collections::BTreeMap<Reloadable, ReloadError>>);

impl ReloadErrors {
    /// Record what the reload did with `part`: an error stands until a later reload
    /// applies the part.
    pub fn record(&self, part: Reloadable, outcome: Result<(), &NotApplied>) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Ok(()) => {
                map.remove(&part);
            }
            Err(e) => {
                map.insert(
                    part,
                    ReloadError {
                        error: e.error.clone(),
                        at: chrono::Utc::now(),
                        restart_fails: e.restart_fails,
                    },
                );
            }
        }
    }

    /// Whether a part that did not reload would make a restart fail.
    pub fn restart_fails(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|e| e.restart_fails)
    }

    pub fn get(&self) -> std::collections::BTreeMap<Reloadable, ReloadError> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What makes a running daemon reload its connectors and archetype bundles.
pub enum Reloads {
    /// SIGHUP, as systemd's `ExecReload` sends it.
    Sighup,
    /// Each `notify_one` on it. For several daemons in one process (tests), where a
    /// signal would reload every one of them.
    Notified(Arc<tokio::sync::Notify>),
}

/// Run the daemon on `listener` until `shutdown` is cancelled, then drain in-flight
/// requests and flush the store.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    run_with_env(
        config,
        Arc::new(|v: &str| std::env::var(v).ok()),
        listener,
        shutdown,
        Reloads::Sighup,
    )
    .await
}

/// As [`run`], reading SCIM tokens and secrets through `env` (tests pass their own),
/// reloading on `reloads`.
pub async fn run_with_env(
    config: Config,
    env: EnvFn,
    listener: TcpListener,
    shutdown: CancellationToken,
    reloads: Reloads,
) -> Result<(), ServerError> {
    // Before the first store flush, interrupted job or request is recorded; idempotent.
    crate::ops::metrics::install();
    crate::ops::metrics::register_failure_counters(&config);
    // Before the daemon can answer, let alone say it is ready: a SIGHUP that came before
    // the handler would end it (the signal's default action), not reload it.
    // Likewise SIGUSR1, whose default action also ends the process.
    let backup_signal = match reloads {
        Reloads::Sighup => {
            use tokio::signal::unix::{SignalKind, signal};
            signal(SignalKind::user_defined1())
                .inspect_err(|e| tracing::error!(error = %e, "Cannot install the SIGUSR1 handler; backups run on their schedule only."))
                .ok()
        }
        Reloads::Notified(_) => None,
    };
    let reloads = ReloadSource::install(reloads);
    // Before anything slow: starting without the connectors it names would let
    // compaction drop changes they still have to deliver, and nobody would notice.
    config.check_backup_dir()?;
    if !config.check_connectors_dir()? {
        tracing::info!(dir = %config.connectors_dir().display(), "No connectors directory (config.toml names none, and the default does not exist); no connectors run.");
    }
    let tokens = TokenRegistry::from_config(&config.tenants, |v| env(v))?;
    for warning in auth::short_tokens(&config.tenants, |v| env(v)) {
        tracing::warn!("{warning}");
    }
    // Without its secret the Roster API is off, but SCIM provisioning still runs: an IdP
    // should not stop syncing because an operator has not set up API access yet.
    let (verifier, api_disabled) = match &config.api.jwt {
        Some(j) => match JwtVerifier::from_config(j, &config.base_dir, &|v| env(v)) {
            Ok(v) => {
                for warning in j.warnings() {
                    tracing::warn!("{warning}");
                }
                (Some(v), None)
            }
            Err(e @ JwtError::SecretUnset { .. }) => {
                tracing::warn!(error = %e, "The Roster API is disabled until this is set.");
                (None, Some(e.to_string()))
            }
            Err(e) => return Err(e.into()),
        },
        None => (
            None,
            Some("config.toml has no [api.jwt] section".to_owned()),
        ),
    };
    let mut tenants = std::collections::HashMap::new();
    let mut policies = Vec::new();
    for t in &config.tenants {
        let policy = crate::ops::systemd::extending_start_timeout(
            &format!("Training tenant {}'s archetype bundle", t.id),
            TenantPolicy::load_blocking(t, &config.base_dir),
        )
        .await
        .map_err(|source| ServerError::Bundle {
            tenant: t.id.clone(),
            source,
        })?
        .map(Arc::new);
        let mut bundle = crate::api::BundleState::default();
        if let Some(p) = &policy {
            bundle.loaded(p);
            tracing::info!(tenant = %t.id, version = %p.bundle().version, archetypes = bundle.archetypes, seconds = bundle.load_seconds, "Archetype bundle loaded.");
            policies.push((t.id.clone(), p.clone()));
        }
        tenants.insert(
            t.id.clone(),
            TenantRoster {
                policy: std::sync::RwLock::new(policy),
                allow_overrides: t.allow_overrides,
                group_source: t
                    .idp
                    .as_ref()
                    .map_or_else(|| "scim".to_owned(), |i| format!("scim:{i}")),
                group_roles: t.group_roles.clone(),
                bundle: std::sync::Mutex::new(bundle),
                dry_run: Default::default(),
            },
        );
    }
    let roster = RosterState {
        verifier: crate::api::jwt::Verifiers::new(
            verifier,
            config.api.jwt.as_ref(),
            &config.base_dir,
        ),
        disabled: api_disabled,
        tenants,
        exports: Default::default(),
    };

    // Relative to the config file, like every other path in it.
    let data_dir = config.resolve(&config.server.data_dir);
    Store::create_private_dir(&data_dir).map_err(|source| ServerError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let cache = config.server.cache_mb * 1024 * 1024;
    let tenant_ids: Vec<String> = config.tenants.iter().map(|t| t.id.clone()).collect();
    let store = crate::ops::systemd::extending_start_timeout(
        "Opening the store",
        tokio::task::spawn_blocking(move || {
            let store = Store::open_with_cache(&data_dir, cache)?;
            store.open_tenants(&tenant_ids)?;
            Ok::<_, StoreError>(store)
        }),
    )
    .await
    .map_err(|e| StoreError::Backend(e.to_string()))??;
    for (tenant, p) in &policies {
        store.set_resolver(tenant, p.clone());
    }
    let started_at = chrono::Utc::now();
    // Read apart from the write: a start that cannot record itself still says what it
    // found (the audit's kill -9 went unsaid, and the next clean stop removed the trace).
    let unclean_stop = store.unclean_run().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "Cannot read whether the last run on this store stopped cleanly.");
        None
    });
    let this_run = crate::store::RunRecord::this_process(&crate::dispatch::rfc3339(started_at));
    let recorded = match store.record_run(&this_run) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot record in the data directory that rosterd runs; the next start cannot tell whether this run stopped cleanly.");
            false
        }
    };
    if let Some(run) = &unclean_stop {
        let pid = run.pid.map_or_else(|| "?".to_owned(), |p| p.to_string());
        tracing::warn!(
            pid = run.pid,
            started_at = run.started_at.as_deref(),
            alive_at = run.alive_at.as_deref(),
            version = run.version.as_deref(),
            "The last run on this store did not stop cleanly: it was killed (kill -9, the OOM killer, a stop timeout), crashed, stopped on a storage error it logged, or its machine went down, within a minute after alive_at. `journalctl _PID={pid}` shows its last lines, and `journalctl -k --grep oom` the OOM killer. The writes it acknowledged are in the store; the changes it was sending are sent again, and the jobs it ran are marked interrupted."
        );
    }
    let local: SocketAddr = listener.local_addr().map_err(ServerError::Io)?;
    let base_url = config.public_url(local);
    // Connectors stop on their own token, after the HTTP server drained: the last
    // acknowledged writes still get their chance to go out before the cursors are left.
    let dispatch_stop = CancellationToken::new();
    let dispatch = crate::dispatch::Dispatcher::new(
        store.clone(),
        env.clone(),
        config.tenants.iter().map(|t| t.id.clone()).collect(),
        dispatch_stop.clone(),
    );
    let loaded = config.load_connectors();
    warn_about_connectors(&roster, &loaded.connectors);
    dispatch.apply(loaded).await;
    let backup_plan = crate::ops::backup::Plan::of(&config);
    let config_max_body = config.server.max_body_bytes;
    let state = Arc::new(AppState {
        store: store.clone(),
        tokens,
        config,
        local_addr: local,
        base_url,
        roster,
        dispatch: dispatch.clone(),
        shutdown: shutdown.clone(),
        started_at,
        started: std::time::Instant::now(),
        unclean_stop,
        reloads: Default::default(),
        reload_errors: Default::default(),
        restart_refusals: Default::default(),
        schedules: Default::default(),
        backups: crate::ops::backup::Backups::new(backup_plan),
        env: env.clone(),
        large_bodies: BodyBudget::new(config_max_body),
        jobs: tokio_util::task::TaskTracker::new(),
        refusals: RefusalLog::default(),
    });
    // A tenant taken out of config.toml keeps its data: said, or the store seems to hold
    // only what is served, and one declared again by mistake or on purpose surprises.
    for t in state.undeclared_tenants() {
        let users = state.store.count(&t, crate::scim::ResourceKind::User)?;
        tracing::warn!(tenant = %t, users, "The store holds this tenant's data, and config.toml does not declare it: it is neither served nor sent anywhere, and stays as it is. Declare it again to serve it as it was.");
    }
    for t in &state.config.tenants {
        let marked = state.store.mark_interrupted_jobs(&t.id).await?;
        if !marked.is_empty() {
            let ids: Vec<&str> = marked.iter().map(|j| j.job_id.as_str()).collect();
            tracing::warn!(tenant = %t.id, jobs = marked.len(), job_ids = %ids.join(","), "Jobs interrupted by the last stop are marked interrupted; a reclassification a bundle change started runs again by itself now, any other job is started again with scim:sync (or rosterd reconcile).");
        }
        // They finished here, as far as anyone alerting on job outcomes can tell.
        for j in &marked {
            crate::schedule::count_finished_job(&t.id, j);
        }
    }
    // A bundle (or group rule) that changed since the assignments were computed means
    // everyone is reclassified, in the background.
    for (tenant, p) in &policies {
        if !state.store.policy_recorded(tenant, p.fingerprint())? {
            tracing::info!(tenant = %tenant, version = %p.bundle().version, "Archetype policy changed; reclassifying the tenant.");
            if let Err(e) =
                crate::schedule::start_reclassify(state.clone(), tenant, "bundle_change").await
            {
                tracing::error!(tenant = %tenant, error = %e, "Cannot start the reclassification.");
            }
        }
    }
    // Only now: a schedule caught up at start must find the last stop's jobs already
    // marked interrupted (else its own new job would be), and the start-up
    // reclassification holding its tenant's slot.
    crate::schedule::spawn_schedules(state.clone(), shutdown.clone());
    let reloads = tokio::spawn(reload_on(reloads, state.clone(), shutdown.clone()));
    let backups =
        backup_signal.map(|usr1| tokio::spawn(backup_on(usr1, state.clone(), shutdown.clone())));
    let failed = tokio::spawn(exit_once_store_recovers(store.clone(), shutdown.clone()));
    let refusals = tokio::spawn(sum_up_refusals(state.clone(), shutdown.clone()));
    // Its own token: a server that ended on its own stops with no shutdown.
    let alive_stop = shutdown.child_token();
    let alive =
        recorded.then(|| tokio::spawn(say_alive(store.clone(), this_run, alive_stop.clone())));
    let watchdog = crate::ops::systemd::spawn_watchdog(shutdown.clone());
    let app = router(state.clone());
    crate::ops::systemd::notify_ready(local);
    tracing::info!(addr = %local, tenants = state.tokens.tenant_count(), "rosterd is listening.");
    let client_timeout = std::time::Duration::from_secs(state.config.server.client_timeout_secs);
    // The server owns its connections: dropped, it cuts off those still open.
    let mut server = Box::pin(serve(listener, app, client_timeout, shutdown.clone()));
    // First the stop's start, said to systemd at once (`systemctl status` read "Serving
    // on …" for the whole drain, and the watchdog pings end here); then the drain, for
    // at most DRAIN_DEADLINE: a client that stalls mid-request would otherwise hold the
    // drain, and the stop, until systemd's SIGKILL. A server that ended on its own has
    // nothing to drain.
    let ended = tokio::select! {
        () = &mut server => true,
        () = shutdown.cancelled() => false,
    };
    crate::ops::systemd::notify_stopping();
    if !ended {
        tokio::select! {
            () = &mut server => {}
            () = tokio::time::sleep(DRAIN_DEADLINE) => {
                tracing::warn!(seconds = DRAIN_DEADLINE.as_secs(), "Requests still in flight after the drain deadline are cut off; their clients get no answer and must retry.");
            }
        }
    }
    drop(server);
    reloads.abort();
    if let Some(b) = backups {
        b.abort();
    }
    failed.abort();
    refusals.abort();
    state.refusals.sum_up_at_stop();
    // Awaited, not aborted: a rewrite of the run file under way would finish on its own
    // thread, and one landing after the clean stop removed the file would bring it back.
    alive_stop.cancel();
    if let Some(a) = alive {
        let _ = a.await;
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    tracing::info!("Draining finished; stopping connectors and flushing the store.");
    // A backup under way has seen the stop; it removes its copy before the store closes.
    if tokio::time::timeout(BACKUP_GIVE_UP, state.backups.idle())
        .await
        .is_err()
    {
        tracing::warn!(
            "A backup is still being given up; its `.partial` directory is removed by the next one."
        );
    }
    dispatch_stop.cancel();
    dispatch.stop_all().await;
    // A job sees the stop between its batches, or as its sends are cut off above.
    state.jobs.close();
    if tokio::time::timeout(JOB_GIVE_UP, state.jobs.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            seconds = JOB_GIVE_UP.as_secs(),
            "A job had not given up by the deadline; the store closes under it, and the next start marks it interrupted."
        );
    }
    let closing = store.clone();
    let closed = tokio::task::spawn_blocking(move || {
        let closed = closing.close();
        closing.release_after_close();
        closed
    })
    .await
    .map_err(|e| StoreError::Backend(e.to_string()))?;
    if let Some(failure) = store.failure() {
        return Err(ServerError::StoreFailed {
            dir: store.dir().to_owned(),
            failure,
        });
    }
    closed?;
    if let Err(e) = store.end_run() {
        tracing::warn!(error = %e, "Cannot record in the data directory that rosterd stopped cleanly; the next start will say it did not.");
    }
    tracing::info!("rosterd stopped cleanly.");
    Ok(())
}

/// How long a stop waits for a backup under way to give up (it asks every 4,096 keys).
const BACKUP_GIVE_UP: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a stop waits for a job under way to give up (a reclassification looks
/// between batches of 500 users, a few milliseconds each).
const JOB_GIVE_UP: std::time::Duration = std::time::Duration::from_secs(2);

/// How long requests in flight may take to finish once a stop began. With the connectors'
/// stop and the final flush this keeps a stop within the 10 s the README promises.
const DRAIN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// How often a failed store's data directory is tried for writing.
const STORE_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// What a restart needs to be able to write (sled's segments are 512 KiB; a start writes
/// a few of them).
const STORE_PROBE_BYTES: usize = 4 * 1024 * 1024;

/// Once the store has failed, wait until its directory takes writes again (space freed),
/// then stop the daemon, which then exits with an error: sled keeps its I/O error for good,
/// so only a new process serves again, and its service manager starts one (systemd:
/// `Restart=on-failure`). Exiting at once instead would, on a disk that stays full, loop
/// through failed starts until systemd's start limit gives up for good.
async fn exit_once_store_recovers(store: Store, shutdown: CancellationToken) {
    let mut failure = store.watch_failure();
    let Ok(f) = failure.wait_for(Option::is_some).await.map(|f| f.clone()) else {
        return;
    };
    let Some(f) = f else { return };
    crate::ops::systemd::notify_status(&format!(
        "STORE FAILED: {}; restart rosterd once the cause (e.g. disk space) is fixed",
        f.error
    ));
    let dir = store.dir().to_owned();
    loop {
        tokio::time::sleep(STORE_PROBE_INTERVAL).await;
        let probe = dir.clone();
        match tokio::task::spawn_blocking(move || probe_writable(&probe)).await {
            Ok(Ok(())) => {
                tracing::warn!(dir = %dir.display(), "The data directory takes writes again; stopping, so that the service manager restarts rosterd. The storage engine's 'failed to flush' errors that may follow repeat the failure it kept, not the disk as it is now.");
                shutdown.cancel();
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(dir = %dir.display(), error = %e, "The data directory still takes no writes.")
            }
            Err(_) => return,
        }
    }
}

/// Write, sync and remove a file in `dir`.
fn probe_writable(dir: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    let path = dir.join(".rosterd-write-probe");
    let written = std::fs::File::create(&path).and_then(|mut f| {
        f.write_all(&vec![0u8; STORE_PROBE_BYTES])?;
        f.sync_all()
    });
    let removed = std::fs::remove_file(&path);
    written.and(removed)
}

/// A [`Reloads`] ready to be waited on.
enum ReloadSource {
    Sighup(tokio::signal::unix::Signal),
    Notified(Arc<tokio::sync::Notify>),
    /// SIGHUP's handler could not be installed.
    Never,
}

impl ReloadSource {
    fn install(reloads: Reloads) -> ReloadSource {
        use tokio::signal::unix::{SignalKind, signal};
        match reloads {
            Reloads::Sighup => match signal(SignalKind::hangup()) {
                Ok(hup) => ReloadSource::Sighup(hup),
                Err(e) => {
                    tracing::error!(error = %e, "Cannot install the SIGHUP handler; reload by restarting.");
                    ReloadSource::Never
                }
            },
            Reloads::Notified(n) => ReloadSource::Notified(n),
        }
    }

    /// The next reload asked for; what asked, for the log.
    async fn next(&mut self) -> &'static str {
        match self {
            ReloadSource::Sighup(hup) => {
                if hup.recv().await.is_none() {
                    // The runtime's signal driver is gone: no SIGHUP comes any more.
                    std::future::pending::<()>().await;
                }
                "SIGHUP received"
            }
            ReloadSource::Notified(n) => {
                n.notified().await;
                "Reload asked"
            }
            ReloadSource::Never => std::future::pending().await,
        }
    }
}

/// Write a backup at each SIGUSR1 (`systemctl kill -s USR1 --kill-who=main rosterd`).
async fn backup_on(
    mut usr1: tokio::signal::unix::Signal,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            got = usr1.recv() => {
                if got.is_none() {
                    return;
                }
                let state = state.clone();
                let stop = shutdown.clone();
                // Its own task: a second signal during a long backup is answered (refused,
                // in the log) rather than queued.
                tokio::spawn(async move {
                    // Its outcome is logged and shown in /status by `run`.
                    let _ = state.backups.run(&state.store, "SIGUSR1", &stop).await;
                });
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn reload_on(mut reloads: ReloadSource, state: Arc<AppState>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            by = reloads.next() => {
                tracing::info!("{by}; reloading connectors, archetype bundles, the tenants' SCIM tokens and the Roster API's key files.");
                reload(&state).await;
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

/// What a reload did with `part`, recorded for `/status` and the metrics; a failure is
/// counted and logged (the part in force before stays). The part's result when applied.
fn settle<T>(
    state: &AppState,
    part: Reloadable,
    outcome: Result<T, NotApplied>,
    failed: &mut usize,
) -> Option<T> {
    state.reload_errors.record(part, outcome.as_ref().map(drop));
    match outcome {
        Ok(applied) => Some(applied),
        Err(e) => {
            *failed += 1;
            let what = match part {
                Reloadable::ScimTokens => "SCIM tokens",
                Reloadable::ApiKeys => "Roster API keys",
            };
            if e.restart_fails {
                tracing::error!(error = %e.error, "{what} not reloaded; those in force stay, but a restart would fail on these files: rosterd would not start at all, SCIM included. Fix them and reload (rosterd check-config) before any restart.");
            } else {
                tracing::error!(error = %e.error, "{what} not reloaded; those in force stay.");
            }
            None
        }
    }
}

/// The Roster API's key files did not reload: the error, saying whether a restart would
/// fail on them too. The start reads them and refuses to run without them, SCIM
/// included, and "those in force stay" led an operator to restart to force the new keys
/// in. Judged as for a bundle: by config.toml as a restart would read it.
async fn api_keys_not_applied(
    state: &AppState,
    edited: Option<&Config>,
    e: JwtError,
) -> NotApplied {
    // The `[api.jwt]` the daemon started with reads the files that just failed; only an
    // edit of it since may name others.
    let restart_loads = match edited {
        Some(c) => edited_api_keys_load(state, c).await.is_ok(),
        None => false,
    };
    if restart_loads {
        NotApplied {
            error: format!(
                "{e} — config.toml as edited since the start names Roster API keys that load ([api.jwt] is read only at start): a restart applies them"
            ),
            restart_fails: false,
        }
    } else {
        NotApplied {
            error: format!(
                "{e} — a restart would refuse this file too: rosterd would not start, SCIM included"
            ),
            restart_fails: true,
        }
    }
}

/// Whether the Roster API's key files config.toml names as edited load, as a start would
/// read them; why not if they do not.
async fn edited_api_keys_load(state: &AppState, edited: &Config) -> Result<(), String> {
    let c = edited.clone();
    let env = state.env.clone();
    tokio::task::spawn_blocking(move || api_keys_load(&c, &|v| env(v)).map_err(|e| e.to_string()))
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
}

/// Whether a start on `config` would load its `[api.jwt]` keys. A secret that is not set
/// here passes: the environment a restart reads may set it (the unit's EnvironmentFile).
fn api_keys_load(config: &Config, env: &dyn Fn(&str) -> Option<String>) -> Result<(), JwtError> {
    match &config.api.jwt {
        Some(j) => match JwtVerifier::from_config(j, &config.base_dir, env) {
            Ok(_) | Err(JwtError::SecretUnset { .. }) => Ok(()),
            Err(e) => Err(e),
        },
        None => Ok(()),
    }
}

/// Say (WARN) each OneRoster `roles` key that names no archetype of its tenant's bundle,
/// as `check-config` does: the example files tell operators to copy and reload, which a
/// warning from `check-config` alone would not reach.
fn warn_about_connectors(roster: &RosterState, connectors: &[crate::connectors::ConnectorConfig]) {
    for c in connectors {
        for warning in c.warnings() {
            tracing::warn!(tenant = %c.tenant, connector = %c.name, file = %c.file.display(), %warning, "The connector's file says something that is probably not meant.");
        }
        let Some(policy) = roster.tenants.get(&c.tenant).and_then(|t| t.policy()) else {
            continue;
        };
        let unmapped = c.unmapped_roles(&policy.bundle().archetype_ids());
        if !unmapped.is_empty() {
            tracing::warn!(tenant = %c.tenant, connector = %c.name, roles = %unmapped.join(", "), "The connector's roles name archetypes its tenant's bundle does not have: they map only users whose manual override still holds one, and a typo there gives the users meant default_role.");
        }
    }
}

/// Re-read the connectors directory and every tenant's archetype bundle. Requests keep
/// being served throughout; a connector or bundle that fails to load is reported and the
/// previous one (for bundles) or none (for connector files) stays in effect.
pub async fn reload(state: &Arc<AppState>) {
    crate::ops::systemd::notify_reloading();
    let mut config_failed = None;
    let running = state.dispatch.running_files();
    // Files are read off the runtime: a read that blocks (a network mount that hangs)
    // must hold up this reload, not every request the daemon serves.
    let (on_disk, loaded) = {
        let reading = state.clone();
        match tokio::task::spawn_blocking(move || {
            // Read once: the bundles below are checked against it too.
            let on_disk = reading
                .config
                .on_disk_with_tokens(&reading.tokens.envs_in_force());
            let loaded = reading
                .config
                .load_connectors_keeping(&running, Some(&on_disk));
            (on_disk, loaded)
        })
        .await
        {
            Ok(read) => read,
            Err(e) => {
                tracing::error!(error = %e, "Reload abandoned: reading the config and connector files failed. Everything keeps running as loaded before.");
                crate::ops::systemd::notify_reloaded(state.local_addr);
                return;
            }
        }
    };
    if on_disk.changed {
        match &on_disk.error {
            None => tracing::warn!(
                waiting = %crate::config::waiting_list(&on_disk.waiting),
                "The config file changed since start; a reload applies only the tenants' token_hashes and a token_env removed from it: the keys named wait for a restart (rosterd check-config first), what the daemon started with staying in force until then (a token_env added or renamed included: its variable is read at start), but for a token_env a reload removed, which stays out of force. Connectors and bundles are reloaded now, from the paths the daemon started with."
            ),
            // A file that no longer reads (its mode changed, say) was said to be edited.
            Some(e @ crate::config::ConfigError::Read { source, .. })
                if source.kind() != std::io::ErrorKind::InvalidData =>
            {
                tracing::error!(
                    error = %e,
                    "The config file cannot be read now (removed, moved, or its permissions changed): a restart would fail. Put it back, readable to rosterd's user (rosterd check-config, as that user), before restarting; this daemon keeps running on the config it started with. Connectors and bundles are reloaded now."
                );
                config_failed = Some(e.to_string());
            }
            Some(e) => {
                tracing::error!(
                    error = %e,
                    "The config file changed since start and, as it is now, does not load: a restart would fail. Fix it (rosterd check-config) before restarting; this daemon keeps running on the config it started with. Connectors and bundles are reloaded now."
                );
                config_failed = Some(e.to_string());
            }
        }
    }
    // Judged after the bundles below are reloaded: a reload may change either side.
    let configs = loaded.connectors.clone();
    let errors = state.dispatch.apply(loaded).await;
    let mut failed = errors.len() + usize::from(config_failed.is_some());
    // A leaked SCIM token is replaced without a restart: the new one added beside it,
    // the IdP switched, the old one removed, a reload after each edit.
    // The file as it is now: as edited, or as the daemon started (an edit undone, though
    // a token_env a reload removed and the file names again still counts as a change
    // that waits), not one that does not load.
    let tenants = match (&on_disk.edited, &on_disk.error) {
        (Some(edited), _) => Some(Config::tenants_for_token_reload(
            &edited.tenants,
            &state.tokens.envs_in_force(),
        )),
        (None, None) => Some(Config::tenants_for_token_reload(
            &state.config.tenants,
            &state.tokens.envs_in_force(),
        )),
        (None, Some(error)) => {
            // A typo made while rotating a leaked token leaves the old one working: the
            // alert on the tokens must fire, not only the config file's error.
            state.reload_errors.record(
                Reloadable::ScimTokens,
                // That a restart would fail is config_file_error's to say.
                Err(&NotApplied::for_reload(format!(
                    "config.toml does not load as it is now ({error}), so no token was read from it"
                ))),
            );
            None
        }
    };
    if let Some(tenants) = tenants {
        let outcome = state
            .tokens
            .reload(&tenants, |v| (state.env)(v))
            .map_err(NotApplied::for_reload);
        for tenant in settle(state, Reloadable::ScimTokens, outcome, &mut failed)
            .into_iter()
            .flatten()
        {
            tracing::info!(%tenant, "SCIM tokens reloaded from the config file: the tenant's token_hashes as they are now, and its token_env unless one was added or renamed (that waits for a restart).");
        }
        for warning in auth::short_tokens(&tenants, |v| (state.env)(v)) {
            tracing::warn!("{warning}");
        }
    }
    // A `token_env` waiting for the restart whose variable this daemon's environment
    // does not set: unless the environment file has it by then, that restart refuses
    // to start, SCIM and all, and the reload had only said "waits for a restart".
    if let Some(edited) = &on_disk.edited {
        let in_force = state.tokens.envs_in_force();
        for (tenant, var) in crate::config::token_envs_waiting(&edited.tenants, &in_force) {
            if (state.env)(var).is_none_or(|v| v.trim().is_empty()) {
                tracing::warn!(
                    %tenant,
                    "tenants.{tenant}.token_env names {}, which this daemon's environment does not set: set it in the environment file the service reads (under systemd, /etc/rosterd/env) before restarting, or the restart refuses to start (rosterd check-config with that file tells).",
                    crate::config::shown_env_name(var)
                );
            }
        }
    }
    // An identity provider's key rotation needs no restart either.
    if let Some(jwt) = &state.config.api.jwt {
        // Off the runtime, as the other files are read: a key file on a mount that hangs
        // held up a worker, and with it the requests and the stop it would have served.
        let (reading, jwt) = (state.clone(), jwt.clone());
        let outcome = tokio::task::spawn_blocking(move || {
            reading
                .roster
                .verifier
                .reload(&jwt, &reading.config.base_dir, &|v| (reading.env)(v))
        })
        .await;
        let outcome = match (outcome, on_disk.edited.as_ref()) {
            (Err(e), _) => Err(NotApplied::for_reload(format!(
                "the key files' reload was cut short ({e}); the keys in force stay"
            ))),
            // Those in force reloaded, but config.toml as edited names others a start
            // could not load: an alert on `rosterd_config_file_error` stayed silent, and
            // the restart it did not warn of was refused, SCIM included.
            (Ok(Ok(_)), Some(edited)) if let Err(e) = edited_api_keys_load(state, edited).await => {
                Err(NotApplied {
                    error: format!(
                        "config.toml as edited since the start names Roster API keys that do not load ({e}): a restart would refuse them: rosterd would not start, SCIM included; the keys in force stay"
                    ),
                    restart_fails: true,
                })
            }
            (Ok(Ok(changed)), _) => Ok(changed),
            (Ok(Err(e)), edited) => Err(api_keys_not_applied(state, edited, e).await),
        };
        if settle(state, Reloadable::ApiKeys, outcome, &mut failed) == Some(true) {
            tracing::info!("Roster API keys reloaded: public_keys and jwks_file as they are now.");
        }
    }
    // Tenants whose bundle this reload refused, with what a restart would do said.
    let mut refused = std::collections::HashSet::new();
    for t in &state.config.tenants {
        let Some(roster) = state.roster.tenants.get(&t.id) else {
            continue;
        };
        // Compared before training, so a SIGHUP for a connector file does not retrain an
        // unchanged bundle; a changed one trains from this same read.
        let read = TenantPolicy::read_blocking(t, &state.config.base_dir).await;
        if let (Some(old), Ok(Some(now))) = (roster.policy(), &read)
            && old.fingerprint() == now.fingerprint()
        {
            roster.set_bundle_state(crate::api::BundleState::recovered);
            continue;
        }
        let trained = match read {
            Ok(Some(now)) => {
                roster.set_bundle_state(crate::api::BundleState::training);
                now.train_blocking().await.map(Some)
            }
            other => other.map(|_| None),
        };
        let policy = match trained {
            Ok(Some(p)) => Arc::new(p),
            // No bundle: no training was started.
            Ok(None) => continue,
            Err(e) => {
                failed += 1;
                // Group rules are config.toml's, read only at start: an operator who
                // fixed a rule there as the error advises gets the same refusal at each
                // reload, and must be told that a restart now loads both, not that it
                // would fail.
                let restart_loads = match on_disk
                    .edited
                    .as_ref()
                    .and_then(|c| c.tenants.iter().find(|n| n.id == t.id).map(|n| (c, n)))
                {
                    Some((c, n)) => TenantPolicy::loads_blocking(n, &c.base_dir).await.is_ok(),
                    None => false,
                };
                let error = if restart_loads {
                    tracing::warn!(tenant = %t.id, error = %e, "Bundle not reloaded: the group rules this daemon started with refuse it, and config.toml as edited since accepts it. Restart rosterd to apply both; the previous bundle stays in effect until then.");
                    format!(
                        "{e} — config.toml as edited since the start accepts this bundle (group rules are read only at start): a restart applies both"
                    )
                } else {
                    tracing::error!(tenant = %t.id, error = %e, "Bundle not reloaded; the previous one stays in effect, but a restart would refuse this file. (Group rules are checked as config.toml had them at start.)");
                    format!("{e} — a restart would refuse this file too")
                };
                roster.set_bundle_state(|b| b.failed(&error, !restart_loads));
                refused.insert(t.id.clone());
                continue;
            }
        };
        roster.set_bundle_state(|b| b.loaded(&policy));
        *roster.policy.write().unwrap_or_else(|e| e.into_inner()) = Some(policy.clone());
        state.store.set_resolver(&t.id, policy.clone());
        tracing::info!(tenant = %t.id, version = %policy.bundle().version, "Archetype bundle changed; reclassifying the tenant.");
        match crate::schedule::start_reclassify(state.clone(), &t.id, "bundle_change").await {
            Ok(_) => {}
            Err(crate::schedule::JobError::AlreadyRunning(_)) => {
                tracing::info!(tenant = %t.id, "A job is running for the tenant; it reclassifies again when it ends.");
            }
            Err(e) => {
                tracing::error!(tenant = %t.id, error = %e, "Cannot start the reclassification.")
            }
        }
    }
    if let Some(edited) = &on_disk.edited {
        failed += edited_bundles_refused(state, edited, &refused).await;
    }
    // Nothing when the file does not load: `config_file_error` says that.
    let refusals = if on_disk.error.is_some() {
        Vec::new()
    } else {
        let (reading, edited) = (state.clone(), on_disk.edited.clone());
        tokio::task::spawn_blocking(move || {
            restart_refusals(&reading.config, edited.as_ref(), &|v| (reading.env)(v))
        })
        .await
        .unwrap_or_else(|e| {
            vec![format!(
                "config.toml's check for a restart was cut short: {e}"
            )]
        })
    };
    for refusal in &refusals {
        tracing::error!(error = %refusal, "A restart would fail: config.toml as it is now names what a start refuses, SCIM included (rosterd check-config says the same). Fix it before restarting; what runs now stays as it is.");
    }
    failed += refusals.len();
    *state
        .restart_refusals
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = refusals;
    warn_about_connectors(&state.roster, &configs);
    state
        .reloads
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    crate::ops::systemd::notify_reloaded(state.local_addr);
    if failed > 0 {
        crate::ops::systemd::notify_status(&format!(
            "{}; last reload had {failed} error(s), see the log",
            crate::ops::systemd::serving(state.local_addr)
        ));
    }
    // At WARN when something did not apply, so `journalctl -p warning` shows the reload
    // that the errors above it belong to.
    if failed > 0 {
        tracing::warn!(errors = failed, "Reload finished.");
    } else {
        tracing::info!(errors = failed, "Reload finished.");
    }
}

/// What a start on config.toml as it is now would refuse, beyond the parts in force that
/// the reload says of itself (the served tenants' bundles, the key files of the
/// `[api.jwt]` the daemon started with): a connectors directory that cannot be read, an
/// `[api.jwt]` added since the start whose keys do not load, a tenant added whose bundle
/// does not load. Each was said only to wait for a restart, and that restart refused to
/// start, SCIM included, with no alert before it. `edited`: the file as it is now, when
/// it changed since the start (and loads).
fn restart_refusals(
    started: &Config,
    edited: Option<&Config>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Vec<String> {
    let next = edited.unwrap_or(started);
    let mut out = Vec::new();
    if let Err(e) = next.check_connectors_dir() {
        out.push(e.to_string());
    }
    // With an `[api.jwt]` at the start, the reload's own check of the key files says it.
    if started.api.jwt.is_none()
        && let Err(e) = api_keys_load(next, env)
    {
        out.push(format!("[api.jwt], added since the start: {e}"));
    }
    for t in next
        .tenants
        .iter()
        .filter(|t| !started.tenants.iter().any(|s| s.id == t.id))
    {
        if let Err(e) = TenantPolicy::loads(t, &next.base_dir) {
            out.push(format!(
                "tenant {:?}, added since the start: archetype bundle: {e}",
                t.id
            ));
        }
    }
    out
}

/// The tenants whose bundle config.toml, as edited since the start, names in another file
/// that does not load: that edit waits for a restart, which would refuse it, SCIM and
/// all. Said as a bundle that did not reload is (`/status`, `rosterd_config_file_error`):
/// the reload said only that the key waited. `refused`: tenants already said so. Returns
/// how many.
async fn edited_bundles_refused(
    state: &Arc<AppState>,
    edited: &Config,
    refused: &std::collections::HashSet<String>,
) -> usize {
    let mut count = 0;
    for t in &state.config.tenants {
        let (Some(roster), Some(now)) = (
            state.roster.tenants.get(&t.id),
            edited.tenants.iter().find(|n| n.id == t.id),
        ) else {
            continue;
        };
        let named = |c: &Config, b: &Option<std::path::PathBuf>| b.as_deref().map(|p| c.resolve(p));
        let Some(file) = named(edited, &now.bundle) else {
            continue;
        };
        if refused.contains(&t.id) || Some(&file) == named(&state.config, &t.bundle).as_ref() {
            continue;
        }
        if let Err(e) = TenantPolicy::loads_blocking(now, &edited.base_dir).await {
            count += 1;
            let error = format!(
                "config.toml as edited since the start names the bundle {}, which does not load ({e}): a restart would refuse it, SCIM included; the bundle in force stays",
                file.display()
            );
            tracing::error!(tenant = %t.id, %error, "A restart would fail: the bundle config.toml now names does not load.");
            roster.set_bundle_state(|b| b.failed(&error, true));
        }
    }
    count
}

/// The socket a request came on, for a streamed answer to see whether its client is
/// still taking what was sent: valid while the request's answer is being written, since
/// the connection holds the socket open until then.
#[derive(Clone, Copy, Debug)]
pub struct ConnSocket(std::os::fd::RawFd);

/// The address a request's connection came from (a proxy's, behind one).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

impl ConnSocket {
    /// The bytes sent on the socket that the client has not acknowledged yet, if the
    /// system says: they shrink while the client reads, even when the kernel, which wakes
    /// a writer only once a third of a send buffer of megabytes has drained, lets nothing
    /// more be written for a long time.
    pub fn unacknowledged(self) -> Option<u64> {
        #[cfg(target_os = "linux")]
        {
            let mut queued: libc::c_int = 0;
            // SAFETY: TIOCOUTQ (SIOCOUTQ on a TCP socket) writes one int; the descriptor
            // is the connection's, open while its request is answered.
            let r = unsafe { libc::ioctl(self.0, libc::TIOCOUTQ, &mut queued) };
            (r == 0).then_some(u64::try_from(queued).ok()).flatten()
        }
        #[cfg(not(target_os = "linux"))]
        {
            None
        }
    }
}

/// Serve `app` until `shutdown`, then wait for the requests in flight (the caller bounds
/// that wait). This is `axum::serve` giving hyper a timer, which it does not: without
/// one, hyper's header read timeout never fires, and a client that stops in the middle
/// of its headers, or leaves a keep-alive connection idle, holds it for good.
async fn serve(
    listener: TcpListener,
    app: Router,
    client_timeout: std::time::Duration,
    shutdown: CancellationToken,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // The connections, owned here: when the caller stops waiting for the drain (its
    // deadline), dropping this future aborts those still open, so a request in flight
    // is cut off as the log says, and an export's thread sees its client gone. Spawned
    // loose, they went on until the runtime ended, holding the exit seconds past the
    // store's close while an export streamed on.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            () = shutdown.cancelled() => break,
        };
        // Responses are written whole; Nagle would only delay their last segment.
        let _ = stream.set_nodelay(true);
        let socket = ConnSocket(std::os::fd::AsRawFd::as_raw_fd(&stream));
        let service =
            hyper_util::service::TowerToHyperService::new(tower::ServiceExt::map_request(
                app.clone(),
                move |req: Request<hyper::body::Incoming>| {
                    let mut req = req.map(axum::body::Body::new);
                    req.extensions_mut().insert(socket);
                    req.extensions_mut().insert(Peer(peer));
                    req
                },
            ));
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(client_timeout)
            // A client that shuts its sending side once the request is out (`nc -N`,
            // some scripts) still waits for the answer; hyper would drop the request.
            .half_close(true)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        connections.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "A connection ended with an error.");
            }
        });
    }
    // New connections are refused from here on; those open finish their request.
    drop(listener);
    graceful.shutdown().await;
}

/// As `axum::serve` does: a peer that gave up before it was accepted is no news; anything
/// else (out of file descriptors) is logged, and accepting resumes after a pause rather
/// than spinning on the error.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "Cannot accept a connection; trying again in 1 s.");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
}

/// The codings a request's body is sent in (`Content-Encoding: gzip`, …), joined for the
/// refusal, or None when the body is plain or there is none. A handler that reads a body
/// refuses a coded one with 415 (RFC 9110 §15.5.16), after the caller's token, rather
/// than read it as if it were plain: the JSON parser would call it "not valid JSON", or,
/// when the header lies, read it anyway. No identity provider compresses its requests. A
/// handler that takes no body ignores it, coded or not, as it ignores a plain one.
fn body_encodings(h: &HeaderMap) -> Option<String> {
    let encodings: Vec<String> = h
        .get_all(axum::http::header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split(',')
                .map(|e| e.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .filter(|e| !e.is_empty() && e != "identity")
        .collect();
    let has_body = h.contains_key(axum::http::header::TRANSFER_ENCODING)
        || h.get(axum::http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    (has_body && !encodings.is_empty()).then(|| encodings.join(", "))
}

/// Why a request's `Authorization` is refused before its token is read: one header only
/// (RFC 9110 §5.3), since with two a proxy that reads the other one would authorize
/// someone else than we do. For SCIM and the Roster API alike (400).
pub(crate) fn more_than_one_authorization(h: &HeaderMap) -> Option<String> {
    let copies = h.get_all(axum::http::header::AUTHORIZATION).iter().count();
    (copies > 1).then(|| format!("{copies} Authorization headers; send one"))
}

/// The token of an `Authorization: Bearer …` header, or None when there is no such
/// header. A value that is not ASCII is still a token sent (and refused as malformed),
/// not the absence of one: the caller is told its token is wrong, not that it sent none.
pub(crate) fn bearer_token(h: &HeaderMap) -> Option<String> {
    let v = h.get(axum::http::header::AUTHORIZATION)?.as_bytes();
    let blank = v.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = v.split_at(blank);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| String::from_utf8_lossy(rest).trim().to_owned())
}

/// A refusal made before any handler runs, in the protocol's format: the SCIM error with
/// the API error's status and message under `/scim/`, else the API error itself; with one
/// header the refusal calls for.
fn refused(
    scim: bool,
    error: crate::api::ApiError,
    (name, value): (axum::http::HeaderName, &'static str),
) -> Response {
    use axum::response::IntoResponse;
    let mut resp = if scim {
        let status = error.status_and_code().0.as_u16();
        ScimFailure(crate::scim::ScimError::new(status, None, error.to_string())).into_response()
    } else {
        error.into_response()
    };
    resp.headers_mut()
        .insert(name, HeaderValue::from_static(value));
    resp
}

/// Why a request's body was not read.
#[derive(Debug)]
pub(crate) enum BodyRefusal {
    /// Sent compressed, in these codings (`body_encodings`); left unread.
    Encoded(String),
    /// Over the limit.
    TooLarge,
    /// It broke off, or a frame could not be read.
    Unreadable(axum::Error),
}

/// A request's body, for a handler that takes one, to call once the caller is let in:
/// a client without credentials must not make the daemon buffer `max_body_bytes`. A
/// compressed body is refused unread. Each protocol answers a refusal in its own
/// format (`ApiError`, `ScimError`). A large body then waits for its share of
/// [`BodyBudget`], which it holds as long as the [`RequestBody`] lives.
pub(crate) async fn read_request_body(
    st: &AppState,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<RequestBody, BodyRefusal> {
    if let Some(codings) = body_encodings(headers) {
        return Err(BodyRefusal::Encoded(codings));
    }
    let bytes = axum::body::to_bytes(body, st.config.server.max_body_bytes)
        .await
        .map_err(|e| {
            if over_limit(&e) {
                BodyRefusal::TooLarge
            } else {
                BodyRefusal::Unreadable(e)
            }
        })?;
    let held = st.large_bodies.hold(bytes.len()).await;
    Ok(RequestBody { bytes, held })
}

/// Bodies up to this size (nearly all: a SCIM user is a few KB) never wait for
/// [`BodyBudget`].
const LARGE_BODY_BYTES: usize = 1 << 20;

/// At most `max_body_bytes` of large request bodies are handled at once; the rest wait
/// their turn, once read. A body parsed as JSON takes 17 to 28 times its size until its
/// request ends, so four 16 MiB PATCH bodies at once took the daemon to 1.3 GB, where
/// one takes it to about 450 MB. Only a client the request's protocol let in can hold a
/// share, since the body is read after that.
pub struct BodyBudget {
    kib: Arc<tokio::sync::Semaphore>,
    total_kib: u32,
}

impl BodyBudget {
    pub(crate) fn new(max_body_bytes: usize) -> Self {
        let total_kib = u32::try_from(max_body_bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        Self {
            kib: Arc::new(tokio::sync::Semaphore::new(total_kib as usize)),
            total_kib,
        }
    }

    /// Wait for a body of `len` bytes' share, if it is large.
    pub(crate) async fn hold(&self, len: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if len <= LARGE_BODY_BYTES {
            return None;
        }
        let kib = u32::try_from(len.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .min(self.total_kib);
        let asked = std::time::Instant::now();
        // The semaphore is never closed, so this cannot fail.
        let share = self.kib.clone().acquire_many_owned(kib).await.ok();
        let waited = asked.elapsed();
        if waited >= std::time::Duration::from_secs(1) {
            tracing::info!(
                bytes = len,
                waited_ms = waited.as_millis() as u64,
                "A large request body waited for others to be handled first (at most server.max_body_bytes of bodies over 1 MiB are handled at once)."
            );
        }
        share
    }
}

/// A request body that was read, with its share of [`BodyBudget`] while it lives.
pub(crate) struct RequestBody {
    bytes: axum::body::Bytes,
    held: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl RequestBody {
    /// The share, for a handler that keeps what it parsed from the bytes after them.
    pub(crate) fn into_parts(self) -> (axum::body::Bytes, BodyShare) {
        (self.bytes, BodyShare { _held: self.held })
    }
}

impl std::ops::Deref for RequestBody {
    type Target = axum::body::Bytes;

    fn deref(&self) -> &axum::body::Bytes {
        &self.bytes
    }
}

/// A large body's share of [`BodyBudget`], given back when dropped.
pub(crate) struct BodyShare {
    _held: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Whether reading a body with `axum::body::to_bytes` failed for going over its limit.
fn over_limit(e: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// A request body that records when it was read to its end.
struct EndSeen {
    inner: axum::body::Body,
    ended: Arc<std::sync::atomic::AtomicBool>,
}

impl http_body::Body for EndSeen {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        // A reader may stop at the last frame once the body says it is at its end.
        if matches!(polled, std::task::Poll::Ready(None)) || self.inner.is_end_stream() {
            self.ended.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The largest body of a GET or HEAD read (and dropped) once it is answered, to keep its
/// connection whole; and how long that may take.
const IGNORED_BODY_READ_BYTES: u64 = 1024 * 1024;
const IGNORED_BODY_READ_TIME: std::time::Duration = std::time::Duration::from_secs(1);

/// A request body that stalls for `client_timeout_secs` ends the request with 408 in the
/// protocol's own format (SCIM error, or JSON problem), and the connection closes.
async fn body_deadline(
    axum::extract::State(secs): axum::extract::State<u64>,
    req: Request,
    next: Next,
) -> Response {
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tower_http::timeout::{TimeoutBody, TimeoutError};
    let stalled = Arc::new(AtomicBool::new(false));
    let seen = stalled.clone();
    let scim = req.uri().path().starts_with("/scim/");
    let has_body = !http_body::Body::is_end_stream(req.body());
    let ended = Arc::new(AtomicBool::new(false));
    let req = req.map(|body| {
        axum::body::Body::new(EndSeen {
            inner: axum::body::Body::new(
                TimeoutBody::new(std::time::Duration::from_secs(secs), body).map_err(move |e| {
                    if e.is::<TimeoutError>() {
                        seen.store(true, Ordering::Relaxed);
                    }
                    e
                }),
            ),
            ended: ended.clone(),
        })
    });
    // A GET or HEAD ignores its body, and answered with it unread, the connection was
    // closed with the client still sending: the kernel's reset then cut off the answer
    // (python-requests lost 2 of 10 with a 5-byte body). One of a length up to 1 MiB
    // is read and dropped once the request is answered (401 and 403 come on the headers
    // still), for a second at most; a larger one, one of no length given, or one the
    // client waits to be asked for (`Expect: 100-continue`), stays unread and the
    // connection closes.
    let small = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|n| n <= IGNORED_BODY_READ_BYTES);
    let ignored = has_body
        && small
        && matches!(
            *req.method(),
            axum::http::Method::GET | axum::http::Method::HEAD
        )
        && !req.headers().contains_key(axum::http::header::EXPECT);
    let (req, ignored) = if ignored {
        let (parts, body) = req.into_parts();
        (
            Request::from_parts(parts, axum::body::Body::empty()),
            Some(body),
        )
    } else {
        (req, None)
    };
    let mut resp = next.run(req).await;
    // Taken before the drain: a body the answer did not need is no stall of the
    // request's, whatever `client_timeout_secs` is (at 1 s, a GET announcing a body it
    // never sent was answered 408, even without a token).
    let stalled = stalled.load(Ordering::Relaxed);
    if let Some(mut body) = ignored {
        let _ = tokio::time::timeout(IGNORED_BODY_READ_TIME, async {
            while let Some(Ok(_)) = body.frame().await {}
        })
        .await;
    }
    if !stalled {
        // Answered before its body was read to the end (refused on its headers): hyper
        // then closes the connection unless the rest is small, so a client that reused
        // it met a broken pipe on its next request. Say so.
        if has_body && !ended.load(Ordering::Relaxed) {
            resp.headers_mut().insert(
                axum::http::header::CONNECTION,
                HeaderValue::from_static("close"),
            );
        }
        return resp;
    }
    tracing::warn!(
        seconds = secs,
        "A client stalled while sending its request body; answered 408."
    );
    refused(
        scim,
        crate::api::ApiError::RequestTimeout(secs),
        (axum::http::header::CONNECTION, "close"),
    )
}

/// What an answer rebuilt in the protocol's error format (`scim_errors`, `json_errors`)
/// keeps of the one it replaces: the methods a 405 names, and the `Connection: close` of
/// an answer given with the body unread (`body_deadline`). Without it, a client reused
/// a connection the daemon was closing, and lost its next request.
pub(crate) fn kept_headers(from: &HeaderMap) -> HeaderMap {
    let mut kept = HeaderMap::new();
    for name in [axum::http::header::ALLOW, axum::http::header::CONNECTION] {
        if let Some(value) = from.get(&name) {
            kept.insert(name, value.clone());
        }
    }
    kept
}

/// What an error answered before any handler (axum's rejection of a path or body that
/// does not decode) says, for the protocol's own error body; its status if it says nothing.
pub(crate) async fn rejection_text(resp: Response) -> String {
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), 4096)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_owned();
    if text.is_empty() {
        format!("request refused ({status})")
    } else {
        text
    }
}

fn router(state: Arc<AppState>) -> Router {
    let routes = Router::new()
        .merge(scim::routes())
        .merge(crate::api::routes())
        .merge(crate::ops::status::routes())
        .merge(crate::ops::metrics::routes())
        .fallback(scim::not_found);
    answered(
        routes,
        state.config.server.max_body_bytes,
        state.config.server.client_timeout_secs,
    )
    .layer(axum::middleware::from_fn_with_state(
        state.clone(),
        request_span,
    ))
    .with_state(state)
}

/// What stands between the routes and the request's span: the body limits, and every
/// failure (a panic included) answered in the protocol's own error format.
fn answered<S: Clone + Send + Sync + 'static>(
    routes: Router<S>,
    max_body_bytes: usize,
    client_timeout_secs: u64,
) -> Router<S> {
    routes
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            handler_panicked,
        ))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            client_timeout_secs,
            body_deadline,
        ))
        .layer(axum::middleware::from_fn(crate::api::json_errors))
        .layer(axum::middleware::from_fn(scim::scim_errors))
}

/// A handler that panics (a bug) answers 500 instead of dropping the connection, which an
/// identity provider would take for a network fault and retry blindly. The answer is
/// plain text here; `scim_errors` and `json_errors`, outside this layer, give it the
/// protocol's error body. The line is logged inside the request's span.
fn handler_panicked(payload: Box<dyn std::any::Any + Send>) -> Response {
    use axum::response::IntoResponse;
    tracing::error!(
        panic = %crate::ops::panics::message(payload.as_ref()),
        "A request handler panicked (a bug); answered 500."
    );
    (
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        crate::store::INTERNAL_ERROR_MESSAGE,
    )
        .into_response()
}

/// What a refused request was told, left on the response by the one place each protocol
/// renders its errors, so the request's log line can say it.
#[derive(Clone, Debug)]
pub(crate) struct Refusal {
    /// The protocol's own code: the Roster API's `error`, SCIM's `scimType`. SCIM has
    /// none for 401, 403, 404 or 412, and those lines then carry no `code` field rather
    /// than an empty one an operator would take for a missing value.
    pub code: Option<&'static str>,
    pub detail: String,
}

/// A refusal's detail can echo what the client sent (an archetype id, a filter) up to
/// the body limit; the log keeps enough of it to recognise.
const MAX_LOGGED_DETAIL: usize = 512;

/// How much of a request's path, and of the tenant named in it, its log lines carry.
const LOGGED_PATH_BYTES: usize = 512;
const LOGGED_TENANT_BYTES: usize = 128;

/// A query string's names and values, form-decoded (`+` is a space, as the clients that
/// build query strings encode it: a plus is `%2B`), for SCIM and the Roster API alike.
/// Bytes that do not decode to UTF-8 are refused: decoded lossily (as axum's `Query`
/// does), `department=%FF` matched a department named U+FFFD and answered an empty page.
pub(crate) fn query_pairs(query: &str) -> Result<Vec<(String, String)>, String> {
    let decode = |part: &str, what: &str| {
        percent_encoding::percent_decode_str(&part.replace('+', " "))
            .decode_utf8()
            .map(std::borrow::Cow::into_owned)
            .map_err(|_| format!("a {what} is not UTF-8 once percent-decoded"))
    };
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((
                decode(name, "parameter name")?,
                decode(value, "parameter value")?,
            ))
        })
        .collect()
}

pub(crate) use crate::text::{MAX_MESSAGE_BYTES, clip, quote_clipped};

/// Refusals for credentials logged one by one in a minute. A client without a token, trying
/// tokens, wrote a WARN line each: 4,000 requests, 4,000 lines (about 20 GB a day at the
/// rate one client reached). An identity provider with a stale token retries far below it.
const REFUSALS_LOGGED_A_MINUTE: u32 = 20;

/// The addresses a minute's summary names, at most.
const REFUSING_CLIENTS_NAMED: usize = 5;

/// What becomes of one refusal for credentials in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefusalVerdict {
    Log,
    /// The first past the minute's share: logged, with a line saying the rest are counted.
    LogThenCount,
    /// Counted, and said in the summary that the next minute's first refusal writes.
    Count,
}

/// The minute's refusals for credentials: how many were logged, how many only counted
/// and from where.
#[derive(Default)]
pub(crate) struct RefusalLog(std::sync::Mutex<RefusalMinute>);

#[derive(Default)]
struct RefusalMinute {
    began: Option<std::time::Instant>,
    logged: u32,
    counted: u64,
    clients: std::collections::BTreeSet<std::net::IpAddr>,
}

impl RefusalLog {
    /// The verdict on one more refusal from `client`. The first refusal of a minute
    /// after one that counted some writes their summary first.
    fn verdict(&self, client: Option<std::net::IpAddr>) -> RefusalVerdict {
        let now = std::time::Instant::now();
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if Self::ended(&mut m, now) {
            m.began = Some(now);
        }
        if m.logged < REFUSALS_LOGGED_A_MINUTE {
            m.logged += 1;
            return RefusalVerdict::Log;
        }
        m.counted += 1;
        if let Some(c) = client
            && m.clients.len() < REFUSING_CLIENTS_NAMED
        {
            m.clients.insert(c);
        }
        if m.counted == 1 {
            RefusalVerdict::LogThenCount
        } else {
            RefusalVerdict::Count
        }
    }

    /// A minute over: its summary said, if it counted any.
    fn sum_up(&self) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        Self::ended(&mut m, std::time::Instant::now());
    }

    /// The stop: the minute under way is summed up now, or its count (a flood of old
    /// tokens just before a restart, the likeliest time for one) was never said.
    fn sum_up_at_stop(&self) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.began = None;
        Self::ended(&mut m, std::time::Instant::now());
    }

    /// Whether the minute is over (or none began); if so, its summary is written and
    /// the count starts afresh.
    fn ended(m: &mut RefusalMinute, now: std::time::Instant) -> bool {
        if m.began
            .is_some_and(|b| now.duration_since(b) < std::time::Duration::from_secs(60))
        {
            return false;
        }
        let ended = std::mem::take(m);
        if ended.counted > 0 {
            let clients: Vec<String> = ended.clients.iter().map(|c| c.to_string()).collect();
            let more = if ended.clients.len() == REFUSING_CLIENTS_NAMED {
                " (and maybe others)"
            } else {
                ""
            };
            tracing::warn!(
                counted = ended.counted,
                clients = %clients.join(","),
                "{} more requests were refused for their credentials in the minute after the first {REFUSALS_LOGGED_A_MINUTE}, from {}{more}.",
                ended.counted,
                clients.join(", ")
            );
        }
        true
    }
}

/// Rewrite the run file every [`ALIVE_EVERY`]: a start after a crash says when the run was
/// last alive, not only when it began, weeks before perhaps.
async fn say_alive(store: Store, mut run: crate::store::RunRecord, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(ALIVE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is now, and the start just wrote the file.
    every.tick().await;
    loop {
        tokio::select! {
            _ = every.tick() => {
                run.alive_at = Some(crate::dispatch::rfc3339(chrono::Utc::now()));
                let (s, r) = (store.clone(), run.clone());
                let written = tokio::task::spawn_blocking(move || s.record_run(&r)).await;
                if let Ok(Err(e)) = written {
                    // Not at WARN: it would come every minute, and a store on a disk that
                    // refuses writes says so louder.
                    tracing::debug!(error = %e, "Cannot rewrite the run file.");
                }
            }
            () = shutdown.cancelled() => return,
        }
    }
}

const ALIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Writes a minute's summary of refusals once it is over, though no refusal follows:
/// written only by the next refusal, the count of a flood that stopped was never said.
async fn sum_up_refusals(state: Arc<AppState>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = every.tick() => state.refusals.sum_up(),
            () = shutdown.cancelled() => return,
        }
    }
}

/// The detail is a string field: the text format writes it quoted and escaped (it can echo
/// what the client sent, a filter or a userName, and a line break in it must not start a
/// forged log line), the JSON format as a plain JSON string.
/// A refused request is logged with what its client was told, so an operator holding the
/// request id an identity provider reports (or the 401s after a token rotation) finds it.
/// Wrong or missing credentials are WARN: nothing works until someone fixes them. Other
/// refusals are routine (an IdP probing for a user that does not exist gets 404) and INFO.
fn log_finished(
    resp: &Response,
    elapsed: std::time::Duration,
    credentials: Option<RefusalVerdict>,
    client: Option<std::net::IpAddr>,
) {
    let status = resp.status().as_u16();
    let micros = elapsed.as_micros() as u64;
    match resp.extensions().get::<Refusal>() {
        Some(r) if matches!(status, 401 | 403) => {
            if credentials == Some(RefusalVerdict::Count) {
                return;
            }
            let client = client.map(tracing::field::display);
            tracing::warn!(
                status,
                code = r.code,
                detail = clip(&r.detail, MAX_LOGGED_DETAIL).as_ref(),
                client,
                "Request refused: credentials."
            );
            if credentials == Some(RefusalVerdict::LogThenCount) {
                tracing::warn!(
                    "More than {REFUSALS_LOGGED_A_MINUTE} requests this minute were refused for their credentials; the rest of the minute's are counted, not logged one by one (rosterd_http_requests_total counts each by status)."
                );
            }
        }
        Some(r) if status < 500 => {
            tracing::info!(
                status,
                code = r.code,
                detail = clip(&r.detail, MAX_LOGGED_DETAIL).as_ref(),
                "Request refused."
            )
        }
        _ => tracing::debug!(status, micros, "Request finished."),
    }
}

/// A store outage is logged where the store failed, once; each request it refuses after
/// that would only repeat it.
pub(crate) fn log_outage(e: &crate::store::StoreError, face: &str) {
    if matches!(e, crate::store::StoreError::Failed(_)) {
        tracing::debug!(error = %e, "{face} request refused: the store has failed.");
    } else {
        tracing::error!(error = %e, "Store outage while serving a {face} request.");
    }
}

/// Give every request an id (the client's `X-Request-Id` if sane, else a fresh one), run
/// it inside a span carrying that id and the tenant, echo the id back, and count it in the
/// HTTP and SCIM metrics (labelled by route template, never by raw path).
async fn request_span(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        // Printable and without blanks, quotes, `=`, braces or backslashes: the id is
        // logged as a field of the request's span, `abc status=200` would print as two
        // fields, and `a}b{c` would end the span's braces early for a log parser.
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.bytes().all(|b| {
                    b.is_ascii_graphic() && !matches!(b, b'"' | b'\'' | b'=' | b'{' | b'}' | b'\\')
                })
        })
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let path = req.uri().path();
    // The Roster API's tenant is known only after the JWT is verified, and
    // `authenticate` records it then; an unverified X-Tenant must not name the tenant
    // in the logs an operator searches.
    let tenant = path
        .strip_prefix("/scim/v2/")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("")
        .to_owned();
    // Left empty until known: the text log appends a recorded field rather than
    // replacing it, so a placeholder would print the tenant twice.
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        tenant = tracing::field::Empty,
        actor = tracing::field::Empty,
        method = %req.method(),
        // Cut as a detail is: a client without credentials sent them, and each byte of
        // a 60 KB path was one byte (a tenant segment two) of every line logged for it.
        path = %clip(path, LOGGED_PATH_BYTES),
    );
    if !tenant.is_empty() {
        span.record(
            "tenant",
            tracing::field::display(clip(&tenant, LOGGED_TENANT_BYTES)),
        );
    }
    // Only a configured tenant may become a metric label: the path is the client's.
    let metrics_tenant = state
        .config
        .tenants
        .iter()
        .any(|t| t.id == tenant)
        .then_some(tenant.as_str());
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .cloned();
    let method = req.method().clone();
    let started = std::time::Instant::now();
    let client = req.extensions().get::<Peer>().map(|p| p.0.ip());
    let mut resp = next.run(req).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let credentials = (matches!(resp.status().as_u16(), 401 | 403)
        && resp.extensions().get::<Refusal>().is_some())
    .then(|| state.refusals.verdict(client));
    span.in_scope(|| log_finished(&resp, elapsed, credentials, client));
    crate::ops::metrics::record_request(
        route.as_ref().map(|r| r.as_str()),
        &method,
        resp.status(),
        elapsed,
        metrics_tenant,
    );
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each part of config.toml a start would refuse, new since the start, is said; what
    /// loads, and a secret a restart's environment may set, are not.
    #[test]
    fn what_a_restart_would_refuse_is_found_in_the_file_as_it_is_now() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::create_dir(dir.path().join("connectors")).unwrap();
        std::fs::write(
            dir.path().join("b.toml"),
            "version = \"1\"\ndefault_archetype = \"a\"\n[[archetypes]]\nid = \"a\"\ntitle = \"A\"\nfunction_focus = []\ndefault_cowork_id = \"c\"\nexamples = [\"Accountant\"]\n",
        )
        .unwrap();
        let tenant = |id: &str, bundle: &str| {
            format!("[[tenants]]\nid = \"{id}\"\ntoken_env = \"T_{id}\"\nbundle = \"{bundle}\"\n")
        };
        let config = |text: String| Config::parse(&format!("version = 1\n{text}"), &path).unwrap();
        let started = config(format!(
            "[connectors]\ndir = \"connectors\"\n{}",
            tenant("t", "b.toml")
        ));
        let env = |_: &str| None;
        assert!(restart_refusals(&started, None, &env).is_empty());
        let edited = config(format!(
            "[connectors]\ndir = \"nope\"\n[api.jwt]\naudience = [\"a\"]\nhs256_secret_env = \"UNSET\"\njwks_file = \"missing.json\"\n{}{}{}",
            tenant("t", "b.toml"),
            tenant("good", "b.toml"),
            tenant("bad", "missing.toml")
        ));
        let said = restart_refusals(&started, Some(&edited), &env);
        assert_eq!(said.len(), 3, "{said:#?}");
        assert!(
            said[0].contains("connectors.dir") && said[0].contains("nope"),
            "{}",
            said[0]
        );
        assert!(
            said[1].starts_with("[api.jwt], added since the start")
                && said[1].contains("missing.json"),
            "{}",
            said[1]
        );
        assert!(
            said[2].starts_with("tenant \"bad\", added since the start: archetype bundle")
                && said[2].contains("missing.toml"),
            "{}",
            said[2]
        );
        // A secret alone may be set by the environment a restart reads.
        let secret_only = config(format!(
            "[connectors]\ndir = \"connectors\"\n[api.jwt]\naudience = [\"a\"]\nhs256_secret_env = \"UNSET\"\n{}",
            tenant("t", "b.toml")
        ));
        assert_eq!(
            restart_refusals(&started, Some(&secret_only), &env),
            Vec::<String>::new()
        );
        // The directory in force, gone.
        std::fs::remove_dir(dir.path().join("connectors")).unwrap();
        assert_eq!(restart_refusals(&started, None, &env).len(), 1);
    }

    /// The run file is rewritten every minute with when the run was last alive, and not
    /// after the rewriter was told to stop.
    #[tokio::test(start_paused = true)]
    async fn the_run_file_says_every_minute_that_the_run_is_alive() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let run = crate::store::RunRecord::this_process("2026-01-01T00:00:00Z");
        store.record_run(&run).unwrap();
        let stop = CancellationToken::new();
        let alive = tokio::spawn(say_alive(store.clone(), run.clone(), stop.clone()));
        tokio::time::sleep(std::time::Duration::from_secs(59)).await;
        assert_eq!(store.unclean_run().unwrap(), Some(run.clone()));
        let mut rewritten = None;
        for _ in 0..200 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            rewritten = store.unclean_run().unwrap().filter(|r| *r != run);
            if rewritten.is_some() {
                break;
            }
        }
        let rewritten = rewritten.expect("rewritten after a minute");
        assert_eq!(rewritten.started_at, run.started_at);
        assert_ne!(rewritten.alive_at, run.alive_at);
        stop.cancel();
        alive.await.unwrap();
        store.end_run().unwrap();
        tokio::time::sleep(std::time::Duration::from_secs(120)).await;
        assert_eq!(
            store.unclean_run().unwrap(),
            None,
            "rewritten after its stop"
        );
    }

    #[test]
    fn a_minute_logs_twenty_refusals_then_counts_and_sums_up_once_over() {
        let log = RefusalLog::default();
        let ip = std::net::IpAddr::from([192, 0, 2, 7]);
        let client = Some(ip);
        for _ in 0..REFUSALS_LOGGED_A_MINUTE {
            assert_eq!(log.verdict(client), RefusalVerdict::Log);
        }
        assert_eq!(log.verdict(client), RefusalVerdict::LogThenCount);
        assert_eq!(log.verdict(client), RefusalVerdict::Count);
        log.sum_up();
        // Still this minute: nothing summed up, nothing started afresh.
        assert_eq!(log.verdict(None), RefusalVerdict::Count);
        {
            let mut m = log.0.lock().unwrap();
            assert_eq!(m.counted, 3);
            assert!(m.clients.contains(&ip));
            m.began = m
                .began
                .and_then(|b| b.checked_sub(std::time::Duration::from_secs(61)));
        }
        // Over without another refusal: said, and the next minute logs again.
        log.sum_up();
        assert_eq!(log.0.lock().unwrap().counted, 0);
        assert_eq!(log.verdict(client), RefusalVerdict::Log);
        // A stop within the minute sums it up at once (one logged above).
        for _ in 0..REFUSALS_LOGGED_A_MINUTE + 1 {
            log.verdict(client);
        }
        assert_eq!(log.0.lock().unwrap().counted, 2);
        log.sum_up();
        assert_eq!(log.0.lock().unwrap().counted, 2, "the minute is not over");
        log.sum_up_at_stop();
        assert_eq!(log.0.lock().unwrap().counted, 0);
    }
    use axum::routing::get;

    fn buggy(what: &str) -> &'static str {
        panic!("{what}")
    }

    #[tokio::test]
    async fn large_bodies_wait_for_one_another_and_small_ones_never_wait() {
        use futures_util::FutureExt;
        const MIB: usize = 1 << 20;
        let budget = BodyBudget::new(16 * MIB);
        let first = budget.hold(10 * MIB).await;
        assert!(first.is_some(), "a large body holds a share");
        // 10 + 7 MiB is over the 16 MiB budget: the second waits for the first.
        assert!(budget.hold(7 * MIB).now_or_never().is_none());
        assert!(
            matches!(budget.hold(MIB).now_or_never(), Some(None)),
            "a body of 1 MiB or less takes nothing and never waits"
        );
        let third = budget
            .hold(6 * MIB)
            .now_or_never()
            .expect("6 MiB still fits");
        drop(first);
        let second = budget.hold(7 * MIB).now_or_never().expect("room again");
        assert!(second.is_some() && third.is_some());
        drop((second, third));
        // A budget smaller than one body (never: the body's limit is the budget) would
        // still let it through alone rather than wait for good.
        let small = BodyBudget::new(2 * MIB);
        assert!(small.hold(3 * MIB).now_or_never().is_some());
    }

    #[test]
    fn a_long_detail_is_clipped_on_a_character_boundary() {
        assert_eq!(clip("short", 512), "short");
        // "é" is two bytes: a cut at byte 3 would split the second one.
        assert_eq!(clip("éééé", 3), "é… (8 bytes in all)");
        assert_eq!(quote_clipped("éééé", 3), "\"é\"… (8 bytes in all)");
        assert_eq!(quote_clipped("a\"b", 10), "\"a\\\"b\"");
    }

    /// No route of the daemon is known to panic, so routes that do stand in for a bug.
    #[tokio::test]
    async fn a_panicking_handler_answers_500_in_the_protocols_format() {
        let routes: Router = Router::new()
            .route(
                "/scim/v2/acme/Users",
                get(|| async { buggy("a bug in a SCIM handler") }),
            )
            .route(
                "/api/v1/roster/users",
                get(|| async { buggy("a bug in a Roster API handler") }),
            )
            .route(
                "/api/v1/roster/groups",
                // As the Roster API's reads run: the panic comes back as an error.
                get(|| async {
                    tokio::task::spawn_blocking(|| buggy("a bug in blocking work"))
                        .await
                        .map_err(|e| {
                            crate::api::ApiError::Internal(crate::store::StoreError::from_join(e))
                        })
                }),
            )
            .route("/healthy", get(|| async { "still serving" }));
        let app = answered(routes, 1024, 5);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let client = reqwest::Client::new();
        let get = |path: &str| {
            let req = client.get(format!("{base}{path}"));
            async move {
                let r = req.send().await.unwrap();
                let status = r.status().as_u16();
                let kind = r.headers()["content-type"].to_str().unwrap().to_owned();
                (status, kind, r.json::<serde_json::Value>().await.unwrap())
            }
        };

        let (status, kind, body) = get("/scim/v2/acme/Users").await;
        assert_eq!((status, kind.as_str()), (500, error::SCIM_CONTENT_TYPE));
        assert_eq!(
            body["schemas"],
            serde_json::json!(["urn:ietf:params:scim:api:messages:2.0:Error"])
        );
        assert_eq!(body["status"], "500");
        assert_eq!(body["detail"], crate::store::INTERNAL_ERROR_MESSAGE);

        for path in ["/api/v1/roster/users", "/api/v1/roster/groups"] {
            let (status, kind, body) = get(path).await;
            assert_eq!((status, kind.as_str()), (500, "application/json"), "{path}");
            assert_eq!(body["error"], "internal");
            assert_eq!(body["message"], crate::store::INTERNAL_ERROR_MESSAGE);
        }

        let after = client.get(format!("{base}/healthy")).send().await.unwrap();
        assert_eq!(after.text().await.unwrap(), "still serving");
        server.abort();
    }
}
