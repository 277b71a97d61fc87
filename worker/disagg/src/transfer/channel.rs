//! The HTTP/2 settings both ends of a worker-to-worker connection use: flow
//! control windows and frame sizes that let 4 MiB KV chunks cross at link
//! speed, `TCP_NODELAY`, and keep-alives. The prefill worker's server
//! ([`server_builder`], [`incoming`]) and every client of a worker's services
//! ([`endpoint`]) take them from here.

use std::time::Duration;

use tonic::transport::Endpoint;

use super::rpc::TransferError;
use super::wire;

/// HTTP/2 windows big enough that a 4 MiB chunk is not throttled by flow
/// control on fast links (the 64 KiB default caps throughput per round trip).
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;
/// Largest HTTP/2 frame each side accepts: a 4 MiB chunk crosses in four
/// frames instead of 256 of the protocol's default 16 KiB, each of which
/// costs a header, a flow-control update and a trip through both stacks.
const MAX_FRAME: u32 = 1 << 20;
/// Chunk messages plus room for their other fields.
pub const MAX_MESSAGE_BYTES: usize = wire::MAX_CHUNK_BYTES + (64 << 10);

/// A `tonic` server builder with the transfer's flow-control windows and
/// frame size.
pub fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
}

/// A bound listener as the incoming connections of a tonic server, with
/// `TCP_NODELAY` on each: small messages (a first token, a cuda-ipc
/// `KvWritten`) leave at once instead of waiting out the peer's delayed ACK
/// (about 40 ms on Linux; `serve_with_incoming` does not apply the builder's
/// own `tcp_nodelay`).
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// A tonic endpoint for a worker at `addr` (`http://host:port`) with the
/// transfer's flow-control windows and frame size, `TCP_NODELAY`, and HTTP/2 keep-alives so
/// a peer that vanished without closing its socket is noticed.
pub fn endpoint(addr: &str, connect_timeout: Duration) -> Result<Endpoint, TransferError> {
    Ok(Endpoint::from_shared(addr.to_string())
        .map_err(|e| TransferError::Connection {
            peer: addr.to_string(),
            reason: format!("bad address: {e}"),
        })?
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_timeout(connect_timeout))
}
