//! Runs the planner over the simulated benchmark traces and prints one results table per seed
//! (`make bench-planner` runs it). Traces and seeds run in parallel, one thread each.
//!
//! `--scale 0.5` halves every trace; `--seeds 7,1,2` picks the seeds (default 7);
//! `--trace step` runs one trace; `--no-static` skips the search for the best static
//! allocation (the slow part); `--verbose` prints every interval's observation and decision.

use std::thread;

use tandem_operator::planner::sim::{
    benchmark_config, benchmark_traces, score_planner, score_trace, table, ClusterParams,
    TraceScore,
};

struct Args {
    scale: f64,
    seeds: Vec<u64>,
    trace: Option<String>,
    with_static: bool,
    verbose: bool,
}

fn parse() -> anyhow::Result<Args> {
    let mut parsed = Args {
        scale: 1.0,
        seeds: vec![7],
        trace: None,
        with_static: true,
        verbose: false,
    };
    let mut args = std::env::args().skip(1);
    let value = |name: &str, args: &mut dyn Iterator<Item = String>| {
        args.next()
            .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--scale" => parsed.scale = value("--scale", &mut args)?.parse()?,
            "--seed" | "--seeds" => {
                parsed.seeds = value("--seeds", &mut args)?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--trace" => parsed.trace = Some(value("--trace", &mut args)?),
            "--no-static" => parsed.with_static = false,
            "--verbose" => parsed.verbose = true,
            other => anyhow::bail!(
                "unknown argument {other:?} (expected --scale X, --seeds N[,N...], --trace NAME, --no-static, --verbose)"
            ),
        }
    }
    Ok(parsed)
}

fn print_intervals(score: &TraceScore) {
    println!("## {}", score.trace);
    for interval in &score.planner.intervals {
        let o = &interval.observation;
        println!(
            "{:6.0}s rate {:5.1} queue {:>5} ttft {:>6} itl {:>6} ready {}/{} -> {}/{} | {}",
            interval.end_s,
            o.request_rate.unwrap_or(0.0),
            o.prefill_queue_depth.unwrap_or(0.0),
            o.ttft_p90_s
                .map_or("-".into(), |v| format!("{:.0}ms", v * 1e3)),
            o.itl_p90_s
                .map_or("-".into(), |v| format!("{:.1}ms", v * 1e3)),
            o.ready.prefill,
            o.ready.decode,
            interval.desired.prefill,
            interval.desired.decode,
            interval.reason
        );
    }
}

fn main() -> anyhow::Result<()> {
    let args = parse()?;
    let params = ClusterParams::default();
    let config = benchmark_config();
    let traces: Vec<_> = benchmark_traces(args.scale)
        .into_iter()
        .filter(|t| args.trace.as_ref().is_none_or(|name| &t.name == name))
        .collect();
    anyhow::ensure!(!traces.is_empty(), "no trace named {:?}", args.trace);
    let scores: Vec<(u64, TraceScore)> = thread::scope(|scope| {
        let jobs: Vec<_> = args
            .seeds
            .iter()
            .flat_map(|&seed| traces.iter().map(move |trace| (seed, trace)))
            .map(|(seed, trace)| {
                let (params, config) = (&params, &config);
                let with_static = args.with_static;
                scope.spawn(move || {
                    let score = if with_static {
                        score_trace(params, trace, config, seed)
                    } else {
                        score_planner(params, trace, config, seed)
                    };
                    (seed, score)
                })
            })
            .collect();
        jobs.into_iter()
            .map(|job| job.join().expect("a simulation thread panicked"))
            .collect()
    });
    println!(
        "Simulated P/D cluster ({params:?}), SLO TTFT p90 <= {:.0} ms, ITL p90 <= {:.0} ms, interval {:.0} s, trace scale {}\n",
        config.slo.ttft_p90_s * 1e3,
        config.slo.itl_p90_s * 1e3,
        config.interval_s,
        args.scale
    );
    for &seed in &args.seeds {
        let of_seed: Vec<TraceScore> = scores
            .iter()
            .filter(|(s, _)| *s == seed)
            .map(|(_, score)| score.clone())
            .collect();
        if args.verbose {
            of_seed.iter().for_each(print_intervals);
        }
        println!("Seed {seed}:\n\n{}", table(&of_seed));
    }
    Ok(())
}
