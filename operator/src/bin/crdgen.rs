//! Prints the DisaggDeployment CRD; with `--write`, writes it to `crds/` and the chart, and the
//! field reference to `docs/crd.md`.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let yaml = tandem_operator::crd_yaml();
    if std::env::args().nth(1).as_deref() == Some("--write") {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        for (path, text) in [
            ("crds/disaggdeployments.tandem.dev.yaml", yaml.as_str()),
            (
                "charts/tandem-operator/crds/disaggdeployments.tandem.dev.yaml",
                yaml.as_str(),
            ),
            ("docs/crd.md", &tandem_operator::docs::crd_markdown()),
        ] {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().expect("file paths have a parent"))?;
            std::fs::write(&path, text)?;
            eprintln!("wrote {}", path.display());
        }
    } else {
        print!("{yaml}");
    }
    Ok(())
}
