//! Two `sluice serve` processes sharing one state, as replicas on two machines run: a Postgres
//! metadata store, snapshots on S3 (moto), both with the same schedules, a PostgreSQL source
//! that keeps changing. A bounded soak of 200+ runs, and one replica killed (SIGKILL) while it
//! delivers. The second replica runs in a UTS namespace of its own (`unshare -u`) with its own
//! host name, so it cannot see that the first one's process is gone and must wait for its
//! leases to lapse, as a replica on another machine would.
//!
//! What it proves: each scheduled fire starts one run between the two; no mapping ever runs in
//! both at once (the run records never overlap, and the destination never has two runs of one
//! mapping sending at once); the survivor takes over every mapping within the lease time; and
//! every record reaches the destination.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::buckets::{Bucket, Provider, yaml_map};
use crate::faults::{Ack, Model, assert_same_state, destination_state, terminate};
use crate::services::{PG_URL, fresh_database, postgres};

/// A lease lapses this long after its holder's last renewal (the shortest `lease_ttl`).
const LEASE_TTL: Duration = Duration::from_secs(10);
/// Runs that must have delivered what they found (succeeded) before the soak ends.
const SOAK_RUNS: usize = 200;
const MAPPINGS: [(&str, &str); 4] = [
    ("users_a", "users"),
    ("users_b", "users"),
    ("users_c", "users"),
    ("pros", "pros"),
];

/// What the destination saw, per mapping (the `X-Sluice-Mapping` header).
#[derive(Default)]
struct Seen {
    acks: HashMap<String, Vec<Ack>>,
    /// Runs with a request in flight, per mapping.
    in_flight: HashMap<String, HashSet<String>>,
    /// Two runs of one mapping sending at once.
    overlaps: Vec<String>,
    requests: usize,
}

type Shared = Arc<Mutex<Seen>>;

/// A request of `run` in flight at the destination, until dropped.
struct InFlight {
    seen: Shared,
    mapping: String,
    run: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut seen) = self.seen.lock()
            && let Some(runs) = seen.in_flight.get_mut(&self.mapping)
        {
            runs.remove(&self.run);
        }
    }
}

async fn receive(State(seen): State<Shared>, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (mapping, run) = (header("x-sluice-mapping"), header("x-sluice-run-id"));
    {
        let mut seen = seen.lock().expect("lock");
        seen.requests += 1;
        let in_flight = seen.in_flight.entry(mapping.clone()).or_default();
        in_flight.insert(run.clone());
        if in_flight.len() > 1 {
            let runs = format!("{mapping}: runs {in_flight:?} sending at once");
            seen.overlaps.push(runs);
        }
    }
    // The request leaves the in-flight set however this handler ends: axum drops it unfinished
    // when the client's connection closes (a replica killed mid-request), and a run left there
    // would look as if it were still sending beside every later one.
    let in_flight = InFlight {
        seen: seen.clone(),
        mapping: mapping.clone(),
        run,
    };
    // Long enough for two runs' requests to meet, were they ever to run at once.
    tokio::time::sleep(Duration::from_millis(15)).await;
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    };
    drop(in_flight);
    let mut seen = seen.lock().expect("lock");
    let acks = seen.acks.entry(mapping).or_default();
    for r in body["records"].as_array().into_iter().flatten() {
        acks.push(Ack {
            message_id: r["message_id"].as_str().unwrap_or_default().to_string(),
            id: r["key"]["id"].as_i64().unwrap_or(-1),
            op: r["op"].as_str().unwrap_or_default().to_string(),
            data: r["data"].clone(),
        });
    }
    (StatusCode::OK, axum::Json(serde_json::json!({"failed": []}))).into_response()
}

fn replica_config(metadata_url: &str, bucket: &Bucket, receiver: &str) -> String {
    let mut config = format!(
        r#"state_dir: .sluice
metadata_store: {metadata_url}
lease_ttl: {}s
snapshot_store: {}
snapshot_store_options: {}
sources:
  pg: {{ type: postgres, url: "{PG_URL}", sslmode: disable }}
models:
  users:
    source: pg
    sql: SELECT id, email, plan FROM replicas_soak.users
    primary_key: id
    retain: {{ runs: 3 }}
  pros:
    source: pg
    sql: SELECT id, email, plan FROM replicas_soak.users WHERE id % 3 = 0
    primary_key: id
    retain: {{ runs: 3 }}
destinations:
  hook:
    type: webhook
    url: {receiver}
    batch_size: 25
    concurrency: 2
    initial_backoff: 10ms
    max_backoff: 50ms
mappings:
"#,
        LEASE_TTL.as_secs(),
        bucket.url("state"),
        yaml_map(&bucket.options()),
    );
    for (i, (mapping, model)) in MAPPINGS.iter().enumerate() {
        // Every second, or every two seconds.
        let cron = if i % 2 == 0 {
            "* * * * * *"
        } else {
            "*/2 * * * * *"
        };
        config.push_str(&format!(
            "  {mapping}:\n    model: {model}\n    destination: hook\n    send: [added, updated, deleted]\n    fields: {{ email: email, \"traits.plan\": plan }}\n    schedule: {{ cron: \"{cron}\" }}\n"
        ));
    }
    config
}

/// Whether this process may give a child a host name of its own (root, with `unshare`).
fn can_unshare_uts() -> bool {
    std::process::Command::new("unshare")
        .args(["-u", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `sluice serve` for the project in `dir`; with `host`, under that host name.
fn start_replica(dir: &std::path::Path, host: Option<&str>) -> tokio::process::Child {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let sluice = env!("CARGO_BIN_EXE_sluice");
    let config = dir.join("sluice.yaml");
    let args = [
        "serve".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--config".into(),
        config.display().to_string(),
    ];
    let mut command = match host {
        Some(host) => {
            let mut command = tokio::process::Command::new("unshare");
            command
                .args(["-u", "sh", "-c", "hostname \"$0\" && exec \"$@\"", host, sluice])
                .args(&args);
            command
        }
        None => {
            let mut command = tokio::process::Command::new(sluice);
            command.args(&args);
            command
        }
    };
    command
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("serve.log")).expect("log"))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sluice serve")
}

/// One run, as the metadata store has it.
#[derive(Debug, Clone)]
struct Run {
    mapping: String,
    status: String,
    trigger: String,
    host: String,
    pid: i64,
    started: DateTime<Utc>,
    finished: Option<DateTime<Utc>>,
}

async fn runs(metadata: &tokio_postgres::Client) -> Vec<Run> {
    let time = |t: String| {
        DateTime::parse_from_rfc3339(&t)
            .expect("RFC 3339")
            .with_timezone(&Utc)
    };
    metadata
        .query(
            "SELECT mapping, status, run_trigger, host, pid, started_at, finished_at FROM runs ORDER BY started_at",
            &[],
        )
        .await
        .expect("runs")
        .into_iter()
        .map(|r| Run {
            mapping: r.get(0),
            status: r.get(1),
            trigger: r.get(2),
            host: r.get(3),
            pid: r.get(4),
            started: time(r.get(5)),
            finished: r.get::<_, Option<String>>(6).map(time),
        })
        .collect()
}

/// The rows of the source table: id -> plan.
async fn table(source: &tokio_postgres::Client, filter: &str) -> Model {
    source
        .query(&format!("SELECT id, plan FROM replicas_soak.users {filter}"), &[])
        .await
        .expect("read the source")
        .into_iter()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
        .collect()
}

#[tokio::test]
async fn two_replicas_share_schedules_never_run_a_mapping_twice_and_take_over_from_a_dead_one() {
    let Some(metadata_url) = fresh_database("sluice_replicas_it").await else {
        return;
    };
    let Some(source) = postgres("replicas_soak").await else {
        return;
    };
    let Some(bucket) = Bucket::new(Provider::S3, "replicas").await else {
        return;
    };
    let (metadata, connection) = tokio_postgres::connect(&metadata_url, tokio_postgres::NoTls)
        .await
        .expect("metadata database");
    tokio::spawn(connection);
    source
        .batch_execute(
            "CREATE TABLE replicas_soak.users (id int8 PRIMARY KEY, email text NOT NULL, plan text NOT NULL);
             INSERT INTO replicas_soak.users SELECT g, 'user' || g || '@example.com', 'free' FROM generate_series(1, 3000) g;",
        )
        .await
        .expect("source table");

    let seen: Shared = Arc::default();
    let app = Router::new()
        .route("/ingest", post(receive))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let receiver = format!("http://{}/ingest", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let config = replica_config(&metadata_url, &bucket, &receiver);
    let dirs = [
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    ];
    for dir in &dirs {
        std::fs::write(dir.path().join("sluice.yaml"), &config).expect("config");
    }
    // The second replica under a host name of its own, as on another machine; without
    // `unshare`, both share this host's name and a dead replica's leases are taken over at once.
    let other_host = can_unshare_uts().then_some("sluice-replica-b");
    if other_host.is_none() {
        eprintln!("note: cannot unshare a UTS namespace here; both replicas run under one host name");
    }
    let mut replica_a = start_replica(dirs[0].path(), None);
    let replica_a_pid = replica_a.id().expect("pid") as i64;
    let mut replica_b = start_replica(dirs[1].path(), other_host);

    // The source keeps changing: some plans change, a few rows go and a few arrive.
    let stop_changes = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let changer = {
        let stop = stop_changes.clone();
        let (client, connection) = tokio_postgres::connect(PG_URL, tokio_postgres::NoTls)
            .await
            .expect("source");
        tokio::spawn(connection);
        tokio::spawn(async move {
            let mut round: i64 = 0;
            let mut next_id: i64 = 3001;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                round += 1;
                client
                    .batch_execute(&format!(
                        "BEGIN;
                         UPDATE replicas_soak.users SET plan = 'plan-{round}' WHERE id % 97 = {round} % 97;
                         DELETE FROM replicas_soak.users WHERE id % 211 = {round} % 211 AND id % 2 = 0;
                         INSERT INTO replicas_soak.users SELECT g, 'user' || g || '@example.com', 'new-{round}' FROM generate_series({next_id}, {}) g;
                         COMMIT;",
                        next_id + 4
                    ))
                    .await
                    .expect("change the source");
                next_id += 5;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            round
        })
    };

    let started = Instant::now();
    // The replicas create the metadata tables as they start.
    while metadata.query("SELECT 1 FROM runs LIMIT 1", &[]).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the replicas did not start: {}",
            std::fs::read_to_string(dirs[0].path().join("serve.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let succeeded = |runs: &[Run]| runs.iter().filter(|r| r.status == "succeeded").count();
    // First half of the soak with both replicas.
    loop {
        let all = runs(&metadata).await;
        if succeeded(&all) >= SOAK_RUNS / 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "only {} runs succeeded in two minutes: {:#?}",
            succeeded(&all),
            all.iter().rev().take(8).collect::<Vec<_>>()
        );
        assert!(
            replica_a.try_wait().expect("wait").is_none() && replica_b.try_wait().expect("wait").is_none(),
            "a replica stopped: {}",
            std::fs::read_to_string(dirs[0].path().join("serve.log")).unwrap_or_default()
                + &std::fs::read_to_string(dirs[1].path().join("serve.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Kill replica A while it holds leases (mid-run), as a machine that dies.
    let held_by_a = |rows: Vec<tokio_postgres::Row>| -> Vec<String> {
        rows.into_iter()
            .filter(|r| r.get::<_, String>(1).ends_with(&format!(":{replica_a_pid}")))
            .map(|r| r.get(0))
            .collect()
    };
    let (killed_at, a_leases) = loop {
        let leases = metadata
            .query("SELECT mapping, holder FROM leases", &[])
            .await
            .expect("leases");
        let held = held_by_a(leases);
        // Mid-run: a lease is taken just before its run is recorded and kept a moment after it
        // ends, so a lease alone does not mean a run is in flight to be interrupted.
        let running = !held.is_empty()
            && runs(&metadata)
                .await
                .iter()
                .any(|r| r.pid == replica_a_pid && r.status == "running");
        if running {
            replica_a.start_kill().expect("SIGKILL replica A");
            break (Utc::now(), held);
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "replica A never held a lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = replica_a.wait().await;
    eprintln!("replica A killed holding the leases of {a_leases:?}");

    // Second half with replica B alone.
    loop {
        let all = runs(&metadata).await;
        let after_kill = all
            .iter()
            .filter(|r| r.started > killed_at && r.status == "succeeded")
            .count();
        if succeeded(&all) >= SOAK_RUNS && after_kill >= 20 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "only {} runs succeeded ({after_kill} since the kill): {:#?}",
            succeeded(&all),
            all.iter().rev().take(8).collect::<Vec<_>>()
        );
        assert!(replica_b.try_wait().expect("wait").is_none(), "replica B stopped");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The source stops changing; each mapping then runs once more from start to end.
    stop_changes.store(true, std::sync::atomic::Ordering::Release);
    let rounds = changer.await.expect("changer");
    let settled_from = Utc::now();
    loop {
        let all = runs(&metadata).await;
        let caught_up = MAPPINGS.iter().all(|(mapping, _)| {
            all.iter()
                .any(|r| r.mapping == *mapping && r.status == "succeeded" && r.started > settled_from)
        });
        if caught_up {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(330),
            "the mappings did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    terminate(&replica_b);
    let stopped = tokio::time::timeout(Duration::from_secs(30), replica_b.wait())
        .await
        .expect("replica B stops on SIGTERM")
        .expect("wait");
    let log_b = std::fs::read_to_string(dirs[1].path().join("serve.log")).unwrap_or_default();
    assert!(stopped.success(), "{log_b}");

    let all = runs(&metadata).await;
    let hosts: BTreeMap<(String, i64), usize> = all.iter().fold(BTreeMap::new(), |mut by, r| {
        *by.entry((r.host.clone(), r.pid)).or_default() += 1;
        by
    });
    eprintln!(
        "{} runs ({} succeeded) in {:.0} s over {rounds} rounds of source changes; by replica: {hosts:?}",
        all.len(),
        succeeded(&all),
        started.elapsed().as_secs_f64()
    );

    // Both replicas ran scheduled runs: the schedules were shared, not run by one of them.
    let before_kill: Vec<&Run> = all.iter().filter(|r| r.started < killed_at).collect();
    assert!(
        before_kill.iter().any(|r| r.pid == replica_a_pid)
            && before_kill.iter().any(|r| r.pid != replica_a_pid),
        "both replicas ran mappings before the kill: {hosts:?}"
    );
    assert!(
        all.iter().all(|r| r.trigger == "schedule"),
        "only the schedules start runs"
    );

    // Each fire time started one run between the two replicas (a run, or a skipped one when
    // the previous run still held the mapping): a mapping has no more runs than its schedule
    // had fire times. Replicas firing each on their own would make about twice as many.
    for (i, (mapping, _)) in MAPPINGS.iter().enumerate() {
        let period = if i % 2 == 0 { 1.0 } else { 2.0 };
        let starts: Vec<DateTime<Utc>> = all
            .iter()
            .filter(|r| r.mapping == *mapping)
            .map(|r| r.started)
            .collect();
        let (Some(first), Some(last)) = (starts.first(), starts.last()) else {
            panic!("{mapping} never ran");
        };
        let fire_times = ((*last - *first).as_seconds_f64() / period).round() as usize + 1;
        assert!(
            starts.len() <= fire_times,
            "{mapping}: {} runs for {fire_times} fire times",
            starts.len()
        );
    }

    // No mapping ran in both at once: per mapping, the runs that ran (not skipped) never
    // overlap. A killed run ended when its process died (its record is closed later, by the
    // run that takes it over).
    for (mapping, _) in MAPPINGS {
        let mut spans: Vec<(DateTime<Utc>, DateTime<Utc>, &Run)> = all
            .iter()
            .filter(|r| r.mapping == mapping && r.status != "skipped")
            .map(|r| {
                let mut end = r.finished.expect("every run is finished");
                if r.pid == replica_a_pid && r.status == "interrupted" {
                    end = end.min(killed_at);
                }
                (r.started, end, r)
            })
            .collect();
        spans.sort_by_key(|(start, _, _)| *start);
        for pair in spans.windows(2) {
            assert!(
                pair[0].1 <= pair[1].0,
                "{mapping}: runs overlap: {:#?} and {:#?}",
                pair[0].2,
                pair[1].2
            );
        }
    }
    let (overlaps, mut acks, requests) = {
        let mut seen = seen.lock().expect("lock");
        (
            seen.overlaps.clone(),
            std::mem::take(&mut seen.acks),
            seen.requests,
        )
    };
    assert!(
        overlaps.is_empty(),
        "two runs of one mapping sent at once: {overlaps:?}"
    );

    // The survivor took over each mapping within the lease time (plus a fire interval and
    // the run's start): the first run of each that started after the kill and went on to run.
    let mut handoffs = Vec::new();
    for (mapping, _) in MAPPINGS {
        let first = all
            .iter()
            .filter(|r| r.mapping == mapping && r.started > killed_at && r.status != "skipped")
            .min_by_key(|r| r.started)
            .unwrap_or_else(|| panic!("{mapping} never ran after the kill"));
        let took = (first.started - killed_at).to_std().unwrap_or_default();
        handoffs.push(format!(
            "{mapping} {:.1} s{}",
            took.as_secs_f64(),
            if a_leases.iter().any(|m| m == mapping) {
                " (its lease was held by the dead replica)"
            } else {
                ""
            }
        ));
        assert!(
            took <= LEASE_TTL + Duration::from_secs(4),
            "{mapping} was taken over {took:?} after the kill; the lease time is {LEASE_TTL:?}"
        );
        assert_ne!(first.pid, replica_a_pid);
    }
    eprintln!("hand-over after the kill: {}", handoffs.join(", "));
    // The dead replica's runs were closed as interrupted by the runs that took them over.
    assert!(
        all.iter().all(|r| r.status != "running"),
        "runs left running: {:#?}",
        all.iter().filter(|r| r.status == "running").collect::<Vec<_>>()
    );
    assert!(
        all.iter()
            .any(|r| r.pid == replica_a_pid && r.status == "interrupted"),
        "the killed runs are recorded as interrupted"
    );

    // Every record reached the destination: what each mapping's destination holds is the
    // source as it ended.
    for (mapping, model) in MAPPINGS {
        let expected = table(&source, if model == "pros" { "WHERE id % 3 = 0" } else { "" }).await;
        let acks = acks.remove(mapping).unwrap_or_default();
        assert_same_state(&destination_state(&acks), &expected, mapping);
    }
    eprintln!("{requests} requests delivered");
}
