//! `--device` checked before any weight is read: a large model takes minutes
//! to load, and a missing driver or GPU should not be found after that.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tandem_model::quant::GgmlType;
use tandem_model::testing::{random_weights, save_gguf_as, tiny_config, TokenizerSource};
use tandem_model::Architecture;

/// What the model loader logs once the weights are read (`tandem_model`).
const WEIGHTS_READ: &str = "model loaded";

fn tiny_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    save_gguf_as(
        &dir.path().join("tiny.gguf"),
        &cfg,
        &random_weights(&cfg, 1),
        TokenizerSource::Tiny,
        GgmlType::F32,
    )
    .unwrap();
    dir
}

fn serve(model: &tempfile::TempDir, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tandem"));
    c.args(["serve", "--port", "0", "--model"])
        .arg(model.path().join("tiny.gguf"))
        .args(args)
        .env("RUST_LOG", "info");
    c
}

fn serve_error(args: &[&str]) -> String {
    let model = tiny_model();
    let started = Instant::now();
    let out = serve(&model, args).output().unwrap();
    assert!(!out.status.success(), "serve {args:?} started");
    assert!(started.elapsed() < Duration::from_secs(60));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_usable_device_logs_the_weights_read() {
    // What the checks below rule out: on a device that passes, the loader says so.
    let model = tiny_model();
    let mut child = serve(&model, &["--device", "cpu"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let seen = lines
        .map_while(Result::ok)
        .any(|l| l.contains(WEIGHTS_READ));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(seen, "serve --device cpu never logged {WEIGHTS_READ:?}");
}

#[test]
fn cuda_without_a_driver_or_gpu_fails_before_the_weights_are_read() {
    let err = serve_error(&["--device", "cuda:7"]);
    // SAFETY: only tries to dlopen the library.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        // A GPU machine: the device count decides (cuda:7 exists only with 8).
        if !err.contains("cuda:7 asked for") {
            eprintln!("this machine has a cuda:7; nothing to check: {err}");
            return;
        }
    } else {
        assert!(err.contains("no CUDA driver found (libcuda.so)"), "{err}");
    }
    assert!(
        !err.contains(WEIGHTS_READ),
        "the weights were read first: {err}"
    );
}

#[test]
fn tensor_parallelism_on_the_cpu_fails_before_the_weights_are_read() {
    let err = serve_error(&["--device", "cpu", "--tensor-parallel-size", "2"]);
    assert!(err.contains("tensor-parallel"), "{err}");
    assert!(
        !err.contains(WEIGHTS_READ),
        "the weights were read first: {err}"
    );
}
