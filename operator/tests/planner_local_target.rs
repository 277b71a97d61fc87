//! [`LocalTarget`] against the real `tandem local` supervisor (the worker crate's library) with
//! stand-in children (the worker's `fixtures/fake_worker.py`, which serves `/health`), so it runs
//! in seconds without a model: the planner reads the tiers' replicas and readiness, resizes them,
//! and gets the control endpoint's own error message when it asks for too much. The loop with
//! the real model and a real Prometheus is `planner_local_loop.rs`.

use std::path::Path;
use std::time::{Duration, Instant};

use tandem::local::{self, LocalConfig};
use tandem_operator::planner::local::LocalTarget;
use tandem_operator::planner::{ScaleTarget, Tier, TierReplicas};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_for(
    target: &LocalTarget,
    tier: Tier,
    what: &str,
    done: impl Fn(TierReplicas) -> bool,
) -> TierReplicas {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(replicas) = target.replicas(tier).await {
            if done(replicas) {
                return replicas;
            }
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_planner_reads_and_resizes_tandem_local_tiers() {
    let dir = std::env::temp_dir().join(format!("tandem-local-target-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fake_worker =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../worker/tests/fixtures/fake_worker.py");
    let mut config = LocalConfig::new("python3".into(), 1, 1, dir.join("endpoints.json"));
    config.program_args = vec![fake_worker.into()];
    config.frontend_port = 0;
    config.shutdown_grace = Duration::from_secs(5);
    config.health_interval = Duration::from_millis(50);
    let control_port = free_port();
    config.control_port = Some(control_port);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let supervisor = tokio::spawn(local::run(config, async move {
        let _ = stopped.await;
    }));

    let mut target = LocalTarget::new(&format!("http://127.0.0.1:{control_port}")).unwrap();
    // The control endpoint opens once every process is up.
    let prefill = wait_for(&target, Tier::Prefill, "the control endpoint", |_| true).await;
    assert_eq!(
        prefill,
        TierReplicas {
            desired: 1,
            ready: 1
        }
    );

    target.set_desired(Tier::Prefill, 3).await.unwrap();
    let grown = target.replicas(Tier::Prefill).await.unwrap();
    assert_eq!(grown.desired, 3, "desired at once, ready as workers load");
    wait_for(&target, Tier::Prefill, "3 ready prefill workers", |r| {
        r.ready == 3
    })
    .await;
    assert_eq!(
        target.replicas(Tier::Decode).await.unwrap(),
        TierReplicas {
            desired: 1,
            ready: 1
        },
        "the other tier is untouched"
    );

    target.set_desired(Tier::Prefill, 1).await.unwrap();
    assert_eq!(
        target.replicas(Tier::Prefill).await.unwrap(),
        TierReplicas {
            desired: 1,
            ready: 1
        },
        "stopped workers leave at once"
    );

    let error = target
        .set_desired(Tier::Decode, 65)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("400") && error.contains("65 decode replicas is more than the 64"),
        "{error}"
    );

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), supervisor)
        .await
        .expect("tandem local stops")
        .unwrap()
        .unwrap();
    let error = target.replicas(Tier::Decode).await.unwrap_err().to_string();
    assert!(
        error.contains("is `tandem local --control-port` running?"),
        "{error}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
