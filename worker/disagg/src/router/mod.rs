//! Choosing a worker for a request: the frontend's decode-worker router and
//! the decode worker's prefill-worker picker.
//!
//! Both are a [`Router`]: a set of workers, a [`PrefixIndex`] of the blocks
//! each holds (fed by their [`KvEvent`] streams), and a load estimate per
//! worker. Only the policy differs.
//!
//! # Load estimate
//!
//! A worker's load is counted in KV blocks:
//!
//! ```text
//! load = max(0, reported_active_blocks + routed_blocks_since_report - finished_blocks_since_report)
//! ```
//!
//! `reported_active_blocks` is the worker's last load report
//! ([`Router::report_load`]); the router's own accounting ([`Router::route`]
//! adds, [`Router::finish`] subtracts) covers what happened since, so a burst of
//! requests arriving between two reports does not all land on the worker that
//! looked idle. A report replaces the running sum (it already includes what was
//! routed before it), which also heals a request whose `finish` was never called.
//! The price: a request routed after the worker took its snapshot but before
//! the report arrived is missing until the next report. With reports every
//! few hundred milliseconds that is a handful of requests; the shared-prefix
//! test (`tests/router_kv.rs`) checks the spread with reports three requests stale.
//!
//! A decode request adds all its prompt blocks: each sequence's decode step
//! attends over its whole context, shared prefix or not, so that is the cost it
//! puts on the worker. A prefill request adds only the blocks the chosen prefill
//! worker must compute (those it does not already hold).
//!
//! # Policies
//!
//! - [`RouterMode::Kv`]: for each candidate
//!
//!   ```text
//!   cost = prefill_block_weight × (prompt_blocks − overlap_blocks) + load
//!   ```
//!
//!   where `prompt_blocks` counts the prompt's blocks (a partial last block
//!   included: it is always computed) and `overlap_blocks` is how many leading
//!   full blocks the worker holds. Lowest cost wins; equal costs go to the lower
//!   load, then to a uniformly random one. Never to the first by name or
//!   index: with many equal workers that is how one of them gets every request.
//!
//!   With the default `prefill_block_weight` of 1.0, a cached prefix of `P`
//!   blocks is worth `P` blocks of load: requests sharing a hot prefix stay on
//!   the worker holding it until it is `P` blocks busier than a cold one, then
//!   spill over (and the newcomer caches the prefix too). This bounds
//!   hot-spotting while still reusing the cache. Raise the weight when prefill
//!   is dear relative to decode (long prompts, a slow prefill path); lower it
//!   when decode capacity is the bottleneck.
//! - [`RouterMode::RoundRobin`]: workers in turn, in the order they joined.
//! - [`RouterMode::Random`]: uniformly random.
//! - Prefill picking ([`Router::new_prefill_picker`]): the least loaded worker
//!   (load = prefill blocks in flight), prefix overlap breaking ties (prefer
//!   the one that has less to compute), then random.

mod index;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use index::PrefixIndex;
pub use tandem_api::args::{RouterMode, UnknownRouterMode};
use tandem_engine::block_manager::KvEvent;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("KV block size must be at least 1 token")]
    ZeroBlockSize,
    #[error("prefill block weight must be a finite number ≥ 0, got {0}")]
    InvalidPrefillWeight(f64),
    #[error("unknown worker '{0}'")]
    UnknownWorker(WorkerId),
    #[error("no worker available to route to")]
    NoWorkers,
}

/// Names a worker; the frontend uses its gRPC address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(Arc<str>);

impl WorkerId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for WorkerId {
    fn from(name: &str) -> Self {
        Self(name.into())
    }
}

impl From<String> for WorkerId {
    fn from(name: String) -> Self {
        Self(name.into())
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Tokens per KV block; must match the workers'.
    pub block_size: usize,
    /// Cost of one block to prefill, in blocks of decode load (see module docs).
    pub prefill_block_weight: f64,
    /// Seed for tie-breaking and random mode; `None` seeds from the OS.
    /// Fixed only in tests, for reproducible runs.
    pub seed: Option<u64>,
}

impl RouterConfig {
    pub fn new(block_size: usize) -> Self {
        Self {
            block_size,
            prefill_block_weight: 1.0,
            seed: None,
        }
    }
}

/// A routed request's claim on its worker's load; hand it back to
/// [`Router::finish`] when the request ends, however it ends.
#[derive(Debug, PartialEq, Eq, Hash)]
#[must_use = "pass the ticket to Router::finish when the request ends"]
pub struct RouteTicket {
    worker: WorkerId,
    id: u64,
}

impl RouteTicket {
    pub fn worker(&self) -> &WorkerId {
        &self.worker
    }
}

/// Where a request goes, and why.
#[derive(Debug)]
pub struct Route {
    pub worker: WorkerId,
    pub ticket: RouteTicket,
    /// Leading prompt blocks the worker already holds.
    pub overlap_blocks: usize,
    /// The prompt's blocks, a partial last one included.
    pub prompt_blocks: usize,
    /// The worker's load estimate before this request.
    pub load_blocks: u64,
}

#[derive(Debug, Clone, Copy)]
enum Policy {
    Decode(RouterMode),
    PrefillLeastLoaded,
}

#[derive(Debug)]
struct WorkerState {
    id: WorkerId,
    reported_blocks: u64,
    /// Blocks routed minus blocks finished since the last report.
    change_since_report: i64,
    in_flight: HashMap<u64, u64>,
}

impl WorkerState {
    fn load(&self) -> u64 {
        (self.reported_blocks as i64 + self.change_since_report).max(0) as u64
    }
}

/// A set of workers, what they cache, how loaded they are, and a policy to
/// pick one. Not thread-safe on its own: share it behind a mutex (routing is
/// a short computation).
#[derive(Debug)]
pub struct Router {
    policy: Policy,
    prefill_block_weight: f64,
    index: PrefixIndex,
    /// In the order they joined (round-robin's order).
    workers: Vec<WorkerState>,
    next_round_robin: usize,
    next_ticket: u64,
    rng: StdRng,
}

impl Router {
    /// The frontend's decode-worker router.
    pub fn new(mode: RouterMode, config: RouterConfig) -> Result<Self, RouterError> {
        Self::with_policy(Policy::Decode(mode), config)
    }

    /// A decode worker's prefill-worker picker: least loaded first, prefix
    /// overlap as tie-breaker.
    pub fn new_prefill_picker(config: RouterConfig) -> Result<Self, RouterError> {
        Self::with_policy(Policy::PrefillLeastLoaded, config)
    }

    fn with_policy(policy: Policy, config: RouterConfig) -> Result<Self, RouterError> {
        let weight = config.prefill_block_weight;
        if !weight.is_finite() || weight < 0.0 {
            return Err(RouterError::InvalidPrefillWeight(weight));
        }
        Ok(Self {
            policy,
            prefill_block_weight: weight,
            index: PrefixIndex::new(config.block_size)?,
            workers: Vec::new(),
            next_round_robin: 0,
            next_ticket: 0,
            rng: match config.seed {
                Some(seed) => StdRng::seed_from_u64(seed),
                None => StdRng::from_os_rng(),
            },
        })
    }

    pub fn block_size(&self) -> usize {
        self.index.block_size()
    }

    /// Adds a worker (discovery saw it); `false` if it was already known.
    pub fn add_worker(&mut self, worker: WorkerId) -> bool {
        if self.position(&worker).is_some() {
            return false;
        }
        self.workers.push(WorkerState {
            id: worker,
            reported_blocks: 0,
            change_since_report: 0,
            in_flight: HashMap::new(),
        });
        true
    }

    /// Removes a worker and everything known about it; `false` if unknown.
    /// Its outstanding tickets become no-ops.
    pub fn remove_worker(&mut self, worker: &WorkerId) -> bool {
        let Some(pos) = self.position(worker) else {
            return false;
        };
        self.workers.remove(pos);
        self.index.clear_worker(worker);
        // Keep the rotation where it was: the next worker in line stays next.
        if pos < self.next_round_robin {
            self.next_round_robin -= 1;
        }
        true
    }

    pub fn workers(&self) -> impl Iterator<Item = &WorkerId> {
        self.workers.iter().map(|w| &w.id)
    }

    /// Applies one event of `worker`'s KV event stream.
    pub fn apply_event(&mut self, worker: &WorkerId, event: &KvEvent) -> Result<(), RouterError> {
        self.state(worker)?;
        self.index.apply(worker, event);
        Ok(())
    }

    /// Forgets what `worker` caches, keeping it routable: call when its event
    /// stream (re)connects, since events may have been missed or it restarted.
    pub fn reset_worker_cache(&mut self, worker: &WorkerId) -> Result<(), RouterError> {
        self.state(worker)?;
        self.index.clear_worker(worker);
        Ok(())
    }

    /// Records a load report: the KV blocks held by `worker`'s running and
    /// queued sequences.
    pub fn report_load(
        &mut self,
        worker: &WorkerId,
        active_blocks: u64,
    ) -> Result<(), RouterError> {
        let state = self.state(worker)?;
        state.reported_blocks = active_blocks;
        state.change_since_report = 0;
        Ok(())
    }

    /// The current load estimate of `worker`, in blocks.
    pub fn load(&self, worker: &WorkerId) -> Option<u64> {
        self.position(worker).map(|pos| self.workers[pos].load())
    }

    /// How many leading blocks of `tokens` each worker holds (absent: none).
    pub fn overlaps(&self, tokens: &[u32]) -> HashMap<WorkerId, usize> {
        self.index.overlaps(&self.index.prompt_hashes(tokens))
    }

    /// Picks a worker for a prompt and counts the request in its load.
    pub fn route(&mut self, tokens: &[u32]) -> Result<Route, RouterError> {
        self.route_excluding(tokens, &[])
    }

    /// As [`Router::route`], skipping `excluded` workers (e.g. the one a
    /// migrating request just lost).
    pub fn route_excluding(
        &mut self,
        tokens: &[u32],
        excluded: &[WorkerId],
    ) -> Result<Route, RouterError> {
        let candidates: Vec<usize> = (0..self.workers.len())
            .filter(|&i| !excluded.contains(&self.workers[i].id))
            .collect();
        if candidates.is_empty() {
            return Err(RouterError::NoWorkers);
        }
        let prompt_blocks = tokens.len().div_ceil(self.block_size());
        let overlaps = self.overlaps(tokens);
        let overlap_by_worker: Vec<usize> = self
            .workers
            .iter()
            .map(|w| overlaps.get(&w.id).copied().unwrap_or(0))
            .collect();
        let overlap_of = |i: usize| overlap_by_worker[i];

        let chosen = match self.policy {
            Policy::Decode(RouterMode::Kv) => {
                let weight = self.prefill_block_weight;
                let keyed: Vec<(usize, (f64, u64))> = candidates
                    .iter()
                    .map(|&i| {
                        let load = self.workers[i].load();
                        let new_blocks = (prompt_blocks - overlap_of(i)) as f64;
                        (i, (weight * new_blocks + load as f64, load))
                    })
                    .collect();
                pick_lowest(&mut self.rng, keyed, |a, b| {
                    a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
                })
            }
            Policy::Decode(RouterMode::RoundRobin) => {
                let n = self.workers.len();
                let chosen = (0..n)
                    .map(|step| (self.next_round_robin + step) % n)
                    .find(|i| candidates.contains(i))
                    .expect("at least one candidate");
                self.next_round_robin = (chosen + 1) % n;
                chosen
            }
            Policy::Decode(RouterMode::Random) => {
                candidates[self.rng.random_range(0..candidates.len())]
            }
            Policy::PrefillLeastLoaded => {
                let keyed: Vec<(usize, (u64, usize))> = candidates
                    .iter()
                    .map(|&i| (i, (self.workers[i].load(), overlap_of(i))))
                    .collect();
                // Lower load first; among equal loads, more overlap first.
                pick_lowest(&mut self.rng, keyed, |a, b| {
                    a.0.cmp(&b.0).then(b.1.cmp(&a.1))
                })
            }
        };

        let overlap_blocks = overlap_of(chosen);
        let request_blocks = match self.policy {
            Policy::Decode(_) => prompt_blocks,
            Policy::PrefillLeastLoaded => prompt_blocks - overlap_blocks,
        } as u64;
        let id = self.next_ticket;
        self.next_ticket += 1;
        let state = &mut self.workers[chosen];
        let load_blocks = state.load();
        state.change_since_report += request_blocks as i64;
        state.in_flight.insert(id, request_blocks);
        Ok(Route {
            worker: state.id.clone(),
            ticket: RouteTicket {
                worker: state.id.clone(),
                id,
            },
            overlap_blocks,
            prompt_blocks,
            load_blocks,
        })
    }

    /// The request behind `ticket` ended (finished, failed or cancelled): its
    /// blocks leave the worker's load estimate.
    pub fn finish(&mut self, ticket: RouteTicket) {
        let Some(pos) = self.position(&ticket.worker) else {
            return; // the worker left; nothing to account
        };
        let state = &mut self.workers[pos];
        if let Some(blocks) = state.in_flight.remove(&ticket.id) {
            state.change_since_report -= blocks as i64;
        }
    }

    fn position(&self, worker: &WorkerId) -> Option<usize> {
        self.workers.iter().position(|w| &w.id == worker)
    }

    fn state(&mut self, worker: &WorkerId) -> Result<&mut WorkerState, RouterError> {
        self.workers
            .iter_mut()
            .find(|w| &w.id == worker)
            .ok_or_else(|| RouterError::UnknownWorker(worker.clone()))
    }
}

/// Index of a uniformly random candidate among those with the lowest key.
fn pick_lowest<K>(
    rng: &mut StdRng,
    keyed: Vec<(usize, K)>,
    compare: impl Fn(&K, &K) -> std::cmp::Ordering,
) -> usize {
    let mut best: Vec<usize> = Vec::new();
    let mut best_key: Option<&K> = None;
    for (i, key) in &keyed {
        match best_key.map(|b| compare(key, b)) {
            Some(std::cmp::Ordering::Greater) => {}
            Some(std::cmp::Ordering::Equal) => best.push(*i),
            Some(std::cmp::Ordering::Less) | None => {
                best.clear();
                best.push(*i);
                best_key = Some(key);
            }
        }
    }
    best[rng.random_range(0..best.len())]
}
