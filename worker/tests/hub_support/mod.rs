//! A fake Hugging Face Hub on loopback (what `HF_ENDPOINT` points the client
//! at): the listing API and `resolve` downloads of tiny random models, with
//! the commit hash and blob ids the real Hub reports, recording every request.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use tandem_model::testing::{random_weights, save_hf_dir, tiny_config};
use tandem_model::Architecture;

pub const TOKEN: &str = "hf_test_token";
/// The commit `main` is at, in every repository of the fake.
pub const COMMIT: &str = "5f2a9c0e1b7d4c3a8e6f9b0a1c2d3e4f5a6b7c8d";

/// A request the hub saw: a listing (`file` empty) or a file.
#[derive(Debug, Clone)]
pub struct FileRequest {
    pub file: String,
    pub revision: String,
    pub authorization: Option<String>,
    pub range: Option<String>,
}

#[derive(Default)]
pub struct Hub {
    /// `ORG/REPO` → file name → bytes (at `main`, which is at [`COMMIT`]).
    pub repos: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// When set, every request must carry it as a bearer token.
    pub token: Option<String>,
    requests: Mutex<Vec<FileRequest>>,
    listings: Mutex<Vec<String>>,
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

    /// The file downloads asked for, in order.
    pub fn file_requests(&self) -> Vec<FileRequest> {
        self.requests.lock().unwrap().clone()
    }

    /// The revisions listings were asked for, in order.
    pub fn listings(&self) -> Vec<String> {
        self.listings.lock().unwrap().clone()
    }

    /// Every request of any kind.
    pub fn request_count(&self) -> usize {
        self.file_requests().len() + self.listings().len()
    }

    fn files_at(&self, repo: &str, rev: &str) -> Option<&BTreeMap<String, Vec<u8>>> {
        self.repos
            .get(repo)
            .filter(|_| rev == "main" || rev == COMMIT)
    }
}

/// The etag the Hub gives a file: a 64-hex "sha256" for LFS files
/// (safetensors), a 40-hex "git blob id" for the rest. Derived from the bytes,
/// so different contents get different blobs.
pub fn etag(name: &str, bytes: &[u8]) -> String {
    let len = if is_lfs(name) { 64 } else { 40 };
    let mut out = String::new();
    let mut salt = 0u64;
    while out.len() < len {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (salt, bytes).hash(&mut h);
        out.push_str(&format!("{:016x}", h.finish()));
        salt += 1;
    }
    out.truncate(len);
    out
}

fn is_lfs(name: &str) -> bool {
    name.ends_with(".safetensors") || name.ends_with(".gguf")
}

async fn listing(
    State(hub): State<Arc<Hub>>,
    UrlPath((org, name, rev)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    hub.listings.lock().unwrap().push(rev.clone());
    if !hub.authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Some(files) = hub.files_at(&format!("{org}/{name}"), &rev) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let siblings: Vec<_> = files
        .iter()
        .map(|(f, bytes)| {
            let tag = etag(f, bytes);
            if is_lfs(f) {
                serde_json::json!({"rfilename": f, "size": bytes.len(), "blobId": "1".repeat(40),
                    "lfs": {"size": bytes.len(), "sha256": tag, "pointerSize": 134}})
            } else {
                serde_json::json!({"rfilename": f, "size": bytes.len(), "blobId": tag})
            }
        })
        .collect();
    Json(serde_json::json!({"id": format!("{org}/{name}"), "sha": COMMIT, "siblings": siblings}))
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
        revision: rev.clone(),
        authorization: header_text(header::AUTHORIZATION),
        range: header_text(header::RANGE),
    });
    if !hub.authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Some(bytes) = hub
        .files_at(&format!("{org}/{name}"), &rev)
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
pub fn serve(hub: Arc<Hub>) -> String {
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
pub fn tiny_repo() -> BTreeMap<String, Vec<u8>> {
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

/// A hub with `org/tiny`, `org/gguf-only` (no safetensors) and `org/indexed`
/// (an index naming the weights beside a consolidated copy it does not name).
pub fn hub_with(token: Option<&str>) -> (Arc<Hub>, String) {
    let mut repos = BTreeMap::new();
    repos.insert("org/tiny".to_string(), tiny_repo());
    let mut gguf_only = tiny_repo();
    gguf_only.retain(|name, _| !name.ends_with(".safetensors"));
    gguf_only.insert("tiny.Q8_0.gguf".into(), vec![1; 32]);
    repos.insert("org/gguf-only".to_string(), gguf_only);
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
