//! A discrete-event simulator of a disaggregated (P/D) cluster, driven by load traces, that runs
//! the planner every interval exactly as the operator does (through [`ScaleTarget`]).
//!
//! The cluster:
//! - requests arrive as a Poisson process whose rate follows a [`Trace`]; input and output
//!   lengths are uniform over [`ClusterParams::input_tokens`] / [`ClusterParams::output_tokens`];
//! - one FIFO prefill queue feeds the ready prefill replicas, each serving one prompt at a time
//!   at `prefill_tokens_per_s`; TTFT = queue wait + prefill time;
//! - a prefilled request joins the least-loaded ready decode replica with a free batch slot (else
//!   it waits in a decode queue); a decode replica steps its whole batch at once, one token per
//!   sequence per step, and a step takes `decode_base_itl_s + decode_itl_per_seq_s × batch`:
//!   ITL grows with concurrency up to `max_batch`. Every token's gap since the sequence's
//!   previous token is one ITL sample (a wait in the decode queue shows up there);
//! - a new replica serves `startup_delay_s` after it is asked for; a removed replica stops
//!   taking work and leaves when its work is done (replicas still starting leave at once);
//! - each trace is preceded by an unscored warm-up at its starting rate ([`Trace::warmup_s`]);
//! - GPU-seconds count every replica from the moment it is asked for until it leaves;
//! - every `interval_s` the interval's arrivals and completions become an [`Observation`]
//!   (p90s over the interval's samples), and the planner decides and applies.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::decide::{PlannerConfig, PlannerState, Slo};
use super::target::{plan_step, ScaleTarget, TierReplicas};
use super::types::{Observation, Tier, TierCounts};

/// What the simulated hardware and requests look like.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterParams {
    /// Prompt tokens per second one prefill replica processes.
    pub prefill_tokens_per_s: f64,
    /// Decode step time with an empty batch, seconds.
    pub decode_base_itl_s: f64,
    /// Extra decode step time per sequence in the batch, seconds.
    pub decode_itl_per_seq_s: f64,
    /// Most sequences one decode replica runs at once (its KV capacity).
    pub max_batch: usize,
    /// Seconds from asking for a replica to it serving.
    pub startup_delay_s: f64,
    /// Inclusive range of prompt lengths.
    pub input_tokens: (u32, u32),
    /// Inclusive range of output lengths (the first token comes from prefill).
    pub output_tokens: (u32, u32),
}

impl Default for ClusterParams {
    /// A prefill replica takes ~128 ms for a mean prompt; decode steps 10 ms + 0.5 ms/sequence.
    fn default() -> Self {
        ClusterParams {
            prefill_tokens_per_s: 8000.0,
            decode_base_itl_s: 0.010,
            decode_itl_per_seq_s: 0.0005,
            max_batch: 64,
            startup_delay_s: 60.0,
            input_tokens: (256, 1792),
            output_tokens: (32, 224),
        }
    }
}

/// The request rate over time.
#[derive(Clone, Debug, PartialEq)]
pub enum RateShape {
    /// Piecewise constant: `(from_s, rate)` pairs in time order, the first at 0.
    Steps(Vec<(f64, f64)>),
    /// Linear from `from` at `start_s` to `to` at `end_s`, flat outside.
    Ramp {
        from: f64,
        to: f64,
        start_s: f64,
        end_s: f64,
    },
    /// `low + (high - low) × (1 - cos(2πt / period_s)) / 2`: a compressed day.
    Diurnal { low: f64, high: f64, period_s: f64 },
}

/// A named load trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    pub name: String,
    pub duration_s: f64,
    pub shape: RateShape,
    /// Instants the load changes abruptly (plus 0); the intervals right after them are not
    /// "settled" when scoring SLO attainment.
    pub load_changes_s: Vec<f64>,
    /// Seconds the cluster runs at the trace's starting rate before `t = 0`, unscored, so a run
    /// starts from a deployment already serving that load rather than from a cold start.
    /// A multiple of the planner interval.
    pub warmup_s: f64,
}

/// Default [`Trace::warmup_s`]: twenty minutes, long enough for the planner to settle from its
/// minimum replicas at the starting rate.
pub const WARMUP_S: f64 = 1200.0;

impl Trace {
    /// Constant `rate` for `duration_s`.
    pub fn constant(rate: f64, duration_s: f64) -> Self {
        Trace {
            name: "constant".into(),
            duration_s,
            shape: RateShape::Steps(vec![(0.0, rate)]),
            load_changes_s: vec![0.0],
            warmup_s: WARMUP_S,
        }
    }

    /// `low`, then `high` from `up_s` to `down_s`, then `low` again.
    pub fn step(low: f64, high: f64, up_s: f64, down_s: f64, duration_s: f64) -> Self {
        Trace {
            name: "step".into(),
            duration_s,
            shape: RateShape::Steps(vec![(0.0, low), (up_s, high), (down_s, low)]),
            load_changes_s: vec![0.0, up_s, down_s],
            warmup_s: WARMUP_S,
        }
    }

    /// A short burst: `base`, `peak` for `length_s` from `start_s`, then `base`.
    pub fn spike(base: f64, peak: f64, start_s: f64, length_s: f64, duration_s: f64) -> Self {
        Trace {
            name: "spike".into(),
            ..Trace::step(base, peak, start_s, start_s + length_s, duration_s)
        }
    }

    /// `from` to `to` linearly over the middle of the trace (from a sixth to four sixths).
    pub fn ramp(from: f64, to: f64, duration_s: f64) -> Self {
        Trace {
            name: "ramp".into(),
            duration_s,
            shape: RateShape::Ramp {
                from,
                to,
                start_s: duration_s / 6.0,
                end_s: duration_s * 4.0 / 6.0,
            },
            load_changes_s: vec![0.0],
            warmup_s: WARMUP_S,
        }
    }

    /// Two compressed days between `low` and `high`.
    pub fn diurnal(low: f64, high: f64, duration_s: f64) -> Self {
        Trace {
            name: "diurnal".into(),
            duration_s,
            shape: RateShape::Diurnal {
                low,
                high,
                period_s: duration_s / 2.0,
            },
            load_changes_s: vec![0.0],
            warmup_s: WARMUP_S,
        }
    }

    /// Requests per second at `t` (the starting rate before 0, during the warm-up).
    pub fn rate_at(&self, t: f64) -> f64 {
        let t = t.max(0.0);
        match &self.shape {
            RateShape::Steps(steps) => steps
                .iter()
                .take_while(|(from, _)| *from <= t)
                .last()
                .map_or(0.0, |s| s.1),
            RateShape::Ramp {
                from,
                to,
                start_s,
                end_s,
            } => {
                let progress = ((t - start_s) / (end_s - start_s)).clamp(0.0, 1.0);
                from + (to - from) * progress
            }
            RateShape::Diurnal {
                low,
                high,
                period_s,
            } => low + (high - low) * (1.0 - (std::f64::consts::TAU * t / period_s).cos()) / 2.0,
        }
    }

    fn peak_rate(&self) -> f64 {
        match &self.shape {
            RateShape::Steps(steps) => steps.iter().map(|s| s.1).fold(0.0, f64::max),
            RateShape::Ramp { from, to, .. } => from.max(*to),
            RateShape::Diurnal { high, low, .. } => high.max(*low),
        }
    }
}

/// How the replica counts are chosen during a run.
#[derive(Clone, Debug)]
pub enum Allocation {
    /// Fixed counts, all ready from the start.
    Static(TierCounts),
    /// The planner, starting from `initial` ready replicas.
    Planner {
        config: PlannerConfig,
        initial: TierCounts,
    },
}

/// One planner interval as the simulator saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct IntervalRecord {
    pub start_s: f64,
    pub end_s: f64,
    pub observation: Observation,
    /// Desired replicas after this interval's decision.
    pub desired: TierCounts,
    pub reason: String,
}

/// The outcome of one simulated run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunReport {
    pub intervals: Vec<IntervalRecord>,
    pub gpu_seconds: f64,
    /// `(time, tier, from, to)` of every change of a tier's desired replicas.
    pub scale_events: Vec<(f64, Tier, u32, u32)>,
    pub completed_requests: u64,
}

impl RunReport {
    /// Fraction of the selected intervals whose TTFT and ITL p90 are within the SLO (an
    /// interval without samples meets it).
    pub fn attainment(&self, slo: &Slo, keep: impl Fn(&IntervalRecord) -> bool) -> f64 {
        let selected: Vec<_> = self.intervals.iter().filter(|i| keep(i)).collect();
        if selected.is_empty() {
            return 1.0;
        }
        let met = selected
            .iter()
            .filter(|i| meets(&i.observation, slo))
            .count();
        met as f64 / selected.len() as f64
    }
}

/// Whether an interval's p90s are within the SLO.
pub fn meets(observation: &Observation, slo: &Slo) -> bool {
    observation.ttft_p90_s.is_none_or(|v| v <= slo.ttft_p90_s)
        && observation.itl_p90_s.is_none_or(|v| v <= slo.itl_p90_s)
}

/// Whether an interval is settled: it does not overlap `[change, change + startup_delay + 2 ×
/// interval]` for any load change of the trace.
pub fn settled(
    trace: &Trace,
    params: &ClusterParams,
    interval_s: f64,
    record: &IntervalRecord,
) -> bool {
    let window = params.startup_delay_s + 2.0 * interval_s;
    trace
        .load_changes_s
        .iter()
        .all(|change| record.end_s <= *change || record.start_s >= change + window)
}

/// Runs `trace` on a simulated cluster with `allocation`; `seed` fixes arrivals and lengths.
pub fn simulate(
    params: &ClusterParams,
    trace: &Trace,
    allocation: &Allocation,
    interval_s: f64,
    seed: u64,
) -> RunReport {
    let mut sim = Sim::new(params.clone(), trace.clone(), seed);
    let (mut planner, initial) = match allocation {
        Allocation::Static(counts) => (None, *counts),
        Allocation::Planner { config, initial } => {
            (Some((config.clone(), PlannerState::default())), *initial)
        }
    };
    sim.now = -trace.warmup_s;
    sim.start(initial);
    let mut intervals = Vec::new();
    let mut scale_events = Vec::new();
    sim.schedule(sim.now + interval_s, Event::Tick);
    while let Some(Scheduled { at, event, .. }) = sim.events.pop() {
        if at > trace.duration_s {
            break;
        }
        sim.advance(at);
        match event {
            Event::Tick => {
                let observation = sim.observe(interval_s);
                let before = TierCounts {
                    prefill: sim.alive(Tier::Prefill),
                    decode: sim.alive(Tier::Decode),
                };
                let (desired, reason) = match planner.as_mut() {
                    Some((config, state)) => {
                        let decision = futures::executor::block_on(plan_step(
                            &mut sim,
                            config,
                            state,
                            observation.clone(),
                            at,
                        ))
                        .unwrap_or_else(|error| match error {});
                        (decision.desired, decision.reason)
                    }
                    None => (before, "static".to_string()),
                };
                let start_s = at - interval_s;
                if start_s >= -1e-9 {
                    for tier in [Tier::Prefill, Tier::Decode] {
                        if desired.get(tier) != before.get(tier) {
                            scale_events.push((at, tier, before.get(tier), desired.get(tier)));
                        }
                    }
                    intervals.push(IntervalRecord {
                        start_s,
                        end_s: at,
                        observation,
                        desired,
                        reason,
                    });
                }
                sim.schedule(at + interval_s, Event::Tick);
            }
            other => sim.handle(other),
        }
    }
    sim.advance(trace.duration_s);
    RunReport {
        intervals,
        gpu_seconds: sim.gpu_seconds,
        scale_events,
        completed_requests: sim.completed,
    }
}

impl ScaleTarget for Sim {
    type Error = Infallible;

    async fn replicas(&self, tier: Tier) -> Result<TierReplicas, Infallible> {
        Ok(TierReplicas {
            desired: self.alive(tier),
            ready: self.ready(tier),
        })
    }

    async fn set_desired(&mut self, tier: Tier, replicas: u32) -> Result<(), Infallible> {
        self.resize(tier, replicas);
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Event {
    Arrival,
    PrefillDone(usize),
    DecodeStep(usize),
    ReplicaReady(Tier, usize),
    Tick,
}

#[derive(Debug)]
struct Scheduled {
    at: f64,
    order: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    /// Reversed: the heap pops the earliest event, ties in scheduling order.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .at
            .total_cmp(&self.at)
            .then(other.order.cmp(&self.order))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Life {
    Starting,
    Ready,
    Draining,
    Gone,
}

#[derive(Clone, Copy, Debug)]
struct Request {
    arrival_s: f64,
    input: u32,
    output: u32,
}

#[derive(Clone, Copy, Debug)]
struct Sequence {
    remaining: u32,
    last_token_s: f64,
}

struct PrefillReplica {
    life: Life,
    serving: Option<Request>,
}

struct DecodeReplica {
    life: Life,
    batch: Vec<Sequence>,
    joining: Vec<Sequence>,
    stepping: bool,
}

impl DecodeReplica {
    fn load(&self) -> usize {
        self.batch.len() + self.joining.len()
    }
}

/// ITL samples in 0.1 ms buckets up to 2 s (one overflow bucket above).
struct ItlHistogram {
    buckets: Vec<u64>,
    count: u64,
}

const ITL_BUCKET_S: f64 = 1e-4;
const ITL_BUCKETS: usize = 20_000;

impl ItlHistogram {
    fn new() -> Self {
        ItlHistogram {
            buckets: vec![0; ITL_BUCKETS + 1],
            count: 0,
        }
    }

    fn record(&mut self, value_s: f64) {
        let index = ((value_s / ITL_BUCKET_S) as usize).min(ITL_BUCKETS);
        self.buckets[index] += 1;
        self.count += 1;
    }

    /// Upper edge of the bucket holding the 90th percentile sample.
    fn p90(&self) -> Option<f64> {
        let rank = rank_p90(self.count as usize)? as u64;
        let mut seen = 0;
        for (index, count) in self.buckets.iter().enumerate() {
            seen += count;
            if seen > rank {
                return Some((index + 1) as f64 * ITL_BUCKET_S);
            }
        }
        None
    }

    fn clear(&mut self) {
        self.buckets.iter_mut().for_each(|b| *b = 0);
        self.count = 0;
    }
}

/// Zero-based index of the p90 sample among `count` sorted samples.
fn rank_p90(count: usize) -> Option<usize> {
    (count > 0).then(|| (count * 9).div_ceil(10) - 1)
}

struct Sim {
    params: ClusterParams,
    trace: Trace,
    rng: StdRng,
    now: f64,
    order: u64,
    events: BinaryHeap<Scheduled>,
    prefill: Vec<PrefillReplica>,
    decode: Vec<DecodeReplica>,
    prefill_queue: VecDeque<Request>,
    decode_queue: VecDeque<Sequence>,
    gpu_seconds: f64,
    completed: u64,
    // The current interval's samples.
    arrivals: u64,
    input_sum: f64,
    output_sum: f64,
    prefill_tokens: f64,
    decode_tokens: f64,
    ttft: Vec<f64>,
    itl: ItlHistogram,
}

impl Sim {
    fn new(params: ClusterParams, trace: Trace, seed: u64) -> Self {
        Sim {
            params,
            trace,
            rng: StdRng::seed_from_u64(seed),
            now: 0.0,
            order: 0,
            events: BinaryHeap::new(),
            prefill: Vec::new(),
            decode: Vec::new(),
            prefill_queue: VecDeque::new(),
            decode_queue: VecDeque::new(),
            gpu_seconds: 0.0,
            completed: 0,
            arrivals: 0,
            input_sum: 0.0,
            output_sum: 0.0,
            prefill_tokens: 0.0,
            decode_tokens: 0.0,
            ttft: Vec::new(),
            itl: ItlHistogram::new(),
        }
    }

    fn start(&mut self, initial: TierCounts) {
        for _ in 0..initial.prefill {
            self.prefill.push(PrefillReplica {
                life: Life::Ready,
                serving: None,
            });
        }
        for _ in 0..initial.decode {
            self.decode.push(DecodeReplica {
                life: Life::Ready,
                batch: Vec::new(),
                joining: Vec::new(),
                stepping: false,
            });
        }
        self.schedule_next_arrival();
    }

    fn schedule(&mut self, at: f64, event: Event) {
        self.order += 1;
        self.events.push(Scheduled {
            at,
            order: self.order,
            event,
        });
    }

    /// Poisson arrivals at the trace's rate, by thinning a process at the peak rate.
    fn schedule_next_arrival(&mut self) {
        let peak = self.trace.peak_rate();
        if peak <= 0.0 {
            return;
        }
        let mut t = self.now;
        loop {
            let uniform: f64 = self.rng.random();
            t += -(1.0 - uniform).ln() / peak;
            if t > self.trace.duration_s {
                return;
            }
            let accept: f64 = self.rng.random();
            if accept * peak <= self.trace.rate_at(t) {
                self.schedule(t, Event::Arrival);
                return;
            }
        }
    }

    fn advance(&mut self, to: f64) {
        let present = self.prefill.iter().filter(|r| r.life != Life::Gone).count()
            + self.decode.iter().filter(|r| r.life != Life::Gone).count();
        // Only the scored part of the run (t >= 0, after the warm-up) costs GPU-seconds.
        self.gpu_seconds += present as f64 * (to.max(0.0) - self.now.max(0.0)).max(0.0);
        self.now = to.max(self.now);
    }

    fn alive(&self, tier: Tier) -> u32 {
        let counted = |life: Life| matches!(life, Life::Starting | Life::Ready);
        match tier {
            Tier::Prefill => self.prefill.iter().filter(|r| counted(r.life)).count() as u32,
            Tier::Decode => self.decode.iter().filter(|r| counted(r.life)).count() as u32,
        }
    }

    fn ready(&self, tier: Tier) -> u32 {
        match tier {
            Tier::Prefill => self
                .prefill
                .iter()
                .filter(|r| r.life == Life::Ready)
                .count() as u32,
            Tier::Decode => self.decode.iter().filter(|r| r.life == Life::Ready).count() as u32,
        }
    }

    fn observe(&mut self, interval_s: f64) -> Observation {
        let ttft_p90_s = rank_p90(self.ttft.len()).map(|rank| {
            let (_, value, _) = self.ttft.select_nth_unstable_by(rank, f64::total_cmp);
            *value
        });
        let ready_decode = self.ready(Tier::Decode);
        let in_decode: usize = self
            .decode
            .iter()
            .filter(|r| r.life == Life::Ready)
            .map(DecodeReplica::load)
            .sum();
        let observation = Observation {
            timestamp_s: self.now,
            ttft_p90_s,
            itl_p90_s: self.itl.p90(),
            request_rate: Some(self.arrivals as f64 / interval_s),
            mean_input_tokens: (self.arrivals > 0).then(|| self.input_sum / self.arrivals as f64),
            mean_output_tokens: (self.arrivals > 0).then(|| self.output_sum / self.arrivals as f64),
            prefill_queue_depth: Some(self.prefill_queue.len() as f64),
            decode_kv_utilization: (ready_decode > 0).then(|| {
                in_decode as f64 / (f64::from(ready_decode) * self.params.max_batch as f64)
            }),
            prefill_tokens_per_s: Some(self.prefill_tokens / interval_s),
            decode_tokens_per_s: Some(self.decode_tokens / interval_s),
            ready: TierCounts {
                prefill: self.ready(Tier::Prefill),
                decode: ready_decode,
            },
        };
        self.arrivals = 0;
        self.input_sum = 0.0;
        self.output_sum = 0.0;
        self.prefill_tokens = 0.0;
        self.decode_tokens = 0.0;
        self.ttft.clear();
        self.itl.clear();
        observation
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Arrival => {
                let (low_in, high_in) = self.params.input_tokens;
                let (low_out, high_out) = self.params.output_tokens;
                let request = Request {
                    arrival_s: self.now,
                    input: self.rng.random_range(low_in..=high_in),
                    output: self.rng.random_range(low_out..=high_out),
                };
                self.arrivals += 1;
                self.input_sum += f64::from(request.input);
                self.output_sum += f64::from(request.output);
                self.prefill_queue.push_back(request);
                self.dispatch_prefill();
                self.schedule_next_arrival();
            }
            Event::PrefillDone(index) => {
                let replica = &mut self.prefill[index];
                let request = replica
                    .serving
                    .take()
                    .expect("a prefill completes only on a busy replica");
                if replica.life == Life::Draining {
                    replica.life = Life::Gone;
                }
                self.ttft.push(self.now - request.arrival_s);
                self.prefill_tokens += f64::from(request.input);
                if request.output > 1 {
                    self.decode_queue.push_back(Sequence {
                        remaining: request.output - 1,
                        last_token_s: self.now,
                    });
                    self.dispatch_decode();
                } else {
                    self.completed += 1;
                }
                self.dispatch_prefill();
            }
            Event::DecodeStep(index) => {
                let now = self.now;
                let replica = &mut self.decode[index];
                let mut finished = 0;
                self.decode_tokens += replica.batch.len() as f64;
                for sequence in &mut replica.batch {
                    self.itl.record(now - sequence.last_token_s);
                    sequence.last_token_s = now;
                    sequence.remaining -= 1;
                    finished += u64::from(sequence.remaining == 0);
                }
                replica.batch.retain(|s| s.remaining > 0);
                self.completed += finished;
                self.start_step(index);
                self.dispatch_decode();
            }
            Event::ReplicaReady(tier, index) => {
                match tier {
                    Tier::Prefill if self.prefill[index].life == Life::Starting => {
                        self.prefill[index].life = Life::Ready
                    }
                    Tier::Decode if self.decode[index].life == Life::Starting => {
                        self.decode[index].life = Life::Ready
                    }
                    _ => return,
                }
                self.dispatch_prefill();
                self.dispatch_decode();
            }
            Event::Tick => unreachable!("ticks are handled by the run loop"),
        }
    }

    fn dispatch_prefill(&mut self) {
        let rate = self.params.prefill_tokens_per_s;
        for index in 0..self.prefill.len() {
            if self.prefill_queue.is_empty() {
                return;
            }
            let replica = &mut self.prefill[index];
            if replica.life == Life::Ready && replica.serving.is_none() {
                let request = self.prefill_queue.pop_front().expect("checked non-empty");
                replica.serving = Some(request);
                let done = self.now + f64::from(request.input) / rate;
                self.schedule(done, Event::PrefillDone(index));
            }
        }
    }

    fn dispatch_decode(&mut self) {
        while !self.decode_queue.is_empty() {
            let target = self
                .decode
                .iter()
                .enumerate()
                .filter(|(_, r)| r.life == Life::Ready && r.load() < self.params.max_batch)
                .min_by_key(|(_, r)| r.load())
                .map(|(index, _)| index);
            let Some(index) = target else { return };
            let sequence = self.decode_queue.pop_front().expect("checked non-empty");
            self.decode[index].joining.push(sequence);
            if !self.decode[index].stepping {
                self.start_step(index);
            }
        }
    }

    /// Starts the next decode step of a replica with everything that joined, or idles it.
    fn start_step(&mut self, index: usize) {
        let replica = &mut self.decode[index];
        let joining = std::mem::take(&mut replica.joining);
        replica.batch.extend(joining);
        if replica.batch.is_empty() {
            replica.stepping = false;
            if replica.life == Life::Draining {
                replica.life = Life::Gone;
            }
            return;
        }
        replica.stepping = true;
        let step = self.params.decode_base_itl_s
            + self.params.decode_itl_per_seq_s * replica.batch.len() as f64;
        self.schedule(self.now + step, Event::DecodeStep(index));
    }

    fn resize(&mut self, tier: Tier, replicas: u32) {
        let alive = self.alive(tier);
        let ready_at = self.now + self.params.startup_delay_s;
        if replicas > alive {
            for _ in alive..replicas {
                let index = match tier {
                    Tier::Prefill => {
                        self.prefill.push(PrefillReplica {
                            life: Life::Starting,
                            serving: None,
                        });
                        self.prefill.len() - 1
                    }
                    Tier::Decode => {
                        self.decode.push(DecodeReplica {
                            life: Life::Starting,
                            batch: Vec::new(),
                            joining: Vec::new(),
                            stepping: false,
                        });
                        self.decode.len() - 1
                    }
                };
                self.schedule(ready_at, Event::ReplicaReady(tier, index));
            }
            return;
        }
        for _ in replicas..alive {
            match tier {
                Tier::Prefill => {
                    let starting = self.prefill.iter().rposition(|r| r.life == Life::Starting);
                    let idle = self
                        .prefill
                        .iter()
                        .rposition(|r| r.life == Life::Ready && r.serving.is_none());
                    let busy = self.prefill.iter().rposition(|r| r.life == Life::Ready);
                    if let Some(index) = starting.or(idle) {
                        self.prefill[index].life = Life::Gone;
                    } else if let Some(index) = busy {
                        self.prefill[index].life = Life::Draining;
                    }
                }
                Tier::Decode => {
                    let starting = self.decode.iter().rposition(|r| r.life == Life::Starting);
                    let least_loaded = self
                        .decode
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| r.life == Life::Ready)
                        .min_by_key(|(_, r)| r.load())
                        .map(|(index, _)| index);
                    if let Some(index) = starting {
                        self.decode[index].life = Life::Gone;
                    } else if let Some(index) = least_loaded {
                        let replica = &mut self.decode[index];
                        replica.life = if replica.load() == 0 {
                            Life::Gone
                        } else {
                            Life::Draining
                        };
                    }
                }
            }
        }
    }
}

/// Scores of a planner run against the best static allocation on one trace.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceScore {
    pub trace: String,
    /// Fraction of settled intervals within both SLOs.
    pub settled_attainment: f64,
    /// Fraction of all intervals within both SLOs.
    pub overall_attainment: f64,
    pub planner_gpu_seconds: f64,
    /// The cheapest static allocation meeting the SLO in ≥ 95% of intervals, and its cost.
    pub best_static: Option<(TierCounts, f64)>,
    pub scale_events: usize,
    pub planner: RunReport,
}

impl TraceScore {
    /// Planner GPU-seconds over the best static allocation's.
    pub fn cost_ratio(&self) -> Option<f64> {
        self.best_static
            .map(|(_, cost)| self.planner_gpu_seconds / cost)
    }
}

/// Fraction of intervals a static allocation must meet the SLO in to count as meeting it.
pub const STATIC_ATTAINMENT: f64 = 0.95;

/// The cheapest static `(P, D)` within `max` meeting the SLO in ≥ 95% of all intervals.
///
/// In this simulator prefill never waits on decode and decode load does not depend on the
/// prefill count beyond timing, so each tier is searched on its own (binary search on the
/// monotone per-tier attainment with the other tier at its maximum) and the pair is then
/// verified, growing the failing tier if needed.
pub fn best_static(
    params: &ClusterParams,
    trace: &Trace,
    slo: &Slo,
    max: TierCounts,
    interval_s: f64,
    seed: u64,
) -> Option<(TierCounts, RunReport)> {
    let run =
        |counts: TierCounts| simulate(params, trace, &Allocation::Static(counts), interval_s, seed);
    let tier_attainment = |report: &RunReport, tier: Tier| {
        let only = match tier {
            Tier::Prefill => Slo {
                ttft_p90_s: slo.ttft_p90_s,
                itl_p90_s: f64::INFINITY,
            },
            Tier::Decode => Slo {
                ttft_p90_s: f64::INFINITY,
                itl_p90_s: slo.itl_p90_s,
            },
        };
        report.attainment(&only, |_| true)
    };
    let smallest = |tier: Tier| -> Option<u32> {
        let (mut low, mut high) = (1, max.get(tier));
        let at = |n: u32| {
            let mut counts = max;
            counts.set(tier, n);
            tier_attainment(&run(counts), tier) >= STATIC_ATTAINMENT
        };
        if !at(high) {
            return None;
        }
        while low < high {
            let middle = (low + high) / 2;
            if at(middle) {
                high = middle;
            } else {
                low = middle + 1;
            }
        }
        Some(low)
    };
    let mut counts = TierCounts {
        prefill: smallest(Tier::Prefill)?,
        decode: smallest(Tier::Decode)?,
    };
    loop {
        let report = run(counts);
        if report.attainment(slo, |_| true) >= STATIC_ATTAINMENT {
            return Some((counts, report));
        }
        let grow = if tier_attainment(&report, Tier::Prefill) < STATIC_ATTAINMENT {
            Tier::Prefill
        } else {
            Tier::Decode
        };
        if counts.get(grow) >= max.get(grow) {
            return None;
        }
        counts.set(grow, counts.get(grow) + 1);
    }
}

/// Runs the planner on `trace` from its minimum replicas and scores it against the best static
/// allocation.
pub fn score_trace(
    params: &ClusterParams,
    trace: &Trace,
    config: &PlannerConfig,
    seed: u64,
) -> TraceScore {
    let mut score = score_planner(params, trace, config, seed);
    let max = TierCounts {
        prefill: config.prefill_bounds.max,
        decode: config.decode_bounds.max,
    };
    score.best_static = best_static(params, trace, &config.slo, max, config.interval_s, seed)
        .map(|(counts, report)| (counts, report.gpu_seconds));
    score
}

/// Runs the planner on `trace` from its minimum replicas, without the (costly) search for the
/// best static allocation: `best_static` is `None`.
pub fn score_planner(
    params: &ClusterParams,
    trace: &Trace,
    config: &PlannerConfig,
    seed: u64,
) -> TraceScore {
    let initial = TierCounts {
        prefill: config.prefill_bounds.min.max(1),
        decode: config.decode_bounds.min.max(1),
    };
    let planner = simulate(
        params,
        trace,
        &Allocation::Planner {
            config: config.clone(),
            initial,
        },
        config.interval_s,
        seed,
    );
    TraceScore {
        trace: trace.name.clone(),
        settled_attainment: planner.attainment(&config.slo, |i| {
            settled(trace, params, config.interval_s, i)
        }),
        overall_attainment: planner.attainment(&config.slo, |_| true),
        planner_gpu_seconds: planner.gpu_seconds,
        best_static: None,
        scale_events: planner.scale_events.len(),
        planner,
    }
}

/// The results table: one row per trace.
pub fn table(scores: &[TraceScore]) -> String {
    let mut out = String::from(
        "| trace | SLO met, settled intervals | SLO met, all intervals | planner GPU-s | best static (P,D) | static GPU-s | planner/static | scale events |\n|---|---|---|---|---|---|---|---|\n",
    );
    for score in scores {
        let (pair, static_cost, ratio) = match (score.best_static, score.cost_ratio()) {
            (Some((counts, cost)), Some(ratio)) => (
                format!("({}, {})", counts.prefill, counts.decode),
                format!("{cost:.0}"),
                format!("{ratio:.2}"),
            ),
            _ => (
                "none within bounds".to_string(),
                "-".to_string(),
                "-".to_string(),
            ),
        };
        let _ = writeln!(
            out,
            "| {} | {:.1}% | {:.1}% | {:.0} | {} | {} | {} | {} |",
            score.trace,
            score.settled_attainment * 100.0,
            score.overall_attainment * 100.0,
            score.planner_gpu_seconds,
            pair,
            static_cost,
            ratio,
            score.scale_events
        );
    }
    out
}

/// The planner configuration the simulated benchmark uses: TTFT p90 ≤ 500 ms, ITL p90 ≤ 30 ms,
/// 1..=16 replicas per tier, every other knob at its default.
pub fn benchmark_config() -> PlannerConfig {
    use super::decide::TierBounds;
    let bounds = TierBounds { min: 1, max: 16 };
    PlannerConfig::new(
        Slo {
            ttft_p90_s: 0.5,
            itl_p90_s: 0.030,
        },
        bounds,
        bounds,
    )
}

/// The benchmark traces (between 8 and 40 requests/s); `minutes` scales their length, 1.0 being
/// the full benchmark (constant 30 min, step 40, spike 30, ramp 40, diurnal 120).
pub fn benchmark_traces(scale: f64) -> Vec<Trace> {
    let minutes = |m: f64| m * 60.0 * scale;
    vec![
        Trace::constant(24.0, minutes(30.0)),
        Trace::step(8.0, 32.0, minutes(10.0), minutes(25.0), minutes(40.0)),
        Trace::spike(8.0, 40.0, minutes(12.0), minutes(3.0), minutes(30.0)),
        Trace::ramp(8.0, 40.0, minutes(40.0)),
        Trace::diurnal(8.0, 40.0, minutes(120.0)),
    ]
}
