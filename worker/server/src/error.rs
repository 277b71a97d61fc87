//! The one error type of the HTTP layer and its one mapping to an OpenAI-style
//! response: `{"error": {"message", "type", "param", "code"}}` with a status.
//!
//! Every failure a handler can meet becomes an `ApiError` through a constructor
//! here, so the status, the `type` string and the metrics outcome of a kind of
//! failure are decided in one place.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use tandem_api::infer::InferError;

/// A request that cannot be answered normally.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, when one is (`messages[1].role`, `max_tokens`).
    pub param: Option<String>,
    /// A stable machine-readable code (`model_not_found`), when one applies.
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (sent as `Retry-After`).
    pub retry_after_secs: Option<u64>,
}

/// The body OpenAI clients parse.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: None,
            retry_after_secs: None,
        }
    }

    /// 400: the request is malformed or asks for something impossible.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 400 naming the field at fault.
    pub fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::bad_request(message).with_param(param)
    }

    /// 404 for a `model` this server does not serve.
    pub fn model_not_found(requested: &str, served: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            format!("The model `{requested}` does not exist; this server serves `{served}`."),
        )
        .with_param("model");
        e.code = Some("model_not_found");
        e
    }

    /// 404 for a path no route matches.
    pub fn unknown_route(method: &str, path: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            format!("Unknown endpoint: {method} {path}"),
        );
        e.code = Some("unknown_url");
        e
    }

    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("Method {method} is not allowed on {path}"),
        )
    }

    pub fn payload_too_large(limit_bytes: usize) -> Self {
        let mut e = Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request body is larger than the limit of {limit_bytes} bytes."),
        );
        e.code = Some("request_too_large");
        e
    }

    pub fn unsupported_media_type(got: Option<&str>) -> Self {
        let got = match got {
            Some(ct) => format!("got `{ct}`"),
            None => "the header is missing".to_string(),
        };
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type must be application/json; {got}."),
        )
    }

    /// 429: admission refused because the queue is full.
    pub fn overloaded(message: impl Into<String>, retry_after_secs: u64) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, message);
        e.code = Some("server_overloaded");
        e.retry_after_secs = Some(retry_after_secs);
        e
    }

    /// 503: not ready yet, or draining for shutdown.
    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, message);
        e.code = Some("service_unavailable");
        e
    }

    /// 500: the engine failed; never used for anything the client sent.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// Map an admission refusal of the `Infer` backend.
    pub fn from_infer(err: InferError, retry_after_secs: u64) -> Self {
        match err {
            InferError::Overloaded(m) => Self::overloaded(
                format!("The server is overloaded ({m}); retry later."),
                retry_after_secs,
            ),
            InferError::Invalid(m) => Self::bad_request(m),
            InferError::Unavailable(m) => Self::unavailable(format!("Service unavailable: {m}")),
        }
    }

    /// The OpenAI `type` string for this status (OpenAI itself answers an
    /// unknown model with `invalid_request_error` and code `model_not_found`).
    pub fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The `status` label of `tandem_frontend_requests_total` for this
    /// failure: the contract's set (docs/metrics.md), so a 503 while loading
    /// or draining counts as `server_error`.
    pub fn outcome(&self) -> &'static str {
        match self.status {
            StatusCode::TOO_MANY_REQUESTS => "overloaded",
            s if s.is_server_error() => "server_error",
            _ => "client_error",
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind(),
                param: self.param.clone(),
                code: self.code,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overloaded_carries_retry_after_and_429() {
        let e = ApiError::from_infer(InferError::Overloaded("queue full".into()), 3);
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        let r = e.into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
    }

    #[test]
    fn body_has_openai_shape() {
        let e = ApiError::invalid_param("top_p", "top_p must be in (0, 1]");
        let v = serde_json::to_value(e.body()).unwrap();
        assert_eq!(v["error"]["param"], "top_p");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["code"].is_null());
        assert_eq!(v["error"]["message"], "top_p must be in (0, 1]");
    }
}
