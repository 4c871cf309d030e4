//! The web console, served at `/`: a page and its scripts, built into the binary. Its screens
//! call the HTTP API (`/api/v1`) with the browser's session ([`crate::session`]); nothing here
//! decides anything about sources, models, destinations, mappings or runs.
//!
//! The front end is plain ES modules (Preact with htm's tagged templates, uPlot for charts)
//! vendored from npm under `api/console/vendor/`, so building sluice needs no Node and no
//! bundler.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};

use crate::AppState;
use crate::session::{SESSION_COOKIE, cookie};

/// A built-in file: its path under `/assets/`, content type and bytes.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "app.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../console/app.js"),
    },
    Asset {
        path: "style.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../console/style.css"),
    },
    Asset {
        path: "vendor/preact-htm.mjs",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../console/vendor/preact-htm.mjs"),
    },
    Asset {
        path: "vendor/uPlot.iife.min.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../console/vendor/uPlot.iife.min.js"),
    },
    Asset {
        path: "vendor/uPlot.min.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../console/vendor/uPlot.min.css"),
    },
];

const INDEX: &[u8] = include_bytes!("../console/index.html");

/// Content Security Policy of the console: its own scripts, styles and API only.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'";

/// Whether the request carries a session the API would accept.
async fn signed_in(state: &AppState, headers: &HeaderMap) -> bool {
    match cookie(headers, SESSION_COOKIE) {
        Some(session_id) => state.auth.session_caller(state, &session_id).await.is_some(),
        None => false,
    }
}

fn secure_headers(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
}

/// `GET /`: the console, or the sign-in form when there is no session.
pub async fn index(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if !signed_in(&state, &headers).await {
        let mut response = Redirect::to("/login").into_response();
        *response.status_mut() = StatusCode::SEE_OTHER;
        return response;
    }
    let mut response = (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        INDEX,
    )
        .into_response();
    secure_headers(&mut response);
    response
}

/// `GET /assets/{path}`: the console's scripts and styles (for a signed-in browser).
pub async fn asset(State(state): State<AppState>, headers: HeaderMap, Path(path): Path<String>) -> Response {
    if !signed_in(&state, &headers).await {
        return (StatusCode::UNAUTHORIZED, "sign in at /login").into_response();
    }
    let Some(asset) = ASSETS.iter().find(|a| a.path == path) else {
        return (StatusCode::NOT_FOUND, "no such console file").into_response();
    };
    // Revalidated on every load (the binary may have been upgraded); cheap, they are small.
    let etag = format!("\"{}\"", env!("CARGO_PKG_VERSION"));
    let etag = format!("{}-{:x}\"", etag.trim_end_matches('"'), fingerprint(asset.bytes));
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == etag)
    {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    let mut response = (
        [
            (header::CONTENT_TYPE, asset.content_type.to_string()),
            (header::CACHE_CONTROL, "no-cache".to_string()),
            (header::ETAG, etag),
        ],
        asset.bytes,
    )
        .into_response();
    secure_headers(&mut response);
    response
}

/// A cheap content fingerprint for ETags (FNV-1a).
fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, b| {
        (hash ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_the_page_names_is_built_in() {
        let index = std::str::from_utf8(INDEX).expect("utf-8");
        for reference in index.split('"').filter(|s| s.starts_with("/assets/")) {
            let path = reference.trim_start_matches("/assets/");
            assert!(ASSETS.iter().any(|a| a.path == path), "{path} is not built in");
        }
        let app = std::str::from_utf8(ASSETS[0].bytes).expect("utf-8");
        for reference in app.split('"').filter(|s| s.starts_with("/assets/")) {
            let path = reference.trim_start_matches("/assets/");
            assert!(ASSETS.iter().any(|a| a.path == path), "{path} is not built in");
        }
    }

    #[test]
    fn fingerprints_tell_contents_apart() {
        assert_ne!(fingerprint(b"a"), fingerprint(b"b"));
        assert_eq!(fingerprint(b"abc"), fingerprint(b"abc"));
    }
}
