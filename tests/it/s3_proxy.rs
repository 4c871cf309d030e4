//! A proxy on 127.0.0.1 in front of the S3 server that injects the faults object storage shows
//! in production: throttling (503 SlowDown, with S3's XML error body), a request that never
//! answers, a connection dropped while an upload's body is being sent, and expired credentials
//! (400 ExpiredToken), and an answer that never comes back for work the server did. Everything else is forwarded unchanged. It records each request's
//! method, path and the access key id its SigV4 signature names.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

/// What the proxy does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Forward,
    /// 503 SlowDown, as S3 throttles a prefix.
    SlowDown,
    /// No answer, ever (the client's timeout must fire).
    Hang,
    /// Read the start of the request body, then close the connection without an answer.
    DropMidBody,
    /// 400 ExpiredToken, as S3 answers a session token past its expiry.
    ExpiredToken,
    /// Forward the request, then never pass the answer on: the server did the work, the client
    /// times out (a completion of a very large upload outlasting the client's timeout).
    ForwardThenHang,
    /// 404 NoSuchUpload, as S3 answers a retried completion of an upload already completed.
    NoSuchUpload,
}

#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub access_key_id: Option<String>,
    pub fault: Fault,
}

type Plan = Box<dyn FnMut(&Seen) -> Fault + Send>;

#[derive(Clone)]
struct ProxyState {
    upstream: String,
    plan: Arc<Mutex<Plan>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    client: reqwest::Client,
}

pub struct S3FaultProxy {
    pub endpoint: String,
    state: ProxyState,
}

impl S3FaultProxy {
    pub async fn start(upstream: &str) -> Self {
        let state = ProxyState {
            upstream: upstream.trim_end_matches('/').to_string(),
            plan: Arc::new(Mutex::new(Box::new(|_: &Seen| Fault::Forward))),
            seen: Arc::default(),
            client: reqwest::Client::new(),
        };
        let app = Router::new()
            .fallback(proxy)
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { endpoint, state }
    }

    /// Decides, request by request, what happens (`Seen::fault` is `Forward` when asked).
    pub fn plan(&self, plan: impl FnMut(&Seen) -> Fault + Send + 'static) {
        *self.state.plan.lock().expect("lock") = Box::new(plan);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("lock").clone()
    }

    pub fn count(&self, fault: Fault) -> usize {
        self.seen().iter().filter(|s| s.fault == fault).count()
    }
}

fn s3_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>4442587FB7D0A2F9</RequestId><HostId>sluice-test</HostId></Error>"
    );
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/xml"));
    response
}

async fn proxy(State(state): State<ProxyState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let access_key_id = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split("Credential=").nth(1))
        .and_then(|v| v.split('/').next())
        .map(str::to_string);
    let mut seen = Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or_default().to_string(),
        access_key_id,
        fault: Fault::Forward,
    };
    seen.fault = (state.plan.lock().expect("lock"))(&seen);
    state.seen.lock().expect("lock").push(seen.clone());
    match seen.fault {
        Fault::SlowDown => {
            return s3_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "SlowDown",
                "Please reduce your request rate.",
            );
        }
        Fault::ExpiredToken => {
            return s3_error(
                StatusCode::BAD_REQUEST,
                "ExpiredToken",
                "The provided token has expired.",
            );
        }
        Fault::NoSuchUpload => {
            return s3_error(
                StatusCode::NOT_FOUND,
                "NoSuchUpload",
                "The specified upload does not exist. The upload ID may be invalid, or the upload may have been aborted or completed.",
            );
        }
        Fault::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return StatusCode::OK.into_response();
        }
        Fault::DropMidBody => {
            let mut stream = body.into_data_stream();
            let _ = stream.next().await;
            // The connection's task ends without a response: the client sees it close.
            std::panic::resume_unwind(Box::new("simulated connection drop mid-upload"));
        }
        Fault::Forward | Fault::ForwardThenHang => {}
    }
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => bytes,
        Err(e) => {
            return (
                StatusCode::BAD_GATEWAY,
                format!("proxy: reading the request: {e}"),
            )
                .into_response();
        }
    };
    let target = format!(
        "{}{}",
        state.upstream,
        parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
    );
    let mut forward = state.client.request(parts.method.clone(), &target).body(body);
    for (name, value) in &parts.headers {
        if name != "host" && name != "content-length" {
            forward = forward.header(name, value);
        }
    }
    let answer = match forward.send().await {
        Ok(answer) => answer,
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("proxy: {e}")).into_response(),
    };
    let status = answer.status();
    let headers = answer.headers().clone();
    let bytes = answer.bytes().await.unwrap_or_default();
    if seen.fault == Fault::ForwardThenHang {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    for (name, value) in &headers {
        // Content-Length stays: a HEAD answer's is the object's size.
        if name != "transfer-encoding" && name != "connection" {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response
}
