//! Proves with figures that every acknowledged command is in the database,
//! exactly once, whatever happens. PostgreSQL only.
//!
//! ```text
//! cargo run --release -p persist-durable-bench --bin reliability -- kill9     --database-url postgres://... --kills 20
//! cargo run --release -p persist-durable-bench --bin reliability -- outage    --database-url postgres://...
//! cargo run --release -p persist-durable-bench --bin reliability -- two-nodes --database-url postgres://...
//! cargo run --release -p persist-durable-bench --bin reliability -- cluster   --database-url postgres://...
//! ```
//!
//! The client runs the library in child processes (`serve`), which read
//! commands as JSON lines on stdin and write an acknowledgement to stdout
//! only after the library answered, i.e. after the commit. The client logs
//! acknowledgements, re-sends what was not acknowledged (with the same event
//! id, as an at-least-once consumer does) and finally compares with the
//! database: each user's revision must equal the number of its commands,
//! since every command changes state and none may be lost or applied twice.
//! Each scenario ends with one JSON line of figures.
//!
//! `cluster` runs three nodes in cluster mode as child processes serving
//! HTTP, and checks every answer for linearizability besides the stored
//! values (see `bench/src/cluster/mod.rs`).

use std::collections::{HashMap, VecDeque};
use std::error::Error;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Actor;
use clap::{Parser, Subcommand};
use diesel::sql_types::{BigInt, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use persist_durable::{
    Command, CommandError, Config, EntityKey, Event, EventId, PostgresStore, ProductId, StoreConfig, UserCommand,
    UserKey, UserStateManager,
};
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

#[path = "../cluster/mod.rs"]
mod cluster;

type AnyError = Box<dyn Error + Send + Sync>;

#[derive(Debug, Parser)]
struct Options {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Clone, clap::Args)]
struct Common {
    /// A PostgreSQL database of its own: it is truncated.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Distinct users.
    #[arg(long, default_value_t = 200)]
    users: usize,
    /// Commands to acknowledge in all.
    #[arg(long, default_value_t = 20_000)]
    commands: u64,
    /// Commands sent and not yet acknowledged, at most.
    #[arg(long, default_value_t = 64)]
    window: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Kill the serving process with SIGKILL at random moments, restart it, go on.
    Kill9 {
        #[command(flatten)]
        common: Common,
        /// SIGKILLs to survive.
        #[arg(long, default_value_t = 20)]
        kills: u32,
    },
    /// Stop PostgreSQL (fast, then immediate shutdown) under load and start it again.
    Outage {
        #[command(flatten)]
        common: Common,
        /// How long each outage lasts, in seconds.
        #[arg(long, default_value_t = 3.0)]
        outage_seconds: f64,
        /// The PostgreSQL cluster version; the newest in /etc/postgresql when absent.
        #[arg(long)]
        cluster_version: Option<String>,
    },
    /// Two serving processes get commands for the same users in random interleaving.
    TwoNodes {
        #[command(flatten)]
        common: Common,
    },
    /// Three nodes in cluster mode over HTTP: SIGKILL, SIGSTOP past the lease, graceful leave, deletes.
    Cluster(cluster::ClusterOptions),
    /// One node of the cluster scenario (used by it).
    ClusterNode(cluster::NodeOptions),
    /// Serve commands from stdin (used by the scenarios).
    Serve {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// The most one load or write may take, in milliseconds.
        #[arg(long, default_value_t = 2_000)]
        operation_timeout_ms: u64,
    },
}

/// One command on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Request {
    seq: u64,
    mall: String,
    user: String,
    event: Event,
}

/// One answer on the wire.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Ack {
    seq: u64,
    error: Option<String>,
    conflict: bool,
    /// Only in the last line a node writes when its input ends: the revision
    /// conflicts its store detected (and its actors resolved or reported).
    store_conflicts: Option<u64>,
}

fn main() -> Result<(), AnyError> {
    let options = Options::parse();
    let report = match options.scenario {
        Scenario::Serve {
            database_url,
            operation_timeout_ms,
        } => return actix::System::new().block_on(serve(database_url, operation_timeout_ms)),
        Scenario::Kill9 { common, kills } => runtime()?.block_on(kill9(common, kills))?,
        Scenario::Outage {
            common,
            outage_seconds,
            cluster_version,
        } => runtime()?.block_on(outage(common, outage_seconds, cluster_version))?,
        Scenario::TwoNodes { common } => runtime()?.block_on(two_nodes(common))?,
        Scenario::Cluster(options) => runtime()?.block_on(cluster::run(options))?,
        Scenario::ClusterNode(options) => {
            let system = actix::System::new();
            let served = system.block_on(cluster::serve_node(options));
            // Its blocking read of stdin may still run (SIGTERM ended it),
            // and dropping the runtime would wait for it: exit before.
            if let Err(error) = served {
                eprintln!("Error: {error:?}");
                std::process::exit(1);
            }
            std::process::exit(0);
        }
    };
    println!("{report}");
    if report["lost"] != json!(0) || report["applied_twice"] != json!(0) {
        return Err("acknowledged commands were lost or applied twice".into());
    }
    if report
        .get("violations")
        .is_some_and(|violations| violations != &json!(0))
    {
        return Err(format!("{} violations: {}", report["violations"], report["violation_examples"]).into());
    }
    Ok(())
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()
}

// ---------------------------------------------------------------- server

async fn serve(database_url: String, operation_timeout_ms: u64) -> Result<(), AnyError> {
    let timeout = Duration::from_millis(operation_timeout_ms);
    let config = StoreConfig::default()
        .with_connect_timeout(timeout)
        .with_operation_timeout(timeout);
    // The database may be down when we start (outage scenario): keep trying.
    let store = loop {
        match PostgresStore::connect_with(&database_url, config.clone()).await {
            Ok(store) => break store,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let store: persist_durable::SharedStore = Arc::new(store);
    let manager = UserStateManager::new(store.clone(), Config::default().with_event_id_memory(256)).start();
    let (acks, mut to_write) = mpsc::unbounded_channel::<Ack>();
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(ack) = to_write.recv().await {
            let mut line = serde_json::to_vec(&ack).unwrap_or_default();
            line.push(b'\n');
            if stdout.write_all(&line).await.is_err() || stdout.flush().await.is_err() {
                return;
            }
        }
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(request) = serde_json::from_str::<Request>(&line) else {
            continue;
        };
        let Ok(key) = UserKey::new(request.mall, request.user) else {
            continue;
        };
        let reply = manager.send(UserCommand::new(key, request.event));
        let acks = acks.clone();
        actix::spawn(async move {
            let ack = match reply.await {
                Ok(Ok(_)) => Ack {
                    seq: request.seq,
                    ..Ack::default()
                },
                Ok(Err(error)) => Ack {
                    seq: request.seq,
                    conflict: matches!(error, CommandError::Conflict { .. }),
                    error: Some(error.to_string()),
                    ..Ack::default()
                },
                Err(error) => Ack {
                    seq: request.seq,
                    error: Some(error.to_string()),
                    ..Ack::default()
                },
            };
            let _ = acks.send(ack);
        });
    }
    // Input ended: the client has every answer it waited for.
    let _ = acks.send(Ack {
        seq: u64::MAX,
        store_conflicts: Some(store.stats().conflicts),
        ..Ack::default()
    });
    drop(acks);
    let _ = writer.await;
    Ok(())
}

// ---------------------------------------------------------------- client

/// A serving child process.
struct Node {
    child: tokio::process::Child,
    /// Dropped to tell the node its input has ended.
    stdin: Option<tokio::process::ChildStdin>,
}

async fn start_node(url: &str, index: usize, acks: mpsc::UnboundedSender<(usize, Ack)>) -> Result<Node, AnyError> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["serve", "--database-url", url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let stdin = child.stdin.take().ok_or("no stdin")?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(ack) = serde_json::from_str::<Ack>(&line) {
                if acks.send((index, ack)).is_err() {
                    return;
                }
            }
        }
    });
    Ok(Node {
        child,
        stdin: Some(stdin),
    })
}

/// The commands to acknowledge, what is in flight where, and the figures.
struct Ledger {
    requests: Vec<Request>,
    users: Vec<UserKey>,
    /// Not yet sent, or to be sent again.
    to_send: VecDeque<u64>,
    /// Sent and not answered: seq → (node, when sent).
    in_flight: HashMap<u64, (usize, Instant)>,
    /// The longest any command waited for its error.
    slowest_error: Duration,
    acked: Vec<bool>,
    acknowledged: u64,
    errors: u64,
    conflicts: u64,
    resent: u64,
}

impl Ledger {
    fn new(common: &Common) -> Result<Self, AnyError> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(common.seed);
        let users: Vec<UserKey> = (0..common.users)
            .map(|i| UserKey::new(format!("mall-{}", i % 7), format!("user-{i}")))
            .collect::<Result<_, _>>()?;
        let requests = (0..common.commands)
            .map(|seq| {
                let user = &users[rng.random_range(0..users.len())];
                let command = match rng.random_range(0..4) {
                    0 => Command::UserLogin,
                    1 => Command::UseCart,
                    2 => Command::SetMarketingOptIn {
                        opt_in: rng.random_bool(0.5),
                    },
                    _ => Command::ViewProduct {
                        product_id: ProductId::new(format!("p{}", rng.random_range(0..50))).expect("valid id"),
                    },
                };
                Ok(Request {
                    seq,
                    mall: user.mall_id().to_owned(),
                    user: user.user_id().to_owned(),
                    event: Event::from(command).with_id(EventId::new(format!("event-{seq}"))?),
                })
            })
            .collect::<Result<Vec<_>, AnyError>>()?;
        Ok(Self {
            to_send: (0..common.commands).collect(),
            in_flight: HashMap::new(),
            acked: vec![false; requests.len()],
            requests,
            users,
            acknowledged: 0,
            errors: 0,
            conflicts: 0,
            resent: 0,
            slowest_error: Duration::ZERO,
        })
    }

    fn done(&self) -> bool {
        self.acknowledged == self.requests.len() as u64
    }

    /// Sends what the window allows to the node `pick` chooses.
    async fn fill(&mut self, nodes: &mut [Option<Node>], window: usize, mut pick: impl FnMut() -> usize) {
        while self.in_flight.len() < window {
            let Some(seq) = self.to_send.pop_front() else { return };
            let index = pick();
            let Some(stdin) = nodes[index].as_mut().and_then(|node| node.stdin.as_mut()) else {
                self.to_send.push_front(seq);
                return;
            };
            let mut line = serde_json::to_vec(&self.requests[seq as usize]).unwrap_or_default();
            line.push(b'\n');
            if stdin.write_all(&line).await.is_err() {
                self.to_send.push_front(seq);
                return;
            }
            self.in_flight.insert(seq, (index, Instant::now()));
        }
    }

    fn record(&mut self, ack: Ack) {
        let Some((_, sent)) = self.in_flight.remove(&ack.seq) else {
            return;
        };
        match ack.error {
            None => {
                if !self.acked[ack.seq as usize] {
                    self.acked[ack.seq as usize] = true;
                    self.acknowledged += 1;
                }
            }
            Some(_) => {
                self.slowest_error = self.slowest_error.max(sent.elapsed());
                self.errors += 1;
                self.conflicts += u64::from(ack.conflict);
                self.resent += 1;
                self.to_send.push_back(ack.seq);
            }
        }
    }

    /// A node died: what it had in flight is sent again later.
    fn node_lost(&mut self, index: usize) {
        let lost: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, (node, _))| *node == index)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in lost {
            self.in_flight.remove(&seq);
            self.resent += 1;
            self.to_send.push_front(seq);
        }
    }

    /// Acknowledged commands per user.
    fn acked_per_user(&self) -> HashMap<String, i64> {
        let mut counts = HashMap::new();
        for request in self.requests.iter().filter(|r| self.acked[r.seq as usize]) {
            if let Ok(key) = UserKey::new(request.mall.clone(), request.user.clone()) {
                *counts.entry(key.persistence_id().to_string()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Compares the acknowledgements with the stored revisions:
    /// (acknowledged commands missing, revisions beyond the commands sent).
    async fn check(&self, url: &str) -> Result<(i64, i64), AnyError> {
        let stored = stored_revisions(url).await?;
        let acked = self.acked_per_user();
        let mut sent = HashMap::new();
        for request in &self.requests {
            if let Ok(key) = UserKey::new(request.mall.clone(), request.user.clone()) {
                *sent.entry(key.persistence_id().to_string()).or_insert(0i64) += 1;
            }
        }
        let (mut lost, mut twice) = (0, 0);
        for user in &self.users {
            let id = user.persistence_id().to_string();
            let revision = stored.get(&id).copied().unwrap_or(0);
            lost += (acked.get(&id).copied().unwrap_or(0) - revision).max(0);
            twice += (revision - sent.get(&id).copied().unwrap_or(0)).max(0);
        }
        Ok((lost, twice))
    }
}

#[derive(diesel::QueryableByName)]
struct StoredRevision {
    #[diesel(sql_type = Text)]
    persistence_id: String,
    #[diesel(sql_type = BigInt)]
    revision: i64,
}

async fn stored_revisions(url: &str) -> Result<HashMap<String, i64>, AnyError> {
    let mut conn = AsyncPgConnection::establish(url).await?;
    let rows: Vec<StoredRevision> = diesel::sql_query("SELECT persistence_id, revision FROM durable_state")
        .load(&mut conn)
        .await?;
    Ok(rows.into_iter().map(|r| (r.persistence_id, r.revision)).collect())
}

async fn reset(url: &str) -> Result<(), AnyError> {
    drop(PostgresStore::connect(url).await?);
    let mut conn = AsyncPgConnection::establish(url).await?;
    conn.batch_execute("TRUNCATE durable_state").await?;
    Ok(())
}

/// Waits for one acknowledgement (or a short timeout) and records it.
async fn receive(ledger: &mut Ledger, acks: &mut mpsc::UnboundedReceiver<(usize, Ack)>) {
    if let Ok(Some((_, ack))) = tokio::time::timeout(Duration::from_millis(50), acks.recv()).await {
        ledger.record(ack);
        while let Ok((_, ack)) = acks.try_recv() {
            ledger.record(ack);
        }
    }
}

async fn kill9(common: Common, kills: u32) -> Result<serde_json::Value, AnyError> {
    reset(&common.database_url).await?;
    let mut ledger = Ledger::new(&common)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(common.seed + 1);
    let (ack_sender, mut acks) = mpsc::unbounded_channel();
    let mut nodes = vec![Some(start_node(&common.database_url, 0, ack_sender.clone()).await?)];
    let (mut killed, mut lost_at_kills) = (0, 0);
    let per_kill = common.commands / (u64::from(kills) + 1);
    let mut next_kill_at = per_kill / 2 + rng.random_range(0..per_kill.max(1));
    let started = Instant::now();
    while !ledger.done() {
        ledger.fill(&mut nodes, common.window, || 0).await;
        receive(&mut ledger, &mut acks).await;
        if killed < kills && ledger.acknowledged >= next_kill_at {
            if let Some(mut node) = nodes[0].take() {
                node.child.start_kill()?; // SIGKILL
                node.child.wait().await?;
            }
            killed += 1;
            // Acknowledgements already on their way were sent before the
            // kill, hence after their commit: they count.
            tokio::time::sleep(Duration::from_millis(20)).await;
            while let Ok((_, ack)) = acks.try_recv() {
                ledger.record(ack);
            }
            ledger.node_lost(0);
            lost_at_kills += ledger.check(&common.database_url).await?.0;
            next_kill_at = ledger.acknowledged + per_kill / 2 + rng.random_range(0..per_kill.max(1));
            nodes[0] = Some(start_node(&common.database_url, 0, ack_sender.clone()).await?);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(nodes);
    let (lost, twice) = ledger.check(&common.database_url).await?;
    Ok(json!({
        "scenario": "kill9",
        "commands_acknowledged": ledger.acknowledged,
        "kills_survived": killed,
        "lost": lost + lost_at_kills,
        "lost_at_kills": lost_at_kills,
        "applied_twice": twice,
        "resent": ledger.resent,
        "errors": ledger.errors,
        "seconds": seconds,
    }))
}

async fn outage(common: Common, outage_seconds: f64, version: Option<String>) -> Result<serde_json::Value, AnyError> {
    let version = match version {
        Some(version) => version,
        None => {
            let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")?
                .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect();
            versions.sort_by_key(|v| v.parse::<u32>().unwrap_or(0));
            versions.pop().ok_or("no PostgreSQL cluster in /etc/postgresql")?
        }
    };
    reset(&common.database_url).await?;
    let mut ledger = Ledger::new(&common)?;
    let (ack_sender, mut acks) = mpsc::unbounded_channel();
    let mut nodes = vec![Some(start_node(&common.database_url, 0, ack_sender.clone()).await?)];
    let started = Instant::now();
    let mut outages = Vec::new();
    for mode in ["fast", "immediate"] {
        // Load before the outage.
        let target = ledger.acknowledged + common.commands / 4;
        while ledger.acknowledged < target && !ledger.done() {
            ledger.fill(&mut nodes, common.window, || 0).await;
            receive(&mut ledger, &mut acks).await;
        }
        let errors_before = ledger.errors;
        ledger.slowest_error = Duration::ZERO;
        let stopped_at = Instant::now();
        pg_ctl(&version, &["stop", "-m", mode])?;
        // Load during the outage: every command must fail, and not hang.
        let until = Instant::now() + Duration::from_secs_f64(outage_seconds);
        let mut longest_silence = Duration::ZERO;
        let mut last_answer = Instant::now();
        while Instant::now() < until {
            ledger.fill(&mut nodes, common.window, || 0).await;
            let before = ledger.errors + ledger.acknowledged;
            receive(&mut ledger, &mut acks).await;
            if ledger.errors + ledger.acknowledged > before {
                last_answer = Instant::now();
            }
            longest_silence = longest_silence.max(last_answer.elapsed());
        }
        pg_ctl(&version, &["start"])?;
        let outage = stopped_at.elapsed();
        let restarted = Instant::now();
        let acked_at_restart = ledger.acknowledged;
        while ledger.acknowledged == acked_at_restart && restarted.elapsed() < Duration::from_secs(60) {
            ledger.fill(&mut nodes, common.window, || 0).await;
            receive(&mut ledger, &mut acks).await;
        }
        outages.push(json!({
            "shutdown": mode,
            "outage_seconds": outage.as_secs_f64(),
            "errors_during_outage": ledger.errors - errors_before,
            "longest_wait_for_an_answer_seconds": longest_silence.as_secs_f64(),
            "slowest_error_seconds": ledger.slowest_error.as_secs_f64(),
            "recovery_seconds": restarted.elapsed().as_secs_f64(),
        }));
    }
    while !ledger.done() {
        ledger.fill(&mut nodes, common.window, || 0).await;
        receive(&mut ledger, &mut acks).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(nodes);
    let (lost, twice) = ledger.check(&common.database_url).await?;
    Ok(json!({
        "scenario": "outage",
        "operation_timeout_seconds": 2.0,
        "commands_acknowledged": ledger.acknowledged,
        "outages_survived": outages.len(),
        "outages": outages,
        "errors": ledger.errors,
        "lost": lost,
        "applied_twice": twice,
        "seconds": seconds,
    }))
}

fn pg_ctl(version: &str, args: &[&str]) -> Result<(), AnyError> {
    let status = std::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", version, "main"])
        .args(args)
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("pg_ctlcluster {args:?} failed: {status}").into())
    }
}

async fn two_nodes(common: Common) -> Result<serde_json::Value, AnyError> {
    reset(&common.database_url).await?;
    let mut ledger = Ledger::new(&common)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(common.seed + 2);
    let (ack_sender, mut acks) = mpsc::unbounded_channel();
    let mut nodes = vec![
        Some(start_node(&common.database_url, 0, ack_sender.clone()).await?),
        Some(start_node(&common.database_url, 1, ack_sender.clone()).await?),
    ];
    let started = Instant::now();
    while !ledger.done() {
        ledger.fill(&mut nodes, common.window, || rng.random_range(0..2)).await;
        receive(&mut ledger, &mut acks).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    // Close both nodes' input; each answers with its store's conflict count.
    let mut conflicts = 0;
    let mut reported = 0;
    for node in nodes.iter_mut().flatten() {
        drop(node.stdin.take());
    }
    while reported < 2 {
        match tokio::time::timeout(Duration::from_secs(30), acks.recv()).await {
            Ok(Some((_, ack))) => {
                if let Some(count) = ack.store_conflicts {
                    conflicts += count;
                    reported += 1;
                }
            }
            _ => return Err("a node did not report its figures".into()),
        }
    }
    drop(nodes);
    let (lost, twice) = ledger.check(&common.database_url).await?;
    Ok(json!({
        "scenario": "two-nodes",
        "commands_acknowledged": ledger.acknowledged,
        "conflicts_reported_to_client": ledger.conflicts,
        "revision_conflicts_detected": conflicts,
        "errors": ledger.errors,
        "lost": lost,
        "applied_twice": twice,
        "seconds": seconds,
    }))
}
