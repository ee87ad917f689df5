//! The one place SCIM failures become HTTP responses.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::scim::ScimError;
use crate::store::{INTERNAL_ERROR_MESSAGE, OUTAGE_RETRY_AFTER_SECS, StoreError};

pub const SCIM_CONTENT_TYPE: &str = "application/scim+json";

/// A SCIM error on its way out, rendered with the SCIM error schema.
#[derive(Debug)]
pub struct ScimFailure(pub ScimError);

impl From<ScimError> for ScimFailure {
    fn from(e: ScimError) -> Self {
        ScimFailure(e)
    }
}

impl From<StoreError> for ScimFailure {
    fn from(e: StoreError) -> Self {
        ScimFailure(store_to_scim(e))
    }
}

/// Map a store failure to the SCIM error a client should see. Internal failures are logged
/// with their cause and answered without internals.
pub fn store_to_scim(e: StoreError) -> ScimError {
    match e {
        StoreError::NotFound { kind, id } => {
            ScimError::not_found(format!("{kind:?} {id:?} not found"))
        }
        StoreError::Uniqueness(msg) => ScimError::uniqueness(msg),
        StoreError::PreconditionFailed { current } => ScimError::precondition_failed(format!(
            "If-Match does not match the current version {current}"
        )),
        StoreError::Rejected(e) => e,
        other => match other.outage_message() {
            Some(message) => {
                crate::server::log_outage(&other, "SCIM");
                ScimError::new(503, None, message)
            }
            None => {
                tracing::error!(error = %other, "Store failure while serving a SCIM request.");
                ScimError::new(500, None, INTERNAL_ERROR_MESSAGE)
            }
        },
    }
}

/// The detail of a SCIM 401 for a token that was sent and is not valid.
pub const INVALID_TOKEN: &str = "the Bearer token is not valid";

impl IntoResponse for ScimFailure {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = self.0.to_json().to_string();
        let token_refused = self.0.detail == INVALID_TOKEN;
        let mut resp = (status, body).into_response();
        resp.extensions_mut().insert(crate::server::Refusal {
            code: self.0.scim_type.map(|t| t.as_str()),
            detail: self.0.detail,
        });
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(SCIM_CONTENT_TYPE),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(OUTAGE_RETRY_AFTER_SECS),
            );
        }
        if status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            // SCIM answers 415 only to a body sent compressed (`body_encodings`):
            // RFC 9110 §15.5.16 names what it may be sent in instead.
            h.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        if status == StatusCode::UNAUTHORIZED {
            // RFC 6750 §3.1: a token refused says so; a request without one gets no error
            // code, only the challenge.
            let challenge = if token_refused {
                "Bearer realm=\"rosterd\", error=\"invalid_token\""
            } else {
                "Bearer realm=\"rosterd\""
            };
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scim::ResourceKind;

    #[test]
    fn store_errors_map_to_scim_statuses() {
        let cases = [
            (
                StoreError::NotFound {
                    kind: ResourceKind::User,
                    id: "x".into(),
                },
                404,
            ),
            (StoreError::Uniqueness("dup".into()), 409),
            (
                StoreError::PreconditionFailed {
                    current: "W/\"1\"".into(),
                },
                412,
            ),
            (StoreError::Backend("disk".into()), 500),
            (StoreError::NotDurable("No space left".into()), 503),
            (StoreError::Io("No space left".into()), 503),
            (
                StoreError::Failed(crate::store::StoreFailure {
                    error: "No space left".into(),
                    at: chrono::Utc::now(),
                }),
                503,
            ),
        ];
        for (e, status) in cases {
            let scim = store_to_scim(e);
            assert_eq!(scim.status, status);
            // A read fails with these too, and a flushed-late write may still be there.
            assert!(!scim.detail.contains("was not applied"), "{}", scim.detail);
        }
    }

    #[test]
    fn a_failed_store_asks_for_a_retry_later() {
        let r = ScimFailure(store_to_scim(StoreError::NotDurable("x".into()))).into_response();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[header::RETRY_AFTER], OUTAGE_RETRY_AFTER_SECS);
        assert_eq!(r.headers()[header::CONTENT_TYPE], SCIM_CONTENT_TYPE);
    }

    #[test]
    fn unauthorized_carries_www_authenticate() {
        let r = ScimFailure(ScimError::new(401, None, "no")).into_response();
        assert_eq!(r.status(), 401);
        assert!(r.headers().contains_key(header::WWW_AUTHENTICATE));
        assert_eq!(r.headers()[header::CONTENT_TYPE], SCIM_CONTENT_TYPE);
    }
}
