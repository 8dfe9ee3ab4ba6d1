//! Test databases: a fresh SQLite file or a fresh PostgreSQL database per test.
//!
//! PostgreSQL comes from `DATABASE_URL` (any database on the server; each test
//! creates and drops its own), or else from a throwaway cluster started from
//! the local PostgreSQL binaries. With neither, PostgreSQL tests print a loud
//! SKIPPED line and return, unless `CI` or `PERSIST_DURABLE_REQUIRE_POSTGRES`
//! is set, in which case they fail. A PostgreSQL database is dropped only when
//! its test passed, so a failure can be inspected.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command as Process, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use diesel::connection::SimpleConnection;
use diesel::{Connection, SqliteConnection};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use persist_durable::{Command, EntityKey, PostgresStore, ProductId, SharedStore, SqliteStore, StoreConfig, UserKey};

/// The databases every store test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh, migrated database for one test.
pub struct TestDb {
    pub backend: Backend,
    location: Location,
    /// SQLite: a connection holding an exclusive lock while the database is "down".
    sqlite_lock: Mutex<Option<SqliteConnection>>,
}

enum Location {
    Sqlite {
        _dir: tempfile::TempDir,
        path: PathBuf,
    },
    Postgres {
        admin_url: String,
        name: String,
        url: String,
    },
}

/// A fixed instant to start test clocks at.
pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 20, 9, 0, 0).unwrap()
}

pub fn key(mall: &str, user: &str) -> UserKey {
    UserKey::new(mall, user).unwrap()
}

/// The user viewed product `id`.
pub fn view(id: &str) -> Command {
    Command::ViewProduct {
        product_id: ProductId::new(id).unwrap(),
    }
}

/// Store settings for tests: failures show up within a second or two.
pub fn test_store_config() -> StoreConfig {
    StoreConfig::default()
        .with_pool_size(4)
        .with_connect_timeout(Duration::from_millis(1500))
        .with_operation_timeout(Duration::from_secs(5))
        .with_sqlite_busy_timeout(Duration::from_millis(200))
}

impl TestDb {
    /// A fresh database on `backend`, or `None` (after saying so loudly) when
    /// PostgreSQL is not available and not required.
    pub async fn open(backend: Backend) -> Option<TestDb> {
        let location = match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("a temporary directory");
                let path = dir.path().join("state.db");
                Location::Sqlite { _dir: dir, path }
            }
            Backend::Postgres => {
                let admin_url = postgres_admin_url()?;
                let name = fresh_database_name();
                admin(&admin_url, &format!("CREATE DATABASE {name}"));
                let url = with_database(&admin_url, &name);
                Location::Postgres { admin_url, name, url }
            }
        };
        Some(TestDb {
            backend,
            location,
            sqlite_lock: Mutex::new(None),
        })
    }

    /// A new store on this database, as a new process would open it.
    pub async fn connect(&self) -> SharedStore {
        self.try_connect().await.expect("the test database opens")
    }

    pub async fn try_connect(&self) -> Result<SharedStore, persist_durable::StoreError> {
        self.try_connect_with(test_store_config()).await
    }

    /// A new store on this database with `config`.
    pub async fn connect_with(&self, config: StoreConfig) -> SharedStore {
        self.try_connect_with(config).await.expect("the test database opens")
    }

    pub async fn try_connect_with(&self, config: StoreConfig) -> Result<SharedStore, persist_durable::StoreError> {
        Ok(match &self.location {
            Location::Sqlite { path, .. } => Arc::new(SqliteStore::open_with(path, config).await?),
            Location::Postgres { url, .. } => Arc::new(PostgresStore::connect_with(url, config).await?),
        })
    }

    /// Makes the database refuse work: PostgreSQL refuses connections and
    /// drops the open ones; SQLite is locked by another connection.
    pub fn make_unavailable(&self) {
        match &self.location {
            Location::Sqlite { path, .. } => {
                let mut conn = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
                conn.batch_execute("BEGIN EXCLUSIVE").unwrap();
                *self.sqlite_lock.lock().unwrap() = Some(conn);
            }
            Location::Postgres { admin_url, name, .. } => admin(
                admin_url,
                &format!(
                    "ALTER DATABASE {name} ALLOW_CONNECTIONS false; \
                     SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}';"
                ),
            ),
        }
    }

    /// Undoes [`make_unavailable`](Self::make_unavailable).
    pub fn make_available(&self) {
        match &self.location {
            Location::Sqlite { .. } => {
                if let Some(mut conn) = self.sqlite_lock.lock().unwrap().take() {
                    conn.batch_execute("ROLLBACK").unwrap();
                }
            }
            Location::Postgres { admin_url, name, .. } => {
                admin(admin_url, &format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
            }
        }
    }

    /// Overwrites the user's stored payload with bytes that are not a state.
    pub fn corrupt_row(&self, key: &UserKey) {
        let id = key.persistence_id();
        let sql = match &self.location {
            Location::Sqlite { .. } => {
                format!("UPDATE durable_state SET state_payload = X'7B6E6F74206A736F6E' WHERE persistence_id = '{id}'")
            }
            Location::Postgres { .. } => {
                format!(
                    "UPDATE durable_state SET state_payload = '\\x7b6e6f74206a736f6e' WHERE persistence_id = '{id}'"
                )
            }
        };
        self.execute(&sql);
    }

    /// The PostgreSQL URL of the test database; `None` on SQLite.
    pub fn postgres_url(&self) -> Option<&str> {
        match &self.location {
            Location::Postgres { url, .. } => Some(url),
            Location::Sqlite { .. } => None,
        }
    }

    /// Where the database is, as `persist_durable::open` takes it: the
    /// PostgreSQL URL or the SQLite file's path.
    pub fn location(&self) -> String {
        match &self.location {
            Location::Postgres { url, .. } => url.clone(),
            Location::Sqlite { path, .. } => path.display().to_string(),
        }
    }

    /// Fails the test unless the SQL boolean expression `condition` holds on
    /// the database, read outside the library.
    pub fn assert_sql(&self, condition: &str) {
        let check = format!(
            "CREATE TEMP TABLE assertion (holds BOOLEAN NOT NULL CHECK (holds)); \
             INSERT INTO assertion (holds) SELECT {condition}; DROP TABLE assertion;"
        );
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.execute(&check)));
        assert!(outcome.is_ok(), "does not hold on the database: {condition}");
    }

    /// Runs `sql` on the test database directly, outside the library.
    pub fn execute(&self, sql: &str) {
        match &self.location {
            Location::Sqlite { path, .. } => {
                let mut conn = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
                conn.batch_execute(sql).unwrap();
            }
            Location::Postgres { url, .. } => admin(url, sql),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Location::Postgres { admin_url, name, .. } = &self.location {
            if std::thread::panicking() {
                eprintln!("test failed: PostgreSQL database {name} kept for inspection");
            } else {
                admin(admin_url, &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
            }
        }
    }
}

/// Runs SQL on its own thread and runtime, so it works from any test context.
fn admin(url: &str, sql: &str) {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut conn = AsyncPgConnection::establish(&url)
                .await
                .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
            conn.batch_execute(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        })
    })
    .join()
    .expect("an admin statement succeeds");
}

fn fresh_database_name() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "persist_durable_test_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst),
        nanos
    )
}

/// `url` with its database name replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_part = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{host_part}/{database}?{query}"),
        None => format!("{host_part}/{database}"),
    }
}

fn postgres_required() -> bool {
    std::env::var_os("PERSIST_DURABLE_REQUIRE_POSTGRES").is_some() || std::env::var_os("CI").is_some()
}

/// Where to create test databases, decided once per test binary.
pub fn postgres_admin_url() -> Option<String> {
    static URL: OnceLock<Result<String, String>> = OnceLock::new();
    let url = URL.get_or_init(|| match std::env::var("DATABASE_URL") {
        Ok(url) if url.starts_with("postgres") => Ok(url),
        _ => start_throwaway_cluster(),
    });
    match url {
        Ok(url) => Some(url.clone()),
        Err(why) if postgres_required() => panic!("PostgreSQL is required here but unavailable: {why}"),
        Err(why) => {
            eprintln!("\n*** SKIPPED a PostgreSQL test: {why}. Set DATABASE_URL or install PostgreSQL. ***\n");
            None
        }
    }
}

/// Holds the cluster supervisor's stdin open for the life of the test
/// process; when the process exits, the supervisor sees end of file and
/// removes the cluster.
static CLUSTER_LIFELINE: OnceLock<Mutex<ChildStdin>> = OnceLock::new();

fn start_throwaway_cluster() -> Result<String, String> {
    let bin = find_postgres_bin().ok_or("DATABASE_URL is not set and no PostgreSQL binaries were found")?;
    let dir = tempfile::Builder::new()
        .prefix("persist-durable-pg-")
        .tempdir()
        .map_err(|e| e.to_string())?
        .keep();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let script = format!(
        "set -e; '{bin}/initdb' -D '{dir}/data' -A trust -U postgres --no-sync >/dev/null; \
         '{bin}/pg_ctl' -D '{dir}/data' -l '{dir}/log' -w \
           -o \"-p {port} -k '{dir}' -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200\" start >/dev/null; \
         echo ready; cat >/dev/null; \
         '{bin}/pg_ctl' -D '{dir}/data' -m immediate stop >/dev/null 2>&1; rm -rf '{dir}'",
        bin = bin.display(),
        dir = dir.display(),
    );
    let running_as_root = Process::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false);
    let mut process = if running_as_root {
        // initdb refuses to run as root; the postgres user runs the cluster.
        Process::new("chown")
            .args(["postgres", dir.to_str().unwrap()])
            .status()
            .map_err(|e| e.to_string())?;
        let mut p = Process::new("runuser");
        p.args(["-u", "postgres", "--", "sh", "-c", &script]);
        p
    } else {
        let mut p = Process::new("sh");
        p.args(["-c", &script]);
        p
    };
    let mut child = process
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start a throwaway cluster: {e}"))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if line.trim() != "ready" {
        return Err(format!(
            "the throwaway cluster did not start (see {}/log)",
            dir.display()
        ));
    }
    let _ = CLUSTER_LIFELINE.set(Mutex::new(child.stdin.take().unwrap()));
    eprintln!("using a throwaway PostgreSQL cluster on port {port}");
    Ok(format!("postgres://postgres@127.0.0.1:{port}/postgres"))
}

fn find_postgres_bin() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
        .filter(|bin| Path::new(&bin.join("initdb")).exists())
        .collect();
    versions.sort();
    versions.pop()
}

/// A lock held by another session until dropped (on the table: loads and
/// writes wait behind it, like a database that stopped answering).
pub struct TableLock {
    release: Option<std::sync::mpsc::Sender<()>>,
    holder: Option<std::thread::JoinHandle<()>>,
}

impl TestDb {
    /// PostgreSQL only: takes an exclusive lock on the table in another session.
    pub fn lock_table(&self) -> TableLock {
        self.hold_in_transaction("LOCK TABLE durable_state IN ACCESS EXCLUSIVE MODE")
    }

    /// PostgreSQL only: locks `key`'s row (`FOR UPDATE`) in another session:
    /// writes, deletes and purges of it wait; reads do not.
    pub fn lock_row<K: EntityKey>(&self, key: &K) -> TableLock {
        self.hold_in_transaction(&format!(
            "SELECT 1 FROM durable_state WHERE persistence_id = '{}' FOR UPDATE",
            key.persistence_id()
        ))
    }

    /// PostgreSQL only: whether some session waits for a lock on this database.
    pub fn someone_waits_for_a_lock(&self) -> bool {
        #[derive(diesel::QueryableByName)]
        struct Waiting {
            #[diesel(sql_type = diesel::sql_types::Bool)]
            waiting: bool,
        }
        let Location::Postgres { url, .. } = &self.location else {
            panic!("locks are taken on PostgreSQL")
        };
        let url = url.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                use diesel_async::RunQueryDsl;
                let mut conn = AsyncPgConnection::establish(&url).await.unwrap();
                let Waiting { waiting } = diesel::sql_query(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock') AS waiting",
                )
                .get_result(&mut conn)
                .await
                .unwrap();
                waiting
            })
        })
        .join()
        .unwrap()
    }

    /// PostgreSQL only: runs `sql` in a transaction of another session, kept
    /// open (with its locks) until the value returned is dropped.
    /// PostgreSQL only: runs `sql` in a transaction of another session, held
    /// open (with its locks) until the returned guard is dropped.
    pub fn hold_in_transaction(&self, sql: &str) -> TableLock {
        let Location::Postgres { url, .. } = &self.location else {
            panic!("locks are taken on PostgreSQL")
        };
        let sql = format!("BEGIN; {sql};");
        let url = url.clone();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (locked, is_locked) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut conn = AsyncPgConnection::establish(&url).await.unwrap();
                conn.batch_execute(&sql).await.unwrap();
                locked.send(()).unwrap();
                let _ = tokio::task::spawn_blocking(move || released.recv()).await;
                conn.batch_execute("ROLLBACK").await.unwrap();
            });
        });
        is_locked.recv().expect("the lock is taken");
        TableLock {
            release: Some(release),
            holder: Some(holder),
        }
    }
}

impl Drop for TableLock {
    fn drop(&mut self) {
        drop(self.release.take());
        if let Some(holder) = self.holder.take() {
            let _ = holder.join();
        }
    }
}

/// Makes the rows of `keys` look last written 500 days ago, behind the library's back.
pub fn age<K: EntityKey>(db: &TestDb, keys: &[K]) {
    let ids: Vec<String> = keys.iter().map(|k| format!("'{}'", k.persistence_id())).collect();
    let long_ago = match db.backend {
        Backend::Postgres => "now() - interval '500 days'",
        Backend::Sqlite => "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-500 days')",
    };
    db.execute(&format!(
        "UPDATE durable_state SET db_timestamp = {long_ago} WHERE persistence_id IN ({})",
        ids.join(", ")
    ));
}

/// A metrics recorder installed once for this test binary (metrics go to
/// one global recorder), and what it has seen.
pub fn metrics_snapshotter() -> &'static metrics_util::debugging::Snapshotter {
    static SNAPSHOTTER: OnceLock<metrics_util::debugging::Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().expect("the only recorder of this test binary");
        snapshotter
    })
}

/// A child process of this test binary doing one task (see `child::child_process`
/// in tests/it): how tests run the library in processes of their own, as
/// several instances of a service would.
pub struct ChildProcess {
    child: std::process::Child,
    pub stdout: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl ChildProcess {
    /// Starts `task` with `args` in a new process.
    pub fn start(task: &str, args: &[&str]) -> ChildProcess {
        let mut child = Process::new(std::env::current_exe().expect("the test binary"))
            .args([
                "--ignored",
                "--exact",
                "child::child_process",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("PERSIST_DURABLE_CHILD", task)
            .env("PERSIST_DURABLE_CHILD_ARGS", args.join("\u{1f}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("a child process starts");
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        ChildProcess { child, stdout }
    }

    /// What the child printed next from `marker` on (the test harness may
    /// print its own words before it on the same line), skipping other
    /// lines; `None` once it exited.
    pub fn line(&mut self, marker: &str) -> Option<String> {
        self.stdout
            .by_ref()
            .map_while(Result::ok)
            .find_map(|line| line.find(marker).map(|at| line[at..].to_owned()))
    }

    /// Waits for the child to exit; whether it exited successfully.
    pub fn wait(mut self) -> bool {
        self.child.wait().map(|status| status.success()).unwrap_or(false)
    }

    /// The child's process id, for signals.
    pub fn id(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
