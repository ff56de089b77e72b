//! The control API's one error type and its status mapping.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use nimbus_core::InvokeError;
use nimbus_core::api::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid admin token")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    InvalidManifest(String),
    #[error("{0}")]
    InvalidArchive(String),
    /// A `wasm` function's handler is not a component this host can serve.
    #[error("{0}")]
    InvalidComponent(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A body that is not declared as JSON where JSON is taken.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The listener's body deadline passed while the body was read.
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    /// This client address failed authentication too often (the listener counts).
    #[error("too many failed authentications from this address; retry later")]
    AuthThrottled { retry_after_s: u64 },
    /// A change whose `min_instances` floors would not fit the host's budget.
    #[error("{0}")]
    OverCapacity(String),
    #[error("{function} is throttled")]
    Throttled {
        function: String,
        retry_after_s: u64,
    },
    #[error("the platform is shutting down")]
    Unavailable,
    /// Disk or database trouble: shown as a generic message, logged in full.
    #[error("storage error")]
    Storage(String),
    /// The data dir is full: the write was refused, nothing of it kept. Logged once
    /// per change by the server's storage probe, not per request.
    #[error("{}", nimbus_core::storage::FULL_MESSAGE)]
    StorageFull,
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_)
            | ApiError::InvalidManifest(_)
            | ApiError::InvalidArchive(_)
            | ApiError::InvalidComponent(_)
            | ApiError::OverCapacity(_) => StatusCode::BAD_REQUEST,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Throttled { .. } | ApiError::AuthThrottled { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Storage(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::InvalidManifest(_) => "invalid_manifest",
            ApiError::InvalidArchive(_) => "invalid_archive",
            ApiError::InvalidComponent(_) => "invalid_component",
            ApiError::Conflict(_) => "conflict",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::AuthThrottled { .. } => "too_many_auth_failures",
            ApiError::OverCapacity(_) => "over_capacity",
            ApiError::Throttled { .. } => "throttled",
            ApiError::Unavailable => "unavailable",
            ApiError::Storage(_) => "storage_error",
            ApiError::StorageFull => "insufficient_storage",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn from_store(e: nimbus_store::Error) -> ApiError {
        use nimbus_store::Error as S;
        match e {
            S::NotFound(m) => ApiError::NotFound(m),
            S::Conflict(m) => ApiError::Conflict(m),
            S::RouteConflict(c) => ApiError::Conflict(c.to_string()),
            S::Invalid(m) => ApiError::BadRequest(m),
            S::StorageFull(_) => ApiError::StorageFull,
            S::Unavailable(m) => {
                tracing::error!(error = %m, "event log unavailable");
                ApiError::Unavailable
            }
            other => ApiError::Storage(other.to_string()),
        }
    }

    /// A body the shared reader refused.
    pub fn from_body(e: nimbus_core::body::BodyError) -> ApiError {
        use nimbus_core::body::BodyError as B;
        match e {
            B::TooLarge { .. } => ApiError::PayloadTooLarge(e.to_string()),
            B::TimedOut => ApiError::RequestTimeout,
            B::Read => ApiError::BadRequest(e.to_string()),
        }
    }

    pub fn from_artifacts(e: nimbus_artifacts::Error) -> ApiError {
        if e.is_storage_full() {
            ApiError::StorageFull
        } else if e.is_invalid_input() {
            ApiError::InvalidArchive(e.to_string())
        } else {
            ApiError::Storage(e.to_string())
        }
    }

    /// A failed disk write of the API itself (`what` says which, for the log).
    pub fn from_io(what: &str, e: std::io::Error) -> ApiError {
        if nimbus_core::storage::io_is_full(&e) {
            ApiError::StorageFull
        } else {
            ApiError::Storage(format!("{what}: {e}"))
        }
    }

    pub fn from_invoke(e: InvokeError) -> ApiError {
        match e {
            InvokeError::NotFound(m) => ApiError::NotFound(m),
            InvokeError::Throttled {
                function,
                retry_after_s,
            } => ApiError::Throttled {
                function,
                retry_after_s,
            },
            InvokeError::BadRequest(m) => ApiError::BadRequest(m),
            InvokeError::ShuttingDown => ApiError::Unavailable,
            InvokeError::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Storage(detail) | ApiError::Internal(detail) = &self {
            tracing::error!(error = %detail, "control API request failed");
        }
        let status = self.status();
        let mut resp =
            (status, Json(ErrorBody::new(self.code(), self.to_string()))).into_response();
        if let ApiError::Throttled { retry_after_s, .. } | ApiError::AuthThrottled { retry_after_s } =
            &self
            && let Ok(v) = retry_after_s.to_string().parse()
        {
            resp.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
        // The listener counts failed authentications per client address.
        match self {
            ApiError::Unauthorized => {
                resp.extensions_mut()
                    .insert(nimbus_core::body::AuthOutcome::Failed);
            }
            ApiError::AuthThrottled { .. } => {
                resp.extensions_mut()
                    .insert(nimbus_core::body::AuthOutcome::Throttled);
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_core::body::{AuthOutcome, BodyError};

    #[test]
    fn body_refusals_keep_their_status() {
        let status = |e| ApiError::from_body(e).status().as_u16();
        assert_eq!(status(BodyError::TooLarge { limit: 1 }), 413);
        assert_eq!(status(BodyError::TimedOut), 408);
        assert_eq!(status(BodyError::Read), 400);
    }

    #[test]
    fn auth_refusals_are_marked_for_the_listener() {
        let r = ApiError::Unauthorized.into_response();
        assert_eq!(r.extensions().get(), Some(&AuthOutcome::Failed));
        let r = ApiError::AuthThrottled { retry_after_s: 7 }.into_response();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "7");
        assert_eq!(r.extensions().get(), Some(&AuthOutcome::Throttled));
        let r = ApiError::NotFound("x".into()).into_response();
        assert_eq!(r.extensions().get::<AuthOutcome>(), None);
    }
}
