//! The endpoints file of `tandem local`: which processes run where. The
//! supervisor rewrites it (atomically) whenever a process starts, becomes
//! ready, dies or is stopped; workers and the frontend poll it to find their
//! peers.
//!
//! ```json
//! {"processes": [
//!   {"role": "prefill", "index": 0, "pid": 4242, "http": "127.0.0.1:40001", "grpc": "127.0.0.1:40002", "up": true},
//!   {"role": "frontend", "index": 0, "pid": 4250, "http": "127.0.0.1:8000", "grpc": null, "up": true}
//! ]}
//! ```
//!
//! `up` is true from the moment the process answered `/health` with 200 until
//! it exits or is being stopped; `pid` is null while a crashed process waits
//! to be restarted.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;

use super::{DiscoveryError, Role};

/// How often file discovery re-reads the endpoints file: a new worker is
/// routed to within this long of becoming ready.
pub const FILE_POLL_INTERVAL: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EndpointsFile {
    pub processes: Vec<ProcessEntry>,
}

/// One supervised process.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessEntry {
    pub role: Role,
    /// Position within the role, from 0; stable across restarts.
    pub index: usize,
    /// `None` while the process is down (waiting to be restarted).
    pub pid: Option<u32>,
    /// `host:port` of `/health`, `/metrics` (and the OpenAI API on the frontend).
    pub http: String,
    /// `host:port` of the gRPC server; workers only.
    pub grpc: Option<String>,
    /// Running and answered `/health` with 200.
    pub up: bool,
}

impl EndpointsFile {
    /// Reads the file; a file that does not exist (yet) lists no processes.
    pub fn read(path: &Path) -> Result<Self, DiscoveryError> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(DiscoveryError::ReadFile {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        serde_json::from_slice(&bytes).map_err(|source| DiscoveryError::ParseFile {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Writes the file so readers see the old or the new content, never a
    /// torn one: a temporary file in the same directory, then a rename.
    pub fn write_atomically(&self, path: &Path) -> Result<(), DiscoveryError> {
        let error = |source| DiscoveryError::WriteFile {
            path: path.to_path_buf(),
            source,
        };
        // Beside the target, so the rename stays within one filesystem.
        let name = path
            .file_name()
            .ok_or_else(|| error(std::io::Error::other("the path names no file")))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let mut json = serde_json::to_vec_pretty(self).expect("plain data serializes");
        json.push(b'\n');
        let written = std::fs::File::create(&tmp).and_then(|mut f| f.write_all(&json));
        if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(error(e));
        }
        Ok(())
    }

    /// The gRPC addresses of the up processes of `role`.
    pub fn up_grpc_addresses(&self, role: Role) -> BTreeSet<String> {
        self.processes
            .iter()
            .filter(|p| p.role == role && p.up)
            .filter_map(|p| p.grpc.clone())
            .collect()
    }
}

/// Polls `path` and publishes the up workers of `role`.
pub(super) fn watch_file(path: PathBuf, role: Role) -> watch::Receiver<BTreeSet<String>> {
    let initial = match EndpointsFile::read(&path) {
        Ok(file) => file.up_grpc_addresses(role),
        Err(e) => {
            tracing::warn!("{e}");
            BTreeSet::new()
        }
    };
    let (tx, rx) = watch::channel(initial);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(FILE_POLL_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Warn once per distinct problem, not three times a second.
        let mut last_error: Option<String> = None;
        loop {
            tokio::select! {
                () = tx.closed() => return,
                _ = ticks.tick() => {}
            }
            let read = {
                let path = path.clone();
                tokio::task::spawn_blocking(move || EndpointsFile::read(&path)).await
            };
            match read {
                Ok(Ok(file)) => {
                    last_error = None;
                    let addresses = file.up_grpc_addresses(role);
                    tx.send_if_modified(|current| {
                        if *current == addresses {
                            return false;
                        }
                        tracing::info!(
                            tier = %role,
                            workers = ?addresses,
                            "discovered workers changed"
                        );
                        *current = addresses;
                        true
                    });
                }
                Ok(Err(e)) => {
                    let message = e.to_string();
                    if last_error.as_ref() != Some(&message) {
                        tracing::warn!("{message}; keeping the last known workers");
                        last_error = Some(message);
                    }
                }
                Err(join) => {
                    tracing::error!("reading the endpoints file panicked: {join}");
                    return;
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(role: Role, index: usize, port: u16, up: bool) -> ProcessEntry {
        ProcessEntry {
            role,
            index,
            pid: up.then_some(1000 + u32::from(port)),
            http: format!("127.0.0.1:{}", port + 1000),
            grpc: (role != Role::Frontend).then(|| format!("127.0.0.1:{port}")),
            up,
        }
    }

    fn set(addresses: &[&str]) -> BTreeSet<String> {
        addresses.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn the_format_is_the_documented_one() {
        let file = EndpointsFile {
            processes: vec![entry(Role::Decode, 0, 9000, true)],
        };
        let json: serde_json::Value =
            serde_json::from_slice(&serde_json::to_vec(&file).unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"processes": [{"role": "decode", "index": 0, "pid": 10000,
                "http": "127.0.0.1:10000", "grpc": "127.0.0.1:9000", "up": true}]})
        );
    }

    #[test]
    fn write_then_read_round_trips_and_a_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("endpoints.json");
        assert_eq!(
            EndpointsFile::read(&path).unwrap(),
            EndpointsFile::default()
        );
        let file = EndpointsFile {
            processes: vec![
                entry(Role::Prefill, 0, 9000, true),
                entry(Role::Frontend, 0, 8000, true),
            ],
        };
        file.write_atomically(&path).unwrap();
        assert_eq!(EndpointsFile::read(&path).unwrap(), file);
        // No temporary files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        std::fs::write(&path, "{\"processes\": [{\"role\": \"router\"}]}").unwrap();
        let err = EndpointsFile::read(&path).unwrap_err().to_string();
        assert!(
            err.contains("endpoints.json") && err.contains("router"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn rewriting_the_file_changes_the_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("endpoints.json");
        EndpointsFile {
            processes: vec![
                entry(Role::Decode, 0, 9000, true),
                entry(Role::Decode, 1, 9001, false),
                entry(Role::Prefill, 0, 9100, true),
                entry(Role::Frontend, 0, 8000, true),
            ],
        }
        .write_atomically(&path)
        .unwrap();

        let mut rx = super::super::start(super::super::DiscoveryConfig::File {
            path: path.clone(),
            role: Role::Decode,
        })
        .await
        .unwrap();
        assert_eq!(*rx.borrow_and_update(), set(&["127.0.0.1:9000"]));

        // decode-1 comes up, decode-0 goes down (crashed).
        EndpointsFile {
            processes: vec![
                entry(Role::Decode, 0, 9000, false),
                entry(Role::Decode, 1, 9001, true),
                entry(Role::Prefill, 0, 9100, true),
            ],
        }
        .write_atomically(&path)
        .unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("a change within a few polls")
            .unwrap();
        assert_eq!(*rx.borrow_and_update(), set(&["127.0.0.1:9001"]));

        // A broken file keeps the last known set...
        std::fs::write(&path, "{not json").unwrap();
        let waited = tokio::time::timeout(FILE_POLL_INTERVAL * 3, rx.changed()).await;
        assert!(waited.is_err(), "a broken file must not change the set");
        assert_eq!(*rx.borrow(), set(&["127.0.0.1:9001"]));

        // ...and the file going away (local stopped) empties it.
        std::fs::remove_file(&path).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("a change within a few polls")
            .unwrap();
        assert!(rx.borrow().is_empty());
    }
}
