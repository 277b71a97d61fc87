//! The OTLP trace exporter, configured by the standard OpenTelemetry
//! environment variables.
//!
//! Tracing is on when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, unless `OTEL_SDK_DISABLED=true` or
//! `OTEL_TRACES_EXPORTER=none`. The exporter and SDK then read the rest:
//! `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` (`http/protobuf`, the default, or
//! `grpc`), `..._HEADERS`, `..._TIMEOUT`, `OTEL_TRACES_SAMPLER(_ARG)`,
//! `OTEL_BSP_*`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

/// What is read from the environment; a map in tests.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }
}

impl Env for std::collections::HashMap<&str, &str> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name)
            .map(|v| v.to_string())
            .filter(|v| !v.trim().is_empty())
    }
}

/// How traces leave the process, as the environment asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// `http/protobuf` or `grpc`.
    pub protocol: &'static str,
    /// `service.name`.
    pub service: String,
}

/// `Ok(None)`: tracing is off. `Err`: asked for but impossible (reported,
/// and the process runs without tracing).
pub fn plan(env: &dyn Env, default_service: &str) -> Result<Option<Plan>, String> {
    let is_true = |name: &str| {
        env.var(name)
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    };
    if is_true("OTEL_SDK_DISABLED") {
        return Ok(None);
    }
    match env.var("OTEL_TRACES_EXPORTER").as_deref().map(str::trim) {
        None | Some("otlp") => {}
        Some("none") => return Ok(None),
        Some(other) => {
            return Err(format!(
                "OTEL_TRACES_EXPORTER={other} is not supported (otlp or none)"
            ))
        }
    }
    if env.var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
        && env.var("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
    {
        return Ok(None);
    }
    let protocol = env
        .var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| env.var("OTEL_EXPORTER_OTLP_PROTOCOL"));
    let protocol = match protocol.as_deref().map(str::trim) {
        None | Some("http/protobuf") => "http/protobuf",
        Some("grpc") => "grpc",
        Some(other) => {
            return Err(format!(
                "OTLP protocol {other:?} is not supported (http/protobuf or grpc)"
            ))
        }
    };
    let from_attributes = env.var("OTEL_RESOURCE_ATTRIBUTES").and_then(|attrs| {
        attrs.split(',').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k.trim() == "service.name").then(|| v.trim().to_string())
        })
    });
    let service = env
        .var("OTEL_SERVICE_NAME")
        .or(from_attributes)
        .unwrap_or_else(|| default_service.to_string());
    Ok(Some(Plan { protocol, service }))
}

/// A running exporter.
pub struct Exporting {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    plan: Plan,
    /// The gRPC exporter's channel lives on this runtime, so export works
    /// whatever runtime (if any) the process runs and until shutdown.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Exporting {
    pub fn tracer(&self) -> SdkTracer {
        self.tracer.clone()
    }

    pub fn service(&self) -> &str {
        &self.plan.service
    }

    pub fn protocol(&self) -> &'static str {
        self.plan.protocol
    }

    /// Exports what is left and stops.
    pub fn shutdown(self) {
        let _ = self.provider.force_flush();
        let _ = self.provider.shutdown();
        if let Some(runtime) = self.runtime {
            runtime.shutdown_background();
        }
    }
}

/// The exporter the process environment asks for, if any.
pub fn from_env(default_service: &str) -> Result<Option<Exporting>, String> {
    let Some(plan) = plan(&ProcessEnv, default_service)? else {
        return Ok(None);
    };
    let (exporter, runtime) = match plan.protocol {
        "grpc" => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("otlp-export")
                .enable_all()
                .build()
                .map_err(|e| format!("starting the OTLP exporter's runtime: {e}"))?;
            let exporter = {
                let _in_runtime = runtime.enter();
                SpanExporter::builder().with_tonic().build()
            };
            (exporter, Some(runtime))
        }
        _ => (
            SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .build(),
            None,
        ),
    };
    let exporter = exporter.map_err(|e| format!("building the OTLP exporter: {e}"))?;
    let resource = Resource::builder()
        .with_service_name(plan.service.clone())
        .with_attribute(KeyValue::new("service.namespace", "tandem"))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("tandem");
    Ok(Some(Exporting {
        provider,
        tracer,
        plan,
        runtime,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn plan_of(pairs: &[(&'static str, &'static str)]) -> Result<Option<Plan>, String> {
        let env: HashMap<&str, &str> = pairs.iter().copied().collect();
        plan(&env, "tandem-decode")
    }

    #[test]
    fn tracing_is_off_without_an_endpoint_or_when_disabled() {
        assert_eq!(plan_of(&[]), Ok(None));
        assert_eq!(plan_of(&[("OTEL_SERVICE_NAME", "x")]), Ok(None));
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
        assert_eq!(
            plan_of(&[endpoint, ("OTEL_SDK_DISABLED", "TRUE")]),
            Ok(None)
        );
        assert_eq!(
            plan_of(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")]),
            Ok(None)
        );
        assert!(plan_of(&[endpoint, ("OTEL_SDK_DISABLED", "false")])
            .unwrap()
            .is_some());
        assert!(plan_of(&[endpoint, ("OTEL_TRACES_EXPORTER", "zipkin")]).is_err());
    }

    #[test]
    fn the_protocol_defaults_to_http_protobuf_and_the_traces_variable_wins() {
        let traces = (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4318/v1/traces",
        );
        assert_eq!(
            plan_of(&[traces]).unwrap().unwrap().protocol,
            "http/protobuf"
        );
        let p = plan_of(&[
            traces,
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
        ]);
        assert_eq!(p.unwrap().unwrap().protocol, "grpc");
        assert!(plan_of(&[traces, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).is_err());
    }

    #[test]
    fn the_service_name_is_the_roles_unless_the_environment_names_one() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
        let service = |extra: &[(&'static str, &'static str)]| {
            let mut pairs = vec![endpoint];
            pairs.extend_from_slice(extra);
            plan_of(&pairs).unwrap().unwrap().service
        };
        assert_eq!(service(&[]), "tandem-decode");
        assert_eq!(
            service(&[("OTEL_RESOURCE_ATTRIBUTES", "team=ml, service.name=llm ,x=y")]),
            "llm"
        );
        assert_eq!(
            service(&[
                ("OTEL_RESOURCE_ATTRIBUTES", "service.name=llm"),
                ("OTEL_SERVICE_NAME", "gateway")
            ]),
            "gateway"
        );
    }
}
