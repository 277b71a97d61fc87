//! `build` pinned by golden YAML, and every rendered `tandem` command line checked against the
//! worker's real CLI so the operator cannot drift from the flags the worker has.
//!
//! Regenerate the snapshots after an intended change with
//! `TANDEM_UPDATE_GOLDEN=1 cargo test -p tandem-operator --test golden` and review the diff.

mod common;

use clap::CommandFactory;
use serde_json::Value;
use tandem_operator::build::build;
use tandem_operator::validate::validate;

/// Roles the operator renders that the worker's CLI does not have yet. The test asserts each
/// is still absent, so it fails the day a role lands until it is removed from this list and
/// its flags get checked like every other role's. (Empty since `frontend`, `prefill` and
/// `decode` landed.)
const ROLES_PENDING_IN_WORKER: &[&str] = &[];

/// Flags rendered for subcommands the worker has, which the worker does not accept yet. Each is
/// asserted to be still rejected, so the list must shrink as the worker grows. (Empty since
/// `model fetch hf://… --output` landed.)
const FLAGS_PENDING_IN_WORKER: &[(&str, &str)] = &[];

fn golden_path(stem: &str) -> std::path::PathBuf {
    common::repo_root()
        .join("operator/tests/golden")
        .join(format!("{stem}.yaml"))
}

#[test]
fn rendered_children_match_golden_files() {
    let update = std::env::var_os("TANDEM_UPDATE_GOLDEN").is_some();
    let mut stale = Vec::new();
    for (stem, dd) in common::example_deployments() {
        let valid =
            validate(&dd).unwrap_or_else(|e| panic!("manifests/{stem}.yaml is invalid: {e}"));
        let rendered = build(&valid).to_yaml();
        let path = golden_path(&stem);
        if update {
            std::fs::write(&path, &rendered).expect("write golden file");
            continue;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run with TANDEM_UPDATE_GOLDEN=1 to create it)",
                path.display()
            )
        });
        if expected != rendered {
            stale.push(stem);
        }
    }
    assert!(
        stale.is_empty(),
        "rendered children differ from operator/tests/golden for {stale:?}; \
         rerun with TANDEM_UPDATE_GOLDEN=1 if the change is intended and review the diff"
    );
}

/// Every container whose command is `tandem`, as (object name, args).
fn tandem_invocations(objects: &[Value]) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for obj in objects {
        let Some(pod) = obj.pointer("/spec/template/spec") else {
            continue;
        };
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        for list in ["initContainers", "containers"] {
            for c in pod[list].as_array().into_iter().flatten() {
                if c["command"] != serde_json::json!(["tandem"]) {
                    continue;
                }
                let args = c["args"].as_array().expect("tandem containers have args");
                let args = args
                    .iter()
                    .map(|a| a.as_str().expect("string args").to_string())
                    .collect();
                out.push((
                    format!("{name}/{}", c["name"].as_str().unwrap_or_default()),
                    args,
                ));
            }
        }
    }
    out
}

/// The subcommand path (`serve`, `model fetch`) at the head of `args`, and the rest; `None`
/// when the worker CLI has no such subcommand.
fn split_subcommand(args: &[String]) -> Option<(String, Vec<String>)> {
    let mut cmd = tandem_api::args::RoleCli::command();
    let mut path = Vec::new();
    let mut rest = args;
    while let Some((head, tail)) = rest.split_first() {
        if !cmd.has_subcommands() {
            break;
        }
        cmd = cmd.find_subcommand(head)?.clone();
        path.push(head.clone());
        rest = tail;
    }
    Some((path.join(" "), rest.to_vec()))
}

fn parse(args: impl IntoIterator<Item = String>) -> Result<tandem_api::args::RoleCli, clap::Error> {
    use clap::Parser;
    tandem_api::args::RoleCli::try_parse_from(std::iter::once("tandem".to_string()).chain(args))
}

#[test]
fn every_rendered_tandem_command_parses_with_the_worker_cli() {
    let mut checked = 0;
    let mut pending_seen = std::collections::BTreeSet::new();
    for (stem, dd) in common::example_deployments() {
        let children = build(&validate(&dd).expect("valid example")).to_values();
        let invocations = tandem_invocations(&children);
        assert!(
            !invocations.is_empty(),
            "{stem}: no tandem containers rendered"
        );
        for (container, args) in invocations {
            let role = &args[0];
            if ROLES_PENDING_IN_WORKER.contains(&role.as_str()) {
                assert!(
                    split_subcommand(&args).is_none(),
                    "the worker now has `tandem {role}`: remove it from ROLES_PENDING_IN_WORKER so \
                     its flags are checked"
                );
                pending_seen.insert(role.clone());
                continue;
            }
            let (path, flags) = split_subcommand(&args).unwrap_or_else(|| {
                panic!("{stem} {container}: the worker has no `tandem {role}` ({args:?})")
            });
            let mut accepted = path.split(' ').map(String::from).collect::<Vec<_>>();
            let mut i = 0;
            while i < flags.len() {
                let flag = &flags[i];
                let takes_value = flags.get(i + 1).is_some_and(|v| !v.starts_with("--"));
                let pair = &flags[i..if takes_value { i + 2 } else { i + 1 }];
                if FLAGS_PENDING_IN_WORKER.contains(&(path.as_str(), flag.as_str())) {
                    let alone = path
                        .split(' ')
                        .map(String::from)
                        .chain(pair.iter().cloned());
                    let err = parse(alone).expect_err(&format!(
                        "the worker now accepts `tandem {path} {flag}`: remove it from FLAGS_PENDING_IN_WORKER"
                    ));
                    assert_eq!(
                        err.kind(),
                        clap::error::ErrorKind::UnknownArgument,
                        "`tandem {path} {flag}` fails for another reason than an unknown flag: {err}"
                    );
                } else {
                    accepted.extend(pair.iter().cloned());
                }
                i += pair.len();
            }
            if let Err(e) = parse(accepted.clone()) {
                panic!(
                    "{stem} {container}: `tandem {}` is rejected by the worker CLI:\n{e}",
                    accepted.join(" ")
                );
            }
            checked += 1;
        }
    }
    assert!(
        checked > 0,
        "no rendered command line was checked against the worker CLI"
    );
    for role in ROLES_PENDING_IN_WORKER {
        assert!(
            pending_seen.contains(*role),
            "`{role}` is listed as pending but never rendered"
        );
    }
}
