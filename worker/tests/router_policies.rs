//! Router bookkeeping and the simple policies: the prefix index follows KV
//! events and worker churn, round-robin cycles, random covers every worker,
//! the prefill picker prefers the least loaded worker.

use std::collections::HashMap;

use tandem_disagg::router::{Router, RouterConfig, RouterError, RouterMode, WorkerId};
use tandem_engine::block_manager::{prefix_hashes, KvEvent};

const BLOCK_SIZE: usize = 16;

fn config(seed: u64) -> RouterConfig {
    RouterConfig {
        seed: Some(seed),
        ..RouterConfig::new(BLOCK_SIZE)
    }
}

fn router_with(mode: RouterMode, names: &[&str]) -> Router {
    let mut router = Router::new(mode, config(9)).unwrap();
    for name in names {
        assert!(router.add_worker(WorkerId::from(*name)));
    }
    router
}

fn stored(tokens: &[u32]) -> KvEvent {
    KvEvent::Stored {
        hashes: prefix_hashes(tokens, BLOCK_SIZE),
    }
}

fn id(name: &str) -> WorkerId {
    WorkerId::from(name)
}

#[test]
fn overlap_counts_full_blocks_across_a_partial_tail() {
    let mut router = router_with(RouterMode::Kv, &["a", "b"]);
    let cached: Vec<u32> = (0..40).collect(); // 2 full blocks + 8 tokens
    router.apply_event(&id("a"), &stored(&cached)).unwrap();

    // Same 40 tokens: the 2 full blocks match, the partial one never does.
    assert_eq!(router.overlaps(&cached), HashMap::from([(id("a"), 2)]));
    // Diverging inside the second block: only the first matches.
    let mut diverging: Vec<u32> = (0..20).collect();
    diverging.extend([999; 20]);
    assert_eq!(router.overlaps(&diverging), HashMap::from([(id("a"), 1)]));
    // Shorter than a block: nothing to match.
    assert!(router.overlaps(&cached[..15]).is_empty());

    let route = router.route(&cached).unwrap();
    assert_eq!(route.worker, id("a"));
    assert_eq!(route.overlap_blocks, 2);
    assert_eq!(route.prompt_blocks, 3, "the partial block is prefilled too");
}

#[test]
fn removed_blocks_and_removed_workers_leave_the_index() {
    let mut router = router_with(RouterMode::Kv, &["a", "b"]);
    let prompt: Vec<u32> = (100..164).collect(); // 4 blocks
    let hashes = prefix_hashes(&prompt, BLOCK_SIZE);
    router.apply_event(&id("a"), &stored(&prompt)).unwrap();
    router.apply_event(&id("b"), &stored(&prompt)).unwrap();

    router
        .apply_event(
            &id("a"),
            &KvEvent::Removed {
                hashes: vec![hashes[2]],
            },
        )
        .unwrap();
    assert_eq!(
        router.overlaps(&prompt),
        HashMap::from([(id("a"), 2), (id("b"), 4)])
    );

    assert!(router.remove_worker(&id("b")));
    assert!(!router.remove_worker(&id("b")), "already gone");
    assert_eq!(router.overlaps(&prompt), HashMap::from([(id("a"), 2)]));
    assert!(
        matches!(
            router.apply_event(&id("b"), &stored(&prompt)),
            Err(RouterError::UnknownWorker(w)) if w == id("b")
        ),
        "a late event must not bring a removed worker back"
    );
    for _ in 0..10 {
        assert_eq!(router.route(&prompt).unwrap().worker, id("a"));
    }

    // A worker whose event stream restarts keeps serving but forgets its cache.
    router.reset_worker_cache(&id("a")).unwrap();
    assert!(router.overlaps(&prompt).is_empty());
    assert_eq!(router.workers().collect::<Vec<_>>(), vec![&id("a")]);
}

#[test]
fn a_rejoining_worker_starts_with_an_empty_cache_and_load() {
    let mut router = router_with(RouterMode::Kv, &["a"]);
    let prompt: Vec<u32> = (0..32).collect();
    router.apply_event(&id("a"), &stored(&prompt)).unwrap();
    router.report_load(&id("a"), 500).unwrap();
    let route = router.route(&prompt).unwrap();
    router.remove_worker(&id("a"));
    router.finish(route.ticket); // the worker is gone: a no-op
    assert!(router.add_worker(id("a")));
    assert!(router.overlaps(&prompt).is_empty());
    assert_eq!(router.load(&id("a")), Some(0));
}

#[test]
fn load_combines_reports_with_routed_and_finished_requests() {
    let mut router = router_with(RouterMode::Kv, &["a"]);
    let prompt: Vec<u32> = (0..50).collect(); // 4 blocks
    router.report_load(&id("a"), 100).unwrap();
    let first = router.route(&prompt).unwrap();
    assert_eq!(first.load_blocks, 100);
    let second = router.route(&prompt).unwrap();
    assert_eq!(second.load_blocks, 104);
    assert_eq!(router.load(&id("a")), Some(108));
    router.finish(first.ticket);
    assert_eq!(router.load(&id("a")), Some(104));
    // A report covers what was routed before it.
    router.report_load(&id("a"), 40).unwrap();
    assert_eq!(router.load(&id("a")), Some(40));
    // Finishing a request the report counted takes it out; never below zero.
    router.finish(second.ticket);
    assert_eq!(router.load(&id("a")), Some(36));
    router.report_load(&id("a"), 0).unwrap();
    let third = router.route(&prompt).unwrap();
    router.report_load(&id("a"), 0).unwrap();
    router.finish(third.ticket);
    assert_eq!(router.load(&id("a")), Some(0));
}

#[test]
fn round_robin_cycles_in_joining_order() {
    let mut router = router_with(RouterMode::RoundRobin, &["a", "b", "c", "d"]);
    let prompt: Vec<u32> = (0..64).collect();
    router.apply_event(&id("c"), &stored(&prompt)).unwrap();
    let picks: Vec<String> = (0..8)
        .map(|_| router.route(&prompt).unwrap().worker.to_string())
        .collect();
    assert_eq!(picks, ["a", "b", "c", "d", "a", "b", "c", "d"]);

    // Removing a worker keeps the rotation: after "b" came "c", still does.
    router.route(&prompt).unwrap(); // a
    router.route(&prompt).unwrap(); // b
    router.remove_worker(&id("a"));
    let picks: Vec<String> = (0..4)
        .map(|_| router.route(&prompt).unwrap().worker.to_string())
        .collect();
    assert_eq!(picks, ["c", "d", "b", "c"]);
}

#[test]
fn random_covers_all_workers() {
    let mut router = router_with(RouterMode::Random, &["a", "b", "c", "d"]);
    let mut counts: HashMap<WorkerId, usize> = HashMap::new();
    for _ in 0..400 {
        *counts
            .entry(router.route(&[1, 2, 3]).unwrap().worker)
            .or_default() += 1;
    }
    assert_eq!(counts.len(), 4);
    for (worker, count) in &counts {
        // Expected 100, standard deviation about 8.7.
        assert!((60..=140).contains(count), "{worker}: {count} of 400");
    }
}

#[test]
fn excluded_and_missing_workers() {
    let mut router = router_with(RouterMode::Kv, &["a", "b"]);
    let prompt: Vec<u32> = (0..64).collect();
    router.apply_event(&id("a"), &stored(&prompt)).unwrap();
    let route = router.route_excluding(&prompt, &[id("a")]).unwrap();
    assert_eq!(route.worker, id("b"), "the excluded holder is skipped");
    assert!(matches!(
        router.route_excluding(&prompt, &[id("a"), id("b")]),
        Err(RouterError::NoWorkers)
    ));
    let mut empty = Router::new(RouterMode::RoundRobin, config(0)).unwrap();
    assert!(matches!(empty.route(&prompt), Err(RouterError::NoWorkers)));
    assert!(matches!(
        empty.report_load(&id("x"), 1),
        Err(RouterError::UnknownWorker(_))
    ));
}

#[test]
fn bad_configuration_and_modes_are_refused_by_name() {
    let err = Router::new(RouterMode::Kv, RouterConfig::new(0)).unwrap_err();
    assert!(err.to_string().contains("block size"), "{err}");
    let mut weighted = RouterConfig::new(16);
    weighted.prefill_block_weight = -1.0;
    let err = Router::new(RouterMode::Kv, weighted).unwrap_err();
    assert!(err.to_string().contains("-1"), "{err}");

    for mode in [RouterMode::Kv, RouterMode::RoundRobin, RouterMode::Random] {
        assert_eq!(mode.to_string().parse::<RouterMode>().unwrap(), mode);
    }
    let err = "least-loaded".parse::<RouterMode>().unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown router mode 'least-loaded' (expected kv, round-robin or random)"
    );
}

#[test]
fn prefill_picker_prefers_least_loaded_then_overlap() {
    let mut picker = Router::new_prefill_picker(config(5)).unwrap();
    for name in ["p0", "p1", "p2"] {
        picker.add_worker(id(name));
    }
    let prompt: Vec<u32> = (0..100).collect(); // 6 full blocks + 4 tokens
    picker.apply_event(&id("p0"), &stored(&prompt)).unwrap();
    picker
        .apply_event(&id("p1"), &stored(&prompt[..48]))
        .unwrap();

    // Equal loads: the one holding most of the prompt wins.
    let route = picker.route(&prompt).unwrap();
    assert_eq!(route.worker, id("p0"));
    assert_eq!(route.overlap_blocks, 6);
    assert_eq!(
        picker.load(&id("p0")),
        Some(1),
        "only the uncached block is prefill work"
    );

    // Now p0 is busier: least loaded comes first, overlap breaks the tie
    // between p1 (3 blocks cached) and p2 (none).
    let route = picker.route(&prompt).unwrap();
    assert_eq!(route.worker, id("p1"));
    assert_eq!(picker.load(&id("p1")), Some(4));

    // A much busier holder loses to an idle worker with nothing cached.
    picker.report_load(&id("p0"), 50).unwrap();
    picker.report_load(&id("p1"), 50).unwrap();
    let route = picker.route(&prompt).unwrap();
    assert_eq!(route.worker, id("p2"));
    assert_eq!(route.overlap_blocks, 0);
    picker.finish(route.ticket);
    assert_eq!(picker.load(&id("p2")), Some(0));
}

#[test]
fn prefill_picker_spreads_ties_without_overlap() {
    let mut chosen = HashMap::<WorkerId, usize>::new();
    for seed in 0..40 {
        let mut picker = Router::new_prefill_picker(config(seed)).unwrap();
        for name in ["p0", "p1", "p2"] {
            picker.add_worker(id(name));
        }
        *chosen
            .entry(picker.route(&[1; 40]).unwrap().worker)
            .or_default() += 1;
    }
    assert_eq!(
        chosen.len(),
        3,
        "idle workers are picked at random: {chosen:?}"
    );
}
