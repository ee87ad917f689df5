//! Log lines that the systemd journal files at their level.
//!
//! Under systemd, stdout and stderr are streams into journald, which files an unmarked
//! line at the unit's `SyslogLevel=` (info), so `journalctl -p warning` would show none
//! of rosterd's warnings or errors. A line that starts with a `<N>` syslog priority is
//! filed at that priority instead (`sd-daemon(3)`). journald also makes every line an
//! entry of its own: the lines after the first of a message that spans several (a TOML
//! error's diagram, whose last line holds the reason) would be filed at info, apart from
//! their first line. So, on the journal only, an event is one line and its newlines are
//! written as `\n`, as the JSON format writes them anyway.
//!
//! systemd says a stream is the journal's by setting `JOURNAL_STREAM` to its
//! `device:inode`; a stream redirected elsewhere (a pipe to `tee`, a file) gets no
//! prefix even when the variable is inherited.
//!
//! A file or a pipe gets one line per event as well ([`OneLineStdout`]): there a line
//! break inside a value (a connector file named with one, a target's error text) starts
//! what reads as an event of its own, and one file name forged a whole `Reload finished.
//! errors=0` line. Control characters are escaped on both, as the JSON format escapes
//! them; only a terminal gets an event's lines as they are, for a person to read.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use crate::text;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Syslog priorities (`syslog(3)`) as `sd-daemon(3)` prefixes them.
pub const ERR: u8 = 3;
const WARNING: u8 = 4;
const INFO: u8 = 6;
const DEBUG: u8 = 7;

/// Whether `stream` is connected to the journal, by systemd's `JOURNAL_STREAM`.
pub fn is_journal(stream: &impl AsFd) -> bool {
    let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = var.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let Ok(fd) = stream.as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => ERR,
        Level::WARN => WARNING,
        Level::INFO => INFO,
        _ => DEBUG,
    }
}

/// `text` as one line: a journal entry of `priority` (its prefix) or, without one, a line
/// of a log file; line breaks written `\n` and `\r`, and whatever else
/// [`text::breaks_line`] names but the tab (ESC, which drives a terminal that `cat`s the
/// file; C1's CSI, which some terminals take for ESC `[`; U+2028, which a viewer shows
/// as a new line) as `\u{1b}`; bytes that are not UTF-8 as `\u{fffd}`; one newline.
pub fn entry(priority: Option<u8>, text: &[u8]) -> Vec<u8> {
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    let mut out = Vec::with_capacity(text.len() + 8);
    if let Some(priority) = priority {
        out.extend_from_slice(format!("<{priority}>").as_bytes());
    }
    let mut buf = [0u8; 4];
    for chunk in text.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => out.extend_from_slice(b"\\n"),
                '\r' => out.extend_from_slice(b"\\r"),
                '\t' => out.push(b'\t'),
                c if text::breaks_line(c) => {
                    out.extend_from_slice(format!("\\u{{{:x}}}", u32::from(c)).as_bytes());
                }
                c => out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes()),
            }
        }
        for _ in chunk.invalid() {
            out.extend_from_slice(b"\\u{fffd}");
        }
    }
    out.push(b'\n');
    out
}

/// A `tracing_subscriber` writer to stdout that prefixes each event with its level's
/// priority and keeps it on one line.
#[derive(Clone, Copy, Debug, Default)]
pub struct JournalStdout;

impl<'a> MakeWriter<'a> for JournalStdout {
    type Writer = Entry;

    fn make_writer(&'a self) -> Entry {
        Entry::new(Some(INFO))
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Entry {
        Entry::new(Some(priority(meta.level())))
    }
}

/// A `tracing_subscriber` writer to stdout that keeps each event on one line, with no
/// prefix: for a log file or a pipe.
#[derive(Clone, Copy, Debug, Default)]
pub struct OneLineStdout;

impl<'a> MakeWriter<'a> for OneLineStdout {
    type Writer = Entry;

    fn make_writer(&'a self) -> Entry {
        Entry::new(None)
    }
}

/// One event, gathered whole and written as one entry when dropped: the formatter may
/// write an event in several pieces, and a prefix and escaping need all of it.
#[derive(Debug)]
pub struct Entry {
    priority: Option<u8>,
    text: Vec<u8>,
}

impl Entry {
    fn new(priority: Option<u8>) -> Self {
        Entry {
            priority,
            text: Vec::new(),
        }
    }
}

impl Write for Entry {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        if self.text.is_empty() {
            return;
        }
        // A log line that cannot be written has nowhere else to go.
        let _ = std::io::stdout()
            .lock()
            .write_all(&entry(self.priority, &self.text));
    }
}

/// Log capture for tests, the daemon's own (the integration tests') and the unit tests'.
pub mod testing {
    /// Collects what the daemon logs on a test's thread (a `#[tokio::test]` runs the
    /// daemon's tasks there).
    #[derive(Clone, Default)]
    pub struct LogBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for LogBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl LogBuf {
        /// Capture INFO and above until the guard drops.
        pub fn capture() -> (LogBuf, tracing::subscriber::DefaultGuard) {
            // tracing caches per callsite, for the whole process, whether it is enabled. While
            // at most one dispatcher is registered it asks only the subscriber of the thread
            // that first reaches the callsite: another test's thread, which has none, would
            // switch off here a span or event this capture waits for (tokio-rs/tracing#2874).
            // A second dispatcher, never used, makes it ask every registered one instead.
            static BYSTANDER: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
            BYSTANDER.get_or_init(|| {
                tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default())
            });
            let logs = LogBuf::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .with_writer(move || writer.clone())
                .finish();
            (logs, tracing::subscriber::set_default(subscriber))
        }

        pub fn lines(&self, containing: &str) -> Vec<String> {
            String::from_utf8_lossy(
                &self
                    .0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            )
            .lines()
            .filter(|l| l.contains(containing))
            .map(str::to_owned)
            .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_one_prefixed_line() {
        assert_eq!(
            entry(Some(4), b"Bundle not reloaded.\n"),
            b"<4>Bundle not reloaded.\n"
        );
        assert_eq!(
            entry(
                Some(3),
                b"TOML parse error at line 3\n  |\nunknown field `x`\n"
            ),
            b"<3>TOML parse error at line 3\\n  |\\nunknown field `x`\n"
        );
        assert_eq!(entry(Some(6), b"no newline"), b"<6>no newline\n");
    }

    #[test]
    fn a_line_of_a_log_file_escapes_what_would_start_or_redraw_one() {
        assert_eq!(
            entry(
                None,
                b"file=a\nZ INFO Reload finished.\x1b[31m\r\x07\x7f.toml\tok\n"
            ),
            b"file=a\\nZ INFO Reload finished.\\u{1b}[31m\\r\\u{7}\\u{7f}.toml\tok\n".to_vec()
        );
        // UTF-8 stays as it is, but for C1 controls and the line and paragraph separators;
        // a byte that is not UTF-8 shows as one.
        assert_eq!(entry(None, "café ✓".as_bytes()), "café ✓\n".as_bytes());
        assert_eq!(
            entry(None, "a\u{9b}31m\u{2028}Z INFO forged\u{2029}".as_bytes()),
            b"a\\u{9b}31m\\u{2028}Z INFO forged\\u{2029}\n".to_vec()
        );
        assert_eq!(entry(None, b"a\xffb"), b"a\\u{fffd}b\n".to_vec());
    }

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
        assert_eq!(priority(&Level::TRACE), 7);
    }
}
