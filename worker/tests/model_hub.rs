//! `tandem model fetch hf://ORG/REPO --output DIR` against a fake Hugging Face
//! Hub on loopback (HF_ENDPOINT), serving a tiny random model: what the
//! operator's init container runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use tandem_model::testing::{random_weights, save_hf_dir, tiny_config};
use tandem_model::Architecture;

const TOKEN: &str = "hf_test_token";

/// A request for a file, as the hub saw it.
#[derive(Debug, Clone)]
struct FileRequest {
    file: String,
    authorization: Option<String>,
    range: Option<String>,
}

#[derive(Default)]
struct Hub {
    /// `ORG/REPO` → file name → bytes (revision `main` only).
    repos: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// When set, every request must carry it as a bearer token.
    token: Option<String>,
    requests: Mutex<Vec<FileRequest>>,
}

impl Hub {
    fn authorized(&self, headers: &HeaderMap) -> bool {
        match &self.token {
            None => true,
            Some(t) => headers
                .get(header::AUTHORIZATION)
                .is_some_and(|v| v.as_bytes() == format!("Bearer {t}").as_bytes()),
        }
    }

    fn file_requests(&self) -> Vec<FileRequest> {
        self.requests.lock().unwrap().clone()
    }
}

async fn listing(
    State(hub): State<Arc<Hub>>,
    UrlPath((org, name, rev)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if !hub.authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Some(files) = hub
        .repos
        .get(&format!("{org}/{name}"))
        .filter(|_| rev == "main")
    else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let siblings: Vec<_> = files
        .iter()
        .map(|(f, bytes)| serde_json::json!({"rfilename": f, "size": bytes.len()}))
        .collect();
    Json(serde_json::json!({"id": format!("{org}/{name}"), "sha": "abc", "siblings": siblings}))
        .into_response()
}

async fn resolve(
    State(hub): State<Arc<Hub>>,
    UrlPath((org, name, rev, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let header_text = |h| {
        headers
            .get(h)
            .map(|v: &header::HeaderValue| v.to_str().unwrap().to_string())
    };
    hub.requests.lock().unwrap().push(FileRequest {
        file: file.clone(),
        authorization: header_text(header::AUTHORIZATION),
        range: header_text(header::RANGE),
    });
    if !hub.authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Some(bytes) = hub
        .repos
        .get(&format!("{org}/{name}"))
        .filter(|_| rev == "main")
        .and_then(|files| files.get(&file))
    else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let start = header_text(header::RANGE)
        .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok());
    match start {
        Some(start) if start < bytes.len() => (
            StatusCode::PARTIAL_CONTENT,
            [(
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{}", bytes.len() - 1, bytes.len()),
            )],
            bytes[start..].to_vec(),
        )
            .into_response(),
        _ => bytes.clone().into_response(),
    }
}

/// Serves `hub` on a loopback port from its own thread; returns its endpoint.
fn serve(hub: Arc<Hub>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/api/models/{org}/{name}/revision/{rev}", get(listing))
        .route("/{org}/{name}/resolve/{rev}/{*file}", get(resolve))
        .with_state(hub);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    format!("http://{addr}")
}

/// The files of a tiny random Llama saved as an HF directory, plus files a
/// real repository has that Tandem does not load.
fn tiny_repo() -> BTreeMap<String, Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    save_hf_dir(dir.path(), &cfg, &random_weights(&cfg, 7)).unwrap();
    let mut files: BTreeMap<String, Vec<u8>> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    assert!(
        files.contains_key("model.safetensors"),
        "{:?}",
        files.keys()
    );
    files.insert("README.md".into(), b"# tiny".to_vec());
    files.insert("original/consolidated.safetensors".into(), vec![0; 64]);
    files
}

fn hub_with(token: Option<&str>) -> (Arc<Hub>, String) {
    let mut repos = BTreeMap::new();
    repos.insert("org/tiny".to_string(), tiny_repo());
    let mut gguf_only = tiny_repo();
    gguf_only.retain(|name, _| !name.ends_with(".safetensors"));
    gguf_only.insert("tiny.Q8_0.gguf".into(), vec![1; 32]);
    repos.insert("org/gguf-only".to_string(), gguf_only);
    // An index naming the weights, beside a consolidated copy it does not name.
    let mut indexed = tiny_repo();
    let tensors = safetensors::SafeTensors::deserialize(&indexed["model.safetensors"])
        .unwrap()
        .names()
        .into_iter()
        .map(|n| (n.to_string(), "model.safetensors"))
        .collect::<BTreeMap<_, _>>();
    indexed.insert(
        "model.safetensors.index.json".into(),
        serde_json::to_vec(&serde_json::json!({"metadata": {}, "weight_map": tensors})).unwrap(),
    );
    indexed.insert("consolidated.safetensors".into(), vec![0; 128]);
    repos.insert("org/indexed".to_string(), indexed);
    let hub = Arc::new(Hub {
        repos,
        token: token.map(String::from),
        ..Hub::default()
    });
    let endpoint = serve(hub.clone());
    (hub, endpoint)
}

fn fetch(endpoint: &str, token: Option<&str>, spec: &str, out: &Path) -> Output {
    let bin = std::env::var_os("TANDEM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_tandem")));
    let mut cmd = Command::new(bin);
    cmd.args(["model", "fetch", spec, "--output"])
        .arg(out)
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_TOKEN")
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
