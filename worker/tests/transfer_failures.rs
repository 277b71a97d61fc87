//! The decode side of `Prefill` with the KV streamed when the prefill side goes wrong:
//! dies mid-stream, stalls, or ends early. Each gives a clear error, never a hang.

mod transfer_support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use tandem_api::infer::InferError;
use tandem_api::types::SamplingParams;
use tandem_disagg::transfer::client::PrefillClient;
use tandem_disagg::transfer::pb::{KvDtype, KvLayout};
use tandem_disagg::transfer::service::PrefillSource;
use tandem_disagg::transfer::{PrefillPart, RemotePrefillRequest, TransferError};
use transfer_support::serve_killable;

/// Sends the layout and the first of two layers, then either stalls forever
/// or ends the stream.
struct HalfPrefill {
    then_stall: bool,
}

impl PrefillSource for HalfPrefill {
    fn prefill_parts(
        &self,
        _: RemotePrefillRequest,
    ) -> BoxStream<'static, Result<PrefillPart, InferError>> {
        let mut layout = KvLayout {
            num_layers: 2,
            num_tokens: 3,
            kv_heads: 1,
            head_dim: 4,
            ..KvLayout::default()
        };
        layout.set_dtype(KvDtype::F32);
        let data = Bytes::from(vec![7u8; 3 * 4 * 4]);
        let parts = futures::stream::iter([
            Ok(PrefillPart::Layout(layout)),
            Ok(PrefillPart::Kv {
                layer: 0,
                start_pos: 0,
                k: data.clone(),
                v: data,
            }),
        ]);
        if self.then_stall {
            parts.chain(futures::stream::pending()).boxed()
        } else {
            parts.boxed()
        }
    }
}

fn request() -> RemotePrefillRequest {
    RemotePrefillRequest {
        request_id: "r".into(),
        prompt: vec![1, 2, 3],
        sampling: SamplingParams::greedy(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_dying_mid_stream_is_a_connection_error() {
    let (addr, server) = serve_killable(HalfPrefill { then_stall: true }, None);
    // A long message timeout: the broken connection, not the timer, must end it.
    let client = PrefillClient::new(&addr, Duration::from_secs(120)).unwrap();
    let fetch = tokio::spawn(async move { client.prefill(request()).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !fetch.is_finished(),
        "the transfer should be waiting on the stalled server"
    );
    let killed = Instant::now();
    server.shutdown_background();
    let err = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .expect("the client hung after the server died")
        .unwrap()
        .unwrap_err();
    assert!(killed.elapsed() < Duration::from_secs(10));
    assert!(matches!(err, TransferError::Connection { .. }), "{err:?}");
    assert!(err.to_string().contains(&addr), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_times_out() {
    let (addr, server) = serve_killable(HalfPrefill { then_stall: true }, None);
    let client = PrefillClient::new(&addr, Duration::from_millis(400)).unwrap();
    let started = Instant::now();
    let err = client.prefill(request()).await.unwrap_err();
    assert!(matches!(err, TransferError::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // Dropping a runtime inside another one panics; shut it down instead.
    server.shutdown_background();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ending_early_names_what_is_missing() {
    let (addr, server) = serve_killable(HalfPrefill { then_stall: false }, None);
    let client = PrefillClient::new(&addr, Duration::from_secs(30)).unwrap();
    let err = client.prefill(request()).await.unwrap_err();
    assert!(matches!(err, TransferError::Incomplete(_)), "{err:?}");
    assert!(
        err.to_string().contains("after 3 of 6 layer positions"),
        "{err}"
    );
    server.shutdown_background();
}
