//! Test fixtures: a local HTTP receiver (on 127.0.0.1, spawned in the test) and a project
//! directory driven through the real `sluice` binary.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};

use arrow::array::{ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::Value;

/// How the receiver answers one request, given its parsed body.
pub type Responder = Box<dyn FnMut(&Value) -> Response + Send>;

#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Value,
}

#[derive(Clone)]
struct ReceiverState {
    received: Arc<Mutex<Vec<Received>>>,
    responder: Arc<Mutex<Responder>>,
}

/// A webhook receiver that records every request and answers as its responder says.
pub struct Receiver {
    pub url: String,
    state: ReceiverState,
    _server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start() -> Self {
        let state = ReceiverState {
            received: Arc::new(Mutex::new(Vec::new())),
            responder: Arc::new(Mutex::new(Box::new(|_: &Value| StatusCode::OK.into_response()))),
        };
        let app = Router::new()
            .route("/ingest", post(ingest))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        let url = format!("http://{}/ingest", listener.local_addr().expect("local addr"));
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("receiver");
        });
        Self {
            url,
            state,
            _server: server,
        }
    }

    pub fn respond_with(&self, responder: impl FnMut(&Value) -> Response + Send + 'static) {
        *self.state.responder.lock().expect("lock") = Box::new(responder);
    }

    /// Every request received so far, and forgets them.
    pub fn take(&self) -> Vec<Received> {
        std::mem::take(&mut *self.state.received.lock().expect("lock"))
    }

    /// Every record of the requests received so far, sorted by (op, key), and forgets them.
    pub fn take_records(&self) -> Vec<Value> {
        let mut records: Vec<Value> = self
            .take()
            .into_iter()
            .flat_map(|r| r.body["records"].as_array().cloned().unwrap_or_default())
            .collect();
        records.sort_by_key(|r| {
            (
                r["op"].as_str().unwrap_or_default().to_string(),
                r["key"].to_string(),
            )
        });
        records
    }
}

async fn ingest(State(state): State<ReceiverState>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "body is not JSON").into_response();
    };
    // The request shape sluice promises: {"records":[{op, message_id, key, data}]}.
    let well_formed = body["records"].as_array().is_some_and(|records| {
        records.iter().all(|r| {
            r["op"].is_string()
                && r["message_id"].is_string()
                && r["key"].is_object()
                && r["data"].is_object()
        })
    });
    if !well_formed || headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/json") {
        return (StatusCode::UNPROCESSABLE_ENTITY, "unexpected request shape").into_response();
    }
    let response = (state.responder.lock().expect("lock"))(&body);
    state
        .received
        .lock()
        .expect("lock")
        .push(Received { headers, body });
    response
}

/// A user row of the test model.
#[derive(Debug, Clone)]
pub struct User {
    pub id: i64,
    pub email: Option<&'static str>,
    pub plan: &'static str,
    pub lead_score: i32,
    pub ltv: f64,
}

pub fn user(id: i64, email: &'static str, plan: &'static str, lead_score: i32) -> User {
    User {
        id,
        email: Some(email),
        plan,
        lead_score,
        ltv: id as f64 * 10.5,
    }
}

/// A project directory with a `files` source over `data/users.parquet`.
pub struct TestProject {
    pub dir: tempfile::TempDir,
}

impl TestProject {
    pub fn new(config: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
        std::fs::write(dir.path().join("sluice.yaml"), config).expect("config");
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("sluice.yaml")
    }

    pub fn write_users(&self, users: &[User]) {
        let batch = RecordBatch::try_from_iter(vec![
            (
                "id",
                Arc::new(Int64Array::from_iter_values(users.iter().map(|u| u.id))) as ArrayRef,
            ),
            (
                "email",
                Arc::new(StringArray::from_iter(users.iter().map(|u| u.email))) as ArrayRef,
            ),
            (
                "plan",
                Arc::new(StringArray::from_iter_values(users.iter().map(|u| u.plan))) as ArrayRef,
            ),
            (
                "lead_score",
                Arc::new(Int32Array::from_iter_values(users.iter().map(|u| u.lead_score))) as ArrayRef,
            ),
            (
                "lifetime_value",
                Arc::new(Float64Array::from_iter_values(users.iter().map(|u| u.ltv))) as ArrayRef,
            ),
        ])
        .expect("batch");
        write_parquet(&self.path().join("data/users.parquet"), &batch);
    }

    /// Runs the real binary with `args` and the project's config.
    pub async fn sluice(&self, args: &[&str]) -> Output {
        self.sluice_with_env(args, &[]).await
    }

    /// Runs the real binary with `args`, the project's config and `env` set.
    pub async fn sluice_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
        command
            .args(args)
            .arg("--config")
            .arg(self.config_path())
            .env("RUST_LOG", "warn")
            .env_remove("GOOGLE_APPLICATION_CREDENTIALS");
        for (name, value) in env {
            command.env(name, value);
        }
        command.output().await.expect("run sluice")
    }
}

/// Every batch of a source's stream, as one batch sorted by its first column (to compare two
/// read paths whose batches arrive in different orders).
pub async fn sorted(mut stream: sluice_engine::source::SendableRecordBatchStream) -> RecordBatch {
    use futures::StreamExt;
    let mut batches = Vec::new();
    while let Some(batch) = stream.next().await {
        batches.push(batch.expect("batch"));
    }
    let batch = arrow::compute::concat_batches(&stream.schema(), &batches).expect("concat");
    let order = arrow::compute::sort_to_indices(batch.column(0), None, None).expect("sort");
    arrow::compute::take_record_batch(&batch, &order).expect("take")
}

pub fn write_parquet(path: &Path, batch: &RecordBatch) {
    let file = std::fs::File::create(path).expect("create parquet");
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).expect("writer");
    writer.write(batch).expect("write");
    writer.close().expect("close");
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The lines of a load-results table for `mapping`, as their cells, newest first.
pub fn table_rows(text: &str, mapping: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|l| l.contains(&format!(" {mapping} ")))
        .map(|l| {
            l.split(['│', '┆'])
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect()
}

/// The line of the load-results table for `mapping`, as its cells.
pub fn result_row(output: &Output, mapping: &str) -> Vec<String> {
    table_rows(&stdout(output), mapping)
        .into_iter()
        .next()
        .unwrap_or_default()
}

/// The id (tail) of `mapping`'s newest run, from the last column of `sluice runs`.
pub fn newest_run_id(runs: &Output, mapping: &str) -> String {
    result_row(runs, mapping).pop().expect("a run")
}

/// The config the end-to-end tests use: the README's example shape against `url`.
pub fn webhook_config(url: &str, extra_destination: &str) -> String {
    format!(
        r#"state_dir: .sluice
sources:
  warehouse:
    type: files
    tables:
      users: data/users.parquet
models:
  users:
    source: warehouse
    sql: SELECT id, email, plan, lead_score, lifetime_value FROM users
    primary_key: id
destinations:
  crm:
    type: webhook
    url: {url}
    batch_size: 2
    initial_backoff: 10ms
    max_backoff: 50ms
    max_attempts: 3
{extra_destination}
mappings:
  users_to_crm:
    model: users
    destination: crm
    send: [added, updated, deleted]
    fields: {{ email: email, "traits.plan": plan, "traits.score": lead_score }}
    constants: {{ "context.source": "sluice" }}
"#
    )
}
