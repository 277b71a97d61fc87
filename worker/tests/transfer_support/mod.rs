//! Shared by the KV transfer tests: a prefill server the test can kill like a
//! dying process, and the tokens of a generation.
#![allow(dead_code)]

use tandem_api::infer::GenerateStream;
use tandem_api::types::{FinishReason, GenerateEvent};
use tandem_disagg::transfer::channel::server_builder;
use tandem_disagg::transfer::service::{PrefillService, PrefillSource};
use tokio_stream::wrappers::TcpListenerStream;

/// Serves `Prefill` over `source` on its own runtime, on its own threads, so
/// the test can kill the whole server (tasks, connections) at once by
/// dropping the runtime. `cuda_ipc_off` as for `PrefillService::server_with`.
pub fn serve_killable<S: PrefillSource>(
    source: S,
    cuda_ipc_off: Option<String>,
) -> (String, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // Bound here; served from inside the server's runtime (the calling test
    // already runs on one, where `block_on` is not allowed).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        server_builder()
            .add_service(PrefillService::server_with(source, cuda_ipc_off))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
    });
    (format!("http://{addr}"), rt)
}

/// The token ids of a generation that must end by length.
pub async fn tokens(mut stream: GenerateStream) -> Vec<u32> {
    let mut out = Vec::new();
    while let Some(ev) = stream.next_event().await {
        match ev {
            GenerateEvent::Token(t) => out.push(t.id),
            GenerateEvent::Finished(r) => {
                assert_eq!(r, FinishReason::Length);
                return out;
            }
            GenerateEvent::Error(e) => panic!("engine error: {e}"),
            GenerateEvent::Started { .. } | GenerateEvent::PromptLogprobs(_) => {}
        }
    }
    panic!("stream ended without Finished")
}
