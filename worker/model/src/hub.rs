//! The Hugging Face Hub client: `--model ORG/REPO[@REVISION]` (or
//! `hf://ORG/REPO[@REVISION]`) resolved through the hub cache ([`resolve`],
//! downloading only what the cache lacks), and `tandem model fetch hf://…`, into
//! that cache or (`--output`) into a plain directory Tandem loads as an HF model.
//! The plain-directory fetch is what the operator's init container runs, so it
//! must resume after a restart (complete files are skipped, a partial one is
//! continued with an HTTP range request) and never leave a truncated file under
//! its final name; the cache download does the same with `<etag>.incomplete`
//! blobs.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header::RANGE;
use reqwest::StatusCode;
use serde::Deserialize;

use super::hub_cache::{self, HubCache};

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
    #[error("{repo}@{revision} is not in the Hugging Face cache at {cache} ({why}), and HF_HUB_OFFLINE is set: unset it to download, or fetch it first with `tandem model fetch hf://{repo}@{revision}`")]
    Offline {
        repo: String,
        revision: String,
        cache: PathBuf,
        why: String,
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
        Self::parse_bare(rest)
            .map(Some)
            .ok_or_else(|| HubError::BadSpec(spec.to_string()))
    }

    /// A `--model` value naming a Hub repository: `hf://ORG/REPO[@REVISION]`
    /// (an error when malformed) or `ORG/REPO[@REVISION]` (`None` when it is
    /// not of that shape: it is then a path or a cached model's name).
    pub fn parse_model_arg(spec: &str) -> Result<Option<HubRepo>, HubError> {
        if spec.starts_with(SCHEME) {
            return Self::parse(spec);
        }
        Ok(Self::parse_bare(spec))
    }

    fn parse_bare(rest: &str) -> Option<HubRepo> {
        let (repo, revision) = match rest.split_once('@') {
            Some((repo, rev)) => (repo, rev),
            None => (rest, DEFAULT_REVISION),
        };
        let valid_part = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        let parts: Vec<&str> = repo.split('/').collect();
        // A revision becomes a path under refs/ in the cache: `refs/pr/1`
        // is fine, `..` is not.
        if parts.len() != 2
            || !parts.iter().all(|p| valid_part(p))
            || !revision.split('/').all(valid_part)
        {
            return None;
        }
        Some(HubRepo {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }
}

impl std::fmt::Display for HubRepo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision)
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
    /// The commit the revision resolved to.
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    /// Present with `?blobs=true`.
    size: Option<u64>,
    /// The git blob id (with `?blobs=true`).
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<LfsInfo>,
}

#[derive(Deserialize)]
struct LfsInfo {
    size: Option<u64>,
    sha256: Option<String>,
}

/// A file to download, its size and its etag as the Hub announces them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    pub name: String,
    pub size: Option<u64>,
    /// Its blob name in the hub cache: the LFS sha256 for large files, else the
    /// git blob id (the `ETag` the Hub sends for the file).
    pub etag: Option<String>,
}

/// A revision of a repository as the Hub lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The commit the revision is at.
    pub commit: Option<String>,
    pub files: Vec<RemoteFile>,
}

/// What [`HubClient::fetch_into_cache`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheFetch {
    /// `snapshots/<commit>`: the directory to load.
    pub snapshot: PathBuf,
    pub commit: String,
    pub report: FetchReport,
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

    /// `HF_ENDPOINT` (default [`DEFAULT_ENDPOINT`]) and the token, as the
    /// Hugging Face tools read them: `HF_TOKEN`, else the file `HF_TOKEN_PATH`
    /// or `$HF_HOME/token` (where `huggingface-cli login` saves it).
    pub fn from_env() -> Result<HubClient, HubError> {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let token = get("HF_TOKEN").or_else(|| {
            let path = get("HF_TOKEN_PATH").map(PathBuf::from).or_else(|| {
                let home = get("HF_HOME").map(PathBuf::from).or_else(|| {
                    let cache = get("XDG_CACHE_HOME")
                        .map(PathBuf::from)
                        .or_else(|| get("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
                    Some(cache.join("huggingface"))
                })?;
                Some(home.join("token"))
            })?;
            let token = std::fs::read_to_string(path).ok()?;
            Some(token.trim().to_string())
        });
        HubClient::new(&endpoint, token)
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
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

    /// The repository's files at `repo.revision` and the commit it is at
    /// (`GET /api/models/{repo}/revision/{rev}?blobs=true`).
    pub async fn list(&self, repo: &HubRepo) -> Result<Listing, HubError> {
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
        Ok(Listing {
            commit: info.sha,
            files: info
                .siblings
                .into_iter()
                .map(|s| {
                    let (lfs_size, lfs_sha) = s.lfs.map_or((None, None), |l| (l.size, l.sha256));
                    RemoteFile {
                        size: s.size.or(lfs_size),
                        etag: lfs_sha.or(s.blob_id),
                        name: s.rfilename,
                    }
                })
                .collect(),
        })
    }

    /// Downloads into `out` what Tandem loads from `repo`: the config and
    /// tokenizer files and the safetensors weights (only the shards the index
    /// names when there is one, so a repo that also ships consolidated weights
    /// is not fetched twice).
    pub async fn fetch(&self, repo: &HubRepo, out: &Path) -> Result<FetchReport, HubError> {
        let listing = self.list(repo).await?;
        let selection = Selection::of(repo, &listing.files)?;
        std::fs::create_dir_all(out).map_err(io(out))?;

        let mut report = FetchReport::default();
        let progress = Progress::new(std::io::stderr().is_terminal());
        let mut plan = selection.metadata.clone();
        let weights = match &selection.index {
            Some(index) => {
                // The index decides which shards to fetch, so it comes first.
                self.fetch_flat(repo, index, out, &progress, &mut report)
                    .await?;
                selection.shards(repo, index_shards(&out.join(INDEX_FILE))?)?
            }
            None => selection.safetensors.clone(),
        };
        plan.extend(weights);
        progress.set_total(plan.iter().filter_map(|f| f.size).sum());
        for file in &plan {
            self.fetch_flat(repo, file, out, &progress, &mut report)
                .await?;
        }
        progress.finish();
        Ok(report)
    }

    /// One file into a plain directory: skipped when complete, continued when a
    /// partial download of it exists, written as `.NAME.partial` and renamed
    /// when whole.
    async fn fetch_flat(
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
        self.download(repo, file, &partial, &dest, progress, report)
            .await
    }

    /// Downloads what Tandem loads from `repo` into the hub cache (blobs, the
    /// snapshot's links, the revision's ref), from the one commit the revision
    /// is at even if a branch moves meanwhile. Blobs already in the cache, from
    /// Tandem or from Python tools, are not downloaded again.
    ///
    /// Blocking: it runs its own small runtime on a thread of its own, so it
    /// may be called from anywhere, an async start-up included; it waits for
    /// other processes downloading the same blobs.
    pub fn fetch_into_cache(
        &self,
        repo: &HubRepo,
        cache: &HubCache,
    ) -> Result<CacheFetch, HubError> {
        block_on(self.fetch_into_cache_async(repo, cache))?
    }

    async fn fetch_into_cache_async(
        &self,
        repo: &HubRepo,
        cache: &HubCache,
    ) -> Result<CacheFetch, HubError> {
        let listing = self.list(repo).await?;
        let listing_url = || format!("{}/api/models/{}", self.endpoint, repo.repo);
        let commit = listing
            .commit
            .clone()
            .filter(|c| hub_cache::is_safe_name(c))
            .ok_or_else(|| HubError::BadListing {
                url: listing_url(),
                why: "no commit hash (`sha`) for the revision".to_string(),
            })?;
        let selection = Selection::of(repo, &listing.files)?;
        let pinned = HubRepo {
            repo: repo.repo.clone(),
            revision: commit.clone(),
        };
        let ref_path = cache.ref_path(repo);
        cache.write_ref(repo, &commit).map_err(io(&ref_path))?;
        let snapshot = cache.snapshot_dir(&repo.repo, &commit);

        let mut report = FetchReport::default();
        let progress = Progress::new(std::io::stderr().is_terminal());
        let mut plan = selection.metadata.clone();
        let weights = match &selection.index {
            Some(index) => {
                self.fetch_cached(&pinned, index, cache, &progress, &mut report)
                    .await?;
                selection.shards(repo, index_shards(&snapshot.join(INDEX_FILE))?)?
            }
            None => selection.safetensors.clone(),
        };
        plan.extend(weights);
        progress.set_total(plan.iter().filter_map(|f| f.size).sum());
        for file in &plan {
            self.fetch_cached(&pinned, file, cache, &progress, &mut report)
                .await?;
        }
        progress.finish();
        Ok(CacheFetch {
            snapshot,
            commit,
            report,
        })
    }

    /// One file into the cache: under its blob's lock, downloaded unless the
    /// blob is whole (continued from `<etag>.incomplete`), then linked into
    /// the snapshot. `pinned.revision` is the commit.
    async fn fetch_cached(
        &self,
        pinned: &HubRepo,
        file: &RemoteFile,
        cache: &HubCache,
        progress: &Progress,
        report: &mut FetchReport,
    ) -> Result<(), HubError> {
        let etag = file
            .etag
            .as_deref()
            .filter(|e| hub_cache::is_safe_name(e))
            .ok_or_else(|| HubError::BadListing {
                url: format!("{}/api/models/{}", self.endpoint, pinned.repo),
                why: format!("no usable blob id for {}", file.name),
            })?;
        let blob = cache.blob_path(&pinned.repo, etag);
        let lock_path = cache.lock_path(&pinned.repo, etag);
        let _lock = cache
            .lock_blob(&pinned.repo, etag, &file.name)
            .map_err(io(&lock_path))?;
        // Blobs appear only whole (renamed into place), so one whose size is
        // unknown is complete too.
        let complete = std::fs::metadata(&blob)
            .is_ok_and(|m| m.is_file() && file.size.is_none_or(|size| m.len() == size));
        if complete {
            progress.skipped(&file.name, file.size.unwrap_or(0));
            report.skipped.push(file.name.clone());
        } else {
            let blobs = blob.parent().expect("a blob has a parent");
            std::fs::create_dir_all(blobs).map_err(io(blobs))?;
            let partial = blobs.join(format!("{etag}.incomplete"));
            self.download(pinned, file, &partial, &blob, progress, report)
                .await?;
        }
        let snapshot = cache.snapshot_dir(&pinned.repo, &pinned.revision);
        cache
            .link(&pinned.repo, &pinned.revision, &file.name, etag)
            .map_err(io(&snapshot.join(&file.name)))
    }

    /// Fetches `file` into `partial` (continuing what is there with a range
    /// request), checks its size and renames it to `dest`.
    async fn download(
        &self,
        repo: &HubRepo,
        file: &RemoteFile,
        partial: &Path,
        dest: &Path,
        progress: &Progress,
        report: &mut FetchReport,
    ) -> Result<(), HubError> {
        let mut have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
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
            OpenOptions::new().append(true).open(partial)
        } else {
            have = 0;
            File::create(partial)
        }
        .map_err(io(partial))?;
        progress.start(&file.name, file.size, have);
        let mut written = have;
        while let Some(chunk) = resp.chunk().await.map_err(|cause| HubError::Request {
            url: url.clone(),
            cause,
        })? {
            writer.write_all(&chunk).map_err(io(partial))?;
            written += chunk.len() as u64;
            report.bytes += chunk.len() as u64;
            progress.advance(chunk.len() as u64);
        }
        writer.sync_all().map_err(io(partial))?;
        drop(writer);
        if let Some(expected) = file.size.filter(|&s| s != written) {
            // Keep what arrived if it is a prefix; a restart continues from it.
            if written > expected {
                let _ = std::fs::remove_file(partial);
            }
            return Err(HubError::SizeMismatch {
                file: file.name.clone(),
                expected,
                got: written,
            });
        }
        std::fs::rename(partial, dest).map_err(io(dest))?;
        progress.done(&file.name, written);
        report.downloaded.push(file.name.clone());
        Ok(())
    }
}

/// The files of a listing Tandem loads, checked: the config and tokenizer
/// files, the index if any, and the top-level safetensors.
struct Selection {
    /// Required and optional non-weight files present in the listing.
    metadata: Vec<RemoteFile>,
    index: Option<RemoteFile>,
    safetensors: Vec<RemoteFile>,
}

impl Selection {
    fn of(repo: &HubRepo, listing: &[RemoteFile]) -> Result<Selection, HubError> {
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
        let safetensors: Vec<RemoteFile> = listing
            .iter()
            .filter(|f| !f.name.contains('/') && f.name.ends_with(".safetensors"))
            .cloned()
            .collect();
        if safetensors.is_empty() {
            let mut names: Vec<&str> = listing.iter().map(|f| f.name.as_str()).collect();
            names.truncate(20);
            return Err(HubError::NoSafetensors {
                repo: repo.repo.clone(),
                revision: repo.revision.clone(),
                files: names.join(", "),
            });
        }
        Ok(Selection {
            metadata: REQUIRED_FILES
                .iter()
                .chain(OPTIONAL_FILES.iter())
                .filter_map(|n| find(n))
                .collect(),
            index: find(INDEX_FILE),
            safetensors,
        })
    }

    /// The listed files of the shards an index names.
    fn shards(&self, repo: &HubRepo, names: Vec<String>) -> Result<Vec<RemoteFile>, HubError> {
        names
            .into_iter()
            .map(|shard| {
                self.safetensors
                    .iter()
                    .find(|f| f.name == shard)
                    .cloned()
                    .ok_or_else(|| HubError::MissingFile {
                        repo: repo.repo.clone(),
                        revision: repo.revision.clone(),
                        file: shard,
                    })
            })
            .collect()
    }
}

/// Runs `future` to completion on a current-thread runtime of its own, on a
/// thread of its own: callable from plain code and from inside another
/// runtime alike.
fn block_on<F>(future: F) -> Result<F::Output, HubError>
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(io(Path::new("the download runtime")))?;
                Ok(runtime.block_on(future))
            })
            .join()
            .expect("the download thread panicked")
    })
}

/// `--model ORG/REPO[@REVISION]`: the snapshot directory in `cache`, used as it
/// is when it holds what Tandem loads (no request is made then, so a branch
/// like `main` stays at the commit cached until `tandem model fetch` runs),
/// downloaded first otherwise, unless `offline`. `client` is asked for only
/// when a download is needed.
pub fn resolve(
    repo: &HubRepo,
    cache: &HubCache,
    offline: bool,
    client: impl FnOnce() -> Result<HubClient, HubError>,
) -> Result<PathBuf, HubError> {
    let why = match cache.loadable_snapshot(repo) {
        Ok(snapshot) => return Ok(snapshot),
        Err(why) => why,
    };
    if offline {
        return Err(HubError::Offline {
            repo: repo.repo.clone(),
            revision: repo.revision.clone(),
            cache: cache.root().to_path_buf(),
            why,
        });
    }
    let client = client()?;
    eprintln!(
        "{repo}: not in the Hugging Face cache at {} ({why}); downloading from {}",
        cache.root().display(),
        client.endpoint()
    );
    let fetched = client.fetch_into_cache(repo, cache)?;
    eprintln!(
        "{repo}: commit {} in {}: {} files downloaded ({} bytes), {} already in the cache",
        fetched.commit,
        fetched.snapshot.display(),
        fetched.report.downloaded.len(),
        fetched.report.bytes,
        fetched.report.skipped.len()
    );
    Ok(fetched.snapshot)
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
