//! What the benchmarks share: a real daemon started as a child process (so its RSS is its
//! own), on a loopback port with a temporary store and config.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const TENANT: &str = "bench";
pub const TOKEN: &str = "rsd_benchmark_token_not_secret";
pub const JWT_SECRET: &str = "benchmark-jwt-secret-at-least-32-bytes-long";

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub struct Daemon {
    pub child: Child,
    pub base: String,
    pub root: String,
    pub dir: tempfile::TempDir,
}

impl Drop for Daemon {
    /// Stopped as systemd stops it, so a kept store (`BENCH_DATA_DIR`) is closed cleanly
    /// and the next run opens it as a restarted daemon would; killed if it hangs.
    fn drop(&mut self) {
        // SAFETY: signals our own child, whose pid it still is (not yet waited for).
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start rosterd with one tenant; `tenant_extra` is appended to its `[[tenants]]` table and
/// `files` are written next to the config first.
pub fn start_daemon(tenant_extra: &str, files: &[(&str, &str)]) -> Daemon {
    start_daemon_with(&DaemonOptions {
        tenant_extra,
        files,
        ..DaemonOptions::default()
    })
}

/// What [`start_daemon_with`] takes: [`start_daemon`]'s arguments, plus top-level config
/// tables and environment variables for the child.
#[derive(Default)]
pub struct DaemonOptions<'a> {
    /// Appended to the `[[tenants]]` table.
    pub tenant_extra: &'a str,
    /// `(path, text)` written under the daemon's directory (next to the config) first;
    /// missing parent directories are created (`connectors/sis.toml`).
    pub files: &'a [(&'a str, &'a str)],
    /// Appended after the tenant, so it can open tables of its own (`[connectors]`).
    pub config_extra: &'a str,
    /// Environment variables the child sees besides the token and JWT secret (connector
    /// secrets).
    pub env: &'a [(&'a str, &'a str)],
}

/// [`start_daemon`] with more options.
pub fn start_daemon_with(opts: &DaemonOptions<'_>) -> Daemon {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    for (name, text) in opts.files {
        let path = dir.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("dir");
        }
        std::fs::write(path, text).expect("file");
    }
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "version = 1\n[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = {:?}\nmax_body_bytes = 67108864\ncache_mb = {}\n[log]\nlevel = \"warn\"\n[api.jwt]\naudience = [\"bench\"]\nhs256_secret_env = \"BENCH_JWT_SECRET\"\n[[tenants]]\nid = \"{TENANT}\"\ntoken_env = \"BENCH_TOKEN\"\n{}\n{}\n",
            // `BENCH_DATA_DIR` keeps the store between runs, so a large roster is seeded
            // once and later runs measure against it (and exercise opening an old store).
            std::env::var("BENCH_DATA_DIR")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|_| dir.path().join("data")),
            // The daemon's default unless a benchmark asks for another (`BENCH_CACHE_MB`).
            env_usize("BENCH_CACHE_MB", 256),
            opts.tenant_extra,
            opts.config_extra,
        ),
    )
    .expect("config");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rosterd"));
    cmd.args(["serve", "--config"])
        .arg(&config)
        .env("BENCH_TOKEN", TOKEN)
        .env("BENCH_JWT_SECRET", JWT_SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in opts.env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn rosterd");
    Daemon {
        child,
        base: format!("http://127.0.0.1:{port}"),
        root: dir.path().display().to_string(),
        dir,
    }
}

impl Daemon {
    pub fn scim(&self) -> String {
        format!("{}/scim/v2/{TENANT}", self.base)
    }

    pub async fn wait_ready(&self, client: &reqwest::Client) {
        let started = std::time::Instant::now();
        loop {
            if let Ok(r) = client.get(format!("{}/readyz", self.base)).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                // Opening a kept store of an older layout upgrades it first.
                started.elapsed() < Duration::from_secs(600),
                "daemon did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Daemon {
    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send the child SIGHUP (it reloads its connectors directory).
    pub fn sighup(&self) {
        let ok = Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -HUP failed");
    }

    /// `GET /status` (no authentication).
    pub async fn status(&self, client: &reqwest::Client) -> serde_json::Value {
        client
            .get(format!("{}/status", self.base))
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("status json")
    }
}

/// `VmHWM` (peak) or `VmRSS` (current) of a process, in KiB.
pub fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Samples a process's `VmRSS` every 20 ms on a thread of its own, keeping the largest.
pub struct RssSampler {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    max: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl RssSampler {
    /// Start sampling `pid`; the maximum starts at `floor_kib`.
    pub fn start(pid: u32, floor_kib: u64) -> RssSampler {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let max = std::sync::Arc::new(AtomicU64::new(floor_kib));
        let thread = {
            let (done, max) = (done.clone(), max.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    max.fetch_max(rss_kib(pid, "VmRSS:"), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        RssSampler { done, max, thread }
    }

    /// Stop sampling; the largest RSS seen, in KiB.
    pub fn stop(self) -> u64 {
        use std::sync::atomic::Ordering;
        self.done.store(true, Ordering::Relaxed);
        self.thread.join().expect("RSS sampler");
        self.max.load(Ordering::Relaxed)
    }
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// Create `users` users over SCIM with `concurrency` requests in flight, each body from
/// `body(i)`; answers their ids (by `i`) and the seconds it took.
pub async fn create_users(
    client: &reqwest::Client,
    base: String,
    users: usize,
    concurrency: usize,
    body: fn(usize) -> serde_json::Value,
) -> (Vec<String>, f64) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let auth = format!("Bearer {TOKEN}");
    let next = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(std::sync::Mutex::new(vec![String::new(); users]));
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, next, ids, auth, base) = (
            client.clone(),
            next.clone(),
            ids.clone(),
            auth.clone(),
            base.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= users {
                    break;
                }
                let b = serde_json::to_vec(&body(i)).expect("json");
                let r = client
                    .post(format!("{base}/Users"))
                    .header("authorization", &auth)
                    .header("content-type", "application/scim+json")
                    .body(b)
                    .send()
                    .await
                    .expect("create");
                assert_eq!(r.status(), 201, "create {i}");
                let v: serde_json::Value = r.json().await.expect("json");
                ids.lock().expect("ids")[i] = v["id"].as_str().expect("id").to_owned();
            }
        }));
    }
    for t in tasks {
        t.await.expect("create task");
    }
    let secs = started.elapsed().as_secs_f64();
    let ids = std::mem::take(&mut *ids.lock().expect("ids"));
    (ids, secs)
}

/// What an identity provider paging through every user (no filter, `startIndex` stepping
/// by 100, as Okta does) and an operator polling `/status` wait for: both need the number
/// of users.
pub struct Paging {
    page: Vec<Duration>,
    status: Vec<Duration>,
    /// Every page in turn, as an identity provider's import pages through everyone.
    pass: Vec<Duration>,
    pass_total: Duration,
}

/// One unfiltered page of 100 users from `start`: how long it took and its ids.
async fn users_page(
    client: &reqwest::Client,
    daemon: &Daemon,
    users: usize,
    start: usize,
) -> (Duration, Vec<String>) {
    let url = format!("{}/Users?startIndex={start}&count=100", daemon.scim());
    let t = std::time::Instant::now();
    let r = client
        .get(&url)
        .header("authorization", format!("Bearer {TOKEN}"))
        .send()
        .await
        .expect("page");
    let v: serde_json::Value = r.json().await.expect("json");
    let took = t.elapsed();
    assert_eq!(v["totalResults"], users, "page at {start}");
    assert_eq!(v["startIndex"], start, "page at {start}");
    let ids: Vec<String> = v["Resources"]
        .as_array()
        .expect("Resources")
        .iter()
        .map(|r| r["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids.len(), 100.min(users + 1 - start), "page at {start}");
    (took, ids)
}

impl Paging {
    /// `pages` pages sampled evenly across the roster, ten `/status` calls, then a
    /// pass through every page in order (`BENCH_PAGING_PASS=0` skips it).
    pub async fn measure(
        client: &reqwest::Client,
        daemon: &Daemon,
        users: usize,
        pages: usize,
    ) -> Paging {
        let mut page = Vec::with_capacity(pages);
        for k in 0..pages {
            let start = 1 + (k * users / pages) / 100 * 100;
            page.push(users_page(client, daemon, users, start).await.0);
        }
        page.sort();
        let mut status = Vec::new();
        for _ in 0..10 {
            let t = std::time::Instant::now();
            let v: serde_json::Value = client
                .get(format!("{}/status", daemon.base))
                .send()
                .await
                .expect("status")
                .json()
                .await
                .expect("json");
            status.push(t.elapsed());
            assert_eq!(v["tenants"][TENANT]["users"], users);
        }
        status.sort();
        let mut pass = Vec::new();
        let started = std::time::Instant::now();
        if env_usize("BENCH_PAGING_PASS", 1) == 1 {
            let mut seen = std::collections::HashSet::with_capacity(users);
            for start in (1..=users).step_by(100) {
                let (took, ids) = users_page(client, daemon, users, start).await;
                pass.push(took);
                for id in ids {
                    assert!(seen.insert(id), "a user twice in one pass");
                }
            }
            assert_eq!(seen.len(), users, "every user once in the pass");
        }
        let pass_total = started.elapsed();
        pass.sort();
        Paging {
            page,
            status,
            pass,
            pass_total,
        }
    }

    pub fn print(&self, users: usize) {
        if !self.pass.is_empty() {
            println!(
                "| every unfiltered page in turn (count=100), {} pages | {:.1} s |",
                self.pass.len(),
                self.pass_total.as_secs_f64()
            );
        }
        for (what, lat) in [
            ("unfiltered GET /Users page (count=100)", &self.page),
            ("GET /status", &self.status),
            ("page of that pass", &self.pass),
        ] {
            if lat.is_empty() {
                continue;
            }
            println!(
                "| {what} at {users} users, p50 / p99 | {:.2} ms / {:.2} ms |",
                percentile(lat, 0.5).as_secs_f64() * 1e3,
                percentile(lat, 0.99).as_secs_f64() * 1e3
            );
        }
    }
}
