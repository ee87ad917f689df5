//! Boots rosterd in-process on 127.0.0.1:0 from a real config file (with an archetype
//! bundle and Roster API JWT settings) and a temporary store.
#![allow(dead_code)]

use reqwest::{Method, StatusCode, header::HeaderMap};
use rosterd::config::{Config, ScimConfig};
use rosterd::server::auth::{TokenHash, new_token};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const TENANT: &str = "acme";
pub const OTHER_TENANT: &str = "globex";
pub const JWT_SECRET: &str = "integration-test-secret-of-at-least-32-bytes";
pub const JWT_AUDIENCE: &str = "rosterd-tests";
/// The test bundle, shared by both tenants.
pub const BUNDLE: &str = include_str!("../fixtures/bundle.toml");

pub struct TestDaemon {
    pub addr: std::net::SocketAddr,
    pub token: String,
    pub other_token: String,
    pub client: reqwest::Client,
    pub root: PathBuf,
    env: Vec<(String, String)>,
    /// The config's extra tables, kept across a restart.
    config_extra: String,
    shutdown: CancellationToken,
    /// This daemon's own SIGHUP: a signal would reload every daemon of the test binary,
    /// other tests' too.
    reloads: Arc<tokio::sync::Notify>,
    handle: Option<JoinHandle<Result<(), rosterd::server::ServerError>>>,
    _dir: Option<tempfile::TempDir>,
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Resp {
    /// Status, headers and the body as JSON (or as a JSON string when it is not JSON).
    pub async fn read(resp: reqwest::Response) -> Resp {
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Resp {
            status,
            headers,
            body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Clone)]
pub struct Options {
    pub max_body_bytes: usize,
    pub scim: ScimConfig,
    /// Connector drop-in files (name, TOML) written to the connectors directory.
    pub connectors: Vec<(String, String)>,
    /// Environment variables the daemon sees (connector secrets).
    pub env: Vec<(String, String)>,
    /// More config TOML (whole tables, e.g. `[schedules]`), appended to config.toml.
    pub config_extra: String,
    pub client_timeout_secs: u64,
    /// The first tenant's `allow_overrides` (the other tenant's is always false).
    pub allow_overrides: bool,
    /// The archetype bundle both tenants use, written at every start.
    pub bundle: String,
    /// More keys for `[api.jwt]` (e.g. `public_keys`).
    pub jwt_extra: String,
    /// More keys of the first tenant's `[[tenants]]` entry, such as a `token_env`.
    pub tenant_extra: String,
    /// Files (name, text) written beside config.toml at every start, such as key files.
    pub files: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_body_bytes: 1024 * 1024,
            scim: ScimConfig::default(),
            connectors: vec![],
            env: vec![],
            config_extra: String::new(),
            client_timeout_secs: 75,
            allow_overrides: true,
            bundle: BUNDLE.to_owned(),
            jwt_extra: String::new(),
            tenant_extra: String::new(),
            files: vec![],
        }
    }
}

/// `[backup]` for a test's config: a backup starts whatever the free space. By default a
/// backup leaves a tenth of its filesystem free, up to 1 GiB, and a test machine's
/// temporary directory may have less than that (CI's had 612 MiB); the rule itself has
/// its own test, which sets the key.
pub const BACKUP_WHATEVER_SPACE: &str = "[backup]\nkeep_free_mb = 0\n";

fn config_text(root: &Path, opts: &Options, hash: &TokenHash, other_hash: &TokenHash) -> String {
    let backup = if opts.config_extra.contains("[backup]") {
        ""
    } else {
        BACKUP_WHATEVER_SPACE
    };
    format!(
        r#"version = 1
[server]
listen = "127.0.0.1:0"
data_dir = {data:?}
max_body_bytes = {max_body}
client_timeout_secs = {client_timeout}
[scim]
max_results = {max_results}
bulk_max_operations = {bulk}
max_sort_results = {sort}
[connectors]
dir = "connectors"
[api.jwt]
audience = ["{JWT_AUDIENCE}"]
hs256_secret_env = "TEST_JWT_SECRET"
{jwt_extra}
[[tenants]]
id = "{TENANT}"
token_hashes = ["{hash}"]
bundle = "bundle.toml"
allow_overrides = {allow_overrides}
idp = "azure-ad"
{tenant_extra}
group_rules = [{{ group = "Engineering Leads", archetype = "eng_lead" }}]
group_roles = [{{ group = "engineering leads", role = "admin" }}]
[[tenants]]
id = "{OTHER_TENANT}"
token_hashes = ["{other_hash}"]
bundle = "bundle.toml"
allow_overrides = false
{extra}
{backup}"#,
        extra = opts.config_extra,
        jwt_extra = opts.jwt_extra,
        tenant_extra = opts.tenant_extra,
        data = root.join("data"),
        max_body = opts.max_body_bytes,
        client_timeout = opts.client_timeout_secs,
        max_results = opts.scim.max_results,
        bulk = opts.scim.bulk_max_operations,
        sort = opts.scim.max_sort_results,
        allow_overrides = opts.allow_overrides,
    )
}

impl TestDaemon {
    pub async fn start() -> TestDaemon {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> TestDaemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_owned();
        let mut d = Self::boot(&path, opts, None).await;
        d._dir = Some(dir);
        d
    }

    /// Wait until the daemon serves, or has stopped. It has read its config, bundles and
    /// connector files by then: a test that edits one of those files at once raced that
    /// first read, and the daemon could start on the edited file.
    async fn until_serving(&self) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            if self.handle.as_ref().is_none_or(|h| h.is_finished()) {
                return;
            }
            let asked = self
                .client
                .get(self.url("/status"))
                .timeout(std::time::Duration::from_secs(1))
                .send()
                .await;
            if asked.is_ok() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the daemon neither serves nor stopped: {asked:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Boot with the config and store under `root`, with known tokens (restart tests).
    async fn boot(root: &Path, opts: Options, tokens: Option<(String, String)>) -> TestDaemon {
        let (token, hash) = match &tokens {
            Some((t, _)) => (t.clone(), TokenHash::of(t)),
            None => new_token(),
        };
        let (other_token, other_hash) = match &tokens {
            Some((_, o)) => (o.clone(), TokenHash::of(o)),
            None => new_token(),
        };
        std::fs::write(root.join("bundle.toml"), &opts.bundle).expect("bundle");
        for (name, text) in &opts.files {
            std::fs::write(root.join(name), text).expect("file beside config.toml");
        }
        let connectors = root.join("connectors");
        std::fs::create_dir_all(&connectors).expect("connectors dir");
        for (name, text) in &opts.connectors {
            std::fs::write(connectors.join(name), text).expect("connector file");
        }
        let env_vars = opts.env.clone();
        let config_extra = opts.config_extra.clone();
        let config_path = root.join("config.toml");
        std::fs::write(&config_path, config_text(root, &opts, &hash, &other_hash)).expect("config");
        let config = Config::load(&config_path).expect("config parses");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let vars = env_vars.clone();
        let env: rosterd::server::EnvFn = Arc::new(move |v: &str| {
            if v == "TEST_JWT_SECRET" {
                return Some(JWT_SECRET.to_owned());
            }
            vars.iter()
                .find(|(k, _)| k == v)
                .map(|(_, val)| val.clone())
        });
        let reloads = Arc::new(tokio::sync::Notify::new());
        let handle = tokio::spawn(rosterd::run_with_env(
            config,
            env,
            listener,
            shutdown.clone(),
            rosterd::server::Reloads::Notified(reloads.clone()),
        ));
        let client = reqwest::Client::new();
        let d = TestDaemon {
            addr,
            token,
            other_token,
            client,
            root: root.to_owned(),
            env: env_vars,
            config_extra,
            shutdown,
            reloads,
            handle: Some(handle),
            _dir: None,
        };
        d.until_serving().await;
        d
    }

    /// Stop gracefully and start again on the same config and store.
    pub async fn restart(self) -> TestDaemon {
        self.restart_with(|_| {}).await
    }

    /// As [`restart`](Self::restart), with `change` made to the options first.
    pub async fn restart_with(mut self, change: impl FnOnce(&mut Options)) -> TestDaemon {
        let dir = self._dir.take();
        let tokens = (self.token.clone(), self.other_token.clone());
        let root = self.root.clone();
        let mut opts = Options {
            env: self.env.clone(),
            config_extra: self.config_extra.clone(),
            ..Options::default()
        };
        change(&mut opts);
        self.stop().await;
        let mut d = Self::boot(&root, opts, Some(tokens)).await;
        d._dir = dir;
        d
    }

    /// A Roster API token for `tenant` with `scope` (space-separated).
    pub fn jwt(&self, tenant: &str, scope: &str) -> String {
        jwt_with(json!({
            "sub": "it.admin@acme.test",
            "tenant": tenant,
            "scope": scope,
            "aud": JWT_AUDIENCE,
            "exp": chrono::Utc::now().timestamp() + 3600,
        }))
    }

    /// A Roster API request; `body` is sent as JSON.
    pub async fn roster(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> Resp {
        self.roster_with(method, path, token, body, &[]).await
    }

    /// `PATCH path {"archetype_id": archetype}`: an override (a string) or its clear (null).
    pub async fn override_archetype(&self, path: &str, token: &str, archetype: Value) -> Resp {
        let body = json!({ "archetype_id": archetype });
        self.roster(Method::PATCH, path, token, Some(body)).await
    }

    /// `POST /archetype:bulk-assign {"assignments": items}`.
    pub async fn bulk_assign(&self, token: &str, items: Value) -> Resp {
        let body = json!({ "assignments": items });
        self.roster(Method::POST, "/archetype:bulk-assign", token, Some(body))
            .await
    }

    /// A reconcile dry run (`POST /scim:sync {"dry_run": true}`): what each connector
    /// would send.
    pub async fn dry_run_sync(&self, token: &str) -> Resp {
        self.roster(
            Method::POST,
            "/scim:sync",
            token,
            Some(json!({"dry_run": true})),
        )
        .await
    }

    pub async fn roster_with(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut req = self
            .client
            .request(method, self.url(&format!("/api/v1/roster{path}")))
            .bearer_auth(token);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        Resp::read(req.send().await.expect("request")).await
    }

    /// The daemon's `/status` document.
    pub async fn status(&self) -> Value {
        let r = self
            .raw(Method::GET, &self.url("/status"), None, &[], None)
            .await;
        assert_eq!(r.status, 200, "/status: {}", r.body);
        r.body
    }

    /// Wait until no tenant has a job running (a fresh store is reclassified at start-up,
    /// holding the job slot: overrides and syncs answer 409 meanwhile).
    pub async fn idle(&self) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let s = self.status().await;
            let tenants = s["tenants"].as_object().expect("tenants in /status");
            if tenants.values().all(|t| {
                t.get("running_job")
                    .expect("running_job in /status")
                    .is_null()
            }) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "a job still runs: {s}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Ask for a reload, as an operator's `systemctl reload` (SIGHUP) does, and wait until
    /// it has finished. (A real SIGHUP is `crash.rs`'s, to a child daemon.)
    pub async fn reload(&self) {
        let reloads = |v: &Value| v["reloads"].as_u64().expect("reloads in /status");
        let before = reloads(&self.status().await);
        self.ask_reload();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let now = reloads(&self.status().await);
            if now > before {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "no reload happened");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Ask for a reload and go on at once.
    pub fn ask_reload(&self) {
        self.reloads.notify_one();
    }

    /// Wait for the daemon to stop by itself (no shutdown from here), up to `ceiling`.
    pub async fn exited(
        &mut self,
        ceiling: std::time::Duration,
    ) -> Result<(), rosterd::server::ServerError> {
        let h = self.handle.take().expect("daemon running");
        tokio::time::timeout(ceiling, h)
            .await
            .expect("the daemon did not stop by itself")
            .expect("join")
    }

    /// Stop gracefully, then check the store it leaves: every test that stops or restarts
    /// a daemon also checks that the store's derived keys agree with its documents.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await.expect("join").expect("daemon exited with an error");
            let data = self.root.join("data");
            tokio::task::spawn_blocking(move || assert_store_checks_clean(&data))
                .await
                .expect("store check");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn scim_url(&self, path: &str) -> String {
        self.url(&format!("/scim/v2/{TENANT}{path}"))
    }

    pub async fn raw(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Resp {
        let mut req = self.client.request(method, url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/scim+json").body(b);
        }
        Resp::read(req.send().await.expect("request")).await
    }

    /// A SCIM request on the test tenant with its token.
    pub async fn scim(&self, method: Method, path: &str, body: Option<Value>) -> Resp {
        self.scim_with(method, path, body, &[]).await
    }

    pub async fn scim_with(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let url = self.scim_url(path);
        self.raw(
            method,
            &url,
            Some(&self.token),
            headers,
            body.map(|b| serde_json::to_vec(&b).expect("json")),
        )
        .await
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.scim(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Resp {
        self.scim(Method::POST, path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: Value) -> Resp {
        self.scim(Method::PUT, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> Resp {
        self.scim(Method::PATCH, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        self.scim(Method::DELETE, path, None).await
    }

    /// Create a user and return its id, asserting 201.
    pub async fn create_user(&self, user_name: &str) -> String {
        let r = self.post("/Users", user(user_name)).await;
        assert_eq!(r.status, 201, "create {user_name}: {}", r.body);
        r.body["id"].as_str().expect("id").to_owned()
    }

    /// The id of the user with this userName (plain ASCII without quotes or spaces).
    pub async fn user_id(&self, user_name: &str) -> String {
        let r = self
            .get(&format!(
                "/Users?filter=userName%20eq%20%22{}%22",
                user_name.replace('@', "%40")
            ))
            .await;
        r.body["Resources"][0]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no user {user_name}: {}", r.body))
            .to_owned()
    }

    /// POST these operations to /Bulk as one BulkRequest.
    pub async fn bulk(&self, operations: Value) -> Resp {
        self.post("/Bulk", bulk_request(operations)).await
    }

    /// Add these users to a group with a SCIM PATCH, which must succeed.
    pub async fn add_members(&self, gid: &str, ids: &[&str]) {
        let value: Vec<Value> = ids.iter().map(|id| json!({"value": id})).collect();
        let r = self
            .patch(
                &format!("/Groups/{gid}"),
                patch_op(json!([{"op": "add", "path": "members", "value": value}])),
            )
            .await;
        assert_eq!(r.status, 204, "add members to {gid}: {}", r.body);
    }

    pub async fn create_group(&self, name: &str) -> String {
        let r = self
            .post(
                "/Groups",
                serde_json::json!({
                    "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                    "displayName": name,
                }),
            )
            .await;
        assert_eq!(r.status, 201, "create group {name}: {}", r.body);
        r.body["id"].as_str().expect("id").to_owned()
    }
}

/// What a shell may export for other work that changes what a `rosterd` child does, so
/// that no child inherits it: `RUST_LOG=warn` hid the INFO line that gives a child's
/// address, which tests waited for without end; a `ROSTERD_API_TOKEN` was sent instead of
/// the token a command mints (401); systemd's own, when the tests run under a unit, would
/// send a child's notifications and log lines there. A test that wants one sets it.
pub const NOT_INHERITED: &[&str] = &[
    "RUST_LOG",
    "ROSTERD_API_TOKEN",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
];

/// `program` as a child process, without [`NOT_INHERITED`] (`setpriv` passes its
/// environment on to the `rosterd` it runs).
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    let mut cmd = std::process::Command::new(program);
    for var in NOT_INHERITED {
        cmd.env_remove(var);
    }
    cmd
}

/// The `rosterd` binary as a child process, without [`NOT_INHERITED`].
pub fn rosterd_command() -> std::process::Command {
    command(env!("CARGO_BIN_EXE_rosterd"))
}

/// The store of a stopped daemon, opened to look into.
pub fn open_stopped_store(data: &Path) -> rosterd::store::Store {
    // sled lets go of its file lock a moment after the daemon's last handle drops.
    let mut tries = 0;
    loop {
        match rosterd::store::Store::open_existing(data, 16 << 20) {
            Ok(store) => return store,
            Err(e) if e.held_elsewhere() && tries < 200 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
            Err(e) => panic!("cannot open the store at {}: {e}", data.display()),
        }
    }
}

/// `rosterd store check` on a stopped daemon's store finds nothing wrong.
pub fn assert_store_checks_clean(data: &Path) {
    if !rosterd::store::Store::holds_store(data) {
        return;
    }
    let store = open_stopped_store(data);
    let checked = store.check(&[]).expect("store check reads the store");
    store.close().expect("store check closes the store");
    for t in checked {
        assert_eq!(
            t.problems,
            Vec::<String>::new(),
            "store check of tenant {} after a graceful stop ({} problems)",
            t.tenant,
            t.problem_count
        );
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A SCIM BulkRequest of `operations`.
pub fn bulk_request(operations: Value) -> Value {
    json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"], "Operations": operations})
}

/// `/Bulk` operations creating one user per index `i`, named `user_name(i)`, with bulkId
/// `u{i}`.
pub fn user_posts(
    indices: impl IntoIterator<Item = usize>,
    user_name: impl Fn(usize) -> String,
) -> Value {
    indices
        .into_iter()
        .map(|i| {
            json!({"method": "POST", "path": "/Users", "bulkId": format!("u{i}"),
                   "data": user(&user_name(i))})
        })
        .collect()
}

pub fn user(user_name: &str) -> Value {
    serde_json::json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "userName": user_name,
        "name": {"givenName": "Given", "familyName": "Family"},
        "emails": [{"value": user_name, "type": "work", "primary": true}],
        "active": true,
    })
}

pub fn patch_op(ops: Value) -> Value {
    serde_json::json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": ops,
    })
}

pub const ENTERPRISE: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";

/// Sign arbitrary claims with the test secret.
pub fn jwt_with(claims: Value) -> String {
    rosterd::api::jwt::testing::hs256_token(JWT_SECRET.as_bytes(), &claims)
}

pub use rosterd::ops::journal::testing::LogBuf;

/// The id at the end of a /Bulk result's `location`.
pub fn location_id(result: &Value) -> String {
    let location = result["location"].as_str().expect("a location");
    location.rsplit('/').next().unwrap_or_default().to_owned()
}

/// The newest backup (`rosterd-<time>`) in a backup directory.
pub fn newest_backup(dir: &Path) -> PathBuf {
    let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("backup dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("rosterd-"))
        })
        .collect();
    all.sort();
    all.pop().expect("a backup")
}
