//! The `cluster` scenario: three node processes in cluster mode on one
//! PostgreSQL database, a client sending adds and reads of counters through
//! random nodes over HTTP, and faults: a node killed with SIGKILL and
//! restarted, one stalled with SIGSTOP past its lease and resumed, one
//! leaving gracefully (SIGTERM) and coming back, counters deleted.
//!
//! It proves with figures that
//! - every answer is linearizable: a read counts at least the adds
//!   acknowledged before it started and at most those sent before it ended
//!   ([`history`]), so no node answered from a memory that missed a commit,
//!   a stalled node included, and reads after a delete answer 0 on every node;
//! - each counter's stored value is its number of distinct acknowledged adds
//!   (none lost, none applied twice), though unacknowledged adds were sent again;
//! - no commit was made by a node that did not own the slice at that moment
//!   ([`ownership`]'s audit): a stalled node's writes after its lease moved
//!   are fenced;
//! - the slices of a killed node have a live owner again within the lease
//!   plus one renewal (5 s at most with the defaults), and a graceful leave
//!   hands them over in about a second.

mod counter;
mod history;
mod http_client;
mod load;
mod node;
mod nodes;
mod ownership;

use std::collections::BTreeMap;
use std::error::Error;
use std::time::{Duration, Instant};

use persist_durable::EntityKey;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{json, Value};

use counter::{counter_name, CounterId};
use history::Answer;
use http_client::Connections;
use load::Load;
use nodes::NodeProcess;
use ownership::{Database, HeldRenewals};

pub(crate) use node::{serve as serve_node, NodeOptions};

type AnyError = Box<dyn Error + Send + Sync>;

/// The scenario's settings.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ClusterOptions {
    /// A PostgreSQL database of its own: it is truncated.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Counters.
    #[arg(long, default_value_t = 100)]
    counters: usize,
    /// Requests in flight at once (one per client worker).
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// The share of reads among new operations; the rest are adds.
    #[arg(long, default_value_t = 0.3)]
    read_share: f64,
    /// Fault rounds. Each kills a node and restarts it, deletes counters,
    /// stalls the next node past its lease, and has the third leave and
    /// come back.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of undisturbed load before each fault.
    #[arg(long, default_value_t = 8.0)]
    calm_seconds: f64,
    /// Counters deleted per round.
    #[arg(long, default_value_t = 3)]
    deletes: usize,
    /// Event ids each counter remembers (`Config::with_event_id_memory`).
    #[arg(long, default_value_t = 512)]
    event_id_memory: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

/// Slices in all.
const SLICES: u64 = persist_durable::SLICES as u64;

/// The most a killed node's slices may wait for a new owner with the
/// default lease (3 s) and renewal period (1 s).
const FAILOVER_BOUND_SECONDS: f64 = 5.0;

/// How long any step may take before the run is abandoned.
const STEP_LIMIT: Duration = Duration::from_secs(60);

/// Probed counters per stall.
const PROBES: usize = 6;

/// Reads of each probed counter waiting at a stalled node.
const READS_PER_PROBE: usize = 10;

/// How long renewals are held at the database after a stalled node resumes,
/// at most: well within the lease the other nodes renewed just before.
const RENEWALS_HELD: Duration = Duration::from_millis(500);

/// What the run waits for.
#[derive(Debug, Clone, Copy)]
enum Condition {
    /// Every node serves its share: every slice has a live owner, the nodes'
    /// own counts add up to all slices, none above `⌈1024 / 3⌉`.
    Balanced,
    /// Node `i` owns no slice, and the other nodes' own counts add up to all.
    MovedOff(usize),
}

struct Run {
    options: ClusterOptions,
    db: Database,
    nodes: Vec<Option<NodeProcess>>,
    load: Load,
    workers: Option<load::Workers>,
    /// For the nodes' `/stats`.
    connections: Connections,
    rng: rand::rngs::StdRng,
}

/// Runs the scenario and returns its figures.
pub(crate) async fn run(options: ClusterOptions) -> Result<Value, AnyError> {
    let started = Instant::now();
    let db = ownership::reset(&options.database_url).await?;
    let mut nodes = Vec::new();
    for name in NODES {
        nodes.push(Some(
            NodeProcess::start(&options.database_url, name, options.event_id_memory).await?,
        ));
    }
    let addresses = nodes.iter().flatten().map(|node| node.address.clone()).collect();
    let (load, workers) = Load::start(
        addresses,
        options.counters,
        options.window,
        options.read_share,
        options.seed,
    );
    let mut run = Run {
        rng: rand::rngs::StdRng::seed_from_u64(options.seed ^ 0x5eed),
        options,
        db,
        nodes,
        load,
        workers: Some(workers),
        connections: Connections::default(),
    };
    let balanced = run.until(Condition::Balanced, started).await?;
    let calm = Duration::from_secs_f64(run.options.calm_seconds);
    let mut faults = Faults::default();
    for round in 0..run.options.rounds {
        tokio::time::sleep(calm).await;
        faults.kills.push(run.kill_and_restart(round % 3).await?);
        tokio::time::sleep(calm).await;
        faults.deletes.push(run.delete_some(round as u64).await?);
        faults.stalls.push(run.stall((round + 1) % 3).await?);
        tokio::time::sleep(calm).await;
        faults.leaves.push(run.leave_and_return((round + 2) % 3).await?);
    }
    tokio::time::sleep(calm).await;
    run.finish(started, balanced, faults).await
}

/// What each fault measured, one JSON object per fault.
#[derive(Default)]
struct Faults {
    kills: Vec<Value>,
    stalls: Vec<Value>,
    leaves: Vec<Value>,
    deletes: Vec<Value>,
}

impl Run {
    fn name(index: usize) -> &'static str {
        NODES[index % NODES.len()]
    }

    /// Whether `condition` holds now.
    async fn holds(&mut self, condition: Condition) -> Result<bool, AnyError> {
        let except = match condition {
            Condition::Balanced => None,
            Condition::MovedOff(index) => Some(index),
        };
        let held_by = except.map_or("", Self::name);
        let (orphaned, held) = self.db.slices(held_by).await?;
        if orphaned > 0 || held > 0 {
            return Ok(false);
        }
        let mut owned = Vec::new();
        for (index, node) in self.nodes.iter().enumerate() {
            let Some(node) = node.as_ref().filter(|_| Some(index) != except) else {
                continue;
            };
            match nodes::stats(&mut self.connections, &node.address).await {
                Some(stats) => owned.push(stats["slices_owned"].as_u64().unwrap_or(0)),
                None => return Ok(false),
            }
        }
        let total: u64 = owned.iter().sum();
        Ok(match condition {
            Condition::Balanced => {
                owned.len() == NODES.len() && total == SLICES && owned.iter().all(|n| *n <= SLICES.div_ceil(3))
            }
            Condition::MovedOff(_) => total == SLICES,
        })
    }

    /// Waits until `condition` holds; returns the seconds since `since`.
    async fn until(&mut self, condition: Condition, since: Instant) -> Result<f64, AnyError> {
        while !self.holds(condition).await? {
            if since.elapsed() > STEP_LIMIT {
                return Err(format!("{condition:?} did not hold within {STEP_LIMIT:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(since.elapsed().as_secs_f64())
    }

    /// Starts node `index` again and waits until it serves its share.
    async fn restart(&mut self, index: usize) -> Result<f64, AnyError> {
        let restarting = Instant::now();
        let node = NodeProcess::start(
            &self.options.database_url,
            Self::name(index),
            self.options.event_id_memory,
        )
        .await?;
        self.load.set_address(index, node.address.clone());
        self.nodes[index] = Some(node);
        self.until(Condition::Balanced, restarting).await
    }

    fn take(&mut self, index: usize) -> Result<NodeProcess, AnyError> {
        self.nodes[index]
            .take()
            .ok_or_else(|| format!("node {} is not running", Self::name(index)).into())
    }

    /// SIGKILL of node `index`: how long its slices wait for a new owner;
    /// then it starts again and takes its share back.
    async fn kill_and_restart(&mut self, index: usize) -> Result<Value, AnyError> {
        let node = self.take(index)?;
        let acknowledged = self.load.acknowledged();
        let killed = Instant::now();
        node.kill().await?;
        let owned_again = self.until(Condition::MovedOff(index), killed).await?;
        tokio::time::sleep(Duration::from_secs_f64(self.options.calm_seconds / 2.0)).await;
        let rebalanced = self.restart(index).await?;
        Ok(json!({
            "node": Self::name(index),
            "adds_acknowledged_before": acknowledged,
            "slices_owned_again_seconds": owned_again,
            "restarted_and_rebalanced_seconds": rebalanced,
        }))
    }

    /// Deletes a few counters, each once nothing is in flight on it, and
    /// reads each through every node: all must answer 0.
    async fn delete_some(&mut self, round: u64) -> Result<Value, AnyError> {
        let mut counters: Vec<usize> = (0..self.options.counters).collect();
        counters.shuffle(&mut self.rng);
        counters.truncate(self.options.deletes);
        self.load.freeze(&counters, true);
        self.load.until_quiet(&counters, STEP_LIMIT).await?;
        let deleting = Instant::now();
        let (mut reads, mut not_erased) = (0, 0);
        for counter in &counters {
            self.load.delete(*counter, self.options.seed + round).await?;
            for node in 0..NODES.len() {
                let read = self.load.read_until_answered(*counter, node).await?;
                reads += 1;
                not_erased += u64::from(read.value() != Some(0));
            }
        }
        self.load.freeze(&counters, false);
        Ok(json!({
            "counters": counters,
            "reads_on_every_node": reads,
            "reads_not_erased": not_erased,
            "seconds": deleting.elapsed().as_secs_f64(),
        }))
    }

    /// SIGSTOP of node `index` until its slices have moved, then SIGCONT.
    ///
    /// Before the stall, counters of its slices are read through it (so it
    /// holds them in memory); once they moved, each gets an add through
    /// another node, then reads through the stalled node, which wait in its
    /// socket until it resumes. Renewals are held at the database until the
    /// reads are answered (0.5 s at most), so that it resumes believing it
    /// owns its slices: it must answer the reads with the new values (not
    /// from its memory, its lease having run out by its own clock), and
    /// commit nothing under its old epochs (the requests that waited for it
    /// include adds).
    async fn stall(&mut self, index: usize) -> Result<Value, AnyError> {
        let name = Self::name(index);
        let owned = self.db.owned_by(name).await?;
        let mut probes = Vec::new();
        for counter in 0..self.options.counters {
            let slice = CounterId::new(counter_name(counter))?.persistence_id().slice().index();
            if owned.contains(&slice) && probes.len() < PROBES {
                probes.push(counter);
            }
        }
        for counter in &probes {
            self.load.read_until_answered(*counter, index).await?;
        }
        let before = self.node_stats(index).await?;
        let node = self.nodes[index].as_ref().ok_or("the node to stall is not running")?;
        let stalled = Instant::now();
        node.stall()?;
        let stalled_at = self.db.now().await?;
        let moved = self.until(Condition::MovedOff(index), stalled).await?;

        let others: Vec<usize> = (0..NODES.len()).filter(|i| *i != index).collect();
        let mut floors = Vec::new();
        for counter in &probes {
            let acknowledged = self.load.add_until_acknowledged(*counter, &others).await?;
            floors.push(acknowledged.value().unwrap_or(0));
        }
        // Reads of each probed counter wait in its socket.
        let mut reads = Vec::new();
        for (counter, floor) in probes.iter().zip(&floors) {
            for _ in 0..READS_PER_PROBE {
                let (load, counter, floor) = (self.load.clone(), *counter, *floor);
                reads.push(tokio::spawn(async move {
                    (load.read(counter, index, STEP_LIMIT / 2).await, floor)
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Renewals wait at the database while it resumes: it believes it
        // owns its slices until the hold ends, or its reads are answered.
        let held = HeldRenewals::hold(&self.options.database_url).await?;
        let node = self.nodes[index].as_ref().ok_or("the stalled node is gone")?;
        node.resume()?;
        let resumed = Instant::now();
        let stalled_for = stalled.elapsed().as_secs_f64();
        let mut reads = Box::pin(futures_util::future::join_all(reads));
        let early = tokio::time::timeout(RENEWALS_HELD, &mut reads).await.ok();
        held.release().await?;
        let held_for = resumed.elapsed().as_secs_f64();
        let answered_while_held = early.is_some();
        let reads = match early {
            Some(reads) => reads,
            None => reads.await,
        };
        let (mut stale, mut answers) = (0, BTreeMap::new());
        for read in reads {
            let (read, floor) = read?;
            stale += u64::from(read.value().is_some_and(|value| value < floor));
            *answers.entry(format!("read: {}", outcome(&read.answer))).or_insert(0) += 1;
        }
        // Then an add of each through it, as it takes its share back.
        for counter in &probes {
            let add = self.load.add_once(*counter, index, STEP_LIMIT / 2).await;
            *answers.entry(format!("add: {}", outcome(&add.answer))).or_insert(0) += 1;
        }
        let rejoined = self.until(Condition::Balanced, resumed).await?;
        let after = self.node_stats(index).await?;
        let delta = |field: &str| {
            let count = |stats: &Value| stats[field].as_u64().unwrap_or(0);
            count(&after).saturating_sub(count(&before))
        };
        Ok(json!({
            "node": name,
            "stalled_seconds": stalled_for,
            "slices_moved_seconds": moved,
            "rejoined_and_rebalanced_seconds": rejoined,
            "leases_lost": delta("leases_lost"),
            "writes_fenced": delta("writes_fenced"),
            "commits_after_its_lease_moved": self.db.commits_by_non_owners(Some((name, stalled_at))).await?,
            "renewals_held_after_resuming_seconds": held_for,
            "probe_reads_all_answered_while_held": answered_while_held,
            "probe_reads_stale": stale,
            "probe_answers": answers,
        }))
    }

    async fn node_stats(&mut self, index: usize) -> Result<Value, AnyError> {
        let address = self.nodes[index]
            .as_ref()
            .map(|node| node.address.clone())
            .unwrap_or_default();
        nodes::stats(&mut self.connections, &address)
            .await
            .ok_or_else(|| format!("node {} did not answer /stats", Self::name(index)).into())
    }

    /// SIGTERM of node `index`: it leaves gracefully; how long until the
    /// others serve its slices. Then it comes back.
    async fn leave_and_return(&mut self, index: usize) -> Result<Value, AnyError> {
        let node = self.take(index)?;
        let leaving = Instant::now();
        let left = tokio::spawn(node.terminate());
        let handed_over = self.until(Condition::MovedOff(index), leaving).await?;
        let leave_call = left.await??;
        tokio::time::sleep(Duration::from_secs_f64(self.options.calm_seconds / 2.0)).await;
        let rebalanced = self.restart(index).await?;
        Ok(json!({
            "node": Self::name(index),
            "handed_over_seconds": handed_over,
            "leave_call_seconds": leave_call,
            "restarted_and_rebalanced_seconds": rebalanced,
        }))
    }

    /// Drains the load, reads every counter through every node, checks the
    /// history and the database, and stops the nodes.
    async fn finish(mut self, started: Instant, balanced: f64, faults: Faults) -> Result<Value, AnyError> {
        let Faults {
            kills,
            stalls,
            leaves,
            deletes,
        } = faults;
        let load = self.load.clone();
        let workers = self.workers.take().ok_or("the load has already finished")?;
        load.finish(workers, STEP_LIMIT).await?;
        let load_seconds = started.elapsed().as_secs_f64();
        for counter in 0..self.options.counters {
            for node in 0..NODES.len() {
                load.read_until_answered(counter, node).await?;
            }
        }
        let history = load.history();
        let verdict = history::check(&history);

        let stored = self.db.stored_values().await?;
        let (mut lost, mut twice) = (0, 0);
        for counter in 0..self.options.counters {
            let id = CounterId::new(counter_name(counter))?.persistence_id().to_string();
            let value = stored.get(&id).copied().unwrap_or(0);
            let acknowledged = verdict.acknowledged_by_counter.get(&counter).copied().unwrap_or(0);
            lost += acknowledged.saturating_sub(value);
            twice += value.saturating_sub(acknowledged);
        }
        let misfits = self.db.commits_by_non_owners(None).await?;
        let mut examples = verdict.examples.clone();
        examples.extend(self.db.misfits().await?);
        let commits = self.db.commits().await?;

        let mut final_leaves = Vec::new();
        for node in self.nodes.iter_mut().filter_map(Option::take) {
            final_leaves.push(node.close().await?);
        }
        self.db.drop_audit().await?;

        let most =
            |items: &[Value], field: &str| items.iter().filter_map(|item| item[field].as_f64()).fold(0.0, f64::max);
        let slow_failovers = kills
            .iter()
            .filter(|kill| kill["slices_owned_again_seconds"].as_f64().unwrap_or(f64::MAX) > FAILOVER_BOUND_SECONDS)
            .count() as u64;
        let violations = lost + twice + verdict.stale + verdict.beyond + misfits + slow_failovers;
        let reads_answered = history
            .iter()
            .filter(|op| op.kind == history::Kind::Read && op.value().is_some())
            .count();
        Ok(json!({
            "scenario": "cluster",
            "nodes": NODES.len(),
            "counters": self.options.counters,
            "adds_acknowledged": verdict.adds_acknowledged,
            "reads_answered": reads_answered,
            "answers_checked": verdict.answers_checked,
            "lost": lost,
            "applied_twice": twice,
            "stale_answers": verdict.stale,
            "answers_beyond_the_adds_sent": verdict.beyond,
            "commits_by_a_node_not_owning_the_slice": misfits,
            "commits_audited": commits,
            "failovers_over_5_s": slow_failovers,
            "violations": violations,
            "violation_examples": examples,
            "slowest_failover_seconds": most(&kills, "slices_owned_again_seconds"),
            "slowest_stall_failover_seconds": most(&stalls, "slices_moved_seconds"),
            "slowest_hand_over_seconds": most(&leaves, "handed_over_seconds"),
            "kills": kills,
            "stalls": stalls,
            "leaves": leaves,
            "deletes": deletes,
            "adds_resent": verdict.adds_resent,
            "most_adds_during_a_resend": verdict.most_adds_during_a_resend,
            "event_id_memory": self.options.event_id_memory,
            "errors": errors(&history),
            "first_balanced_seconds": balanced,
            "final_leave_seconds": final_leaves,
            "load_seconds": load_seconds,
            "seconds": started.elapsed().as_secs_f64(),
        }))
    }
}

/// The attempts that got no value, by what they got.
fn errors(history: &[history::Op]) -> BTreeMap<String, u64> {
    let mut errors = BTreeMap::new();
    for op in history.iter().filter(|op| op.value().is_none()) {
        *errors.entry(outcome(&op.answer)).or_insert(0) += 1;
    }
    errors
}

/// An answer, in a word or two: `value`, `421 not_owner`, `no answer: timeout`.
fn outcome(answer: &Answer) -> String {
    match answer {
        Answer::Value(_) => "value".into(),
        Answer::Refused { status, kind } => format!("{status} {kind}"),
        Answer::Nothing(reason) => format!("no answer: {reason}"),
    }
}
