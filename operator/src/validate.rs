//! First pipeline step: checks a `DisaggDeployment` beyond what its CRD schema enforces and
//! parses what `build` needs. Never touches a client.
//!
//! The CRD's CEL rules reject most bad objects at `kubectl apply`; this step still re-checks the
//! rules the build relies on, because objects stored under an older CRD skip the new rules.

use kube::ResourceExt;

use crate::crd::{DisaggDeployment, Tier};

/// Where model weights come from, parsed from `spec.model.source`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// `hf://org/repo[@revision]`: fetched by an init container (`tandem model fetch` takes
    /// the source as it is; the revision is checked here and needs no field).
    HuggingFace { repo: String },
    /// `pvc://claim/path`: a PersistentVolumeClaim mounted read-only.
    Pvc { claim: String, path: String },
    /// `file:///path`: a path inside the image.
    File { path: String },
}

/// Why a `DisaggDeployment` cannot be reconciled until its spec changes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidationError {
    #[error("metadata.{0} is missing (the API server always sets it)")]
    MissingMetadata(&'static str),
    #[error("spec.model.source {value:?}: {reason}")]
    ModelSource { value: String, reason: &'static str },
    #[error("spec.model.hfTokenSecretRef only applies to hf:// sources, not {0:?}")]
    TokenWithoutHf(String),
    #[error("spec.autoscaling.{tier}: minReplicas {min} exceeds maxReplicas {max}")]
    ReplicaBounds { tier: Tier, min: i32, max: i32 },
    #[error("spec.autoscaling.enabled needs spec.autoscaling.slo and prometheusUrl")]
    AutoscalingIncomplete,
    #[error("spec.autoscaling.slo: {0} must be positive")]
    NonPositiveSlo(&'static str),
    #[error("spec.autoscaling.prefill is set but there is no spec.prefill tier to scale")]
    PrefillBoundsWithoutTier,
    #[error("spec.{0}.replicas must not be negative")]
    NegativeReplicas(Tier),
    #[error("spec.{0}.gpusPerReplica must be between 0 and 16")]
    GpuCount(Tier),
}

/// A `DisaggDeployment` that passed [`validate`]: the only input [`crate::build`] accepts.
#[derive(Clone, Debug)]
pub struct Validated<'a> {
    pub dd: &'a DisaggDeployment,
    pub name: String,
    pub namespace: String,
    pub source: ModelSource,
}

/// Parses `hf://org/repo[@revision]`, `pvc://claim[/path]` or `file:///path`.
pub fn parse_model_source(source: &str) -> Result<ModelSource, ValidationError> {
    let bad = |reason| ValidationError::ModelSource {
        value: source.to_string(),
        reason,
    };
    if let Some(rest) = source.strip_prefix("hf://") {
        let (repo, revision) = match rest.split_once('@') {
            Some((repo, rev)) => (repo, Some(rev)),
            None => (rest, None),
        };
        let mut parts = repo.split('/');
        let (org, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let valid_part = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        };
        if !valid_part(org) || !valid_part(name) || parts.next().is_some() {
            return Err(bad("hf:// sources are hf://<org>/<repo>[@<revision>]"));
        }
        let valid_revision = |r: &str| {
            !r.is_empty()
                && r.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c))
        };
        if revision.is_some_and(|r| !valid_revision(r)) {
            return Err(bad(
                "the revision after @ is a commit, tag or branch of letters, digits and ._/-",
            ));
        }
        Ok(ModelSource::HuggingFace {
            repo: repo.to_string(),
        })
    } else if let Some(rest) = source.strip_prefix("pvc://") {
        let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_claim = !claim.is_empty()
            && claim.len() <= 253
            && claim
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !claim.starts_with('-')
            && !claim.ends_with('-');
        if !valid_claim {
            return Err(bad(
                "pvc:// sources are pvc://<claim>/<path> with a DNS-1123 claim name",
            ));
        }
        if path.split('/').any(|segment| segment == "..") {
            return Err(bad("the path inside the claim must not contain '..'"));
        }
        Ok(ModelSource::Pvc {
            claim: claim.to_string(),
            path: path.trim_end_matches('/').to_string(),
        })
    } else if let Some(path) = source.strip_prefix("file://") {
        if !path.starts_with('/') || path.len() < 2 {
            return Err(bad("file:// sources are absolute: file:///<path>"));
        }
        Ok(ModelSource::File {
            path: path.to_string(),
        })
    } else {
        Err(bad("the scheme must be hf://, pvc:// or file://"))
    }
}

/// Checks `dd` and returns what the build needs, or the reason it cannot be built.
pub fn validate(dd: &DisaggDeployment) -> Result<Validated<'_>, ValidationError> {
    let namespace = dd
        .namespace()
        .ok_or(ValidationError::MissingMetadata("namespace"))?;
    if dd.metadata.name.is_none() {
        return Err(ValidationError::MissingMetadata("name"));
    }
    if dd.metadata.uid.is_none() {
        return Err(ValidationError::MissingMetadata("uid"));
    }
    let spec = &dd.spec;
    let source = parse_model_source(&spec.model.source)?;
    if spec.model.hf_token_secret_ref.is_some()
        && !matches!(source, ModelSource::HuggingFace { .. })
    {
        return Err(ValidationError::TokenWithoutHf(spec.model.source.clone()));
    }
    for (tier, t) in [
        (Tier::Prefill, spec.prefill.as_ref()),
        (Tier::Decode, Some(&spec.decode)),
    ] {
        let Some(t) = t else { continue };
        if t.replicas.is_some_and(|r| r < 0) {
            return Err(ValidationError::NegativeReplicas(tier));
        }
        if !(0..=16).contains(&t.gpus_per_replica) {
            return Err(ValidationError::GpuCount(tier));
        }
    }
    if let Some(autoscaling) = spec.autoscaling.as_ref().filter(|a| a.enabled) {
        let slo = autoscaling
            .slo
            .as_ref()
            .ok_or(ValidationError::AutoscalingIncomplete)?;
        if autoscaling.prometheus_url.is_none() {
            return Err(ValidationError::AutoscalingIncomplete);
        }
        if slo.ttft_p90_ms <= 0 {
            return Err(ValidationError::NonPositiveSlo("ttftP90Ms"));
        }
        if slo.itl_p90_ms <= 0 {
            return Err(ValidationError::NonPositiveSlo("itlP90Ms"));
        }
        if autoscaling.prefill.is_some() && spec.prefill.is_none() {
            return Err(ValidationError::PrefillBoundsWithoutTier);
        }
        for (tier, bounds) in [
            (Tier::Prefill, autoscaling.prefill),
            (Tier::Decode, autoscaling.decode),
        ] {
            if let Some(b) = bounds.filter(|b| b.min_replicas > b.max_replicas) {
                return Err(ValidationError::ReplicaBounds {
                    tier,
                    min: b.min_replicas,
                    max: b.max_replicas,
                });
            }
        }
    }
    Ok(Validated {
        dd,
        name: dd.name_any(),
        namespace,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_source_scheme() {
        assert_eq!(
            parse_model_source("hf://HuggingFaceTB/SmolLM2-135M-Instruct").unwrap(),
            ModelSource::HuggingFace {
                repo: "HuggingFaceTB/SmolLM2-135M-Instruct".into()
            }
        );
        assert_eq!(
            parse_model_source("hf://meta-llama/Llama-3.1-8B@0e9e39f2").unwrap(),
            ModelSource::HuggingFace {
                repo: "meta-llama/Llama-3.1-8B".into()
            }
        );
        assert_eq!(
            parse_model_source("hf://org/repo@refs/pr/1").unwrap(),
            ModelSource::HuggingFace {
                repo: "org/repo".into()
            }
        );
        for bad in [
            "hf://org/repo@",
            "hf://org/repo@v 1",
            "hf://org/repo/x",
            "hf://org",
        ] {
            assert!(parse_model_source(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_model_source("pvc://models/llama/8b/").unwrap(),
            ModelSource::Pvc {
                claim: "models".into(),
                path: "llama/8b".into()
            }
        );
        assert_eq!(
            parse_model_source("pvc://models").unwrap(),
            ModelSource::Pvc {
                claim: "models".into(),
                path: String::new()
            }
        );
        assert_eq!(
            parse_model_source("file:///opt/models/smollm2.gguf").unwrap(),
            ModelSource::File {
                path: "/opt/models/smollm2.gguf".into()
            }
        );
    }

    #[test]
    fn rejects_malformed_sources_naming_the_problem() {
        for (source, needle) in [
            ("s3://bucket/model", "scheme"),
            ("hf://only-org", "hf://<org>/<repo>"),
            ("hf://a/b/c", "hf://<org>/<repo>"),
            ("pvc://Bad_Claim/x", "DNS-1123"),
            ("pvc://claim/../etc", "'..'"),
            ("file://relative/path", "absolute"),
        ] {
            let err = parse_model_source(source).unwrap_err().to_string();
            assert!(err.contains(needle), "{source}: {err}");
            assert!(err.contains(source), "the error names the source: {err}");
        }
    }
}
