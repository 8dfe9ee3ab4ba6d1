//! Load generator: drives a `UserStateManager` the way a keyed event feed
//! would, or the naive service a team would write without actors, and ends
//! by printing one JSON line with the results.
//!
//! ```text
//! cargo run --release -p persist-durable-bench --bin loadtest -- --help
//! cargo run --release -p persist-durable-bench --bin loadtest -- --database-url postgres://... --truncate
//! cargo run --release -p persist-durable-bench --bin loadtest -- --mode naive --database-url postgres://... --truncate
//! cargo run --release -p persist-durable-bench --bin loadtest -- --mode resident --users 1000000
//! cargo run --release -p persist-durable-bench --bin loadtest -- --mode restore --users 100000 --database-url postgres://...
//! ```
//!
//! Modes:
//! - `actors`: commands through the library (group commit, coalescing).
//! - `naive`: per command, one transaction that reads the row (`FOR UPDATE`),
//!   applies the same pure transition and writes it back, with the same pool
//!   size and concurrency (PostgreSQL only).
//! - `resident`: activates `--users` users and reports resident memory per user.
//! - `restore`: seeds `--users` users, then activates them all in a fresh
//!   manager and store, reporting users restored per second.
//!
//! The `actors` and `naive` lines report `cpu_us_per_command`: this process's
//! user + system CPU time during the run (`getrusage`), divided by the
//! commands. For `actors` that is the load generator plus the library; the
//! database's CPU is not in it. `context_switches_per_command` counts the
//! process's context switches the same way: the price of hand-offs between
//! threads that went idle.

use std::error::Error;
use std::future::Future;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use diesel_async::pooled_connection::deadpool::Pool;
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use persist_durable::{
    Command, Config, PostgresStore, ProductId, SharedStore, SqliteStore, StoreConfig, UserKey, UserStates,
};
use rand::{RngExt, SeedableRng};
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Actors,
    Naive,
    Resident,
    Restore,
}

#[derive(Debug, Parser)]
#[command(about = "Load generator for persist-durable")]
struct Options {
    /// What to measure.
    #[arg(long, value_enum, default_value = "actors")]
    mode: Mode,
    /// Distinct users.
    #[arg(long, default_value_t = 100_000)]
    users: usize,
    /// Commands to send (actors and naive modes).
    #[arg(long, default_value_t = 1_000_000)]
    commands: u64,
    /// Zipf exponent of the user choice; 0 picks users uniformly.
    #[arg(long, default_value_t = 0.0)]
    skew: f64,
    /// Commands in flight at once.
    #[arg(long, default_value_t = 512)]
    concurrency: usize,
    /// Send at this many commands per second (open loop; latency counts from
    /// each command's scheduled time); as fast as possible when absent.
    #[arg(long)]
    rate: Option<f64>,
    /// PostgreSQL URL, or a SQLite file path; a temporary SQLite file when absent.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Percentages of ViewProduct, UserLogin, UseCart, SetMarketingOptIn, GetUserState.
    #[arg(long, default_value = "60,20,10,5,5")]
    mix: String,
    /// Empty the durable_state table first (use a database of its own).
    #[arg(long)]
    truncate: bool,
    /// Database connections (both modes).
    #[arg(long, default_value_t = 8)]
    pool_size: usize,
    /// Group commit: most rows per statement.
    #[arg(long, default_value_t = 512)]
    batch_size: usize,
    /// Group commit: most microseconds a batch waits for more rows.
    #[arg(long, default_value_t = 1000)]
    batch_wait_us: u64,
    /// Group commit: write statements in flight.
    #[arg(long, default_value_t = 6)]
    batches_in_flight: usize,
    /// Restore statements in flight (StoreConfig::with_max_restores_in_flight);
    /// default: the library's.
    #[arg(long)]
    restores_in_flight: Option<usize>,
    /// Record the change feed (StoreConfig::with_change_feed), to measure its cost.
    #[arg(long)]
    change_feed: bool,
    /// Manager shards, each on an arbiter of its own with its user actors;
    /// default: one per core (Config::arbiters).
    #[arg(long)]
    arbiters: Option<usize>,
    /// Worker threads of the store's runtime; default: the library's (StoreConfig::worker_threads).
    #[arg(long)]
    store_threads: Option<usize>,
    /// Declare this process the only writer (Config::with_exclusive_writer):
    /// reads and no-ops are answered from memory instead of checked against
    /// the stored revision, to measure what that check costs.
    #[arg(long)]
    exclusive_writer: bool,
    /// Cluster mode (PostgreSQL): join a cluster of this one node (it owns
    /// every slice) before starting, so every write is fenced and reads are
    /// answered from memory under the lease: what fencing costs against
    /// the exclusive writer, and what it recovers of the default mode's checks.
    #[arg(long)]
    cluster: bool,
    /// Random seed, so runs can be repeated.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

/// The application's allocator, for both modes alike: glibc's malloc spends a
/// quarter of the CPU here on frees across threads (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type AnyError = Box<dyn Error + Send + Sync>;

fn main() -> Result<(), AnyError> {
    let options = Options::parse();
    let backend = if options
        .database_url
        .as_deref()
        .is_some_and(|u| u.starts_with("postgres"))
    {
        "postgres"
    } else {
        "sqlite"
    };
    let temp_dir = tempfile::tempdir()?;
    let location = match &options.database_url {
        Some(url) => url.clone(),
        None => temp_dir.path().join("loadtest.db").to_string_lossy().into_owned(),
    };
    if options.truncate && backend == "postgres" {
        truncate(&location)?;
    }
    let report = match options.mode {
        Mode::Naive if backend != "postgres" => return Err("naive mode needs a PostgreSQL --database-url".into()),
        Mode::Naive => run_naive(&options, &location)?,
        Mode::Actors => actix::System::new().block_on(run_actors(&options, &location, backend))?,
        Mode::Resident => actix::System::new().block_on(run_resident(&options, &location, backend))?,
        Mode::Restore => actix::System::new().block_on(run_restore(&options, &location, backend))?,
    };
    let mut report = report;
    report["mode"] = json!(format!("{:?}", options.mode).to_lowercase());
    report["backend"] = json!(backend);
    report["users"] = json!(options.users);
    report["skew"] = json!(options.skew);
    report["concurrency"] = json!(options.concurrency);
    report["rate"] = json!(options.rate);
    report["change_feed"] = json!(options.change_feed);
    report["peak_rss_bytes"] = json!(peak_rss_bytes());
    println!("{report}");
    Ok(())
}

fn store_config(options: &Options) -> StoreConfig {
    StoreConfig::default()
        .with_pool_size(options.pool_size)
        .with_max_batch_size(options.batch_size)
        .with_max_batch_wait(Duration::from_micros(options.batch_wait_us))
        .with_max_write_batches_in_flight(options.batches_in_flight)
        .with_max_restores_in_flight(
            options
                .restores_in_flight
                .unwrap_or(StoreConfig::default().max_restores_in_flight),
        )
        .with_worker_threads(options.store_threads.unwrap_or(StoreConfig::default().worker_threads))
        .with_operation_timeout(Duration::from_secs(60))
        .with_change_feed(options.change_feed)
}

async fn open_store(options: &Options, location: &str, backend: &str) -> Result<SharedStore, AnyError> {
    Ok(if backend == "postgres" {
        Arc::new(PostgresStore::connect_with(location, store_config(options)).await?)
    } else {
        Arc::new(SqliteStore::open_with(location, store_config(options).with_pool_size(4)).await?)
    })
}

fn manager_config(options: &Options) -> Config {
    // Every user stays resident and nothing is refused: the load is the measure.
    let mut config = Config::default()
        .with_max_resident(options.users.max(1))
        .with_max_commands_in_flight(options.concurrency.max(1) * 2);
    if options.exclusive_writer {
        config = config.with_exclusive_writer();
    }
    match options.arbiters {
        Some(arbiters) => config.with_arbiters(arbiters),
        None => config,
    }
}

/// The users, the products, and the random choice of both.
struct Workload {
    keys: Vec<UserKey>,
    products: Vec<ProductId>,
    zipf: Option<rand_distr::Zipf<f64>>,
    mix: [u32; 5],
    rng: rand::rngs::StdRng,
}

impl Workload {
    fn new(options: &Options) -> Result<Self, AnyError> {
        let keys = (0..options.users)
            .map(|i| UserKey::new(format!("mall{:03}", i % 100), format!("user{i:07}")))
            .collect::<Result<Vec<_>, _>>()?;
        let products = (0..1_000)
            .map(|i| ProductId::new(format!("product{i:04}")))
            .collect::<Result<Vec<_>, _>>()?;
        let zipf = if options.skew > 0.0 {
            Some(rand_distr::Zipf::new(options.users as f64, options.skew)?)
        } else {
            None
        };
        let parts: Vec<u32> = options
            .mix
            .split(',')
            .map(|p| p.trim().parse())
            .collect::<Result<_, _>>()?;
        let mix: [u32; 5] = parts.try_into().map_err(|_| "--mix takes five percentages")?;
        Ok(Self {
            keys,
            products,
            zipf,
            mix,
            rng: rand::rngs::StdRng::seed_from_u64(options.seed),
        })
    }

    fn next(&mut self) -> (UserKey, Command) {
        let user = match &self.zipf {
            Some(zipf) => (self.rng.sample(zipf) as usize)
                .saturating_sub(1)
                .min(self.keys.len() - 1),
            None => self.rng.random_range(0..self.keys.len()),
        };
        let total: u32 = self.mix.iter().sum();
        let mut pick = self.rng.random_range(0..total.max(1));
        let mut kind = 0;
        while kind < 4 && pick >= self.mix[kind] {
            pick -= self.mix[kind];
            kind += 1;
        }
        let command = match kind {
            0 => Command::ViewProduct {
                product_id: self.products[self.rng.random_range(0..self.products.len())].clone(),
            },
            1 => Command::UserLogin,
            2 => Command::UseCart,
            3 => Command::SetMarketingOptIn {
                opt_in: self.rng.random_bool(0.5),
            },
            _ => Command::GetUserState,
        };
        (self.keys[user].clone(), command)
    }
}

/// Sends `count` commands with at most `concurrency` in flight and measures them.
async fn drive<F, Fut>(
    workload: &mut Workload,
    count: u64,
    concurrency: usize,
    rate: Option<f64>,
    execute: F,
) -> serde_json::Value
where
    F: Fn(UserKey, Command) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut latencies = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds");
    let (mut done, mut errors, mut first_error) = (0u64, 0u64, None);
    let progress = std::io::stderr().is_terminal();
    let (cpu_before, generator_before) = (process_cpu_seconds(), thread_cpu_seconds());
    let switches_before = process_context_switches();
    let started = Instant::now();
    let mut last_report = started;
    let scheduled = move |i: u64| rate.map(|rate| started + Duration::from_secs_f64(i as f64 / rate));
    let requests = futures_util::stream::iter(0..count)
        .then(move |i| async move {
            if let Some(at) = scheduled(i) {
                tokio::time::sleep_until(at.into()).await;
            }
            i
        })
        .map(|i| {
            let (key, command) = workload.next();
            let sent = scheduled(i).unwrap_or_else(Instant::now);
            let work = execute(key, command);
            async move { (work.await, sent.elapsed()) }
        });
    let mut replies = std::pin::pin!(requests.buffer_unordered(concurrency));
    while let Some((result, latency)) = replies.next().await {
        done += 1;
        let _ = latencies.record(latency.as_micros().max(1) as u64);
        if let Err(error) = result {
            errors += 1;
            first_error.get_or_insert(error);
        }
        if progress && last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            let rate = done as f64 / started.elapsed().as_secs_f64();
            eprint!("\r{done}/{count} commands, {rate:.0}/s, {errors} errors   ");
        }
    }
    if progress {
        eprintln!();
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = process_cpu_seconds() - cpu_before;
    // This thread only generates load and measures (the library's shards and
    // store run on threads of their own): the rest of the process is the library.
    let generator_cpu_seconds = thread_cpu_seconds() - generator_before;
    let context_switches = process_context_switches() - switches_before;
    let per_command = |seconds: f64| seconds * 1e6 / done.max(1) as f64;
    let ms = |q: f64| latencies.value_at_quantile(q) as f64 / 1000.0;
    json!({
        "commands": done,
        "cpu_seconds": cpu_seconds,
        "cpu_us_per_command": per_command(cpu_seconds),
        "generator_cpu_us_per_command": per_command(generator_cpu_seconds),
        "library_cpu_us_per_command": per_command(cpu_seconds - generator_cpu_seconds),
        "context_switches_per_command": context_switches as f64 / done.max(1) as f64,
        "errors": errors,
        "first_error": first_error,
        "seconds": seconds,
        "commands_per_sec": done as f64 / seconds,
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "p999_ms": ms(0.999),
    })
}

async fn run_actors(options: &Options, location: &str, backend: &str) -> Result<serde_json::Value, AnyError> {
    let store = open_store(options, location, backend).await?;
    let cluster = if options.cluster {
        let config = persist_durable::ClusterConfig::new("loadtest", "http://127.0.0.1:1");
        Some(persist_durable::Cluster::join(store.clone(), config).await?)
    } else {
        None
    };
    let config = match &cluster {
        Some(cluster) => manager_config(options).with_cluster(cluster.clone()),
        None => manager_config(options),
    };
    let started = Instant::now();
    // The typed handle: it picks each user's shard in this thread.
    let users = UserStates::start(store.clone(), config);
    let mut workload = Workload::new(options)?;
    let mut report = drive(
        &mut workload,
        options.commands,
        options.concurrency,
        options.rate,
        |key, command| {
            let users = users.clone();
            async move {
                users
                    .send(key, command)
                    .await
                    .map(drop)
                    .map_err(|error| error.to_string())
            }
        },
    )
    .await;
    let stats = users.stats().await?;
    let store_stats = store.stats();
    report["resident_entities"] = json!(stats.resident_entities);
    report["write_statements"] = json!(store_stats.write_statements);
    report["rows_written"] = json!(store_stats.rows_written);
    report["conflicts"] = json!(store_stats.conflicts);
    report["load_statements"] = json!(store_stats.load_statements);
    report["exclusive_writer"] = json!(options.exclusive_writer);
    report["cluster"] = json!(options.cluster);
    if let Some(cluster) = cluster {
        // The lease's traffic: one renewal (and one read) per node per period, whatever it owns.
        let stats = cluster.stats();
        report["cluster_renewals_per_sec"] = json!(stats.renewals as f64 / started.elapsed().as_secs_f64());
        report["cluster_slices_owned"] = json!(stats.slices_owned);
        report["cluster_writes_fenced"] = json!(stats.writes_fenced);
        cluster.leave().await?;
    }
    Ok(report)
}

#[path = "../shared/cpu.rs"]
mod cpu;
#[path = "../shared/naive.rs"]
mod naive;

use cpu::{process_context_switches, process_cpu_seconds, thread_cpu_seconds};
use naive::naive_command;

fn run_naive(options: &Options, url: &str) -> Result<serde_json::Value, AnyError> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        // The library's migrations create the table; the naive service uses it as is.
        drop(PostgresStore::connect_with(url, store_config(options)).await?);
        let pool = Pool::builder(AsyncDieselConnectionManager::<AsyncPgConnection>::new(url))
            .max_size(options.pool_size)
            .build()?;
        let mut workload = Workload::new(options)?;
        let report = drive(
            &mut workload,
            options.commands,
            options.concurrency,
            options.rate,
            |key, command| {
                let task = tokio::spawn(naive_command(pool.clone(), key, command));
                async move { task.await.map_err(|e| e.to_string())?.map(drop) }
            },
        )
        .await;
        let mut report = report;
        // The naive service keeps nothing resident.
        report["resident_entities"] = json!(0);
        Ok::<_, AnyError>(report)
    })
}

/// Activates every user (a read each) with bounded concurrency; returns the seconds taken.
async fn activate_all(users: &UserStates, keys: &[UserKey], concurrency: usize) -> Result<f64, AnyError> {
    let started = Instant::now();
    let mut replies = futures_util::stream::iter(keys.iter().cloned())
        .map(|key| users.send(key, Command::GetUserState))
        .buffer_unordered(concurrency);
    while let Some(reply) = replies.next().await {
        reply?;
    }
    Ok(started.elapsed().as_secs_f64())
}

async fn run_resident(options: &Options, location: &str, backend: &str) -> Result<serde_json::Value, AnyError> {
    let store = open_store(options, location, backend).await?;
    let users = UserStates::start(store, manager_config(options));
    let keys = Workload::new(options)?.keys;
    let before = current_rss_bytes();
    let seconds = activate_all(&users, &keys, options.concurrency).await?;
    let after = current_rss_bytes();
    let resident = users.stats().await?.resident_entities;
    // The keys are held by the workload too; count them once, as the manager's.
    Ok(json!({
        "seconds": seconds,
        "resident_entities": resident,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "bytes_per_resident_user": (after.saturating_sub(before)) as f64 / resident.max(1) as f64,
    }))
}

async fn run_restore(options: &Options, location: &str, backend: &str) -> Result<serde_json::Value, AnyError> {
    let keys = Workload::new(options)?.keys;
    {
        // Seed: every user logs in once.
        let store = open_store(options, location, backend).await?;
        let users = UserStates::start(store, manager_config(options));
        let mut seeded = futures_util::stream::iter(keys.iter().cloned())
            .map(|key| users.send(key, Command::UserLogin))
            .buffer_unordered(options.concurrency);
        while let Some(reply) = seeded.next().await {
            reply?;
        }
    }
    // A fresh store and manager, as after a restart.
    let store = open_store(options, location, backend).await?;
    let users = UserStates::start(store.clone(), manager_config(options));
    let seconds = activate_all(&users, &keys, options.concurrency).await?;
    let stats = store.stats();
    Ok(json!({
        "seconds": seconds,
        "users_restored_per_sec": keys.len() as f64 / seconds,
        "resident_entities": users.stats().await?.resident_entities,
        "load_statements": stats.load_statements,
        "entities_loaded": stats.entities_loaded,
    }))
}

fn truncate(url: &str) -> Result<(), AnyError> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        drop(PostgresStore::connect(url).await?);
        let mut conn = AsyncPgConnection::establish(url).await?;
        conn.batch_execute("TRUNCATE durable_state").await?;
        Ok(())
    })
}

fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with(field))
                .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn peak_rss_bytes() -> u64 {
    proc_status_kib("VmHWM:") * 1024
}

fn current_rss_bytes() -> u64 {
    proc_status_kib("VmRSS:") * 1024
}
