//! Runs the planner over the simulated benchmark traces and prints the results table
//! (`make bench` runs it). `--scale 0.5` halves every trace.

use tandem_operator::planner::sim::{
    benchmark_config, benchmark_traces, score_trace, table, ClusterParams,
};

fn main() -> anyhow::Result<()> {
    let mut scale = 1.0;
    let mut seed = 7;
    let mut verbose = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--scale" => {
                scale = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--scale needs a value"))?
                    .parse()?
            }
            "--seed" => {
                seed = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--seed needs a value"))?
                    .parse()?
            }
            "--verbose" => verbose = true,
            other => anyhow::bail!(
                "unknown argument {other:?} (expected --scale X, --seed N, --verbose)"
            ),
        }
    }
    let params = ClusterParams::default();
    let config = benchmark_config();
    let mut scores = Vec::new();
    for trace in benchmark_traces(scale) {
        let score = score_trace(&params, &trace, &config, seed);
        if verbose {
            println!("## {}", trace.name);
            for interval in &score.planner.intervals {
                let o = &interval.observation;
                println!(
                    "{:6.0}s rate {:5.1} ttft {:>6} itl {:>6} ready {}/{} -> {}/{} | {}",
                    interval.end_s,
                    o.request_rate.unwrap_or(0.0),
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
        scores.push(score);
    }
    println!(
        "Simulated P/D cluster ({params:?}), SLO TTFT p90 <= {:.0} ms, ITL p90 <= {:.0} ms, interval {:.0} s, seed {seed}, trace scale {scale}\n",
        config.slo.ttft_p90_s * 1e3,
        config.slo.itl_p90_s * 1e3,
        config.interval_s
    );
    print!("{}", table(&scores));
    Ok(())
}
