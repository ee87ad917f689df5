//! systemd service-manager notifications (`sd_notify(3)`) for `Type=notify` units:
//! readiness, reloads, shutdown, free-form status and the watchdog.
//!
//! Every function is a no-op when `NOTIFY_SOCKET` is unset, which is the case whenever
//! rosterd is not run by systemd (a terminal, tests, containers), so callers need no
//! conditionals. Failures are logged with `tracing::warn!` and otherwise ignored: a daemon
//! that cannot reach systemd must keep serving, and systemd already acts on a missing
//! READY=1 (start timeout) or WATCHDOG=1 (restart) by itself.

use std::net::SocketAddr;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Whether a service manager is listening for notifications.
fn enabled() -> bool {
    std::env::var_os(NOTIFY_SOCKET).is_some()
}

fn send(what: &str, states: &[NotifyState<'_>]) {
    if !enabled() {
        return;
    }
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, notification = what, "Cannot notify systemd.");
    }
}

/// The protocol is one `KEY=value` per line: a status carrying a newline (an error
/// message, say) would otherwise be read as further assignments such as `READY=1`.
fn one_line(status: &str) -> String {
    status.replace(['\n', '\r'], " ")
}

/// Tell systemd that startup is complete (`READY=1`): the store is open and the listener
/// bound to `addr`. Until then `systemctl start` waits and units ordered after rosterd do
/// not start. The status names the address, so `systemctl status` shows where it serves
/// (the port the kernel chose, for a listen address of port 0).
pub fn notify_ready(addr: SocketAddr) {
    send(
        "READY",
        &[NotifyState::Ready, NotifyState::Status(&serving(addr))],
    );
}

/// The status line while rosterd serves on `addr`.
pub fn serving(addr: SocketAddr) -> String {
    format!("Serving on {addr}")
}

/// Tell systemd that a reload (SIGHUP: connectors and bundles) has begun. Send
/// [`notify_reloaded`] when it is over, whether it succeeded or not.
///
/// `MONOTONIC_USEC` is included because systemd 253+ (`Type=notify-reload`) ignores a
/// `RELOADING=1` without it; older versions ignore the extra field.
pub fn notify_reloading() {
    let status = NotifyState::Status("Reloading connectors and bundles");
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send("RELOADING", &[NotifyState::Reloading, now, status]),
        Err(error) => {
            tracing::warn!(%error, "Cannot read CLOCK_MONOTONIC for systemd's reload notice.");
            send("RELOADING", &[NotifyState::Reloading, status]);
        }
    }
}

/// Tell systemd that the reload begun by [`notify_reloading`] is over (`READY=1`). After a
/// failed reload call [`notify_status`] next to say so; the daemon keeps its old config.
pub fn notify_reloaded(addr: SocketAddr) {
    // The same message as at start: ready again, serving where it did.
    notify_ready(addr);
}

/// Tell systemd that shutdown has begun (`STOPPING=1`), so it stops expecting watchdog
/// pings and reports the unit as deactivating rather than failed while requests drain.
pub fn notify_stopping() {
    send(
        "STOPPING",
        &[NotifyState::Stopping, NotifyState::Status("Shutting down")],
    );
}

/// Keep systemd's start timeout from running out while `work` runs (opening the store,
/// which upgrades an older data directory first: about 50 s per million users). Every
/// 10 s until `work` finishes, asks for 30 s more (`EXTEND_TIMEOUT_USEC`) and says why
/// in the status line.
pub async fn extending_start_timeout<T>(status: &str, work: impl Future<Output = T>) -> T {
    if !enabled() {
        return work.await;
    }
    let status = one_line(status);
    let keep_alive = async {
        loop {
            send(
                "EXTEND_TIMEOUT_USEC",
                &[
                    NotifyState::ExtendTimeoutUsec(30_000_000),
                    NotifyState::Status(&status),
                ],
            );
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    };
    tokio::select! {
        out = work => out,
        never = keep_alive => never,
    }
}

/// Set the one-line status shown by `systemctl status rosterd`. Newlines become spaces.
pub fn notify_status(status: &str) {
    if !enabled() {
        return;
    }
    let status = one_line(status);
    send("STATUS", &[NotifyState::Status(&status)]);
}

/// The interval between watchdog pings, if systemd asked for them (`WatchdogSec=`):
/// half the timeout, as `sd_watchdog_enabled(3)` recommends.
fn watchdog_period() -> Option<Duration> {
    if !enabled() {
        return None;
    }
    sd_notify::watchdog_enabled()
        .filter(|timeout| !timeout.is_zero())
        .map(|timeout| timeout / 2)
}

/// Start a task that sends `WATCHDOG=1` at half the unit's `WatchdogSec=` until `shutdown`
/// is cancelled. `None` when systemd did not enable the watchdog for this process, or when
/// called outside a Tokio runtime (logged).
///
/// The pings come from the async runtime, so a runtime that stops scheduling tasks
/// (blocked workers, a deadlock) stops pinging and systemd restarts the daemon.
pub fn spawn_watchdog(shutdown: CancellationToken) -> Option<JoinHandle<()>> {
    let period = watchdog_period()?;
    let runtime = match tokio::runtime::Handle::try_current() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::warn!(%error, "Cannot start the systemd watchdog outside the runtime.");
            return None;
        }
    };
    tracing::debug!(?period, "Pinging the systemd watchdog.");
    Some(runtime.spawn(async move {
        let mut ticks = tokio::time::interval(period);
        // After a stall, ping once and resume the cadence rather than burst.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                _ = ticks.tick() => send("WATCHDOG", &[NotifyState::Watchdog]),
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;
    use std::sync::Mutex;
    use std::time::Instant;

    /// Serializes every test that reads or writes the notification variables: the process
    /// environment is shared by all test threads.
    static ENV_LOCK: Mutex<()> = Mutex::new(());

    const VARS: [&str; 3] = [NOTIFY_SOCKET, "WATCHDOG_USEC", "WATCHDOG_PID"];

    /// Holds the lock and the listening socket; clears the variables when dropped, even
    /// when the test fails.
    struct Manager {
        socket: UnixDatagram,
        _dir: tempfile::TempDir,
        _lock: std::sync::MutexGuard<'static, ()>,
    }

    impl Manager {
        fn new(vars: &[(&str, String)]) -> Self {
            let lock = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("notify.sock");
            let socket = UnixDatagram::bind(&path).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            // SAFETY: ENV_LOCK serializes all environment changes in this crate's tests;
            // no test elsewhere in the crate touches these variables.
            unsafe {
                std::env::set_var(NOTIFY_SOCKET, &path);
                for (k, v) in vars {
                    std::env::set_var(k, v);
                }
            }
            Self {
                socket,
                _dir: dir,
                _lock: lock,
            }
        }

        /// Every datagram received until `wait` has passed with none arriving.
        fn drain(&self, wait: Duration) -> Vec<String> {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline {
                if let Ok(n) = self.socket.recv(&mut buf) {
                    got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
            got
        }

        /// The first datagram containing `line`, waiting up to 2s; other datagrams (sent
        /// by other code in this process) are skipped.
        fn expect(&self, line: &str) -> String {
            let mut buf = [0u8; 4096];
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if let Ok(n) = self.socket.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if msg.lines().any(|l| l == line) {
                        return msg;
                    }
                }
            }
            panic!("no notification with {line:?} arrived");
        }
    }

    impl Drop for Manager {
        fn drop(&mut self) {
            // SAFETY: as in `new`; the lock is still held here.
            unsafe {
                for k in VARS {
                    std::env::remove_var(k);
                }
            }
        }
    }

    #[test]
    fn notifications_reach_the_socket() {
        let m = Manager::new(&[]);

        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        notify_ready(addr);
        let msg = m.expect("READY=1");
        assert!(
            msg.lines().any(|l| l == "STATUS=Serving on 127.0.0.1:8080"),
            "{msg:?}"
        );

        notify_reloading();
        let msg = m.expect("RELOADING=1");
        let usec = msg
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {msg:?}"));
        assert!(usec.parse::<u64>().unwrap() > 0, "{msg:?}");
        notify_reloaded(addr);
        let msg = m.expect("READY=1");
        assert!(
            msg.lines().any(|l| l == "STATUS=Serving on 127.0.0.1:8080"),
            "{msg:?}"
        );

        notify_status("reload failed:\nREADY=1");
        let msg = m.expect("STATUS=reload failed: READY=1");
        assert_eq!(msg.lines().count(), 1, "{msg:?}");

        notify_stopping();
        m.expect("STOPPING=1");
    }

    #[test]
    fn watchdog_pings_until_cancelled() {
        let m = Manager::new(&[
            ("WATCHDOG_USEC", "100000".to_owned()),
            ("WATCHDOG_PID", std::process::id().to_string()),
        ]);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let shutdown = CancellationToken::new();
        runtime.block_on(async {
            let task = spawn_watchdog(shutdown.clone()).expect("watchdog enabled");
            // Pings at 0, 50, 100 and 150 ms.
            tokio::time::sleep(Duration::from_millis(175)).await;
            shutdown.cancel();
            task.await.unwrap();
        });
        let pings = m
            .drain(Duration::from_millis(200))
            .iter()
            .filter(|msg| msg.lines().any(|l| l == "WATCHDOG=1"))
            .count();
        assert!((2..=5).contains(&pings), "{pings} pings");
        // Nothing after cancellation.
        assert!(m.drain(Duration::from_millis(150)).is_empty());
    }

    #[test]
    fn a_long_start_extends_the_timeout_until_it_is_done() {
        let m = Manager::new(&[]);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let out = runtime.block_on(extending_start_timeout("Opening the\nstore", async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            7
        }));
        assert_eq!(out, 7);
        let msg = m.expect("EXTEND_TIMEOUT_USEC=30000000");
        assert!(
            msg.lines().any(|l| l == "STATUS=Opening the store"),
            "{msg:?}"
        );
        // Nothing once the work is done.
        assert!(m.drain(Duration::from_millis(100)).is_empty());
    }

    #[test]
    fn watchdog_for_another_process_is_ignored() {
        let _m = Manager::new(&[
            ("WATCHDOG_USEC", "100000".to_owned()),
            ("WATCHDOG_PID", (std::process::id() + 1).to_string()),
        ]);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            assert!(spawn_watchdog(CancellationToken::new()).is_none());
        });
    }

    #[test]
    fn everything_is_a_no_op_without_systemd() {
        let _lock = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // Tests run under a unit of Type=notify (a CI runner's) inherit its NOTIFY_SOCKET,
        // which failed this test whenever it took the lock before a test that clears it.
        // SAFETY: ENV_LOCK serializes all environment changes in this crate's tests; no
        // test elsewhere in the crate touches these variables.
        unsafe {
            for var in VARS {
                std::env::remove_var(var);
            }
        }
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        notify_ready(addr);
        notify_reloading();
        notify_reloaded(addr);
        notify_status("x");
        notify_stopping();
        // No runtime here either: still no panic.
        assert!(spawn_watchdog(CancellationToken::new()).is_none());
    }

    #[test]
    fn watchdog_outside_a_runtime_is_refused_not_a_panic() {
        let _m = Manager::new(&[("WATCHDOG_USEC", "100000".to_owned())]);
        assert!(spawn_watchdog(CancellationToken::new()).is_none());
    }
}
