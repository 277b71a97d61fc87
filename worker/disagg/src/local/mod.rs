//! `tandem local`: a whole disaggregated deployment on this machine, as
//! supervised child processes on loopback.
//!
//! The supervisor is an actor: one task owns every [`Slot`] (a role and index,
//! with its ports, process and readiness) and reacts to events from the
//! per-process monitor tasks (ready, exited), to restart timers, to scale
//! commands from the control endpoint and to the shutdown signal. After every
//! change it rewrites the endpoints file ([`EndpointsFile`]), which is also how
//! the frontend and the decode workers find their peers (`--discovery file`):
//! a restarted or added worker joins, a dead or removed one leaves, and nobody
//! restarts.
//!
//! Lifecycle:
//! 1. Start the prefill and decode workers; wait until each answers
//!    `/health` with 200 (loading the model takes a while), printing progress.
//!    A worker that exits before it is ready aborts the start: its flags or
//!    model are most likely wrong and restarting would not help.
//! 2. Start the frontend, wait for it, print the table of endpoints.
//! 3. Supervise: a process that exits is restarted on the same ports after a
//!    backoff (doubling from [`LocalConfig::restart_backoff`] while it keeps
//!    crashing within a minute of starting, capped at
//!    [`LocalConfig::max_restart_backoff`]).
//! 4. On shutdown, stop the frontend, then the decode workers, then the prefill
//!    workers (so no tier loses the one it drains into): SIGTERM, and SIGKILL
//!    after the grace period. The endpoints file is removed.
//!
//! Children run in their own process group, so a Ctrl-C at the terminal
//! reaches only the supervisor, which then stops them in that order; on Linux
//! they get SIGTERM should the supervisor itself die.

mod control;
mod scrape_targets;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};

use crate::discovery::{DiscoveryError, EndpointsFile, ProcessEntry, Role};
pub use control::{ScaleRequest, TierStatus, Tiers};
pub use scrape_targets::{ScrapeTargets, ScrapeTargetsError};

/// Most replicas of one tier: a guard against a typo starting a thousand
/// model servers on one machine.
pub const MAX_REPLICAS: usize = 64;

/// A process that ran this long before crashing gets the initial backoff again.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);

/// How long one `/health` probe may take.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the start-up progress line repeats while processes load.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("--decode must be at least 1: the frontend needs a decode worker to route to")]
    NoDecodeWorkers,
    #[error("{requested} {role} replicas is more than the {MAX_REPLICAS} tandem local runs")]
    TooManyReplicas { role: Role, requested: usize },
    #[error("only the prefill and decode tiers scale, not `{0}`")]
    NotATier(String),
    #[error("cannot listen on {addr}: {source} (pick another port)")]
    PortUnavailable {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start {name} ({program}): {source}")]
    Spawn {
        name: String,
        program: String,
        source: std::io::Error,
    },
    #[error("{name} exited with {status} before becoming ready (its output is above{log_hint})")]
    ExitedBeforeReady {
        name: String,
        status: String,
        log_hint: String,
    },
    #[error(
        "not ready after {seconds} s: {waiting} (raise --ready-timeout-secs if the model is large)"
    )]
    ReadyTimeout { seconds: u64, waiting: String },
    #[error("cannot create the log file or directory {path}: {source}")]
    LogFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Endpoints(#[from] DiscoveryError),
    #[error(transparent)]
    ScrapeTargets(#[from] ScrapeTargetsError),
    #[error("the supervisor stopped")]
    Stopped,
}

/// Everything `tandem local` needs; the CLI fills it from its flags.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// The program every child runs (`tandem` itself for the CLI).
    pub program: PathBuf,
    /// Arguments before the role name (none for `tandem`; tests put a script here).
    pub program_args: Vec<OsString>,
    pub prefill: usize,
    pub decode: usize,
    /// Loopback address every process listens on.
    pub host: IpAddr,
    /// The frontend's HTTP port (the OpenAI API); 0 picks a free one.
    pub frontend_port: u16,
    /// Written on every change; removed on shutdown.
    pub endpoints_file: PathBuf,
    /// A Prometheus file-SD targets file written with the endpoints file (the
    /// up processes, labelled for the planner); `None` writes none.
    pub scrape_targets: Option<ScrapeTargets>,
    /// Arguments every role gets (e.g. `--model M`).
    pub common_args: Vec<String>,
    /// Arguments of one role only, after the ones the supervisor sets.
    pub prefill_args: Vec<String>,
    pub decode_args: Vec<String>,
    pub frontend_args: Vec<String>,
    /// Per-process log files (`<role>-<index>.log`, appended across restarts)
    /// instead of prefixed lines on this process's stderr.
    pub log_dir: Option<PathBuf>,
    /// Port of the control endpoint (`GET /tiers`, `PUT /tiers/{tier}`);
    /// `None` serves none.
    pub control_port: Option<u16>,
    /// How long a stopped process may drain before SIGKILL.
    pub shutdown_grace: Duration,
    /// How long start-up may wait for every process to be ready.
    pub ready_timeout: Duration,
    pub restart_backoff: Duration,
    pub max_restart_backoff: Duration,
    /// How often a starting process's `/health` is probed.
    pub health_interval: Duration,
}

impl LocalConfig {
    /// Defaults for everything but the program and the tier sizes.
    pub fn new(program: PathBuf, prefill: usize, decode: usize, endpoints_file: PathBuf) -> Self {
        Self {
            program,
            program_args: Vec::new(),
            prefill,
            decode,
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            frontend_port: 8000,
            endpoints_file,
            scrape_targets: None,
            common_args: Vec::new(),
            prefill_args: Vec::new(),
            decode_args: Vec::new(),
            frontend_args: Vec::new(),
            log_dir: None,
            control_port: None,
            shutdown_grace: Duration::from_secs(30),
            ready_timeout: Duration::from_secs(600),
            restart_backoff: Duration::from_secs(1),
            max_restart_backoff: Duration::from_secs(30),
            health_interval: Duration::from_millis(250),
        }
    }

    fn validate(&self) -> Result<(), LocalError> {
        if self.decode == 0 {
            return Err(LocalError::NoDecodeWorkers);
        }
        for (role, requested) in [(Role::Prefill, self.prefill), (Role::Decode, self.decode)] {
            if requested > MAX_REPLICAS {
                return Err(LocalError::TooManyReplicas { role, requested });
            }
        }
        Ok(())
    }
}

type SlotKey = (Role, usize);

/// Replaced, in every argument a child gets, by the child's index within its
/// role (`decode-1` gets `1`): per-replica settings such as `--device
/// cuda:{index}`, one GPU per worker. `{index*K}` becomes the index times K,
/// for workers of K GPUs each: `--device cuda:{index*2} --tensor-parallel-size
/// 2` puts decode-0 on GPUs 0-1 and decode-1 on GPUs 2-3.
pub const INDEX_PLACEHOLDER: &str = "{index}";

/// `arg` with every `{index}` replaced by `index` and every `{index*K}` (K a
/// whole number) by `index * K`; anything else is left as it is.
pub fn expand_index(arg: &str, index: usize) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(at) = rest.find("{index") {
        out.push_str(&rest[..at]);
        let tail = &rest[at + "{index".len()..];
        let close = tail.find('}');
        let factor = match close {
            Some(0) => Some(1),
            Some(end) => tail[..end]
                .strip_prefix('*')
                .and_then(|k| k.trim().parse::<usize>().ok()),
            None => None,
        };
        match (factor, close) {
            (Some(k), Some(end)) => {
                out.push_str(&(index * k).to_string());
                rest = &tail[end + 1..];
            }
            _ => {
                out.push_str("{index");
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

fn slot_name((role, index): SlotKey) -> String {
    format!("{role}-{index}")
}

/// What a slot's process is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Started, `/health` not yet 200.
    Starting,
    /// Answered `/health` with 200.
    Up,
    /// Exited unexpectedly; a restart is scheduled.
    WaitingRestart,
    /// Told to stop (scale-down or shutdown); no restart.
    Stopping,
    /// Stopped for good.
    Stopped,
}

/// One supervised process position: a role and index with fixed ports.
struct Slot {
    http: SocketAddr,
    grpc: Option<SocketAddr>,
    pid: Option<u32>,
    phase: Phase,
    /// Counts spawns, so events of an earlier process of this slot are ignored.
    generation: u64,
    /// Tells the running process's monitor to stop it (with this grace).
    stop: Option<oneshot::Sender<Duration>>,
    started_at: Instant,
    quick_crashes: u32,
    /// Scaled down: forget the slot once its process is gone.
    removing: bool,
}

enum Event {
    Ready {
        key: SlotKey,
        generation: u64,
    },
    Exited {
        key: SlotKey,
        generation: u64,
        status: String,
    },
    RestartDue {
        key: SlotKey,
        generation: u64,
    },
}

/// Requests from the control endpoint.
enum Request {
    Tiers(oneshot::Sender<Tiers>),
    Scale {
        role: Role,
        replicas: usize,
        reply: oneshot::Sender<Result<Tiers, LocalError>>,
    },
}

/// Runs the deployment until `shutdown` resolves, then stops it. Returns an
/// error if it could not start (the processes already started are stopped).
pub async fn run(
    config: LocalConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), LocalError> {
    config.validate()?;
    if let Some(dir) = &config.log_dir {
        std::fs::create_dir_all(dir).map_err(|source| LocalError::LogFile {
            path: dir.clone(),
            source,
        })?;
    }
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut supervisor = Supervisor {
        config,
        slots: BTreeMap::new(),
        events_tx,
        ports_taken: Vec::new(),
        control_addr: None,
    };
    let mut shutdown = std::pin::pin!(shutdown);

    match supervisor.start_up(&mut events, shutdown.as_mut()).await {
        Ok(true) => {}
        Ok(false) => {
            supervisor.shut_down(&mut events).await;
            return Ok(());
        }
        Err(e) => {
            supervisor.shut_down(&mut events).await;
            return Err(e);
        }
    }
    let (mut requests, control_task) = match supervisor.start_control().await {
        Ok(Some((requests, task))) => (Some(requests), Some(task)),
        Ok(None) => (None, None),
        Err(e) => {
            supervisor.shut_down(&mut events).await;
            return Err(e);
        }
    };
    supervisor.print_table();

    loop {
        tokio::select! {
            () = shutdown.as_mut() => break,
            Some(event) = events.recv() => {
                // Only a failed endpoints-file write gets here; the processes
                // themselves are fine, so keep supervising.
                if let Err(e) = supervisor.handle_event(event, false) {
                    tracing::error!("{e}");
                }
            }
            Some(request) = recv_request(&mut requests) => supervisor.handle_request(request),
        }
    }
    if let Some(task) = control_task {
        task.abort();
    }
    supervisor.shut_down(&mut events).await;
    Ok(())
}

async fn recv_request(requests: &mut Option<mpsc::Receiver<Request>>) -> Option<Request> {
    match requests {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

struct Supervisor {
    config: LocalConfig,
    slots: BTreeMap<SlotKey, Slot>,
    events_tx: mpsc::UnboundedSender<Event>,
    /// Ports handed out in this run, so two slots never get the same one.
    ports_taken: Vec<u16>,
    /// Where the control endpoint listens, once it does.
    control_addr: Option<SocketAddr>,
}

impl Supervisor {
    /// Starts the workers, then the frontend, waiting for each stage to be
    /// ready. `Ok(false)`: shutdown was requested meanwhile.
    async fn start_up(
        &mut self,
        events: &mut mpsc::UnboundedReceiver<Event>,
        mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<bool, LocalError> {
        let frontend_http = SocketAddr::new(self.config.host, self.config.frontend_port);
        // Fail before loading any model if the API port is taken.
        let frontend_http = if self.config.frontend_port == 0 {
            self.free_addr()?
        } else {
            TcpListener::bind(frontend_http).map_err(|source| LocalError::PortUnavailable {
                addr: frontend_http,
                source,
            })?;
            frontend_http
        };
        let deadline = Instant::now() + self.config.ready_timeout;
        for index in 0..self.config.prefill {
            self.add_slot((Role::Prefill, index))?;
        }
        for index in 0..self.config.decode {
            self.add_slot((Role::Decode, index))?;
        }
        eprintln!(
            "tandem local: starting {} prefill and {} decode workers",
            self.config.prefill, self.config.decode
        );
        if !self.wait_ready(events, shutdown.as_mut(), deadline).await? {
            return Ok(false);
        }
        let key = (Role::Frontend, 0);
        self.slots.insert(key, self.new_slot(frontend_http, None));
        self.spawn(key)?;
        eprintln!("tandem local: starting the frontend on http://{frontend_http}");
        self.wait_ready(events, shutdown, deadline).await
    }

    /// Processes events until every slot is up. `Ok(false)`: shutdown requested.
    async fn wait_ready(
        &mut self,
        events: &mut mpsc::UnboundedReceiver<Event>,
        mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
        deadline: Instant,
    ) -> Result<bool, LocalError> {
        let started = Instant::now();
        let mut progress =
            tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        loop {
            let waiting: Vec<String> = self
                .slots
                .iter()
                .filter(|(_, s)| s.phase != Phase::Up)
                .map(|(k, _)| slot_name(*k))
                .collect();
            if waiting.is_empty() {
                return Ok(true);
            }
            tokio::select! {
                () = shutdown.as_mut() => return Ok(false),
                Some(event) = events.recv() => {
                    if let Event::Ready { key, generation } = &event {
                        if self.slots.get(key).is_some_and(|s| s.generation == *generation) {
                            eprintln!(
                                "tandem local: {} ready after {:.1} s",
                                slot_name(*key),
                                started.elapsed().as_secs_f64()
                            );
                        }
                    }
                    self.handle_event(event, true)?;
                }
                _ = progress.tick() => eprintln!(
                    "tandem local: waiting for {} ({:.0} s; loading the model)",
                    waiting.join(", "),
                    started.elapsed().as_secs_f64()
                ),
                () = tokio::time::sleep_until(deadline.into()) => {
                    return Err(LocalError::ReadyTimeout {
                        seconds: self.config.ready_timeout.as_secs(),
                        waiting: waiting.join(", "),
                    });
                }
            }
        }
    }

    async fn start_control(
        &mut self,
    ) -> Result<Option<(mpsc::Receiver<Request>, tokio::task::JoinHandle<()>)>, LocalError> {
        let Some(port) = self.config.control_port else {
            return Ok(None);
        };
        let addr = SocketAddr::new(self.config.host, port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| LocalError::PortUnavailable { addr, source })?;
        let bound = listener.local_addr().unwrap_or(addr);
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(control::serve(listener, tx));
        self.control_addr = Some(bound);
        Ok(Some((rx, task)))
    }

    fn handle_request(&mut self, request: Request) {
        match request {
            Request::Tiers(reply) => {
                let _ = reply.send(self.tiers());
            }
            Request::Scale {
                role,
                replicas,
                reply,
            } => {
                let result = self.scale(role, replicas).map(|()| self.tiers());
                let _ = reply.send(result);
            }
        }
    }

    fn tiers(&self) -> Tiers {
        let status = |role: Role| {
            let slots = || {
                self.slots
                    .iter()
                    .filter(move |((r, _), s)| *r == role && !s.removing)
            };
            TierStatus {
                replicas: slots().count(),
                ready: slots().filter(|(_, s)| s.phase == Phase::Up).count(),
            }
        };
        Tiers {
            prefill: status(Role::Prefill),
            decode: status(Role::Decode),
        }
    }

    /// Adds slots above the highest index, or stops the highest ones.
    fn scale(&mut self, role: Role, replicas: usize) -> Result<(), LocalError> {
        if role == Role::Frontend {
            return Err(LocalError::NotATier(role.to_string()));
        }
        if replicas > MAX_REPLICAS {
            return Err(LocalError::TooManyReplicas {
                role,
                requested: replicas,
            });
        }
        let mut kept: Vec<usize> = self
            .slots
            .iter()
            .filter(|((r, _), s)| *r == role && !s.removing)
            .map(|((_, i), _)| *i)
            .collect();
        kept.sort_unstable();
        let before = kept.len();
        if replicas > before {
            // A slot still draining from an earlier scale-down keeps its index.
            let first = self
                .slots
                .keys()
                .filter(|(r, _)| *r == role)
                .map(|(_, i)| i + 1)
                .max()
                .unwrap_or(0);
            for index in first..first + (replicas - before) {
                self.add_slot((role, index))?;
            }
        } else {
            for &index in kept[replicas..].iter().rev() {
                let key = (role, index);
                if let Some(slot) = self.slots.get_mut(&key) {
                    slot.removing = true;
                }
                self.stop_slot(key);
            }
        }
        if replicas != before {
            tracing::info!(tier = %role, from = before, to = replicas, "scaling");
            eprintln!("tandem local: scaling {role} from {before} to {replicas}");
        }
        self.write_endpoints()?;
        Ok(())
    }

    fn new_slot(&self, http: SocketAddr, grpc: Option<SocketAddr>) -> Slot {
        Slot {
            http,
            grpc,
            pid: None,
            phase: Phase::Stopped,
            generation: 0,
            stop: None,
            started_at: Instant::now(),
            quick_crashes: 0,
            removing: false,
        }
    }

    /// A worker slot on fresh ports, started.
    fn add_slot(&mut self, key: SlotKey) -> Result<(), LocalError> {
        let http = self.free_addr()?;
        let grpc = self.free_addr()?;
        self.slots.insert(key, self.new_slot(http, Some(grpc)));
        self.spawn(key)
    }

    /// A port free now. Another program could take it before the child binds
    /// it; the child then exits and is reported (at start-up) or restarted.
    fn free_addr(&mut self) -> Result<SocketAddr, LocalError> {
        loop {
            let any = SocketAddr::new(self.config.host, 0);
            let addr = TcpListener::bind(any)
                .and_then(|l| l.local_addr())
                .map_err(|source| LocalError::PortUnavailable { addr: any, source })?;
            if !self.ports_taken.contains(&addr.port()) {
                self.ports_taken.push(addr.port());
                return Ok(addr);
            }
        }
    }

    fn child_args(&self, key: SlotKey, slot: &Slot) -> Vec<OsString> {
        let (role, index) = key;
        let c = &self.config;
        let mut args: Vec<OsString> = c.program_args.clone();
        let mut push = |a: &str| args.push(a.into());
        push(role.as_str());
        push("--host");
        push(&slot.http.ip().to_string());
        push("--port");
        push(&slot.http.port().to_string());
        if let Some(grpc) = slot.grpc {
            push("--grpc-port");
            push(&grpc.port().to_string());
        }
        if role != Role::Prefill {
            // Frontends find decode workers, decode workers prefill workers.
            push("--discovery");
            push("file");
            push("--endpoints-file");
            args.push(c.endpoints_file.clone().into());
        }
        let own = match role {
            Role::Prefill => &c.prefill_args,
            Role::Decode => &c.decode_args,
            Role::Frontend => &c.frontend_args,
        };
        args.extend(
            c.common_args
                .iter()
                .chain(own)
                .map(|a| OsString::from(expand_index(a, index))),
        );
        args
    }

    /// Starts the slot's process and its monitor.
    fn spawn(&mut self, key: SlotKey) -> Result<(), LocalError> {
        let name = slot_name(key);
        let slot = &self.slots[&key];
        let args = self.child_args(key, slot);
        let mut command = Command::new(&self.config.program);
        command.args(&args).stdin(Stdio::null()).kill_on_drop(true);
        // Own process group: a Ctrl-C at the terminal reaches only the
        // supervisor, which stops the children in order.
        command.process_group(0);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                // Stop (gracefully) should the supervisor die without cleaning up.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        match &self.config.log_dir {
            Some(dir) => {
                let path = dir.join(format!("{name}.log"));
                let log_error = |source| LocalError::LogFile {
                    path: path.clone(),
                    source,
                };
                let out = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(log_error)?;
                let err = out.try_clone().map_err(log_error)?;
                command.stdout(out).stderr(err);
            }
            None => {
                command.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
        }
        let mut child = command.spawn().map_err(|source| LocalError::Spawn {
            name: name.clone(),
            program: self.config.program.display().to_string(),
            source,
        })?;
        if let Some(out) = child.stdout.take() {
            tokio::spawn(prefix_lines(out, name.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(prefix_lines(err, name.clone()));
        }
        let (stop_tx, stop_rx) = oneshot::channel();
        let slot = self.slots.get_mut(&key).expect("spawned slots exist");
        slot.generation += 1;
        slot.pid = child.id();
        slot.phase = Phase::Starting;
        slot.stop = Some(stop_tx);
        slot.started_at = Instant::now();
        tracing::debug!(process = %name, pid = ?slot.pid, args = ?args, "started");
        tokio::spawn(monitor(
            child,
            key,
            slot.generation,
            slot.http,
            self.config.health_interval,
            self.events_tx.clone(),
            stop_rx,
        ));
        self.write_endpoints()?;
        Ok(())
    }

    /// Tells the slot's process to stop; its exit arrives as an event.
    fn stop_slot(&mut self, key: SlotKey) {
        let grace = self.config.shutdown_grace;
        let Some(slot) = self.slots.get_mut(&key) else {
            return;
        };
        match slot.stop.take() {
            Some(stop) => {
                slot.phase = Phase::Stopping;
                let _ = stop.send(grace);
            }
            // Nothing running (waiting for a restart): done at once.
            None => {
                slot.phase = Phase::Stopped;
                if slot.removing {
                    self.slots.remove(&key);
                }
            }
        }
    }

    /// `during_start_up`: an unexpected exit is an error, not a restart.
    fn handle_event(&mut self, event: Event, during_start_up: bool) -> Result<(), LocalError> {
        match event {
            Event::Ready { key, generation } => {
                let Some(slot) = self.slots.get_mut(&key) else {
                    return Ok(());
                };
                if slot.generation != generation || slot.phase != Phase::Starting {
                    return Ok(());
                }
                slot.phase = Phase::Up;
                if !during_start_up {
                    let pid = slot.pid.map(|p| p.to_string()).unwrap_or_default();
                    eprintln!("tandem local: {} is up (pid {pid})", slot_name(key));
                }
            }
            Event::Exited {
                key,
                generation,
                status,
            } => {
                let Some(slot) = self.slots.get_mut(&key) else {
                    return Ok(());
                };
                if slot.generation != generation {
                    return Ok(());
                }
                slot.pid = None;
                slot.stop = None;
                if slot.phase == Phase::Stopping {
                    slot.phase = Phase::Stopped;
                    if slot.removing {
                        self.slots.remove(&key);
                    }
                } else if during_start_up {
                    slot.phase = Phase::Stopped;
                    let log_hint = match &self.config.log_dir {
                        Some(dir) => format!(
                            " and in {}",
                            dir.join(format!("{}.log", slot_name(key))).display()
                        ),
                        None => String::new(),
                    };
                    return Err(LocalError::ExitedBeforeReady {
                        name: slot_name(key),
                        status,
                        log_hint,
                    });
                } else {
                    slot.phase = Phase::WaitingRestart;
                    if slot.started_at.elapsed() >= BACKOFF_RESET_AFTER {
                        slot.quick_crashes = 0;
                    }
                    let backoff = self
                        .config
                        .restart_backoff
                        .saturating_mul(1 << slot.quick_crashes.min(16))
                        .min(self.config.max_restart_backoff);
                    slot.quick_crashes += 1;
                    eprintln!(
                        "tandem local: {} exited with {status}; restarting in {:.1} s",
                        slot_name(key),
                        backoff.as_secs_f64()
                    );
                    let events = self.events_tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(backoff).await;
                        let _ = events.send(Event::RestartDue { key, generation });
                    });
                }
            }
            Event::RestartDue { key, generation } => {
                let due = self.slots.get(&key).is_some_and(|s| {
                    s.generation == generation && s.phase == Phase::WaitingRestart
                });
                if due {
                    if let Err(e) = self.spawn(key) {
                        // Try again later rather than give up on the slot.
                        tracing::error!("{e}");
                        let events = self.events_tx.clone();
                        let backoff = self.config.max_restart_backoff;
                        tokio::spawn(async move {
                            tokio::time::sleep(backoff).await;
                            let _ = events.send(Event::RestartDue { key, generation });
                        });
                    }
                    return Ok(());
                }
            }
        }
        self.write_endpoints()?;
        Ok(())
    }

    /// Stops the frontend, then the decode tier, then the prefill tier, then
    /// removes the endpoints file.
    async fn shut_down(&mut self, events: &mut mpsc::UnboundedReceiver<Event>) {
        eprintln!("tandem local: stopping");
        for role in [Role::Frontend, Role::Decode, Role::Prefill] {
            let keys: Vec<SlotKey> = self
                .slots
                .keys()
                .filter(|(r, _)| *r == role)
                .copied()
                .collect();
            for &key in &keys {
                self.stop_slot(key);
            }
            if let Err(e) = self.write_endpoints() {
                tracing::warn!("{e}");
            }
            while self.slots.values().any(|s| s.phase == Phase::Stopping) {
                let Some(event) = events.recv().await else {
                    break;
                };
                // Restarts are off now: only exits matter.
                if let Event::Exited { .. } = event {
                    if let Err(e) = self.handle_event(event, false) {
                        tracing::warn!("{e}");
                    }
                }
            }
        }
        if let Err(e) = std::fs::remove_file(&self.config.endpoints_file) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(
                    "cannot remove {}: {e}",
                    self.config.endpoints_file.display()
                );
            }
        }
        if let Some(targets) = &self.config.scrape_targets {
            targets.remove();
        }
        eprintln!("tandem local: stopped");
    }

    /// Rewrites the endpoints file and, when asked for, the Prometheus targets.
    fn write_endpoints(&self) -> Result<(), LocalError> {
        let processes: Vec<ProcessEntry> = self
            .slots
            .iter()
            .map(|(&(role, index), s)| ProcessEntry {
                role,
                index,
                pid: s.pid,
                http: s.http.to_string(),
                grpc: s.grpc.map(|g| g.to_string()),
                up: s.phase == Phase::Up && !s.removing,
            })
            .collect();
        if let Some(targets) = &self.config.scrape_targets {
            targets.write(&processes)?;
        }
        EndpointsFile { processes }.write_atomically(&self.config.endpoints_file)?;
        Ok(())
    }

    fn print_table(&self) {
        println!("{}", self.table());
    }

    fn table(&self) -> String {
        use fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<12} {:>8}  {:<22} {:<22}",
            "PROCESS", "PID", "HTTP", "GRPC"
        );
        for (&key, s) in &self.slots {
            let _ = writeln!(
                out,
                "{:<12} {:>8}  {:<22} {:<22}",
                slot_name(key),
                s.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                s.http.to_string(),
                s.grpc.map(|g| g.to_string()).unwrap_or_else(|| "-".into()),
            );
        }
        if let Some(frontend) = self.slots.get(&(Role::Frontend, 0)) {
            let _ = writeln!(out, "OpenAI API: http://{}/v1", frontend.http);
        }
        if let Some(control) = self.control_addr {
            let _ = writeln!(out, "control:    http://{control}/tiers");
        }
        if let Some(targets) = &self.config.scrape_targets {
            let _ = writeln!(
                out,
                "scrape:     {} (Prometheus file_sd)",
                targets.path.display()
            );
        }
        let _ = write!(
            out,
            "endpoints:  {} (Ctrl-C stops everything)",
            self.config.endpoints_file.display()
        );
        out
    }
}

/// Owns one child process: reports when it answers `/health` with 200 and
/// when it exits; on a stop request sends SIGTERM, then SIGKILL after the grace.
async fn monitor(
    mut child: Child,
    key: SlotKey,
    generation: u64,
    http: SocketAddr,
    health_interval: Duration,
    events: mpsc::UnboundedSender<Event>,
    mut stop: oneshot::Receiver<Duration>,
) {
    let url = format!("http://{http}/health");
    let client = reqwest::Client::builder()
        .timeout(HEALTH_TIMEOUT)
        .no_proxy()
        .build()
        .expect("a plain HTTP client builds");
    let mut probe = tokio::time::interval(health_interval);
    let mut ready = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break describe_exit(status),
            grace = &mut stop => {
                // A dropped sender means the supervisor is gone: no grace.
                let grace = grace.unwrap_or(Duration::ZERO);
                break terminate(&mut child, grace).await;
            }
            _ = probe.tick(), if !ready => {
                let healthy = client
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == reqwest::StatusCode::OK);
                if healthy {
                    ready = true;
                    let _ = events.send(Event::Ready { key, generation });
                }
            }
        }
    };
    let _ = events.send(Event::Exited {
        key,
        generation,
        status,
    });
}

/// SIGTERM, then SIGKILL if the process is still there after `grace`.
async fn terminate(child: &mut Child, grace: Duration) -> String {
    if let Some(pid) = child.id() {
        // SAFETY: `pid` is our own child, not yet reaped (we hold its `Child`
        // and `wait` has not returned), so it cannot name another process.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => describe_exit(status),
        Err(_) => {
            tracing::warn!(pid = ?child.id(), "still running {grace:?} after SIGTERM; killing it");
            let _ = child.kill().await;
            format!(
                "{} (killed after the grace period)",
                describe_exit(child.wait().await)
            )
        }
    }
}

fn describe_exit(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("unknown status ({e})"),
    }
}

/// Copies a child's output to stderr, each line prefixed with its name.
async fn prefix_lines(stream: impl AsyncRead + Unpin, name: String) {
    let mut lines = BufReader::new(stream).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(line)) => eprintln!("[{name}] {line}"),
            Ok(None) => return,
            // Not UTF-8 or a read error: stop copying rather than spin.
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_placeholders_give_each_replica_its_own_gpus() {
        assert_eq!(expand_index("cuda:{index}", 3), "cuda:3");
        // Two GPUs a replica: decode-0 on 0-1, decode-1 on 2-3.
        assert_eq!(expand_index("cuda:{index*2}", 0), "cuda:0");
        assert_eq!(expand_index("cuda:{index*2}", 1), "cuda:2");
        assert_eq!(expand_index("cuda:{index*4}", 1), "cuda:4");
        assert_eq!(
            expand_index("/tmp/{index}/log-{index*3}", 2),
            "/tmp/2/log-6"
        );
        // Not a placeholder: left alone.
        assert_eq!(expand_index("{index*x}-{index", 1), "{index*x}-{index");
        assert_eq!(expand_index("{indexes}", 1), "{indexes}");
        assert_eq!(expand_index("--threads 1", 5), "--threads 1");
    }
}
