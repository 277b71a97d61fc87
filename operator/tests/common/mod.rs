//! Shared fixtures: the example manifests, as the API server would hand them to the operator.

#![allow(dead_code)] // each test binary uses a different subset

pub mod mock_api;

use std::path::{Path, PathBuf};

use tandem_operator::crd::DisaggDeployment;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `manifests/*.yaml` with the `DisaggDeployment` it holds, namespace and uid filled in
/// the way the API server fills them.
pub fn example_deployments() -> Vec<(String, DisaggDeployment)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join("manifests"))
        .expect("manifests/ exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "expected the five example manifests, found {files:?}"
    );
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("readable manifest");
            let mut dd: DisaggDeployment = serde_yaml::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not a DisaggDeployment: {e}", path.display()));
            as_stored(&mut dd);
            let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
            (stem, dd)
        })
        .collect()
}

/// Fills what the API server sets on create.
pub fn as_stored(dd: &mut DisaggDeployment) {
    dd.metadata
        .namespace
        .get_or_insert_with(|| "default".into());
    dd.metadata
        .uid
        .get_or_insert_with(|| "00000000-0000-4000-8000-000000000001".into());
    dd.metadata.generation.get_or_insert(1);
}
