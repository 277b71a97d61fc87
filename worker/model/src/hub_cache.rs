//! The Hugging Face hub cache, laid out as `huggingface_hub` lays it out, so
//! models downloaded by Python tools are used as they are and models Tandem
//! downloads are theirs too:
//!
//! ```text
//! $HF_HUB_CACHE/models--ORG--REPO/
//!   blobs/<etag>                        the bytes of each file version
//!   snapshots/<commit>/<file>           → ../../blobs/<etag> (relative symlinks)
//!   refs/<revision>                     the commit a branch or tag pointed at
//! $HF_HUB_CACHE/.locks/models--ORG--REPO/<etag>.lock
//! ```
//!
//! The etag of a file is its LFS sha256 for large files and its git blob id
//! otherwise, as the Hub reports them. A blob is written as `<etag>.incomplete`
//! and renamed when whole, under an exclusive `flock` on its lock file (the same
//! lock `huggingface_hub`'s `filelock` takes on Linux), so concurrent
//! downloads of one blob, by Tandem or Python, do not interleave.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::hub::HubRepo;

/// Model files Tandem needs in a snapshot before it will load it.
const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
const INDEX_FILE: &str = "model.safetensors.index.json";

/// One hub cache directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubCache {
    root: PathBuf,
}

impl HubCache {
    pub fn new(root: impl Into<PathBuf>) -> HubCache {
        HubCache { root: root.into() }
    }

    /// Where `huggingface_hub` puts it: `HF_HUB_CACHE` (or its older name
    /// `HUGGINGFACE_HUB_CACHE`), else `$HF_HOME/hub`, else
    /// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
    pub fn from_env() -> HubCache {
        HubCache::new(dir_from(|k| std::env::var(k).ok()))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `models--ORG--REPO`.
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.root
            .join(format!("models--{}", repo.replace('/', "--")))
    }

    pub fn snapshot_dir(&self, repo: &str, commit: &str) -> PathBuf {
        self.repo_dir(repo).join("snapshots").join(commit)
    }

    pub fn blob_path(&self, repo: &str, etag: &str) -> PathBuf {
        self.repo_dir(repo).join("blobs").join(etag)
    }

    /// `refs/<revision>`; a revision like `refs/pr/1` is a nested path, as in
    /// `huggingface_hub`.
    pub fn ref_path(&self, repo: &HubRepo) -> PathBuf {
        self.repo_dir(&repo.repo).join("refs").join(&repo.revision)
    }

    pub fn lock_path(&self, repo: &str, etag: &str) -> PathBuf {
        self.root
            .join(".locks")
            .join(format!("models--{}", repo.replace('/', "--")))
            .join(format!("{etag}.lock"))
    }

    /// The commit `repo.revision` names in this cache without asking the Hub:
    /// the content of its ref, or the revision itself when it is a commit hash
    /// whose snapshot is here.
    pub fn commit_of(&self, repo: &HubRepo) -> Option<String> {
        if let Ok(text) = std::fs::read_to_string(self.ref_path(repo)) {
            let commit = text.trim();
            if is_safe_name(commit) {
                return Some(commit.to_string());
            }
        }
        let is_commit =
            repo.revision.len() == 40 && repo.revision.bytes().all(|b| b.is_ascii_hexdigit());
        (is_commit && self.snapshot_dir(&repo.repo, &repo.revision).is_dir())
            .then(|| repo.revision.clone())
    }

    /// The snapshot of `repo` Tandem can load straight from this cache, or
    /// why there is none (for the message that precedes a download).
    pub fn loadable_snapshot(&self, repo: &HubRepo) -> Result<PathBuf, String> {
        if !self.repo_dir(&repo.repo).is_dir() {
            return Err("no copy of the repository".to_string());
        }
        let Some(commit) = self.commit_of(repo) else {
            return Err(format!("no snapshot of revision {}", repo.revision));
        };
        let dir = self.snapshot_dir(&repo.repo, &commit);
        match missing_for_loading(&dir) {
            None => Ok(dir),
            Some(why) => Err(format!("snapshot {commit} {why}")),
        }
    }

    /// Records that `repo.revision` is at `commit` (nothing for a revision that
    /// is the commit itself). Written aside and renamed, so a reader never
    /// sees half a hash.
    pub fn write_ref(&self, repo: &HubRepo, commit: &str) -> std::io::Result<()> {
        if repo.revision == commit {
            return Ok(());
        }
        let path = self.ref_path(repo);
        let parent = path.parent().expect("a ref has a parent");
        std::fs::create_dir_all(parent)?;
        let tmp = parent.join(format!(
            ".{}.{}.tmp",
            path.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        std::fs::write(&tmp, commit)?;
        std::fs::rename(&tmp, &path)
    }

    /// Points `snapshots/<commit>/<file>` at `blobs/<etag>` with a relative
    /// symlink, replacing whatever was there, atomically.
    pub fn link(&self, repo: &str, commit: &str, file: &str, etag: &str) -> std::io::Result<()> {
        let link = self.snapshot_dir(repo, commit).join(file);
        let parent = link.parent().expect("a file has a parent");
        std::fs::create_dir_all(parent)?;
        // From the file's directory up to the repository directory.
        let depth = 2 + file.matches('/').count();
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(etag);
        let tmp = parent.join(format!(
            ".{}.{}.tmp",
            link.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        symlink(&target, &tmp)?;
        std::fs::rename(&tmp, &link)
    }

    /// Takes the exclusive lock of one blob, waiting for another process
    /// (Tandem or `huggingface_hub`) that holds it; released on drop. `name`
    /// names the blob in the message shown while waiting.
    pub fn lock_blob(&self, repo: &str, etag: &str, name: &str) -> std::io::Result<BlobLock> {
        let path = self.lock_path(repo, etag);
        std::fs::create_dir_all(path.parent().expect("a lock has a parent"))?;
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                eprintln!("{name}: waiting for another process downloading it");
                file.lock()?;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        Ok(BlobLock { _file: file })
    }

    /// The models of this cache Tandem can load, by the name `--model` takes:
    /// `ORG/REPO` for the commit `main` points at, `ORG/REPO@REF` for other refs.
    pub fn models(&self) -> Vec<(String, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut models = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            let dir_name = entry.file_name().to_string_lossy().into_owned();
            let Some(repo) = repo_of_dir_name(&dir_name) else {
                continue;
            };
            let refs_dir = entry.path().join("refs");
            for revision in ref_names(&refs_dir) {
                let spec = HubRepo {
                    repo: repo.clone(),
                    revision: revision.clone(),
                };
                if let Ok(path) = self.loadable_snapshot(&spec) {
                    let name = if revision == super::hub::DEFAULT_REVISION {
                        repo.clone()
                    } else {
                        format!("{repo}@{revision}")
                    };
                    models.push((name, path));
                }
            }
        }
        models.sort();
        models
    }
}

/// Held while a blob is checked and written.
#[derive(Debug)]
pub struct BlobLock {
    _file: File,
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(_target: &Path, _link: &Path) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "the hub cache needs symbolic links",
    ))
}

/// `ORG/REPO` of a `models--ORG--REPO` directory name (the Hub allows no `--`
/// in either part, so the first one separates them).
pub fn repo_of_dir_name(name: &str) -> Option<String> {
    let rest = name.strip_prefix("models--")?;
    let (org, repo) = rest.split_once("--")?;
    (!org.is_empty() && !repo.is_empty()).then(|| format!("{org}/{repo}"))
}

/// The refs under `dir`, nested ones (`refs/pr/1`) by their path.
fn ref_names(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    let mut pending = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, prefix)) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let full = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push((entry.path(), full)),
                Ok(_) => names.push(full),
                Err(_) => {}
            }
        }
    }
    names.sort();
    names
}

/// What a snapshot directory lacks for Tandem to load it, or `None`: the
/// config, the tokenizer, and safetensors weights (every shard the index
/// names; without an index, every shard of an `-of-N` set).
pub fn missing_for_loading(dir: &Path) -> Option<String> {
    if !dir.is_dir() {
        return Some("is not in the cache".to_string());
    }
    let absent: Vec<&str> = REQUIRED
        .iter()
        .copied()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    if !absent.is_empty() {
        return Some(format!("lacks {}", absent.join(", ")));
    }
    let index = dir.join(INDEX_FILE);
    let shards: BTreeSet<String> = if index.is_file() {
        let Ok(text) = std::fs::read_to_string(&index) else {
            return Some(format!("has an unreadable {INDEX_FILE}"));
        };
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
            return Some(format!("has an invalid {INDEX_FILE}"));
        };
        let Some(map) = value.get("weight_map").and_then(|m| m.as_object()) else {
            return Some(format!("has a {INDEX_FILE} without a weight_map"));
        };
        map.values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    } else {
        let present: BTreeSet<String> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".safetensors") && dir.join(n).is_file())
                    .collect()
            })
            .unwrap_or_default();
        if present.is_empty() {
            return Some("has no .safetensors weights".to_string());
        }
        present
            .iter()
            .flat_map(|n| shard_set(n))
            .collect::<BTreeSet<_>>()
    };
    let absent: Vec<String> = shards
        .into_iter()
        .filter(|s| !dir.join(s).is_file())
        .collect();
    if absent.is_empty() {
        None
    } else {
        Some(format!("lacks {}", absent.join(", ")))
    }
}

/// Every file of the `-of-N` set `name` belongs to (`model-00001-of-00003.safetensors`
/// → the three), or just `name`.
fn shard_set(name: &str) -> Vec<String> {
    let parsed = (|| {
        let stem = name.strip_suffix(".safetensors")?;
        let (head, total) = stem.rsplit_once("-of-")?;
        let (base, index) = head.rsplit_once('-')?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(index) || !digits(total) || index.len() != total.len() {
            return None;
        }
        let n: usize = total.parse().ok()?;
        let width = total.len();
        Some(
            (1..=n)
                .map(|i| format!("{base}-{i:0width$}-of-{total}.safetensors"))
                .collect(),
        )
    })();
    parsed.unwrap_or_else(|| vec![name.to_string()])
}

/// A commit hash or etag fit to be a file name: letters and digits only.
pub fn is_safe_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// `HF_HUB_OFFLINE` as `huggingface_hub` reads it: 1, ON, YES or TRUE.
pub fn offline_from_env() -> bool {
    offline_value(std::env::var("HF_HUB_OFFLINE").ok().as_deref())
}

fn offline_value(value: Option<&str>) -> bool {
    value.is_some_and(|v| {
        matches!(
            v.trim().to_ascii_uppercase().as_str(),
            "1" | "ON" | "YES" | "TRUE"
        )
    })
}

/// The cache directory from the environment `get` reads.
fn dir_from(get: impl Fn(&str) -> Option<String>) -> PathBuf {
    let set = |k: &str| get(k).filter(|v| !v.is_empty());
    if let Some(dir) = set("HF_HUB_CACHE").or_else(|| set("HUGGINGFACE_HUB_CACHE")) {
        return PathBuf::from(dir);
    }
    if let Some(home) = set("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let cache = set("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(set("HOME").unwrap_or_else(|| ".".into())).join(".cache"));
    cache.join("huggingface").join("hub")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn the_cache_directory_follows_huggingface_hub() {
        let all = [
            ("HF_HUB_CACHE", "/a"),
            ("HUGGINGFACE_HUB_CACHE", "/b"),
            ("HF_HOME", "/c"),
            ("XDG_CACHE_HOME", "/d"),
            ("HOME", "/e"),
        ];
        let cases = [
            (&all[..], "/a"),
            (&all[1..], "/b"),
            (&all[2..], "/c/hub"),
            (&all[3..], "/d/huggingface/hub"),
            (&all[4..], "/e/.cache/huggingface/hub"),
        ];
        for (vars, want) in cases {
            assert_eq!(dir_from(env(vars)), PathBuf::from(want), "{vars:?}");
        }
        // Set but empty counts as unset.
        assert_eq!(
            dir_from(env(&[("HF_HUB_CACHE", ""), ("HF_HOME", "/c")])),
            PathBuf::from("/c/hub")
        );
    }

    #[test]
    fn offline_takes_the_values_huggingface_hub_takes() {
        for on in ["1", "ON", "yes", "True"] {
            assert!(offline_value(Some(on)), "{on}");
        }
        for off in ["0", "", "no", "false"] {
            assert!(!offline_value(Some(off)), "{off}");
        }
        assert!(!offline_value(None));
    }

    #[test]
    fn paths_follow_the_layout() {
        let cache = HubCache::new("/h");
        let repo = HubRepo {
            repo: "org/m".into(),
            revision: "refs/pr/1".into(),
        };
        assert_eq!(cache.repo_dir("org/m"), PathBuf::from("/h/models--org--m"));
        assert_eq!(
            cache.ref_path(&repo),
            PathBuf::from("/h/models--org--m/refs/refs/pr/1")
        );
        assert_eq!(
            cache.lock_path("org/m", "ab12"),
            PathBuf::from("/h/.locks/models--org--m/ab12.lock")
        );
        assert_eq!(repo_of_dir_name("models--org--m").as_deref(), Some("org/m"));
        assert_eq!(repo_of_dir_name("datasets--org--m"), None);
    }

    #[test]
    fn shard_sets_name_every_shard() {
        assert_eq!(
            shard_set("model-00002-of-00003.safetensors"),
            vec![
                "model-00001-of-00003.safetensors",
                "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors"
            ]
        );
        assert_eq!(shard_set("model.safetensors"), vec!["model.safetensors"]);
    }

    #[test]
    fn links_are_relative_and_a_snapshot_is_loadable_only_when_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = HubCache::new(tmp.path());
        let repo = HubRepo {
            repo: "org/m".into(),
            revision: "main".into(),
        };
        let commit = "c0ffee";
        assert!(cache.loadable_snapshot(&repo).is_err());
        cache.write_ref(&repo, commit).unwrap();
        assert_eq!(cache.commit_of(&repo).as_deref(), Some(commit));
        let blobs = cache.repo_dir("org/m").join("blobs");
        std::fs::create_dir_all(&blobs).unwrap();
        for (file, etag) in [
            ("config.json", "e1"),
            ("tokenizer.json", "e2"),
            ("model-00001-of-00002.safetensors", "e3"),
        ] {
            std::fs::write(blobs.join(etag), file).unwrap();
            cache.link("org/m", commit, file, etag).unwrap();
        }
        let link = cache.snapshot_dir("org/m", commit).join("config.json");
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            PathBuf::from("../../blobs/e1")
        );
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "config.json");
        let why = cache.loadable_snapshot(&repo).unwrap_err();
        assert!(why.contains("model-00002-of-00002.safetensors"), "{why}");

        std::fs::write(blobs.join("e4"), "w").unwrap();
        cache
            .link("org/m", commit, "model-00002-of-00002.safetensors", "e4")
            .unwrap();
        assert_eq!(
            cache.loadable_snapshot(&repo).unwrap(),
            cache.snapshot_dir("org/m", commit)
        );
        assert_eq!(
            cache.models(),
            vec![("org/m".to_string(), cache.snapshot_dir("org/m", commit))]
        );
        // A dangling link is a missing file.
        std::fs::remove_file(blobs.join("e2")).unwrap();
        let why = cache.loadable_snapshot(&repo).unwrap_err();
        assert!(why.contains("tokenizer.json"), "{why}");
    }
}
