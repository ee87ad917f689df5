//! The `Dispatcher`: every connector of the daemon, started, reloaded, stopped and shown.

use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::StartError;
use super::csv_task::run_csv;
use super::ctx::{Ctx, Repairs, Target, cursor_name};
use super::live::{Deadline, Live, Pause};
use super::status::{ConnectorStatus, UnloadedStatus, rfc3339};
use super::task::{run_http, supervised};
use crate::config::EnvFn;
use crate::connectors::{ConnectorConfig, Kind, Loaded, Unloaded};
use crate::ops::metrics as counters;
use crate::store::{Store, StoreError};

/// A stored cursor of a connector that is not loaded.
pub(super) struct Held {
    pub(super) cursor_name: String,
    pub(super) name: String,
    pub(super) file: Option<std::path::PathBuf>,
    cursor: u64,
}

pub(super) struct Running {
    pub(super) config: ConnectorConfig,
    pub(super) live: Arc<Live>,
    pub(super) ctx: Option<Arc<Ctx>>,
    /// Why an enabled connector is not running (its file names a secret the
    /// environment lacks), as /status `connector_errors` lists it.
    pub(super) not_started: Option<String>,
    cancel: CancellationToken,
    handle: Option<JoinHandle<()>>,
}

/// A running connector, as found by name.
pub(super) struct Found {
    pub(super) config: ConnectorConfig,
    pub(super) live: Arc<Live>,
    pub(super) ctx: Option<Arc<Ctx>>,
    pub(super) not_started: bool,
}

/// All connectors of the daemon. Reloading replaces the ones whose file changed and
/// leaves the others running.
pub struct Dispatcher {
    pub(super) store: Store,
    env: EnvFn,
    client: reqwest::Client,
    shutdown: CancellationToken,
    running: Mutex<BTreeMap<String, Running>>,
    load_errors: Mutex<Vec<String>>,
    /// The files behind `load_errors`: their connectors still hold back compaction.
    unloaded: Mutex<Vec<Unloaded>>,
    /// Running connectors whose file no longer loads (name → why): they keep running on
    /// the config they were started with until the file is fixed or removed.
    broken: Mutex<BTreeMap<String, String>>,
    /// Of those, the files that load but whose connector cannot start as they now read
    /// (file, error): the loader does not list them, yet they are errors to report.
    unstartable: Mutex<Vec<(std::path::PathBuf, String)>>,
    /// The connectors directory last applied (see [`Loaded::listed`]).
    dir_identity: Mutex<Option<crate::connectors::DirIdentity>>,
    /// The configured tenants, whose stored cursors are looked through for connectors
    /// that are not loaded.
    pub(super) tenants: Vec<String>,
    /// Every connector task, so that a stop waits for all of them: a reload cut short by
    /// the stop drops its own wait for the connectors it was stopping.
    tasks: tokio_util::task::TaskTracker,
    /// What connectors a reload stopped had counted (delivered, retries, last success), by tenant and
    /// name: started again, by that reload or a later one (its file put back), a
    /// connector goes on from them, as its metrics do.
    counted: Mutex<HashMap<(String, String), Counted>>,
}

/// What a connector counted before a reload stopped it (see [`Live::counts`]).
#[derive(Clone, Copy)]
pub(super) struct Counted {
    pub(super) delivered: u64,
    pub(super) retries: u64,
    pub(super) last_success_at: Option<DateTime<Utc>>,
}

impl Dispatcher {
    pub fn new(
        store: Store,
        env: EnvFn,
        tenants: Vec<String>,
        shutdown: CancellationToken,
    ) -> Arc<Dispatcher> {
        let client = reqwest::Client::builder()
            .user_agent(format!("rosterd/{}", crate::VERSION))
            .pool_max_idle_per_host(256)
            // A redirect is the target's answer, not followed (see `http::classify`).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Arc::new(Dispatcher {
            store,
            env,
            client,
            shutdown,
            running: Mutex::new(BTreeMap::new()),
            load_errors: Mutex::new(Vec::new()),
            unloaded: Mutex::new(Vec::new()),
            broken: Mutex::new(BTreeMap::new()),
            unstartable: Mutex::new(Vec::new()),
            dir_identity: Mutex::new(None),
            tenants,
            tasks: tokio_util::task::TaskTracker::new(),
            counted: Mutex::new(HashMap::new()),
        })
    }

    fn broken(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.broken.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn unstartable_lock(&self) -> std::sync::MutexGuard<'_, Vec<(std::path::PathBuf, String)>> {
        self.unstartable.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn running(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn unloaded_lock(&self) -> std::sync::MutexGuard<'_, Vec<Unloaded>> {
        self.unloaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connector files that did not load at the last start or reload (a copy: the
    /// callers go on to read the store).
    fn unloaded(&self) -> Vec<Unloaded> {
        self.unloaded_lock().clone()
    }

    /// The file of each connector now running (or set up but disabled), by name: on a
    /// reload these keep their names against newcomers.
    pub fn running_files(&self) -> BTreeMap<String, std::path::PathBuf> {
        self.running()
            .iter()
            .map(|(n, r)| (n.clone(), r.config.file.clone()))
            .collect()
    }

    /// Apply a freshly loaded connectors directory: stop connectors whose file changed
    /// or was removed, start new and changed ones, and lift an "until resumed" pause of
    /// the ones left running (a reload is how an operator says "I fixed it"; the pause
    /// messages promise it).
    ///
    /// What does not load does not stop what runs: a running connector whose file is now
    /// broken keeps its old config (as a broken bundle does), and so does one whose
    /// changed file cannot start (a secret the daemon's environment lacks: the new
    /// connector is built before the old one stops). A directory that cannot be read
    /// changes nothing, nor does another directory in which no connector file loads while
    /// connectors run. Only a removed file stops its connector, and retires it: its cursor
    /// then no longer holds back compaction.
    /// Returns the errors, also kept for /status: files that do not load, changed files
    /// whose connector cannot start, and connectors not started.
    pub async fn apply(&self, loaded: Loaded) -> Vec<String> {
        let file_errors: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
        if loaded.dir_unreadable {
            for e in &file_errors {
                tracing::error!(error = %e, "Connectors not reloaded: their directory cannot be read. Every connector keeps running as loaded before.");
            }
            return self.set_errors(file_errors);
        }
        {
            let mut last = self.dir_identity.lock().unwrap_or_else(|e| e.into_inner());
            let running_count = self.running().len();
            let identity = loaded.listed.as_ref().and_then(|(_, id)| *id);
            let swapped = last.is_some() && *last != identity;
            if let Some((dir, _)) = loaded
                .listed
                .as_ref()
                .filter(|_| swapped && running_count > 0 && loaded.connectors.is_empty())
            {
                let mut errors = vec![format!(
                    "the connectors directory {} is now another directory, with no connector file that loads, while {running_count} connector(s) run: taken for a volume not mounted or a link pointed elsewhere, not for the removal of every file. Every connector keeps running as loaded before. To remove them all, remove their files from the directory they were loaded from, or restart rosterd (their stored cursors are then listed as not loaded until `rosterd retire`)",
                    dir.display()
                )];
                tracing::error!(error = %errors[0], "Connectors not reloaded: their directory is another, and nothing in it loads.");
                errors.extend(file_errors);
                return self.set_errors(errors);
            }
            *last = identity;
        }
        // Which running connector each unloadable file is, if any: the one it was loaded
        // from, else the one whose name the file still gives. The file first: edited to
        // take the name of another running connector, it was taken for that one's when
        // that name sorted first, and its own connector was retired as if removed.
        let mut broken = BTreeMap::new();
        {
            let running = self.running();
            for (e, u) in loaded.errors.iter().zip(&loaded.unloaded) {
                let of = running
                    .values()
                    .find(|r| r.config.file == u.file)
                    .or_else(|| {
                        running.values().find(|r| {
                            u.name.as_deref() == Some(r.config.name.as_str())
                                && u.tenant.as_deref().is_none_or(|t| t == r.config.tenant)
                        })
                    });
                match of {
                    // A rejected duplicate names a connector that still loads from its
                    // own file: that one is not broken.
                    Some(r) if !loaded.connectors.iter().any(|c| c.name == r.config.name) => {
                        tracing::error!(tenant = %r.config.tenant, connector = %r.config.name, error = %e, "Connector file does not load; the connector keeps running on its previously loaded config until the file is fixed or removed.");
                        broken.insert(r.config.name.clone(), e.to_string());
                    }
                    _ => tracing::error!(error = %e, "Connector file not loaded; the others are."),
                }
            }
        }
        // Files that do not read far enough to name a connector, and are no running
        // connector's own: each could be the file of a connector whose file is gone,
        // renamed (`mv sis.toml district.toml`, left unreadable or mid-edit). Such a
        // connector stops, but is not retired: its cursor holds its changes, as at a
        // start, until that file reads or is removed.
        let nameless: Vec<std::path::PathBuf> = {
            let running = self.running();
            loaded
                .unloaded
                .iter()
                .filter(|u| u.name.is_none() && !running.values().any(|r| r.config.file == u.file))
                .map(|u| u.file.clone())
                .collect()
        };
        *self.unloaded_lock() = loaded.unloaded;
        let mut wanted: BTreeMap<String, ConnectorConfig> = loaded
            .connectors
            .into_iter()
            .map(|c| (c.name.clone(), c))
            .collect();
        let mut unstartable = self.refuse_kept_files(&mut wanted, &mut broken);
        // Every new or changed connector is built before anything stops: one that cannot
        // start must not take down the connector running on the file's previous version.
        let mut prepared = BTreeMap::new();
        {
            let running = self.running();
            for (name, config) in &wanted {
                let old = running.get(name);
                if old.is_some_and(|r| r.config == *config) {
                    continue;
                }
                let built = self.prepare(config);
                match (&built, old) {
                    (Err(e), Some(old)) if old.ctx.is_some() => {
                        let error = format!(
                            "{}: its connector cannot start as the file now reads, so it keeps running on its previous config: {}",
                            config.file.display(),
                            e.explained()
                        );
                        tracing::error!(tenant = %config.tenant, connector = %name, %error, "Connector file changed, but the connector cannot start as it now reads; it keeps running on its previously loaded config until the file is fixed or removed.");
                        broken.insert(name.clone(), error.clone());
                        unstartable.push((config.file.clone(), error));
                    }
                    _ => {
                        prepared.insert(name.clone(), built);
                    }
                }
            }
        }
        // They stay listed while they stop (up to STOP_DRAIN, side by side): meanwhile
        // /status shows them, and `retire` refuses them, as still loaded.
        let (stopping, handles, held): (
            Vec<ConnectorConfig>,
            Vec<JoinHandle<()>>,
            std::collections::HashSet<String>,
        ) = {
            let mut running = self.running();
            let mut handles = Vec::new();
            let mut configs = Vec::new();
            let mut held = std::collections::HashSet::new();
            for (n, r) in running.iter_mut() {
                if broken.contains_key(n) || wanted.get(n) == Some(&r.config) {
                    continue;
                }
                if !wanted.contains_key(n) && nameless.is_empty() {
                    r.live.retiring.store(true, Ordering::Release);
                }
                r.cancel.cancel();
                handles.extend(r.handle.take());
                configs.push(r.config.clone());
                if r.live.held() {
                    held.insert(n.clone());
                }
            }
            (configs, handles, held)
        };
        *self.broken() = broken;
        *self.unstartable_lock() = unstartable;
        for c in &stopping {
            let (tenant, name) = (&c.tenant, &c.name);
            if let Some(new) = wanted.get(name) {
                let reshaped = match (&c.oneroster, &new.oneroster) {
                    (Some(old), Some(new)) => old.reshaped(new),
                    _ => vec![],
                };
                let new_target = match (&c.oneroster, &new.oneroster) {
                    (Some(old), Some(new)) => (old.base_url.trim_end_matches('/')
                        != new.base_url.trim_end_matches('/'))
                    .then(|| (old.base_url.clone(), new.base_url.clone())),
                    _ => None,
                };
                if let Some((from, to)) = new_target {
                    // Its cursor and what it recorded as delivered are the old target's:
                    // the new one gets only later changes, and a plain reconciliation,
                    // comparing with what was delivered, finds nothing to send.
                    tracing::warn!(%tenant, connector = %name, %from, %to, "Stopping connector to start it again: its file points it at another target. It goes on from its cursor, so the new target gets only the changes from now on: run `rosterd reconcile --tenant {tenant} --connector {name} --full` to send it everything.");
                } else if held.contains(name) && new.guard != c.guard {
                    // Started again, it counts by the new table: a higher limit, or none,
                    // lets go what the old one held, with no resume.
                    tracing::warn!(%tenant, connector = %name, "Stopping connector to start it again: its file changed its [guard] while it held changes. It holds again only if the new [guard] would; otherwise the held changes go out now.");
                } else if reshaped.is_empty() {
                    tracing::info!(%tenant, connector = %name, "Stopping connector to start it again: its file changed.");
                    // Files it no longer writes stay as they were: a consumer still
                    // reading them reads a roster that stopped moving.
                    if let (Some(old), Some(new)) = (c.csv.clone(), new.csv.clone()) {
                        // Off the runtime: a directory on a hung mount.
                        let left: Vec<String> = tokio::task::spawn_blocking(move || {
                            let kept = new.files();
                            old.files()
                                .into_iter()
                                .filter(|f| !kept.contains(f) && f.exists())
                                .map(|f| f.display().to_string())
                                .collect()
                        })
                        .await
                        .unwrap_or_default();
                        if !left.is_empty() {
                            tracing::warn!(%tenant, connector = %name, files = %left.join(", "), "The connector no longer writes these files; they stay as they were, and stop following the roster. Remove them once nothing reads them.");
                        }
                    }
                } else {
                    tracing::warn!(%tenant, connector = %name, keys = %reshaped.join(", "), "Stopping connector to start it again: its file changes what it sends for objects the target already has, which stay as they are until a reconciliation: run `rosterd reconcile --tenant {tenant} --connector {name}` (or wait for the scheduled one).");
                }
                continue;
            }
            // Said once it has stopped (below), with what it left behind.
        }
        futures_util::future::join_all(handles).await;
        {
            let mut running = self.running();
            for c in &stopping {
                // Read once it has stopped, with what it finished while stopping.
                if let Some(r) = running.remove(&c.name) {
                    let mut counted = self.counted.lock().unwrap_or_else(|e| e.into_inner());
                    counted.insert((c.tenant.clone(), c.name.clone()), r.live.counts());
                }
            }
        }
        // A CSV connector whose `[csv.oneroster]` changed writes its files again in the
        // new shape when it starts, not at the next change of the roster, which may be
        // hours away (a scheduled one at its time, as its consumer expects). Marked once
        // the old task has stopped, which could otherwise clear the mark with a write of
        // its own.
        for c in &stopping {
            let Some(new) = wanted.get(&c.name) else {
                continue;
            };
            if let (Some(old), Some(now)) = (&c.csv, &new.csv)
                && old.oneroster != now.oneroster
                && now.schedule.is_none()
                && new.enabled
            {
                match self
                    .store
                    .mark_write_due(&new.tenant, &super::ctx::cursor_name(new))
                    .await
                {
                    Ok(()) => {
                        tracing::info!(tenant = %new.tenant, connector = %new.name, "The connector's [csv.oneroster] changed: it writes its files again now.")
                    }
                    Err(e) => {
                        tracing::error!(tenant = %new.tenant, connector = %new.name, error = %e, "Cannot mark the connector's files to be written again; they change at the roster's next change.")
                    }
                }
            }
        }
        // A changed file may be the fix (a new credential, another URL): its connector
        // starts sending again. A removed one leaves nothing to pause.
        for c in &stopping {
            match self.store.refusal_pause(&c.tenant, &c.name) {
                Ok(None) => {}
                Ok(Some(_)) => match self.store.set_refusal_pause(&c.tenant, &c.name, None).await {
                    Ok(()) => {
                        tracing::info!(tenant = %c.tenant, connector = %c.name, "The connector's pause for its target's refusals ends with the change of its file.")
                    }
                    Err(e) => {
                        tracing::error!(tenant = %c.tenant, connector = %c.name, error = %e, "Cannot end the connector's pause for refusals in the store; it starts paused.")
                    }
                },
                Err(e) => {
                    tracing::error!(tenant = %c.tenant, connector = %c.name, error = %e, "Cannot read whether the connector was paused for refusals.")
                }
            }
        }
        for c in stopping.iter().filter(|c| !wanted.contains_key(&c.name)) {
            let (tenant, name) = (&c.tenant, &c.name);
            counters::connector_removed(tenant, name);
            if !nameless.is_empty() {
                let files: Vec<String> = nameless.iter().map(|f| f.display().to_string()).collect();
                tracing::warn!(
                    %tenant,
                    connector = %name,
                    file = %c.file.display(),
                    unreadable = %files.join(", "),
                    "Connector stopped, not retired: its file is gone, and a file in the directory does not read far enough to say which connector it is, so it could be this one's, renamed. Its cursor keeps holding its changes, and /status lists it under unloaded_connectors. Fix that file (the connector runs again if it names it), or remove it and retire the connector with `rosterd retire --tenant {tenant} {name}`."
                );
                continue;
            }
            if let Err(e) = self.store.set_retired(tenant, name, true).await {
                tracing::error!(%tenant, connector = %name, error = %e, "Cannot record the connector as retired; its cursor keeps holding back compaction.");
                continue;
            }
            // At WARN with the counts, as `rosterd retire` says it: a file removed by
            // mistake (an editor's rename, `mv x.toml x.toml.bak`) got an INFO line, and
            // nothing afterwards showed the changes compaction would drop, nor the dead
            // letters (refused requests, personal data) left in the store.
            let undelivered = self.undelivered(tenant, name);
            let dead_letters = self.store.dead_letter_count(tenant, name).unwrap_or(0);
            // Renamed in place: the same file now names another connector, which starts
            // on a cursor of its own (from the oldest change the log holds, for a new
            // name); the operator should hear that, not that the file went away.
            let kept = match dead_letters {
                0 => String::new(),
                n => format!(
                    " Its {n} dead letter(s) stay in the store until discarded (`rosterd dead-letters --tenant {tenant} list {name}`, then `discard {name} --all`)."
                ),
            };
            let why = match wanted.values().find(|w| w.file == c.file) {
                Some(renamed) => format!(
                    "its file now names another connector, {}, which keeps its own cursor, dead letters and delivered hashes (a new name starts from the oldest change the log holds)",
                    renamed.name
                ),
                None => "its file is no longer in the connectors directory".to_owned(),
            };
            tracing::warn!(
                %tenant,
                connector = %name,
                file = %c.file.display(),
                undelivered,
                dead_letters,
                "Connector retired: {why}. Its cursor no longer holds back change-log compaction, which may now drop the {undelivered} change(s) it never delivered.{kept} A file with its name resumes it from its cursor."
            );
        }
        // Only pauses that wait for the operator (preflight refused, 410 Gone): a pause
        // for repeated failures ends by itself and then probes the target anyway.
        for r in self.running().values() {
            // A hold waits for the operator's word, which a reload for another reason
            // is not.
            if r.ctx.is_some()
                && !r.live.held()
                && r.live.health().pause == Some(Pause::UntilResumed)
            {
                r.live.resume("a reload");
            }
            // An operator who reloaded to lift it hears why it stays.
            if let Some(pause) = r.live.refusal_pause() {
                tracing::info!(tenant = %r.config.tenant, connector = %r.config.name, since = %rfc3339(pause.at), "The connector stays paused for its target's refusals: a reload lifts that only when it changes the connector's file; `rosterd resume` lifts it.");
            }
        }
        for (name, config) in wanted {
            if self.running().contains_key(&name) {
                continue;
            }
            if self
                .store
                .retired(&config.tenant)
                .is_ok_and(|r| r.contains(&name))
                && let Err(e) = self.store.set_retired(&config.tenant, &name, false).await
            {
                tracing::error!(tenant = %config.tenant, connector = %name, error = %e, "Cannot clear the connector's retirement.");
            }
            let built = prepared
                .remove(&name)
                .unwrap_or_else(|| self.prepare(&config));
            let counts = self
                .counted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(config.tenant.clone(), name.clone()));
            let r = self.start(config, built);
            // Started again, a connector goes on counting where it was, as its metrics
            // do: status and the dashboards disagreed from the first reload on.
            if let Some(counts) = counts {
                r.live.count_on_from(counts);
            }
            self.running().insert(name, r);
        }
        // Said at every start and reload: otherwise the change log just grows, and only
        // /status shows why.
        for u in self.unloaded_status().iter().filter(|u| u.file.is_none()) {
            tracing::warn!(
                tenant = %u.tenant,
                connector = %u.name,
                lag_events = u.lag_events,
                "No connector file names this stored cursor, so it holds back change-log compaction. Put its file back, or if it is gone for good: rosterd retire --tenant {} {}",
                u.tenant,
                u.name
            );
        }
        self.set_errors(file_errors)
    }

    /// Refuse (take out of `wanted`) each connector that would write a file a connector
    /// in `broken` writes: that one keeps running on its previous config while its own
    /// file does not load, and keeps its files, as it does when its file loads
    /// (`connectors::refuse_shared_files`, which sees only the files that load). A
    /// newcomer was accepted, and two tenants' rosters took turns in one file. One already
    /// running keeps running on its previous config too. Returns the refusals, as
    /// (file, error).
    fn refuse_kept_files(
        &self,
        wanted: &mut BTreeMap<String, ConnectorConfig>,
        broken: &mut BTreeMap<String, String>,
    ) -> Vec<(std::path::PathBuf, String)> {
        let running = self.running();
        let kept: Vec<(std::path::PathBuf, &ConnectorConfig)> = broken
            .keys()
            .filter_map(|n| running.get(n))
            .flat_map(|r| {
                r.config
                    .csv
                    .iter()
                    .flat_map(crate::connectors::csv::CsvSettings::files)
                    .map(move |f| (f, &r.config))
            })
            .collect();
        let mut refused = Vec::new();
        wanted.retain(|name, c| {
            let Some((path, owner)) = c
                .csv
                .iter()
                .flat_map(crate::connectors::csv::CsvSettings::files)
                .find_map(|f| kept.iter().find(|(w, o)| *w == f && o.name != *name))
            else {
                return true;
            };
            let error = format!(
                "{}: key `csv.dir`: {} is written by connector {:?} ({}), which keeps running on its previous config while that file does not load; this file is not loaded; give each CSV connector its own file (another `dir` or `file_name`)",
                c.file.display(),
                path.display(),
                owner.name,
                owner.file.display()
            );
            tracing::error!(tenant = %c.tenant, connector = %name, %error, "Connector file not loaded: it would write another connector's file.");
            self.unloaded_lock().push(crate::connectors::Unloaded {
                file: c.file.clone(),
                tenant: Some(c.tenant.clone()),
                name: Some(name.clone()),
            });
            if running.contains_key(name) {
                broken.insert(name.clone(), error.clone());
            }
            refused.push((c.file.clone(), error));
            false
        });
        refused
    }

    /// Keep `file_errors` with the errors of connectors that cannot start for /status,
    /// and return them all. A connector not started stays so until its file changes or
    /// the daemon restarts, so every reload reports it again (and counts as failed), as
    /// it does a file that still does not load.
    fn set_errors(&self, mut errors: Vec<String>) -> Vec<String> {
        errors.extend(self.unstartable_lock().iter().map(|(_, e)| e.clone()));
        errors.extend(
            self.running()
                .values()
                .filter_map(|r| r.not_started.clone()),
        );
        *self.load_errors.lock().unwrap_or_else(|e| e.into_inner()) = errors.clone();
        errors
    }

    /// What `start` needs that can fail (the secrets, from the environment), checked
    /// before anything stops; `Ok(None)` for a disabled connector, which runs nothing.
    fn prepare(&self, config: &ConnectorConfig) -> Result<Option<Target>, StartError> {
        if !config.enabled {
            return Ok(None);
        }
        Target::build(config, &self.env).map(Some)
    }

    fn start(&self, config: ConnectorConfig, built: Result<Option<Target>, StartError>) -> Running {
        let cancel = self.shutdown.child_token();
        let target = match built {
            Ok(Some(t)) => t,
            Ok(None) => {
                return Running {
                    live: Live::new(&config.tenant, &config.name, "disabled"),
                    config,
                    ctx: None,
                    not_started: None,
                    cancel,
                    handle: None,
                };
            }
            Err(e) => {
                let reason = format!("not started: {}", e.explained());
                tracing::error!(tenant = %config.tenant, connector = %config.name, reason = reason.as_str(), "Connector not started.");
                let live = Live::new(&config.tenant, &config.name, &reason);
                // The state says what to do; `last error` is the error alone.
                live.health().error(e.to_string());
                return Running {
                    not_started: Some(format!(
                        "{}: connector {:?} {reason}",
                        config.file.display(),
                        config.name
                    )),
                    live,
                    config,
                    ctx: None,
                    cancel,
                    handle: None,
                };
            }
        };
        counters::register_connector_counters(
            &config.tenant,
            &config.name,
            config.kind == Kind::Webhook,
        );
        let live = Live::new(&config.tenant, &config.name, "starting");
        if config.kind != Kind::Csv
            && let Some(pause) = self
                .store
                .refusal_pause(&config.tenant, &config.name)
                .unwrap_or_else(|e| {
                    tracing::error!(tenant = %config.tenant, connector = %config.name, error = %e, "Cannot read whether the connector was paused for refusals; it starts unpaused.");
                    None
                })
        {
            live.restore_refusal_pause(pause);
        }
        let ctx = Arc::new(Ctx {
            store: self.store.clone(),
            client: self.client.clone(),
            slots: Semaphore::new(config.concurrency),
            start_gate: tokio::sync::Mutex::new(()),
            config: config.clone(),
            target,
            live: live.clone(),
            cancel: cancel.clone(),
            acked: Mutex::new(None),
            repairs: Repairs::default(),
            unsaved: Mutex::new(HashMap::new()),
        });
        let span = ctx.span();
        let task_ctx = ctx.clone();
        let handle = self.tasks.spawn(
            async move {
                tracing::info!(dry_run = task_ctx.config.dry_run, "Connector started.");
                if let Some(pause) = task_ctx.live.refusal_pause() {
                    tracing::warn!(since = %rfc3339(pause.at), reason = pause.why.as_str(), "The connector starts paused until resumed, as it was when it stopped: its target refused everything.");
                }
                let (live, cancel) = (task_ctx.live.clone(), task_ctx.cancel.clone());
                supervised(&live, &cancel, || {
                    let ctx = task_ctx.clone();
                    async move {
                        match ctx.target {
                            Target::Csv { .. } => run_csv(ctx.clone()).await,
                            _ => run_http(ctx.clone()).await,
                        }
                    }
                })
                .await;
            }
            .instrument(span),
        );
        Running {
            config,
            live,
            ctx: Some(ctx),
            not_started: None,
            cancel,
            handle: Some(handle),
        }
    }

    /// Stop every connector; cursors stay where the last acknowledged batch left them.
    pub async fn stop_all(&self) {
        for r in std::mem::take(&mut *self.running()).into_values() {
            r.cancel.cancel();
        }
        // Side by side (each may take STOP_DRAIN to finish what it started), and with
        // those a reload cut short by the stop was stopping.
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// The lowest cursor of the tenant's known connectors: running ones (enabled or not)
    /// and every stored cursor of a connector that is not loaded, for whatever reason
    /// (its file is broken, or missing since the last stop), unless it was retired by
    /// removing its file and reloading. The change log below it has been delivered
    /// everywhere it still has to go. `None` when nothing holds the log.
    pub fn lowest_cursor(&self, tenant: &str) -> Option<u64> {
        let mut running: Vec<u64> = Vec::new();
        for r in self
            .running()
            .values()
            .filter(|r| r.config.tenant == tenant)
        {
            running.push(
                self.store
                    .cursor(tenant, &cursor_name(&r.config))
                    .unwrap_or(0),
            );
            // A connector in dry run still owes its target what its real cursor has not
            // delivered: turned on to quiet a failing target, dry run let compaction drop
            // those changes, and the webhook events with them (a schedules audit lost
            // 21,841). A connector that never ran for real has no such cursor.
            if r.config.dry_run {
                match self.store.has_cursor(tenant, &r.config.name) {
                    Ok(false) => {}
                    Ok(true) => {
                        running.push(self.store.cursor(tenant, &r.config.name).unwrap_or(0))
                    }
                    Err(_) => return Some(0),
                }
            }
        }
        // A store error here must hold compaction back, not let it run free.
        let Ok(held) = self.held_cursors(tenant) else {
            return Some(0);
        };
        running
            .into_iter()
            .chain(held.into_iter().map(|h| h.cursor))
            .min()
    }

    /// The stored cursors of the tenant's connectors that are not loaded and not
    /// retired (or retired, and named again by a file that does not load), with the
    /// file that names them if there is one. A file whose name cannot be read could be
    /// any connector not retired.
    pub(super) fn held_cursors(&self, tenant: &str) -> Result<Vec<Held>, StoreError> {
        let running: Vec<String> = self
            .running()
            .values()
            .filter(|r| r.config.tenant == tenant)
            .map(|r| r.config.name.clone())
            .collect();
        let unloaded = self.unloaded();
        let retired = self.store.retired(tenant)?;
        let mut out = Vec::new();
        for (cursor_name, cursor) in self.store.cursors(tenant)? {
            let name = cursor_name
                .strip_suffix(".dry-run")
                .unwrap_or(&cursor_name)
                .to_owned();
            // A loaded connector governs both of its cursors.
            if running.contains(&name) {
                continue;
            }
            // A retired connector is held only by a file that names it: its file was
            // removed on purpose, and any file that cannot be read (a dangling link, a
            // directory) brought every retired connector back as "not loaded", blamed
            // on that file, with alerts on lag no one owes. Should its file come back,
            // the gap compaction left is reported then.
            let is_retired = retired.contains(&name);
            let file = unloaded
                .iter()
                .filter(|u| u.tenant.as_deref().is_none_or(|t| t == tenant))
                .find(|u| match u.name.as_deref() {
                    Some(n) => n == name,
                    None => !is_retired,
                })
                .map(|u| u.file.clone());
            if file.is_none() && is_retired {
                continue;
            }
            out.push(Held {
                cursor_name,
                name,
                file,
                cursor,
            });
        }
        Ok(out)
    }

    /// The connector files that did not load at the last start or reload, and those
    /// whose connector cannot start (not started, or kept on its previous config).
    pub fn failing_files(&self) -> Vec<String> {
        let mut files: Vec<String> = self
            .unloaded_lock()
            .iter()
            .map(|u| u.file.display().to_string())
            .collect();
        files.extend(
            self.unstartable_lock()
                .iter()
                .map(|(f, _)| f.display().to_string()),
        );
        files.extend(
            self.running()
                .values()
                .filter(|r| r.not_started.is_some())
                .map(|r| r.config.file.display().to_string()),
        );
        files
    }

    pub fn load_errors(&self) -> Vec<String> {
        self.load_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Status of every connector (of one tenant, if given).
    pub fn status(&self, tenant: Option<&str>) -> Vec<ConnectorStatus> {
        let snapshot: Vec<(ConnectorConfig, Arc<Live>, bool)> = self
            .running()
            .values()
            .filter(|r| tenant.is_none_or(|t| t == r.config.tenant))
            .map(|r| (r.config.clone(), r.live.clone(), r.not_started.is_some()))
            .collect();
        snapshot
            .into_iter()
            .map(|(c, live, not_started)| self.status_of(&c, &live, not_started))
            .collect()
    }

    /// Cursor, lag in changes and age of the oldest undelivered change of a cursor.
    /// Durable changes after `cursor`.
    fn lag_events(&self, tenant: &str, cursor: u64) -> u64 {
        let durable = *self.store.watch_durable(tenant).borrow();
        // A restore skips numbers no change has (store::restored).
        let skipped = self
            .store
            .skipped_between(tenant, cursor, durable)
            .unwrap_or(0);
        durable.saturating_sub(cursor).saturating_sub(skipped)
    }

    pub(super) fn lag(&self, tenant: &str, cursor_name: &str) -> (u64, u64, f64) {
        let cursor = self.store.cursor(tenant, cursor_name).unwrap_or(0);
        // Changes the target acknowledged past one still in flight are not behind: one
        // object's failure held the cursor, and an audit read "lag 11" with 10 of the 11
        // delivered.
        let acked = self
            .store
            .acked_above(tenant, cursor_name)
            .map(|a| a.iter().filter(|&&s| s > cursor).count() as u64)
            .unwrap_or(0);
        let lag_events = self.lag_events(tenant, cursor).saturating_sub(acked);
        let lag_seconds = if lag_events > 0 {
            self.store
                .changes(tenant, cursor, 1)
                .ok()
                .and_then(|e| e.first().map(|e| e.at))
                .map(|at| (Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0)
                .unwrap_or(0.0)
        } else {
            0.0
        };
        (cursor, lag_events, lag_seconds)
    }

    /// Connectors that are not loaded but whose stored cursor holds back compaction
    /// (their file is broken, or was missing at the start), with its lag: they are not
    /// delivering, and their lag is what alerts should see.
    pub fn unloaded_status(&self) -> Vec<UnloadedStatus> {
        let mut out = Vec::new();
        for tenant in &self.tenants {
            let Ok(mut held) = self.held_cursors(tenant) else {
                continue;
            };
            // One entry a connector: one that was ever in dry run has a cursor for it
            // too, and was listed twice, with two lags (an audit's `2 NOT LOADED (t1/dr,
            // t1/dr)`). Its real cursor's lag is what its target is owed; both still
            // hold back compaction (see `lowest_cursor`).
            held.sort_by(|a, b| {
                (&a.name, a.cursor_name != a.name).cmp(&(&b.name, b.cursor_name != b.name))
            });
            held.dedup_by(|later, first| later.name == first.name);
            for h in held {
                let (cursor, lag_events, lag_seconds) = self.lag(tenant, &h.cursor_name);
                out.push(UnloadedStatus {
                    dead_letters: self.store.dead_letter_count(tenant, &h.name).unwrap_or(0),
                    file: h.file.map(|f| f.display().to_string()),
                    name: h.name,
                    tenant: tenant.clone(),
                    cursor,
                    lag_events,
                    lag_seconds,
                });
            }
        }
        out
    }

    pub(super) fn status_of(
        &self,
        c: &ConnectorConfig,
        live: &Live,
        not_started: bool,
    ) -> ConnectorStatus {
        let (cursor, lag_events, lag_seconds) = self.lag(&c.tenant, &cursor_name(c));
        // Read once: `paused` and `held_by_guard` from one look at the hold.
        let held_by_guard = live.held_reason().clone();
        let paused_until = if held_by_guard.is_some() {
            Some(DateTime::<Utc>::MAX_UTC)
        } else {
            live.paused_until()
        };
        let h = live.health();
        ConnectorStatus {
            name: c.name.clone(),
            tenant: c.tenant.clone(),
            kind: c.kind.as_str(),
            file: c.file.display().to_string(),
            file_error: self.broken().get(&c.name).cloned(),
            enabled: c.enabled,
            dry_run: c.dry_run,
            state: h.state.clone(),
            cursor,
            lag_events,
            lag_seconds,
            last_success_at: h.last_success_at,
            last_error: h.last_error.clone(),
            last_error_at: h.last_error_at,
            last_answer: h.last_answer.clone(),
            paused: paused_until.is_some(),
            paused_until: paused_until.filter(|u| *u != DateTime::<Utc>::MAX_UTC),
            held_by_guard,
            // While paused the pause's end is the next attempt; `paused_until` says it.
            next_retry_at: h
                .next_retry
                .and_then(Deadline::wall)
                .filter(|_| paused_until.is_none()),
            next_write_at: h.next_write_at,
            dead_letters: self
                .store
                .dead_letter_count(&c.tenant, &c.name)
                .unwrap_or(0),
            delivered: live.delivered.load(Ordering::Relaxed),
            retries: live.retries.load(Ordering::Relaxed),
            not_started,
        }
    }
}
