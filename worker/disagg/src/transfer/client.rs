//! The decode side of the `Prefill` RPC: [`PrefillClient`] asks one prefill
//! worker to prefill a prompt and gets back its KV and first token, either
//! streamed in the answer ([`PrefillClient::prefill`]) or written into blocks
//! this worker reserved in its own pool and offered in the request
//! (cuda-ipc, [`PrefillClient::prefill_via_cuda_ipc`]). It counts
//! `tandem_kv_transfer_bytes_total` and `tandem_kv_transfer_seconds` on this
//! side.

use std::time::{Duration, Instant, SystemTime};

use tonic::transport::Channel;
use tonic::{Code, Status};

use super::channel::{endpoint, MAX_MESSAGE_BYTES};
use super::cuda_ipc::target_to_pb;
use super::rpc::{
    sampling_to_pb, token_from_pb, transfer_bytes, transfer_seconds, RemotePrefill,
    RemotePrefillRequest, TransferError, CUDA_IPC, GRPC,
};
use super::wire::KvAssembler;
use tandem_api::pb::{self, prefill_client, prefill_response::Part};
use tandem_api::types::TokenOutput;
use tandem_engine::backend::cuda::ipc::KvPoolExport;
use tandem_engine::{EngineHandle, KvReservation};
use tandem_telemetry::{phases, KeyValue};

/// `role` label of the transfer metrics on this side.
const ROLE: &str = "decode";

/// A client of one prefill worker's `Prefill` service.
#[derive(Clone)]
pub struct PrefillClient {
    client: prefill_client::PrefillClient<Channel>,
    peer: String,
    message_timeout: Duration,
}

/// What a prefill worker answered.
#[derive(Debug)]
pub enum Fetched {
    /// The KV came over the stream.
    Streamed(RemotePrefill),
    /// The KV went into the offered blocks (cuda-ipc); every write finished.
    Written {
        written: pb::KvWritten,
        first_token: TokenOutput,
    },
}

/// A prefill that offered cuda-ipc, as the decode worker gets it.
pub enum IpcPrefill {
    /// The KV is in `reservation`'s blocks: adopt them.
    Written {
        reservation: KvReservation,
        first_token: TokenOutput,
        written: pb::KvWritten,
    },
    /// The prefill worker declined and streamed the KV instead.
    Streamed(RemotePrefill),
}

impl PrefillClient {
    /// A client for the prefill worker at `addr` (`http://host:port`); it
    /// connects on first use. A transfer fails with [`TransferError::Timeout`]
    /// when no message arrives for `message_timeout`. Call it inside a Tokio
    /// runtime (the channel spawns its connection task there).
    pub fn new(addr: &str, message_timeout: Duration) -> Result<Self, TransferError> {
        let channel = endpoint(addr, message_timeout)?.connect_lazy();
        Ok(Self::with_channel(channel, addr, message_timeout))
    }

    /// A client on an existing channel (e.g. one a worker pool also uses for
    /// the peer's `Worker` service).
    pub fn with_channel(channel: Channel, peer: &str, message_timeout: Duration) -> Self {
        Self {
            client: prefill_client::PrefillClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            peer: peer.to_string(),
            message_timeout,
        }
    }

    /// The prefill worker's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Asks for a prefill with the KV streamed back.
    pub async fn prefill(
        &self,
        request: RemotePrefillRequest,
    ) -> Result<RemotePrefill, TransferError> {
        match self.fetch_with(request, None).await? {
            Fetched::Streamed(remote) => Ok(remote),
            Fetched::Written { .. } => Err(TransferError::Protocol(
                "KV written into this worker's pool, which was not offered".into(),
            )),
        }
    }

    /// Asks for a prefill offering cuda-ipc: reserves blocks for the prompt
    /// in `engine`'s pool, offers them to the prefill worker, and returns
    /// what it did. On any error the reservation is dropped, which frees the
    /// blocks.
    pub async fn prefill_via_cuda_ipc(
        &self,
        engine: &EngineHandle,
        request: RemotePrefillRequest,
    ) -> Result<IpcPrefill, TransferError> {
        let pool = engine.kv_pool_export().ok_or_else(|| {
            TransferError::Local("this worker's KV pool cannot be shared (no CUDA)".into())
        })?;
        self.prefill_via_cuda_ipc_into(engine, pool, request).await
    }

    /// [`PrefillClient::prefill_via_cuda_ipc`] offering `pool` as `engine`'s
    /// (tests offer a made-up one).
    pub async fn prefill_via_cuda_ipc_into(
        &self,
        engine: &EngineHandle,
        pool: &KvPoolExport,
        request: RemotePrefillRequest,
    ) -> Result<IpcPrefill, TransferError> {
        let reservation = engine
            .reserve_kv_blocks(request.prompt.len())
            .await
            .map_err(|e| TransferError::Local(format!("reserving KV blocks: {e}")))?;
        let target = target_to_pb(pool, reservation.block_ids());
        match self.fetch_with(request, Some(target)).await? {
            Fetched::Written {
                written,
                first_token,
            } => Ok(IpcPrefill::Written {
                reservation,
                first_token,
                written,
            }),
            Fetched::Streamed(remote) => Ok(IpcPrefill::Streamed(remote)),
        }
    }

    /// Asks for a prefill; with `cuda_ipc`, offers the prefill worker these
    /// blocks of this worker's pool to write the KV into. The answer is the
    /// KV streamed (always without `cuda_ipc`, or when the prefill worker
    /// declined: the reason is in the layout) or the news that it was written.
    pub async fn fetch_with(
        &self,
        request: RemotePrefillRequest,
        cuda_ipc: Option<pb::CudaIpcTarget>,
    ) -> Result<Fetched, TransferError> {
        let started = Instant::now();
        let offered_ipc = cuda_ipc.is_some();
        let req = pb::PrefillRequest {
            request_id: request.request_id,
            prompt: request.prompt,
            sampling: Some(sampling_to_pb(&request.sampling)),
            cuda_ipc,
        };
        let mut client = self.client.clone();
        let mut req = tonic::Request::new(req);
        tandem_telemetry::propagation::inject_current(req.metadata_mut());
        // When the layout arrived: the KV streams in from then on (`kv_transfer`).
        let mut layout_at: Option<SystemTime> = None;
        let mut stream = self.next(client.prefill(req)).await?.into_inner();
        let mut assembler: Option<KvAssembler> = None;
        let mut written: Option<pb::KvWritten> = None;
        let mut declined: Option<String> = None;
        let received = transfer_bytes(ROLE, "received", GRPC);
        loop {
            let Some(message) = self.next(stream.message()).await? else {
                let state = match &assembler {
                    None => "before the KV layout".to_string(),
                    Some(a) => format!("after {}, before the first token", a.progress()),
                };
                return Err(TransferError::Incomplete(format!(
                    "{} closed the stream {state}",
                    self.peer
                )));
            };
            match message.part {
                Some(Part::KvWritten(w))
                    if offered_ipc && assembler.is_none() && written.is_none() =>
                {
                    written = Some(w);
                }
                Some(Part::KvWritten(_)) => {
                    return Err(TransferError::Protocol(
                        "a KV-written message where none was expected".into(),
                    ))
                }
                Some(Part::FirstToken(token)) if written.is_some() => {
                    let written = written.expect("checked");
                    kv_transfer_span(
                        phases::before(SystemTime::now(), written.copy_seconds),
                        written.bytes,
                        CUDA_IPC,
                    );
                    transfer_bytes(ROLE, "received", CUDA_IPC).inc_by(written.bytes);
                    transfer_seconds(ROLE, "received", CUDA_IPC)
                        .observe(started.elapsed().as_secs_f64());
                    return Ok(Fetched::Written {
                        written,
                        first_token: token_from_pb(token),
                    });
                }
                Some(Part::Layout(layout)) if assembler.is_none() && written.is_none() => {
                    declined = (!layout.cuda_ipc_declined.is_empty())
                        .then(|| layout.cuda_ipc_declined.clone());
                    assembler = Some(KvAssembler::new(layout)?);
                    if tandem_telemetry::enabled() {
                        layout_at = Some(SystemTime::now());
                    }
                }
                Some(Part::Chunk(chunk)) => {
                    let a = assembler.as_mut().ok_or_else(|| {
                        TransferError::Protocol("a KV chunk before the layout".into())
                    })?;
                    let n = chunk.k.len() + chunk.v.len();
                    a.push(chunk)?;
                    received.inc_by(n as u64);
                }
                Some(Part::FirstToken(token)) => {
                    let a = assembler.ok_or_else(|| {
                        TransferError::Protocol("the first token before the KV layout".into())
                    })?;
                    let cached_tokens = a.layout().cached_tokens as usize;
                    let bytes = a.received_bytes();
                    let kv = a.into_pieces()?;
                    if let Some(start) = layout_at {
                        kv_transfer_span(start, bytes as u64, GRPC);
                    }
                    transfer_seconds(ROLE, "received", GRPC)
                        .observe(started.elapsed().as_secs_f64());
                    return Ok(Fetched::Streamed(RemotePrefill {
                        kv,
                        first_token: token_from_pb(token),
                        cached_tokens,
                        bytes,
                        cuda_ipc_declined: declined,
                    }));
                }
                Some(Part::Layout(_)) => {
                    return Err(TransferError::Protocol("a second KV layout".into()))
                }
                None => return Err(TransferError::Protocol("an empty message".into())),
            }
        }
    }

    fn status_error(&self, status: Status) -> TransferError {
        let reason = status.message().to_string();
        // tonic often repeats the cause in the message; say it once.
        let reason = match std::error::Error::source(&status).map(|c| c.to_string()) {
            Some(cause) if reason.is_empty() => cause,
            Some(cause) if !reason.contains(&cause) => format!("{reason}: {cause}"),
            _ => reason,
        };
        let peer = self.peer.clone();
        match status.code() {
            Code::InvalidArgument | Code::ResourceExhausted | Code::FailedPrecondition => {
                TransferError::Remote { peer, reason }
            }
            _ => TransferError::Connection { peer, reason },
        }
    }

    async fn next<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, TransferError> {
        match tokio::time::timeout(self.message_timeout, fut).await {
            Err(_) => Err(TransferError::Timeout {
                peer: self.peer.clone(),
                seconds: self.message_timeout.as_secs_f64(),
            }),
            Ok(r) => r.map_err(|s| self.status_error(s)),
        }
    }
}

/// The receiving side's `kv_transfer` span, from `start` to now, under the
/// current span (the Prefill call's client span).
fn kv_transfer_span(start: SystemTime, bytes: u64, transport: &'static str) {
    if !tandem_telemetry::enabled() {
        return;
    }
    phases::record(
        &tandem_telemetry::current_context(),
        "kv_transfer",
        start,
        SystemTime::now(),
        vec![
            KeyValue::new("tandem.kv.direction", "received"),
            KeyValue::new("tandem.kv.transport", transport),
            KeyValue::new("tandem.kv.bytes", bytes as i64),
        ],
    );
}
