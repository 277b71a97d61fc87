//! Fetching a model repository from the Hugging Face Hub (`hf://ORG/REPO[@REVISION]`)
//! into a directory Tandem loads as an HF model. This is what the operator's
//! init container runs, so it must resume after a restart (complete files are
//! skipped, a partial one is continued with an HTTP range request) and never
//! leave a truncated file under its final name.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header::RANGE;
use reqwest::StatusCode;
use serde::Deserialize;

pub const SCHEME: &str = "hf://";
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
pub const DEFAULT_REVISION: &str = "main";
const INDEX_FILE: &str = "model.safetensors.index.json";
/// Read by the HF loader when present; `generation_config.json` and
/// `chat_template.jinja` are optional, `config.json` and `tokenizer.json` are not.
const REQUIRED_FILES: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL_FILES: [&str; 3] = [
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
];

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("`{0}` is not a Hugging Face model: expected hf://ORG/REPO or hf://ORG/REPO@REVISION")]
    BadSpec(String),
    #[error("{repo}: the repository is gated or private: set HF_TOKEN to a token that has access (HTTP {status} from {url})")]
    Gated {
        repo: String,
        status: u16,
        url: String,
    },
    #[error("{repo}: HF_TOKEN was refused (HTTP {status} from {url}): the repository is gated or private and this token has no access; accept its terms on the Hub or use another token")]
    TokenRefused {
        repo: String,
        status: u16,
        url: String,
    },
    #[error("no repository {repo} at revision {revision} ({url} answered 404)")]
    NotFound {
        repo: String,
        revision: String,
        url: String,
    },
    #[error("{url}: HTTP {status}: {body}")]
    Http {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}: {cause}")]
    Request { url: String, cause: reqwest::Error },
    #[error("{repo} at {revision} has no .safetensors weights (Tandem loads safetensors; the repository has: {files})")]
    NoSafetensors {
        repo: String,
        revision: String,
        files: String,
    },
    #[error("{repo} at {revision} has no {file}, which Tandem needs to load the model")]
    MissingFile {
        repo: String,
        revision: String,
        file: String,
    },
    #[error("{url}: not a Hub model listing: {why}")]
    BadListing { url: String, why: String },
    #[error("{path}: {why}")]
    BadIndex { path: PathBuf, why: String },
    #[error("{file}: the Hub announced {expected} bytes but sent {got}")]
    SizeMismatch {
        file: String,
        expected: u64,
        got: u64,
    },
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |cause| HubError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

/// `hf://ORG/REPO[@REVISION]`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRepo {
    /// `ORG/REPO`.
    pub repo: String,
    pub revision: String,
}

impl HubRepo {
    /// `None` when `spec` does not start with `hf://` (it is then some other
    /// kind of model name); an error when it does but is malformed.
    pub fn parse(spec: &str) -> Result<Option<HubRepo>, HubError> {
        let Some(rest) = spec.strip_prefix(SCHEME) else {
            return Ok(None);
        };
        let bad = || HubError::BadSpec(spec.to_string());
        let (repo, revision) = match rest.split_once('@') {
            Some((repo, rev)) if !rev.is_empty() => (repo, rev),
            Some(_) => return Err(bad()),
            None => (rest, DEFAULT_REVISION),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        let valid_part = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if parts.len() != 2 || !parts.iter().all(|p| valid_part(p)) {
            return Err(bad());
        }
        Ok(Some(HubRepo {
            repo: repo.to_string(),
            revision: revision.to_string(),
        }))
    }

    /// The cache directory name for this repository when no `--output` is given:
    /// `ORG--REPO`, a top-level entry so `tandem model list` shows it.
    pub fn cache_name(&self) -> String {
        self.repo.replace('/', "--")
    }
}

/// Where and as whom to talk to the Hub.
#[derive(Debug, Clone)]
pub struct HubClient {
    endpoint: String,
    token: Option<String>,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct RepoInfo {
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    /// Present with `?blobs=true`.
    size: Option<u64>,
    lfs: Option<LfsInfo>,
}

#[derive(Deserialize)]
struct LfsInfo {
    size: Option<u64>,
}

/// A file to download and its size as the Hub announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    pub name: String,
    pub size: Option<u64>,
}

/// What [`HubClient::fetch`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchReport {
    /// Files fetched (fully or the rest of a partial download).
    pub downloaded: Vec<String>,
    /// Files already complete in the output directory.
    pub skipped: Vec<String>,
    /// Bytes received over the network.
    pub bytes: u64,
}

/// Percent-encodes a revision for a URL path segment (branch names may hold `/`).
fn encode_segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl HubClient {
    pub fn new(endpoint: &str, token: Option<String>) -> Result<HubClient, HubError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            // No total timeout: a shard is many GB. A stalled connection fails instead.
            .read_timeout(Duration::from_secs(120))
            .user_agent(concat!("tandem/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|cause| HubError::Request {
                url: endpoint.to_string(),
                cause,
            })?;
        Ok(HubClient {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
            http,
        })
    }

    /// `HF_ENDPOINT` (default [`DEFAULT_ENDPOINT`]) and `HF_TOKEN`, as the
    /// Hugging Face tools read them.
    pub fn from_env() -> Result<HubClient, HubError> {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        HubClient::new(&endpoint, std::env::var("HF_TOKEN").ok())
    }

    fn get(&self, url: &str) -> reqwest::RequestBuilder {
        let req = self.http.get(url);
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    async fn send(
        &self,
        repo: &HubRepo,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, HubError> {
        let resp = req.send().await.map_err(|cause| HubError::Request {
            url: url.to_string(),
            cause,
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let url = url.to_string();
        Err(match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN if self.token.is_some() => {
                HubError::TokenRefused {
                    repo: repo.repo.clone(),
                    status: status.as_u16(),
                    url,
                }
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => HubError::Gated {
                repo: repo.repo.clone(),
                status: status.as_u16(),
                url,
            },
            StatusCode::NOT_FOUND => HubError::NotFound {
                repo: repo.repo.clone(),
                revision: repo.revision.clone(),
                url,
            },
            _ => {
                let body = resp.text().await.unwrap_or_default();
                HubError::Http {
                    url,
                    status: status.as_u16(),
                    body: body.chars().take(300).collect(),
                }
            }
        })
    }

    fn resolve_url(&self, repo: &HubRepo, file: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{file}",
            self.endpoint,
            repo.repo,
            encode_segment(&repo.revision)
        )
    }

    /// The repository's files (`GET /api/models/{repo}/revision/{rev}?blobs=true`).
    pub async fn list(&self, repo: &HubRepo) -> Result<Vec<RemoteFile>, HubError> {
        let url = format!(
            "{}/api/models/{}/revision/{}?blobs=true",
            self.endpoint,
            repo.repo,
            encode_segment(&repo.revision)
        );
        let resp = self.send(repo, self.get(&url), &url).await?;
        let body = resp.bytes().await.map_err(|cause| HubError::Request {
            url: url.clone(),
            cause,
        })?;
        let info: RepoInfo = serde_json::from_slice(&body).map_err(|e| HubError::BadListing {
            url: url.clone(),
            why: e.to_string(),
        })?;
        Ok(info
            .siblings
            .into_iter()
            .map(|s| RemoteFile {
                size: s.size.or(s.lfs.and_then(|l| l.size)),
                name: s.rfilename,
            })
            .collect())
    }

    /// Downloads into `out` what Tandem loads from `repo`: the config and
    /// tokenizer files and the safetensors weights (only the shards the index
    /// names when there is one, so a repo that also ships consolidated weights
    /// is not fetched twice).
    pub async fn fetch(&self, repo: &HubRepo, out: &Path) -> Result<FetchReport, HubError> {
        let listing = self.list(repo).await?;
        let find = |name: &str| listing.iter().find(|f| f.name == name).cloned();
        for name in REQUIRED_FILES {
            if find(name).is_none() {
                return Err(HubError::MissingFile {
                    repo: repo.repo.clone(),
                    revision: repo.revision.clone(),
                    file: name.to_string(),
                });
            }
        }
        let top_level_safetensors: Vec<RemoteFile> = listing
            .iter()
            .filter(|f| !f.name.contains('/') && f.name.ends_with(".safetensors"))
            .cloned()
            .collect();
        if top_level_safetensors.is_empty() {
            let mut names: Vec<&str> = listing.iter().map(|f| f.name.as_str()).collect();
            names.truncate(20);
            return Err(HubError::NoSafetensors {
                repo: repo.repo.clone(),
                revision: repo.revision.clone(),
                files: names.join(", "),
            });
        }
        std::fs::create_dir_all(out).map_err(io(out))?;

        let mut plan: Vec<RemoteFile> = REQUIRED_FILES
            .iter()
            .chain(OPTIONAL_FILES.iter())
            .filter_map(|n| find(n))
            .collect();
        let mut report = FetchReport::default();
        let progress = Progress::new(std::io::stderr().is_terminal());
        let weights = match find(INDEX_FILE) {
            Some(index) => {
                // The index decides which shards to fetch, so it comes first.
                self.fetch_file(repo, &index, out, &progress, &mut report)
                    .await?;
                let shards = index_shards(&out.join(INDEX_FILE))?;
                let mut wanted = Vec::new();
                for shard in shards {
                    let file = top_level_safetensors
                        .iter()
                        .find(|f| f.name == shard)
                        .cloned()
                        .ok_or_else(|| HubError::MissingFile {
                            repo: repo.repo.clone(),
                            revision: repo.revision.clone(),
                            file: shard.clone(),
                        })?;
                    wanted.push(file);
                }
                wanted
            }
            None => top_level_safetensors,
        };
        plan.extend(weights);
        progress.set_total(plan.iter().filter_map(|f| f.size).sum());
        for file in &plan {
            self.fetch_file(repo, file, out, &progress, &mut report)
                .await?;
        }
        progress.finish();
        Ok(report)
    }

    /// One file: skipped when complete, continued when a partial download of
    /// it exists, written as `.NAME.partial` and renamed when whole.
    async fn fetch_file(
        &self,
        repo: &HubRepo,
        file: &RemoteFile,
        out: &Path,
        progress: &Progress,
        report: &mut FetchReport,
    ) -> Result<(), HubError> {
        let dest = out.join(&file.name);
        if let (Ok(meta), Some(size)) = (std::fs::metadata(&dest), file.size) {
            if meta.is_file() && meta.len() == size {
                progress.skipped(&file.name, size);
                report.skipped.push(file.name.clone());
                return Ok(());
            }
        }
        // A stable name (no pid) so a restarted init container finds it.
        let partial = out.join(format!(".{}.partial", file.name));
        let mut have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        if file.size.is_some_and(|size| have > size) {
            have = 0;
        }
        let url = self.resolve_url(repo, &file.name);
        let mut req = self.get(&url);
        if have > 0 {
            req = req.header(RANGE, format!("bytes={have}-"));
        }
        let mut resp = self.send(repo, req, &url).await?;
        // A server that ignores the range sends the whole file: start over.
        let resuming = have > 0 && resp.status() == StatusCode::PARTIAL_CONTENT;
        let mut writer = if resuming {
            OpenOptions::new().append(true).open(&partial)
        } else {
            have = 0;
            File::create(&partial)
        }
        .map_err(io(&partial))?;
        progress.start(&file.name, file.size, have);
        let mut written = have;
        while let Some(chunk) = resp.chunk().await.map_err(|cause| HubError::Request {
            url: url.clone(),
            cause,
        })? {
            writer.write_all(&chunk).map_err(io(&partial))?;
            written += chunk.len() as u64;
            report.bytes += chunk.len() as u64;
            progress.advance(chunk.len() as u64);
        }
        writer.sync_all().map_err(io(&partial))?;
        drop(writer);
        if let Some(expected) = file.size.filter(|&s| s != written) {
            // Keep what arrived if it is a prefix; a restart continues from it.
            if written > expected {
                let _ = std::fs::remove_file(&partial);
            }
            return Err(HubError::SizeMismatch {
                file: file.name.clone(),
                expected,
                got: written,
            });
        }
        std::fs::rename(&partial, &dest).map_err(io(&dest))?;
        progress.done(&file.name, written);
        report.downloaded.push(file.name.clone());
        Ok(())
    }
}

/// The shard files `model.safetensors.index.json` maps tensors to, in order.
fn index_shards(path: &Path) -> Result<Vec<String>, HubError> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let index: Index = serde_json::from_str(&text).map_err(|e| HubError::BadIndex {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    let shards: std::collections::BTreeSet<String> = index.weight_map.into_values().collect();
    if let Some(bad) = shards
        .iter()
        .find(|s| s.contains('/') || s.starts_with('.'))
    {
        return Err(HubError::BadIndex {
            path: path.to_path_buf(),
            why: format!("shard name {bad:?} is not a file beside the index"),
        });
    }
    Ok(shards.into_iter().collect())
}

/// A byte progress bar on a terminal; a line per file otherwise (init
/// container logs), so the log shows which file a slow or failed fetch was on.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(terminal: bool) -> Progress {
        let bar = terminal.then(|| {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(0),
                indicatif::ProgressDrawTarget::stderr(),
            );
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "fetching {msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            bar
        });
        Progress { bar }
    }

    fn set_total(&self, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
        }
    }

    fn skipped(&self, name: &str, size: u64) {
        match &self.bar {
            Some(bar) => bar.inc(size),
            None => eprintln!("{name}: already complete ({size} bytes)"),
        }
    }

    fn start(&self, name: &str, size: Option<u64>, resume_from: u64) {
        let size = size.map_or("unknown size".to_string(), |s| format!("{s} bytes"));
        match &self.bar {
            Some(bar) => {
                bar.set_message(name.to_string());
                bar.inc(resume_from);
            }
            None if resume_from > 0 => {
                eprintln!("{name}: resuming at byte {resume_from} ({size})")
            }
            None => eprintln!("{name}: downloading ({size})"),
        }
    }

    fn advance(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    fn done(&self, name: &str, size: u64) {
        if self.bar.is_none() {
            eprintln!("{name}: done ({size} bytes)");
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_and_without_revision() {
        assert_eq!(
            HubRepo::parse("hf://meta-llama/Llama-3.1-8B-Instruct").unwrap(),
            Some(HubRepo {
                repo: "meta-llama/Llama-3.1-8B-Instruct".into(),
                revision: "main".into()
            })
        );
        assert_eq!(
            HubRepo::parse("hf://org/m@refs/pr/1").unwrap().unwrap(),
            HubRepo {
                repo: "org/m".into(),
                revision: "refs/pr/1".into()
            }
        );
        assert_eq!(HubRepo::parse("SmolLM2-135M-Instruct").unwrap(), None);
        for bad in [
            "hf://org",
            "hf://a/b/c",
            "hf://org/m@",
            "hf://../x",
            "hf://o/m m",
        ] {
            let err = HubRepo::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("hf://ORG/REPO"), "{err}");
        }
    }

    #[test]
    fn revisions_are_one_path_segment() {
        assert_eq!(encode_segment("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode_segment("v1.0"), "v1.0");
    }

    #[test]
    fn index_shards_must_be_files_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(INDEX_FILE);
        std::fs::write(
            &p,
            r#"{"weight_map":{"a":"m-2.safetensors","b":"m-1.safetensors","c":"m-1.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(
            index_shards(&p).unwrap(),
            vec!["m-1.safetensors", "m-2.safetensors"]
        );
        std::fs::write(&p, r#"{"weight_map":{"a":"../etc/x.safetensors"}}"#).unwrap();
        assert!(index_shards(&p).unwrap_err().to_string().contains("../etc"));
    }
}
