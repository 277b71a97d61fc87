//! A set of remote workers of one tier, kept current from discovery.
//!
//! For each worker the pool keeps one gRPC channel (shared by the caller's
//! client and the `Worker` service), polls `Worker.Load` every
//! `load_interval`, and follows `Worker.KvEvents` into a [`Router`]. A worker
//! takes part in routing only while its load polls succeed: one that stops
//! answering (killed, partitioned) leaves the router at its first failed poll
//! and rejoins, with an empty prefix index, when it answers again. Discovery
//! adds and removes workers at any time; nothing restarts.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::grpc_uri;
use super::worker_service::kv_event_from_pb;
use crate::router::{Route, RouteTicket, Router, RouterError, WorkerId};
use crate::transfer::channel::endpoint;
use crate::transfer::pb::{self, worker_client::WorkerClient};

/// How a pool watches its workers.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Which tier, for logs ("decode", "prefill").
    pub tier: &'static str,
    /// Time between load polls of each worker.
    pub load_interval: Duration,
    /// A load poll slower than this counts as failed; also the connect timeout.
    pub request_timeout: Duration,
}

impl PoolConfig {
    pub fn new(tier: &'static str) -> Self {
        Self {
            tier,
            load_interval: Duration::from_millis(200),
            request_timeout: Duration::from_secs(2),
        }
    }
}

struct Member<C> {
    client: Arc<C>,
    /// Routable: the last load poll succeeded.
    healthy: bool,
    last_load: Option<pb::LoadResponse>,
    tasks: Vec<JoinHandle<()>>,
}

impl<C> Drop for Member<C> {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct Inner<C> {
    router: Router,
    members: HashMap<WorkerId, Member<C>>,
}

/// Remote workers of one tier and a router over the healthy ones.
pub struct WorkerPool<C> {
    config: PoolConfig,
    inner: Mutex<Inner<C>>,
    /// Bumped whenever the healthy set changes; lets callers wait for a worker.
    healthy_tx: watch::Sender<usize>,
}

type ClientFactory<C> = dyn Fn(&str, Channel) -> C + Send + Sync;

impl<C: Send + Sync + 'static> WorkerPool<C> {
    /// Starts following `membership` (sets of `host:port` gRPC addresses).
    /// `make_client` builds the caller's client for a worker from its address
    /// and channel. Call inside a Tokio runtime.
    pub fn start(
        config: PoolConfig,
        router: Router,
        mut membership: watch::Receiver<BTreeSet<String>>,
        make_client: impl Fn(&str, Channel) -> C + Send + Sync + 'static,
    ) -> Arc<Self> {
        let (healthy_tx, _) = watch::channel(0);
        let pool = Arc::new(Self {
            config,
            inner: Mutex::new(Inner {
                router,
                members: HashMap::new(),
            }),
            healthy_tx,
        });
        let make_client: Arc<ClientFactory<C>> = Arc::new(make_client);
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            loop {
                let wanted = membership.borrow_and_update().clone();
                let Some(pool) = weak.upgrade() else { return };
                pool.sync_members(&wanted, &make_client);
                drop(pool);
                if membership.changed().await.is_err() {
                    return; // discovery ended: keep the last known set
                }
            }
        });
        pool
    }

    fn sync_members(
        self: &Arc<Self>,
        wanted: &BTreeSet<String>,
        make_client: &Arc<ClientFactory<C>>,
    ) {
        let mut inner = self.inner.lock().expect("pool lock");
        let gone: Vec<WorkerId> = inner
            .members
            .keys()
            .filter(|id| !wanted.contains(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            tracing::info!(tier = self.config.tier, worker = %id, "worker left");
            inner.members.remove(&id);
            inner.router.remove_worker(&id);
        }
        for address in wanted {
            let id = WorkerId::from(address.as_str());
            if inner.members.contains_key(&id) {
                continue;
            }
            let uri = grpc_uri(address);
            let channel = match endpoint(&uri, self.config.request_timeout) {
                Ok(e) => e.connect_lazy(),
                Err(e) => {
                    tracing::error!(tier = self.config.tier, worker = %id, "ignoring worker: {e}");
                    continue;
                }
            };
            tracing::info!(tier = self.config.tier, worker = %id, "worker joined");
            let client = Arc::new(make_client(address, channel.clone()));
            let weak = Arc::downgrade(self);
            let tasks = vec![
                tokio::spawn(poll_load(weak.clone(), id.clone(), channel.clone())),
                tokio::spawn(follow_kv_events(weak, id.clone(), channel)),
            ];
            inner.members.insert(
                id,
                Member {
                    client,
                    healthy: false,
                    last_load: None,
                    tasks,
                },
            );
        }
        self.publish_healthy(&inner);
    }

    fn publish_healthy(&self, inner: &Inner<C>) {
        let n = inner.members.values().filter(|m| m.healthy).count();
        self.healthy_tx.send_replace(n);
    }

    /// Workers that can be routed to now.
    pub fn healthy_workers(&self) -> usize {
        *self.healthy_tx.borrow()
    }

    /// Workers known from discovery, healthy or not.
    pub fn known_workers(&self) -> usize {
        self.inner.lock().expect("pool lock").members.len()
    }

    /// Waits until at least one worker is healthy, or `timeout` passes.
    pub async fn wait_for_worker(&self, timeout: Duration) -> bool {
        let mut rx = self.healthy_tx.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|n| *n > 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Routes `tokens` to a healthy worker not in `excluded` whose last load
    /// report passes `accept`, and counts the request in its load.
    pub fn route(
        &self,
        tokens: &[u32],
        excluded: &[WorkerId],
        accept: impl Fn(&pb::LoadResponse) -> bool,
    ) -> Result<(Route, Arc<C>), RouterError> {
        let mut inner = self.inner.lock().expect("pool lock");
        let mut skip: Vec<WorkerId> = excluded.to_vec();
        skip.extend(
            inner
                .members
                .iter()
                .filter(|(_, m)| m.last_load.as_ref().is_some_and(|l| !accept(l)))
                .map(|(id, _)| id.clone()),
        );
        let route = inner.router.route_excluding(tokens, &skip)?;
        let client = inner
            .members
            .get(&route.worker)
            .map(|m| m.client.clone())
            .expect("routed workers are members");
        Ok((route, client))
    }

    /// A worker's last load report (`None` before its first, or while it
    /// does not answer).
    pub fn last_load(&self, worker: &WorkerId) -> Option<pb::LoadResponse> {
        let inner = self.inner.lock().expect("pool lock");
        inner.members.get(worker)?.last_load.clone()
    }

    /// The request behind `ticket` ended.
    pub fn finish(&self, ticket: RouteTicket) {
        self.inner.lock().expect("pool lock").router.finish(ticket);
    }

    /// Marks a worker unroutable at once (a request just failed to reach it),
    /// without waiting for its next load poll.
    pub fn mark_unhealthy(&self, worker: &WorkerId) {
        let mut inner = self.inner.lock().expect("pool lock");
        let Inner { router, members } = &mut *inner;
        if let Some(m) = members.get_mut(worker) {
            if m.healthy {
                tracing::warn!(tier = self.config.tier, worker = %worker, "worker unreachable; not routing to it");
                m.healthy = false;
                router.remove_worker(worker);
            }
        }
        self.publish_healthy(&inner);
    }

    /// How many leading blocks of `tokens` each healthy worker holds.
    pub fn overlaps(&self, tokens: &[u32]) -> HashMap<WorkerId, usize> {
        self.inner
            .lock()
            .expect("pool lock")
            .router
            .overlaps(tokens)
    }

    fn record_load(&self, worker: &WorkerId, load: Option<pb::LoadResponse>) {
        let mut inner = self.inner.lock().expect("pool lock");
        let block_size = inner.router.block_size();
        let Inner { router, members } = &mut *inner;
        let Some(m) = members.get_mut(worker) else {
            return;
        };
        match load {
            Some(load) => {
                if !m.healthy {
                    if load.block_size as usize != block_size && load.block_size != 0 {
                        tracing::warn!(
                            tier = self.config.tier,
                            worker = %worker,
                            worker_block_size = load.block_size,
                            block_size,
                            "the worker's KV block size differs from the router's: prefix overlap will not be seen"
                        );
                    }
                    tracing::info!(tier = self.config.tier, worker = %worker, "worker ready");
                    m.healthy = true;
                    router.add_worker(worker.clone());
                }
                let _ = router.report_load(worker, u64::from(load.active_blocks));
                m.last_load = Some(load);
            }
            None => {
                if m.healthy {
                    tracing::warn!(tier = self.config.tier, worker = %worker, "worker stopped answering; not routing to it");
                    m.healthy = false;
                    router.remove_worker(worker);
                }
                m.last_load = None;
            }
        }
        self.publish_healthy(&inner);
    }

    fn apply_kv_event(&self, worker: &WorkerId, event: pb::KvEvent, reset: bool) {
        let mut inner = self.inner.lock().expect("pool lock");
        if reset {
            let _ = inner.router.reset_worker_cache(worker);
        }
        if let Some(event) = kv_event_from_pb(event) {
            // Unknown worker: not healthy right now; its index restarts when it is.
            let _ = inner.router.apply_event(worker, &event);
        }
    }
}

async fn poll_load<C: Send + Sync + 'static>(
    pool: std::sync::Weak<WorkerPool<C>>,
    worker: WorkerId,
    channel: Channel,
) {
    let mut client = WorkerClient::new(channel);
    loop {
        let Some(p) = pool.upgrade() else { return };
        let (interval, timeout) = (p.config.load_interval, p.config.request_timeout);
        drop(p);
        let load = match tokio::time::timeout(timeout, client.load(pb::LoadRequest {})).await {
            Ok(Ok(response)) => Some(response.into_inner()),
            Ok(Err(status)) => {
                tracing::debug!(worker = %worker, "load poll failed: {}", status.message());
                None
            }
            Err(_) => None,
        };
        let Some(p) = pool.upgrade() else { return };
        p.record_load(&worker, load);
        drop(p);
        tokio::time::sleep(interval).await;
    }
}

async fn follow_kv_events<C: Send + Sync + 'static>(
    pool: std::sync::Weak<WorkerPool<C>>,
    worker: WorkerId,
    channel: Channel,
) {
    let mut client = WorkerClient::new(channel);
    loop {
        if let Ok(response) = client.kv_events(pb::KvEventsRequest {}).await {
            let mut stream = response.into_inner();
            // Events may have been missed while disconnected: start clean.
            let mut reset = true;
            while let Ok(Some(event)) = stream.message().await {
                let Some(p) = pool.upgrade() else { return };
                p.apply_kv_event(&worker, event, reset);
                reset = false;
            }
        }
        if pool.upgrade().is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
