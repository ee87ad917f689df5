//! `rosterd store`: back up, check, repair, make and rewrite a stopped daemon's store. A
//! backup is checked on a copy, since it must stay as written.

use anyhow::{Context, Result};
use rosterd::config::Config;
use rosterd::text::terminal_safe;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::serve::data_dir_setting;

pub(crate) fn rewrite_store(path: PathBuf, data_dir: Option<PathBuf>) -> Result<()> {
    let config = Config::load(&path)?;
    let (dir, key) = data_dir_setting(&path, &config, data_dir.as_deref())?;
    let done = rosterd::store::rewrite(&dir).with_context(|| key.clone())?;
    let mib = |b: u64| b as f64 / 1_048_576.0;
    outln!(
        "rewrote {}: {} keys; {:.1} MiB before, {:.1} MiB now",
        dir.display(),
        done.keys,
        mib(done.before),
        mib(done.after)
    )?;
    outln!(
        "the old directory is kept at {}; remove it once rosterd runs well on the new one",
        done.kept.display()
    )?;
    Ok(())
}

pub(crate) fn init_store(path: PathBuf, data_dir: Option<PathBuf>) -> Result<()> {
    let config = Config::load(&path)?;
    let (dir, key) = data_dir_setting(&path, &config, data_dir.as_deref())?;
    if rosterd::store::Store::holds_store(&dir) {
        anyhow::bail!("{key}: {} already holds a store", dir.display());
    }
    rosterd::store::Store::check_dir(&dir).with_context(|| key.clone())?;
    rosterd::store::Store::create_private_dir(&dir)
        .with_context(|| format!("{key}: cannot create {}", dir.display()))?;
    let store = rosterd::store::Store::open_with_cache(&dir, 16 * 1024 * 1024)
        .with_context(|| key.clone())?;
    store.close().with_context(|| key.clone())?;
    outln!(
        "made a new, empty store in {}; `rosterd serve` starts on it",
        dir.display()
    )?;
    Ok(())
}

/// The store is held, by no daemon that recorded itself: another store command (a backup,
/// a check) is at work, or a daemon is still opening the store.
fn held_by_a_command(key: &str, dir: &std::path::Path) -> String {
    format!(
        "{key}: another process holds the store in {}, and no running rosterd has recorded itself there: another `rosterd store` command (a backup, a check) at work, or a daemon still opening the store; run this one once it is done",
        dir.display()
    )
}

pub(crate) fn check_store(path: PathBuf, data_dir: Option<PathBuf>, repair: bool) -> Result<()> {
    let mut config = Config::load(&path)?;
    let given = data_dir.is_some();
    let (dir, key) = data_dir_setting(&path, &config, data_dir.as_deref())?;
    // Opening a store writes to its files (643 MB into a 7 GiB backup's `db`, its content
    // unchanged), and a backup must stay as written for what copies it off the machine:
    // one is checked on a copy. The data directory itself is the store, not a backup,
    // wherever it is (a backup served in place).
    let backup_dir = config.backup_dir();
    if given && backup_of(&dir, &backup_dir) {
        if repair {
            anyhow::bail!(
                "--data-dir: {} is a backup, which must stay as written, and --repair writes to the store: check it without --repair (rosterd checks a copy), or {}",
                dir.display(),
                repair_a_copy(&dir)
            );
        }
        return check_backup_copy(&config, &dir, &key);
    }
    // The backups the refusal below points to are those of the store checked.
    config.server.data_dir = dir.clone();
    check_dir(&config, &dir, &dir, &key, repair)
}

/// How to repair backup `dir`, which stays as written: on a copy under another name,
/// without the marker that makes the copy a backup too (`--repair` refuses one).
fn repair_a_copy(dir: &std::path::Path) -> String {
    format!(
        "repair a copy of it under another name, without its backup marker (`cp -a {} /var/tmp/rosterd-repair && rm -f /var/tmp/rosterd-repair/.rosterd-backup`, as the store's user, then `--repair --data-dir /var/tmp/rosterd-repair`)",
        dir.display()
    )
}

/// Whether `dir` is a backup: marked as one (moved or renamed since), inside the
/// config's backup directory, or named as one (a backup from before the mark).
fn backup_of(dir: &std::path::Path, backup_dir: &std::path::Path) -> bool {
    let real = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    rosterd::store::written_as_backup(dir)
        || real(dir).starts_with(real(backup_dir))
        || rosterd::ops::backup::named_as_backup(&real(dir))
}

/// `store check` of backup `dir`, on a copy of it made in `$TMPDIR` (default /var/tmp,
/// which is on disk where /tmp may be memory) and removed after.
fn check_backup_copy(config: &Config, dir: &std::path::Path, key: &str) -> Result<()> {
    // Copied while a daemon serves it (one started on the backup in place), the copy
    // would be torn, and its problems not the store's.
    if rosterd::store::daemon_serving(dir) {
        // Its backups go beside the directory it serves, unless `[backup] dir` says.
        let mut served = config.clone();
        served.server.data_dir = dir.to_owned();
        return Err(checked_while_served(key, dir, &served.backup_dir()));
    }
    // Refused as it would be in place: another user's (as root), or one cut short.
    rosterd::store::Store::check_dir(dir).with_context(|| key.to_owned())?;
    let tmp = std::env::var_os("TMPDIR")
        .filter(|t| !t.is_empty())
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let copy = tmp.join(format!(
        "rosterd-check-{}-{}",
        std::process::id(),
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.fZ")
    ));
    // Before the copy is made: a Ctrl-C while it is written removes it too.
    let _removed_after = CheckCopy::watch(&copy, key);
    let copied =
        rosterd::store::Store::create_private_dir(&copy).and_then(|()| copy_tree(dir, &copy));
    if let Err(e) = copied {
        anyhow::bail!(
            "{key}: {} is a backup, which is checked on a copy (opening a store writes to its files, and a backup must stay as written), and copying it to {} failed: {e}. Point TMPDIR at a directory with room for a copy of it, as the store's user, and run the check again",
            dir.display(),
            copy.display()
        );
    }
    outln!("checking a copy of the backup, in {}", copy.display())?;
    let mut config = config.clone();
    config.server.data_dir = copy.clone();
    check_dir(&config, &copy, dir, key, false)
}

/// The copy a backup is checked on, removed however the check ends: done, failed, or
/// stopped by Ctrl-C, SIGTERM, SIGHUP (its terminal closed) or its reader gone
/// (`rosterd store check … | head`). A copy as large as the backup stayed in /var/tmp,
/// often the filesystem of /var/lib/rosterd, after each check stopped that way.
struct CheckCopy(Arc<Mutex<Option<(PathBuf, String)>>>);

impl CheckCopy {
    fn watch(copy: &Path, key: &str) -> Self {
        let held = Arc::new(Mutex::new(Some((copy.to_owned(), key.to_owned()))));
        // Ignored, so that a write to a reader gone fails and the copy is removed on the
        // way out; `main` then ends as SIGPIPE would have ended it.
        // SAFETY: SIG_IGN is a valid disposition, and nothing here relies on SIGPIPE's.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        let removing = held.clone();
        let watched = on_stop_signal(move |signal| {
            // Held while the check's own way out removes it, so this waits for that.
            remove_copy(&mut removing.lock().unwrap_or_else(|e| e.into_inner()));
            std::process::exit(128 + signal);
        });
        if let Err(e) = watched {
            note!(
                "{key}: cannot watch for Ctrl-C ({e}): stopped by a signal, this check would leave its copy in {}",
                copy.display()
            );
        }
        Self(held)
    }
}

impl Drop for CheckCopy {
    fn drop(&mut self) {
        remove_copy(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// Said whatever the check found: the copy is as large as the backup.
fn remove_copy(held: &mut Option<(PathBuf, String)>) {
    let Some((copy, key)) = held.take() else {
        return;
    };
    match std::fs::remove_dir_all(&copy) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => note!(
            "{key}: the copy of the backup in {} could not be removed ({e}): remove it (`rm -rf`)",
            copy.display()
        ),
        _ => {}
    }
}

/// Run `then` with the signal's number, on a thread of its own, at the first SIGINT,
/// SIGTERM or SIGHUP. The handlers are in place when this returns.
fn on_stop_signal(then: impl FnOnce(i32) + Send + 'static) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut int, mut term, mut hup) = {
        let _in = runtime.enter();
        (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
        )
    };
    std::thread::spawn(move || {
        let signal = runtime.block_on(async {
            tokio::select! {
                _ = int.recv() => libc::SIGINT,
                _ = term.recv() => libc::SIGTERM,
                _ = hup.recv() => libc::SIGHUP,
            }
        });
        then(signal);
    });
    Ok(())
}

/// `store check` of `dir`, which a running daemon serves: what to do instead. Its
/// backups go into `backups`.
fn checked_while_served(
    key: &str,
    dir: &std::path::Path,
    backups: &std::path::Path,
) -> anyhow::Error {
    anyhow::anyhow!(
        "{key}: rosterd is running on {} (it holds the store). Stop it first, or check a backup of it: `sudo systemctl kill -s USR1 --kill-who=main rosterd` writes one into {}, then `rosterd store check --data-dir <that backup>` (it checks a copy of it, in $TMPDIR or /var/tmp)",
        dir.display(),
        backups.display()
    )
}

/// Copy directory `from` into `to` (made already), with the files' permissions.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        let failed =
            |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", src.display()));
        if kind.is_dir() {
            rosterd::store::Store::create_private_dir(&dst).map_err(failed)?;
            copy_tree(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(failed)?;
        }
    }
    Ok(())
}

/// `store check` of the store in `dir`, named `shown` to the operator.
fn check_dir(
    config: &Config,
    dir: &std::path::Path,
    shown: &std::path::Path,
    key: &str,
    repair: bool,
) -> Result<()> {
    let key = key.to_owned();
    let store = match rosterd::store::Store::open_existing(dir, 64 * 1024 * 1024) {
        Ok(store) => store,
        Err(e) if e.held_elsewhere() && !rosterd::store::daemon_serving(dir) => {
            anyhow::bail!(held_by_a_command(&key, dir))
        }
        Err(e) if e.held_elsewhere() => {
            return Err(checked_while_served(&key, dir, &config.backup_dir()));
        }
        Err(e) => return Err(anyhow::Error::new(e).context(key)),
    };
    let tenants: Vec<String> = config.tenants.iter().map(|t| t.id.clone()).collect();
    let checked = (|| {
        if repair {
            let repaired = store.repair(&tenants)?;
            print_checks(&repaired, true)?;
            outln!("checking again after the repair:")?;
        }
        let checked = store.check(&tenants)?;
        anyhow::Ok(print_checks(&checked, false)?)
    })();
    store.close().with_context(|| key.clone())?;
    // Damaged pages say what to do themselves; any other read failure named no way out.
    let advised = checked.as_ref().err().is_some_and(|e| {
        e.chain().any(|c| {
            matches!(
                c.downcast_ref::<rosterd::store::StoreError>(),
                Some(rosterd::store::StoreError::Damaged(_))
            )
        })
    });
    let problems = checked.with_context(|| {
        if advised {
            format!("{key}: the check could not read the store")
        } else {
            format!(
                "{key}: the check could not read the store (keep a copy of the directory; restoring the newest backup that checks clean loses the changes since it, which the identity providers send again at their next full sync)"
            )
        }
    })?;
    // A copy's problems are the backup's: a repair of it would be thrown away.
    if problems > 0 && shown != dir {
        anyhow::bail!(
            "the backup in {} has {}: restore an older backup that checks clean instead, or {}",
            shown.display(),
            rosterd::text::plural(problems, "problem"),
            repair_a_copy(shown)
        );
    }
    if problems > 0 {
        anyhow::bail!(
            "the store in {} has {}{}. Keep a copy of the directory; restoring the newest backup that checks clean loses the changes since it, which the identity providers send again at their next full sync",
            shown.display(),
            rosterd::text::plural(problems, "problem"),
            if repair {
                " that a repair cannot put right"
            } else {
                " (`--repair` puts right those of derived keys)"
            }
        );
    }
    outln!("{}: every check passed", shown.display())?;
    Ok(())
}

/// A line per tenant and its problems; the number of problems.
fn print_checks(checked: &[rosterd::store::TenantCheck], repairing: bool) -> Result<u64> {
    let mut problems = 0;
    for t in checked {
        problems += t.problem_count;
        if t.absent && t.problem_count == 0 {
            outln!(
                "tenant {}: not in the store yet (the config names it; a start makes it)",
                t.tenant
            )?;
            continue;
        }
        let verdict = match t.problem_count {
            0 => "OK".to_owned(),
            n => rosterd::text::plural(n, "problem"),
        };
        outln!(
            "tenant {}: {}, {}, {}, {}, {}, {}: {verdict}",
            t.tenant,
            rosterd::text::plural(t.users, "user"),
            rosterd::text::plural(t.groups, "group"),
            rosterd::text::plural(t.memberships, "membership"),
            rosterd::text::plural(t.changes, "change"),
            rosterd::text::plural(t.governance_events, "governance event"),
            rosterd::text::plural(t.dead_letters, "dead letter")
        )?;
        if t.completed_a_write {
            outln!("  (completed a write the last stop had interrupted, as a start would)")?;
        }
        for p in &t.problems {
            outln!("  - {p}")?;
        }
        if t.problem_count > t.problems.len() as u64 {
            outln!(
                "  … and {} more (the first {} are listed)",
                t.problem_count - t.problems.len() as u64,
                rosterd::store::CHECK_LISTED
            )?;
        }
        if repairing && t.problem_count > 0 {
            outln!(
                "  repaired: {} written or removed",
                rosterd::text::plural(t.repaired, "key")
            )?;
        }
    }
    if checked.is_empty() && !repairing {
        outln!("the store holds no tenant")?;
    }
    Ok(problems)
}

pub(crate) fn backup_store(
    path: PathBuf,
    data_dir: Option<PathBuf>,
    to: Option<PathBuf>,
) -> Result<()> {
    let mut config = Config::load(&path)?;
    let (dir, key) = data_dir_setting(&path, &config, data_dir.as_deref())?;
    config.server.data_dir = dir.clone();
    let mut plan = rosterd::ops::backup::Plan::of(&config);
    match to {
        Some(to) => {
            config.check_backups_in(&to, "--to")?;
            plan.dir = to;
        }
        None => config.check_backup_dir()?,
    }
    // One pass over the store: a small cache does.
    let store = match rosterd::store::Store::open_existing(&dir, 64 * 1024 * 1024) {
        Ok(store) => store,
        Err(e) if e.held_elsewhere() && !rosterd::store::daemon_serving(&dir) => {
            anyhow::bail!(held_by_a_command(&key, &dir))
        }
        Err(e) if e.held_elsewhere() => {
            anyhow::bail!(
                "{key}: rosterd is running on {} (it holds the store). Ask it for the backup instead: `sudo systemctl kill -s USR1 --kill-who=main rosterd` (or `kill -USR1` its pid) writes one into {}, and `rosterd status` shows it when done",
                dir.display(),
                config.backup_dir().display()
            )
        }
        Err(e) => return Err(anyhow::Error::new(e).context(key)),
    };
    let written = rosterd::ops::backup::write(&store, &plan, chrono::Utc::now(), &|| false);
    store.close().with_context(|| key.clone())?;
    let written = written?;
    outln!("backup written: {}", written.summary())?;
    for old in &written.removed {
        outln!("removed the older backup {}", old.display())?;
    }
    if let Some(e) = &written.prune_error {
        note!("warning: cannot remove the backups older than the newest `keep`: {e}");
    }
    Ok(())
}
