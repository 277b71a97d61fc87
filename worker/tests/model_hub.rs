//! `tandem model fetch hf://ORG/REPO --output DIR` against a fake Hugging Face
//! Hub on loopback (HF_ENDPOINT), serving a tiny random model: what the
//! operator's init container runs.

mod hub_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hub_support::{hub_with, FileRequest, TOKEN};
use tandem_model::testing::tiny_config;
use tandem_model::Architecture;

fn fetch(endpoint: &str, token: Option<&str>, spec: &str, out: &Path) -> Output {
    let bin = std::env::var_os("TANDEM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_tandem")));
    let mut cmd = Command::new(bin);
    cmd.args(["model", "fetch", spec, "--output"])
        .arg(out)
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_TOKEN")
        // No token file of this machine's either.
        .env("HF_TOKEN_PATH", out.with_extension("no-token"))
        .env("RUST_LOG", "warn");
    if let Some(t) = token {
        cmd.env("HF_TOKEN", t);
    }
    cmd.output().unwrap()
}

fn succeeded(o: &Output) -> String {
    assert!(
        o.status.success(),
        "fetch failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn failed(o: &Output) -> String {
    assert!(!o.status.success(), "fetch unexpectedly succeeded");
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn fetched_directory_loads_and_a_second_fetch_downloads_nothing() {
    let (hub, endpoint) = hub_with(Some(TOKEN));
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("models/hf/org/tiny");
    let stdout = succeeded(&fetch(&endpoint, Some(TOKEN), "hf://org/tiny", &out));
    assert!(stdout.contains("files downloaded"), "{stdout}");

    // Only what Tandem loads, nothing half-written.
    let mut expected: Vec<String> = hub.repos["org/tiny"]
        .keys()
        .filter(|f| !f.contains('/') && *f != "README.md")
        .cloned()
        .collect();
    expected.sort();
    assert_eq!(names_in(&out), expected);
    for name in &expected {
        assert_eq!(
            std::fs::read(out.join(name)).unwrap(),
            hub.repos["org/tiny"][name],
            "{name}"
        );
    }
    let requests = hub.file_requests();
    assert_eq!(requests.len(), expected.len(), "{requests:?}");
    for r in &requests {
        assert_eq!(
            r.authorization.as_deref(),
            Some(format!("Bearer {TOKEN}").as_str()),
            "{r:?}"
        );
    }

    let loaded = tandem_model::load(&out).unwrap();
    let cfg = tiny_config(Architecture::Llama);
    assert_eq!(loaded.config.num_layers, cfg.num_layers);
    assert_eq!(loaded.config.vocab_size, cfg.vocab_size);

    let stdout = succeeded(&fetch(&endpoint, Some(TOKEN), "hf://org/tiny", &out));
    assert!(
        stdout.contains(&format!(
            "0 files downloaded (0 B), {} already complete",
            expected.len()
        )),
        "{stdout}"
    );
    assert_eq!(hub.file_requests().len(), requests.len());
}

#[test]
fn a_partial_download_is_resumed_and_an_oversized_one_replaced() {
    let (hub, endpoint) = hub_with(None);
    let weights = hub.repos["org/tiny"]["model.safetensors"].clone();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let partial = out.join(".model.safetensors.partial");
    let half = weights.len() / 2;
    std::fs::write(&partial, &weights[..half]).unwrap();

    succeeded(&fetch(&endpoint, None, "hf://org/tiny", &out));
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        weights
    );
    assert!(!partial.exists());
    let weight_requests: Vec<FileRequest> = hub
        .file_requests()
        .into_iter()
        .filter(|r| r.file == "model.safetensors")
        .collect();
    assert_eq!(weight_requests.len(), 1);
    assert_eq!(
        weight_requests[0].range.as_deref(),
        Some(format!("bytes={half}-").as_str())
    );
    // No token set, none sent.
    assert!(hub
        .file_requests()
        .iter()
        .all(|r| r.authorization.is_none()));

    // A final file of the wrong size and a partial longer than the file are
    // both thrown away: the weights are fetched whole.
    std::fs::write(out.join("model.safetensors"), b"stale").unwrap();
    std::fs::write(&partial, vec![9u8; weights.len() + 10]).unwrap();
    succeeded(&fetch(&endpoint, None, "hf://org/tiny", &out));
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        weights
    );
    let last = hub.file_requests().pop().unwrap();
    assert_eq!(
        (last.file.as_str(), last.range),
        ("model.safetensors", None)
    );
    tandem_model::load(&out).unwrap();
}

#[test]
fn an_index_decides_which_weights_are_fetched() {
    let (hub, endpoint) = hub_with(None);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    succeeded(&fetch(&endpoint, None, "hf://org/indexed", &out));
    let fetched: Vec<String> = hub.file_requests().into_iter().map(|r| r.file).collect();
    assert_eq!(fetched[0], "model.safetensors.index.json", "{fetched:?}");
    assert!(fetched.contains(&"model.safetensors".to_string()));
    assert!(
        !out.join("consolidated.safetensors").exists(),
        "{fetched:?}"
    );
    tandem_model::load(&out).unwrap();
}

#[test]
fn gated_missing_and_unloadable_repositories_say_why() {
    let (_hub, endpoint) = hub_with(Some(TOKEN));
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");

    let err = failed(&fetch(&endpoint, None, "hf://org/tiny", &out));
    assert!(
        err.contains("org/tiny: the repository is gated or private: set HF_TOKEN"),
        "{err}"
    );
    let err = failed(&fetch(&endpoint, Some("wrong"), "hf://org/tiny", &out));
    assert!(err.contains("HF_TOKEN was refused"), "{err}");

    let err = failed(&fetch(&endpoint, Some(TOKEN), "hf://org/nope", &out));
    assert!(
        err.contains("no repository org/nope at revision main"),
        "{err}"
    );
    let err = failed(&fetch(&endpoint, Some(TOKEN), "hf://org/tiny@v2", &out));
    assert!(
        err.contains("no repository org/tiny at revision v2"),
        "{err}"
    );

    let err = failed(&fetch(&endpoint, Some(TOKEN), "hf://org/gguf-only", &out));
    assert!(
        err.contains("org/gguf-only at main has no .safetensors weights")
            && err.contains("tiny.Q8_0.gguf"),
        "{err}"
    );

    let err = failed(&fetch(&endpoint, Some(TOKEN), "hf://org", &out));
    assert!(err.contains("expected hf://ORG/REPO"), "{err}");
    // None of these left anything behind.
    assert!(names_in(&out).is_empty(), "{:?}", names_in(&out));
}
