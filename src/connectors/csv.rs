//! The CSV connector: the roster CSV (the columns of roster-api.txt) and, optionally, a
//! OneRoster 1.2 CSV bundle, written to a directory through a temporary file, fsync and
//! an atomic rename, so a reader never sees half a file.
//!
//! [`write_snapshot`] streams the store: one user, one group or one membership at a time
//! is in memory, whatever the tenant's size.

use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio_util::sync::CancellationToken;

use super::oneroster::{UserFields, enrollment_id};
use super::sourced_id;
use crate::api::neutralize;
use crate::scim::ResourceKind;
use crate::store::{Assignment, Store, StoreError};

/// `[csv]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CsvSettings {
    /// Output directory (relative paths resolve against the connectors directory).
    pub dir: PathBuf,
    /// The roster CSV's file name.
    #[serde(default = "default_file_name")]
    pub file_name: String,
    /// Wait this long after a change for more before writing (on-change mode).
    #[serde(default = "default_debounce_ms")]
    pub debounce_ms: u64,
    /// A cron expression (with seconds field); when set, files are written on this
    /// schedule instead of after changes.
    #[serde(default)]
    pub schedule: Option<String>,
    /// Write at start (or when a reload restarts the connector) when a scheduled write
    /// came due while the daemon was down, as a systemd timer's `Persistent=true`.
    #[serde(default)]
    pub catch_up: bool,
    /// Also write `oneroster.zip`: a OneRoster 1.2 CSV bundle.
    #[serde(default)]
    pub oneroster: Option<OneRosterCsv>,
}

/// `[csv.oneroster]`: what the OneRoster CSV bundle needs beyond the roster.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OneRosterCsv {
    pub org_sourced_id: String,
    pub org_name: String,
    #[serde(default = "default_org_type")]
    pub org_type: String,
    pub course_sourced_id: String,
    /// The course's title, as the REST connector's `course_title`.
    #[serde(default = "super::oneroster::default_course_title")]
    pub course_title: String,
    #[serde(default)]
    pub roles: BTreeMap<String, String>,
    #[serde(default = "default_role")]
    pub default_role: String,
    #[serde(default = "default_role")]
    pub enrollment_role: String,
    /// `source.systemName` of the manifest.
    #[serde(default = "default_system_name")]
    pub system_name: String,
}

fn canonical_or_as_is(dir: &Path) -> PathBuf {
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned())
}

fn default_file_name() -> String {
    "roster.csv".into()
}
fn default_debounce_ms() -> u64 {
    2000
}
const DEBOUNCE_MAX_MS: u64 = 3_600_000;
fn default_org_type() -> String {
    "district".into()
}
fn default_role() -> String {
    "teacher".into()
}
fn default_system_name() -> String {
    "rosterd".into()
}

impl CsvSettings {
    /// The files this connector writes, by where they are: the longest part of the
    /// directory's path that exists is read through its links, and the rest (not made
    /// yet) is taken as written, a `..` undoing the name before it as the kernel will
    /// once it is made. (`link/not-yet/..` is where `link` points.)
    pub(crate) fn files(&self) -> Vec<PathBuf> {
        let parts: Vec<_> = self.dir.components().collect();
        let (mut dir, rest) = (0..=parts.len())
            .rev()
            .find_map(|n| {
                let prefix: PathBuf = parts[..n].iter().collect();
                let found = if n == 0 {
                    Some(PathBuf::new())
                } else {
                    std::fs::canonicalize(&prefix).ok()
                };
                found.map(|p| (p, &parts[n..]))
            })
            .unwrap_or_default();
        for part in rest {
            match part {
                std::path::Component::CurDir => {}
                std::path::Component::ParentDir => {
                    dir.pop();
                }
                other => dir.push(other),
            }
        }
        // The roles file is staged under a name of this process's, never shared.
        let mut names = vec![self.file_name.as_str()];
        if self.oneroster.is_some() {
            names.push(BUNDLE_FILE);
        }
        names.into_iter().map(|n| dir.join(n)).collect()
    }

    /// Whether the files are written in `dir` or below it, both read through links as
    /// far as they exist.
    pub(super) fn written_inside(&self, dir: &Path) -> bool {
        self.written_dir()
            .is_some_and(|d| d.starts_with(canonical_or_as_is(dir)))
    }

    /// The first of `read` (files rosterd reads, as they are named) that this connector
    /// would write over, read through links as its own files are.
    pub(super) fn writes_over<'a>(&self, read: &'a [PathBuf]) -> Option<&'a PathBuf> {
        let files = self.files();
        read.iter().find(|r| {
            // The file a link points to, and the link itself: a rename over a bundle
            // kept as a link (config management does) replaces the link.
            let named = match (r.parent(), r.file_name()) {
                (Some(dir), Some(name)) => canonical_or_as_is(dir).join(name),
                _ => r.to_path_buf(),
            };
            files.contains(&canonical_or_as_is(r)) || files.contains(&named)
        })
    }

    /// Whether the files are written in `dir` itself.
    pub(super) fn written_in(&self, dir: &Path) -> bool {
        self.written_dir()
            .is_some_and(|d| d == canonical_or_as_is(dir))
    }

    fn written_dir(&self) -> Option<PathBuf> {
        self.files()
            .first()
            .and_then(|f| f.parent())
            .map(Path::to_owned)
    }

    /// The turn to write this connector's files. The connector's own write and a
    /// reconciliation's (or the `export` schedule's) run on their own threads; side by
    /// side, the one that read the store first could rename last, and leave the older
    /// roster in place. In turn, the later one reads the store later.
    fn turn(&self) -> Arc<std::sync::Mutex<()>> {
        static TURNS: std::sync::LazyLock<
            std::sync::Mutex<std::collections::HashMap<PathBuf, Arc<std::sync::Mutex<()>>>>,
        > = std::sync::LazyLock::new(Default::default);
        let key = self.files().swap_remove(0);
        TURNS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .clone()
    }

    /// Remove what an interrupted write of this connector left: at each write, and at the
    /// connector's start, so that a nightly file's partial copies (megabytes, with names
    /// a consumer taking every `*.csv` might read) do not lie beside it until night.
    pub fn remove_stale_staged(&self) {
        remove_stale_staged(&self.dir, &[&self.file_name, BUNDLE_FILE, ROLES_SPOOL]);
    }

    pub(super) fn validate(&self) -> Result<(), String> {
        if self.file_name.contains(['/', '\0'])
            || matches!(self.file_name.as_str(), "" | "." | "..")
        {
            return Err(format!(
                "key `file_name`: {:?} must be a plain file name",
                self.file_name
            ));
        }
        if self.oneroster.is_some() && self.file_name == BUNDLE_FILE {
            return Err(format!(
                "key `file_name`: {BUNDLE_FILE:?} is the OneRoster bundle's name; pick another"
            ));
        }
        // At u64::MAX ms the connector never wrote, and said nothing.
        if self.debounce_ms > DEBOUNCE_MAX_MS {
            return Err(format!(
                "key `debounce_ms`: must be at most {DEBOUNCE_MAX_MS} (an hour)"
            ));
        }
        if let Some(s) = &self.schedule {
            crate::config::parse_cron(s).map_err(|e| format!("key `schedule`: {e}"))?;
        } else if self.catch_up {
            return Err(
                "key `catch_up`: needs a `schedule` (it catches up a scheduled write missed while the daemon was down)".into(),
            );
        }
        if let Some(or) = &self.oneroster {
            // What the REST connector checks: the bundle's files are read by the same
            // kind of system, which refuses a role or org type OneRoster does not have.
            super::oneroster::check_roles(
                "oneroster.",
                &or.roles,
                &or.default_role,
                &or.enrollment_role,
            )?;
            if !super::oneroster::valid_org_type(&or.org_type) {
                return Err(format!(
                    "key `oneroster.org_type`: {:?} is not a OneRoster org type (one of {} or ext:…)",
                    or.org_type,
                    super::oneroster::ORG_TYPES.join(", ")
                ));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Writing a snapshot

/// The OneRoster bundle's file name, next to the roster CSV.
pub const BUNDLE_FILE: &str = "oneroster.zip";

/// What [`write_snapshot`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotReport {
    /// Users in the roster CSV, active and inactive.
    pub users: u64,
    /// The files replaced: the roster CSV, then the OneRoster bundle if configured.
    pub files: Vec<PathBuf>,
    /// The tenant's change sequence number when the walk began: every change up to it is
    /// in the files.
    pub seq: u64,
    /// No change was committed while the files were being written, so they agree with
    /// each other and with the store as of `seq`. When false a change landed part-way
    /// (it may or may not be in the files); the next snapshot picks it up.
    pub consistent: bool,
    /// Users the OneRoster bundle leaves out because they cannot be OneRoster users (no
    /// given or family name); they are in the roster CSV.
    pub unmappable: u64,
    /// With [`Snapshot::Compare`] or [`Snapshot::CompareAndReplace`]: whether any file
    /// held something else before (or was missing, or could not be read).
    pub differed: Option<bool>,
}

/// What a snapshot does with the files it has written under temporary names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Snapshot {
    /// Replace the files: the mirror's writes, which nothing compares.
    Replace,
    /// Compare each with the file it replaces, then replace them: a reconciliation, which
    /// counts only files that differed as drift. Rewritten whole at every run, they used
    /// to count as drift every time, which made an alert on drift useless.
    CompareAndReplace,
    /// Compare, and leave the files as they are: a reconciliation's dry run.
    Compare,
}

#[derive(Debug, thiserror::Error)]
pub enum CsvError {
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading the store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot write {}: {message}", path.display())]
    Zip { path: PathBuf, message: String },
    #[error("stopped before the files were complete; the files there are as they were")]
    Stopped,
    /// The gate given to [`write_snapshot_gated`] refused what the files would hold.
    #[error("not written: {reason}")]
    Withheld { seq: u64, reason: String },
}

/// What a write's files may hold, asked once they are staged and before any replaces its
/// target: given the last change the store had logged then, which bounds what the
/// staged files read. `Err` (as [`CsvError::Withheld`]) drops them.
pub type Gate<'a> = &'a mut (dyn FnMut(u64) -> Result<(), CsvError> + Send);

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CsvError + 'a {
    move |source| CsvError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Write the roster CSV (`settings.dir/settings.file_name`) with every user of the
/// tenant, and with `settings.oneroster` also `oneroster.zip`, a OneRoster 1.2 CSV bundle.
/// Each file is written under a temporary name in the same directory and fsynced; only
/// when all are complete is each renamed over its target, then the directory is fsynced:
/// a reader sees the old file or the new one, never a part. On error the temporary files
/// are removed; a target is either replaced whole or left as it was (should the bundle's
/// rename fail after the roster CSV's succeeded, the roster CSV is the new one).
///
/// Blocking: call it from `spawn_blocking`. Streams the store; memory does not grow with
/// the tenant (beyond the roster renderer's cache of group and manager names).
///
/// `stop` cuts the write short ([`CsvError::Stopped`]): at a million users it takes
/// seconds warm and tens of seconds cold, longer than a stop may take.
pub fn write_snapshot(
    store: &Store,
    tenant: &str,
    settings: &CsvSettings,
    how: Snapshot,
    stop: &CancellationToken,
) -> Result<SnapshotReport, CsvError> {
    write_snapshot_gated(store, tenant, settings, how, stop, &mut |_| Ok(()))
}

/// [`write_snapshot`], with the files replaced only if `gate` lets what they hold through
/// (a connector's `[guard]`).
pub fn write_snapshot_gated(
    store: &Store,
    tenant: &str,
    settings: &CsvSettings,
    how: Snapshot,
    stop: &CancellationToken,
    gate: Gate<'_>,
) -> Result<SnapshotReport, CsvError> {
    write_halted(
        store,
        tenant,
        settings,
        how,
        &Arc::new(Halt::new(stop.clone())),
        gate,
    )
}

fn write_halted(
    store: &Store,
    tenant: &str,
    settings: &CsvSettings,
    how: Snapshot,
    halt: &Arc<Halt>,
    gate: Gate<'_>,
) -> Result<SnapshotReport, CsvError> {
    match write_files(store, tenant, settings, how, halt, gate) {
        // Only an error the stop caused: one of its own (a full disk, a failed rename)
        // at the same moment is reported as it is, and the files may not be as they were.
        Err(_) if halt.refused.load(Ordering::Relaxed) => Err(CsvError::Stopped),
        written => written,
    }
}

/// A stop as one write's staged files see it.
struct Halt {
    stop: CancellationToken,
    /// A write was refused because of the stop.
    refused: AtomicBool,
    /// Cancels `stop` at the write after this many, to stop a write part-way.
    #[cfg(test)]
    stop_after: std::sync::Mutex<Option<usize>>,
}

impl Halt {
    fn new(stop: CancellationToken) -> Halt {
        Halt {
            stop,
            refused: AtomicBool::new(false),
            #[cfg(test)]
            stop_after: std::sync::Mutex::new(None),
        }
    }

    /// [`Halt::admits`], as an I/O error when not.
    fn admit_io(&self) -> std::io::Result<()> {
        if self.admits() {
            Ok(())
        } else {
            // Not `Interrupted`, which `write_all` would retry.
            Err(std::io::Error::other("stopped"))
        }
    }

    /// Whether a write may go through; counts the refusal when not.
    fn admits(&self) -> bool {
        #[cfg(test)]
        if let Some(n) = self.stop_after.lock().unwrap().as_mut() {
            if *n == 0 {
                self.stop.cancel();
            }
            *n = n.saturating_sub(1);
        }
        if self.stop.is_cancelled() {
            self.refused.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }
}

fn write_files(
    store: &Store,
    tenant: &str,
    settings: &CsvSettings,
    how: Snapshot,
    halt: &Arc<Halt>,
    gate: Gate<'_>,
) -> Result<SnapshotReport, CsvError> {
    let turn = settings.turn();
    let _turn = turn.lock().unwrap_or_else(|e| e.into_inner());
    let dir = settings.dir.as_path();
    // 0750 and 0640 below, whatever the umask: the files hold the roster's personal
    // data, as the store does (made 0700), and under umask 000 they were writable by
    // every local user. The group bits stay, for a consumer given the group or an ACL
    // (a default ACL's mask is what `open` asks for). A directory that exists keeps its
    // mode: it is the operator's.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
        .map_err(|e| {
            // create_dir_all's own word for it, "File exists", reads as if all were well.
            if dir.exists() && !dir.is_dir() {
                std::io::Error::other("a file has that name, not a directory")
            } else {
                e
            }
        })
        .map_err(io_err("create the directory", dir))?;
    settings.remove_stale_staged();
    let seq = store.last_seq(tenant)?;

    let roster = Staged::create(dir, &settings.file_name, halt)?;
    let users = write_roster(store, tenant, &roster)?;
    roster.sync()?;
    let mut staged = vec![roster];
    let mut unmappable = 0;
    if let Some(or) = &settings.oneroster {
        let bundle = Staged::create(dir, BUNDLE_FILE, halt)?;
        unmappable = write_bundle(store, tenant, or, &bundle)?;
        bundle.sync()?;
        staged.push(bundle);
    }
    let staged_through = store.last_seq(tenant)?;
    let consistent = staged_through == seq;
    let differed = match how {
        Snapshot::Replace => None,
        Snapshot::Compare | Snapshot::CompareAndReplace => {
            let mut differed = false;
            for s in &staged {
                if !s.same_as_target()? {
                    differed = true;
                    break;
                }
            }
            Some(differed)
        }
    };
    if how == Snapshot::Compare {
        // Dropped, the staged files remove themselves.
        return Ok(SnapshotReport {
            users,
            files: Vec::new(),
            seq,
            consistent,
            unmappable,
            differed,
        });
    }

    // The files were read from the store as it stood while they were written, which
    // may hold changes logged after `seq`: a mass deprovisioning a connector's guard
    // had not judged yet went into the files that way.
    gate(staged_through)?;
    let mut files = Vec::with_capacity(staged.len());
    let mut published = Ok(());
    for s in staged {
        match s.publish() {
            Ok(path) => files.push(path),
            Err(e) => {
                // The rest are dropped, which removes them.
                published = Err(e);
                break;
            }
        }
    }
    // Renames are durable once the directory is synced, also when a later one failed.
    let synced = if files.is_empty() {
        Ok(())
    } else {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("sync the directory", dir))
    };
    published?;
    synced?;
    Ok(SnapshotReport {
        users,
        files,
        seq,
        consistent,
        unmappable,
        differed,
    })
}

/// A file being written next to its target under a temporary name. Dropped before
/// [`Staged::publish`] it removes itself, so no partial file is left behind.
struct Staged {
    tmp: PathBuf,
    target: PathBuf,
    file: File,
    armed: bool,
    halt: Arc<Halt>,
}

/// A staged file's reads and writes, refused once a stop comes.
///
/// Not the bundle's writes: a zip writer dropped with refused writes behind it tries to
/// finish its archive and prints the failure to stderr, a line without an end that the
/// next log line is glued to (which a log shipper reading JSON then loses). The bundle
/// stops between rows ([`Rows::row`]) and between the chunks it copies from a spool, and
/// its unfinished archive, dropped, ends in the temporary file that goes with it.
struct Guarded<'a> {
    file: &'a File,
    halt: &'a Halt,
}

impl Write for Guarded<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.halt.admit_io()?;
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl std::io::Read for Guarded<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.halt.admit_io()?;
        self.file.read(buf)
    }
}

/// For reading the staged bundle back as an archive.
impl Seek for Guarded<'_> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.file.seek(pos)
    }
}

/// Tells apart temporary files of one process (two connectors may share a directory).
static STAGED: AtomicU64 = AtomicU64::new(0);

/// Tells this process's temporary files from those of an earlier process that had the
/// same pid.
fn process_nonce() -> &'static str {
    static NONCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NONCE.get_or_init(|| uuid::Uuid::new_v4().simple().to_string()[..8].to_owned())
}

/// The spool roles.csv is written to while users.csv goes into the zip.
const ROLES_SPOOL: &str = "oneroster.roles.csv";

/// Remove the temporary files of `names` that a process no longer running left behind:
/// a `kill -9` or power loss mid-write skips [`Staged`]'s drop, and each such file is a
/// partial copy of the export, so a restart loop would fill the volume. A file of a
/// process still running (another daemon writing the same names) is left alone.
fn remove_stale_staged(dir: &Path, names: &[&str]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let ours = std::process::id();
    for e in entries.flatten() {
        let file = e.file_name();
        let file = file.to_string_lossy();
        let Some((pid, nonce)) = names.iter().find_map(|n| {
            let (writer, n) = file.strip_prefix(&format!(".{n}.tmp-"))?.split_once('-')?;
            if !n.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let (pid, nonce) = writer.split_once('.').unwrap_or((writer, ""));
            Some((pid.parse::<u32>().ok()?, nonce))
        }) else {
            continue;
        };
        // A container starts rosterd as the same pid every time: the nonce tells this
        // process's files from those of the one before it.
        let this_process = pid == ours && nonce == process_nonce();
        let another_alive = pid != ours && Path::new(&format!("/proc/{pid}")).exists();
        if this_process || another_alive {
            continue;
        }
        match std::fs::remove_file(e.path()) {
            Ok(()) => {
                tracing::info!(file = %e.path().display(), "Removed a temporary file an interrupted write left behind.")
            }
            Err(err) => {
                tracing::warn!(file = %e.path().display(), error = %err, "Cannot remove a temporary file an interrupted write left behind.")
            }
        }
    }
}

impl Staged {
    fn create(dir: &Path, name: &str, halt: &Arc<Halt>) -> Result<Staged, CsvError> {
        let n = STAGED.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(
            ".{name}.tmp-{}.{}-{n}",
            std::process::id(),
            process_nonce()
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        Ok(Staged {
            target: dir.join(name),
            tmp,
            file,
            armed: true,
            halt: halt.clone(),
        })
    }

    fn writer(&self) -> BufWriter<Guarded<'_>> {
        BufWriter::new(self.guarded())
    }

    fn guarded(&self) -> Guarded<'_> {
        Guarded {
            file: &self.file,
            halt: &self.halt,
        }
    }

    fn sync(&self) -> Result<(), CsvError> {
        self.file.sync_all().map_err(io_err("sync", &self.tmp))
    }

    /// Whether the target holds what this file holds. The bundle is compared entry by
    /// entry, uncompressed: each write stamps its entries with the time of writing, so
    /// two archives of the same roster never match byte for byte. A target that is
    /// missing or cannot be read differs; only a stop is an error.
    fn same_as_target(&self) -> Result<bool, CsvError> {
        let same = if self.target.file_name() == Some(std::ffi::OsStr::new(BUNDLE_FILE)) {
            self.same_bundle()
        } else {
            File::open(&self.target).and_then(|old| {
                same_stream(
                    std::io::BufReader::new(old),
                    std::io::BufReader::new(self.read_back()?),
                )
            })
        };
        match same {
            Ok(same) => Ok(same),
            Err(_) if self.halt.refused.load(Ordering::Relaxed) => Err(CsvError::Stopped),
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(file = %self.target.display(), error = %e, "Cannot compare the CSV file with the roster; it counts as drift.");
                }
                Ok(false)
            }
        }
    }

    fn same_bundle(&self) -> std::io::Result<bool> {
        let zip_io = |e: zip::result::ZipError| match e {
            zip::result::ZipError::Io(e) => e,
            other => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
        };
        let mut old = zip::ZipArchive::new(std::io::BufReader::new(File::open(&self.target)?))
            .map_err(zip_io)?;
        let mut new =
            zip::ZipArchive::new(std::io::BufReader::new(self.read_back()?)).map_err(zip_io)?;
        if old.len() != new.len() {
            return Ok(false);
        }
        for i in 0..new.len() {
            let a = old.by_index(i).map_err(zip_io)?;
            let b = new.by_index(i).map_err(zip_io)?;
            if a.name_raw() != b.name_raw() || a.size() != b.size() || !same_stream(a, b)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The staged file read from its start, refused once a stop comes.
    fn read_back(&self) -> std::io::Result<Guarded<'_>> {
        (&self.file).seek(std::io::SeekFrom::Start(0))?;
        Ok(self.guarded())
    }

    /// Rename over the target; the caller fsyncs the directory.
    fn publish(mut self) -> Result<PathBuf, CsvError> {
        std::fs::rename(&self.tmp, &self.target).map_err(io_err("replace", &self.target))?;
        self.armed = false;
        Ok(std::mem::take(&mut self.target))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Whether two streams hold the same bytes, read a chunk at a time: a roster CSV of a
/// million users is hundreds of megabytes.
fn same_stream(mut a: impl std::io::Read, mut b: impl std::io::Read) -> std::io::Result<bool> {
    // `read` may return less than asked at any point, so each side fills its chunk whole.
    fn fill(r: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match r.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
    let (mut x, mut y) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let (n, m) = (fill(&mut a, &mut x)?, fill(&mut b, &mut y)?);
        if x[..n] != y[..m] {
            return Ok(false);
        }
        if n < x.len() {
            return Ok(true);
        }
    }
}

/// Passes writes through and keeps the first I/O error, which the roster writer can only
/// report as text.
struct Tap<W> {
    inner: W,
    error: Option<std::io::Error>,
}

impl<W> Tap<W> {
    fn keep(&mut self, e: std::io::Error) -> std::io::Error {
        let copy = std::io::Error::new(e.kind(), e.to_string());
        self.error.get_or_insert(e);
        copy
    }
}

impl<W: Write> Write for Tap<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match self.inner.write(data) {
            Ok(n) => Ok(n),
            Err(e) => Err(self.keep(e)),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self.inner.flush() {
            Ok(()) => Ok(()),
            Err(e) => Err(self.keep(e)),
        }
    }
}

/// The roster CSV, rendered by the Roster API export's own code.
fn write_roster(store: &Store, tenant: &str, staged: &Staged) -> Result<u64, CsvError> {
    let mut out = Tap {
        inner: staged.writer(),
        error: None,
    };
    let users = crate::api::write_roster_csv(store, tenant, &mut out).map_err(|e| {
        match out.error.take() {
            Some(source) => CsvError::Io {
                op: "write",
                path: staged.target.clone(),
                source,
            },
            None => CsvError::Store(e),
        }
    })?;
    out.inner.flush().map_err(io_err("write", &staged.target))?;
    Ok(users)
}

// ---------------------------------------------------------------------------------------
// The OneRoster 1.2 CSV bundle

/// The `file.*` entries of a 1.2 manifest, in the standard's order, and whether the
/// bundle has the file (`bulk`) or not (`absent`).
const MANIFEST_FILES: [(&str, bool); 21] = [
    ("academicSessions", false),
    ("categories", false),
    ("classes", true),
    ("classResources", false),
    ("courses", true),
    ("courseResources", false),
    ("demographics", false),
    ("enrollments", true),
    ("lineItemLearningObjectiveIds", false),
    ("lineItems", false),
    ("lineItemScoreScales", false),
    ("orgs", true),
    ("resources", false),
    ("resultLearningObjectiveIds", false),
    ("results", false),
    ("resultScoreScales", false),
    ("roles", true),
    ("scoreScales", false),
    ("userProfiles", false),
    ("userResources", false),
    ("users", true),
];

const ORGS: [&str; 7] = [
    "sourcedId",
    "status",
    "dateLastModified",
    "name",
    "type",
    "identifier",
    "parentSourcedId",
];

const COURSES: [&str; 10] = [
    "sourcedId",
    "status",
    "dateLastModified",
    "schoolYearSourcedId",
    "title",
    "courseCode",
    "grades",
    "orgSourcedId",
    "subjects",
    "subjectCodes",
];

const USERS: [&str; 22] = [
    "sourcedId",
    "status",
    "dateLastModified",
    "enabledUser",
    "username",
    "userIds",
    "givenName",
    "familyName",
    "middleName",
    "identifier",
    "email",
    "sms",
    "phone",
    "agentSourcedIds",
    "grades",
    "password",
    "userMasterIdentifier",
    "preferredGivenName",
    "preferredMiddleName",
    "preferredFamilyName",
    "primaryOrgSourcedId",
    "pronouns",
];

const ROLES: [&str; 10] = [
    "sourcedId",
    "status",
    "dateLastModified",
    "userSourcedId",
    "roleType",
    "role",
    "beginDate",
    "endDate",
    "orgSourcedId",
    "userProfileSourcedId",
];

const CLASSES: [&str; 14] = [
    "sourcedId",
    "status",
    "dateLastModified",
    "title",
    "grades",
    "courseSourcedId",
    "classCode",
    "classType",
    "location",
    "schoolSourcedId",
    "termSourcedIds",
    "subjects",
    "subjectCodes",
    "periods",
];

const ENROLLMENTS: [&str; 10] = [
    "sourcedId",
    "status",
    "dateLastModified",
    "classSourcedId",
    "schoolSourcedId",
    "userSourcedId",
    "role",
    "primary",
    "beginDate",
    "endDate",
];

type ZipOut<'a> = zip::ZipWriter<BufWriter<&'a File>>;

/// The same CSV dialect as the roster CSV: RFC 4180 quoting, CRLF line ends.
fn csv_writer<W: Write>(out: W) -> ::csv::Writer<W> {
    ::csv::WriterBuilder::new()
        .terminator(::csv::Terminator::CRLF)
        .from_writer(out)
}

/// Free text from the identity provider, made safe to open in a spreadsheet.
fn text(s: &str) -> String {
    neutralize(s).into_owned()
}

/// A phone number as is when it holds nothing but what numbers are written with: the `+`
/// that starts an international number would otherwise get the `'` of a formula, which
/// an importer takes as part of the number. Such a cell cannot call anything.
fn phone(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_digit() || " +-().x/".contains(c))
    {
        s.to_owned()
    } else {
        text(s)
    }
}

/// The bundle being written: one entry at a time.
struct Bundle<'a> {
    zip: ZipOut<'a>,
    path: &'a Path,
    options: zip::write::SimpleFileOptions,
    halt: &'a Halt,
}

impl<'a> Bundle<'a> {
    fn zip_error(&self, e: zip::result::ZipError) -> CsvError {
        zip_error(self.path, e)
    }

    /// Start entry `name` and write its rows with `f`, which gets a CSV writer that has
    /// already written `header`.
    fn entry(
        &mut self,
        name: &str,
        header: &[&str],
        f: impl FnOnce(&mut Rows<'_, &mut ZipOut<'a>>) -> Result<(), CsvError>,
    ) -> Result<(), CsvError> {
        let (path, options, halt) = (self.path, self.options, self.halt);
        self.zip
            .start_file(name, options)
            .map_err(|e| self.zip_error(e))?;
        let mut rows = Rows {
            w: csv_writer(&mut self.zip),
            path,
            entry: name.to_owned(),
            halt,
            written: 0,
        };
        rows.row(header)?;
        f(&mut rows)?;
        rows.finish()
    }

    /// Copy a spooled CSV file in as entry `name`.
    fn entry_from(&mut self, name: &str, spool: &Staged) -> Result<(), CsvError> {
        let options = self.options;
        self.zip
            .start_file(name, options)
            .map_err(|e| self.zip_error(e))?;
        (&spool.file)
            .seek(std::io::SeekFrom::Start(0))
            .map_err(io_err("read", &spool.tmp))?;
        std::io::copy(&mut spool.guarded(), &mut self.zip).map_err(io_err("write", self.path))?;
        Ok(())
    }

    fn finish(self) -> Result<(), CsvError> {
        let path = self.path;
        let mut out = self.zip.finish().map_err(|e| zip_error(path, e))?;
        out.flush().map_err(io_err("write", path))
    }
}

fn zip_error(path: &Path, e: zip::result::ZipError) -> CsvError {
    match e {
        zip::result::ZipError::Io(source) => CsvError::Io {
            op: "write",
            path: path.to_owned(),
            source,
        },
        other => CsvError::Zip {
            path: path.to_owned(),
            message: other.to_string(),
        },
    }
}

/// A CSV writer whose errors name the file (and the bundle entry) they are about.
struct Rows<'p, W: Write> {
    w: ::csv::Writer<W>,
    path: &'p Path,
    entry: String,
    halt: &'p Halt,
    written: u64,
}

impl<W: Write> Rows<'_, W> {
    fn error(&self, e: ::csv::Error) -> CsvError {
        let what = if self.entry.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.entry)
        };
        if e.is_io_error()
            && let ::csv::ErrorKind::Io(source) = e.into_kind()
        {
            return CsvError::Io {
                op: "write",
                path: self.path.to_owned(),
                source: std::io::Error::new(source.kind(), format!("{source}{what}")),
            };
        }
        CsvError::Zip {
            path: self.path.to_owned(),
            message: format!("CSV encoding failed{what}"),
        }
    }

    fn row<I>(&mut self, cells: I) -> Result<(), CsvError>
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        // Often enough for a stop to cut a million rows short at once, seldom enough
        // that asking costs nothing.
        if self.written.is_multiple_of(256) && !self.halt.admits() {
            return Err(CsvError::Stopped);
        }
        self.written += 1;
        self.w.write_record(cells).map_err(|e| self.error(e))
    }

    fn finish(mut self) -> Result<(), CsvError> {
        self.w.flush().map_err(|e| self.error(e.into()))
    }
}

/// The current time for the entries' timestamps (zip times have no zone; UTC is used).
fn zip_now() -> zip::DateTime {
    use chrono::{Datelike, Timelike};
    let t = chrono::Utc::now().naive_utc();
    zip::DateTime::from_date_and_time(
        u16::try_from(t.year()).unwrap_or(1980),
        t.month() as u8,
        t.day() as u8,
        t.hour() as u8,
        t.minute() as u8,
        t.second() as u8,
    )
    .unwrap_or_default()
}

/// Returns how many users were left out as not expressible.
fn write_bundle(
    store: &Store,
    tenant: &str,
    or: &OneRosterCsv,
    staged: &Staged,
) -> Result<u64, CsvError> {
    let org = or.org_sourced_id.as_str();
    let course = or.course_sourced_id.as_str();
    let mut b = Bundle {
        zip: zip::ZipWriter::new(BufWriter::new(&staged.file)),
        path: &staged.target,
        halt: &staged.halt,
        options: zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .last_modified_time(zip_now())
            .unix_permissions(0o644),
    };

    b.entry("manifest.csv", &["propertyName", "value"], |w| {
        w.row(["manifest.version", "1.0"])?;
        w.row(["oneroster.version", "1.2"])?;
        for (file, present) in MANIFEST_FILES {
            let key = format!("file.{file}");
            w.row([key.as_str(), if present { "bulk" } else { "absent" }])?;
        }
        w.row(["source.systemName", &text(&or.system_name)])?;
        w.row(["source.systemCode", &text(tenant)])
    })?;

    b.entry("orgs.csv", &ORGS, |w| {
        w.row([org, "", "", &text(&or.org_name), &or.org_type, "", ""])
    })?;

    b.entry("courses.csv", &COURSES, |w| {
        let title = text(&or.course_title);
        w.row([course, "", "", "", &title, course, "", org, "", ""])
    })?;

    // users.csv and roles.csv come from one walk of the users; the roles are spooled to a
    // temporary file meanwhile, since a zip entry is written in one piece.
    let spool = Staged::create(
        staged.target.parent().unwrap_or(Path::new(".")),
        ROLES_SPOOL,
        &staged.halt,
    )?;
    let mut roles = Rows {
        w: csv_writer(spool.writer()),
        halt: &spool.halt,
        written: 0,
        path: &spool.tmp,
        entry: String::new(),
    };
    roles.row(ROLES)?;
    // Users that cannot be OneRoster users, by id: their enrollments are left out too.
    // Only these are held, so memory grows with them, not with the tenant.
    let mut left_out = std::collections::HashSet::new();
    b.entry("users.csv", &USERS, |w| {
        for_each_user(store, tenant, |id, doc, assignment| {
            let u = UserFields { doc };
            let user_sid = sourced_id(tenant, &format!("User/{id}"));
            let email = u.email();
            // OneRoster requires both names, and the REST connector sends such a user
            // nowhere (a dead letter): a row with invented names would put them on a
            // person's record, an empty one makes the file invalid.
            let Ok((given, family)) = u.names(id) else {
                left_out.insert(id.to_owned());
                return Ok(());
            };
            let identifier = doc
                .get(crate::scim::schema::ENTERPRISE_USER_SCHEMA)
                .and_then(|e| e.get("employeeNumber"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            let enabled = if u.active() { "true" } else { "false" };
            w.row([
                user_sid.as_str(),
                "",
                "",
                enabled,
                &text(u.user_name().or(email).unwrap_or_default()),
                "",
                &text(&given),
                &text(&family),
                &text(u.middle_name().unwrap_or_default()),
                &text(identifier),
                &text(email.unwrap_or_default()),
                &phone(u.sms().unwrap_or_default()),
                &phone(u.phone().unwrap_or_default()),
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                org,
                "",
            ])?;
            let role = assignment
                .and_then(|a| a.archetype_id.as_deref())
                .and_then(|a| or.roles.get(a))
                .unwrap_or(&or.default_role);
            roles.row([
                sourced_id(tenant, &format!("Role/{id}")).as_str(),
                "",
                "",
                &user_sid,
                "primary",
                role,
                "",
                "",
                org,
                "",
            ])
        })
    })?;
    roles.finish()?;
    b.entry_from("roles.csv", &spool)?;
    drop(spool);

    b.entry("classes.csv", &CLASSES, |w| {
        for g in store.scan(tenant, ResourceKind::Group)? {
            let g = g?;
            let str_of = |k: &str| g.doc.get(k).and_then(Value::as_str);
            let title = str_of("displayName").unwrap_or(&g.id);
            w.row([
                sourced_id(tenant, &format!("Group/{}", g.id)).as_str(),
                "",
                "",
                &text(title),
                "",
                course,
                &text(str_of("externalId").unwrap_or_default()),
                "homeroom",
                "",
                org,
                "",
                "",
                "",
                "",
            ])?;
        }
        Ok(())
    })?;

    b.entry("enrollments.csv", &ENROLLMENTS, |w| {
        // Group ids only (the documents stay undecoded); each group's members stream from
        // the store, so a group of any size costs one member at a time.
        for g in store.scan_raw_after(tenant, ResourceKind::Group, None)? {
            let (gid, _) = g?;
            let class_sid = sourced_id(tenant, &format!("Group/{gid}"));
            for m in store.members(tenant, &gid)? {
                let m = m?;
                // Enrollments are for users in users.csv; nested groups have none.
                if m.kind != "User" || left_out.contains(&m.value) {
                    continue;
                }
                w.row([
                    enrollment_id(tenant, &gid, &m.value).as_str(),
                    "",
                    "",
                    &class_sid,
                    org,
                    &sourced_id(tenant, &format!("User/{}", m.value)),
                    &or.enrollment_role,
                    "false",
                    "",
                    "",
                ])?;
            }
        }
        Ok(())
    })?;

    b.finish()?;
    Ok(left_out.len() as u64)
}

/// Every user in id order with its assignment, joined by merging two ordered scans.
fn for_each_user(
    store: &Store,
    tenant: &str,
    mut f: impl FnMut(&str, &Value, Option<&Assignment>) -> Result<(), CsvError>,
) -> Result<(), CsvError> {
    let mut assignments = store.scan_assignments_after(tenant, None)?.peekable();
    for user in store.scan(tenant, ResourceKind::User)? {
        let user = user?;
        let mut found = None;
        while let Some(next) = assignments.peek() {
            match next {
                Ok((aid, _)) if aid.as_str() < user.id.as_str() => {
                    assignments.next();
                }
                Ok((aid, _)) if *aid == user.id => {
                    found = assignments.next().transpose()?.map(|(_, a)| a);
                    break;
                }
                Ok(_) => break,
                Err(_) => {
                    assignments.next().transpose()?;
                }
            }
        }
        f(&user.id, &user.doc, found.as_ref())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scim::patch::MemberRef;
    use serde_json::json;
    use std::io::Read;

    const T: &str = "demo";

    fn settings(dir: &Path) -> CsvSettings {
        let mut roles = BTreeMap::new();
        roles.insert("eng_lead".to_owned(), "districtAdministrator".to_owned());
        CsvSettings {
            dir: dir.to_owned(),
            file_name: default_file_name(),
            debounce_ms: 0,
            schedule: None,
            catch_up: false,
            oneroster: Some(OneRosterCsv {
                org_sourced_id: "org-1".into(),
                org_name: "=Springfield, \"District\"".into(),
                org_type: default_org_type(),
                course_sourced_id: "course-1".into(),
                course_title: "@Staff groups".into(),
                roles,
                default_role: default_role(),
                enrollment_role: "student".into(),
                system_name: default_system_name(),
            }),
        }
    }

    /// The mirror's write, which must succeed.
    fn written(store: &Store, s: &CsvSettings) -> SnapshotReport {
        write_snapshot(store, T, s, Snapshot::Replace, &CancellationToken::new()).unwrap()
    }

    fn member(id: &str) -> MemberRef {
        MemberRef {
            value: id.to_owned(),
            kind: None,
            display: None,
        }
    }

    struct Fixture {
        _db: tempfile::TempDir,
        store: Store,
        ada: String,
        bob: String,
        cy: String,
        ops: String,
        evil: String,
    }

    async fn fixture() -> Fixture {
        let db = tempfile::tempdir().unwrap();
        let store = Store::open(db.path()).unwrap();
        let create = |doc: Value| {
            let store = store.clone();
            async move {
                store
                    .create(T, ResourceKind::User, doc, vec![])
                    .await
                    .unwrap()
                    .id
            }
        };
        let ada = create(json!({
            "userName": "ada@x.test",
            "name": {"givenName": "Ada", "familyName": "Lovelace, \"Countess\""},
            "title": "=cmd|' /C calc'!A0",
            "emails": [{"value": "ada@x.test", "primary": true}],
        }))
        .await;
        let bob = create(json!({
            "userName": "bob",
            "name": {"givenName": "+Bob", "familyName": "Builder"},
            "title": "Foreman",
            "active": false,
            "emails": [{"value": "bob@x.test", "type": "work"}],
            crate::scim::schema::ENTERPRISE_USER_SCHEMA: {
                "employeeNumber": "E2", "department": "Sites", "manager": {"value": ada}
            },
        }))
        .await;
        let cy = create(json!({"userName": "cy@x.test", "displayName": "Cy  Young"})).await;
        store
            .set_override(T, &ada, Some("eng_lead".into()), "user:admin")
            .await
            .unwrap();
        let ops = store
            .create(
                T,
                ResourceKind::Group,
                json!({"displayName": "Ops, \"core\"", "externalId": "OPS-1"}),
                vec![member(&ada), member(&bob)],
            )
            .await
            .unwrap()
            .id;
        // A nested group is a member too; it gets no enrollment.
        let evil = store
            .create(
                T,
                ResourceKind::Group,
                json!({"displayName": "=evil"}),
                vec![member(&cy), member(&ops)],
            )
            .await
            .unwrap()
            .id;
        Fixture {
            _db: db,
            store,
            ada,
            bob,
            cy,
            ops,
            evil,
        }
    }

    fn parse(bytes: &[u8]) -> Vec<Vec<String>> {
        ::csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(bytes)
            .records()
            .map(|r| r.unwrap().iter().map(str::to_owned).collect())
            .collect()
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Entry name → bytes, in archive order.
    fn unzip(path: &Path) -> Vec<(String, Vec<u8>)> {
        let mut z = zip::ZipArchive::new(File::open(path).unwrap()).unwrap();
        (0..z.len())
            .map(|i| {
                let mut f = z.by_index(i).unwrap();
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes).unwrap();
                (f.name().unwrap().into_owned(), bytes)
            })
            .collect()
    }

    fn by_first<'a>(rows: &'a [Vec<String>], key: &str) -> &'a Vec<String> {
        rows.iter()
            .find(|r| r[0] == key)
            .unwrap_or_else(|| panic!("no row {key}"))
    }

    fn user_sid(id: &str) -> String {
        sourced_id(T, &format!("User/{id}"))
    }

    /// Write the fixture's files as `s` says, off the runtime, as the connector does.
    async fn replace_files(fx: &Fixture, s: CsvSettings) -> SnapshotReport {
        let store = fx.store.clone();
        tokio::task::spawn_blocking(move || {
            write_snapshot(&store, T, &s, Snapshot::Replace, &CancellationToken::new())
        })
        .await
        .unwrap()
        .unwrap()
    }

    /// The files hold personal data: never readable by others, whatever the umask (the
    /// test's is usually 022, under which they were 0644 in a 0755 directory).
    #[tokio::test]
    async fn the_files_and_the_directories_made_are_not_for_others() {
        use std::os::unix::fs::PermissionsExt;
        let fx = fixture().await;
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join("made/csv");
        let report = replace_files(&fx, settings(&dir)).await;
        assert_eq!(report.files.len(), 2, "{report:?}");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for f in &report.files {
            assert_eq!(mode(f) & 0o037, 0, "{} is {:o}", f.display(), mode(f));
        }
        for d in [dir.as_path(), &out.path().join("made")] {
            assert_eq!(mode(d) & 0o027, 0, "{} is {:o}", d.display(), mode(d));
        }
    }

    #[tokio::test]
    async fn the_roster_csv_has_every_user_quoted_and_neutralized() {
        let fx = fixture().await;
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join("nested/csv");
        let mut s = settings(&dir);
        s.oneroster = None;
        let report = replace_files(&fx, s).await;
        assert_eq!(report.users, 3);
        assert_eq!(report.files, vec![dir.join("roster.csv")]);
        assert!(report.consistent);
        assert_eq!(report.seq, fx.store.last_seq(T).unwrap());

        let bytes = std::fs::read(dir.join("roster.csv")).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with(
            "user_id,email,first_name,last_name,job_title,department,manager,archetype_id,\
             archetype_confidence,is_active,groups\r\n"
        ));
        assert!(text.ends_with("\r\n") && !text.replace("\r\n", "").contains('\n'));
        // RFC 4180: a cell with a comma or quote is quoted, its quotes doubled.
        assert!(text.contains(r#","Lovelace, ""Countess""","#), "{text}");
        assert!(text.contains(",'=cmd|' /C calc'!A0,") && !text.contains(",=cmd"));

        let rows = parse(&bytes);
        assert_eq!(rows[0], crate::api::COLUMNS);
        assert_eq!(rows.len(), 4);
        let ada = by_first(&rows, "user:ada@x.test");
        assert_eq!(ada[3], "Lovelace, \"Countess\"");
        assert_eq!(ada[4], "'=cmd|' /C calc'!A0");
        assert_eq!(ada[7], "eng_lead");
        assert_eq!(ada[9], "true");
        assert_eq!(
            ada[10], fx.ops,
            "groups by id: a name may hold a comma, an id cannot"
        );
        let bob = by_first(&rows, "user:bob");
        assert_eq!(bob[2], "'+Bob");
        assert_eq!(bob[5], "Sites");
        assert_eq!(bob[6], "ada@x.test");
        assert_eq!(bob[9], "false", "the inactive user is in the file");
        let cy = by_first(&rows, "user:cy@x.test");
        assert_eq!(cy[1], "cy@x.test");
        assert_eq!(cy[10], fx.evil, "a group named =evil is named by its id");

        // The very rows of the Roster API export.
        let mut direct = Vec::new();
        crate::api::write_roster_csv(&fx.store, T, &mut direct).unwrap();
        assert_eq!(direct, bytes);
        assert_eq!(listing(&dir), vec!["roster.csv"]);
    }

    #[tokio::test]
    async fn temporary_files_of_a_process_gone_are_removed_at_the_next_write() {
        let fx = fixture().await;
        let out = tempfile::tempdir().unwrap();
        // No process has this pid, so these were left by a crash.
        let gone = u32::MAX - 1;
        let alive = std::process::id();
        let left = [
            format!(".roster.csv.tmp-{gone}-0"),
            format!(".oneroster.zip.tmp-{gone}-1"),
            format!(".oneroster.roles.csv.tmp-{gone}-2"),
        ];
        // Someone else's, or of a process still running: kept. A file with this
        // process's pid but another nonce was left by an earlier process with the same
        // pid (a container's pid 1): removed.
        let left = [
            left[0].clone(),
            left[1].clone(),
            left[2].clone(),
            format!(".roster.csv.tmp-{alive}-0"),
            format!(".roster.csv.tmp-{alive}.0badcafe-1"),
        ];
        let kept = [
            format!(".roster.csv.tmp-{alive}.{}-999", process_nonce()),
            format!(".other.csv.tmp-{gone}-0"),
            "notes.txt".to_owned(),
        ];
        for name in left.iter().chain(&kept) {
            std::fs::write(out.path().join(name), "partial").unwrap();
        }
        written(&fx.store, &settings(out.path()));
        let mut after = listing(out.path());
        after.sort();
        let mut want: Vec<String> = kept.to_vec();
        want.extend(["oneroster.zip".to_owned(), "roster.csv".to_owned()]);
        want.sort();
        assert_eq!(after, want);
    }

    /// Two writes of one connector's files take turns: one waits while another holds the
    /// turn (the same files through another spelling of the directory too), and then
    /// writes; another connector's files do not wait.
    #[tokio::test]
    async fn writes_of_one_connectors_files_take_turns() {
        let fx = fixture().await;
        let out = tempfile::tempdir().unwrap();
        let s = settings(out.path());
        let turn = s.turn();
        let held = turn.lock().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (store, mut other) = (fx.store.clone(), s.clone());
        other.dir = out.path().join(".");
        std::thread::spawn(move || {
            let r = write_snapshot(
                &store,
                T,
                &other,
                Snapshot::Replace,
                &CancellationToken::new(),
            );
            tx.send(r.map(|r| r.users)).unwrap();
        });
        let elsewhere = tempfile::tempdir().unwrap();
        write_snapshot(
            &fx.store,
            T,
            &settings(elsewhere.path()),
            Snapshot::Replace,
            &CancellationToken::new(),
        )
        .unwrap();
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(500))
                .is_err(),
            "wrote while another write held the turn"
        );
        assert!(!out.path().join("roster.csv").exists());
        drop(held);
        let users = rx.recv().unwrap().unwrap();
        assert!(users > 0 && out.path().join("roster.csv").exists());
    }

    /// A reconciliation counts the files as drift only when what they hold differs from
    /// the roster: the roster CSV byte for byte, the bundle entry by entry (its entries'
    /// times differ at every write).
    #[tokio::test]
    async fn a_compared_snapshot_says_whether_the_files_held_the_roster() {
        let fx = fixture().await;
        let out = tempfile::tempdir().unwrap();
        let s = settings(out.path());
        let snap = |how| {
            write_snapshot(&fx.store, T, &s, how, &CancellationToken::new())
                .unwrap()
                .differed
        };
        assert_eq!(snap(Snapshot::Replace), None);
        assert_eq!(snap(Snapshot::Compare), Some(false));
        // The archive's bytes differ (a second later, its entries' times do), its content
        // does not.
        let zip = out.path().join(BUNDLE_FILE);
        let before = std::fs::read(&zip).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2100));
        assert_eq!(snap(Snapshot::CompareAndReplace), Some(false));
        assert_ne!(std::fs::read(&zip).unwrap(), before);

        // A group's new name is in the bundle's classes.csv only, not in the roster CSV.
        let roster = std::fs::read(out.path().join("roster.csv")).unwrap();
        fx.store
            .update(T, ResourceKind::Group, &fx.ops, None, |old| {
                let mut doc = old.clone();
                doc["displayName"] = json!("Ops renamed");
                Ok(crate::store::Update {
                    doc,
                    members: vec![],
                })
            })
            .await
            .unwrap();
        let zipped = unzip(&zip);
        // A dry run compares and leaves the files as they were.
        assert_eq!(snap(Snapshot::Compare), Some(true));
        assert_eq!(unzip(&zip), zipped);
        assert_eq!(listing(out.path()).len(), 2, "{:?}", listing(out.path()));
        assert_eq!(snap(Snapshot::CompareAndReplace), Some(true));
        assert_eq!(
            std::fs::read(out.path().join("roster.csv")).unwrap(),
            roster
        );
        assert_eq!(snap(Snapshot::CompareAndReplace), Some(false));

        // A roster CSV edited, cut short or removed at the target differs.
        let csv = out.path().join("roster.csv");
        let mut edited = roster.clone();
        *edited.last_mut().unwrap() = b' ';
        std::fs::write(&csv, &edited).unwrap();
        assert_eq!(snap(Snapshot::CompareAndReplace), Some(true));
        std::fs::write(&csv, &roster[..roster.len() - 1]).unwrap();
        assert_eq!(snap(Snapshot::CompareAndReplace), Some(true));
        std::fs::remove_file(&csv).unwrap();
        assert_eq!(snap(Snapshot::Compare), Some(true));
        assert!(!csv.exists(), "a dry run wrote the file");
        assert_eq!(snap(Snapshot::CompareAndReplace), Some(true));
        assert_eq!(std::fs::read(&csv).unwrap(), roster);
        // So does a bundle that is no archive.
        std::fs::write(&zip, b"not a zip").unwrap();
        assert_eq!(snap(Snapshot::CompareAndReplace), Some(true));
        assert_eq!(snap(Snapshot::Compare), Some(false));
    }

    #[tokio::test]
    async fn the_oneroster_bundle_has_every_file_and_row() {
        let fx = fixture().await;
        let out = tempfile::tempdir().unwrap();
        let report = written(&fx.store, &settings(out.path()));
        assert_eq!(
            report.files,
            vec![out.path().join("roster.csv"), out.path().join(BUNDLE_FILE)]
        );
        assert_eq!(listing(out.path()), vec!["oneroster.zip", "roster.csv"]);

        let entries = unzip(&out.path().join(BUNDLE_FILE));
        let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "manifest.csv",
                "orgs.csv",
                "courses.csv",
                "users.csv",
                "roles.csv",
                "classes.csv",
                "enrollments.csv"
            ]
        );
        let files: BTreeMap<&str, Vec<Vec<String>>> = entries
            .iter()
            .map(|(n, b)| (n.as_str(), parse(b)))
            .collect();
        for (name, b) in &entries {
            assert!(
                std::str::from_utf8(b).unwrap().ends_with("\r\n"),
                "{name} uses CRLF"
            );
        }

        let manifest = &files["manifest.csv"];
        assert_eq!(manifest[0], ["propertyName", "value"]);
        assert_eq!(manifest.len(), 1 + 2 + 21 + 2);
        let prop = |k: &str| by_first(manifest, k)[1].clone();
        assert_eq!(prop("manifest.version"), "1.0");
        assert_eq!(prop("oneroster.version"), "1.2");
        for f in [
            "users",
            "orgs",
            "courses",
            "classes",
            "enrollments",
            "roles",
        ] {
            assert_eq!(prop(&format!("file.{f}")), "bulk", "{f}");
        }
        for f in ["academicSessions", "categories", "demographics", "results"] {
            assert_eq!(prop(&format!("file.{f}")), "absent", "{f}");
        }
        assert_eq!(prop("source.systemName"), "rosterd");
        assert_eq!(prop("source.systemCode"), T);

        let orgs = &files["orgs.csv"];
        assert_eq!(orgs[0], ORGS);
        assert_eq!(
            orgs[1],
            [
                "org-1",
                "",
                "",
                "'=Springfield, \"District\"",
                "district",
                "",
                ""
            ]
        );
        let courses = &files["courses.csv"];
        assert_eq!(courses[0], COURSES);
        assert_eq!(courses.len(), 2);
        assert_eq!(courses[1][0], "course-1");
        // The configured title, neutralized as every text cell is.
        assert_eq!(courses[1][4], "'@Staff groups");
        assert_eq!(courses[1][7], "org-1");

        let users = &files["users.csv"];
        assert_eq!(users[0], USERS);
        assert_eq!(users.len(), 4);
        let ada = by_first(users, &user_sid(&fx.ada));
        assert_eq!(&ada[1..5], ["", "", "true", "ada@x.test"]);
        assert_eq!(ada[6], "Ada");
        assert_eq!(ada[7], "Lovelace, \"Countess\"");
        assert_eq!(ada[10], "ada@x.test");
        assert_eq!(ada[20], "org-1");
        let bob = by_first(users, &user_sid(&fx.bob));
        assert_eq!(bob[3], "false", "inactive users are disabled, not left out");
        assert_eq!(bob[4], "bob");
        assert_eq!(bob[6], "'+Bob");
        assert_eq!(bob[9], "E2");
        assert_eq!(bob[10], "bob@x.test");
        let cy = by_first(users, &user_sid(&fx.cy));
        // Names from the display name: never the email's local part or a "-".
        assert_eq!((cy[6].as_str(), cy[7].as_str()), ("Cy", "Young"));
        assert_eq!(report.unmappable, 0);

        let roles = &files["roles.csv"];
        assert_eq!(roles[0], ROLES);
        assert_eq!(roles.len(), 4);
        let role_of = |id: &str| {
            let r = by_first(roles, &sourced_id(T, &format!("Role/{id}")));
            assert_eq!(r[3], user_sid(id));
            assert_eq!((r[4].as_str(), r[8].as_str()), ("primary", "org-1"));
            r[5].clone()
        };
        assert_eq!(role_of(&fx.ada), "districtAdministrator");
        assert_eq!(role_of(&fx.bob), "teacher");
        assert_eq!(role_of(&fx.cy), "teacher");

        let classes = &files["classes.csv"];
        assert_eq!(classes[0], CLASSES);
        assert_eq!(classes.len(), 3);
        let ops = by_first(classes, &sourced_id(T, &format!("Group/{}", fx.ops)));
        assert_eq!(ops[3], "Ops, \"core\"");
        assert_eq!(
            (&ops[5], &ops[6], &ops[7], &ops[9]),
            (
                &"course-1".to_owned(),
                &"OPS-1".to_owned(),
                &"homeroom".to_owned(),
                &"org-1".to_owned()
            )
        );
        let evil = by_first(classes, &sourced_id(T, &format!("Group/{}", fx.evil)));
        assert_eq!(evil[3], "'=evil");

        let enrollments = &files["enrollments.csv"];
        assert_eq!(enrollments[0], ENROLLMENTS);
        let mut got: Vec<Vec<String>> = enrollments[1..].to_vec();
        got.sort();
        let mut want: Vec<Vec<String>> =
            [(&fx.ops, &fx.ada), (&fx.ops, &fx.bob), (&fx.evil, &fx.cy)]
                .iter()
                .map(|(g, u)| {
                    [
                        enrollment_id(T, g, u),
                        String::new(),
                        String::new(),
                        sourced_id(T, &format!("Group/{g}")),
                        "org-1".into(),
                        user_sid(u),
                        "student".into(),
                        "false".into(),
                        String::new(),
                        String::new(),
                    ]
                    .to_vec()
                })
                .collect();
        want.sort();
        assert_eq!(
            got, want,
            "one enrollment per user member; none for the nested group"
        );
    }

    /// A stop cuts a write short: at a million users it outlasts the stop's time.
    #[tokio::test]
    async fn a_stopped_write_leaves_the_files_as_they_were() {
        let fx = fixture().await;
        let out = tempfile::tempdir().unwrap();
        let s = settings(out.path());
        written(&fx.store, &s);
        let before: Vec<(String, Vec<u8>)> = listing(out.path())
            .into_iter()
            .map(|n| (n.clone(), std::fs::read(out.path().join(n)).unwrap()))
            .collect();
        fx.store
            .delete(T, ResourceKind::User, &fx.cy, None)
            .await
            .unwrap();
        let stop = CancellationToken::new();
        stop.cancel();
        let err = write_snapshot(&fx.store, T, &s, Snapshot::Replace, &stop).unwrap_err();
        assert!(matches!(err, CsvError::Stopped), "{err}");
        let after: Vec<(String, Vec<u8>)> = listing(out.path())
            .into_iter()
            .map(|n| (n.clone(), std::fs::read(out.path().join(n)).unwrap()))
            .collect();
        assert_eq!(before, after, "files changed, or a temporary file was left");
    }

    /// A stop at any write of the files (the roster, the roles spool, each bundle entry,
    /// the bundle's end) leaves them as they were, and no temporary file.
    #[tokio::test]
    async fn a_write_stopped_at_any_point_leaves_the_files_as_they_were() {
        let fx = fixture().await;
        let out = tempfile::tempdir().unwrap();
        let s = settings(out.path());
        assert!(s.oneroster.is_some());
        written(&fx.store, &s);
        let contents = || -> Vec<(String, Vec<u8>)> {
            listing(out.path())
                .into_iter()
                .map(|n| (n.clone(), std::fs::read(out.path().join(n)).unwrap()))
                .collect()
        };
        let before = contents();
        fx.store
            .delete(T, ResourceKind::User, &fx.cy, None)
            .await
            .unwrap();
        let halt = |after: usize| {
            let h = Arc::new(Halt::new(CancellationToken::new()));
            *h.stop_after.lock().unwrap() = Some(after);
            h
        };
        // How many writes a whole write makes, elsewhere.
        let elsewhere = tempfile::tempdir().unwrap();
        let counted = halt(1_000_000);
        write_halted(
            &fx.store,
            T,
            &settings(elsewhere.path()),
            Snapshot::Replace,
            &counted,
            &mut |_| Ok(()),
        )
        .unwrap();
        let writes = 1_000_000 - counted.stop_after.lock().unwrap().unwrap();
        assert!(writes > 3, "{writes}");
        for n in 0..writes {
            let err = write_halted(&fx.store, T, &s, Snapshot::Replace, &halt(n), &mut |_| {
                Ok(())
            })
            .unwrap_err();
            assert!(
                matches!(err, CsvError::Stopped),
                "stopped at write {n}: {err}"
            );
            assert!(
                contents() == before,
                "stopped at write {n}: files changed, or a temporary file was left"
            );
        }
    }

    /// An error of its own at the moment of a stop is not put down to the stop (whose
    /// message says the files are as they were).
    #[tokio::test]
    async fn a_failed_write_during_a_stop_says_what_failed() {
        let fx = fixture().await;
        let out = tempfile::tempdir().unwrap();
        // A file where the directory should be.
        let dir = out.path().join("out");
        std::fs::write(&dir, "in the way").unwrap();
        let stop = CancellationToken::new();
        stop.cancel();
        let err =
            write_snapshot(&fx.store, T, &settings(&dir), Snapshot::Replace, &stop).unwrap_err();
        assert!(matches!(err, CsvError::Io { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_second_snapshot_replaces_the_first_atomically() {
        use std::os::unix::fs::MetadataExt;
        let fx = fixture().await;
        let out = tempfile::tempdir().unwrap();
        let s = settings(out.path());
        written(&fx.store, &s);
        let path = out.path().join("roster.csv");
        let before = std::fs::read(&path).unwrap();
        let inode = std::fs::metadata(&path).unwrap().ino();
        // A reader that opened the old file keeps reading the whole old file.
        let mut reader = File::open(&path).unwrap();

        let dee = fx
            .store
            .create(
                T,
                ResourceKind::User,
                json!({"userName": "dee@x.test", "displayName": "Dee Dee Ramone"}),
                vec![],
            )
            .await
            .unwrap()
            .id;
        fx.store
            .delete(T, ResourceKind::User, &fx.cy, None)
            .await
            .unwrap();
        let report = written(&fx.store, &s);
        assert_eq!(report.users, 3);

        let after = std::fs::read(&path).unwrap();
        assert_ne!(
            std::fs::metadata(&path).unwrap().ino(),
            inode,
            "renamed, not rewritten"
        );
        let mut old = Vec::new();
        reader.read_to_end(&mut old).unwrap();
        assert_eq!(old, before);
        let rows = parse(&after);
        assert!(rows.iter().any(|r| r[0] == "user:dee@x.test"));
        assert!(!rows.iter().any(|r| r[0] == "user:cy@x.test"));

        let entries = unzip(&out.path().join(BUNDLE_FILE));
        let users = parse(&entries.iter().find(|(n, _)| n == "users.csv").unwrap().1);
        assert!(users.iter().any(|r| r[0] == user_sid(&dee)));
        assert!(!users.iter().any(|r| r[0] == user_sid(&fx.cy)));
        let enrollments = parse(
            &entries
                .iter()
                .find(|(n, _)| n == "enrollments.csv")
                .unwrap()
                .1,
        );
        assert_eq!(enrollments.len(), 1 + 2, "cy's enrollment went with cy");
        assert_eq!(listing(out.path()), vec!["oneroster.zip", "roster.csv"]);
    }

    #[tokio::test]
    async fn a_failed_snapshot_leaves_the_old_files_and_no_temporary_ones() {
        let fx = fixture().await;
        let out = tempfile::tempdir().unwrap();
        let s = settings(out.path());
        written(&fx.store, &s);
        let roster_before = std::fs::read(out.path().join("roster.csv")).unwrap();
        // The bundle's target cannot be replaced: a non-empty directory stands there.
        std::fs::remove_file(out.path().join(BUNDLE_FILE)).unwrap();
        std::fs::create_dir(out.path().join(BUNDLE_FILE)).unwrap();
        std::fs::write(out.path().join(BUNDLE_FILE).join("x"), "x").unwrap();
        let err = write_snapshot(
            &fx.store,
            T,
            &s,
            Snapshot::Replace,
            &CancellationToken::new(),
        )
        .unwrap_err();
        assert!(
            matches!(&err, CsvError::Io { path, .. } if path.ends_with(BUNDLE_FILE)),
            "{err}"
        );
        assert!(err.to_string().contains("oneroster.zip"), "{err}");
        assert_eq!(listing(out.path()), vec!["oneroster.zip", "roster.csv"]);
        // The roster CSV was replaced before the bundle failed (same content here).
        assert_eq!(
            std::fs::read(out.path().join("roster.csv")).unwrap(),
            roster_before
        );

        // A directory that cannot be created is named in the error.
        let file = out.path().join("roster.csv");
        let err = write_snapshot(
            &fx.store,
            T,
            &settings(&file.join("sub")),
            Snapshot::Replace,
            &CancellationToken::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("roster.csv/sub"), "{err}");
    }

    #[tokio::test]
    async fn a_file_where_the_directory_should_be_is_named_as_such() {
        let fx = fixture().await;
        let out = tempfile::tempdir().unwrap();
        let file = out.path().join("exports");
        std::fs::write(&file, b"not a directory").unwrap();
        let err = write_snapshot(
            &fx.store,
            T,
            &settings(&file),
            Snapshot::Replace,
            &CancellationToken::new(),
        )
        .unwrap_err()
        .to_string();
        // create_dir_all alone says "File exists", which reads as if all were well.
        assert!(
            err.contains("cannot create the directory") && err.contains("a file has that name"),
            "{err}"
        );
    }

    #[test]
    fn the_roster_file_may_not_take_the_bundles_name() {
        let mut s = settings(Path::new("/tmp/x"));
        s.file_name = BUNDLE_FILE.into();
        assert!(s.validate().unwrap_err().contains("OneRoster bundle"));
        s.oneroster = None;
        assert!(s.validate().is_ok());
        s.file_name = "..".into();
        assert!(s.validate().is_err());
    }
}
