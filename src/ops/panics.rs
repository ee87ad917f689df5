//! What happens when a bug panics. A panic must not leave a task silently dead (a
//! connector that no longer delivers, a job that shows "running" forever, a schedule that
//! never fires again) nor reach the log only as Rust's unformatted stderr line, outside
//! the JSON log and without the request id an operator searches by.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;

/// What a panic said: its message when it carried text (`panic!`, `unwrap`, `expect`),
/// else a placeholder rather than nothing.
pub fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

thread_local! {
    /// Set while a panic on this thread is one its caller expects and turns into an error
    /// of its own (sled's on damaged files): no bug to report.
    static EXPECTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` to its end, or to its panic, whose message comes back as the error. For
/// supervisors only: what `f` touched may be left half-done, so the caller must hold
/// nothing that the panic could leave inconsistent. The store holds up: a writer that
/// panics mid-batch leaves the tree to be finished by its redo record at the next open,
/// and the export's row file is no longer used (see `Tenant::writes`).
pub async fn catch<F: Future>(f: F) -> Result<F::Output, String> {
    AssertUnwindSafe(f)
        .catch_unwind()
        .await
        .map_err(|p| message(p.as_ref()))
}

/// [`catch`] for synchronous work.
pub fn catch_sync<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|p| message(p.as_ref()))
}

/// As [`catch_sync`], for a panic of sled's the caller expects and reports itself: the
/// hook logs those at DEBUG only, not as a bug (any other is still one).
pub fn catch_expected<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let was = EXPECTED.replace(true);
    let r = catch_sync(f);
    EXPECTED.set(was);
    r
}

/// Keep Rust's default report of a panic, but for sled's that the caller expects and
/// answers as an error (see [`catch_expected`]): for the commands, which log nothing.
/// `rosterd store check` on a damaged store printed sled's assertion (and, with
/// `RUST_BACKTRACE` set, a stack backtrace) before its own error, which `serve` does not.
pub fn quiet_expected() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !expected(info) {
            default(info);
        }
    }));
}

/// A panic of sled's under [`catch_expected`]. Only sled's own: a panic in rosterd's
/// code under the same guard (a bug in a store upgrade) is still a bug to report.
fn expected(info: &std::panic::PanicHookInfo<'_>) -> bool {
    EXPECTED.get() && info.location().is_some_and(|l| l.file().contains("/sled-"))
}

/// Route every panic through `tracing`, with where it happened and a backtrace, instead of
/// Rust's default stderr line. The event is emitted on the panicking thread, inside the
/// span that was current there: a handler's panic carries its request id and tenant.
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        if expected(info) {
            tracing::debug!(panic = %message(info.payload()), "An expected panic, answered as an error.");
            return;
        }
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        // Forced: RUST_BACKTRACE is rarely set on a service, and a panic is rare enough
        // that its cost does not matter.
        let backtrace = std::backtrace::Backtrace::force_capture().to_string();
        tracing::error!(
            panic = %message(info.payload()),
            location = %location,
            frames = %own_frames(&backtrace),
            "A bug: rosterd panicked. What it was doing was stopped or restarted; report this line."
        );
        // Caught panics leave the daemon up, seen only in the log until now.
        metrics::counter!(crate::ops::metrics::PANICS_TOTAL).increment(1);
    }));
}

/// rosterd's own functions in a backtrace, innermost first, on one line: a full trace
/// is some fifty lines of std and tokio, and each would be a journal entry of its own.
fn own_frames(backtrace: &str) -> String {
    let frames: Vec<&str> = backtrace
        .lines()
        .filter_map(|l| {
            let (n, symbol) = l.trim_start().split_once(": ")?;
            n.bytes()
                .all(|b| b.is_ascii_digit())
                .then_some(symbol.trim())
        })
        .filter(|s| {
            let s = s.trim_start_matches('<');
            s.starts_with("rosterd::") && !s.starts_with("rosterd::ops::panics::install_hook")
        })
        // The symbol's hash says nothing to a reader.
        .map(|s| match s.rsplit_once("::h") {
            Some((f, h)) if h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()) => f,
            _ => s,
        })
        .collect();
    if frames.is_empty() {
        "none of rosterd's own (symbols stripped?)".to_owned()
    } else {
        frames.join(" <- ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backtrace_is_cut_to_rosterds_frames() {
        let trace = "   0: std::backtrace::Backtrace::force_capture
             at /rustc/x/library/std/src/backtrace.rs:312:9
   1: rosterd::ops::panics::install_hook::{{closure}}
   2: std::panicking::rust_panic_with_hook
  10: rosterd::dispatch::run_http::{{closure}}::h0123456789abcdef
  11: <rosterd::store::Store as core::clone::Clone>::clone
  12: tokio::runtime::task::core::Core<T,S>::poll";
        assert_eq!(
            own_frames(trace),
            "rosterd::dispatch::run_http::{{closure}} <- <rosterd::store::Store as core::clone::Clone>::clone"
        );
        assert_eq!(
            own_frames("   0: std::rt::lang_start"),
            "none of rosterd's own (symbols stripped?)"
        );
    }

    #[tokio::test]
    async fn a_blocking_tasks_panic_is_an_error_of_its_own() {
        use crate::store::StoreError;
        let e = tokio::task::spawn_blocking(|| -> u8 { panic!("in blocking work") })
            .await
            .map_err(StoreError::from_join)
            .unwrap_err();
        assert!(
            matches!(&e, StoreError::Panicked(m) if m == "in blocking work"),
            "{e:?}"
        );
        assert_eq!(
            catch_expected(|| -> u8 { panic!("sled, on a damaged file") }),
            Err("sled, on a damaged file".to_owned())
        );
    }

    #[tokio::test]
    async fn a_panic_comes_back_with_its_message() {
        let n = 7;
        let static_text = catch(async { panic!("static text") }).await;
        let formatted = catch(async move { panic!("formatted {n}") }).await;
        let other = catch(async { std::panic::panic_any(42u8) }).await;
        let fine = catch(async { 5 }).await;
        assert_eq!(static_text, Err::<(), _>("static text".to_owned()));
        assert_eq!(formatted, Err::<(), _>("formatted 7".to_owned()));
        assert_eq!(other, Err::<(), _>("a panic without a message".to_owned()));
        assert_eq!(fine, Ok(5));
    }
}
