//! The daemon as a child process: `kill -9` while it mirrors a burst of SCIM changes,
//! start it again, and the target ends with exactly the committed state.

use crate::harness::{
    BACKUP_WHATEVER_SPACE, BUNDLE, JWT_AUDIENCE, JWT_SECRET, bulk_request, jwt_with, patch_op,
    user, user_posts,
};
use crate::mirror::oneroster_file;
use crate::oneroster::{Fault, Kind, OneRosterOptions, OneRosterServer};
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const TENANT: &str = "acme";
const SCIM_TOKEN: &str = "crash-test-scim-token";

pub struct ChildDaemon {
    pub child: Child,
    pub base: String,
    pub client: reqwest::Client,
    /// Reads the child's systemd notifications, so that they never fill the socket.
    notifications: tokio::task::JoinHandle<()>,
    /// Every notification the child sent, in order.
    notified: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Its stdout and stderr, shown when a test fails: the file goes with the test's
    /// temporary directory, and a connection the child closed without an answer could
    /// not be told from a crash.
    log: PathBuf,
}

impl ChildDaemon {
    /// Start `rosterd serve` on `root/config.toml`, and wait until it answers.
    ///
    /// It listens on a port the kernel picks, and says which as systemd would hear it
    /// (`READY=1` and `STATUS=Serving on ADDR` on `NOTIFY_SOCKET`): a port picked here
    /// and freed for the child could be taken by another test's connection in between.
    pub async fn start(root: &Path, env: &[(&str, &str)]) -> ChildDaemon {
        Self::start_with(root, env, |_| {}).await
    }

    /// [`Self::start`], with `adjust` applied to the command first.
    pub async fn start_with(
        root: &Path,
        env: &[(&str, &str)],
        adjust: impl FnOnce(&mut Command),
    ) -> ChildDaemon {
        let socket = root.join("notify.sock");
        let _ = std::fs::remove_file(&socket);
        let notify = tokio::net::UnixDatagram::bind(&socket).unwrap();
        let mut cmd = crate::harness::rosterd_command();
        cmd.args(["serve", "--config"])
            .arg(root.join("config.toml"))
            .args(["--listen", "127.0.0.1:0"])
            .env("NOTIFY_SOCKET", &socket)
            .env("ROSTERD_TEST_TOKEN", SCIM_TOKEN)
            .env("TEST_JWT_SECRET", JWT_SECRET)
            .env("RUST_LOG", "warn");
        // Logs go to stdout, panics and fatal errors to stderr: both, so a test can read
        // what an operator would.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join("daemon.log"))
            .unwrap();
        cmd.stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        for (k, v) in env {
            cmd.env(k, v);
        }
        adjust(&mut cmd);
        let mut child = cmd.spawn().expect("spawn rosterd");
        let (ready_tx, mut ready) = tokio::sync::oneshot::channel();
        let notified = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let heard = notified.clone();
        let notifications = tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = notify.recv(&mut buf).await {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                heard.lock().unwrap().push(msg.clone());
                let ready = msg.lines().any(|l| l == "READY=1");
                let addr = msg
                    .lines()
                    .find_map(|l| l.strip_prefix("STATUS=Serving on "));
                if let (true, Some(addr)) = (ready, addr)
                    && let Some(tx) = ready_tx.take()
                {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let addr = loop {
            tokio::select! {
                addr = &mut ready => break addr.unwrap(),
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            let exited = child.try_wait().unwrap();
            assert!(
                exited.is_none() && tokio::time::Instant::now() < deadline,
                "rosterd did not come up ({exited:?}); see {}",
                root.join("daemon.log").display()
            );
        };
        let d = ChildDaemon {
            child,
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            notifications,
            notified,
            log: root.join("daemon.log"),
        };
        let r = d.get("/readyz").await;
        assert!(
            r.status().is_success(),
            "ready, but /readyz says {}",
            r.status()
        );
        d
    }

    /// Wait (up to a minute) until the child has sent a notification with the line `line`.
    pub async fn notified(&self, line: &str) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while tokio::time::Instant::now() < deadline {
            if self
                .notified
                .lock()
                .unwrap()
                .iter()
                .any(|m| m.lines().any(|l| l == line))
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }

    /// A Roster API GET with `token`, its JSON answer.
    pub async fn api_get(&self, path: &str, token: &str) -> Value {
        self.client
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn status(&self) -> Value {
        self.get("/status").await.json().await.unwrap()
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics").await.text().await.unwrap()
    }

    /// A SCIM request to `path` with the test token, and `body` as JSON if given.
    pub async fn scim_send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut req = self
            .client
            .request(method, self.scim(path))
            .bearer_auth(SCIM_TOKEN);
        if let Some(body) = body {
            req = req.json(&body);
        }
        req.send().await.unwrap()
    }

    /// Create `n` users `{prefix}{i}@acme.test` over SCIM.
    pub async fn create_users(&self, prefix: &str, n: usize) {
        for i in 0..n {
            let r = self
                .scim_send(
                    Method::POST,
                    "/Users",
                    Some(user(&format!("{prefix}{i}@acme.test"))),
                )
                .await;
            assert_eq!(r.status(), 201);
        }
    }

    pub fn scim(&self, path: &str) -> String {
        format!("{}/scim/v2/{TENANT}{path}", self.base)
    }

    /// Wait until every connector has no lag.
    pub async fn drained(&self) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.status().await;
            let cs = s["connectors"].as_array().unwrap();
            if cs
                .iter()
                .all(|c| c["lag_events"] == 0 && c["state"] == "running")
            {
                return s;
            }
            assert!(tokio::time::Instant::now() < deadline, "never drained: {s}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for ChildDaemon {
    fn drop(&mut self) {
        self.notifications.abort();
        if std::thread::panicking() {
            let exited = self.child.try_wait().ok().flatten();
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "child daemon {}; the end of its log:\n{}",
                exited.map_or("still running".to_owned(), |s| format!("exited: {s}")),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config root for a child daemon with the given connector files.
pub fn child_root(dir: &Path, connectors: &[(String, String)]) -> PathBuf {
    let root = dir.to_owned();
    std::fs::write(root.join("bundle.toml"), BUNDLE).unwrap();
    std::fs::create_dir_all(root.join("connectors")).unwrap();
    for (name, text) in connectors {
        std::fs::write(root.join("connectors").join(name), text).unwrap();
    }
    std::fs::write(
        root.join("config.toml"),
        format!(
            r#"version = 1
[server]
data_dir = "data"
[connectors]
dir = "connectors"
[api.jwt]
audience = ["{JWT_AUDIENCE}"]
hs256_secret_env = "TEST_JWT_SECRET"
[[tenants]]
id = "{TENANT}"
token_env = "ROSTERD_TEST_TOKEN"
bundle = "bundle.toml"
{BACKUP_WHATEVER_SPACE}"#
        ),
    )
    .unwrap();
    root
}

/// All users through SCIM, by id.
pub async fn scim_users(d: &ChildDaemon) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let mut start = 1;
    loop {
        let page: Value = d
            .client
            .get(d.scim(&format!("/Users?startIndex={start}&count=500")))
            .bearer_auth(SCIM_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let resources = page["Resources"].as_array().cloned().unwrap_or_default();
        if resources.is_empty() {
            return out;
        }
        start += resources.len();
        for r in resources {
            out.insert(r["id"].as_str().unwrap().to_owned(), r);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_mirror_loses_nothing() {
    let target = OneRosterServer::start(OneRosterOptions {
        log_bodies: false,
        log_capacity: 100_000,
        ..OneRosterOptions::default()
    })
    .await;
    // Slow answers keep a backlog in flight when the daemon dies.
    target.inject(
        Fault::delay(Duration::from_millis(20), 0)
            .forever()
            .on_method("PUT"),
    );
    let dir = tempfile::tempdir().unwrap();
    let root = child_root(dir.path(), &[oneroster_file("sis", &target, "")]);
    let env = [("OR_TOKEN", crate::oneroster::DEFAULT_TOKEN)];
    let mut d = ChildDaemon::start(&root, &env).await;

    // A burst of creates and updates from 16 writers; the daemon is killed part-way.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for w in 0..16 {
        let (client, url, acked) = (d.client.clone(), d.scim("/Users"), acked.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..40 {
                let name = format!("w{w}-{i}@acme.test");
                let r = match client
                    .post(&url)
                    .bearer_auth(SCIM_TOKEN)
                    .json(&user(&name))
                    .send()
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("create failed: {e}");
                        return;
                    }
                };
                if r.status() != 201 {
                    eprintln!("create answered {}: {}", r.status(), r.text().await.unwrap_or_default());
                    return;
                }
                let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
                acked.lock().unwrap().push(id.clone());
                // Every other user is updated right away: two changes for one object.
                if i % 2 == 0 {
                    let _ = client
                        .patch(format!("{url}/{id}"))
                        .bearer_auth(SCIM_TOKEN)
                        .json(&json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                            "Operations": [{"op": "replace", "path": "title", "value": format!("Title {i}")}]}))
                        .send()
                        .await;
                }
            }
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 200 {
        assert!(tokio::time::Instant::now() < deadline, "burst too slow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let check = || {
        outcome(
            crate::harness::rosterd_command()
                .args(["store", "check", "--config"])
                .arg(root.join("config.toml")),
        )
    };
    let (ok, out) = check();
    assert!(!ok, "{out}");
    assert!(
        out.contains("rosterd is running on") && out.contains("store check --data-dir"),
        "{out}"
    );
    d.kill9();
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();
    let delivered_before = target.count(Kind::User);
    // What the kill left, a write cut in half or not, checks clean.
    let (ok, out) = check();
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("tenant {TENANT}: ")) && out.contains("every check passed"),
        "{out}"
    );

    target.clear_faults();
    let d = ChildDaemon::start(&root, &env).await;
    d.drained().await;

    let users = scim_users(&d).await;
    // The kill really interrupted the mirror: part of the committed state was not yet
    // downstream.
    assert!(
        delivered_before < users.len(),
        "everything was delivered before the kill; the test proves nothing"
    );
    for id in &acked {
        assert!(users.contains_key(id), "acknowledged user {id} lost");
    }
    let downstream = target.users();
    assert_eq!(
        downstream.len(),
        users.len(),
        "target has {} users, rosterd {} (delivered before the kill: {delivered_before})",
        downstream.len(),
        users.len()
    );
    for (id, u) in &users {
        let sid = rosterd::connectors::sourced_id(TENANT, &format!("User/{id}"));
        let got = downstream
            .get(&sid)
            .unwrap_or_else(|| panic!("user {id} not mirrored"));
        assert_eq!(got["email"], u["userName"]);
        assert_eq!(
            got["metadata"]["job_title"],
            u.get("title").cloned().unwrap_or(Value::Null),
            "user {id}"
        );
    }
    // Every change in the log reached the target: each object got at least as many
    // writes as it has changes (more only from replays of the interrupted batch).
    let token = jwt_with(json!({"sub": "t", "tenant": TENANT, "scope": "roster:read",
        "aud": JWT_AUDIENCE, "exp": chrono::Utc::now().timestamp() + 600}));
    let mut per_object: BTreeMap<String, u64> = BTreeMap::new();
    let mut since = 0;
    loop {
        let page: Value = d
            .client
            .get(format!(
                "{}/api/v1/roster/changes?since={since}&limit=1000",
                d.base
            ))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let changes = page["changes"].as_array().unwrap();
        if changes.is_empty() {
            break;
        }
        for c in changes {
            if c["resource_type"] == "User" && c["op"] != "archetype" {
                *per_object
                    .entry(c["id"].as_str().unwrap().to_owned())
                    .or_default() += 1;
            }
        }
        since = page["next_since"].as_u64().unwrap();
    }
    for (id, n) in per_object {
        let sid = rosterd::connectors::sourced_id(TENANT, &format!("User/{id}"));
        let writes = target.stored(Kind::User, &sid).unwrap().writes;
        assert!(
            writes >= n,
            "user {id}: {n} changes but {writes} writes downstream"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_drains_and_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let root = child_root(dir.path(), &[]);
    let mut d = ChildDaemon::start(&root, &[]).await;
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for w in 0..8 {
        let (client, url, acked) = (d.client.clone(), d.scim("/Users"), acked.clone());
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let Ok(r) = client
                    .post(&url)
                    .bearer_auth(SCIM_TOKEN)
                    .json(&user(&format!("t{w}-{i}@acme.test")))
                    .send()
                    .await
                else {
                    return;
                };
                if r.status() != 201 {
                    return;
                }
                let v: Value = r.json().await.unwrap();
                acked
                    .lock()
                    .unwrap()
                    .push(v["id"].as_str().unwrap().to_owned());
            }
        }));
    }
    while acked.lock().unwrap().len() < 100 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let asked = std::time::Instant::now();
    d.signal("TERM");
    let status = tokio::task::spawn_blocking(move || {
        let s = d.child.wait().unwrap();
        (s, d)
    })
    .await
    .unwrap();
    let waited = asked.elapsed();
    assert!(status.0.success(), "exit status {:?}", status.0);
    // Only a drain without its deadline (5 s) would take this long: systemd's SIGKILL
    // comes at 90 s. Not closer to 5 s, which a loaded machine's flush can pass.
    assert!(waited < Duration::from_secs(30), "took {waited:?} to stop");
    for w in writers {
        let _ = w.await;
    }
    drop(status);
    let acked = acked.lock().unwrap().clone();
    let d = ChildDaemon::start(&root, &[]).await;
    let users = scim_users(&d).await;
    for id in &acked {
        assert!(users.contains_key(id), "acknowledged user {id} lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_connectors_without_dropping_requests() {
    let target = OneRosterServer::start(OneRosterOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let root = child_root(dir.path(), &[]);
    let env = [("OR_TOKEN", crate::oneroster::DEFAULT_TOKEN)];
    let d = ChildDaemon::start(&root, &env).await;
    assert_eq!(d.status().await["connectors"], json!([]));
    // Requests keep flowing while the daemon reloads.
    let (client, url) = (d.client.clone(), d.scim("/Users"));
    let load = tokio::spawn(async move {
        let mut failures = 0;
        for i in 0..200 {
            let r = client
                .post(&url)
                .bearer_auth(SCIM_TOKEN)
                .json(&user(&format!("h{i}@acme.test")))
                .send()
                .await;
            if !matches!(r, Ok(ref r) if r.status() == 201) {
                failures += 1;
            }
        }
        failures
    });
    let (name, text) = oneroster_file("sis", &target, "");
    std::fs::write(root.join("connectors").join(name), text).unwrap();
    d.signal("HUP");
    assert_eq!(load.await.unwrap(), 0, "requests failed during the reload");
    // The requests may all be answered before the reload is done.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while d.status().await["reloads"] == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no reload happened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = d.drained().await;
    assert_eq!(s["connectors"][0]["name"], "sis");
    assert!(s["reloads"].as_u64().unwrap() >= 1);
    assert_eq!(target.count(Kind::User), 200);
}

/// Under systemd the journal files an unmarked line at info: without `<N>` prefixes
/// `journalctl -p warning` shows none of rosterd's warnings, and each line of a message
/// that spans lines becomes an entry of its own, apart from its priority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_journal_each_event_is_one_line_at_its_priority() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let root = child_root(dir.path(), &[]);
    let log = root.join("daemon.log");
    std::fs::write(&log, "").unwrap();
    let meta = std::fs::metadata(&log).unwrap();
    // systemd names the journal's stream by device and inode; here it is the log file.
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let env = [("JOURNAL_STREAM", stream.as_str()), ("RUST_LOG", "info")];
    let mut d = ChildDaemon::start(&root, &env).await;
    // A bundle that no longer parses: toml's error is a diagram over several lines,
    // with the reason on the last.
    std::fs::write(root.join("bundle.toml"), "bogus_key = 1\n").unwrap();
    d.signal("HUP");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while d.status().await["tenants"][TENANT]["bundle"]["reload_error"].is_null() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reload never failed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A second daemon fails to start (on that bundle, or on the data the first one
    // holds); its fatal error goes to stderr.
    let second = crate::harness::rosterd_command()
        .args(["serve", "--config"])
        .arg(root.join("config.toml"))
        .args(["--listen", "127.0.0.1:0"])
        .envs(env)
        .env("ROSTERD_TEST_TOKEN", SCIM_TOKEN)
        .env("TEST_JWT_SECRET", JWT_SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::OpenOptions::new().append(true).open(&log).unwrap(),
        ))
        .status()
        .unwrap();
    assert!(!second.success());
    d.signal("TERM");
    assert!(d.child.wait().unwrap().success());

    let text = std::fs::read_to_string(&log).unwrap();
    let unmarked: Vec<&str> = text
        .lines()
        .filter(|l| !(l.starts_with('<') && l[1..].starts_with(|c: char| c.is_ascii_digit())))
        .collect();
    assert!(
        unmarked.is_empty(),
        "lines without a priority: {unmarked:?}"
    );
    assert!(text.lines().any(|l| l.starts_with("<6>")), "{text}");
    let refused = text
        .lines()
        .find(|l| l.contains("Bundle not reloaded"))
        .unwrap_or_else(|| panic!("no reload error in {text}"));
    assert!(refused.starts_with("<3>"), "{refused}");
    assert!(
        refused.contains("bogus_key"),
        "the reason is not on the line: {refused}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("<3>Error: ") && l.contains("bogus_key")),
        "{text}"
    );
}

/// In a log file each event is one line, whatever its values hold: a connector file
/// named with a line break and a made-up log line wrote that line into the log as if
/// the daemon had said it, and an ESC in a name drove the terminal of whoever `cat`s
/// the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_log_file_each_event_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let root = child_root(dir.path(), &[]);
    let mut d = ChildDaemon::start(&root, &[("RUST_LOG", "info")]).await;
    let forged = "2026-01-01T00:00:00Z  INFO rosterd::server: FORGED Reload finished. errors=0";
    let connectors = root.join("connectors");
    std::fs::write(
        connectors.join(format!("evil\n{forged}\x1b[2J.toml")),
        "not = [toml",
    )
    .unwrap();
    d.signal("HUP");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while d.status().await["reloads"] == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no reload happened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    d.signal("TERM");
    assert!(d.child.wait().unwrap().success());

    let text = std::fs::read_to_string(root.join("daemon.log")).unwrap();
    assert!(!text.contains('\x1b'), "a raw ESC in the log: {text}");
    let mut timestamps = 0;
    for line in text.lines() {
        assert!(
            !line.starts_with("2026-01-01"),
            "a file name started a log line: {text}"
        );
        timestamps += usize::from(line.starts_with(|c: char| c.is_ascii_digit()));
    }
    assert_eq!(
        timestamps,
        text.lines().count(),
        "a line that is no event's start: {text}"
    );
    // The TOML error's diagram and the file's name are on the error's own line.
    let refused = text
        .lines()
        .find(|l| l.contains("evil") && l.contains("ERROR"))
        .unwrap_or_else(|| panic!("no error for the file in {text}"));
    assert!(refused.contains(r"evil\n2026-01-01"), "{refused}");
    assert!(refused.contains(r"\u{1b}[2J"), "{refused}");
    assert!(refused.contains("not = [toml"), "{refused}");
}

fn cli(root: &Path, d: &ChildDaemon, args: &[&str]) -> (bool, String) {
    // The daemon flags belong to the first word (`status`, `dead-letters`, …).
    outcome(
        crate::harness::rosterd_command()
            .arg(args[0])
            .args([
                "--config",
                root.join("config.toml").to_str().unwrap(),
                "--url",
                &d.base,
            ])
            .args(&args[1..])
            .env("TEST_JWT_SECRET", JWT_SECRET),
    )
}

/// Whether `cmd` succeeded, and what it printed (stdout, then stderr).
fn outcome(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shows_status_drift_and_dead_letters_of_a_running_daemon() {
    let target = OneRosterServer::start(OneRosterOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let root = child_root(dir.path(), &[oneroster_file("sis", &target, "")]);
    let d = ChildDaemon::start(&root, &[("OR_TOKEN", crate::oneroster::DEFAULT_TOKEN)]).await;
    let r = d
        .scim_send(Method::POST, "/Users", Some(user("ada@acme.test")))
        .await;
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    d.drained().await;
    let sid = rosterd::connectors::sourced_id(TENANT, &format!("User/{id}"));
    target.set_owner_other(Kind::User, &sid);
    target.tamper_user(&sid, |u| u["familyName"] = json!("Changed"));
    let op = patch_op(json!([{"op": "replace", "path": "title", "value": "Chef"}]));
    d.scim_send(Method::PATCH, &format!("/Users/{id}"), Some(op))
        .await;
    d.drained().await;

    let (ok, out) = cli(&root, &d, &["status"]);
    assert!(ok, "{out}");
    assert!(out.contains("tenant acme: 1 users (1 active)"), "{out}");
    assert!(
        out.contains("bundle.toml version test-1 (6 archetypes), loaded "),
        "{out}"
    );
    assert!(!out.contains("NOT reloaded"), "{out}");
    assert!(
        out.contains("connector sis (oneroster, tenant acme): running"),
        "{out}"
    );
    assert!(out.contains("dead letters 1"), "{out}");
    let (ok, out) = cli(
        &root,
        &d,
        &["dead-letters", "--tenant", "acme", "list", "sis"],
    );
    assert!(ok, "{out}");
    assert!(out.contains("#1") && out.contains("403"), "{out}");
    let (ok, out) = cli(&root, &d, &["reconcile", "--tenant", "acme", "--dry-run"]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("PUT User/{id}")), "{out}");
    let (ok, out) = cli(
        &root,
        &d,
        &["dead-letters", "--tenant", "acme", "replay", "sis", "1"],
    );
    assert!(!ok, "replay should fail while the target refuses: {out}");
    assert!(out.contains("502"), "{out}");
    // Without an id (or with `#1` unquoted, which the shell drops as a comment)
    // nothing is replayed: every letter is asked for by --all.
    let (ok, out) = cli(
        &root,
        &d,
        &["dead-letters", "--tenant", "acme", "replay", "sis"],
    );
    assert!(!ok && out.contains("--all"), "{out}");
    assert!(!out.contains("replayed"), "{out}");
    // With --all every letter is tried; one the target still refuses stays, and the
    // command says so and fails.
    let (ok, out) = cli(
        &root,
        &d,
        &["dead-letters", "--tenant", "acme", "replay", "sis", "--all"],
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("#1 not replayed") && out.contains("1 of 1"),
        "{out}"
    );
    target.clear_owner(Kind::User, &sid);
    let (ok, out) = cli(
        &root,
        &d,
        &["dead-letters", "--tenant", "acme", "replay", "sis", "--all"],
    );
    assert!(ok, "{out}");
    assert!(out.contains("#1 replayed"), "{out}");
    assert_eq!(target.user(&sid).unwrap()["metadata"]["job_title"], "Chef");
    let (ok, out) = cli(
        &root,
        &d,
        &["dead-letters", "--tenant", "acme", "discard", "sis", "1"],
    );
    assert!(!ok && out.contains("404"), "{out}");
    // A letter that is not there is said to be missing, not to stay.
    let (ok, out) = cli(
        &root,
        &d,
        &["dead-letters", "--tenant", "acme", "replay", "sis", "1"],
    );
    assert!(!ok && out.contains("no dead letter #1"), "{out}");
    assert!(!out.contains("stays"), "{out}");
}

/// After an outage a connector can hold more dead letters than one page of the API
/// (100 by default): the CLI lists and replays every one, a page at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_and_replays_dead_letters_past_one_page() {
    const USERS: usize = 130;
    let target = OneRosterServer::start(OneRosterOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // Never paused for its refusals: every one of them becomes a letter.
    let (name, text) = oneroster_file("sis", &target, "");
    let text = text.replace(
        "pause_after_failures = 1000",
        "pause_after_failures = 1000\npause_after_refusals = 0",
    );
    let root = child_root(dir.path(), &[(name, text)]);
    let d = ChildDaemon::start(&root, &[("OR_TOKEN", crate::oneroster::DEFAULT_TOKEN)]).await;
    // The users' PUTs only: the course's, which the connector may still be sending when
    // the daemon answers, would pause it until resumed.
    target.inject(
        Fault::status(422, USERS)
            .on_method("PUT")
            .on_path("/users/"),
    );
    d.create_users("u", USERS).await;
    let s = d.drained().await;
    assert_eq!(s["connectors"][0]["dead_letters"], USERS, "{s}");

    let (ok, out) = cli(
        &root,
        &d,
        &["dead-letters", "--tenant", "acme", "list", "sis"],
    );
    assert!(ok, "{out}");
    let listed: std::collections::BTreeSet<&str> = out
        .lines()
        .filter(|l| l.starts_with('#'))
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert_eq!(listed.len(), USERS, "{out}");
    assert!(
        out.contains(&format!("sis: {USERS} dead letter(s)")),
        "{out}"
    );
    let (ok, out) = cli(
        &root,
        &d,
        &["dead-letters", "--tenant", "acme", "replay", "sis", "--all"],
    );
    assert!(ok, "{out}");
    assert_eq!(out.matches(" replayed ").count(), USERS, "{out}");
    assert!(
        out.contains(&format!("sis: {USERS} dead letter(s) replayed")),
        "{out}"
    );
    assert_eq!(d.drained().await["connectors"][0]["dead_letters"], 0);
    assert_eq!(target.users().len(), USERS);
}

/// A child daemon whose reconcile job is running and cannot finish: every write to its
/// OneRoster target hangs past the connector's timeout.
struct StuckJob {
    target: OneRosterServer,
    _dir: tempfile::TempDir,
    root: PathBuf,
    d: ChildDaemon,
    token: String,
    job_id: String,
}

/// At info, so that a test reads how a job ended in the log.
const STUCK_ENV: [(&str, &str); 2] = [
    ("OR_TOKEN", crate::oneroster::DEFAULT_TOKEN),
    ("RUST_LOG", "info"),
];

impl StuckJob {
    async fn start(users: usize) -> StuckJob {
        let target = OneRosterServer::start(OneRosterOptions::default()).await;
        target.inject(
            Fault::delay(Duration::from_secs(5), 0)
                .forever()
                .on_method("PUT"),
        );
        let dir = tempfile::tempdir().unwrap();
        let root = child_root(dir.path(), &[oneroster_file("sis", &target, "")]);
        let d = ChildDaemon::start(&root, &STUCK_ENV).await;
        d.create_users("j", users).await;
        let token = roster_token("roster:write");
        // It is full, so that it has something of its own to send, the course: the users
        // wait for the connector, which sends them.
        let job_id = sync_when_free(&d, &token, json!({"full": true})).await["job_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let job = StuckJob {
            target,
            _dir: dir,
            root,
            d,
            token,
            job_id,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while job.job(&job.d).await["status"] != "running" {
            assert!(tokio::time::Instant::now() < deadline, "job never ran");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        job
    }

    /// The job as `d` (this daemon, or the one started after it) reports it.
    async fn job(&self, d: &ChildDaemon) -> Value {
        job_of(d, &self.token, &self.job_id).await
    }

    /// Stop faulting the target and start a daemon on the same store.
    async fn restart(&self) -> ChildDaemon {
        self.target.clear_faults();
        ChildDaemon::start(&self.root, &STUCK_ENV).await
    }
}

/// A Roster API token for the tenant with `scope`, for ten minutes.
fn roster_token(scope: &str) -> String {
    jwt_with(json!({"sub": "t", "tenant": TENANT, "scope": scope,
        "aud": JWT_AUDIENCE, "exp": chrono::Utc::now().timestamp() + 600}))
}

/// Start a sync job with `body`, as soon as the tenant's slot is free: a fresh store is
/// reclassified at start-up (it holds no policy fingerprint), and the sync is 409 until
/// that job ends. The job as the 202 gives it.
async fn sync_when_free(d: &ChildDaemon, token: &str, body: Value) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = d
            .client
            .post(format!("{}/api/v1/roster/scim:sync", d.base))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        if r.status() != 409 || tokio::time::Instant::now() > deadline {
            assert_eq!(r.status(), 202);
            return r.json().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A job as `d` reports it.
async fn job_of(d: &ChildDaemon, token: &str, job_id: &str) -> Value {
    d.api_get(&format!("/api/v1/roster/scim/jobs/{job_id}"), token)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cut_off_by_a_crash_reads_interrupted_and_can_run_again() {
    let mut s = StuckJob::start(3).await;
    // The operator sees which job holds the tenant (and why overrides answer 409).
    let (ok, out) = cli(&s.root, &s.d, &["status"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("job {} (scim_sync) running since", s.job_id)),
        "{out}"
    );
    let killed = s.d.child.id();
    s.d.kill9();
    let d = s.restart().await;
    let j = s.job(&d).await;
    assert_eq!(j["status"], "interrupted", "{j}");
    let status = d.status().await;
    assert!(
        status["tenants"][TENANT]["running_job"].is_null(),
        "{status}"
    );
    // The start says the run before it was cut off, and which one: it used to log as a
    // start after a clean stop does.
    assert_eq!(status["unclean_stop"]["pid"], killed, "{status}");
    assert!(status["unclean_stop"]["started_at"].is_string(), "{status}");
    assert!(status["unclean_stop"]["alive_at"].is_string(), "{status}");
    // Which build it was, as `--version`, `/status` and the metrics name this one: every
    // build said 0.1.0.
    let (ok, version) = outcome(crate::harness::rosterd_command().arg("--version"));
    assert!(ok, "{version}");
    assert_eq!(version.trim(), format!("rosterd {}", rosterd::VERSION));
    assert_eq!(
        status["unclean_stop"]["version"],
        rosterd::VERSION,
        "{status}"
    );
    assert_eq!(status["version"], rosterd::VERSION, "{status}");
    let log = std::fs::read_to_string(s.root.join("daemon.log")).unwrap();
    assert!(
        log.contains("The last run on this store did not stop cleanly"),
        "{log}"
    );
    let (ok, out) = cli(&s.root, &d, &["status"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("did NOT stop cleanly (killed, crashed or its machine went down): pid {killed}, started ")),
        "{out}"
    );
    assert!(j["error"].as_str().unwrap().contains("stopped"), "{j}");
    // Alerts on job outcomes see it too: it ended, as interrupted.
    let metrics = d.metrics().await;
    let trigger = j["kind"].as_str().unwrap();
    let counted: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("rosterd_jobs_total{")
                && l.contains("status=\"interrupted\"")
                && l.contains("kind=\"reconcile\"")
                && l.contains(&format!("trigger=\"{trigger}\""))
                && l.contains(&format!("tenant=\"{TENANT}\""))
        })
        .collect();
    assert_eq!(counted.len(), 1, "{metrics}");
    assert!(counted[0].ends_with(" 1"), "{}", counted[0]);
    assert!(
        metrics
            .lines()
            .any(|l| l == "rosterd_started_after_unclean_stop 1"),
        "{metrics}"
    );
    let build = format!("rosterd_build_info{{version=\"{}\"}} 1", rosterd::VERSION);
    assert!(metrics.lines().any(|l| l == build), "{metrics}");
    let r = d
        .client
        .post(format!("{}/api/v1/roster/scim:sync", d.base))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "the job can be run again");
}

/// A full reconciliation cut off by `kill -9` (or the OOM killer) is finished by the next
/// ordinary one: what it had not sent is marked before it sends anything. Marked only at
/// its end, the objects it never sent kept the hash of what would be sent, and no
/// ordinary run saw them missing (audit: 1,407 of 1,995 users, after five restarts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_run_cut_off_by_a_crash_is_finished_by_the_next_run() {
    let target = OneRosterServer::start(OneRosterOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let root = child_root(dir.path(), &[oneroster_file("sis", &target, "")]);
    let mut d = ChildDaemon::start(&root, &STUCK_ENV).await;
    let users = 12;
    d.create_users("f", users).await;
    d.drained().await;
    assert_eq!(target.users().len(), users);
    // The target lost its data; the full run's user PUTs wait at its door.
    target.remove_all(&[Kind::User, Kind::Course]);
    target.inject(
        Fault::stalled(0)
            .forever()
            .on_path("/users/")
            .on_method("PUT"),
    );
    let token = roster_token("roster:write");
    sync_when_free(&d, &token, json!({"full": true})).await;
    assert!(
        target
            .wait_until(|t| t.faults_applied() > 0, Duration::from_secs(20))
            .await,
        "the run never sent a user"
    );
    d.kill9();
    target.clear_faults();
    target.release_held();
    let d = ChildDaemon::start(&root, &STUCK_ENV).await;
    let job = sync_when_free(&d, &token, json!({})).await;
    let job_id = job["job_id"].as_str().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let job = loop {
        let j = job_of(&d, &token, job_id).await;
        if j["status"] != "running" && j["status"] != "queued" {
            break j;
        }
        assert!(tokio::time::Instant::now() < deadline, "{j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["counts"]["drift_sent"], users, "{job}");
    assert_eq!(target.users().len(), users, "{job}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cut_off_by_a_stop_is_not_reported_as_failed() {
    let mut s = StuckJob::start(1).await;
    s.d.signal("TERM");
    tokio::task::block_in_place(|| s.d.child.wait()).unwrap();
    // The stop is no failure of the job (and no success: its sends were cut off): no
    // error about it, and it reads interrupted after the start.
    let log = std::fs::read_to_string(s.root.join("daemon.log")).unwrap();
    for noise in [
        "Reconciliation failed",
        "Reclassification failed",
        "Cannot record the job",
    ] {
        assert!(!log.contains(noise), "{noise}: {log}");
    }
    // The stop waits for the job to give up before it closes the store and says it
    // stopped: the job's last line comes first (it used to come after, or not at all).
    let cut = log
        .find("The shutdown cut the job off")
        .unwrap_or_else(|| panic!("the job's end is logged: {log}"));
    let stopped = log.find("rosterd stopped cleanly.").expect(&log);
    assert!(cut < stopped, "{log}");
    let d = s.restart().await;
    let j = s.job(&d).await;
    assert_eq!(j["status"], "interrupted", "{j}");
    // A stop is no crash.
    let status = d.status().await;
    assert!(status["unclean_stop"].is_null(), "{status}");
    assert!(
        d.metrics()
            .await
            .lines()
            .any(|l| l == "rosterd_started_after_unclean_stop 0")
    );
}

/// A reclassification under way when the daemon stops gives up between two batches,
/// says so, and only then does the stop close the store and say it stopped. Before, the
/// stop closed the store under it and the runtime dropped it without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reclassification_gives_up_before_the_stop_closes_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let root = child_root(dir.path(), &[]);
    let d = ChildDaemon::start(&root, &[("RUST_LOG", "info")]).await;
    // Enough batches of 500 that the stop, sent at once, finds the job under way.
    bulk_users(&d, 6_000).await;
    let token = roster_token("roster:write");
    let job = sync_when_free(&d, &token, json!({})).await;
    d.signal("TERM");
    let mut d = d;
    let exit = tokio::task::block_in_place(|| d.child.wait()).unwrap();
    assert!(exit.success(), "{exit:?}");
    let log = std::fs::read_to_string(root.join("daemon.log")).unwrap();
    let job_id = job["job_id"].as_str().unwrap();
    let cut = log
        .lines()
        .position(|l| l.contains(job_id) && l.contains("The shutdown cut the job off"))
        .unwrap_or_else(|| panic!("the job says it was cut off: {log}"));
    let stopped = log
        .lines()
        .position(|l| l.contains("rosterd stopped cleanly."))
        .expect(&log);
    assert!(cut < stopped, "{log}");
    for noise in [
        "Reclassification failed",
        "Cannot record the job",
        "had not given up",
    ] {
        assert!(!log.contains(noise), "{noise}: {log}");
    }
    let d = ChildDaemon::start(&root, &[]).await;
    let j = job_of(&d, &token, job_id).await;
    assert_eq!(j["status"], "interrupted", "{j}");
}

/// A bundle change's reclassification cut off by a stop, and the old bundle put back
/// before the next start (the operator backing out the change): the tenant was half on
/// the new bundle, and the fingerprint, still the old bundle's, matched again, so
/// nothing reclassified it and thousands of users kept archetypes the bundle lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_change_cut_off_and_backed_out_is_reclassified_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let root = child_root(dir.path(), &[]);
    let env = [("RUST_LOG", "info")];
    let mut d = ChildDaemon::start(&root, &env).await;
    for start in (0..6_000).step_by(1000) {
        let ops: Vec<Value> = (start..start + 1000)
            .map(|i| {
                let mut u = user(&format!("nurse{i}@acme.test"));
                u["title"] = json!("Registered Nurse");
                json!({"method": "POST", "path": "/Users", "bulkId": format!("u{i}"), "data": u})
            })
            .collect();
        let r = d
            .scim_send(Method::POST, "/Bulk", Some(bulk_request(json!(ops))))
            .await;
        assert_eq!(r.status(), 200);
    }
    let idle = |s: &Value| s["tenants"][TENANT]["running_job"].is_null();
    while !idle(&d.status().await) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let clinician = "\n[[archetypes]]\nid = \"clinician\"\ntitle = \"Clinician\"\nfunction_focus = [\"care\"]\ndefault_cowork_id = \"clinician.test.v1\"\nexamples = [\"registered nurse\", \"nurse\", \"staff nurse\", \"charge nurse\"]\nkeywords = [\"nurse\"]\n";
    let changed = format!(
        "{}{clinician}",
        BUNDLE.replace("version = \"test-1\"", "version = \"test-2\"")
    );
    std::fs::write(root.join("bundle.toml"), changed).unwrap();
    // Waited for in the log, not in /status: the job holds the tenant's slot a moment
    // before it begins, and a stop in between (a loaded machine) cut off no job.
    let begun = || {
        std::fs::read_to_string(root.join("daemon.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("kind=bundle_change") && l.contains("Reclassification started"))
            .count()
    };
    let before = begun();
    d.signal("HUP");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while begun() == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reload started no job"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    d.signal("TERM");
    assert!(
        tokio::task::block_in_place(|| d.child.wait())
            .unwrap()
            .success()
    );
    let log = std::fs::read_to_string(root.join("daemon.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("kind=bundle_change") && l.contains("The shutdown cut the job off")),
        "the stop came after the job: {log}"
    );
    std::fs::write(root.join("bundle.toml"), BUNDLE).unwrap();
    let before = log.len();
    let d = ChildDaemon::start(&root, &env).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(root.join("daemon.log")).unwrap();
        if log[before..].contains("Reclassification finished.") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reclassification at the start: {}",
            &log[before..]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let archetypes = d
        .api_get("/api/v1/roster/archetypes", &roster_token("roster:read"))
        .await;
    let outside: Vec<&Value> = archetypes["archetypes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["in_bundle"] == false && a["user_count"].as_u64() > Some(0))
        .collect();
    assert!(outside.is_empty(), "{archetypes}");
}

/// Started with a soft limit of 256 open files (systemd's default is 1,024, which 1,000
/// idle clients used up), the daemon raises it to the hard limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_raises_its_open_files_limit_to_the_hard_one() {
    use std::os::unix::process::CommandExt;
    let limits = |pid: u32| -> (String, String) {
        let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap()
            .to_owned();
        let mut fields = line["Max open files".len()..].split_whitespace();
        let soft = fields.next().unwrap().to_owned();
        (soft, fields.next().unwrap().to_owned())
    };
    let (_, hard) = limits(std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let root = child_root(dir.path(), &[]);
    let mut d = ChildDaemon::start_with(&root, &[], |cmd| {
        // SAFETY: setrlimit is async-signal-safe, and only its own struct is touched.
        unsafe {
            cmd.pre_exec(|| {
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                lim.rlim_cur = lim.rlim_cur.min(256);
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    })
    .await;
    assert_eq!(limits(d.child.id()), (hard.clone(), hard));
    d.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_daemon_while_a_client_stalls_mid_body() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let root = child_root(dir.path(), &[]);
    let mut d = ChildDaemon::start(&root, &[]).await;
    let addr = d.base.trim_start_matches("http://").to_owned();
    // Headers promising 1000 bytes, then 10 of them, then nothing.
    let mut stalled = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        stalled,
        "POST /scim/v2/{TENANT}/Users HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {SCIM_TOKEN}\r\nContent-Type: application/scim+json\r\nContent-Length: 1000\r\n\r\n{{\"schemas\""
    )
    .unwrap();
    stalled.flush().unwrap();
    // Let the request reach its handler before the stop begins.
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.signal("TERM");
    exits_cleanly(&mut d, &root).await;
    // The client was still connected: the daemon did not wait for it to give up.
    drop(stalled);
}

/// A stop cuts off, at the drain's deadline, an export whose client reads nothing, as the
/// log says: the connection went on until the runtime ended, so a client that began
/// reading while the connectors stopped got the whole file, and the exit waited for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cuts_off_an_export_at_the_drain_deadline() {
    use std::io::{Read, Write};
    let target = OneRosterServer::start(OneRosterOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (name, text) = oneroster_file("sis", &target, "");
    let text = text.replace("timeout_ms = 2000", "timeout_ms = 30000");
    let root = child_root(dir.path(), &[(name, text)]);
    let env = [("OR_TOKEN", crate::oneroster::DEFAULT_TOKEN)];
    let mut d = ChildDaemon::start(&root, &env).await;
    // About 7 MB of export: far more than the socket buffers hold.
    let long = "x".repeat(60_000);
    for i in 0..120 {
        let mut u = crate::harness::user(&format!("wide{i}@acme.test"));
        u["title"] = json!(long);
        let r = d.scim_send(Method::POST, "/Users", Some(u)).await;
        assert_eq!(r.status(), 201);
    }
    d.drained().await;
    // A PUT the target holds: the connector's stop waits its 3 s for it, after the drain.
    target.inject(Fault::delay(Duration::from_secs(20), 1).on_path("/users/"));
    let r = d
        .scim_send(
            Method::POST,
            "/Users",
            Some(crate::harness::user("slow@acme.test")),
        )
        .await;
    assert_eq!(r.status(), 201);
    let token = jwt_with(json!({"sub": "t", "tenant": TENANT, "scope": "roster:read",
        "aud": JWT_AUDIENCE, "exp": chrono::Utc::now().timestamp() + 600}));
    let addr = d.base.trim_start_matches("http://").to_owned();
    let mut stalled = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        stalled,
        "GET /api/v1/roster/users:export?format=csv HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    stalled.flush().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.signal("TERM");
    // systemd hears of the stop as it begins, not once the drain is over: `systemctl
    // status` said "Serving" for the drain's 5 s.
    assert!(d.notified("STOPPING=1").await, "no STOPPING=1");
    let log = std::fs::read_to_string(root.join("daemon.log")).unwrap();
    assert!(
        !log.contains("after the drain deadline"),
        "STOPPING=1 came after the drain: {log}"
    );
    // Past the drain's 5 s, while the connector still waits for its PUT: read it all.
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let read = stalled.read_to_end(&mut got);
        (read.is_ok(), got)
    });
    exits_cleanly(&mut d, &root).await;
    let (read_ok, got) = reader.join().unwrap();
    assert!(got.starts_with(b"HTTP/1.1 200"));
    assert!(
        !read_ok || !got.ends_with(b"0\r\n\r\n"),
        "an export cut off by the stop read as complete ({} bytes)",
        got.len()
    );
}

/// Wait (up to a minute) for the stopping daemon `d` to exit, and for its exit to be a
/// clean one.
async fn exits_cleanly(d: &mut ChildDaemon, root: &Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = d.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rosterd still runs; see {}",
            root.join("daemon.log").display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}");
}

/// `user_id` → (`job_title`, `groups`) of every row of the CSV export (every user,
/// `active=any`).
async fn exported(d: &ChildDaemon) -> BTreeMap<String, (String, String)> {
    let token = jwt_with(json!({"sub": "t", "tenant": TENANT, "scope": "roster:read",
        "aud": JWT_AUDIENCE, "exp": chrono::Utc::now().timestamp() + 600}));
    let r = d
        .client
        .get(format!(
            "{}/api/v1/roster/users:export?format=csv&active=any",
            d.base
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let mut out = BTreeMap::new();
    for row in csv::Reader::from_reader(text.as_bytes()).records() {
        let row = row.unwrap();
        let dup = out.insert(row[0].to_owned(), (row[4].to_owned(), row[10].to_owned()));
        assert!(dup.is_none(), "{} exported twice", &row[0]);
    }
    out
}

/// What the export must show: `user:<userName>` → (title, group ids sorted and joined),
/// as SCIM reads the roster.
async fn expected_rows(d: &ChildDaemon) -> BTreeMap<String, (String, String)> {
    scim_users(d)
        .await
        .values()
        .map(|u| {
            let mut groups: Vec<&str> = u["groups"]
                .as_array()
                .map(|g| g.iter().filter_map(|g| g["value"].as_str()).collect())
                .unwrap_or_default();
            groups.sort_unstable();
            (
                format!("user:{}", u["userName"].as_str().unwrap()),
                (
                    u["title"].as_str().unwrap_or("").to_owned(),
                    groups.join(","),
                ),
            )
        })
        .collect()
}

/// Creates, title changes (one too long for the export file's slot), deletes, and a
/// group whose members change.
async fn churn(d: &ChildDaemon, tag: &str) {
    let mut ids = Vec::new();
    for i in 0..12 {
        let mut u = user(&format!("{tag}{i}@acme.test"));
        u["title"] = json!("Software Engineer");
        let r = d.scim_send(Method::POST, "/Users", Some(u)).await;
        assert_eq!(r.status(), 201);
        ids.push(
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let long = "Principal Engineer for Long Titles ".repeat(12);
    for (id, title) in [(&ids[0], "Accountant"), (&ids[1], long.trim())] {
        let op = patch_op(json!([{"op": "replace", "path": "title", "value": title}]));
        let r = d
            .scim_send(Method::PATCH, &format!("/Users/{id}"), Some(op))
            .await;
        assert_eq!(r.status(), 200);
    }
    let member = |id: &String| json!({"value": id});
    let group = json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
        "displayName": format!("{tag} team"),
        "members": [member(&ids[1]), member(&ids[2]), member(&ids[6]), member(&ids[7])]});
    let r = d.scim_send(Method::POST, "/Groups", Some(group)).await;
    assert_eq!(r.status(), 201);
    let gid = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let op = patch_op(json!([
        {"op": "remove", "path": format!("members[value eq \"{}\"]", ids[6])},
        {"op": "add", "path": "members", "value": [member(&ids[8])]}]));
    let r = d
        .scim_send(Method::PATCH, &format!("/Groups/{gid}"), Some(op))
        .await;
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
    for id in &ids[2..5] {
        let r = d
            .scim_send(Method::DELETE, &format!("/Users/{id}"), None)
            .await;
        assert_eq!(r.status(), 204);
    }
}

/// The export reads a copy of the roster records kept beside the store, out of its page
/// cache: reused after a clean stop, built again after a kill. Either way it shows
/// exactly the roster SCIM reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_shows_the_roster_after_a_stop_and_after_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let root = child_root(dir.path(), &[]);
    let d = ChildDaemon::start(&root, &[]).await;
    churn(&d, "a").await;
    let want = expected_rows(&d).await;
    assert_eq!(want.len(), 9);
    assert_eq!(
        want.values().filter(|(_, g)| !g.is_empty()).count(),
        3,
        "{want:?}"
    );
    assert_eq!(exported(&d).await, want);

    // "acme", hex-encoded.
    let file = root.join("data/rows/61636d65.rows");
    let inode = || std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&file).unwrap());
    let first = inode();
    d.signal("TERM");
    let mut d = d;
    tokio::task::block_in_place(|| d.child.wait()).unwrap();
    let mut d = ChildDaemon::start(&root, &[]).await;
    assert_eq!(inode(), first, "a clean stop's file is used as it is");
    assert_eq!(exported(&d).await, want, "after a clean stop");
    churn(&d, "b").await;
    let want = expected_rows(&d).await;
    assert_eq!(want.len(), 18);
    assert_eq!(exported(&d).await, want);

    d.kill9();
    let d = ChildDaemon::start(&root, &[]).await;
    assert_ne!(inode(), first, "after a kill the file is built again");
    assert_eq!(exported(&d).await, want, "after a kill");
    churn(&d, "c").await;
    let want = expected_rows(&d).await;
    assert_eq!(exported(&d).await, want);
    assert_eq!(want.len(), 27);
    let log = std::fs::read_to_string(root.join("daemon.log")).unwrap();
    assert!(!log.contains("export's copy"), "{log}");
}

/// Write the drop-in of CSV connector `nightly` on `schedule`.
fn nightly_drop_in(root: &Path, schedule: &str) {
    let (name, text) = crate::reconcile::nightly_csv(schedule);
    std::fs::write(root.join("connectors").join(name), text).unwrap();
}

/// Create `n` users through SCIM Bulk, a thousand a request.
async fn bulk_users(d: &ChildDaemon, n: usize) {
    for start in (0..n).step_by(1000) {
        let ops = user_posts(start..(start + 1000).min(n), |i| {
            format!("user{i}@acme.test")
        });
        let r = d
            .scim_send(Method::POST, "/Bulk", Some(bulk_request(ops)))
            .await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
}

/// A scheduled CSV write that a crash (`kill -9`, a power cut) cut off is written as the
/// daemon starts again, not at the connector's next scheduled time: the night's file
/// would be missing until the next night.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_csv_write_cut_off_by_a_crash_is_written_at_the_next_start() {
    use crate::reconcile::NEW_YEAR;
    let dir = tempfile::tempdir().unwrap();
    let root = child_root(dir.path(), &[]);
    nightly_drop_in(&root, NEW_YEAR);
    let mut d = ChildDaemon::start(&root, &[]).await;
    bulk_users(&d, 3_000).await;
    let out = root.join("connectors").join("nightly-out");
    let staged = || -> Vec<String> {
        std::fs::read_dir(&out)
            .map(|es| {
                es.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains(".tmp-"))
                    .collect()
            })
            .unwrap_or_default()
    };
    // Every second, until a kill lands inside a write: its staged file is left behind.
    for attempt in 1.. {
        nightly_drop_in(&root, "* * * * * *");
        d.signal("HUP");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while staged().is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the scheduled write never began: {}",
                d.status().await
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        d.kill9();
        if !staged().is_empty() {
            eprintln!("caught at attempt {attempt}");
            break;
        }
        assert!(attempt < 5, "5 kills all came after the write was done");
        nightly_drop_in(&root, NEW_YEAR);
        d = ChildDaemon::start(&root, &[]).await;
    }
    let roster = out.join("roster.csv");
    let _ = std::fs::remove_file(&roster);
    // Its next scheduled time is New Year's midnight now.
    nightly_drop_in(&root, NEW_YEAR);
    let d = ChildDaemon::start(&root, &[]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !roster.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the write cut off by the crash waited for the next scheduled time: {}",
            d.status().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(staged().is_empty(), "{:?}", staged());
    let rows = std::fs::read_to_string(&roster).unwrap().lines().count();
    assert_eq!(rows, 3_001, "a header and every user");
}

/// `replay --all` against a daemon whose answers leave letters out: `sis` answers one of
/// four letters (twice, and one it was not asked for), hands one back and says nothing of
/// the other two; `old` is a daemon older than the batch call, replayed one call a
/// letter. What was not answered counts as not replayed, once, and the command fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_all_counts_what_the_daemon_leaves_unanswered_as_not_replayed() {
    use axum::extract::Path as UrlPath;
    use axum::routing::{get, post};
    use std::sync::{Arc, Mutex};
    let batches = Arc::new(Mutex::new(Vec::<Value>::new()));
    let seen = batches.clone();
    let list = |ids: &[u64]| {
        let letters: Vec<Value> = ids.iter().map(|id| json!({"id": id})).collect();
        json!({"dead_letters": letters, "next_after": null, "total": ids.len()})
    };
    let (sis, old) = (list(&[1, 2, 3, 4]), list(&[7, 8]));
    let ok = |id: u64| json!({"id": id, "status": 200, "replayed": id, "sent": "original_event", "superseded_by": [], "note": null});
    let router = axum::Router::new()
        .route(
            "/api/v1/roster/connectors/{name}/dead-letters",
            get(move |UrlPath(name): UrlPath<String>| async move {
                axum::Json(if name == "sis" { sis } else { old })
            }),
        )
        .route(
            "/api/v1/roster/connectors/sis/dead-letters:replay",
            post(move |axum::Json(body): axum::Json<Value>| async move {
                let first = {
                    let mut b = seen.lock().unwrap();
                    b.push(body["ids"].clone());
                    b.len() == 1
                };
                axum::Json(if first {
                    json!({"results": [ok(1), ok(1), ok(99)], "not_attempted": [3]})
                } else {
                    json!({"results": [ok(3)], "not_attempted": []})
                })
            }),
        )
        .route(
            "/api/v1/roster/connectors/old/dead-letters/{id}/replay",
            post(move |UrlPath(id): UrlPath<u64>| async move { axum::Json(ok(id)) }),
        )
        .fallback(|| async {
            (
                axum::http::StatusCode::NOT_FOUND,
                axum::Json(
                    json!({"error": "not_found", "message": "no such endpoint in the Roster API"}),
                ),
            )
        });
    let addr = crate::mirror::serve_on_loopback(router).await;
    let replay_all = move |connector: &str| {
        outcome(
            crate::harness::rosterd_command()
                .args(["dead-letters", "--url", &format!("http://{addr}")])
                .args([
                    "--token", "t", "--tenant", "acme", "replay", connector, "--all",
                ]),
        )
    };
    let (ok_all, out) = tokio::task::spawn_blocking(move || replay_all("sis"))
        .await
        .unwrap();
    assert!(!ok_all, "{out}");
    assert_eq!(
        *batches.lock().unwrap(),
        [json!([1, 2, 3, 4]), json!([3])],
        "{out}"
    );
    assert_eq!(out.matches(" replayed (the").count(), 2, "{out}");
    for id in [1, 3] {
        assert!(out.contains(&format!("#{id} replayed")), "{out}");
    }
    assert!(!out.contains("#99"), "{out}");
    for id in [2, 4] {
        assert!(
            out.contains(&format!(
                "#{id} not known to be replayed, it may stay: the daemon's answer does not say"
            )),
            "{out}"
        );
    }
    assert!(
        out.contains("2 of 4 dead letters were not replayed"),
        "{out}"
    );
    let (ok_all, out) = tokio::task::spawn_blocking(move || replay_all("old"))
        .await
        .unwrap();
    assert!(ok_all, "{out}");
    assert!(
        out.contains("#7 replayed") && out.contains("#8 replayed"),
        "{out}"
    );
}

/// With JSON logs a field that holds text is a JSON string of that text: log shippers
/// read `reason` and `result` as written. An audit found them quoted twice
/// (`"result":"\"…/rosterd-…: 50275 keys …\""`), as `{:?}` of a string writes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_hold_text_fields_as_plain_strings() {
    let dir = tempfile::tempdir().unwrap();
    let root = child_root(dir.path(), &[]);
    let config = root.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}[log]\nformat = \"json\"\n")).unwrap();
    let d = ChildDaemon::start(&root, &[("RUST_LOG", "info")]).await;
    d.signal("USR1");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let written = loop {
        let log = std::fs::read_to_string(root.join("daemon.log")).unwrap();
        if let Some(line) = log.lines().find(|l| l.contains("Backup written.")) {
            break serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        }
        assert!(tokio::time::Instant::now() < deadline, "no backup: {log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let result = written["result"]
        .as_str()
        .unwrap_or_else(|| panic!("{written}"));
    assert!(
        result.contains("rosterd-") && result.contains("keys") && !result.starts_with('"'),
        "{written}"
    );
}
