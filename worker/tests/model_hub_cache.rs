//! `--model ORG/REPO[@REV]` through the Hugging Face hub cache, against a fake
//! Hub on loopback: the first use downloads into the layout `huggingface_hub`
//! uses, later uses (and a cache Python tools wrote) ask the Hub nothing,
//! `HF_HUB_OFFLINE` is honoured, and `tandem model fetch hf://…` and
//! `tandem serve --model ORG/REPO` use the same cache.

mod hub_support;
mod process_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use hub_support::{etag, hub_with, Hub, COMMIT};
use process_support::{free_port, tandem_bin};
use tandem_model::hub::{self, HubClient, HubError, HubRepo};
use tandem_model::hub_cache::HubCache;

fn repo(spec: &str) -> HubRepo {
    HubRepo::parse_model_arg(spec).unwrap().unwrap()
}

/// `hub::resolve` against `endpoint`, counting how often a client was wanted.
fn resolve(
    spec: &str,
    cache: &HubCache,
    endpoint: &str,
    offline: bool,
) -> Result<PathBuf, HubError> {
    hub::resolve(&repo(spec), cache, offline, || {
        HubClient::new(endpoint, None)
    })
}

fn repo_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// What Tandem loads from `org/tiny` (no README, nothing in subfolders).
fn loaded_files(hub: &Hub, repo: &str) -> Vec<String> {
    hub.repos[repo]
        .keys()
        .filter(|f| !f.contains('/') && *f != "README.md")
        .cloned()
        .collect()
}

#[test]
fn the_first_use_downloads_into_the_hub_layout_and_the_second_asks_nothing() {
    let (hub, endpoint) = hub_with(None);
    let tmp = tempfile::tempdir().unwrap();
    let cache = HubCache::new(tmp.path());

    let snapshot = resolve("org/tiny", &cache, &endpoint, false).unwrap();
    let dir = repo_dir(tmp.path(), "org/tiny");
    assert_eq!(snapshot, dir.join("snapshots").join(COMMIT));
    assert_eq!(
        std::fs::read_to_string(dir.join("refs/main")).unwrap(),
        COMMIT
    );
    let files = loaded_files(&hub, "org/tiny");
    let mut linked: Vec<String> = std::fs::read_dir(&snapshot)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    linked.sort();
    assert_eq!(linked, files);
    for name in &files {
        let bytes = &hub.repos["org/tiny"][name];
        let tag = etag(name, bytes);
        // A relative link into blobs/, named by the etag (the LFS sha256 for
        // the weights), holding the file's bytes.
        assert_eq!(
            std::fs::read_link(snapshot.join(name)).unwrap(),
            PathBuf::from(format!("../../blobs/{tag}")),
            "{name}"
        );
        assert_eq!(&std::fs::read(dir.join("blobs").join(&tag)).unwrap(), bytes);
    }
    let weights_tag = etag(
        "model.safetensors",
        &hub.repos["org/tiny"]["model.safetensors"],
    );
    assert_eq!(weights_tag.len(), 64);
    // Downloaded from the commit the listing named, not from the moving branch.
    assert!(hub.file_requests().iter().all(|r| r.revision == COMMIT));
    assert_eq!(hub.file_requests().len(), files.len());
    // Nothing half-written is left, and the lock files are where Python's are.
    let blobs: Vec<String> = std::fs::read_dir(dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        blobs.iter().all(|b| !b.ends_with(".incomplete")),
        "{blobs:?}"
    );
    assert!(tmp
        .path()
        .join(".locks/models--org--tiny")
        .join(format!("{weights_tag}.lock"))
        .is_file());

    let loaded = tandem_model::load(&snapshot).unwrap();
    assert_eq!(loaded.name, "org/tiny");
    assert_eq!(
        loaded.config.num_layers,
        tandem_model::testing::tiny_config(tandem_model::Architecture::Llama).num_layers
    );

    let requests = hub.request_count();
    let again = resolve("org/tiny", &cache, &endpoint, false).unwrap();
    assert_eq!(again, snapshot);
    assert_eq!(
        hub.request_count(),
        requests,
        "the second use asked the Hub"
    );
    // Offline, the same.
    assert_eq!(
        resolve("org/tiny", &cache, &endpoint, true).unwrap(),
        snapshot
    );
    assert_eq!(hub.request_count(), requests);
}

/// Writes `files` into `cache` by the layout rules alone, as
/// `huggingface_hub.snapshot_download` leaves them.
fn write_python_cache(cache: &Path, repo: &str, commit: &str, files: &[(&str, &[u8])]) {
    let dir = repo_dir(cache, repo);
    std::fs::create_dir_all(dir.join("refs")).unwrap();
    std::fs::write(dir.join("refs/main"), commit).unwrap();
    std::fs::create_dir_all(dir.join("blobs")).unwrap();
    let snapshot = dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    for (name, bytes) in files {
        let tag = etag(name, bytes);
        std::fs::write(dir.join("blobs").join(&tag), bytes).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{tag}"), snapshot.join(name)).unwrap();
    }
}

#[test]
fn a_cache_python_tools_wrote_is_used_without_the_hub() {
    let (hub, _) = hub_with(None);
    let tmp = tempfile::tempdir().unwrap();
    let commit = "a".repeat(40);
    let files: Vec<(&str, &[u8])> = hub.repos["org/tiny"]
        .iter()
        .filter(|(name, _)| !name.contains('/'))
        .map(|(name, bytes)| (name.as_str(), bytes.as_slice()))
        .collect();
    // Under another name than the fake serves: the Hub could not answer for it.
    write_python_cache(tmp.path(), "someone/cached", &commit, &files);
    let cache = HubCache::new(tmp.path());
    let no_hub = |spec: &str, offline| {
        hub::resolve(&repo(spec), &cache, offline, || {
            panic!("{spec}: the Hub was asked for a cached model")
        })
    };
    let snapshot = repo_dir(tmp.path(), "someone/cached")
        .join("snapshots")
        .join(&commit);
    assert_eq!(no_hub("someone/cached", false).unwrap(), snapshot);
    assert_eq!(no_hub("hf://someone/cached@main", true).unwrap(), snapshot);
    // A commit needs no ref.
    assert_eq!(
        no_hub(&format!("someone/cached@{commit}"), false).unwrap(),
        snapshot
    );
    assert_eq!(
        tandem_model::load(&snapshot).unwrap().name,
        "someone/cached"
    );
    assert_eq!(
        cache.models(),
        vec![("someone/cached".to_string(), snapshot)]
    );
}

#[test]
fn offline_and_not_cached_is_an_error_that_says_so() {
    let (hub, endpoint) = hub_with(None);
    let tmp = tempfile::tempdir().unwrap();
    let cache = HubCache::new(tmp.path());
    let err = resolve("org/tiny@v1", &cache, &endpoint, true)
        .unwrap_err()
        .to_string();
    for want in [
        "org/tiny@v1 is not in the Hugging Face cache",
        tmp.path().to_str().unwrap(),
        "HF_HUB_OFFLINE",
    ] {
        assert!(err.contains(want), "missing {want:?} in {err}");
    }
    assert_eq!(hub.request_count(), 0);
}

#[test]
fn a_partial_cache_is_completed_with_only_what_it_lacks() {
    let (hub, endpoint) = hub_with(None);
    let tmp = tempfile::tempdir().unwrap();
    let files = &hub.repos["org/tiny"];
    // Python fetched config.json alone (`hf_hub_download`), and an earlier
    // download of the weights stopped halfway.
    write_python_cache(
        tmp.path(),
        "org/tiny",
        COMMIT,
        &[("config.json", &files["config.json"])],
    );
    let weights = &files["model.safetensors"];
    let tag = etag("model.safetensors", weights);
    let blobs = repo_dir(tmp.path(), "org/tiny").join("blobs");
    let half = weights.len() / 2;
    std::fs::write(blobs.join(format!("{tag}.incomplete")), &weights[..half]).unwrap();

    let cache = HubCache::new(tmp.path());
    let snapshot = resolve("org/tiny", &cache, &endpoint, false).unwrap();
    let fetched: Vec<(String, Option<String>)> = hub
        .file_requests()
        .into_iter()
        .map(|r| (r.file, r.range))
        .collect();
    assert!(
        !fetched.iter().any(|(f, _)| f == "config.json"),
        "{fetched:?}"
    );
    assert!(
        fetched.contains(&("model.safetensors".into(), Some(format!("bytes={half}-")))),
        "{fetched:?}"
    );
    assert_eq!(
        &std::fs::read(snapshot.join("model.safetensors")).unwrap(),
        weights
    );
    assert!(!blobs.join(format!("{tag}.incomplete")).exists());
    tandem_model::load(&snapshot).unwrap();
}

#[test]
fn concurrent_first_uses_download_each_blob_once() {
    let (hub, endpoint) = hub_with(None);
    let tmp = tempfile::tempdir().unwrap();
    let cache = HubCache::new(tmp.path());
    let snapshots: Vec<PathBuf> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| resolve("org/indexed", &cache, &endpoint, false).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(snapshots.iter().all(|s| *s == snapshots[0]));
    let mut fetched: Vec<String> = hub.file_requests().into_iter().map(|r| r.file).collect();
    fetched.sort();
    let before = fetched.len();
    fetched.dedup();
    assert_eq!(
        before,
        fetched.len(),
        "a blob was downloaded twice: {fetched:?}"
    );
    // The index decides: the consolidated copy it does not name is not fetched.
    assert!(!fetched.contains(&"consolidated.safetensors".to_string()));
    tandem_model::load(&snapshots[0]).unwrap();
}

#[test]
fn missing_and_unusable_repositories_say_why_and_leave_no_snapshot() {
    let (_hub, endpoint) = hub_with(None);
    let tmp = tempfile::tempdir().unwrap();
    let cache = HubCache::new(tmp.path());
    let err = resolve("org/nope", &cache, &endpoint, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no repository org/nope at revision main"),
        "{err}"
    );
    let err = resolve("org/gguf-only", &cache, &endpoint, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("org/gguf-only at main has no .safetensors weights")
            && err.contains("tiny.Q8_0.gguf"),
        "{err}"
    );
    assert!(!repo_dir(tmp.path(), "org/gguf-only").exists());
    assert!(!repo_dir(tmp.path(), "org/nope").exists());
    // Malformed names are not taken for repositories at all.
    for spec in ["org/../x", "a/b/c", "org/m@..", "org/m@"] {
        assert_eq!(HubRepo::parse_model_arg(spec).unwrap(), None, "{spec}");
    }
    assert!(HubRepo::parse_model_arg("hf://org/m@..").is_err());
}

/// `tandem` with a private Tandem cache, this Hugging Face cache and hub.
fn tandem(hf_cache: &Path, endpoint: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(tandem_bin());
    cmd.args(args)
        .env("HF_HUB_CACHE", hf_cache)
        .env("HF_ENDPOINT", endpoint)
        .env("TANDEM_MODEL_DIR", hf_cache.join(".no-tandem-cache"))
        .env("HF_TOKEN_PATH", hf_cache.join(".no-token"))
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// An endpoint where nothing listens: any request fails.
fn dead_endpoint() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

#[test]
fn model_fetch_fills_the_cache_that_model_show_and_list_read() {
    let (hub, endpoint) = hub_with(None);
    let tmp = tempfile::tempdir().unwrap();
    let out = ok(&tandem(
        tmp.path(),
        &endpoint,
        &["model", "fetch", "hf://org/tiny"],
        &[],
    ));
    let files = loaded_files(&hub, "org/tiny").len();
    assert!(
        out.contains(&format!("commit {COMMIT}"))
            && out.contains(&format!("{files} files downloaded")),
        "{out}"
    );
    let snapshot = repo_dir(tmp.path(), "org/tiny")
        .join("snapshots")
        .join(COMMIT);
    assert!(snapshot.join("model.safetensors").is_file());

    // An explicit fetch asks the Hub where main is, but downloads nothing new.
    let listings = hub.listings().len();
    let out = ok(&tandem(
        tmp.path(),
        &endpoint,
        &["model", "fetch", "hf://org/tiny"],
        &[],
    ));
    assert!(
        out.contains(&format!(
            "0 files downloaded (0 B), {files} already complete"
        )),
        "{out}"
    );
    assert_eq!(hub.listings().len(), listings + 1);
    assert_eq!(hub.file_requests().len(), files);

    // `show` and `list` find it with no Hub at all.
    let dead = dead_endpoint();
    let shown: serde_json::Value = serde_json::from_str(&ok(&tandem(
        tmp.path(),
        &dead,
        &["model", "show", "org/tiny", "--json"],
        &[],
    )))
    .unwrap();
    assert_eq!(shown["name"], "org/tiny");
    assert_eq!(shown["path"], snapshot.to_str().unwrap());
    let list = ok(&tandem(tmp.path(), &dead, &["model", "list"], &[]));
    assert!(
        list.lines()
            .any(|l| l.starts_with("org/tiny ") && l.contains(snapshot.to_str().unwrap())),
        "{list}"
    );
    let out = ok(&tandem(
        tmp.path(),
        &dead,
        &["model", "fetch", "hf://org/tiny"],
        &[("HF_HUB_OFFLINE", "1")],
    ));
    assert!(out.contains("HF_HUB_OFFLINE is set"), "{out}");
    let failed = tandem(
        tmp.path(),
        &dead,
        &["model", "fetch", "hf://org/other"],
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert!(!failed.status.success());
    assert!(String::from_utf8_lossy(&failed.stderr).contains("HF_HUB_OFFLINE is set"));
}

/// A `tandem serve` child, stopped (SIGKILL) on drop.
struct Serve {
    child: std::process::Child,
    port: u16,
}

impl Serve {
    fn start(hf_cache: &Path, endpoint: &str) -> Serve {
        let port = free_port();
        let child = Command::new(tandem_bin())
            .args(["serve", "--model", "org/tiny", "--host", "127.0.0.1"])
            .args(["--port", &port.to_string(), "--kv-cache-memory", "16MiB"])
            .env("HF_HUB_CACHE", hf_cache)
            .env("HF_ENDPOINT", endpoint)
            .env("TANDEM_MODEL_DIR", hf_cache.join(".no-tandem-cache"))
            .env("HF_TOKEN_PATH", hf_cache.join(".no-token"))
            .env_remove("HF_TOKEN")
            .env_remove("HF_HUB_OFFLINE")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Serve { child, port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn wait_healthy(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("tandem serve exited early with {status}");
            }
            if let Ok(r) = reqwest::get(self.url("/health")).await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("tandem serve did not become healthy");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn serve_downloads_a_hub_model_on_first_use_and_then_needs_no_hub() {
    let (hub, endpoint) = hub_with(None);
    let tmp = tempfile::tempdir().unwrap();
    let mut serve = Serve::start(tmp.path(), &endpoint);
    serve.wait_healthy().await;
    let body = reqwest::get(serve.url("/v1/models"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let models: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(models["data"][0]["id"], "org/tiny", "{models}");
    assert_eq!(
        hub.file_requests().len(),
        loaded_files(&hub, "org/tiny").len()
    );
    drop(serve);

    // Again with the Hub gone: served from the cache.
    let requests = hub.request_count();
    let mut serve = Serve::start(tmp.path(), &dead_endpoint());
    serve.wait_healthy().await;
    assert_eq!(hub.request_count(), requests);
}
