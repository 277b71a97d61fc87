//! What crosses process boundaries with a request: the W3C trace context
//! (`traceparent`, `tracestate`) and the request id (`x-request-id`), read
//! from and written to HTTP headers and gRPC (tonic) metadata.
//!
//! Malformed values are ignored, never refused: a bad `traceparent` starts a
//! new trace (as the W3C spec asks), a bad `x-request-id` is replaced by a
//! generated one.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};

/// The header (and gRPC metadata key) of the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The longest request id kept as given; longer ones are replaced.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// The request id a client sent, if it is usable as is: 1 to
/// [`MAX_REQUEST_ID_LEN`] characters of letters, digits and `-_.:/+=@`
/// (what UUIDs, ULIDs, base64 and the usual proxies' ids are made of), after
/// trimming surrounding blanks. Anything else (control characters, quotes,
/// spaces, non-ASCII) could forge log lines or break JSON consumers, so it is
/// not echoed.
pub fn sanitize_request_id(raw: &str) -> Option<String> {
    let id = raw.trim();
    let ok = !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(&b));
    ok.then(|| id.to_string())
}

/// A fresh request id: 32 lowercase hex digits.
pub fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The request id of an incoming HTTP request: the client's `x-request-id`
/// when usable ([`sanitize_request_id`]), else a new one.
pub fn request_id_from_headers(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(sanitize_request_id)
        .unwrap_or_else(new_request_id)
}

/// The request id a peer sent in gRPC metadata, if any and usable.
pub fn request_id_from_metadata(metadata: &MetadataMap) -> Option<String> {
    metadata
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(sanitize_request_id)
}

/// The trace context in HTTP headers: the remote parent of this process's
/// span for the request. An empty context (a new trace) when there is none
/// or it is malformed.
pub fn extract_http(headers: &HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Writes `cx`'s span as `traceparent` (and `tracestate`) into HTTP headers;
/// nothing when `cx` holds no valid span.
pub fn inject_http(cx: &Context, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
}

/// The trace context in gRPC metadata (see [`extract_http`]).
pub fn extract_metadata(metadata: &MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(metadata))
}

/// Writes `cx`'s span and `request_id` into gRPC metadata.
pub fn inject_metadata(cx: &Context, request_id: Option<&str>, metadata: &mut MetadataMap) {
    TraceContextPropagator::new().inject_context(cx, &mut MetadataInjector(metadata));
    if let Some(value) = request_id.and_then(|id| MetadataValue::try_from(id).ok()) {
        metadata.insert(REQUEST_ID_HEADER, value);
    }
}

/// Writes the current request's trace context (the current `tracing`
/// span's) and request id into the metadata of an outgoing gRPC call.
pub fn inject_current(metadata: &mut MetadataMap) {
    let cx = crate::current_context();
    inject_metadata(&cx, crate::current_request_id().as_deref(), metadata);
}

/// Whether `value` is a `traceparent` as W3C Trace Context level 1 writes
/// it: `version-traceid-parentid-flags`, lowercase hex of exactly 2, 32, 16
/// and 2 digits, version `ff` forbidden, nothing after version `00`'s flags
/// (a later version may append `-` and more). The SDK's parser is looser (a
/// 31-digit trace id passes, padded), so headers are checked here first.
pub fn well_formed_traceparent(value: &str) -> bool {
    let b = value.trim().as_bytes();
    let hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    if b.len() < 55
        || !(hex(&b[0..2])
            && b[2] == b'-'
            && hex(&b[3..35])
            && b[35] == b'-'
            && hex(&b[36..52])
            && b[52] == b'-'
            && hex(&b[53..55]))
    {
        return false;
    }
    match &b[0..2] {
        b"ff" => false,
        b"00" => b.len() == 55,
        _ => b.len() == 55 || b[55] == b'-',
    }
}

/// A carrier's value for the propagator: malformed `traceparent`s are not seen.
fn checked<'a>(key: &str, value: Option<&'a str>) -> Option<&'a str> {
    let value = value?;
    if key.eq_ignore_ascii_case("traceparent") && !well_formed_traceparent(value) {
        return None;
    }
    Some(value)
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        // A header sent twice is ambiguous: take neither (a new trace).
        let mut values = self.0.get_all(key).iter();
        let first = values.next()?;
        if values.next().is_some() {
            return None;
        }
        checked(key, first.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        checked(key, self.0.get(key).and_then(|v| v.to_str().ok()))
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{TraceContextExt, TraceFlags};

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn parent_of(traceparent: &str) -> Option<(String, String, bool)> {
        let cx = extract_http(&headers(&[("traceparent", traceparent)]));
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| {
            (
                sc.trace_id().to_string(),
                sc.span_id().to_string(),
                sc.is_sampled(),
            )
        })
    }

    #[test]
    fn a_valid_traceparent_is_the_remote_parent_with_its_sampled_flag() {
        let sampled = parent_of(&format!("00-{TRACE}-{SPAN}-01")).unwrap();
        assert_eq!(sampled, (TRACE.to_string(), SPAN.to_string(), true));
        let unsampled = parent_of(&format!("00-{TRACE}-{SPAN}-00")).unwrap();
        assert!(!unsampled.2, "flags 00 is not sampled");
        let cx = extract_http(&headers(&[(
            "traceparent",
            &format!("00-{TRACE}-{SPAN}-01"),
        )]));
        assert!(cx.span().span_context().is_remote());
    }

    #[test]
    fn malformed_traceparents_start_a_new_trace() {
        for bad in [
            String::new(),
            "garbage".to_string(),
            // All-zero trace id and span id are invalid.
            format!("00-{}-{SPAN}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            // Version ff is forbidden.
            format!("ff-{TRACE}-{SPAN}-01"),
            // Upper-case hex, short ids, a missing part.
            format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
            format!("00-{}-{SPAN}-01", &TRACE[..31]),
            format!("00-{TRACE}-{SPAN}"),
            // Version 00 has exactly four parts.
            format!("00-{TRACE}-{SPAN}-01-extra"),
            // Ids of the wrong length (the SDK alone would pad a short one).
            format!("00-{TRACE}0-{SPAN}-01"),
            format!("00-{TRACE}-{}-01", &SPAN[..15]),
            format!("00-{TRACE}-{SPAN}-1"),
        ] {
            assert_eq!(parent_of(&bad), None, "{bad:?} must be ignored");
        }
    }

    #[test]
    fn later_versions_may_append_fields() {
        assert!(well_formed_traceparent(&format!(
            "01-{TRACE}-{SPAN}-01-what-comes-next"
        )));
        assert!(well_formed_traceparent(&format!(" 00-{TRACE}-{SPAN}-00 ")));
        assert!(!well_formed_traceparent(&format!("01-{TRACE}-{SPAN}-01x")));
        let metadata_parent = {
            let mut m = MetadataMap::new();
            m.insert(
                "traceparent",
                format!("00-{}-{SPAN}-01", &TRACE[..31]).parse().unwrap(),
            );
            extract_metadata(&m)
        };
        assert!(!metadata_parent.span().span_context().is_valid());
    }

    #[test]
    fn a_traceparent_sent_twice_is_ignored() {
        let tp = format!("00-{TRACE}-{SPAN}-01");
        let cx = extract_http(&headers(&[("traceparent", &tp), ("traceparent", &tp)]));
        assert!(!cx.span().span_context().is_valid());
    }

    #[test]
    fn trace_context_survives_http_and_grpc_round_trips_with_tracestate() {
        let incoming = headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("tracestate", "vendor=abc,other=1"),
        ]);
        let cx = extract_http(&incoming);
        let mut metadata = MetadataMap::new();
        inject_metadata(&cx, Some("req-1"), &mut metadata);
        assert_eq!(
            metadata.get("traceparent").unwrap().to_str().unwrap(),
            format!("00-{TRACE}-{SPAN}-01")
        );
        assert_eq!(
            metadata.get("tracestate").unwrap().to_str().unwrap(),
            "vendor=abc,other=1"
        );
        assert_eq!(
            request_id_from_metadata(&metadata).as_deref(),
            Some("req-1")
        );
        let back = extract_metadata(&metadata);
        let span = back.span();
        assert_eq!(span.span_context().trace_id().to_string(), TRACE);
        assert_eq!(span.span_context().trace_flags(), TraceFlags::SAMPLED);
        let mut out = HeaderMap::new();
        inject_http(&back, &mut out);
        assert_eq!(out["traceparent"], format!("00-{TRACE}-{SPAN}-01").as_str());
    }

    #[test]
    fn nothing_is_injected_without_a_span() {
        let mut metadata = MetadataMap::new();
        inject_metadata(&Context::new(), None, &mut metadata);
        assert!(metadata.is_empty());
        let mut h = HeaderMap::new();
        inject_http(&Context::new(), &mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn request_ids_are_kept_when_harmless_and_replaced_otherwise() {
        assert_eq!(sanitize_request_id(" abc-123 ").as_deref(), Some("abc-123"));
        let uuid = "123e4567-e89b-12d3-a456-426614174000";
        assert_eq!(sanitize_request_id(uuid).as_deref(), Some(uuid));
        assert_eq!(
            sanitize_request_id("a/b+c=d@e.f:g_h").as_deref(),
            Some("a/b+c=d@e.f:g_h")
        );
        for bad in [
            "",
            "   ",
            "has space",
            "quote\"d",
            "new\nline",
            "t\tab",
            "ünï",
            "{json}",
        ] {
            assert_eq!(sanitize_request_id(bad), None, "{bad:?}");
        }
        let long = "a".repeat(MAX_REQUEST_ID_LEN);
        assert_eq!(sanitize_request_id(&long), Some(long.clone()));
        assert_eq!(sanitize_request_id(&format!("{long}a")), None);

        let kept = request_id_from_headers(&headers(&[("x-request-id", "client-42")]));
        assert_eq!(kept, "client-42");
        let replaced = request_id_from_headers(&headers(&[("x-request-id", "bad id")]));
        assert_eq!(replaced.len(), 32);
        assert!(replaced.bytes().all(|b| b.is_ascii_hexdigit()));
        let generated = request_id_from_headers(&HeaderMap::new());
        assert_ne!(generated, request_id_from_headers(&HeaderMap::new()));
    }
}
