//! Browser sessions, for the web console. A login form takes an API token and opens a session
//! in the metadata store; the browser keeps only the session's random id, in an `HttpOnly`,
//! `SameSite=Strict` cookie, so scripts cannot read it and other sites cannot send it. Signing
//! out ends the session on the server, so a cookie copied before is refused after. Every state-changing request that authenticates with that cookie must also carry the
//! session's CSRF token: a second cookie, readable by the console's own pages, echoed in the
//! `X-CSRF-Token` header or the form's `csrf` field (the double-submit pattern). A request
//! authenticated with `Authorization: Bearer` needs none, since no browser adds that header by
//! itself.

use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use crate::AppState;

/// The cookie holding the session's API token (`HttpOnly`).
pub const SESSION_COOKIE: &str = "sluice_session";
/// The cookie holding the session's CSRF token (readable by the console's scripts).
pub const CSRF_COOKIE: &str = "sluice_csrf";
/// The header a cookie-authenticated change carries the CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a browser keeps a session (the store ends it then too).
const SESSION_SECONDS: u64 = sluice_engine::tokens::SESSION_LIFETIME
    .num_seconds()
    .unsigned_abs();

/// The value of cookie `name` in a request, if it sent one.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim_matches('"').to_string())
        .filter(|value| !value.is_empty())
}

/// Whether a method changes nothing (and so needs no CSRF token).
pub fn is_safe(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD || method == Method::OPTIONS
}

/// Whether `provided` is the CSRF token of the request's session (compared in constant time).
pub fn csrf_matches(headers: &HeaderMap, provided: Option<&str>) -> bool {
    match (cookie(headers, CSRF_COOKIE), provided) {
        (Some(expected), Some(provided)) if !provided.is_empty() => {
            same_secret(expected.as_bytes(), provided.as_bytes())
        }
        _ => false,
    }
}

/// Whether two secrets are equal, in time that depends on their length only (never on where
/// they first differ, which would let a guesser find one byte at a time).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh CSRF token: 32 random bytes, hex.
fn new_csrf_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    sluice_engine::secrets::hex(&bytes)
}

/// A `Set-Cookie` value (`max_age` 0 removes the cookie).
fn set_cookie(name: &str, value: &str, http_only: bool, max_age: u64) -> HeaderValue {
    let mut cookie = format!("{name}={value}; Path=/; SameSite=Strict; Max-Age={max_age}");
    if http_only {
        cookie.push_str("; HttpOnly");
    }
    // Tokens and CSRF tokens are printable ASCII; anything else is refused before this point.
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static("invalid=; Max-Age=0"))
}

#[derive(Debug, Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    csrf: String,
}

#[derive(Debug, Deserialize)]
pub struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

/// `GET /login`: the login form. A browser without a CSRF cookie gets one, so the form's post
/// can be checked too (a login CSRF would sign a victim into an attacker's session).
pub async fn login_page(headers: HeaderMap) -> Response {
    let (csrf, fresh) = match cookie(&headers, CSRF_COOKIE) {
        Some(csrf) if csrf.len() == 64 && csrf.bytes().all(|b| b.is_ascii_hexdigit()) => (csrf, false),
        _ => (new_csrf_token(), true),
    };
    let mut response = login_html(&csrf, None, StatusCode::OK);
    if fresh {
        response.headers_mut().append(
            header::SET_COOKIE,
            set_cookie(CSRF_COOKIE, &csrf, false, SESSION_SECONDS),
        );
    }
    response
}

/// `POST /login`: checks the form's CSRF token and the API token, then starts a session.
pub async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let csrf = cookie(&headers, CSRF_COOKIE).unwrap_or_default();
    if !csrf_matches(&headers, Some(&form.csrf)) {
        let fresh = new_csrf_token();
        let mut response = login_html(
            &fresh,
            Some("This form expired or did not come from this sluice; sign in again."),
            StatusCode::FORBIDDEN,
        );
        response.headers_mut().append(
            header::SET_COOKIE,
            set_cookie(CSRF_COOKIE, &fresh, false, SESSION_SECONDS),
        );
        return response;
    }
    let token = form.token.trim();
    let printable = !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b';' && b != b'"');
    let caller = if printable {
        state.auth.caller(&state, token).await
    } else {
        None
    };
    let Some(caller) = caller else {
        return login_html(
            &csrf,
            Some(
                "That API token is not known (revoked, or mistyped). `sluice token create NAME --scope admin` makes one.",
            ),
            StatusCode::UNAUTHORIZED,
        );
    };
    // The browser keeps a session id, never the API token: signing out ends the session on the
    // server, so a copied cookie is worthless afterwards.
    let metadata = state.service.engine().metadata().clone();
    let session_id = match metadata.create_session(&sluice_engine::tokens::hash(token)).await {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open a console session");
            return login_html(
                &csrf,
                Some("The metadata store could not open a session; try again, and see the server's log."),
                StatusCode::SERVICE_UNAVAILABLE,
            );
        }
    };
    tracing::info!(token = caller.token_name, scope = %caller.scope, "console sign-in");
    let mut response = Redirect::to("/").into_response();
    *response.status_mut() = StatusCode::SEE_OTHER;
    let headers = response.headers_mut();
    headers.append(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, &session_id, true, SESSION_SECONDS),
    );
    // A new session gets a new CSRF token.
    headers.append(
        header::SET_COOKIE,
        set_cookie(CSRF_COOKIE, &new_csrf_token(), false, SESSION_SECONDS),
    );
    response
}

/// `POST /logout`: ends the session on the server and in the browser (the form carries the
/// CSRF token).
pub async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<LogoutForm>,
) -> Response {
    if !csrf_matches(&headers, Some(&form.csrf)) {
        return (
            StatusCode::FORBIDDEN,
            Html("<!doctype html><title>sluice</title><p>This sign-out form did not come from this sluice.</p>"),
        )
            .into_response();
    }
    if let Some(session_id) = cookie(&headers, SESSION_COOKIE) {
        let metadata = state.service.engine().metadata().clone();
        if let Err(e) = metadata.end_session(&session_id).await {
            tracing::warn!(error = %e, "cannot end a console session");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Html("<!doctype html><title>sluice</title><p>The session could not be ended (the metadata store did not answer); try again.</p>"),
            )
                .into_response();
        }
    }
    let mut response = Redirect::to("/login").into_response();
    *response.status_mut() = StatusCode::SEE_OTHER;
    let headers = response.headers_mut();
    headers.append(header::SET_COOKIE, set_cookie(SESSION_COOKIE, "", true, 0));
    headers.append(header::SET_COOKIE, set_cookie(CSRF_COOKIE, "", false, 0));
    response
}

fn login_html(csrf: &str, error: Option<&str>, status: StatusCode) -> Response {
    let error = error
        .map(|e| format!(r#"<p class="error" role="alert">{}</p>"#, escape(e)))
        .unwrap_or_default();
    let body = format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in · sluice</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; margin: 0; min-height: 100vh; display: grid; place-items: center; background: #f5f6f8; color: #1d2433; }}
main {{ background: #fff; padding: 2rem; border-radius: 8px; box-shadow: 0 1px 4px rgba(0,0,0,.12); width: min(24rem, calc(100vw - 2rem)); box-sizing: border-box; }}
h1 {{ margin: 0 0 1rem; font-size: 1.4rem; }}
label {{ display: block; font-weight: 600; margin-bottom: .25rem; }}
input {{ width: 100%; box-sizing: border-box; padding: .5rem; font: inherit; border: 1px solid #9aa3b2; border-radius: 4px; }}
input:focus, button:focus {{ outline: 3px solid #7aa7ff; outline-offset: 1px; }}
button {{ margin-top: 1rem; padding: .5rem 1rem; font: inherit; border: 0; border-radius: 4px; background: #2451c9; color: #fff; cursor: pointer; }}
.hint {{ color: #5b6475; font-size: .9rem; }}
.error {{ color: #a11b1b; background: #fdecec; padding: .5rem; border-radius: 4px; }}
</style>
</head>
<body>
<main>
<h1>sluice</h1>
{error}
<form method="post" action="/login">
<input type="hidden" name="csrf" value="{csrf}">
<label for="token">API token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<p class="hint">An API token from <code>sluice token create NAME --scope admin</code> (or <code>--scope read</code> to look without changing anything).</p>
<button type="submit">Sign in</button>
</form>
</main>
</body>
</html>
"#,
        csrf = escape(csrf),
    );
    let mut response = (status, Html(body)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Escapes text for HTML.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(cookie: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_str(cookie).expect("cookie"));
        headers
    }

    #[test]
    fn secrets_compare_in_the_same_time_wherever_they_differ() {
        use std::hint::black_box;
        use std::time::{Duration, Instant};
        // Long enough that an early exit (as `==` takes) would be thousands of times faster.
        let expected = vec![b'a'; 256 * 1024];
        let mut first = expected.clone();
        first[0] = b'b';
        let mut last = expected.clone();
        *last.last_mut().expect("byte") = b'b';
        let fastest = |provided: &[u8]| {
            (0..40)
                .map(|_| {
                    let started = Instant::now();
                    black_box(same_secret(black_box(&expected), black_box(provided)));
                    started.elapsed()
                })
                .min()
                .unwrap_or(Duration::ZERO)
        };
        assert!(same_secret(&expected, &expected.clone()));
        assert!(!same_secret(&expected, &first) && !same_secret(&expected, &last));
        let (early, late) = (fastest(&first), fastest(&last));
        let ratio = late.as_secs_f64() / early.as_secs_f64().max(1e-9);
        assert!(
            (0.33..3.0).contains(&ratio),
            "differing in the first byte took {early:?}, in the last {late:?}"
        );
    }

    #[test]
    fn cookies_are_found_among_others() {
        let h = headers("a=1; sluice_session=tok; sluice_csrf=abc");
        assert_eq!(cookie(&h, SESSION_COOKIE).as_deref(), Some("tok"));
        assert_eq!(cookie(&h, CSRF_COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "missing"), None);
        assert_eq!(cookie(&headers("sluice_session="), SESSION_COOKIE), None);
    }

    #[test]
    fn csrf_tokens_must_match_the_cookie_exactly() {
        let h = headers("sluice_csrf=abc123");
        assert!(csrf_matches(&h, Some("abc123")));
        assert!(!csrf_matches(&h, Some("abc124")));
        assert!(!csrf_matches(&h, Some("abc12")));
        assert!(!csrf_matches(&h, Some("")));
        assert!(!csrf_matches(&h, None));
        assert!(!csrf_matches(&HeaderMap::new(), Some("abc123")));
    }

    #[test]
    fn fresh_csrf_tokens_differ_and_are_hex() {
        let (a, b) = (new_csrf_token(), new_csrf_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            escape(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
