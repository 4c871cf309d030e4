//! Fault tests: the real `sluice` binary killed at random points, a destination that fails
//! records at random, and one that misbehaves in every way a network can. All on loopback,
//! bounded in time. What they prove: every model record reaches the destination, nothing
//! acknowledged at a commit point is sent again, and no failure is dropped.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::common::{TestProject, newest_run_id, stderr, stdout, webhook_config, write_parquet};

/// One record as the receiver acknowledged it.
#[derive(Debug, Clone)]
pub struct Ack {
    pub message_id: String,
    pub id: i64,
    pub op: String,
    pub data: Value,
}

/// What the receiver does with a request.
type Behaviour = Box<dyn FnMut(&[Value]) -> Answer + Send>;

pub enum Answer {
    /// 200; the records at these indexes are refused, the rest acknowledged.
    Refuse(Vec<(usize, String)>),
    /// 200 with this raw body (malformed, say); every record acknowledged.
    AcceptWith(&'static str),
    /// This status and body; nothing acknowledged.
    Status(StatusCode, &'static str, Option<&'static str>),
    /// Never answer.
    Hang,
    /// Drop the connection without an answer.
    Reset,
}

#[derive(Clone)]
struct AckState {
    acks: Arc<Mutex<Vec<Ack>>>,
    behaviour: Arc<Mutex<Behaviour>>,
    delay: Duration,
}

/// A receiver of sluice's webhook envelope that records every acknowledged record.
pub struct AckReceiver {
    pub url: String,
    state: AckState,
}

impl AckReceiver {
    pub async fn start(delay: Duration) -> Self {
        let state = AckState {
            acks: Arc::new(Mutex::new(Vec::new())),
            behaviour: Arc::new(Mutex::new(Box::new(|_: &[Value]| Answer::Refuse(Vec::new())))),
            delay,
        };
        let app = Router::new()
            .route("/ingest", post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/ingest", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, state }
    }

    pub fn behave(&self, behaviour: impl FnMut(&[Value]) -> Answer + Send + 'static) {
        *self.state.behaviour.lock().expect("lock") = Box::new(behaviour);
    }

    pub fn acks(&self) -> Vec<Ack> {
        self.state.acks.lock().expect("lock").clone()
    }

    /// How many records have been acknowledged so far, callable from anywhere.
    pub fn acks_counter(&self) -> impl Fn() -> usize + Send + 'static {
        let acks = self.state.acks.clone();
        move || acks.lock().expect("lock").len()
    }
}

async fn receive(State(state): State<AckState>, body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    };
    let records = body["records"].as_array().cloned().unwrap_or_default();
    tokio::time::sleep(state.delay).await;
    let answer = (state.behaviour.lock().expect("lock"))(&records);
    let (refused, raw_body) = match answer {
        Answer::Refuse(refused) => (refused, None),
        Answer::AcceptWith(body) => (Vec::new(), Some(body)),
        Answer::Status(status, body, retry_after) => {
            let mut response = (status, body).into_response();
            if let Some(after) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", after.parse().expect("header"));
            }
            return response;
        }
        Answer::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return StatusCode::OK.into_response();
        }
        // The connection's task ends without a response: the client sees the connection close.
        Answer::Reset => std::panic::resume_unwind(Box::new("simulated connection reset")),
    };
    {
        let refused_at: HashSet<usize> = refused.iter().map(|(i, _)| *i).collect();
        let mut acks = state.acks.lock().expect("lock");
        for (i, r) in records.iter().enumerate() {
            if !refused_at.contains(&i) {
                acks.push(Ack {
                    message_id: r["message_id"].as_str().unwrap_or_default().to_string(),
                    id: r["key"]["id"].as_i64().unwrap_or(-1),
                    op: r["op"].as_str().unwrap_or_default().to_string(),
                    data: r["data"].clone(),
                });
            }
        }
        if let Some(body) = raw_body {
            return (StatusCode::OK, body).into_response();
        }
        let failed: Vec<Value> = refused
            .into_iter()
            .map(|(index, error)| json!({"index": index, "error": error}))
            .collect();
        (StatusCode::OK, axum::Json(json!({ "failed": failed }))).into_response()
    }
}

/// The model's rows: id -> plan (the other columns derive from id and plan).
pub type Model = std::collections::BTreeMap<i64, String>;

pub fn write_model(project: &TestProject, model: &Model) {
    let ids: Vec<i64> = model.keys().copied().collect();
    let batch = RecordBatch::try_from_iter(vec![
        ("id", Arc::new(Int64Array::from(ids.clone())) as ArrayRef),
        (
            "email",
            Arc::new(StringArray::from_iter_values(
                ids.iter().map(|id| format!("user{id}@example.com")),
            )) as ArrayRef,
        ),
        (
            "plan",
            Arc::new(StringArray::from_iter_values(model.values().cloned())) as ArrayRef,
        ),
        (
            "lead_score",
            Arc::new(Int32Array::from_iter_values(
                ids.iter().map(|id| (id % 100) as i32),
            )) as ArrayRef,
        ),
        (
            "lifetime_value",
            Arc::new(Float64Array::from_iter_values(ids.iter().map(|id| *id as f64))) as ArrayRef,
        ),
    ])
    .expect("batch");
    write_parquet(&project.path().join("data/users.parquet"), &batch);
}

/// What the destination holds after applying `acks` in order: id -> plan.
pub fn destination_state(acks: &[Ack]) -> Model {
    let mut state = Model::new();
    for ack in acks {
        if ack.op == "deleted" {
            state.remove(&ack.id);
        } else {
            state.insert(
                ack.id,
                ack.data["traits"]["plan"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
    }
    state
}

/// The destination holds exactly the model; the message lists the first differences.
pub fn assert_same_state(destination: &Model, model: &Model, context: &str) {
    let missing: Vec<i64> = model
        .keys()
        .filter(|id| !destination.contains_key(id))
        .copied()
        .collect();
    let extra: Vec<i64> = destination
        .keys()
        .filter(|id| !model.contains_key(id))
        .copied()
        .collect();
    let stale: Vec<(i64, &str, &str)> = model
        .iter()
        .filter_map(|(id, plan)| {
            destination
                .get(id)
                .filter(|held| *held != plan)
                .map(|held| (*id, held.as_str(), plan.as_str()))
        })
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && stale.is_empty(),
        "the destination differs from the model ({context}): {} missing {:?}, {} not deleted {:?}, {} stale (id, held, model) {:?}",
        missing.len(),
        &missing[..missing.len().min(10)],
        extra.len(),
        &extra[..extra.len().min(10)],
        stale.len(),
        &stale[..stale.len().min(10)]
    );
}

/// A message id names one version of one record: the same content always carries the same id,
/// and one id never carries two contents.
pub fn assert_message_ids_are_deterministic(acks: &[Ack]) {
    let mut by_id: HashMap<&str, (i64, &str, &Value)> = HashMap::new();
    for ack in acks {
        let seen = by_id
            .entry(ack.message_id.as_str())
            .or_insert((ack.id, ack.op.as_str(), &ack.data));
        assert_eq!(
            *seen,
            (ack.id, ack.op.as_str(), &ack.data),
            "message id {} names two different records",
            ack.message_id
        );
    }
}

pub fn project_config(url: &str, batch_size: usize, per_checkpoint: usize) -> String {
    format!(
        "{}limits:\n  records_per_checkpoint: {per_checkpoint}\n",
        webhook_config(url, "").replace("batch_size: 2", &format!("batch_size: {batch_size}"))
    )
}

/// Applies one round of changes: some plans change, some rows go, some arrive.
fn change(model: &mut Model, rng: &mut StdRng, round: usize, next_id: &mut i64) {
    let ids: Vec<i64> = model.keys().copied().collect();
    for id in &ids {
        if rng.random_bool(0.15) {
            model.insert(*id, format!("plan-{round}"));
        } else if rng.random_bool(0.02) {
            model.remove(id);
        }
    }
    for _ in 0..rng.random_range(0..60) {
        model.insert(*next_id, "new".to_string());
        *next_id += 1;
    }
}

/// SIGKILL `sluice run` at random points (extraction, diff, delivery, commit) while the model
/// keeps changing; then one run finishes. Every record reaches the destination, and what is
/// sent again is at most the batch in flight at each kill, with the same message ids.
#[tokio::test]
async fn killed_runs_lose_nothing_and_resend_at_most_the_batch_in_flight() {
    // (Runs that only send a round's changes take 300–600 ms, start-up included.)
    kill_rounds("", 20..450).await;
}

/// The kill rounds above on a project whose config ends with `extra_config` (a snapshot store
/// elsewhere, say), killing each run after a random delay in `kill_after_ms`. Returns the
/// project, for checks of what the kills left behind.
pub async fn kill_rounds(extra_config: &str, kill_after_ms: std::ops::Range<u64>) -> TestProject {
    const PER_CHECKPOINT: usize = 50;
    const KILLS: usize = 12;
    let seed: u64 = std::env::var("SLUICE_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("fault test seed: {seed} (set SLUICE_FAULT_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    // 10 records per request, 10 ms per request: a run delivers for about a second, so kills
    // land in every stage.
    let receiver = AckReceiver::start(Duration::from_millis(10)).await;
    let project = TestProject::new(&format!(
        "{}{extra_config}",
        project_config(&receiver.url, 10, PER_CHECKPOINT)
    ));
    let mut model: Model = (1..=1500).map(|id| (id, "free".to_string())).collect();
    let mut next_id = 1501;
    write_model(&project, &model);

    let mut kills = 0;
    for round in 0..KILLS {
        if round > 0 {
            change(&mut model, &mut rng, round, &mut next_id);
            write_model(&project, &model);
        }
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", "--config"])
            .arg(project.config_path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn sluice");
        let after = Duration::from_millis(rng.random_range(kill_after_ms.clone()));
        tokio::select! {
            _ = tokio::time::sleep(after) => {
                child.start_kill().expect("SIGKILL");
                kills += 1;
            }
            _ = child.wait() => {}
        }
        let _ = child.wait().await;
    }
    assert!(
        kills >= 3,
        "only {kills} of {KILLS} runs were killed before they finished (seed {seed})"
    );
    // Then a run that is left to finish.
    let last = project.sluice(&["run"]).await;
    assert!(last.status.success(), "{}{}", stdout(&last), stderr(&last));

    let acks = receiver.acks();
    assert_same_state(&destination_state(&acks), &model, &format!("seed {seed}"));
    assert_message_ids_are_deterministic(&acks);
    // Sends of a message already acknowledged: only the batch in flight at each kill.
    let mut seen = HashSet::new();
    let resent = acks.iter().filter(|a| !seen.insert(a.message_id.clone())).count();
    eprintln!(
        "{kills} kills; {} records acknowledged, {} distinct messages, {resent} sent again",
        acks.len(),
        seen.len()
    );
    assert!(
        resent <= kills * PER_CHECKPOINT,
        "{resent} records were sent again after {kills} kills; at most {} may be (seed {seed})",
        kills * PER_CHECKPOINT
    );
    // And nothing more is owed.
    let before = receiver.acks().len();
    let again = project.sluice(&["run"]).await;
    assert!(again.status.success());
    assert_eq!(
        receiver.acks().len(),
        before,
        "a run after convergence sends nothing"
    );
    let runs = stdout(&project.sluice(&["runs", "--limit", "100"]).await);
    assert!(
        kills == 0 || runs.contains("interrupted"),
        "killed runs are recorded as interrupted: {runs}"
    );
    project
}

/// A destination that refuses 30% of records at random for several runs, then recovers: every
/// failure is kept and retried until the destination holds exactly the model.
#[tokio::test]
async fn random_record_failures_are_retried_until_the_destination_matches() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let project = TestProject::new(&project_config(&receiver.url, 50, 8192));
    let mut rng = StdRng::seed_from_u64(7);
    let mut model: Model = (1..=800).map(|id| (id, "free".to_string())).collect();
    let mut next_id = 801;
    write_model(&project, &model);
    let failing = Arc::new(Mutex::new(StdRng::seed_from_u64(11)));
    {
        let failing = failing.clone();
        receiver.behave(move |records| {
            let mut rng = failing.lock().expect("lock");
            Answer::Refuse(
                (0..records.len())
                    .filter(|_| rng.random_bool(0.3))
                    .map(|i| (i, "INVALID_FIELD: rejected at random".to_string()))
                    .collect(),
            )
        });
    }
    for round in 0..4 {
        if round > 0 {
            change(&mut model, &mut rng, round, &mut next_id);
            write_model(&project, &model);
        }
        let run = project.sluice(&["run"]).await;
        assert_eq!(run.status.code(), Some(2), "partial: {}", stdout(&run));
        let runs = stdout(&project.sluice(&["runs", "--limit", "1"]).await);
        assert!(runs.contains("partial"), "{runs}");
    }
    // Failed records are listed with their attempts, and downloadable as CSV.
    let csv_path = project.path().join("errors.csv");
    let last_run = newest_run_id(&project.sluice(&["runs", "--limit", "1"]).await, "users_to_crm");
    let failures = project
        .sluice(&["failures", &last_run, "--csv", csv_path.to_str().expect("utf-8")])
        .await;
    assert!(failures.status.success(), "{}", stderr(&failures));
    let csv = std::fs::read_to_string(&csv_path).expect("csv");
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("key,operation,error,attempts,first_failed_at,last_failed_at,payload")
    );
    let rows: Vec<&str> = lines.collect();
    assert!(!rows.is_empty());
    assert!(rows.iter().all(|r| r.contains("INVALID_FIELD")), "{csv}");
    // Some records failed in several runs in a row: their attempts count up.
    assert!(
        rows.iter()
            .any(|r| r.contains(",2,") || r.contains(",3,") || r.contains(",4,")),
        "{csv}"
    );

    // The destination recovers.
    receiver.behave(|_| Answer::Refuse(Vec::new()));
    let run = project.sluice(&["run"]).await;
    assert!(run.status.success(), "{}", stdout(&run));
    assert_same_state(&destination_state(&receiver.acks()), &model, "after recovery");
    let show = stdout(&project.sluice(&["runs", "show", &last_run]).await);
    assert!(show.contains("recommended action"), "{show}");
    assert!(show.contains("retried from earlier runs"), "{show}");
}

/// 429 with Retry-After, a request that hangs past the timeout, a reset connection and a
/// malformed answer: runs complete or fail cleanly, and nothing is lost.
#[tokio::test]
async fn a_misbehaving_destination_loses_nothing() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let config = project_config(&receiver.url, 10, 8192)
        .replace("max_attempts: 3", "max_attempts: 2\n    timeout: 1s");
    let project = TestProject::new(&config);
    let model: Model = (1..=120).map(|id| (id, "free".to_string())).collect();
    write_model(&project, &model);
    let requests = Arc::new(Mutex::new(0usize));
    {
        let requests = requests.clone();
        receiver.behave(move |_| {
            let mut n = requests.lock().expect("lock");
            *n += 1;
            match *n {
                1 => Answer::Status(StatusCode::TOO_MANY_REQUESTS, "slow down", Some("1")),
                2 | 3 => Answer::Hang,
                4 | 5 => Answer::Reset,
                6 => Answer::AcceptWith("{not json"),
                7 => Answer::Status(StatusCode::BAD_GATEWAY, "<html>bad gateway</html>", None),
                8 => Answer::AcceptWith("[1, 2"),
                _ => Answer::Refuse(Vec::new()),
            }
        });
    }
    for _ in 0..3 {
        let run = project.sluice(&["run"]).await;
        assert!(
            matches!(run.status.code(), Some(0) | Some(2)),
            "the run ends cleanly: {}{}",
            stdout(&run),
            stderr(&run)
        );
    }
    // Acknowledged records (a 2xx whose body is not a failure report accepts its records, as
    // the webhook contract says) cover the model.
    let acks = receiver.acks();
    assert_message_ids_are_deterministic(&acks);
    assert_same_state(&destination_state(&acks), &model, "after the misbehaviour");
    assert!(*requests.lock().expect("lock") > 8, "every misbehaviour was met");
}

/// Sends SIGTERM to a child process.
pub fn terminate(child: &tokio::process::Child) {
    let pid = child.id().expect("a running child");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// SIGTERM during delivery: the run finishes the batch in flight, checkpoints it, ends
/// `interrupted` within moments, and the next run sends exactly what was left, nothing twice.
#[tokio::test]
async fn sigterm_stops_a_run_at_a_commit_point_and_the_next_run_goes_on() {
    let receiver = AckReceiver::start(Duration::from_millis(20)).await;
    let project = TestProject::new(&project_config(&receiver.url, 10, 50));
    let model: Model = (1..=1000).map(|id| (id, "free".to_string())).collect();
    write_model(&project, &model);
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--config"])
        .arg(project.config_path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    // Wait until delivery is under way.
    for _ in 0..200 {
        if receiver.acks().len() >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(receiver.acks().len() >= 100, "delivery started");
    terminate(&child);
    let stopped_at = std::time::Instant::now();
    let output = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("the run stops within the batch in flight")
        .expect("wait");
    assert!(stopped_at.elapsed() < Duration::from_secs(5));
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    let text = stdout(&output);
    assert!(text.contains("interrupted"), "{text}");
    assert!(text.contains("interrupted by a shutdown request"), "{text}");
    let delivered_before = receiver.acks().len();
    assert!(delivered_before < model.len(), "the run stopped before the end");

    let next = project.sluice(&["run"]).await;
    assert!(next.status.success(), "{}{}", stdout(&next), stderr(&next));
    let acks = receiver.acks();
    assert_same_state(&destination_state(&acks), &model, "after the interrupted run");
    let distinct: HashSet<&str> = acks.iter().map(|a| a.message_id.as_str()).collect();
    assert_eq!(
        distinct.len(),
        acks.len(),
        "a graceful stop checkpoints the batch in flight: nothing is sent twice"
    );
    let runs = stdout(&project.sluice(&["runs"]).await);
    assert!(
        runs.contains("records it delivered up to its last checkpoint were kept"),
        "{runs}"
    );
}

/// The acknowledged records of the `file` destination's visible files, oldest file first (a
/// killed writer's staging files are not visible and not read).
fn visible_file_acks(dir: &std::path::Path) -> Vec<Ack> {
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "jsonl"));
    files.sort();
    files
        .iter()
        .flat_map(|file| {
            std::fs::read_to_string(file)
                .expect("read export")
                .lines()
                .map(|line| {
                    let r: Value = serde_json::from_str(line).expect("JSONL");
                    Ack {
                        message_id: r["message_id"].as_str().unwrap_or_default().to_string(),
                        id: r["key"]["id"].as_i64().unwrap_or(-1),
                        op: r["op"].as_str().unwrap_or_default().to_string(),
                        data: r["data"].clone(),
                    }
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A `file` destination's file becomes visible only when the run's delivery completes, so what
/// a run killed part way wrote was never delivered: the next run must write every record again,
/// and the visible files must hold the whole model.
#[tokio::test]
async fn killed_runs_to_a_file_destination_lose_nothing() {
    let project = TestProject::new(
        r#"state_dir: .sluice
sources:
  warehouse: { type: files, tables: { users: data/users.parquet } }
models:
  users:
    source: warehouse
    sql: SELECT id, email, plan, lead_score, lifetime_value FROM users
    primary_key: id
destinations:
  exports: { type: file, url: exports/, format: jsonl }
mappings:
  users_to_file:
    model: users
    destination: exports
    send: [added, updated, deleted]
    fields: { email: email, "traits.plan": plan }
limits:
  records_per_checkpoint: 500
"#,
    );
    // About 40 MB of JSONL: the file goes up in several 10 MiB parts.
    let mut model: Model = (1..=400_000).map(|id| (id, "free".to_string())).collect();
    write_model(&project, &model);
    let exports = project.path().join("exports/users_to_file");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--config"])
        .arg(project.config_path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn sluice");
    // Kill it once the first part is written (a staging file appears), mid-file.
    let started = std::time::Instant::now();
    while std::fs::read_dir(&exports).map_or(true, |mut d| d.next().is_none()) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the file was never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.start_kill().expect("SIGKILL");
    let _ = child.wait().await;
    assert!(
        visible_file_acks(&exports).is_empty(),
        "the run finished its file before it could be killed; nothing was tested"
    );

    // The model changes a little, and the next run is left to finish.
    for id in (1..=400_000).step_by(1000) {
        model.insert(id, "pro".to_string());
    }
    write_model(&project, &model);
    let next = project.sluice(&["run"]).await;
    assert!(next.status.success(), "{}{}", stdout(&next), stderr(&next));
    assert_same_state(
        &destination_state(&visible_file_acks(&exports)),
        &model,
        "the visible files after a killed run",
    );
}
