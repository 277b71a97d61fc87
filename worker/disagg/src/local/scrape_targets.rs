//! Prometheus file-based service discovery for `tandem local`
//! (`--prometheus-sd-file`): the processes that are up, as scrape targets
//! labelled the way the Kubernetes scrape job labels pods (`namespace`,
//! `deployment`, `tier`, `pod`), so the planner's queries select a local
//! deployment exactly as they select one in a cluster.
//!
//! The file is a `file_sd_configs` JSON list with one target group per
//! process, rewritten atomically with the endpoints file (Prometheus re-reads
//! it on change): a worker that starts is scraped once it answers `/health`, one
//! that stops or dies leaves at once.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use crate::discovery::ProcessEntry;

#[derive(Debug, thiserror::Error)]
#[error("cannot write the Prometheus targets file {path}: {source}")]
pub struct ScrapeTargetsError {
    path: PathBuf,
    source: std::io::Error,
}

/// Where the targets go and the deployment labels every target carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrapeTargets {
    pub path: PathBuf,
    /// Value of the `namespace` label (the planner's scope).
    pub namespace: String,
    /// Value of the `deployment` label (the planner's scope).
    pub deployment: String,
}

/// One `file_sd_configs` target group.
#[derive(Debug, serde::Serialize)]
struct TargetGroup<'a> {
    targets: [&'a str; 1],
    labels: BTreeMap<&'static str, String>,
}

impl ScrapeTargets {
    /// The target groups of the up processes, as Prometheus reads them.
    fn render(&self, processes: &[ProcessEntry]) -> Vec<u8> {
        let groups: Vec<TargetGroup> = processes
            .iter()
            .filter(|p| p.up)
            .map(|p| TargetGroup {
                targets: [&p.http],
                labels: BTreeMap::from([
                    ("namespace", self.namespace.clone()),
                    ("deployment", self.deployment.clone()),
                    ("tier", p.role.to_string()),
                    ("pod", format!("{}-{}", p.role, p.index)),
                ]),
            })
            .collect();
        let mut json = serde_json::to_vec_pretty(&groups).expect("plain data serializes");
        json.push(b'\n');
        json
    }

    /// Rewrites the file (a temporary file beside it, then a rename, so
    /// Prometheus never reads half of it).
    pub fn write(&self, processes: &[ProcessEntry]) -> Result<(), ScrapeTargetsError> {
        let error = |source| ScrapeTargetsError {
            path: self.path.clone(),
            source,
        };
        let name = self
            .path
            .file_name()
            .ok_or_else(|| error(std::io::Error::other("the path names no file")))?;
        // A hidden name without the `.json` suffix: a `*.json` glob in the
        // Prometheus configuration must not pick up the temporary file.
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = self.path.with_file_name(tmp_name);
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&self.render(processes)))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(error(e));
        }
        Ok(())
    }

    /// Removes the file on shutdown: Prometheus drops the targets of a
    /// deleted file.
    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Role;

    fn process(role: Role, index: usize, port: u16, up: bool) -> ProcessEntry {
        ProcessEntry {
            role,
            index,
            pid: up.then_some(100 + port as u32),
            http: format!("127.0.0.1:{port}"),
            grpc: None,
            up,
        }
    }

    #[test]
    fn up_processes_become_labelled_target_groups() {
        let dir = tempfile::tempdir().unwrap();
        let targets = ScrapeTargets {
            path: dir.path().join("targets.json"),
            namespace: "local".into(),
            deployment: "smol".into(),
        };
        targets
            .write(&[
                process(Role::Frontend, 0, 8000, true),
                process(Role::Prefill, 0, 9000, true),
                process(Role::Prefill, 1, 9001, false),
                process(Role::Decode, 2, 9100, true),
            ])
            .unwrap();
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&targets.path).unwrap()).unwrap();
        assert_eq!(
            written,
            serde_json::json!([
                {"targets": ["127.0.0.1:8000"], "labels": {"namespace": "local", "deployment": "smol", "tier": "frontend", "pod": "frontend-0"}},
                {"targets": ["127.0.0.1:9000"], "labels": {"namespace": "local", "deployment": "smol", "tier": "prefill", "pod": "prefill-0"}},
                {"targets": ["127.0.0.1:9100"], "labels": {"namespace": "local", "deployment": "smol", "tier": "decode", "pod": "decode-2"}},
            ])
        );
        // Only the file itself: the temporary one was renamed over it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        targets.write(&[]).unwrap();
        assert_eq!(std::fs::read_to_string(&targets.path).unwrap(), "[]\n");
        targets.remove();
        assert!(!targets.path.exists());
    }

    #[test]
    fn an_unwritable_path_names_the_file() {
        let targets = ScrapeTargets {
            path: PathBuf::from("/nonexistent-dir/targets.json"),
            namespace: "local".into(),
            deployment: "local".into(),
        };
        let message = targets.write(&[]).unwrap_err().to_string();
        assert!(
            message.contains("/nonexistent-dir/targets.json"),
            "{message}"
        );
    }
}
