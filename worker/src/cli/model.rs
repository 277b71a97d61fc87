//! `tandem model`: fetch the default model, list the cache, show a model.

use std::path::{Path, PathBuf};

use anyhow::bail;

use tandem_api::args::ModelCommand;
use tandem_model::hub::{self, HubClient, HubRepo};
use tandem_model::hub_cache::{self, HubCache};
use tandem_model::{self as model, fetch, ModelInfo};

pub fn run(cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Fetch { name, output } => fetch_cmd(&name, output.as_deref()),
        ModelCommand::List { json } => list(json),
        ModelCommand::Show { model, json } => show(&model, json),
    }
}

fn fetch_cmd(name: &str, output: Option<&Path>) -> anyhow::Result<()> {
    if let Some(repo) = HubRepo::parse(name)? {
        return fetch_hub(&repo, output);
    }
    let default = model::DEFAULT_MODEL;
    if !name.eq_ignore_ascii_case(default) {
        bail!(
            "only the default model {default} and Hub repositories (hf://ORG/REPO[@REVISION]) \
             can be fetched; use other models by passing --model a .gguf path or a Hugging Face \
             directory"
        );
    }
    let cache = model::cache_dir();
    match fetch::fetch_default(&cache, &fetch::python())? {
        fetch::FetchOutcome::AlreadyCached(p) => {
            println!("{default} is already cached at {}", p.display())
        }
        fetch::FetchOutcome::Fetched(p) => println!("fetched {default} to {}", p.display()),
    }
    if let Some(dir) = output {
        let copied = fetch::copy_into(&cache.join(fetch::DEFAULT_FILE), dir)?;
        println!("copied {default} to {}", copied.display());
    }
    Ok(())
}

fn fetch_hub(repo: &HubRepo, output: Option<&Path>) -> anyhow::Result<()> {
    let Some(out) = output else {
        return fetch_hub_into_cache(repo);
    };
    let client = HubClient::from_env()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(client.fetch(repo, out))?;
    println!(
        "fetched {repo} to {}: {} files downloaded ({}), {} already complete",
        out.display(),
        report.downloaded.len(),
        human_bytes(report.bytes),
        report.skipped.len()
    );
    Ok(())
}

/// Into the Hugging Face cache, asking the Hub where the revision is now (so
/// a branch moves forward), downloading only the blobs the cache lacks. With
/// `HF_HUB_OFFLINE` set, only checks that the cache has it.
fn fetch_hub_into_cache(repo: &HubRepo) -> anyhow::Result<()> {
    let cache = HubCache::from_env();
    if hub_cache::offline_from_env() {
        let snapshot = hub::resolve(repo, &cache, true, HubClient::from_env)?;
        println!(
            "{repo} is in the Hugging Face cache at {} (HF_HUB_OFFLINE is set: the Hub was not asked)",
            snapshot.display()
        );
        return Ok(());
    }
    let fetched = HubClient::from_env()?.fetch_into_cache(repo, &cache)?;
    println!(
        "fetched {repo} (commit {}) into the Hugging Face cache at {}: {} files downloaded ({}), {} already complete",
        fetched.commit,
        fetched.snapshot.display(),
        fetched.report.downloaded.len(),
        human_bytes(fetched.report.bytes),
        fetched.report.skipped.len()
    );
    Ok(())
}

/// "98.4 MB" style sizes.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// "134.5M" style parameter counts.
fn human_count(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

#[derive(serde::Serialize)]
struct ListEntry {
    name: String,
    path: PathBuf,
    #[serde(flatten)]
    info: Option<ModelInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn list(json: bool) -> anyhow::Result<()> {
    let entries: Vec<ListEntry> = model::cached_models()
        .into_iter()
        .map(|m| {
            let (info, error) = match model::inspect(&m.path) {
                Ok(i) => (Some(i), None),
                Err(e) => (None, Some(e.to_string())),
            };
            ListEntry {
                name: m.name,
                path: m.path,
                info,
                error,
            }
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    if entries.is_empty() {
        println!(
            "no models in {} (run `tandem model fetch` for the default model)",
            model::cache_dir().display()
        );
        return Ok(());
    }
    let width = entries
        .iter()
        .map(|e| e.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:<width$}  {:>9}  {:<14}  PATH",
        "NAME", "SIZE", "QUANTIZATION"
    );
    for e in &entries {
        match &e.info {
            Some(i) => println!(
                "{:<width$}  {:>9}  {:<14}  {}",
                e.name,
                human_bytes(i.file_bytes),
                i.quantization,
                e.path.display()
            ),
            None => println!(
                "{:<width$}  {:>9}  {:<14}  {} (unreadable: {})",
                e.name,
                "-",
                "-",
                e.path.display(),
                e.error.as_deref().unwrap_or("")
            ),
        }
    }
    Ok(())
}

fn show(spec: &str, json: bool) -> anyhow::Result<()> {
    let path = model::resolve(Some(spec))?;
    let info = model::inspect(&path)?;
    if json {
        #[derive(serde::Serialize)]
        struct Shown<'a> {
            path: &'a std::path::Path,
            #[serde(flatten)]
            info: &'a ModelInfo,
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&Shown {
                path: &path,
                info: &info
            })?
        );
        return Ok(());
    }
    let c = &info.config;
    let rows: Vec<(&str, String)> = vec![
        ("name", info.name.clone()),
        ("path", path.display().to_string()),
        ("format", info.format.clone()),
        ("architecture", info.architecture.clone()),
        (
            "parameters",
            format!("{} ({})", human_count(info.parameters), info.parameters),
        ),
        ("quantization", info.quantization.clone()),
        ("context length", info.context_length.to_string()),
        (
            "chat template",
            if info.has_chat_template { "yes" } else { "no" }.to_string(),
        ),
        ("layers", c.num_layers.to_string()),
        ("hidden size", c.hidden_size.to_string()),
        ("intermediate size", c.intermediate_size.to_string()),
        ("attention heads", c.num_heads.to_string()),
        ("kv heads", c.num_kv_heads.to_string()),
        ("head dim", c.head_dim.to_string()),
        ("vocab size", c.vocab_size.to_string()),
        ("rope theta", c.rope_theta.to_string()),
        (
            "tied embeddings",
            if c.tie_word_embeddings { "yes" } else { "no" }.to_string(),
        ),
        ("file size", human_bytes(info.file_bytes)),
    ];
    for (k, v) in rows {
        println!("{k:<18} {v}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_naturally() {
        assert_eq!(human_bytes(98_362_432), "98.4 MB");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_count(134_515_008), "134.5M");
        assert_eq!(human_count(1_235_814_400), "1.24B");
    }
}
