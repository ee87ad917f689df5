//! Configuration: `config.toml`, deserialized straight into these structs. Unknown keys
//! are errors so that a typo never silently falls back to a default.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::server::auth::{TokenHash, TokenHashError};

/// The only config format version this build understands. Read first so the format can
/// evolve without misreading an older or newer file.
pub const CONFIG_VERSION: u32 = 1;

/// Reads environment variables (tokens and secrets the config names); injectable so tests
/// need not touch the process's.
pub type EnvFn = std::sync::Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl ConfigError {
    /// The config file is not there: a command run from another directory than the
    /// default `config.toml` is in, where the installed one is elsewhere.
    pub fn is_missing(&self) -> bool {
        matches!(self, ConfigError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Config format version; must be 1.
    pub version: u32,
    /// Listener, storage and request limits.
    #[serde(default)]
    pub server: ServerConfig,
    /// Logging output.
    #[serde(default)]
    pub log: LogConfig,
    /// SCIM protocol limits advertised in /ServiceProviderConfig.
    #[serde(default)]
    pub scim: ScimConfig,
    /// Tenants: each has its own SCIM base URL `/scim/v2/{id}` and its own tokens.
    #[serde(default, rename = "tenants")]
    pub tenants: Vec<TenantConfig>,
    /// The Roster API (`/api/v1/roster`).
    #[serde(default)]
    pub api: ApiConfig,
    /// Downstream connectors: one TOML file per target in a directory.
    #[serde(default)]
    pub connectors: ConnectorsConfig,
    /// Cron schedules of the background jobs.
    #[serde(default)]
    pub schedules: SchedulesConfig,
    /// Where online backups of the store go.
    #[serde(default)]
    pub backup: BackupConfig,
    /// The directory of the config file: relative paths in it resolve against this.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The file this was read from and its text then, so a reload can tell the operator
    /// that edits to it wait for a restart.
    #[serde(skip)]
    pub source: Option<(PathBuf, String)>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Directory of the embedded store.
    pub data_dir: PathBuf,
    /// Largest request body accepted; larger requests get 413.
    pub max_body_bytes: usize,
    /// External base URL used in `meta.location` and `Location` headers, e.g.
    /// `https://rosterd.example.com`. Defaults to `http://{listen}`.
    pub public_url: Option<String>,
    /// The store's page cache in MiB. sled counts pages at their on-disk size, so the
    /// daemon's RSS grows by up to about twice this as the cache fills.
    pub cache_mb: u64,
    /// A request's headers must have arrived this many seconds after the connection
    /// opened or the previous answer on it went out (so an idle keep-alive connection
    /// closes after this long), and its body may pause no longer than this between two
    /// pieces (it gets 408). Without it a stalled or hostile client holds a connection,
    /// and its memory, for good. Above a proxy's idle timeout for upstream connections
    /// (60 s for nginx and AWS load balancers), or the proxy may reuse a connection just
    /// as rosterd closes it.
    pub client_timeout_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("data"),
            max_body_bytes: 16 * 1024 * 1024,
            public_url: None,
            cache_mb: 256,
            client_timeout_secs: 75,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` for people, `json` for log shippers.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `rosterd=debug,info`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScimConfig {
    /// Largest page a list or search returns (`count` is capped to it).
    pub max_results: usize,
    /// Largest number of operations in one /Bulk request.
    pub bulk_max_operations: usize,
    /// Largest number of matches a `sortBy` query will sort; more gives `tooMany`.
    pub max_sort_results: usize,
}

impl Default for ScimConfig {
    fn default() -> Self {
        ScimConfig {
            max_results: 1000,
            bulk_max_operations: 1000,
            max_sort_results: 2_000_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Tenant id: the `{tenant}` of `/scim/v2/{tenant}`. Letters, digits, `-` and `_`.
    pub id: String,
    /// Name of an environment variable holding a plain SCIM bearer token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// Stored token hashes as printed by `rosterd token new` (`sha256:<hex>`).
    #[serde(default)]
    pub token_hashes: Vec<String>,
    /// The tenant's archetype bundle (TOML), relative to this config file. Without one,
    /// users get no archetype.
    #[serde(default)]
    pub bundle: Option<PathBuf>,
    /// Overrides the bundle's `review_threshold`.
    #[serde(default)]
    pub review_threshold: Option<f64>,
    /// Tenant policy: may people set manual archetype overrides? When false the Roster
    /// API answers overrides with 422.
    #[serde(default = "default_true")]
    pub allow_overrides: bool,
    /// Members of a group get an archetype, ahead of the classifier. First match wins.
    #[serde(default)]
    pub group_rules: Vec<GroupRule>,
    /// The identity provider that provisions this tenant (`azure-ad`, `okta`, …): the
    /// Roster API gives its groups the source `scim:<idp>` (else `scim`).
    #[serde(default)]
    pub idp: Option<String>,
    /// The role a group grants in the product its members use (roster-api.txt's
    /// `claresia_role`); a group no entry names grants `member`. First match wins.
    #[serde(default)]
    pub group_roles: Vec<GroupRole>,
}

/// `[[tenants.group_roles]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupRole {
    /// The group's displayName (case-insensitive), externalId or SCIM id.
    pub group: String,
    pub role: String,
}

/// The role of a group no `group_roles` entry names.
pub const DEFAULT_GROUP_ROLE: &str = "member";

/// Whether `pattern` (a config file's `group = "…"`) names this group: its SCIM id, its
/// displayName in any case, or its externalId. Any case in Unicode's sense, as the Roster
/// API's `group` filter reads a name: with ASCII's alone, a rule for "Équipe Design"
/// missed the group "équipe design", and its members kept the classifier's archetype.
pub fn names_group(pattern: &str, id: &str, name: Option<&str>, external: Option<&str>) -> bool {
    pattern == id
        || name.is_some_and(|n| n == pattern || n.to_lowercase() == pattern.to_lowercase())
        || external.is_some_and(|x| x == pattern)
}

fn default_true() -> bool {
    true
}

/// `[[tenants.group_rules]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupRule {
    /// The group's displayName (case-insensitive), externalId or SCIM id.
    pub group: String,
    /// An archetype id of the tenant's bundle.
    pub archetype: String,
}

/// `[api]`: the Roster API.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// How Roster API bearer tokens (JWTs) are verified. Without it the Roster API
    /// refuses every request.
    #[serde(default)]
    pub jwt: Option<crate::api::jwt::JwtConfig>,
}

/// `[connectors]`
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectorsConfig {
    /// Directory of connector drop-in files (`*.toml`), relative to this file. Read at
    /// start and again on SIGHUP. Named here, it must exist (it may be empty): a typo
    /// or a missing directory would otherwise run no connector while their cursors,
    /// unheld, let compaction drop what they still have to deliver. Left out, it is
    /// `connectors`, and a missing one means no connectors.
    pub dir: Option<PathBuf>,
}

/// The connectors directory when `[connectors] dir` is left out.
pub const DEFAULT_CONNECTORS_DIR: &str = "connectors";

/// `[backup]`: online backups of the store, written by the `backup` schedule, by SIGUSR1
/// and by `rosterd store backup`, each into a new directory named for its time.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// Relative to the config file's directory. Default: beside the data directory, its
    /// name with `-backups` (the unit's `/var/lib/rosterd-backups`, a StateDirectory of
    /// its own), so a backup is not inside what it backs up.
    pub dir: Option<PathBuf>,
    /// How many backups are kept: after one is written, the oldest beyond this go.
    pub keep: usize,
    /// Free space a backup leaves on its directory's filesystem: one is not started, and
    /// one under way is given up, below it. Default: 1 GiB, or a tenth of a smaller
    /// filesystem.
    pub keep_free_mb: Option<u64>,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            dir: None,
            keep: 7,
            keep_free_mb: None,
        }
    }
}

/// `[schedules]`: cron expressions with a seconds field (`sec min hour dom month dow`,
/// e.g. `0 */15 * * * *`), evaluated in `timezone`. An absent key never runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulesConfig {
    /// IANA time zone name, e.g. `Europe/Berlin`.
    pub timezone: String,
    /// Reclassify, rebuild the review queue, re-send what drifted downstream.
    pub reconcile: Option<String>,
    /// Write every CSV connector's files.
    pub export: Option<String>,
    /// Trim the change log below the lowest connector cursor and past the retention.
    pub compact: Option<String>,
    /// Write a backup of the store into `[backup] dir`.
    pub backup: Option<String>,
    /// Change events younger than this are kept by `compact` even when delivered (pull
    /// consumers of `/api/v1/roster/changes` read them).
    pub changelog_retention_hours: u64,
    /// Run a schedule once at start when a run came due while the daemon was down (as a
    /// systemd timer's `Persistent=true`): a nightly reconcile or export missed during
    /// maintenance then runs when the daemon is back, not the next night.
    pub catch_up: bool,
}

impl Default for SchedulesConfig {
    fn default() -> Self {
        SchedulesConfig {
            timezone: "UTC".into(),
            reconcile: None,
            export: None,
            compact: None,
            backup: None,
            changelog_retention_hours: 168,
            catch_up: false,
        }
    }
}

impl SchedulesConfig {
    /// The configured schedules by job name.
    pub fn entries(&self) -> Vec<(&'static str, &str)> {
        [
            ("reconcile", &self.reconcile),
            ("export", &self.export),
            ("compact", &self.compact),
            ("backup", &self.backup),
        ]
        .into_iter()
        .filter_map(|(n, c)| c.as_deref().map(|c| (n, c)))
        .collect()
    }

    pub fn tz(&self) -> Result<chrono_tz::Tz, String> {
        self.timezone.parse::<chrono_tz::Tz>().map_err(|_| {
            format!(
                "key `schedules.timezone`: {:?} is not an IANA time zone",
                self.timezone
            )
        })
    }
}

/// `path` with its links resolved, as far as it exists: the nearest existing ancestor
/// resolved, the rest appended (a directory made later through a link lands where the
/// link points), and a link whose target does not exist yet followed to that target.
fn real_path(path: &Path) -> PathBuf {
    real_path_within(path, 40)
}

fn real_path_within(path: &Path, links: usize) -> PathBuf {
    let mut rest = Vec::new();
    let mut at = path.to_owned();
    loop {
        let resolved = match std::fs::canonicalize(&at) {
            Ok(real) => Some(real),
            Err(_) if links > 0 && std::fs::symlink_metadata(&at).is_ok_and(|m| m.is_symlink()) => {
                std::fs::read_link(&at).ok().map(|target| {
                    let target = match at.parent() {
                        Some(parent) => parent.join(target),
                        None => target,
                    };
                    real_path_within(&target, links - 1)
                })
            }
            Err(_) => None,
        };
        if let Some(real) = resolved {
            return rest
                .iter()
                .rev()
                .fold(real, |p, c: &std::ffi::OsString| p.join(c));
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                at = parent.to_owned();
            }
            _ => return path.to_owned(),
        }
    }
}

/// Parse a cron expression with a required seconds field.
/// What a listen address needs, said where one is refused (`server.listen`, `--listen`).
pub const LISTEN_HINT: &str = "an IP address and a port are needed, such as 127.0.0.1:8080 or [::1]:8080; a host name such as localhost is not accepted";

pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    // croner's own error for an unknown one speaks of "between 5 and 7 fields".
    if let Some(name) = expr.trim().strip_prefix('@')
        && !CRON_SHORTCUTS.iter().any(|s| s.eq_ignore_ascii_case(name))
    {
        return Err(format!(
            "{expr:?} is not a shortcut rosterd knows (@{}); or write six fields: seconds minutes hours day-of-month month day-of-week",
            CRON_SHORTCUTS.join(", @")
        ));
    }
    let fields = expr.split_whitespace().count();
    if fields < 6 && !expr.trim_start().starts_with('@') {
        return Err(format!(
            "{expr:?} needs six fields: seconds minutes hours day-of-month month day-of-week"
        ));
    }
    // croner takes a seventh, the year; once its last year has passed the schedule never
    // fires, and a start refuses the file, so a config valid when written stops the
    // daemon at a reboot some January.
    if fields > 6 {
        return Err(format!(
            "{expr:?} has {fields} fields; a schedule takes six (seconds minutes hours day-of-month month day-of-week), not a year"
        ));
    }
    check_cron_steps(expr)?;
    let cron = expr.parse::<croner::Cron>().map_err(|e| {
        let fields: Vec<String> = CRON_FIELDS
            .iter()
            .map(|(name, range, _)| format!("{name} {range}"))
            .collect();
        format!("{expr:?}: {e} (the fields are: {})", fields.join(", "))
    })?;
    // Valid syntax can still name no date (30 February): whatever used it would never
    // run. No such date exists in any time zone, so UTC answers for all.
    if crate::schedule::next_run(&cron, chrono_tz::UTC).is_none() {
        return Err(format!("{expr:?} never fires (no such date)"));
    }
    Ok(cron)
}

/// The `@` shortcuts croner reads (each fires at second 0 of its minute).
const CRON_SHORTCUTS: [&str; 6] = ["hourly", "daily", "weekly", "monthly", "yearly", "annually"];

/// The six fields of a cron expression: name, values and how many distinct values
/// (day-of-week 0 and 7 are both Sunday).
const CRON_FIELDS: [(&str, &str, u32); 6] = [
    ("seconds", "0-59", 60),
    ("minutes", "0-59", 60),
    ("hours", "0-23", 24),
    ("day-of-month", "1-31", 31),
    ("month", "1-12", 12),
    ("day-of-week", "0-7", 7),
];

/// A step as large as its field's whole range (`*/70` in minutes) is valid cron, but it
/// fires only at the start of the range (minute 0), which is never what it means: "every
/// 70 minutes" cannot be written in cron at all, and an operator should hear so at start.
fn check_cron_steps(expr: &str) -> Result<(), String> {
    for (field, (name, _, size)) in expr.split_whitespace().zip(CRON_FIELDS) {
        for part in field.split(',') {
            let Some((_, step)) = part.split_once('/') else {
                continue;
            };
            if let Ok(step) = step.parse::<u32>()
                && step >= size
            {
                return Err(format!(
                    "{expr:?}: the step /{step} in {name} is not below the field's {size} values, so it fires only at the first of them; cron cannot repeat across a larger unit (write a single value, or use the next field)"
                ));
            }
        }
    }
    Ok(())
}

const LEVELS: &str = "trace, debug, info, warn, error or off";

/// `RUST_LOG`, which overrides `[log] level`, checked as the key is: a word that is no
/// level would start a daemon that logs nothing.
pub fn check_rust_log() -> Result<(), String> {
    match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => check_log_level(&v)
            .map_err(|e| format!("environment variable RUST_LOG (it overrides [log] level) {e}")),
        _ => Ok(()),
    }
}

/// A tracing filter (`info`, `rosterd=debug,info`) whose every directive names a level.
/// The filter syntax reads any other word as a target, so `verbose` would silently
/// select nothing and turn every log line off, errors included.
fn check_log_level(spec: &str) -> Result<(), String> {
    use std::str::FromStr;
    use tracing_subscriber::filter::LevelFilter;
    if spec.trim().is_empty() {
        return Err(format!("is empty; give a level: {LEVELS}"));
    }
    for d in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        // `=` inside a span's field filter (`target[span{f=v}]`) is not a level.
        let level = d
            .rsplit_once('=')
            .map(|(_, l)| l.trim())
            .filter(|l| !l.contains(['}', ']']));
        match level {
            Some(l) => {
                LevelFilter::from_str(l)
                    .map_err(|_| format!("{d:?}: {l:?} is not a level; use {LEVELS}"))?;
            }
            // An explicit module path or span filter enables every level of it.
            None if d.contains("::") || d.contains('[') => {}
            None => {
                LevelFilter::from_str(d).map_err(|_| {
                    format!(
                        "{d:?} is not a level ({LEVELS}) nor a directive such as \"rosterd=debug\""
                    )
                })?;
            }
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(spec)
        .map(drop)
        .map_err(|e| format!("{spec:?}: {e}"))
}

/// The most rosterd reads of one file of each kind: far above any real one, and a bound
/// on what a wrong path costs. Parsing TOML takes up to about 80 times a file's size (a
/// 25 MB connector file of nested arrays took a reload to 2 GB), so each kind gets what
/// its content needs: a bundle holds examples (6,000 of them are 200 KB; the 50,000 a
/// bundle may have, at 300 characters each), a connector file a few keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// config.toml: a few hundred tenants' keys.
    Config,
    /// One connector's file.
    Connector,
    /// An archetype bundle.
    Bundle,
    /// A key file, PEM or JWKS.
    Key,
}

impl FileKind {
    pub const fn max_bytes(self) -> u64 {
        match self {
            FileKind::Config => 4 << 20,
            FileKind::Connector | FileKind::Key => 1 << 20,
            FileKind::Bundle => 16 << 20,
        }
    }

    fn name(self) -> &'static str {
        match self {
            FileKind::Config => "config.toml",
            FileKind::Connector => "a connector's file",
            FileKind::Bundle => "a bundle",
            FileKind::Key => "a key file",
        }
    }
}

/// A configuration file's bytes (the config, a connector's file, a bundle, a key file).
/// Only a regular file is read, or a symbolic link to one: a pipe would block the
/// reader (a reload, for good), a device such as /dev/zero would never end, and a
/// directory or a link whose target is gone is a mistake to report, not a file to skip
/// or take for a removed one.
pub fn read_file(path: &Path, kind: FileKind) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    use std::os::unix::fs::OpenOptionsExt;
    let explained = |e: Error| match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Error::new(
            e.kind(),
            format!("a symbolic link whose target cannot be read: {e}"),
        ),
        _ => e,
    };
    // Opened without waiting, and checked on what was opened: a pipe put in place
    // between a check by path and the open blocked a reload, and the whole daemon with
    // it, until something wrote to the pipe.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(explained)?;
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "a directory, not a file",
        ));
    }
    if !meta.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "not a regular file (a device, a pipe or a socket); name a file",
        ));
    }
    let max = kind.max_bytes();
    let too_big = |len: u64| {
        Error::new(
            ErrorKind::InvalidData,
            format!(
                "{len} bytes; rosterd reads at most {max} from {}",
                kind.name()
            ),
        )
    };
    if meta.len() > max {
        return Err(too_big(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// A TOML file's text (the config, a connector's file, a bundle), read by [`read_file`].
/// TOML is UTF-8, and a file saved in Latin-1 or UTF-16 would otherwise be refused with
/// only "stream did not contain valid UTF-8": this says where the first byte that is not
/// is.
pub fn read_text(path: &Path, kind: FileKind) -> std::io::Result<String> {
    let bytes = read_file(path, kind)?;
    String::from_utf8(bytes).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "not UTF-8 text: {} (save the file as UTF-8)",
                where_not_utf8(&e)
            ),
        )
    })
}

/// Where text that is not UTF-8 stops being so, as an editor counts: `line 4, column 4
/// has the byte 0xfc`. A byte offset alone ("byte 52") read like the byte's value.
pub fn where_not_utf8(e: &std::string::FromUtf8Error) -> String {
    let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
    let line = good.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = good.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let column = String::from_utf8_lossy(&good[line_start..]).chars().count() + 1;
    let byte = e.as_bytes()[good.len()];
    format!("line {line}, column {column} has the byte 0x{byte:02x}")
}

/// See [`Config::on_disk`].
#[derive(Debug, Default)]
pub struct OnDisk {
    pub changed: bool,
    pub error: Option<ConfigError>,
    /// The file as it is now, when it changed and loads: what a restart would run on.
    pub edited: Option<Config>,
    /// The keys that read differently and wait for a restart, dotted, a tenant's under
    /// its id (`tenants.demo.bundle`), when the file changed and loads.
    pub waiting: Vec<String>,
}

impl Config {
    /// Read and validate a config file. Token environment variables are not resolved here.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read_text(path, FileKind::Config).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let mut message = masked_toml_error(&e.to_string(), text);
            // The standard library's message names no remedy, and `localhost:8080` is
            // the first thing people write.
            if message.contains("invalid socket address syntax") {
                message.push_str(LISTEN_HINT);
                message.push('\n');
            }
            ConfigError::Parse {
                path: path.to_owned(),
                message,
            }
        })?;
        // Absolute, so that a path resolved once (the data directory handed to the store)
        // comes out the same if resolved again: against `sub`, `--config sub/config.toml`
        // put the store in sub/sub/data, and the same config named by its absolute path
        // then opened another, empty one.
        config.base_dir = std::path::absolute(path)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        config.source = Some((path.to_owned(), text.to_owned()));
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    /// The file this config came from, as it is now: whether it reads differently (SIGHUP
    /// does not apply it: tenants, group rules, the server and the schedules take a
    /// restart), and why it would not load, if it would not: advice to restart for an edit
    /// must not lead into a start that fails. A file gone or unreadable counts as changed,
    /// and its read error is the reason.
    pub fn on_disk(&self) -> OnDisk {
        let Some((path, text)) = &self.source else {
            return OnDisk::default();
        };
        match read_text(path, FileKind::Config) {
            Ok(now) if now == *text => OnDisk::default(),
            Ok(now) => {
                let (edited, error) = match Config::parse(&now, path) {
                    Ok(c) => (Some(c), None),
                    Err(e) => (None, Some(e)),
                };
                // A reload applies the tenants' tokens; an edit of them alone (a
                // rotation, done with reloads), or of comments, is nothing a restart
                // owes. An audit saw the rotation's reload say "restart rosterd".
                let waiting = if edited.is_some() {
                    keys_but_tokens(text, &now)
                } else {
                    Vec::new()
                };
                OnDisk {
                    changed: edited.is_none() || !waiting.is_empty(),
                    error,
                    edited,
                    waiting,
                }
            }
            Err(source) => OnDisk {
                changed: true,
                error: Some(ConfigError::Read {
                    path: path.clone(),
                    source,
                }),
                edited: None,
                waiting: Vec::new(),
            },
        }
    }

    /// `edited` (the tenants of this file as it is now) with the SCIM tokens a reload puts
    /// in force: their `token_hashes`, and their `token_env` when it is the one in force
    /// (`in_force`, by tenant) or removed. A `token_env` added or renamed keeps the one in
    /// force (none for one added, or one a reload removed), as [`OnDisk::waiting`] says:
    /// its variable was read when the daemon started, and an operator who has since given
    /// it a new value in the environment file would get the old one in force, a token
    /// perhaps revoked. Measured against what started, a token_env removed (to revoke a
    /// leaked token) and then added back, or another in its place, put the leaked token
    /// back into force.
    pub fn tenants_for_token_reload(
        edited: &[TenantConfig],
        in_force: &std::collections::HashMap<String, Option<String>>,
    ) -> Vec<TenantConfig> {
        edited
            .iter()
            .map(|t| {
                let current = in_force.get(&t.id).cloned().flatten();
                let mut applied = t.clone();
                if t.token_env.is_some() && t.token_env != current {
                    applied.token_env = current;
                }
                applied
            })
            .collect()
    }

    /// [`Config::on_disk`], with the `token_env` of each tenant whose file names one that
    /// is not in force (`in_force`, by tenant) among the keys waiting for a restart: one a
    /// reload took out of force, named again, is not read again until then, though the
    /// file may read as the daemon started.
    pub fn on_disk_with_tokens(
        &self,
        in_force: &std::collections::HashMap<String, Option<String>>,
    ) -> OnDisk {
        let mut on_disk = self.on_disk();
        if on_disk.error.is_some() {
            return on_disk;
        }
        let tenants = on_disk
            .edited
            .as_ref()
            .map_or(&self.tenants, |c| &c.tenants);
        let waiting: Vec<String> = token_envs_waiting(tenants, in_force)
            .map(|(id, _)| format!("tenants.{id}.token_env"))
            .collect();
        for key in waiting {
            if !on_disk.waiting.contains(&key) {
                on_disk.waiting.push(key);
                on_disk.changed = true;
            }
        }
        on_disk
    }

    fn validate(&self) -> Result<(), String> {
        if self.version != CONFIG_VERSION {
            return Err(format!(
                "key `version`: this rosterd reads config version {CONFIG_VERSION}, not {}",
                self.version
            ));
        }
        if self.server.cache_mb < 16 {
            return Err("key `server.cache_mb`: must be at least 16".into());
        }
        if let Some(u) = &self.server.public_url {
            // It prefixes every meta.location: without a scheme and host those are no
            // URIs, and a query, fragment or credentials would end up in their middle.
            // Said by what is wrong with it (a query was refused as "not an http(s)
            // URL"), and without the credentials it should not have.
            let why = match reqwest::Url::parse(u) {
                Err(_) => Some("is not a URL"),
                Ok(url) if !matches!(url.scheme(), "http" | "https") || url.host().is_none() => {
                    Some("is not an http(s) URL with a host")
                }
                Ok(url) if !url.username().is_empty() || url.password().is_some() => {
                    Some("must not carry a user name or password")
                }
                Ok(url) if url.query().is_some() || url.fragment().is_some() => {
                    Some("must not carry a query or fragment")
                }
                Ok(_) => None,
            };
            if let Some(why) = why {
                let mut shown = crate::connectors::http::recorded_url(u);
                // The fragment is what may be wrong, and holds no credentials.
                if let Some(f) = reqwest::Url::parse(u)
                    .ok()
                    .and_then(|u| u.fragment().map(str::to_owned))
                {
                    shown.push('#');
                    shown.push_str(&f);
                }
                return Err(format!(
                    "key `server.public_url`: {shown:?} {why}, as in \"https://rosterd.example.com\""
                ));
            }
        }
        if self.server.max_body_bytes < 1024 {
            return Err("key `server.max_body_bytes`: must be at least 1024".into());
        }
        // Under a second, an ordinary client on a slow link would be cut off; over an hour
        // is no protection at all.
        if !(1..=3600).contains(&self.server.client_timeout_secs) {
            return Err("key `server.client_timeout_secs`: must be between 1 and 3600".into());
        }
        if self.scim.max_results == 0 || self.scim.bulk_max_operations == 0 {
            return Err(
                "keys `scim.max_results` and `scim.bulk_max_operations` must be positive".into(),
            );
        }
        // Ten years; far more overflowed the clock at every compaction run (a panic each
        // time, and a change log never trimmed).
        if self.schedules.changelog_retention_hours > 87_600 {
            return Err(
                "key `schedules.changelog_retention_hours`: must be at most 87600 (ten years)"
                    .into(),
            );
        }
        if !(1..=1000).contains(&self.backup.keep) {
            return Err("key `backup.keep`: must be between 1 and 1000".into());
        }
        check_log_level(&self.log.level).map_err(|e| format!("key `log.level`: {e}"))?;
        self.schedules.tz()?;
        for (name, expr) in self.schedules.entries() {
            parse_cron(expr).map_err(|e| format!("key `schedules.{name}`: {e}"))?;
        }
        if let Some(var) = self
            .api
            .jwt
            .as_ref()
            .and_then(|j| j.hs256_secret_env.as_ref())
        {
            check_env_name("api.jwt.hs256_secret_env", var)?;
        }
        let mut seen = std::collections::HashSet::new();
        let (mut hash_owner, mut env_owner) = (
            std::collections::HashMap::new(),
            std::collections::HashMap::new(),
        );
        for (i, t) in self.tenants.iter().enumerate() {
            let valid = !t.id.is_empty()
                && t.id.len() <= 64
                && t.id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid {
                return Err(format!(
                    "key `tenants[{i}].id`: {:?} must be 1-64 letters, digits, '-' or '_'",
                    t.id
                ));
            }
            if let Some(idp) = &t.idp
                && (idp.is_empty()
                    || idp.len() > 64
                    || !idp
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
            {
                return Err(format!(
                    "key `tenants[{i}].idp`: {idp:?} must be 1-64 letters, digits, '-', '_' or '.'"
                ));
            }
            if !seen.insert(t.id.as_str()) {
                return Err(format!(
                    "key `tenants[{i}].id`: tenant {:?} is declared twice",
                    t.id
                ));
            }
            if let Some(env) = &t.token_env {
                check_env_name(&format!("tenants[{i}].token_env"), env)?;
            }
            if t.token_env.is_none() && t.token_hashes.is_empty() {
                return Err(format!(
                    "tenant {:?}: set `token_env` or `token_hashes`, or no client can authenticate",
                    t.id
                ));
            }
            if let Some(th) = t.review_threshold
                && !(th > 0.0 && th <= 1.0)
            {
                return Err(format!(
                    "key `tenants[{i}].review_threshold`: {th} is not in (0, 1]"
                ));
            }
            if let Some((j, _)) = t
                .group_roles
                .iter()
                .enumerate()
                .find(|(_, r)| r.role.trim().is_empty() || r.group.trim().is_empty())
            {
                return Err(format!(
                    "key `tenants[{i}].group_roles[{j}]`: group and role must not be empty"
                ));
            }
            if !t.group_rules.is_empty() && t.bundle.is_none() {
                return Err(format!(
                    "key `tenants[{i}].group_rules`: group rules need a `bundle` to name archetypes"
                ));
            }
            // A rule that can never apply was taken without a word: an empty group names
            // none, and the first rule naming a group wins, so a second one giving the
            // same `group` is dead. (Only the same text: one in another letter case may
            // name another group by its externalId or id, which match exactly.)
            for (j, r) in t.group_rules.iter().enumerate() {
                if r.group.trim().is_empty() {
                    return Err(format!(
                        "key `tenants[{i}].group_rules[{j}]`: group must not be empty"
                    ));
                }
                if let Some(k) = t.group_rules[..j].iter().position(|e| e.group == r.group) {
                    return Err(format!(
                        "key `tenants[{i}].group_rules[{j}]`: group_rules[{k}] gives the group {:?} already, and the first rule that names a group wins: this one would never apply; keep one",
                        r.group
                    ));
                }
            }
            for (j, h) in t.token_hashes.iter().enumerate() {
                let hash = TokenHash::parse(h).map_err(|e: TokenHashError| {
                    format!("key `tenants[{i}].token_hashes[{j}]`: {e}")
                })?;
                if let Some(other) = hash_owner.insert(hash, &t.id)
                    && *other != t.id
                {
                    return Err(format!(
                        "key `tenants[{i}].token_hashes[{j}]`: tenant {other:?} lists the same hash, so one token would open both tenants; give each tenant a token of its own (`rosterd token new`)"
                    ));
                }
            }
            if let Some(var) = &t.token_env
                && let Some(other) = env_owner.insert(var, &t.id)
            {
                return Err(format!(
                    "key `tenants[{i}].token_env`: tenant {other:?} reads its token from {} too, so one token would open both tenants; give each tenant a variable of its own",
                    shown_env_name(var)
                ));
            }
        }
        Ok(())
    }

    /// A path from the config file, resolved against the config file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The backup directory, resolved (see [`BackupConfig::dir`]).
    pub fn backup_dir(&self) -> PathBuf {
        match &self.backup.dir {
            Some(d) => self.resolve(d),
            None => {
                let data = self.resolve(&self.server.data_dir);
                let data = std::path::absolute(&data).unwrap_or(data);
                let mut name = data.file_name().unwrap_or_default().to_os_string();
                name.push("-backups");
                data.with_file_name(name)
            }
        }
    }

    /// The connectors directory, resolved.
    pub fn connectors_dir(&self) -> PathBuf {
        let dir = self.connectors.dir.as_deref();
        self.resolve(dir.unwrap_or(Path::new(DEFAULT_CONNECTORS_DIR)))
    }

    /// The config file, for messages (empty for a config parsed from text).
    fn file(&self) -> PathBuf {
        self.source
            .as_ref()
            .map(|(p, _)| p.clone())
            .unwrap_or_default()
    }

    /// A connectors directory named in the config must be readable: `serve` refuses to
    /// start without it, as it would for any other key that does not work. Without the
    /// key, a missing default directory is fine (`Ok(false)`: no connectors); one that
    /// exists but cannot be read is not.
    pub fn check_connectors_dir(&self) -> Result<bool, ConfigError> {
        let dir = self.connectors_dir();
        // Named `.` (or the config's own directory), config.toml was read as a connector
        // file and refused for its first key, which named no cause.
        let own = self.source.as_ref().map(|(p, _)| p.as_path());
        let parent = |p: &Path| p.parent().map(Path::to_path_buf);
        // Where the file is named, and where it is if that is a link.
        if let Some(own) = own.filter(|p| p.extension().is_some_and(|e| e == "toml"))
            && let Ok(real) = std::fs::canonicalize(&dir)
            && [
                std::fs::canonicalize(own).ok().and_then(|p| parent(&p)),
                std::path::absolute(own)
                    .ok()
                    .and_then(|p| parent(&p))
                    .and_then(|p| std::fs::canonicalize(p).ok()),
            ]
            .contains(&Some(real))
        {
            return Err(ConfigError::Invalid {
                path: self.file(),
                message: format!(
                    "key `connectors.dir`: {} holds this config file, which would be read as a connector file; give the connectors a directory of their own (the example's is `connectors`)",
                    dir.display()
                ),
            });
        }
        match std::fs::read_dir(&dir) {
            Ok(_) => Ok(true),
            Err(e) if self.connectors.dir.is_none() && e.kind() == std::io::ErrorKind::NotFound => {
                Ok(false)
            }
            Err(e) => Err(ConfigError::Invalid {
                path: self.file(),
                message: format!(
                    "key `connectors.dir`: cannot read the connectors directory {}: {e}; {}{}",
                    dir.display(),
                    match e.kind() {
                        std::io::ErrorKind::NotFound => "create it (it may stay empty)",
                        std::io::ErrorKind::NotADirectory => {
                            "name a directory, which holds one file per connector"
                        }
                        _ => "let the user rosterd runs as read it",
                    },
                    if self.connectors.dir.is_some() {
                        ", or remove the key if no connector is wanted"
                    } else {
                        ""
                    }
                ),
            }),
        }
    }

    /// The backup directory and the data directory must not hold one another: a backup
    /// inside what it backs up would be lost with it (and `store rewrite` would copy every
    /// backup), and a data directory among the backups (a daemon started on a backup
    /// where it lies) would be removed with the old backups.
    pub fn check_backup_dir(&self) -> Result<(), ConfigError> {
        self.check_backups_in(&self.backup_dir(), "key `backup.dir`")
    }

    /// [`Config::check_backup_dir`] for backups written into `dir` instead, which the
    /// message calls `named` (`store backup --to DIR`).
    pub fn check_backups_in(&self, dir: &Path, named: &str) -> Result<(), ConfigError> {
        // `..` taken lexically here, as a path with a link in it is resolved below.
        let lexical = |p: PathBuf| {
            let p = std::path::absolute(&p).unwrap_or(p);
            p.components().fold(PathBuf::new(), |mut out, c| {
                match c {
                    std::path::Component::ParentDir => {
                        out.pop();
                    }
                    c => out.push(c),
                }
                out
            })
        };
        let (backups, data) = (
            lexical(dir.to_owned()),
            lexical(self.resolve(&self.server.data_dir)),
        );
        let (real_backups, real_data) = (real_path(&backups), real_path(&data));
        let within =
            |a: &Path, b: &Path, ra: &Path, rb: &Path| a.starts_with(b) || ra.starts_with(rb);
        let message = if within(&backups, &data, &real_backups, &real_data) {
            format!(
                "{named}: {} is inside the data directory {}; name a directory outside it (the default is beside it, {}-backups)",
                backups.display(),
                data.display(),
                data.file_name().unwrap_or_default().to_string_lossy()
            )
        } else if within(&data, &backups, &real_data, &real_backups) {
            format!(
                "{named}: the data directory {} is inside the backup directory {}, where it would be removed as an old backup; to start on a backup, copy it to the data directory first (`cp -a`)",
                data.display(),
                backups.display()
            )
        } else {
            return Ok(());
        };
        Err(ConfigError::Invalid {
            path: self.file(),
            message,
        })
    }

    /// Load the connectors directory: the good files, and what was wrong with the rest.
    pub fn load_connectors(&self) -> crate::connectors::Loaded {
        self.load_connectors_keeping(&Default::default(), None)
    }

    /// Load the connectors directory on a reload: on a name clash, the running
    /// connector's file (`running`: name → file) keeps the name. A default directory
    /// that does not exist (the key left out) loads as none.
    /// `now`: config.toml as it is now (see [`OnDisk`]), whose new tenants a connector
    /// may already name.
    pub fn load_connectors_keeping(
        &self,
        running: &std::collections::BTreeMap<String, std::path::PathBuf>,
        now: Option<&OnDisk>,
    ) -> crate::connectors::Loaded {
        // The default directory missing is no connectors, but at a reload with connectors
        // loaded from it, it is a directory that cannot be read (a volume not mounted, a
        // move), as one the config names is: taken for no connector file at all, it
        // retired every connector, and compaction dropped what they had not delivered.
        if let Ok(false) = self.check_connectors_dir()
            && running.is_empty()
        {
            return crate::connectors::Loaded::default();
        }
        let tenants: Vec<&str> = self.tenants.iter().map(|t| t.id.as_str()).collect();
        let added: Vec<&str> = now
            .and_then(|n| n.edited.as_ref())
            .into_iter()
            .flat_map(|c| &c.tenants)
            .map(|t| t.id.as_str())
            .filter(|t| !tenants.contains(t))
            .collect();
        let unread = now.is_some_and(|n| n.error.is_some());
        let mut loaded = crate::connectors::load_dir_keeping(
            &self.connectors_dir(),
            &tenants,
            (!unread).then_some(&added[..]),
            running,
        );
        loaded.refuse_csv_inside(&self.server.data_dir, "the store's data directory");
        loaded.refuse_csv_over(&self.files_read());
        loaded
    }

    /// The files this config makes rosterd read, resolved: itself, the bundles and the
    /// Roster API's key files.
    fn files_read(&self) -> Vec<PathBuf> {
        let jwt = self.api.jwt.as_ref();
        let keys = jwt.into_iter().flat_map(|j| &j.public_keys);
        let jwks = jwt.and_then(|j| j.jwks_file.as_ref());
        let bundles = self.tenants.iter().filter_map(|t| t.bundle.as_ref());
        let mut files: Vec<PathBuf> = bundles
            .chain(keys)
            .chain(jwks)
            .map(|p| self.resolve(p))
            .collect();
        // As named on the command line: from the working directory.
        let own = self.source.as_ref().map(|(p, _)| p);
        files.extend(own.map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())));
        files
    }

    /// The base URL clients see, without a trailing slash.
    pub fn public_url(&self, bound: SocketAddr) -> String {
        match &self.server.public_url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => format!("http://{bound}"),
        }
    }
}

/// The keys two config texts give differently, but for what a reload applies of the
/// tenants' SCIM tokens (and comments and layout): `token_hashes`, and a `token_env`
/// removed. A `token_env` added or renamed names a variable the daemon read only at its
/// start: a restart applies it (and fails if it is not set), so it stays a change, and a
/// reload keeps the one in force ([`Config::tenants_for_token_reload`]). A
/// reload said only "tenants, group rules, server, schedules" wait: an operator who
/// edited a tenant's `bundle` or `allow_overrides` and reloaded took the edit as live.
fn keys_but_tokens(a: &str, b: &str) -> Vec<String> {
    fn tenants(v: &mut toml::Table) -> impl Iterator<Item = &mut toml::Table> {
        v.get_mut("tenants")
            .and_then(toml::Value::as_array_mut)
            .into_iter()
            .flatten()
            .filter_map(toml::Value::as_table_mut)
    }
    let (Ok(mut x), Ok(mut y)) = (a.parse::<toml::Table>(), b.parse::<toml::Table>()) else {
        return vec!["(the whole file)".to_owned()];
    };
    let id = |t: &toml::Table| t.get("id").and_then(toml::Value::as_str).map(str::to_owned);
    let env_before: Vec<(Option<String>, Option<toml::Value>)> = tenants(&mut x)
        .map(|t| (id(t), t.get("token_env").cloned()))
        .collect();
    let mut applied = std::collections::HashSet::new();
    for t in tenants(&mut y) {
        let env = t.get("token_env");
        let before = env_before.iter().find(|(i, _)| *i == id(t));
        if env.is_none() || before.is_some_and(|(_, e)| e.as_ref() == env) {
            applied.insert(id(t));
        }
    }
    for v in [&mut x, &mut y] {
        for t in tenants(v) {
            t.remove("token_hashes");
            if applied.contains(&id(t)) {
                t.remove("token_env");
            }
        }
    }
    let mut out = Vec::new();
    differing_keys("", &x, &y, &mut out);
    out
}

/// The most keys [`waiting_list`] names; an edit of a hundred tenants would fill a line.
const WAITING_NAMED: usize = 12;

/// [`OnDisk::waiting`] as one line for the log and the CLI.
pub fn waiting_list(keys: &[String]) -> String {
    let mut out = keys
        .iter()
        .take(WAITING_NAMED)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > WAITING_NAMED {
        out.push_str(&format!(" and {} more", keys.len() - WAITING_NAMED));
    }
    out
}

/// The dotted keys `a` and `b` give differently, into `out`; tenants by their `id`.
fn differing_keys(prefix: &str, a: &toml::Table, b: &toml::Table, out: &mut Vec<String>) {
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for k in keys {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match (a.get(k), b.get(k)) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                differing_keys(&path, x, y, out);
            }
            // A table added or removed names its keys: `[log]` added for `format` alone.
            (Some(toml::Value::Table(x)), None) => {
                differing_keys(&path, x, &toml::Table::new(), out);
            }
            (None, Some(toml::Value::Table(y))) => {
                differing_keys(&path, &toml::Table::new(), y, out);
            }
            (Some(toml::Value::Array(x)), Some(toml::Value::Array(y)))
                if path == "tenants" && x != y =>
            {
                let by_id = |list: &[toml::Value]| -> Option<std::collections::BTreeMap<String, toml::Table>> {
                    list.iter()
                        .map(|t| {
                            let t = t.as_table()?;
                            Some((t.get("id")?.as_str()?.to_owned(), t.clone()))
                        })
                        .collect()
                };
                let (Some(x), Some(y)) = (by_id(x), by_id(y)) else {
                    out.push(path);
                    continue;
                };
                let ids: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for id in ids {
                    match (x.get(id), y.get(id)) {
                        (Some(s), Some(t)) => differing_keys(&format!("tenants.{id}"), s, t, out),
                        (None, _) => out.push(format!("tenants.{id} (added)")),
                        (_, None) => out.push(format!("tenants.{id} (removed)")),
                    }
                }
            }
            (x, y) if x != y => out.push(path),
            _ => {}
        }
    }
}

/// A `*_env` key's value must be a name a variable can have: letters, digits and `_`,
/// not starting with a digit (POSIX; systemd's `EnvironmentFile=` sets no other). A
/// token pasted in its place (`token_env = "s3cr3t-…"`) was only a warning to
/// `check-config`, which looked it up as a variable not set there, and `serve` then
/// refused to start.
pub fn check_env_name(key: &str, value: &str) -> Result<(), String> {
    let ok = value.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        return Ok(());
    }
    Err(format!(
        "key `{key}`: {} is not an environment variable's name (a name is letters, digits and `_`, not starting with a digit; the key names the variable holding the secret, e.g. \"ROSTERD_DEMO_TOKEN\", not the secret)",
        shown_env_name(value)
    ))
}

/// An environment variable's name as errors show it. A secret pasted where its name
/// belongs (`token_env = "eyJ…"`, or `SCIM_TOKEN=abc…` copied from an env file) would be
/// printed back into the log, `/status` (which needs no token) and the terminal; a value
/// that is no variable's name shows only its first four characters and its length, and
/// a `NAME=value` only its name.
pub fn shown_env_name(var: &str) -> String {
    if is_env_name(var) {
        return var.to_owned();
    }
    if let Some((name, _)) = var.split_once('=')
        && is_env_name(name.trim())
    {
        return format!("\"{}=…\"", name.trim());
    }
    let head: String = var.chars().take(4).collect();
    format!("\"{head}…\" ({} characters)", var.chars().count())
}

/// Whether `s` reads as an environment variable's name, shown in errors as it is: capitals,
/// digits and `_`, as names are written. Lower case is a secret's: half the tokens
/// `rosterd token new` prints (`rsd_` and base64url) have no `-`, and an audit saw one
/// pasted into `token_env` printed whole; so can a Standard Webhooks secret be.
fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// A TOML error as shown. The parser quotes the line it stopped at, and serde quotes a
/// value it could not take, so a secret written into the file (`client_secret = "…"`
/// where only `client_secret_env` is a key, a token pasted into `token_env`) went to the
/// terminal, the log and `/status`. Every value `source` gives a secret-looking key (see
/// [`secret_span`]), and every line of a multi-line string it starts, is shown as `*`
/// wherever it appears in the message, which keeps a caret under the column it points
/// at; the rest is as the parser wrote it.
pub fn masked_toml_error(message: &str, source: &str) -> String {
    let mut secrets: Vec<String> = Vec::new();
    let mut open: Option<&str> = None;
    for line in source.lines() {
        if let Some(delim) = open {
            secrets.push(line.trim().to_owned());
            if line.contains(delim) {
                open = None;
            }
            continue;
        }
        let chars: Vec<char> = line.chars().collect();
        if let Some((start, end)) = secret_span(line) {
            let value: String = chars[start..end].iter().collect();
            let trimmed = value.trim();
            for delim in ["\"\"\"", "\'\'\'"] {
                if trimmed.starts_with(delim) && trimmed[3..].find(delim).is_none() {
                    open = Some(delim);
                }
            }
            // An array that goes on to later lines: each is a secret too.
            if trimmed.starts_with('[') && !trimmed.contains(']') {
                open = Some("]");
            }
            // A plain string's quotes stay shown (serde quotes it without them).
            let quoted = trimmed.len() >= 2
                && (trimmed.starts_with('"') && trimmed.ends_with('"')
                    || trimmed.starts_with('\'') && trimmed.ends_with('\''));
            let shown = if quoted {
                &trimmed[1..trimmed.len() - 1]
            } else {
                trimmed
            };
            secrets.push(shown.to_owned());
            // serde quotes the value as parsed, its escapes resolved.
            secrets.push(unescaped(shown));
        }
        secrets.extend(url_credentials(line));
    }
    secrets.retain(|s| s.chars().count() >= 4);
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut out = message.to_owned();
    for secret in &secrets {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), &"*".repeat(secret.chars().count()));
        }
    }
    crate::text::clip_lines(&out).into_owned()
}

/// A TOML basic string's escapes resolved (`\"`, `\\`, `\uXXXX`, `\UXXXXXXXX`, `\t`, …),
/// as the parsed value serde quotes reads; anything else as written.
fn unescaped(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(n @ ('u' | 'U')) => {
                let hex: String = chars.by_ref().take(if n == 'u' { 4 } else { 8 }).collect();
                match u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                    Some(c) => out.push(c),
                    None => out.push_str(&hex),
                }
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// The credentials a URL on this line carries (user name, password, query values): a
/// `*_url` key's value is shown, as the mistake is often in it, but not those.
fn url_credentials(line: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (at, _) in line.match_indices("://") {
        // Past the character found, which may be more than a byte (a “quoted” URL).
        let start = line[..at]
            .char_indices()
            .rfind(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |(i, c)| i + c.len_utf8());
        let end = line[at..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ','))
            .map_or(line.len(), |e| at + e);
        if let Ok(url) = reqwest::Url::parse(&line[start..end]) {
            found.extend(url_secrets(&url));
        }
    }
    found
}

/// What in a URL may be a credential: the user name, the password and the query's
/// values, decoded and as written. The log and a kept answer leave them out.
pub(crate) fn url_secrets(url: &reqwest::Url) -> Vec<String> {
    let mut found = vec![url.username().to_owned()];
    found.extend(url.password().map(str::to_owned));
    // What the Basic header carries (in base64, which `redact` also looks for): the user
    // name's base64 alone is its start, and taken out on its own it left a letter of it.
    if let Some(password) = url.password() {
        found.push(format!("{}:{password}", url.username()));
    }
    found.extend(url.query_pairs().map(|(_, v)| v.into_owned()));
    found.extend(url.query().into_iter().flat_map(|q| {
        q.split('&')
            .filter_map(|p| p.split_once('=').map(|(_, v)| v.to_owned()))
            .collect::<Vec<_>>()
    }));
    found
}

/// The character range of one TOML line that holds a secret: the value of a key that
/// names a secret (`client_secret`, `token`, `password`, `api-key`, `hmac`, …) to the end
/// of the line, whatever its shape (string, array, a triple-quoted string); and in a
/// `*_env` key, the value unless it is a variable's name, and anything after that name.
fn secret_span(text: &str) -> Option<(usize, usize)> {
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '=' {
            i += 1;
            continue;
        }
        // The key before `=`: the last dotted part of a bare or quoted key.
        let mut k = i;
        while k > 0 && chars[k - 1].is_whitespace() {
            k -= 1;
        }
        let key_end = k;
        while k > 0
            && (chars[k - 1].is_alphanumeric() || matches!(chars[k - 1], '_' | '-' | '"' | '\''))
        {
            k -= 1;
        }
        let key: String = chars[k..key_end]
            .iter()
            .filter(|c| !matches!(c, '"' | '\''))
            .collect::<String>()
            .to_ascii_lowercase();
        let mut v = i + 1;
        while v < chars.len() && chars[v].is_whitespace() {
            v += 1;
        }
        let secretish = [
            "secret",
            "token",
            "password",
            "passwd",
            "pass",
            "credential",
            "private",
            "apikey",
            "api_key",
            "api-key",
            "bearer",
            "hmac",
            "signing",
        ]
        .iter()
        .any(|w| key.contains(w))
            || key.ends_with("key")
            || key == "authorization"
            || key == "jwt"
            // Keys of other tools pasted in (`scim_auth`, `pwd`, `session_cookie`):
            // rosterd's own `client_auth` holds only a method's name.
            || (key.contains("auth") && key != "auth" && key != "client_auth")
            || ["pwd", "cookie", "session", "salt", "signature"]
                .iter()
                .any(|w| key.contains(w))
            || key.contains("cred")
            || ["pin", "pins", "sig", "sid", "otp"]
                .iter()
                .any(|w| key == *w || key.ends_with(&format!("_{w}")))
            // `auth = { … }` is a table, whose keys are looked at one by one.
            || (key == "auth" && chars.get(v) != Some(&'{'));
        // A URL's value is what its error is about, and names no secret of its own.
        if !secretish || key.ends_with("_url") || v >= chars.len() {
            i += 1;
            continue;
        }
        if key.ends_with("_env") {
            // A quoted variable's name stays shown: it helps find the mistake.
            let quoted_name = matches!(chars[v], '"' | '\'')
                .then(|| {
                    let q = chars[v];
                    let close = chars[v + 1..].iter().position(|&c| c == q)? + v + 1;
                    let name: String = chars[v + 1..close].iter().collect();
                    is_env_name(&name).then_some(close + 1)
                })
                .flatten();
            match quoted_name {
                // The end of the line, a comment, or the next key of an inline table.
                Some(after) => {
                    let next = chars[after..].iter().find(|c| !c.is_whitespace());
                    if matches!(next, None | Some(',' | '}' | '#')) {
                        i = after;
                        continue;
                    }
                    return Some((after, chars.len()));
                }
                None => return Some((v, chars.len())),
            }
        }
        // The rest of the line is the value's, whatever `=` it holds.
        return Some((v, chars.len()));
    }
    None
}

/// Each tenant of `tenants` (by id) whose `token_env` is not the one in force (`in_force`,
/// by tenant), with the variable it names: one added, renamed, or named again after a
/// reload took it out of force. It waits for a restart, which reads it then.
pub fn token_envs_waiting<'a>(
    tenants: &'a [TenantConfig],
    in_force: &'a std::collections::HashMap<String, Option<String>>,
) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
    tenants.iter().filter_map(move |t| {
        let var = t.token_env.as_deref()?;
        let current = in_force.get(&t.id)?;
        (current.as_deref() != Some(var)).then_some((t.id.as_str(), var))
    })
}

#[cfg(test)]
mod tests {

    /// Each tenant's `token_env` as `config` starts it: what a reload measures against
    /// until one is removed.
    fn started_envs(config: &Config) -> std::collections::HashMap<String, Option<String>> {
        config
            .tenants
            .iter()
            .map(|t| (t.id.clone(), t.token_env.clone()))
            .collect()
    }
    use super::*;

    #[test]
    fn a_group_is_named_in_any_case_beyond_ascii() {
        let named = |pattern: &str, name: &str| names_group(pattern, "g1", Some(name), Some("X-1"));
        assert!(named("Équipe Design", "équipe design"));
        assert!(named("équipe design", "ÉQUIPE DESIGN"));
        assert!(named("Equipe Design", "EQUIPE design"));
        assert!(!named("Équipe Design", "Equipe Design"));
        assert!(named("g1", "anything") && named("X-1", "anything"));
        assert!(
            !named("x-1", "anything"),
            "an externalId is matched as it is"
        );
    }

    /// The default connectors directory gone at a reload, with connectors loaded from it
    /// running, is a directory that cannot be read, as one the config names is: taken for
    /// no connector file at all, it retired every connector. With none running (at a
    /// start), it is no connectors.
    #[test]
    fn the_default_connectors_directory_gone_at_a_reload_does_not_read_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let c = Config::parse("version = 1\n", &path).unwrap();
        assert!(c.connectors.dir.is_none());
        let running: std::collections::BTreeMap<String, PathBuf> =
            [("sis".to_owned(), c.connectors_dir().join("sis.toml"))].into();
        let at_start = c.load_connectors();
        assert!(!at_start.dir_unreadable && at_start.errors.is_empty());
        let at_reload = c.load_connectors_keeping(&running, None);
        assert!(at_reload.dir_unreadable, "{:?}", at_reload.errors);
        assert!(
            at_reload.errors[0]
                .to_string()
                .contains("cannot read the connectors directory"),
            "{:?}",
            at_reload.errors
        );
    }

    /// A connectors directory that holds config.toml is refused, saying so: config.toml
    /// was read as a connector file, refused for a key it holds.
    #[test]
    fn the_connectors_directory_may_not_hold_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        for (named, refused) in [(".", true), ("./", true), ("connectors", false)] {
            let text = format!("version = 1\n[connectors]\ndir = \"{named}\"\n");
            std::fs::write(&path, &text).unwrap();
            std::fs::create_dir_all(dir.path().join("connectors")).unwrap();
            let c = Config::parse(&text, &path).unwrap();
            match c.check_connectors_dir() {
                Err(e) if refused => assert!(
                    e.to_string().contains("holds this config file"),
                    "{named}: {e}"
                ),
                other => assert_eq!(other.is_ok(), !refused, "{named}: {other:?}"),
            }
        }
    }

    /// A group rule that could never apply is refused: an empty group, or a second rule
    /// giving the `group` an earlier one gives (the first match wins).
    #[test]
    fn a_group_rule_that_could_never_apply_is_refused() {
        let config = |rules: &str| {
            Config::parse(
                &format!(
                    "version = 1\n[[tenants]]\nid = \"t\"\ntoken_env = \"T\"\nbundle = \"b.toml\"\ngroup_rules = [{rules}]\n"
                ),
                Path::new("config.toml"),
            )
        };
        assert!(
            config(r#"{ group = "Leads", archetype = "a" }, { group = "Ops", archetype = "b" }"#)
                .is_ok()
        );
        let e = config(r#"{ group = " ", archetype = "a" }"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("group_rules[0]`: group must not be empty"),
            "{e}"
        );
        let e = config(
            r#"{ group = "Engineering Leads", archetype = "a" }, { group = "Engineering Leads", archetype = "b" }"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("group_rules[1]") && e.contains("would never apply"),
            "{e}"
        );
        // In another letter case it may name another group, by its externalId.
        assert!(
            config(r#"{ group = "Eng", archetype = "a" }, { group = "ENG", archetype = "b" }"#)
                .is_ok()
        );
    }

    /// What a CSV connector may not write over: the config file, every bundle and every
    /// key file, resolved as the daemon reads them.
    #[test]
    fn the_files_read_are_the_config_its_bundles_and_its_key_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let c = Config::parse(
            "version = 1\n[[tenants]]\nid = \"a\"\ntoken_env = \"A\"\nbundle = \"b/a.toml\"\n[[tenants]]\nid = \"b\"\ntoken_env = \"B\"\n[api.jwt]\naudience = [\"x\"]\nissuer = \"i\"\npublic_keys = [\"keys/k.pem\", \"/etc/k2.pem\"]\njwks_file = \"keys/jwks.json\"\n",
            &path,
        )
        .unwrap();
        let mut read = c.files_read();
        read.sort();
        let mut want = vec![
            dir.path().join("b/a.toml"),
            dir.path().join("keys/k.pem"),
            PathBuf::from("/etc/k2.pem"),
            dir.path().join("keys/jwks.json"),
            path.clone(),
        ];
        want.sort();
        assert_eq!(read, want);
    }

    /// Backups go beside the data directory unless told, never inside it (a link to a
    /// place inside it included), and `keep` is bounded.
    #[test]
    fn the_backup_directory_lies_outside_the_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let config = |extra: &str| {
            Config::parse(
                &format!("version = 1\n[server]\ndata_dir = \"state/data\"\n{extra}"),
                &path,
            )
        };
        let c = config("").unwrap();
        assert_eq!(c.backup_dir(), dir.path().join("state/data-backups"));
        assert!(c.check_backup_dir().is_ok());
        let c = config("[backup]\ndir = \"/srv/backups\"\nkeep = 2\n").unwrap();
        assert_eq!(
            (c.backup_dir(), c.backup.keep),
            (PathBuf::from("/srv/backups"), 2)
        );
        for inside in ["state/data", "state/data/backups", "state/data/../data/b"] {
            let c = config(&format!("[backup]\ndir = {inside:?}\n")).unwrap();
            let e = c.check_backup_dir().unwrap_err().to_string();
            assert!(e.contains("is inside the data directory"), "{inside}: {e}");
        }
        std::fs::create_dir_all(dir.path().join("state/data/b")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("state/data/b"), dir.path().join("link"))
            .unwrap();
        let c = config("[backup]\ndir = \"link\"\n").unwrap();
        assert!(c.check_backup_dir().is_err());
        // Through a link to the data directory, to a place not made yet.
        std::os::unix::fs::symlink(dir.path().join("state/data"), dir.path().join("datalink"))
            .unwrap();
        let c = config("[backup]\ndir = \"datalink/not/yet\"\n").unwrap();
        let e = c.check_backup_dir().unwrap_err().to_string();
        assert!(e.contains("is inside the data directory"), "{e}");
        // A link to a place inside it that is not made yet.
        std::os::unix::fs::symlink(
            dir.path().join("state/data/later"),
            dir.path().join("dangling"),
        )
        .unwrap();
        let c = config("[backup]\ndir = \"dangling\"\n").unwrap();
        let e = c.check_backup_dir().unwrap_err().to_string();
        assert!(e.contains("is inside the data directory"), "{e}");
        // A data directory among the backups would be pruned as one.
        for backups in ["state", "state/data/.."] {
            let c = config(&format!("[backup]\ndir = {backups:?}\n")).unwrap();
            let e = c.check_backup_dir().unwrap_err().to_string();
            assert!(
                e.contains("is inside the backup directory"),
                "{backups}: {e}"
            );
        }
        for keep in [0, 1001] {
            let e = config(&format!("[backup]\nkeep = {keep}\n")).unwrap_err();
            assert!(e.to_string().contains("backup.keep"), "{e}");
        }
        assert!(config("[backup]\nkept = 3\n").is_err());
    }

    /// A pipe, a device or a directory named as a configuration file is refused at
    /// once: reading a pipe blocked for good, and /dev/zero ran out of memory.
    #[test]
    fn only_a_regular_file_is_read_as_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("config.toml");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let gone = dir.path().join("gone.toml");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &gone).unwrap();
        for (path, says) in [
            (fifo.as_path(), "not a regular file"),
            (Path::new("/dev/zero"), "not a regular file"),
            (dir.path(), "a directory"),
            (
                gone.as_path(),
                "a symbolic link whose target cannot be read",
            ),
        ] {
            let e = read_file(path, FileKind::Connector)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{}: {e}", path.display());
        }
        let err = Config::load(&fifo).unwrap_err().to_string();
        assert!(err.contains("config.toml"), "{err}");
        let file = dir.path().join("ok.toml");
        std::fs::write(&file, "x = 1\n").unwrap();
        assert_eq!(read_file(&file, FileKind::Connector).unwrap(), b"x = 1\n");
        // Each kind of file has its own bound: a connector file of nested arrays took a
        // reload to 2 GB inside the one 64 MiB bound all kinds had.
        let big = dir.path().join("big.toml");
        let text = format!("x = [{}]\n", "[],".repeat(400_000));
        std::fs::write(&big, &text).unwrap();
        for kind in [FileKind::Connector, FileKind::Key] {
            let e = read_file(&big, kind).unwrap_err().to_string();
            assert!(e.contains("at most 1048576"), "{e}");
        }
        assert_eq!(read_file(&big, FileKind::Bundle).unwrap().len(), text.len());
        assert_eq!(read_file(&big, FileKind::Config).unwrap().len(), text.len());
    }

    /// A pipe that takes a file's place between a look at the path and the open does not
    /// block the reader: it blocked a reload, and the daemon with it, until something
    /// wrote to the pipe. A file and a pipe swap under one name while it is read; every
    /// pipe is then opened for writing, which wakes a reader stuck on one, and such a
    /// reader gets the pipe's empty text, which the test refuses.
    #[test]
    fn a_pipe_swapped_in_for_a_file_never_blocks_the_read() {
        use std::os::unix::ffi::OsStrExt as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "x = 1\n").unwrap();
        let mkfifo = |p: &Path| {
            let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        };
        const SWAPS: usize = 3000;
        let swapping = std::sync::Arc::new(AtomicBool::new(true));
        let reader = {
            let (path, swapping) = (path.clone(), swapping.clone());
            std::thread::spawn(move || {
                let mut reads = 0usize;
                while swapping.load(Ordering::Relaxed) || reads < 100 {
                    reads += 1;
                    if let Ok(bytes) = read_file(&path, FileKind::Connector) {
                        assert_eq!(bytes, b"x = 1\n", "read {reads} got a pipe's text");
                    }
                }
            })
        };
        for i in 0..SWAPS {
            // Each pipe keeps a name of its own, to be opened for writing below.
            let fifo = dir.path().join(format!("fifo-{i}"));
            mkfifo(&fifo);
            let tmp = dir.path().join("tmp");
            std::fs::hard_link(&fifo, &tmp).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
            std::fs::write(&tmp, "x = 1\n").unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        }
        swapping.store(false, Ordering::Relaxed);
        while !reader.is_finished() {
            for i in 0..SWAPS {
                // Fails (ENXIO) unless a reader is waiting on this pipe.
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(dir.path().join(format!("fifo-{i}")));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        reader.join().unwrap();
    }

    /// What `[connectors] dir` needs is said for what is wrong with it: a file there
    /// was answered with advice about permissions.
    #[test]
    fn a_connectors_dir_that_is_a_file_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "version = 1\n[connectors]\ndir = \"hooks\"\n").unwrap();
        let config = Config::load(&path).unwrap();
        let advice = |config: &Config| config.check_connectors_dir().unwrap_err().to_string();
        assert!(advice(&config).contains("create it"), "{}", advice(&config));
        std::fs::write(dir.path().join("hooks"), "").unwrap();
        let e = advice(&config);
        assert!(
            e.contains("name a directory") && !e.contains("read it"),
            "{e}"
        );
    }

    #[test]
    fn a_file_that_is_not_utf8_says_where() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        // "Zürich" saved as Latin-1, after a line with a multi-byte character.
        let mut text = b"version = 1\n# \xc3\xa9t\xc3\xa9\n[server]\n# Z".to_vec();
        text.extend_from_slice(b"\xfcrich\n");
        std::fs::write(&path, text).unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("config.toml") && err.contains("line 4, column 4 has the byte 0xfc"),
            "{err}"
        );
    }

    #[test]
    fn an_edit_of_the_file_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "version = 1\n").unwrap();
        let config = Config::load(&path).unwrap();
        assert!(!config.on_disk().changed);
        // Comments, layout and the tenants' tokens are what a reload applies, or nothing.
        std::fs::write(&path, "version = 1\n# a comment\n").unwrap();
        assert!(!config.on_disk().changed);
        std::fs::write(&path, "version = 1\n[server]\ncache_mb = 64\n").unwrap();
        let now = config.on_disk();
        assert!(now.changed && now.error.is_none(), "{now:?}");
        assert_eq!(now.waiting, ["server.cache_mb"]);
        assert!(!Config::load(&path).unwrap().on_disk().changed);
        let tenant = "version = 1\n[[tenants]]\nid = \"t\"\ntoken_hashes = [\"sha256:{h}\"]\n";
        let with_hash = |h: char| tenant.replace("{h}", &h.to_string().repeat(64));
        std::fs::write(&path, with_hash('a')).unwrap();
        let config = Config::load(&path).unwrap();
        std::fs::write(&path, with_hash('b')).unwrap();
        let now = config.on_disk();
        assert!(!now.changed && now.edited.is_some(), "{now:?}");
        // A `token_env` removed is applied by a reload; one added or renamed names a
        // variable read only at start: a restart applies it.
        let with_env =
            |env: &str| with_hash('a').replace("id = \"t\"\n", &format!("id = \"t\"\n{env}"));
        std::fs::write(&path, with_env("token_env = \"OLD\"\n")).unwrap();
        let config = Config::load(&path).unwrap();
        std::fs::write(&path, with_hash('a')).unwrap();
        assert!(!config.on_disk().changed);
        std::fs::write(&path, with_env("token_env = \"NEW\"\n")).unwrap();
        assert_eq!(config.on_disk().waiting, ["tenants.t.token_env"]);
        let config = Config::load(&path).unwrap();
        std::fs::write(&path, with_env("token_env = \"NEW\"\n# rotated\n")).unwrap();
        assert!(!config.on_disk().changed);
        std::fs::write(&path, with_hash('a')).unwrap();
        let config = Config::load(&path).unwrap();
        std::fs::write(&path, with_env("token_env = \"ADDED\"\n")).unwrap();
        let now = config.on_disk();
        assert!(now.changed);
        // Waiting, it is not what a reload puts in force either: the tenant keeps the
        // `token_env` it started with (none), and takes its `token_hashes`.
        let edited = now.edited.expect("the edit loads");
        let applied = Config::tenants_for_token_reload(&edited.tenants, &started_envs(&config));
        assert_eq!(applied[0].token_env, None);
        assert_eq!(applied[0].token_hashes, edited.tenants[0].token_hashes);
        std::fs::write(&path, with_env("token_env = \"OLD\"\n")).unwrap();
        let config = Config::load(&path).unwrap();
        for (env, in_force) in [("NEW", Some("OLD")), ("OLD", Some("OLD"))] {
            std::fs::write(&path, with_env(&format!("token_env = \"{env}\"\n"))).unwrap();
            let edited = Config::load(&path).unwrap();
            let applied = Config::tenants_for_token_reload(&edited.tenants, &started_envs(&config));
            assert_eq!(applied[0].token_env.as_deref(), in_force, "{env}");
        }
        // Once a reload took it out of force (to revoke a leaked token), it stays out when
        // named again, as itself or another: its value is the one read at start.
        let mut revoked = started_envs(&config);
        revoked.values_mut().for_each(|e| *e = None);
        for env in ["OLD", "NEW"] {
            std::fs::write(&path, with_env(&format!("token_env = \"{env}\"\n"))).unwrap();
            let edited = Config::load(&path).unwrap();
            let applied = Config::tenants_for_token_reload(&edited.tenants, &revoked);
            assert_eq!(applied[0].token_env, None, "{env}");
            let waiting = config.on_disk_with_tokens(&revoked).waiting;
            assert!(
                waiting.iter().any(|k| k.ends_with(".token_env")),
                "{env}: {waiting:?}"
            );
        }
        std::fs::write(&path, with_hash('a')).unwrap();
        let edited = Config::load(&path).unwrap();
        assert_eq!(
            Config::tenants_for_token_reload(&edited.tenants, &started_envs(&config))[0].token_env,
            None
        );
        // An edit that would not load is told apart: a restart would fail on it.
        std::fs::write(&path, "version = 1\n[server]\nlistne = 1\n").unwrap();
        let now = config.on_disk();
        assert!(now.changed);
        let err = now.error.expect("the edit does not load").to_string();
        assert!(err.contains("listne"), "{err}");
        // So would a file that is gone.
        std::fs::remove_file(&path).unwrap();
        let now = config.on_disk();
        assert!(now.changed);
        let err = now.error.expect("no file to load").to_string();
        assert!(err.contains("config.toml"), "{err}");
    }

    #[test]
    fn a_public_url_is_an_http_url() {
        let with = |u: &str| {
            Config::parse(
                &format!("version = 1\n[server]\npublic_url = {u:?}\n"),
                Path::new("x"),
            )
        };
        assert!(with("https://rosterd.example.com").is_ok());
        assert!(with("http://10.0.0.1:8080/base").is_ok());
        for (bad, why) in [
            ("rosterd.example.com", "is not a URL"),
            ("ftp://x.example", "not an http(s) URL"),
            ("https://", "is not a URL"),
            ("", "is not a URL"),
            ("https://h.example?x=1", "query or fragment"),
            ("https://h.example#f", "query or fragment"),
            ("https://u:s3cretpw@h.example", "user name or password"),
        ] {
            let err = with(bad).unwrap_err().to_string();
            assert!(
                err.contains("server.public_url") && err.contains(why),
                "{bad:?}: {err}"
            );
            assert!(!err.contains("s3cretpw"), "{err}");
        }
    }

    #[test]
    fn a_log_level_that_is_not_one_is_refused() {
        let parse = |level: &str| {
            Config::parse(
                &format!("version = 1\n[log]\nlevel = {level:?}\n"),
                Path::new("x.toml"),
            )
        };
        for good in [
            "info",
            "DEBUG",
            "rosterd=debug,info",
            "warn,rosterd::server=trace",
            "off",
        ] {
            assert!(parse(good).is_ok(), "{good}: {:?}", parse(good).err());
        }
        for bad in ["verbose", "rosterd=verbose", "info,chatty", ""] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains("log.level"), "{bad}: {err}");
        }
    }

    /// A TOML error is shown with the URLs' credentials masked; a line with a multi-byte
    /// character just before a URL's scheme (“quoted”, pasted from a document) made
    /// that masking panic, and check-config and the start with it.
    #[test]
    fn a_toml_error_beside_a_quoted_url_is_shown() {
        for text in [
            "# Docs: \u{201c}https://example.com/docs\u{201d}\nversion = = 1\n",
            "\u{4b9}://x\nversion = = 1\n",
            "# see \u{ab}https://u:hunter22@h.example/x\u{bb}\nversion = = 1\n",
        ] {
            let err = Config::parse(text, Path::new("x.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("x.toml") && !err.contains("hunter22"), "{err}");
        }
    }

    /// A token pasted where a variable's name belongs is refused by the file's check (so
    /// by `check-config` as by `serve`), shown starred; a name of any case is taken.
    #[test]
    fn an_env_key_holding_what_cannot_be_a_name_is_refused() {
        let parse =
            |text: &str| Config::parse(&format!("version = 1\n{text}\n"), Path::new("x.toml"));
        for (text, key) in [
            (
                "[[tenants]]\nid = \"a\"\ntoken_env = \"s3cr3t-pasted-token-value\"\nbundle = \"b.toml\"",
                "tenants[0].token_env",
            ),
            (
                "[api.jwt]\naudience = [\"a\"]\nhs256_secret_env = \"s3cr3t.jwt+value\"",
                "api.jwt.hs256_secret_env",
            ),
            (
                "[[tenants]]\nid = \"a\"\ntoken_env = \"9S3CR3T\"\nbundle = \"b.toml\"",
                "tenants[0].token_env",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(
                e.contains(key) && e.contains("is not an environment variable's name"),
                "{text}: {e}"
            );
            assert!(!e.contains("3cr3t"), "{e}");
        }
        for good in ["ROSTERD_DEMO_TOKEN", "rosterd_token", "_T1"] {
            crate::config::check_env_name("k", good).unwrap();
        }
        for bad in ["", " T", "T-1", "T=abc", "1T", "été"] {
            assert!(crate::config::check_env_name("k", bad).is_err(), "{bad:?}");
        }
    }

    /// An unknown `@` shortcut is named as one, with those known; croner's own error
    /// said "between 5 and 7 fields" where six are the rule.
    #[test]
    fn an_unknown_schedule_shortcut_names_those_known() {
        for good in ["@daily", "@HOURLY", "@annually", " @weekly "] {
            assert!(parse_cron(good).is_ok(), "{good}");
        }
        let e = parse_cron("@fortnightly").unwrap_err();
        assert!(
            e.contains("@hourly, @daily") && !e.contains("between 5 and 7"),
            "{e}"
        );
    }

    #[test]
    fn a_schedule_that_never_fires_is_refused() {
        let err = Config::parse(
            "version = 1\n[schedules]\nreconcile = \"0 0 0 30 2 *\"\n",
            Path::new("x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("schedules.reconcile") && err.contains("never fires"),
            "{err}"
        );
    }

    #[test]
    fn a_schedule_with_a_year_is_refused() {
        let parse = |expr: &str| {
            Config::parse(
                &format!("version = 1\n[schedules]\nreconcile = {expr:?}\n"),
                Path::new("x.toml"),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        // Fires until 2099 today, and then refuses every start.
        let err = parse("0 0 0 * * * 2026-2099").unwrap_err();
        assert!(
            err.contains("schedules.reconcile") && err.contains("not a year"),
            "{err}"
        );
        parse("0 0 0 * * *").unwrap();
        for shortcut in ["@hourly", "@daily", "@weekly", "@monthly", "@yearly"] {
            parse(shortcut).unwrap();
        }
    }

    #[test]
    fn a_step_as_large_as_its_field_is_refused() {
        let parse = |expr: &str| {
            Config::parse(
                &format!("version = 1\n[schedules]\nreconcile = {expr:?}\n"),
                Path::new("x.toml"),
            )
        };
        for (bad, field) in [
            ("0 */70 * * * *", "minutes"),
            ("*/60 * * * * *", "seconds"),
            ("0 0 */24 * * *", "hours"),
            ("0 0 0 1 1,*/12 *", "month"),
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(
                err.contains("schedules.reconcile") && err.contains(field) && err.contains("step"),
                "{bad}: {err}"
            );
        }
        for good in [
            "0 */59 * * * *",
            "0 0 */23 * * *",
            "0 0 0 */30 * *",
            "0 0 1-5/2 * * *",
        ] {
            assert!(parse(good).is_ok(), "{good}: {:?}", parse(good).err());
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse(
            "version = 1\n[server]\nlisten = \"127.0.0.1:1\"\nlistne = 3\n",
            Path::new("x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("listne"), "{err}");
    }

    /// The error `Config::parse` gives for `text`.
    fn parse_error(text: &str) -> String {
        Config::parse(text, Path::new("x.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_secret_written_where_it_does_not_belong_is_not_printed_back() {
        let err = parse_error;
        let secret = "CANARY-s3cr3t-value-42";
        for line in [
            format!("hs256_secret = \"{secret}\""),
            format!("[api.jwt]\nhs256_secret_env = {secret}"),
            format!("[api.jwt]\nhs256_secret_env = \"{secret}\"\nnope = 1"),
            format!("[[tenants]]\nid = \"a\"\ntoken = \"{secret}\""),
            format!("[[tenants]]\nid = \"a\"\ntoken_env = \"T={secret}\""),
            format!("[[tenants]]\nid = \"a\"\ntoken_env = {secret}"),
            format!("[server]\nlisten = \"127.0.0.1:1\", password = \"{secret}\""),
            format!("client_secret\t=\t\"{secret}\""),
            format!("client_secret = \"\"\"{secret}\"\"\""),
            format!("client_secret = [ \"{secret}\" ]"),
            format!("client_secret = \"\"\"\nfirst\n{secret}\n"),
            format!("[api.jwt]\nhs256_secret_env = \"JWT_SECRET\" \"{secret}\""),
            format!("[[tenants]]\nid = \"a\"\ntoken_hashes = \"{secret}\""),
            format!("[server]\napi-key = \"{secret}\""),
            format!(
                "[[tenants]]\nid = \"a\"\nauth = {{ token_env = \"T\", client_secret = \"{secret}\" }}"
            ),
            // serde quotes the parsed value, its escapes resolved.
            "[[tenants]]\nid = \"a\"\ntoken_hashes = \"CANARY\\u002Ds3cr3t-escaped\"".to_owned(),
            format!("[[tenants]]\nid = \"a\"\ntoken_hashes = [\n  \"{secret}\"\n  \"x\",\n]"),
            format!("[server]\npublic_url = \"https://u:{secret}@h.example/?k={secret}\" oops"),
            format!("[server]\njwt = \"{secret}\""),
            format!("[server]\nauth = \"{secret}\""),
            // Other tools' keys pasted in (an audit read these in /status).
            format!("[[tenants]]\nid = \"a\"\nscim_auth = \"{secret}\""),
            format!("[server]\npwd = \"{secret}\""),
            format!("[server]\nsession_cookie = \"{secret}\""),
            format!("[server]\npin = \"{secret}\""),
            format!("[server]\nwebhook_sig = \"{secret}\""),
            format!("[server]\nsignature = \"{secret}\""),
            format!("[server]\nsalt = \"{secret}\""),
            format!("[server]\npins = [\"{secret}\"]"),
            format!("[server]\ncred = \"{secret}\""),
            format!("[server]\nsession_sid = \"{secret}\""),
            format!("[server]\notp = \"{secret}\""),
        ] {
            let e = err(&format!("version = 1\n{line}\n"));
            assert!(!e.contains("s3cr3t"), "{line}: {e}");
        }
        // The caret stays under the column it names, and a variable's name stays shown.
        let e = err("version = 1\nclient_secret = \"abcdefgh\"\n");
        assert!(e.contains("client_secret = \"********\""), "{e}");
        let e = err("version = 1\n[api.jwt]\nhs256_secret_env = \"JWT_SECRET\"\nnope = 1\n");
        assert!(e.contains("nope"), "{e}");
        let e = err("version = 1\n[api.jwt]\nhs256_secret_env = \"JWT_SECRET\" nope\n");
        assert!(e.contains("hs256_secret_env = \"JWT_SECRET\""), "{e}");
        // Other keys' values are shown as written: they are what the reader must fix.
        let e = err("version = 1\n[server]\nlisten = \"localhost:8080\"\n");
        assert!(e.contains("localhost:8080"), "{e}");

        assert_eq!(shown_env_name("ROSTERD_DEMO_TOKEN"), "ROSTERD_DEMO_TOKEN");
        // `rosterd token new`'s shape, without a `-`.
        assert_eq!(
            shown_env_name("rsd_hSeUiUfK8iJXrzm8VByacYDKCLvEI71AOmS9lG4VmHs"),
            "\"rsd_…\" (47 characters)"
        );
        assert_eq!(shown_env_name("T=abc"), "\"T=…\"");
        assert_eq!(
            shown_env_name("whsec_c2VjcmV0c2VjcmV0"),
            "\"whse…\" (22 characters)"
        );
        assert_eq!(
            shown_env_name("eyJhbGciOi.x.y"),
            "\"eyJh…\" (14 characters)"
        );
    }

    #[test]
    fn common_slips_name_their_remedy() {
        let err = parse_error;
        let e = err("version = 1\n[server]\nlisten = \"localhost:8080\"\n");
        assert!(e.contains("such as 127.0.0.1:8080"), "{e}");
        for env in ["", " ", "T=secret"] {
            let e = err(&format!(
                "version = 1\n[[tenants]]\nid = \"a\"\ntoken_env = {env:?}\n"
            ));
            assert!(
                e.contains("tenants[0].token_env") && e.contains("not an environment variable"),
                "{e}"
            );
        }
        let e = err("version = 1\n[schedules]\ncompact = \"0 61 * * * *\"\n");
        assert!(
            e.contains("schedules.compact") && e.contains("minutes 0-59"),
            "{e}"
        );
    }

    #[test]
    fn tenant_needs_a_token_source() {
        let err = Config::parse("version = 1\n[[tenants]]\nid = \"a\"\n", Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("token_env"), "{err}");
    }

    #[test]
    fn bad_hash_is_reported_with_its_key() {
        let err = Config::parse(
            "version = 1\n[[tenants]]\nid = \"a\"\ntoken_hashes = [\"md5:00\"]\n",
            Path::new("x"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("tenants[0].token_hashes[0]"), "{err}");
    }

    #[test]
    fn a_token_opens_one_tenant_only() {
        let h = "sha256:be71c23c45dd27e29f16f4048cdca30f18ed51d9f4dfb25e726d2d061d678ccd";
        let two = |a: &str, b: &str| {
            Config::parse(
                &format!(
                    "version = 1\n[[tenants]]\nid = \"a\"\n{a}\n[[tenants]]\nid = \"b\"\n{b}\n"
                ),
                Path::new("x"),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        let err = two(
            &format!("token_hashes = [\"{h}\"]"),
            &format!("token_hashes = [\"{h}\"]"),
        )
        .unwrap_err();
        assert!(
            err.contains("tenants[1].token_hashes[0]")
                && err.contains("tenant \"a\" lists the same hash"),
            "{err}"
        );
        let err = two("token_env = \"T\"", "token_env = \"T\"").unwrap_err();
        assert!(
            err.contains("tenants[1].token_env") && err.contains("\"a\""),
            "{err}"
        );
        // A hash listed twice under its own tenant opens nothing more.
        two(
            &format!("token_hashes = [\"{h}\", \"{h}\"]"),
            "token_env = \"T\"",
        )
        .unwrap();
    }

    #[test]
    fn a_group_role_names_a_group_and_a_role() {
        let with = |entry: &str| {
            Config::parse(
                &format!(
                    "version = 1\n[[tenants]]\nid = \"a\"\ntoken_env = \"T\"\ngroup_roles = [{entry}]\n"
                ),
                Path::new("x"),
            )
        };
        assert!(with(r#"{ group = "Admins", role = "admin" }"#).is_ok());
        for bad in [
            r#"{ group = "Admins", role = " " }"#,
            r#"{ group = "", role = "admin" }"#,
        ] {
            let err = with(bad).unwrap_err().to_string();
            assert!(err.contains("tenants[0].group_roles[0]"), "{bad}: {err}");
        }
        let err = with(r#"{ group = "Admins", rol = "admin" }"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("rol"), "{err}");
    }

    #[test]
    fn an_idp_is_a_label_or_refused() {
        let with = |idp: &str| {
            Config::parse(
                &format!(
                    "version = 1\n[[tenants]]\nid = \"a\"\ntoken_env = \"T\"\nidp = {idp:?}\n"
                ),
                Path::new("x"),
            )
        };
        assert!(with("azure-ad").is_ok());
        for bad in ["", "azure ad", "scim:okta"] {
            let err = with(bad).unwrap_err().to_string();
            assert!(err.contains("tenants[0].idp"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn schedules_need_a_seconds_field_and_a_real_zone() {
        let err = Config::parse(
            "version = 1\n[schedules]\nreconcile = \"*/5 * * * *\"\n",
            Path::new("x"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("schedules.reconcile") && err.contains("six fields"),
            "{err}"
        );
        let err = Config::parse(
            "version = 1\n[schedules]\ntimezone = \"Mars/Olympus\"\n",
            Path::new("x"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("schedules.timezone"), "{err}");
        let ok = Config::parse(
            "version = 1\n[schedules]\ntimezone = \"Europe/Berlin\"\nreconcile = \"0 */15 * * * *\"\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(ok.schedules.entries(), [("reconcile", "0 */15 * * * *")]);
    }

    #[test]
    fn a_tiny_page_cache_is_refused() {
        let err = Config::parse("version = 1\n[server]\ncache_mb = 1\n", Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.cache_mb"), "{err}");
    }

    #[test]
    fn a_client_timeout_out_of_range_is_refused() {
        for secs in [0, 3601] {
            let err = Config::parse(
                &format!("version = 1\n[server]\nclient_timeout_secs = {secs}\n"),
                Path::new("x"),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("server.client_timeout_secs"), "{err}");
        }
    }

    #[test]
    fn a_retention_past_what_a_clock_can_subtract_is_refused() {
        let parse = |hours: &str| {
            Config::parse(
                &format!("version = 1\n[schedules]\nchangelog_retention_hours = {hours}\n"),
                Path::new("x"),
            )
        };
        assert!(parse("87600").is_ok());
        for hours in ["87601", "2000000000000", "18446744073709551615"] {
            let err = parse(hours).unwrap_err().to_string();
            assert!(err.contains("changelog_retention_hours"), "{err}");
        }
    }

    #[test]
    fn wrong_version_is_refused() {
        let err = Config::parse("version = 2\n", Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("version"), "{err}");
    }
}
