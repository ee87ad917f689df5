//! Downstream connectors: what each target is (its drop-in TOML file, [`ConnectorConfig`])
//! and how a change becomes requests to it (`oneroster`, `webhook`, `csv`). Sending,
//! retrying, ordering and cursors are the dispatch stage's business (`crate::dispatch`);
//! a connector here only describes requests and how to authorize them.
//!
//! Every file in the connectors directory ending in `.toml` is one target. A file that
//! does not parse is reported by file name and key, and the others still load, so one
//! typo cannot stop the mirror to every other target.

pub mod csv;
pub mod http;
pub mod oneroster;
pub mod webhook;

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Namespace of the UUIDv5 sourcedIds rosterd sends downstream. Fixed forever: changing
/// it would make every target see a second copy of every object.
const SOURCED_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6f1c_2b1e_8a43_4d3e_9b7e_52a1_0c0d_e5f1);

/// The sourcedId of a rosterd object downstream: a UUIDv5 of tenant and local key, so it
/// is stable across restarts and carries no personal data.
pub fn sourced_id(tenant: &str, key: &str) -> String {
    sourced_uuid(tenant, key).to_string()
}

/// [`sourced_id`] as the UUID it is.
pub fn sourced_uuid(tenant: &str, key: &str) -> uuid::Uuid {
    uuid::Uuid::new_v5(&SOURCED_ID_NAMESPACE, format!("{tenant}/{key}").as_bytes())
}

/// A planned delivery: stages run one after another, the requests of a stage at once.
#[derive(Debug, Default)]
pub struct Plan {
    pub stages: Vec<Vec<http::Request>>,
    /// Content hash per object key after delivery (`None`: removed downstream).
    pub hashes: Vec<(String, Option<u64>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("{file}: {message}")]
    Invalid { file: PathBuf, message: String },
    #[error("cannot read {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the connectors directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Oneroster,
    Webhook,
    Csv,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Oneroster => "oneroster",
            Kind::Webhook => "webhook",
            Kind::Csv => "csv",
        }
    }
}

/// One drop-in file: the settings every connector has, and the section of its kind.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConnectorConfig {
    pub kind: Kind,
    /// Unique across the directory; the connector's cursor and dead letters are kept
    /// under it, so renaming a connector starts it over.
    pub name: String,
    pub tenant: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Log what would be sent instead of sending. A dry run keeps a cursor of its own, so
    /// turning it off later sends everything for real.
    #[serde(default)]
    pub dry_run: bool,
    /// Requests in flight at once (order per object is kept whatever this is). A
    /// reconciliation's re-sends count apart, up to as many again.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Per-request timeout.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub retry: RetryConfig,
    /// Hold the connector when many users leave the roster at once.
    #[serde(default)]
    pub guard: Option<GuardConfig>,
    #[serde(default)]
    pub oneroster: Option<oneroster::OneRosterSettings>,
    #[serde(default)]
    pub webhook: Option<webhook::WebhookSettings>,
    #[serde(default)]
    pub csv: Option<csv::CsvSettings>,
    /// The file it came from.
    #[serde(skip)]
    pub file: PathBuf,
    /// What the file says that runs but is probably not what was meant (see
    /// [`ConnectorConfig::warnings`]), found as it was read.
    #[serde(skip)]
    read_warnings: Vec<String>,
}

/// `[guard]`: hold the connector when the roster loses many users at once. An identity
/// provider deprovisions a whole tenant after a scoping change or a removed assignment
/// as readily as one leaver, and the mirror would pass it on within a second (an audit
/// measured 0.6 s for 60 users), deleting at targets what took years to build. Held, the
/// connector sends nothing more until an operator resumes it; its changes wait, in order.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GuardConfig {
    /// More than this many users deactivated or deleted...
    #[serde(default)]
    pub users: Option<u64>,
    /// ...or more than this many group memberships ended while their users stay (a
    /// group emptied or deleted: a OneRoster target loses the class's enrollments)...
    #[serde(default)]
    pub memberships: Option<u64>,
    /// ...within this many minutes, by the times the changes were made, holds it.
    pub minutes: u64,
}

/// `[retry]`: how a connector waits out a target that is down or rate-limiting.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// First backoff delay; each retry doubles it, with jitter, up to `max_delay_ms`.
    pub initial_delay_ms: u64,
    pub max_delay_ms: u64,
    /// After this many failures in a row the connector pauses. Requests failing while
    /// in flight together count once (one round), so a blip under high `concurrency`
    /// does not pause it.
    pub pause_after_failures: u64,
    /// How long a paused connector waits before it probes the target again.
    pub pause_secs: u64,
    /// After the target refuses this many requests in a row (their changes set aside as
    /// dead letters) and takes no change whole between them, the connector pauses until
    /// resumed; 0 never. A target that refuses everything is misconfigured (a revoked
    /// permission answers 403 to every object, a changed schema 422), and left running the
    /// connector would turn the whole log into dead letters for the operator to replay
    /// one by one, and grow the store by each one's request and answer.
    pub pause_after_refusals: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_delay_ms: 200,
            max_delay_ms: 60_000,
            pause_after_failures: 20,
            pause_secs: 60,
            pause_after_refusals: 100,
        }
    }
}

impl RetryConfig {
    pub fn initial_delay(&self) -> Duration {
        Duration::from_millis(self.initial_delay_ms)
    }
    pub fn max_delay(&self) -> Duration {
        Duration::from_millis(self.max_delay_ms)
    }
    pub fn pause(&self) -> Duration {
        Duration::from_secs(self.pause_secs)
    }
}

fn yes() -> bool {
    true
}

fn default_concurrency() -> usize {
    16
}

fn default_timeout_ms() -> u64 {
    10_000
}

impl ConnectorConfig {
    /// What the file says that runs but is probably not what was meant: `check-config`
    /// prints these, and a start or reload logs them at WARN.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = self.read_warnings.clone();
        if let Some(w) = &self.webhook
            && !w.events.is_empty()
        {
            let takes = |t: &str| w.events.iter().any(|e| e == t);
            // A cleared override goes out as the assignment that follows it.
            if takes("roster.archetype_overridden") && !takes("roster.archetype_assigned") {
                out.push("`events` takes roster.archetype_overridden but not roster.archetype_assigned, which is what a cleared override sends (the assignment the user falls back to): the receiver would keep the override for good".into());
            }
            if takes("roster.user_deactivated")
                && let Some(missing) = ["roster.user_reactivated", "roster.user_deleted"]
                    .into_iter()
                    .find(|t| !takes(t))
            {
                out.push(format!("`events` takes roster.user_deactivated but not {missing}: the receiver would not hear that a leaver came back, or was deleted outright (an IdP may DELETE without deactivating first)"));
            }
        }
        // The example's relative `dir`, copied into /etc/rosterd/connectors as the install
        // steps do, lands here. Checked by the path, not by a write: as root, or outside
        // the unit, the directory is writable, and the service alone finds out, by
        // retrying, then pausing.
        if let Some(c) = &self.csv
            && let Some(top) = ["/etc", "/usr"]
                .into_iter()
                .find(|top| c.dir.starts_with(top))
        {
            out.push(format!(
                "[csv] dir is {} (a relative dir is under the connectors directory): under the systemd unit, {top} is read-only (ProtectSystem=strict), and the connector would retry, then pause. Use a directory in /var/lib/rosterd-exports, which the unit makes, or one a drop-in's ReadWritePaths= opens",
                c.dir.display()
            ));
        }
        out
    }

    /// Parse one drop-in file's text; `base_dir` resolves relative paths in it.
    /// The archetype ids its OneRoster `roles` map (REST or CSV bundle) that are not
    /// among `archetypes` (its tenant's bundle): such a key maps only users whose manual
    /// override still holds the id, and a typo in it gives the users meant `default_role`
    /// without a word.
    pub fn unmapped_roles(&self, archetypes: &[&str]) -> Vec<&str> {
        let rest = self.oneroster.iter().flat_map(|o| o.roles.keys());
        let csv = self
            .csv
            .iter()
            .filter_map(|c| c.oneroster.as_ref())
            .flat_map(|o| o.roles.keys());
        rest.chain(csv)
            .map(String::as_str)
            .filter(|id| !archetypes.contains(id))
            .collect()
    }

    pub fn parse(text: &str, file: &Path, base_dir: &Path) -> Result<Self, ConnectorError> {
        let invalid = |message: String| ConnectorError::Invalid {
            file: file.to_owned(),
            message,
        };
        let mut c: ConnectorConfig = toml::from_str(text)
            .map_err(|e| invalid(crate::config::masked_toml_error(&e.to_string(), text)))?;
        c.file = file.to_owned();
        c.validate().map_err(invalid)?;
        // The file key by key, for what a CSV connector is given and does not use.
        let table = (c.kind == Kind::Csv || c.csv.is_some())
            .then(|| text.parse::<toml::Table>().ok())
            .flatten();
        // Taken and never used, they would read as settings in force.
        if c.kind == Kind::Csv
            && let Some(table) = &table
            && let Some(key) = ["concurrency", "timeout_ms"]
                .into_iter()
                .find(|k| table.contains_key(*k))
                .or_else(|| {
                    table
                        .get("retry")
                        .and_then(toml::Value::as_table)
                        .is_some_and(|r| r.contains_key("pause_after_refusals"))
                        .then_some("retry.pause_after_refusals")
                })
        {
            return Err(invalid(format!(
                "key `{key}`: a CSV connector sends no requests (it writes files, one write at a time); remove it"
            )));
        }
        if c.csv.as_ref().is_some_and(|s| s.schedule.is_some())
            && let Some(table) = &table
            && table
                .get("csv")
                .and_then(toml::Value::as_table)
                .is_some_and(|t| t.contains_key("debounce_ms"))
        {
            c.read_warnings.push("[csv] has both `schedule` and `debounce_ms`: the files are written on the schedule only, and `debounce_ms` is not used".into());
        }
        if let Some(csv) = &mut c.csv {
            // Empty, it would be the connectors directory (below), and said as such.
            if csv.dir.as_os_str().is_empty() {
                return Err(invalid(
                    "key `csv.dir`: empty; name the directory the files are written to".into(),
                ));
            }
            if csv.dir.is_relative() {
                csv.dir = base_dir.join(&csv.dir);
            }
            // The roster there would be read as a connector file at every reload when
            // its name ends in `.toml`, and lie among the config (under the unit,
            // /etc/rosterd) either way. (A directory below it is no connector file.)
            if csv.written_in(base_dir) {
                return Err(invalid(format!(
                    "key `csv.dir`: {} is the connectors directory; write the files elsewhere",
                    csv.dir.display()
                )));
            }
        }
        Ok(c)
    }

    fn validate(&self) -> Result<(), String> {
        if !is_connector_name(&self.name) {
            return Err(format!(
                "key `name`: {:?} must be 1-64 letters, digits, '-' or '_'",
                self.name
            ));
        }
        if self.concurrency == 0 || self.concurrency > 1024 {
            return Err("key `concurrency`: must be between 1 and 1024".into());
        }
        // Upper bounds too: a delay past what a clock can add (u64::MAX ms) made every
        // retry panic, and nobody means a request timeout of more than an hour, a retry
        // delay of more than a day or a pause of more than a week.
        const HOUR_MS: u64 = 3_600_000;
        const MAX_DELAY_MS: u64 = 24 * HOUR_MS;
        const MAX_PAUSE_SECS: u64 = 7 * 24 * 3600;
        if self.timeout_ms == 0 || self.timeout_ms > HOUR_MS {
            return Err(format!(
                "key `timeout_ms`: must be between 1 and {HOUR_MS} (an hour)"
            ));
        }
        if self.retry.initial_delay_ms == 0 || self.retry.max_delay_ms < self.retry.initial_delay_ms
        {
            return Err(
                "keys `retry.initial_delay_ms`/`retry.max_delay_ms`: need 0 < initial <= max"
                    .into(),
            );
        }
        if self.retry.max_delay_ms > MAX_DELAY_MS {
            return Err(format!(
                "key `retry.max_delay_ms`: must be at most {MAX_DELAY_MS} (a day)"
            ));
        }
        // A pause of 0 s probed the target again at once: the hammering a pause is for
        // stopping, with the connector shown as paused all the while.
        if !(1..=MAX_PAUSE_SECS).contains(&self.retry.pause_secs) {
            return Err(format!(
                "key `retry.pause_secs`: must be 1 to {MAX_PAUSE_SECS} (a second to a week)"
            ));
        }
        if self.retry.pause_after_failures == 0 {
            return Err("key `retry.pause_after_failures`: must be positive".into());
        }
        if let Some(g) = &self.guard {
            const WEEK_MINUTES: u64 = 7 * 24 * 60;
            if g.users.is_none() && g.memberships.is_none() {
                return Err(
                    "table `[guard]`: needs `users`, `memberships` or both (leave the table out for no guard)"
                        .into(),
                );
            }
            for (key, limit) in [("users", g.users), ("memberships", g.memberships)] {
                if limit == Some(0) {
                    return Err(format!("key `guard.{key}`: must be positive"));
                }
            }
            if g.minutes == 0 || g.minutes > WEEK_MINUTES {
                return Err(format!(
                    "key `guard.minutes`: must be between 1 and {WEEK_MINUTES} (a week)"
                ));
            }
        }
        let sections = [
            (Kind::Oneroster, self.oneroster.is_some()),
            (Kind::Webhook, self.webhook.is_some()),
            (Kind::Csv, self.csv.is_some()),
        ];
        if sections
            .iter()
            .any(|(k, present)| *k == self.kind && !present)
        {
            return Err(format!(
                "kind = \"{0}\" needs a [{0}] section",
                self.kind.as_str()
            ));
        }
        for (kind, present) in sections {
            if kind != self.kind && present {
                return Err(format!(
                    "section [{}] does not belong in a connector of kind \"{}\"",
                    kind.as_str(),
                    self.kind.as_str()
                ));
            }
        }
        if let Some(o) = &self.oneroster {
            o.validate().map_err(|e| format!("[oneroster] {e}"))?;
        }
        if let Some(w) = &self.webhook {
            w.validate().map_err(|e| format!("[webhook] {e}"))?;
        }
        if let Some(c) = &self.csv {
            c.validate().map_err(|e| format!("[csv] {e}"))?;
        }
        Ok(())
    }
}

/// What loading a connectors directory found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub connectors: Vec<ConnectorConfig>,
    pub errors: Vec<ConnectorError>,
    /// The files behind `errors`, with what could still be read of them.
    pub unloaded: Vec<Unloaded>,
    /// The directory itself could not be listed (`errors` says why): nothing can be
    /// told about any file, so a reload must not take it for "every file was removed".
    pub dir_unreadable: bool,
    /// The directory listed, and which one it was (through links). One in which no
    /// connector loads and that is another than last time is a volume not mounted or a
    /// link pointed elsewhere, which a reload does not take for the removal of every
    /// file.
    pub listed: Option<(PathBuf, Option<DirIdentity>)>,
}

/// A directory's device, inode and birth time: `rm -rf dir; mkdir dir` gets the same
/// inode number back on ext4, and only the birth time tells the new one apart.
pub type DirIdentity = (u64, u64, Option<std::time::SystemTime>);

/// A connector file that exists but did not load. Its connector is still known: its
/// cursor holds back change-log compaction until the file is fixed or removed, so
/// fixing it does not skip the changes made meanwhile.
#[derive(Debug, Clone, PartialEq)]
pub struct Unloaded {
    pub file: PathBuf,
    /// `tenant` and `name` as the file gives them, if it is TOML with those keys as
    /// strings; `None` means it could be any connector (of any tenant).
    pub tenant: Option<String>,
    pub name: Option<String>,
}

impl Loaded {
    /// Refuse every CSV connector whose files would be written inside `dir` (the store's
    /// data directory), as a file with an invalid key is: a start refuses a data
    /// directory holding anything but the store, so the next restart would not come up.
    pub fn refuse_csv_inside(&mut self, dir: &Path, what: &str) {
        self.refuse_csv(|csv| {
            csv.written_inside(dir).then(|| {
                format!(
                    "key `csv.dir`: {} is inside {what} {}; write the files elsewhere",
                    csv.dir.display(),
                    dir.display()
                )
            })
        });
    }

    /// Refuse every CSV connector that would write over one of `read`: the config file,
    /// a bundle, a key file. One did: `file_name = "demo.toml"` beside the bundle replaced
    /// the bundle with the roster, and the next start refused the file it left.
    pub fn refuse_csv_over(&mut self, read: &[PathBuf]) {
        self.refuse_csv(|csv| {
            csv.writes_over(read).map(|file| {
                format!(
                    "keys `csv.dir`/`csv.file_name`: the connector would write over {}, which rosterd reads; write the files elsewhere",
                    file.display()
                )
            })
        });
    }

    /// Refuse, as a file with an invalid key is, every CSV connector `refused` has a
    /// reason for.
    fn refuse_csv(&mut self, refused: impl Fn(&csv::CsvSettings) -> Option<String>) {
        let mut kept = Vec::with_capacity(self.connectors.len());
        for c in std::mem::take(&mut self.connectors) {
            let Some(message) = c.csv.as_ref().and_then(&refused) else {
                kept.push(c);
                continue;
            };
            self.errors.push(ConnectorError::Invalid {
                file: c.file.clone(),
                message,
            });
            self.unloaded.push(Unloaded {
                file: c.file.clone(),
                tenant: Some(c.tenant.clone()),
                name: Some(c.name.clone()),
            });
        }
        self.connectors = kept;
    }
}

impl Unloaded {
    fn of(file: &Path, text: Option<&str>) -> Unloaded {
        let table = text.and_then(|t| toml::from_str::<toml::Table>(t).ok());
        let key = |k: &str| {
            table
                .as_ref()
                .and_then(|t| t.get(k))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        Unloaded {
            file: file.to_owned(),
            tenant: key("tenant"),
            name: key("name"),
        }
    }
}

/// A connector's file: `*.toml` in any letter case (`HOOK.TOML` is what its writer meant),
/// but not a hidden file. Editors leave those beside the file being edited (emacs's
/// `.#hook.toml` lock, a `.hook.toml` copy), and one would claim the connector's name.
/// A name that is not UTF-8 (`caf\xe9.toml`, written under a Latin-1 locale) counts too:
/// skipped, it loaded without a word, and renaming a running connector's file so retired
/// it as if removed.
fn is_connector_file(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    path.file_name().map(|n| n.as_bytes()).is_some_and(|n| {
        !n.starts_with(b".") && n.len() > 5 && {
            let (_, ext) = n.split_at(n.len() - 5);
            ext.eq_ignore_ascii_case(b".toml")
        }
    })
}

/// The names of the files in `dir` that are not read as connector files, but for the
/// `*.example` ones shipped beside them, hidden ones and editors' backups (`…~`), in
/// name order: what `check-config` points out (`hr.tml`, a `README`).
pub fn skipped_files(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
        .map(|e| e.path())
        .filter(|p| !is_connector_file(p))
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| !n.starts_with('.') && !n.ends_with(".example") && !n.ends_with('~'))
        .collect();
    out.sort();
    out
}

/// Load every `*.toml` file of `dir`, in file-name order. A directory that cannot be
/// listed (missing included) is an error with `dir_unreadable` set; whether a missing
/// one is acceptable is the config's call. Files naming an unknown tenant, or a name
/// already taken, are errors.
pub fn load_dir(dir: &Path, tenants: &[&str]) -> Loaded {
    load_dir_keeping(dir, tenants, Some(&[]), &BTreeMap::new())
}

/// [`load_dir`] for a reload: when files share a `name`, the file of the connector
/// already running under it (`running`: name → file) keeps it, whatever the sort order
/// says. Otherwise a copy made to edit a variant (`dup.toml` sorting before
/// `webhook.toml`) would take over the running connector's cursor and dead letters.
/// `added`: tenants config.toml has gained since the start, which a connector may name
/// but that are served only after a restart; its error says so. `None` when config.toml
/// as it is now does not load, so that a tenant just added there is not seen either.
pub fn load_dir_keeping(
    dir: &Path,
    tenants: &[&str],
    added: Option<&[&str]>,
    running: &BTreeMap<String, PathBuf>,
) -> Loaded {
    use std::os::unix::fs::MetadataExt as _;
    let identity = std::fs::metadata(dir)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.created().ok()));
    let mut out = Loaded::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(source) => {
            out.dir_unreadable = true;
            out.errors.push(ConnectorError::Dir {
                dir: dir.to_owned(),
                source,
            });
            return out;
        }
    };
    out.listed = Some((dir.to_owned(), identity));
    // Whatever stands under a connector's file name counts, a directory, pipe or broken
    // link too: skipping it would read as the file's removal, which retires a running
    // connector and lets compaction drop the changes it still owes. It fails to read
    // instead, and the connector keeps running.
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_connector_file(p))
        .collect();
    files.sort();
    let mut parsed = Vec::with_capacity(files.len());
    let mut unreadable = Vec::new();
    for file in files {
        let text = match crate::config::read_text(&file, crate::config::FileKind::Connector) {
            Ok(t) => t,
            Err(source) => {
                out.unloaded.push(Unloaded::of(&file, None));
                unreadable.push(file.clone());
                out.errors.push(ConnectorError::Read { file, source });
                continue;
            }
        };
        let c = ConnectorConfig::parse(&text, &file, dir).and_then(|c| {
            if !tenants.contains(&c.tenant.as_str()) {
                let message = match added {
                    Some(added) if added.contains(&c.tenant.as_str()) => format!(
                        "key `tenant`: tenant {:?} was added to config.toml after rosterd started; it is served, and its connectors run, after a restart",
                        c.tenant
                    ),
                    Some(_) => format!("key `tenant`: no tenant {:?} in config.toml", c.tenant),
                    // A tenant added in a file that does not load would otherwise be said
                    // to be missing from it.
                    None => format!(
                        "key `tenant`: no tenant {:?} among those rosterd serves, and config.toml does not load as it is now, so a tenant added there is not seen (`rosterd check-config` says why); once it loads, a tenant added to it is served, and its connectors run, after a restart",
                        c.tenant
                    ),
                };
                return Err(ConnectorError::Invalid {
                    file: file.clone(),
                    message,
                });
            }
            Ok(c)
        });
        parsed.push((file, text, c));
    }
    // Who keeps each name: the running connector's file if it still claims it, else the
    // one file that claims it. Several new claimants are ambiguous, and none loads: were
    // the first in sort order to win, a copy made to edit a variant would take over the
    // connector's cursor at the next start (with its own URL and secret).
    // A running connector's file that is there but does not load (a typo mid-edit) still
    // holds the name: what it claims now is unknown, and handing its cursor to another
    // claimant would send the tenant's changes to that file's URL.
    // One that cannot be read at all (its mode changed, a dangling link) holds it too:
    // it lost the name to another file claiming it, cursor and dead letters with it.
    let mut claims: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let mut broken: Vec<PathBuf> = unreadable;
    for (file, _, c) in &parsed {
        match c {
            Ok(c) => claims.entry(c.name.clone()).or_default().push(file.clone()),
            Err(_) => broken.push(file.clone()),
        }
    }
    for (file, text, c) in parsed {
        let c = c.and_then(|c| {
            let claimants = &claims[&c.name];
            let runs_here = running
                .get(&c.name)
                .filter(|f| claimants.contains(f) || broken.contains(f));
            let others = || -> String {
                claimants
                    .iter()
                    .filter(|f| **f != file)
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let message = match runs_here {
                Some(kept_by) if *kept_by == file => return Ok(c),
                Some(kept_by) => format!(
                    "key `name`: {:?} is already used by {}, which runs it{}; this file is not loaded",
                    c.name,
                    kept_by.display(),
                    if broken.contains(kept_by) {
                        " as last loaded (that file does not load now)"
                    } else {
                        ""
                    }
                ),
                None if claimants.len() == 1 => return Ok(c),
                None => format!(
                    "key `name`: {:?} is also claimed by {}; no connector runs under this name until only one file claims it",
                    c.name,
                    others()
                ),
            };
            Err(ConnectorError::Invalid {
                message,
                file: file.clone(),
            })
        });
        match c {
            Ok(c) => out.connectors.push(c),
            Err(e) => {
                out.unloaded.push(Unloaded::of(&file, Some(&text)));
                out.errors.push(e);
            }
        }
    }
    refuse_shared_files(&mut out, running);
    out
}

/// Two CSV connectors that write one file overwrite each other's, and one tenant's
/// roster lands in the file another tenant's consumer reads, with nothing said. As for a
/// name, the running connector keeps its files and a new claimant is not loaded; several
/// new claimants are ambiguous, and none loads.
fn refuse_shared_files(out: &mut Loaded, running: &BTreeMap<String, PathBuf>) {
    let mut writers: BTreeMap<PathBuf, Vec<usize>> = BTreeMap::new();
    for (i, c) in out.connectors.iter().enumerate() {
        for f in c.csv.iter().flat_map(csv::CsvSettings::files) {
            writers.entry(f).or_default().push(i);
        }
    }
    let mut refused: BTreeMap<usize, String> = BTreeMap::new();
    for (path, claimants) in writers.into_iter().filter(|(_, c)| c.len() > 1) {
        let runs = |&i: &usize| {
            let c = &out.connectors[i];
            running.get(&c.name) == Some(&c.file)
        };
        let keeper = match claimants.iter().filter(|i| runs(i)).collect::<Vec<_>>()[..] {
            [&one] => Some(one),
            _ => None,
        };
        for &i in claimants.iter().filter(|&&i| Some(i) != keeper) {
            let others: Vec<String> = claimants
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| out.connectors[j].file.display().to_string())
                .collect();
            refused.entry(i).or_insert_with(|| {
                format!(
                    "key `csv.dir`: {} is written by {} too{}; give each CSV connector its own file (another `dir` or `file_name`)",
                    path.display(),
                    others.join(", "),
                    if keeper.is_some() {
                        ", which runs; this file is not loaded"
                    } else {
                        "; neither loads until only one writes it"
                    }
                )
            });
        }
    }
    for (i, message) in refused.into_iter().rev() {
        let c = out.connectors.remove(i);
        out.unloaded.push(Unloaded {
            file: c.file.clone(),
            tenant: Some(c.tenant.clone()),
            name: Some(c.name.clone()),
        });
        out.errors.push(ConnectorError::Invalid {
            file: c.file,
            message,
        });
    }
}

/// What a connector may be called: 1-64 letters, digits, `-` or `_`. The CLI holds a
/// name given on its command line to it too, since the name goes into a URL's path,
/// where `a/../x` would reach connector `x`.
pub fn is_connector_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEBHOOK: &str = r#"
kind = "webhook"
name = "hooks"
tenant = "demo"
[webhook]
url = "http://127.0.0.1:9/hook"
secret_env = "HOOK_SECRET"
"#;

    #[test]
    fn sourced_ids_are_stable_and_tenant_scoped() {
        let a = sourced_id("demo", "User/1");
        assert_eq!(a, sourced_id("demo", "User/1"));
        assert_ne!(a, sourced_id("other", "User/1"));
        assert_eq!(uuid::Uuid::parse_str(&a).unwrap().get_version_num(), 5);
    }

    /// Two CSV connectors writing one file (even of two tenants): the running one keeps
    /// it; new ones load only once each writes its own.
    #[test]
    fn csv_connectors_that_would_write_one_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let csv = |name: &str, tenant: &str, out: &str, file: &str, bundle: bool| {
            let mut text = format!(
                "kind = \"csv\"\nname = \"{name}\"\ntenant = \"{tenant}\"\n[csv]\ndir = \"{out}\"\nfile_name = \"{file}\"\n"
            );
            if bundle {
                text.push_str("[csv.oneroster]\norg_sourced_id = \"o\"\norg_name = \"O\"\ncourse_sourced_id = \"c\"\n");
            }
            std::fs::write(dir.path().join(format!("{name}.toml")), text).unwrap();
        };
        let names =
            |l: &Loaded| -> Vec<String> { l.connectors.iter().map(|c| c.name.clone()).collect() };
        csv("a", "demo", "out", "roster.csv", false);
        csv("b", "other", "./out/../out", "roster.csv", false);
        let loaded = load_dir(dir.path(), &["demo", "other"]);
        assert!(loaded.connectors.is_empty(), "{:?}", names(&loaded));
        assert_eq!(loaded.errors.len(), 2);
        let e = loaded.errors[0].to_string();
        assert!(
            e.contains("roster.csv is written by") && e.contains("neither loads"),
            "{e}"
        );
        assert_eq!(loaded.unloaded[0].tenant.as_deref(), Some("other"));
        // The running one keeps its file.
        let keep = BTreeMap::from([("a".to_owned(), dir.path().join("a.toml"))]);
        let loaded = load_dir_keeping(dir.path(), &["demo", "other"], Some(&[]), &keep);
        assert_eq!(names(&loaded), ["a"]);
        assert!(
            loaded.errors[0].to_string().contains("which runs"),
            "{}",
            loaded.errors[0]
        );
        // Another file name in the same directory is another file...
        csv("b", "other", "out", "other.csv", false);
        assert_eq!(names(&load_dir(dir.path(), &["demo", "other"])), ["a", "b"]);
        // ...but two OneRoster bundles there would share oneroster.zip.
        csv("a", "demo", "out", "roster.csv", true);
        csv("b", "other", "out", "other.csv", true);
        let loaded = load_dir(dir.path(), &["demo", "other"]);
        assert!(loaded.connectors.is_empty());
        assert!(
            loaded.errors[0].to_string().contains("oneroster.zip"),
            "{}",
            loaded.errors[0]
        );
        // Through a link, and past a directory not made yet: `link/not-yet/..` is where
        // `link` points, once made.
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
        csv("a", "demo", "real", "roster.csv", false);
        csv("b", "other", "link/not-yet/..", "roster.csv", false);
        assert!(
            load_dir(dir.path(), &["demo", "other"])
                .connectors
                .is_empty()
        );
        csv("b", "other", "link/not-yet", "roster.csv", false);
        assert_eq!(names(&load_dir(dir.path(), &["demo", "other"])), ["a", "b"]);
    }

    /// A file of one long line is quoted in its error a line's worth, not whole: the
    /// error goes to the log and /status at every reload.
    #[test]
    fn a_long_line_that_does_not_parse_is_quoted_clipped() {
        let dir = tempfile::tempdir().unwrap();
        let line = format!("tenant = \"demo\"\nname = [{}\n", "[".repeat(200_000));
        std::fs::write(dir.path().join("long.toml"), line).unwrap();
        let loaded = load_dir(dir.path(), &["demo"]);
        let e = loaded.errors[0].to_string();
        assert!(
            e.len() < 2_000 && e.contains("characters more"),
            "{}",
            e.len()
        );
        assert!(e.contains("long.toml"), "{e}");
    }

    /// A file name that is not UTF-8 loads like any other: it was skipped without a word.
    #[test]
    fn a_file_name_that_is_not_utf8_still_loads() {
        use std::os::unix::ffi::OsStrExt as _;
        let dir = tempfile::tempdir().unwrap();
        let name = std::ffi::OsStr::from_bytes(b"caf\xe9.TOML");
        std::fs::write(dir.path().join(name), WEBHOOK).unwrap();
        for skipped in [".hidden.toml", "x.toml~", ".toml", "toml"] {
            std::fs::write(dir.path().join(skipped), "not = [toml").unwrap();
        }
        let loaded = load_dir(dir.path(), &["demo"]);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        assert_eq!(loaded.connectors.len(), 1);
        assert_eq!(loaded.connectors[0].file.file_name(), Some(name));
        assert_eq!(
            loaded.listed.as_ref().map(|(d, _)| d.as_path()),
            Some(dir.path())
        );
        let empty = tempfile::tempdir().unwrap();
        let loaded = load_dir(empty.path(), &["demo"]);
        assert!(loaded.connectors.is_empty());
        assert_eq!(
            loaded.listed.as_ref().map(|(d, _)| d.as_path()),
            Some(empty.path())
        );
    }

    #[test]
    fn a_bad_file_is_named_and_the_rest_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a-good.toml"), WEBHOOK).unwrap();
        std::fs::write(
            dir.path().join("b-typo.toml"),
            WEBHOOK.replace("name = \"hooks\"", "name = \"h2\"\nconcurency = 3"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("c-tenant.toml"),
            WEBHOOK
                .replace("hooks", "h3")
                .replace("\"demo\"", "\"nope\""),
        )
        .unwrap();
        std::fs::write(dir.path().join("README.md"), "not a connector").unwrap();
        std::fs::write(dir.path().join("a-good.toml.bak"), WEBHOOK).unwrap();
        // An editor's leftovers beside the file, which would claim its name.
        std::fs::write(dir.path().join(".a-good.toml"), WEBHOOK).unwrap();
        std::fs::write(dir.path().join(".#a-good.toml"), WEBHOOK).unwrap();
        std::fs::write(
            dir.path().join("D-UPPER.TOML"),
            WEBHOOK.replace("hooks", "upper"),
        )
        .unwrap();
        let loaded = load_dir(dir.path(), &["demo"]);
        let names: Vec<&str> = loaded.connectors.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["upper", "hooks"]);
        let errors: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("b-typo.toml") && errors[0].contains("concurency"));
        assert!(errors[1].contains("c-tenant.toml") && errors[1].contains("tenant"));
    }

    #[test]
    fn on_a_name_clash_the_running_file_keeps_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let running = dir.path().join("webhook.toml");
        std::fs::write(&running, WEBHOOK).unwrap();
        std::fs::write(
            dir.path().join("dup.toml"),
            WEBHOOK.replace("9/hook", "9/test"),
        )
        .unwrap();
        let keep = BTreeMap::from([("hooks".to_owned(), running.clone())]);
        let loaded = load_dir_keeping(dir.path(), &["demo"], Some(&[]), &keep);
        assert_eq!(loaded.connectors.len(), 1);
        assert_eq!(loaded.connectors[0].file, running);
        let e = loaded.errors[0].to_string();
        assert!(
            e.contains("dup.toml") && e.contains("webhook.toml") && e.contains("runs it"),
            "{e}"
        );
        // The rejected file is known by name: it names the connector it clashed with.
        assert_eq!(loaded.unloaded[0].name.as_deref(), Some("hooks"));
        // At the next start nothing runs yet: the sort order does not pick the copy.
        // Neither file loads, each names the other, until one is removed.
        let loaded = load_dir(dir.path(), &["demo"]);
        assert!(loaded.connectors.is_empty());
        let errors: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("dup.toml") && errors[0].contains("also claimed by"));
        assert!(errors[0].contains("webhook.toml"), "{errors:?}");
        assert!(errors[1].contains("dup.toml"), "{errors:?}");
        assert_eq!(loaded.unloaded.len(), 2);
        // A typo in the running file mid-edit does not hand the name to the copy.
        std::fs::write(&running, WEBHOOK.replace("[webhook]", "[webhok]")).unwrap();
        let loaded = load_dir_keeping(dir.path(), &["demo"], Some(&[]), &keep);
        assert!(loaded.connectors.is_empty(), "{:?}", loaded.connectors);
        let errors: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
        assert!(
            errors.iter().any(|e| e.contains("dup.toml")
                && e.contains("webhook.toml, which runs it as last loaded")),
            "{errors:?}"
        );
        // Nor does one that cannot be read at all: a dangling link, or a directory.
        std::fs::remove_file(&running).unwrap();
        std::os::unix::fs::symlink(dir.path().join("gone.toml"), &running).unwrap();
        let loaded = load_dir_keeping(dir.path(), &["demo"], Some(&[]), &keep);
        assert!(loaded.connectors.is_empty(), "{:?}", loaded.connectors);
        std::fs::remove_file(&running).unwrap();
        std::fs::create_dir(&running).unwrap();
        let loaded = load_dir_keeping(dir.path(), &["demo"], Some(&[]), &keep);
        assert!(loaded.connectors.is_empty(), "{:?}", loaded.connectors);
        std::fs::remove_dir(&running).unwrap();
        std::fs::write(&running, WEBHOOK).unwrap();
        let loaded = load_dir_keeping(dir.path(), &["demo"], Some(&[]), &keep);
        assert_eq!(loaded.connectors.len(), 1);
        assert_eq!(loaded.connectors[0].file, running);
        std::fs::remove_file(dir.path().join("dup.toml")).unwrap();
        let loaded = load_dir(dir.path(), &["demo"]);
        assert_eq!(loaded.connectors[0].file, running);
    }

    #[test]
    fn the_shipped_examples_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("connectors");
        let mut kinds = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.to_string_lossy().ends_with(".toml.example") {
                let text = std::fs::read_to_string(&path).unwrap();
                let c = ConnectorConfig::parse(&text, &path, &dir)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                // Copied as they are, they guard against a mass deprovisioning.
                assert_eq!(
                    c.guard,
                    Some(GuardConfig {
                        users: Some(50),
                        memberships: Some(500),
                        minutes: 60
                    }),
                    "{}",
                    path.display()
                );
                kinds.push(c.kind.as_str());
            }
        }
        kinds.sort_unstable();
        assert_eq!(kinds, ["csv", "oneroster", "webhook"]);
    }

    #[test]
    fn a_guard_needs_a_positive_count_and_at_most_a_week() {
        let with = |guard: &str| {
            ConnectorConfig::parse(
                &format!("{WEBHOOK}\n[guard]\n{guard}\n"),
                Path::new("x.toml"),
                Path::new("."),
            )
            .map(|c| c.guard)
            .map_err(|e| e.to_string())
        };
        assert_eq!(
            with("users = 5\nminutes = 10080"),
            Ok(Some(GuardConfig {
                users: Some(5),
                memberships: None,
                minutes: 10080
            }))
        );
        for (bad, key) in [
            ("users = 0\nminutes = 10", "guard.users"),
            ("users = 5\nminutes = 0", "guard.minutes"),
            ("users = 5\nminutes = 10081", "guard.minutes"),
            ("users = 5", "minutes"),
            ("minutes = 10", "`users`, `memberships` or both"),
            ("memberships = 0\nminutes = 10", "guard.memberships"),
            ("users = 5\nminutes = 10\npercent = 3", "percent"),
        ] {
            let err = with(bad).unwrap_err();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn the_kind_needs_its_section_and_no_other() {
        let err = ConnectorConfig::parse(
            "kind = \"oneroster\"\nname = \"x\"\ntenant = \"demo\"\n",
            Path::new("x.toml"),
            Path::new("."),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("[oneroster]"), "{err}");
        let err = ConnectorConfig::parse(
            &WEBHOOK.replace("kind = \"webhook\"", "kind = \"csv\""),
            Path::new("x.toml"),
            Path::new("."),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("[csv] section"), "{err}");
    }

    #[test]
    fn roles_naming_no_archetype_are_found() {
        let or = ConnectorConfig::parse(
            &std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("connectors/oneroster.toml.example"),
            )
            .unwrap(),
            Path::new("x.toml"),
            Path::new("."),
        )
        .unwrap();
        assert_eq!(
            or.unmapped_roles(&["eng_lead", "it_admin"]),
            Vec::<&str>::new()
        );
        assert_eq!(or.unmapped_roles(&["eng_lead"]), ["it_admin"]);
        let hook = ConnectorConfig::parse(WEBHOOK, Path::new("x.toml"), Path::new(".")).unwrap();
        assert!(hook.unmapped_roles(&[]).is_empty());
    }

    #[test]
    fn a_csv_connector_writes_neither_among_the_connector_files_nor_in_the_store() {
        let base = tempfile::tempdir().unwrap();
        let connectors = base.path().join("connectors");
        let data = base.path().join("data");
        std::fs::create_dir_all(&connectors).unwrap();
        std::fs::create_dir_all(data.join("exports")).unwrap();
        let file = |dir: &str| {
            format!("kind = \"csv\"\nname = \"files\"\ntenant = \"demo\"\n[csv]\ndir = \"{dir}\"\n")
        };
        let parse = |dir: &str| {
            ConnectorConfig::parse(&file(dir), &connectors.join("x.toml"), &connectors)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert_eq!(parse("out"), Ok(()));
        for dir in ["", ".", "out/..", &connectors.display().to_string()] {
            let err = parse(dir).unwrap_err();
            assert!(err.contains("`csv.dir`"), "{dir:?}: {err}");
        }
        // The data directory, by a path of its own or through the connectors directory.
        for dir in [
            data.join("exports").display().to_string(),
            "../data/exports".into(),
        ] {
            std::fs::write(connectors.join("files.toml"), file(&dir)).unwrap();
            let mut loaded = load_dir(&connectors, &["demo"]);
            assert_eq!(loaded.connectors.len(), 1, "{dir}");
            loaded.refuse_csv_inside(&data, "the store's data directory");
            assert!(loaded.connectors.is_empty(), "{dir}");
            let err = loaded.errors[0].to_string();
            assert!(
                err.contains("`csv.dir`") && err.contains("data directory"),
                "{err}"
            );
            assert_eq!(loaded.unloaded[0].name.as_deref(), Some("files"));
        }
    }

    #[test]
    fn a_filter_that_would_miss_a_clear_or_a_return_is_warned_of() {
        let hook = |events: &str| {
            ConnectorConfig::parse(
                &WEBHOOK.replace("[webhook]", &format!("[webhook]\nevents = {events}")),
                Path::new("x.toml"),
                Path::new("."),
            )
            .unwrap()
            .warnings()
        };
        assert!(hook("[]").is_empty());
        let w = hook(r#"["roster.archetype_overridden"]"#);
        assert!(
            w.len() == 1 && w[0].contains("roster.archetype_assigned"),
            "{w:?}"
        );
        assert!(hook(r#"["roster.archetype_overridden", "roster.archetype_assigned"]"#).is_empty());
        let w = hook(r#"["roster.user_deactivated", "roster.user_reactivated"]"#);
        assert!(
            w.len() == 1 && w[0].contains("roster.user_deleted"),
            "{w:?}"
        );
        let csv = |extra: &str| {
            ConnectorConfig::parse(
                &format!(
                    "kind = \"csv\"\nname = \"f\"\ntenant = \"demo\"\n[csv]\ndir = \"out\"\n{extra}"
                ),
                Path::new("x.toml"),
                Path::new("."),
            )
            .unwrap()
            .warnings()
        };
        assert!(csv("debounce_ms = 10\n").is_empty());
        assert!(csv("schedule = \"0 0 3 * * *\"\n").is_empty());
        let w = csv("schedule = \"0 0 3 * * *\"\ndebounce_ms = 10\n");
        assert!(w.len() == 1 && w[0].contains("debounce_ms"), "{w:?}");
        // Read-only under the unit: named whether the path was given whole or relative.
        let in_dir = |base: &str, dir: &str| {
            ConnectorConfig::parse(
                &format!(
                    "kind = \"csv\"\nname = \"f\"\ntenant = \"demo\"\n[csv]\ndir = \"{dir}\"\n"
                ),
                Path::new("x.toml"),
                Path::new(base),
            )
            .unwrap()
            .warnings()
        };
        let w = in_dir("/etc/rosterd/connectors", "exports");
        assert!(
            w.len() == 1
                && w[0].contains("/etc/rosterd/connectors/exports")
                && w[0].contains("/etc is read-only"),
            "{w:?}"
        );
        let w = in_dir("/srv", "/usr/local/share/roster");
        assert!(w.len() == 1 && w[0].contains("/usr is read-only"), "{w:?}");
        assert!(
            in_dir(
                "/etc/rosterd/connectors",
                "/var/lib/rosterd-exports/nightly"
            )
            .is_empty()
        );
        // A path that merely begins with the same letters.
        assert!(in_dir("/srv", "/etcetera/exports").is_empty());
    }

    /// A CSV connector sends no requests: keys for them are refused, not ignored.
    #[test]
    fn a_csv_connector_refuses_request_settings() {
        let csv =
            "kind = \"csv\"\nname = \"files\"\ntenant = \"demo\"\n{extra}[csv]\ndir = \"out\"\n";
        let parse = |extra: &str| {
            ConnectorConfig::parse(
                &csv.replace("{extra}", extra),
                Path::new("x.toml"),
                Path::new("."),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        assert_eq!(parse(""), Ok(()));
        assert_eq!(parse("[retry]\npause_secs = 5\n"), Ok(()));
        for (text, key) in [
            ("concurrency = 4\n", "`concurrency`"),
            ("timeout_ms = 100\n", "`timeout_ms`"),
            (
                "[retry]\npause_after_refusals = 5\n",
                "`retry.pause_after_refusals`",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(key) && err.contains("CSV"), "{err}");
        }
    }

    /// A secret written into the file (where only its variable's name belongs) is not
    /// quoted back by the parser's error, which reaches the log and `/status`.
    #[test]
    fn a_secret_in_a_connector_file_is_not_quoted_back() {
        for wrong in [
            "secret = \"whsec_CANARYc2VjcmV0\"",
            "secret_env = whsec_CANARYc2VjcmV0",
            // Quoted, it parses, and is no variable's name: refused as one, starred.
            "secret_env = \"whsec_CANARY+c2VjcmV0\"",
            "secret_env = \"HOOK_SECRET\"\nrotation_secret_env = \"whsec_CANARY/c2VjcmV0\"",
        ] {
            let err = ConnectorConfig::parse(
                &WEBHOOK.replace("secret_env = \"HOOK_SECRET\"", wrong),
                Path::new("x.toml"),
                Path::new("."),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("x.toml") && !err.contains("CANARY"), "{err}");
        }
        let err = ConnectorConfig::parse(
            &WEBHOOK.replace(
                "secret_env = \"HOOK_SECRET\"",
                "secret_env = \"whsec_CANARY+c2VjcmV0\"",
            ),
            Path::new("x.toml"),
            Path::new("."),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`secret_env`") && err.contains("is not an environment variable's name"),
            "{err}"
        );
    }

    /// Times past what a clock can add made every retry panic; the bounds are named.
    #[test]
    fn times_are_bounded() {
        let parse = |extra: &str| {
            ConnectorConfig::parse(
                &WEBHOOK.replace("[webhook]", &format!("{extra}\n[webhook]")),
                Path::new("x.toml"),
                Path::new("."),
            )
        };
        assert!(parse("timeout_ms = 3600000\n[retry]\ninitial_delay_ms = 1\nmax_delay_ms = 86400000\npause_secs = 604800").is_ok());
        for (extra, key) in [
            ("timeout_ms = 3600001", "timeout_ms"),
            (
                "[retry]\ninitial_delay_ms = 9223372036854775807\nmax_delay_ms = 9223372036854775807",
                "retry.max_delay_ms",
            ),
            ("[retry]\nmax_delay_ms = 86400001", "retry.max_delay_ms"),
            (
                "[retry]\npause_secs = 18446744073709551615",
                "retry.pause_secs",
            ),
            ("[retry]\npause_secs = 0", "retry.pause_secs`: must be 1 to"),
        ] {
            let err = parse(extra).unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
    }

    /// A read-back window past what the calendar holds made every reconciliation panic,
    /// and a debounce of u64::MAX ms left a CSV connector writing nothing, silently.
    #[test]
    fn a_read_back_and_a_debounce_are_bounded() {
        let parse = |example: &str, from: &str, to: &str| {
            assert!(example.contains(from), "{from}");
            ConnectorConfig::parse(
                &example.replace(from, to),
                Path::new("x.toml"),
                Path::new("."),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        let oneroster = |keys: &str| {
            parse(
                include_str!("../../connectors/oneroster.toml.example"),
                "[oneroster]",
                &format!("[oneroster]\n{keys}"),
            )
        };
        let csv = |line: &str| {
            parse(
                include_str!("../../connectors/csv.toml.example"),
                "debounce_ms = 5000",
                line,
            )
        };
        oneroster("read_back = true\nread_back_hours = 87600\nread_back_max_secs = 86400").unwrap();
        csv("debounce_ms = 3600000").unwrap();
        for (bad, key) in [
            ("read_back_hours = 0", "read_back_hours"),
            ("read_back_hours = 10000000000", "read_back_hours"),
            ("read_back_max_secs = 0", "read_back_max_secs"),
            ("read_back_max_secs = 86401", "read_back_max_secs"),
        ] {
            let err = oneroster(bad).unwrap_err();
            assert!(err.contains(&format!("key `{key}`")), "{bad}: {err}");
        }
        let err = csv("debounce_ms = 18446744073709551615").unwrap_err();
        assert!(err.contains("key `debounce_ms`"), "{err}");
    }

    /// The CSV bundle's roles and org type are OneRoster's, as the REST connector's are.
    #[test]
    fn the_csv_bundle_takes_only_oneroster_roles_and_org_types() {
        let example = include_str!("../../connectors/csv.toml.example");
        let parse = |from: &str, to: &str| {
            assert!(example.contains(from), "{from}");
            ConnectorConfig::parse(
                &example.replace(from, to),
                Path::new("x.toml"),
                Path::new("."),
            )
        };
        assert!(parse("org_type = \"district\"", "org_type = \"ext:trust\"").is_ok());
        for (from, to, key) in [
            (
                "org_type = \"district\"",
                "org_type = \"galaxy\"",
                "oneroster.org_type",
            ),
            (
                "default_role = \"teacher\"",
                "default_role = \"wizard\"",
                "oneroster.default_role",
            ),
            (
                "\"districtAdministrator\"",
                "\"dean\"",
                "oneroster.roles.eng_lead",
            ),
            (
                "enrollment_role = \"teacher\"",
                "enrollment_role = \"aide\"",
                "oneroster.enrollment_role",
            ),
            (
                "file_name = \"roster.csv\"",
                "file_name = \"x\\u0000.csv\"",
                "file_name",
            ),
        ] {
            let err = parse(from, to).unwrap_err().to_string();
            assert!(err.contains(key), "{to}: {err}");
        }
    }

    #[test]
    fn a_target_url_needs_a_scheme_and_a_host() {
        const ONEROSTER: &str = r#"
kind = "oneroster"
name = "sis"
tenant = "demo"
[oneroster]
base_url = "https://sis.example/ims/oneroster/rostering/v1p2"
org_sourced_id = "district-0001"
course_sourced_id = "rosterd-staff-groups"
course_title = "Staff groups"
default_role = "teacher"
enrollment_role = "teacher"
[oneroster.auth]
token_url = "https://sis.example/oauth/token"
client_id = "rosterd"
client_secret_env = "SIS_SECRET"
"#;
        let parse = |text: &str| {
            ConnectorConfig::parse(text, Path::new("x.toml"), Path::new("."))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        parse(WEBHOOK).unwrap();
        parse(ONEROSTER).unwrap();
        let pasted =
            parse(&ONEROSTER.replace("\"SIS_SECRET\"", "\"pasted-secret-value\"")).unwrap_err();
        assert!(pasted.contains("auth.client_secret_env"), "{pasted}");
        parse(&WEBHOOK.replace("/hook\"", "/hook?tenant=demo\"")).unwrap();
        let bad = [
            ("", false),
            ("not a url", false),
            ("ftp://h.example/x", false),
            ("http://", false),
            ("http://h.example/x#f", false),
            ("https://h.example/or?x=1", true),
        ];
        for (url, base_only) in bad {
            let err =
                parse(&ONEROSTER.replace("https://sis.example/ims/oneroster/rostering/v1p2", url))
                    .unwrap_err();
            assert!(err.contains("key `base_url`"), "{url:?}: {err}");
            if base_only {
                continue;
            }
            let err =
                parse(&ONEROSTER.replace("https://sis.example/oauth/token", url)).unwrap_err();
            assert!(err.contains("key `auth.token_url`"), "{url:?}: {err}");
            let err = parse(&WEBHOOK.replace("http://127.0.0.1:9/hook", url)).unwrap_err();
            assert!(err.contains("key `url`"), "{url:?}: {err}");
        }
    }

    #[test]
    fn catch_up_needs_a_schedule() {
        let csv = |extra: &str| {
            let text = format!(
                "kind = \"csv\"\nname = \"files\"\ntenant = \"demo\"\n[csv]\ndir = \"out\"\n{extra}"
            );
            ConnectorConfig::parse(&text, Path::new("x.toml"), Path::new("."))
                .map(|c| c.kind.as_str().to_owned())
                .map_err(|e| e.to_string())
        };
        csv("schedule = \"0 0 2 * * *\"\ncatch_up = true\n").unwrap();
        csv("catch_up = false\n").unwrap();
        let err = csv("catch_up = true\n").unwrap_err();
        assert!(err.contains("key `catch_up`: needs a `schedule`"), "{err}");
    }
}
