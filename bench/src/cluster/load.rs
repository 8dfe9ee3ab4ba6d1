//! The client: workers that send adds and reads through random nodes over
//! HTTP, as an at-least-once client does: an add without an acknowledgement
//! is sent again, with the same event id, until one comes. Every attempt is
//! recorded ([`Op`]) for the check.

use std::collections::VecDeque;
use std::error::Error;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::counter::counter_name;
use super::history::{Answer, Kind, Op};
use super::http_client::Connections;

type AnyError = Box<dyn Error + Send + Sync>;

/// How long the workers wait for an answer before sending again elsewhere.
pub(crate) const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// The client's shared state; cloning is cheap.
#[derive(Clone)]
pub(crate) struct Load {
    shared: Arc<Shared>,
}

/// The running workers.
pub(crate) struct Workers(Vec<JoinHandle<()>>);

struct Shared {
    base: Instant,
    /// Each node's address, by index (a restarted node has a new one).
    addresses: RwLock<Vec<String>>,
    plan: Mutex<Plan>,
    history: Mutex<Vec<Op>>,
    read_share: f64,
}

/// What to send next, and what is outstanding.
struct Plan {
    counters: Vec<CounterPlan>,
    /// Adds to send again.
    resend: VecDeque<u64>,
    /// Every add by its sequence number: its counter and generation, and whether acknowledged.
    adds: Vec<(usize, u32, bool)>,
    acknowledged: u64,
    /// Operations not finished: in flight, or adds not yet acknowledged.
    pending: u64,
    stopping: bool,
}

#[derive(Default, Clone)]
struct CounterPlan {
    generation: u32,
    /// No new operation starts on it (a delete is coming).
    frozen: bool,
    pending: u64,
}

/// One operation to attempt.
#[derive(Debug, Clone, Copy)]
struct Job {
    counter: usize,
    generation: u32,
    kind: Kind,
}

enum Next {
    Job(Job),
    Wait,
    Done,
}

impl Plan {
    /// Counts a new operation on `counter` as pending.
    fn begin(&mut self, counter: usize, kind: Kind) -> Job {
        let generation = self.counters[counter].generation;
        let kind = match kind {
            Kind::Add(_) => {
                self.adds.push((counter, generation, false));
                Kind::Add(self.adds.len() as u64 - 1)
            }
            other => other,
        };
        self.counters[counter].pending += 1;
        self.pending += 1;
        Job {
            counter,
            generation,
            kind,
        }
    }

    fn next(&mut self, rng: &mut rand::rngs::StdRng, read_share: f64) -> Next {
        if let Some(seq) = self.resend.pop_front() {
            let (counter, generation, _) = self.adds[seq as usize];
            return Next::Job(Job {
                counter,
                generation,
                kind: Kind::Add(seq),
            });
        }
        if self.stopping {
            return if self.pending == 0 { Next::Done } else { Next::Wait };
        }
        let open: Vec<usize> = (0..self.counters.len()).filter(|c| !self.counters[*c].frozen).collect();
        if open.is_empty() {
            return Next::Wait;
        }
        let counter = open[rng.random_range(0..open.len())];
        let kind = if rng.random_bool(read_share) {
            Kind::Read
        } else {
            Kind::Add(0)
        };
        Next::Job(self.begin(counter, kind))
    }

    /// Takes `op`'s outcome into account; a failed add is queued to be sent
    /// again when `requeue`.
    fn settle(&mut self, op: &Op, requeue: bool) {
        let done = match op.kind {
            Kind::Add(seq) => {
                let acked = &mut self.adds[seq as usize].2;
                match op.answer {
                    Answer::Value(_) if !*acked => {
                        *acked = true;
                        self.acknowledged += 1;
                        true
                    }
                    Answer::Value(_) => false,
                    _ => {
                        if requeue && !*acked {
                            self.resend.push_back(seq);
                        }
                        false
                    }
                }
            }
            Kind::Read | Kind::Delete => true,
        };
        if done {
            self.counters[op.counter].pending -= 1;
            self.pending -= 1;
        }
    }
}

impl Load {
    /// Starts `window` workers over `counters` counters on the nodes at `addresses`.
    pub(crate) fn start(
        addresses: Vec<String>,
        counters: usize,
        window: usize,
        read_share: f64,
        seed: u64,
    ) -> (Load, Workers) {
        let load = Load {
            shared: Arc::new(Shared {
                base: Instant::now(),
                addresses: RwLock::new(addresses),
                plan: Mutex::new(Plan {
                    counters: vec![CounterPlan::default(); counters],
                    resend: VecDeque::new(),
                    adds: Vec::new(),
                    acknowledged: 0,
                    pending: 0,
                    stopping: false,
                }),
                history: Mutex::new(Vec::new()),
                read_share,
            }),
        };
        let workers = (0..window)
            .map(|index| {
                let load = load.clone();
                tokio::spawn(async move { load.work(seed.wrapping_add(index as u64)).await })
            })
            .collect();
        (load, Workers(workers))
    }

    fn plan(&self) -> MutexGuard<'_, Plan> {
        self.shared.plan.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn nodes(&self) -> usize {
        self.shared.addresses.read().map_or(0, |addresses| addresses.len())
    }

    /// Seconds since the run began, on the clock every operation is timed by.
    pub(crate) fn now(&self) -> f64 {
        self.shared.base.elapsed().as_secs_f64()
    }

    async fn work(&self, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut connections = Connections::default();
        loop {
            let next = self.plan().next(&mut rng, self.shared.read_share);
            let job = match next {
                Next::Job(job) => job,
                Next::Wait => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                Next::Done => return,
            };
            let node = rng.random_range(0..self.nodes());
            let op = self.attempt(&mut connections, node, job, ATTEMPT_TIMEOUT).await;
            let failed = op.value().is_none();
            self.record(op, true);
            if failed {
                // Not at once: the node may be down, or its slices moving.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// Sends `job` to `node` once and says what happened.
    async fn attempt(&self, connections: &mut Connections, node: usize, job: Job, timeout: Duration) -> Op {
        let address = self
            .shared
            .addresses
            .read()
            .map(|a| a[node].clone())
            .unwrap_or_default();
        let name = counter_name(job.counter);
        let (method, path, body) = match job.kind {
            Kind::Add(seq) => (
                "POST",
                format!("/counters/{name}/adds"),
                Some(json!({ "event_id": format!("add-{seq}") }).to_string()),
            ),
            Kind::Read => ("GET", format!("/counters/{name}"), None),
            Kind::Delete => (
                "DELETE",
                format!("/counters/{name}?event_id=delete-{}-{}", job.counter, job.generation),
                None,
            ),
        };
        let start = self.now();
        let sent = connections.send(&address, method, &path, body.as_deref().map(str::as_bytes));
        let answer = match tokio::time::timeout(timeout, sent).await {
            Ok(Ok(response)) => {
                let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
                match (response.status, body["value"].as_u64()) {
                    (200, Some(value)) => Answer::Value(value),
                    (status, _) => Answer::Refused {
                        status,
                        kind: body["kind"].as_str().unwrap_or("unreadable").to_owned(),
                    },
                }
            }
            Ok(Err(error)) => Answer::Nothing(format!("connection: {}", error.kind())),
            Err(_) => {
                // Its answer may still come, on that connection: not reused.
                connections.clear();
                Answer::Nothing("timeout".into())
            }
        };
        Op {
            counter: job.counter,
            generation: job.generation,
            kind: job.kind,
            node,
            start,
            end: self.now(),
            answer,
        }
    }

    fn record(&self, op: Op, requeue: bool) {
        self.plan().settle(&op, requeue);
        self.shared
            .history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(op);
    }

    /// Node `node` serves at `address` from now on.
    pub(crate) fn set_address(&self, node: usize, address: String) {
        if let Ok(mut addresses) = self.shared.addresses.write() {
            addresses[node] = address;
        }
    }

    /// Distinct adds acknowledged so far.
    pub(crate) fn acknowledged(&self) -> u64 {
        self.plan().acknowledged
    }

    /// A new add to `counter` through `via` (in turn) until one is acknowledged.
    pub(crate) async fn add_until_acknowledged(&self, counter: usize, via: &[usize]) -> Result<Op, AnyError> {
        let job = self.plan().begin(counter, Kind::Add(0));
        let mut connections = Connections::default();
        for attempt in 0..200 {
            let op = self
                .attempt(&mut connections, via[attempt % via.len()], job, ATTEMPT_TIMEOUT)
                .await;
            let acked = op.value().is_some();
            self.record(op.clone(), false);
            if acked {
                return Ok(op);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!("no node acknowledged an add to counter {counter} in 200 attempts").into())
    }

    /// A new add to `counter`, sent once to `node`, waiting up to `timeout`;
    /// if it fails, the workers send it again.
    pub(crate) async fn add_once(&self, counter: usize, node: usize, timeout: Duration) -> Op {
        let job = self.plan().begin(counter, Kind::Add(0));
        let op = self.attempt(&mut Connections::default(), node, job, timeout).await;
        self.record(op.clone(), true);
        op
    }

    /// A read of `counter` through `node`, waiting up to `timeout`.
    pub(crate) async fn read(&self, counter: usize, node: usize, timeout: Duration) -> Op {
        let job = self.plan().begin(counter, Kind::Read);
        let op = self.attempt(&mut Connections::default(), node, job, timeout).await;
        self.record(op.clone(), false);
        op
    }

    /// A read of `counter` through `node` until one is answered.
    pub(crate) async fn read_until_answered(&self, counter: usize, node: usize) -> Result<Op, AnyError> {
        for _ in 0..100 {
            let op = self.read(counter, node, ATTEMPT_TIMEOUT).await;
            if op.value().is_some() {
                return Ok(op);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!("node {node} answered no read of counter {counter} in 100 attempts").into())
    }

    /// Deletes `counter` through random nodes until acknowledged (a delete
    /// sent again carries the same event id), once nothing else is pending
    /// on it; its next generation starts then.
    pub(crate) async fn delete(&self, counter: usize, seed: u64) -> Result<(), AnyError> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let job = self.plan().begin(counter, Kind::Delete);
        let mut connections = Connections::default();
        for _ in 0..200 {
            let node = rng.random_range(0..self.nodes());
            let op = self.attempt(&mut connections, node, job, ATTEMPT_TIMEOUT).await;
            let deleted = op.value().is_some();
            if deleted {
                self.record(op, false);
                self.plan().counters[counter].generation += 1;
                return Ok(());
            }
            // Recorded without settling: the delete is still pending.
            self.shared
                .history
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(op);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!("no node acknowledged the delete of counter {counter} in 200 attempts").into())
    }

    /// No new operation starts on `counters` (sent-again adds still go).
    pub(crate) fn freeze(&self, counters: &[usize], frozen: bool) {
        let mut plan = self.plan();
        for counter in counters {
            plan.counters[*counter].frozen = frozen;
        }
    }

    /// Waits until nothing is pending on `counters`: every add to them acknowledged.
    pub(crate) async fn until_quiet(&self, counters: &[usize], within: Duration) -> Result<(), AnyError> {
        let started = Instant::now();
        while counters.iter().any(|c| self.plan().counters[*c].pending > 0) {
            if started.elapsed() > within {
                return Err(format!("counters {counters:?} still had operations pending after {within:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Stops starting operations, waits until every add is acknowledged and
    /// the workers are done, and returns the history.
    pub(crate) async fn finish(&self, workers: Workers, within: Duration) -> Result<(), AnyError> {
        self.plan().stopping = true;
        let all = futures_util::future::join_all(workers.0);
        tokio::time::timeout(within, all)
            .await
            .map_err(|_| format!("adds were still unacknowledged {within:?} after the load stopped"))?;
        Ok(())
    }

    /// Every attempt so far.
    pub(crate) fn history(&self) -> Vec<Op> {
        self.shared
            .history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}
