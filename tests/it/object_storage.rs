//! sluice with everything on object storage, against real local servers (moto for S3, Azurite
//! for Azure Blob, the GCS stand-in): the snapshot store in a bucket, a `files` source reading
//! Parquet (a prefix of hive-partitioned files), CSV and NDJSON from the bucket, and a `file`
//! destination writing into it. Both syncs, history queries, retention with its clean-up of
//! abandoned files and unfinished uploads, and a filtered backfill, driven through the real
//! binary.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray};
use object_store::ObjectStoreExt;
use object_store::path::Path as StorePath;
use serde_json::Value;

use crate::buckets::{Bucket, Provider};
use crate::common::{TestProject, stderr, stdout};

/// id -> (plan, region)
type Users = BTreeMap<i64, (&'static str, &'static str)>;

fn parquet_bytes(batch: &RecordBatch) -> Vec<u8> {
    let mut out = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), None).expect("writer");
    writer.write(batch).expect("write");
    writer.close().expect("close");
    out
}

/// Writes the users as one Parquet file per region partition, `data/users/region=<r>/part-<n>.parquet`
/// (two files in each partition, so the table is a prefix of many files), replacing the old ones.
async fn write_users(bucket: &Bucket, users: &Users) {
    for old in bucket.list("data/users").await {
        bucket
            .store()
            .delete(&StorePath::from(old))
            .await
            .expect("delete");
    }
    for region in ["eu", "us"] {
        let rows: Vec<(&i64, &(&str, &str))> = users.iter().filter(|(_, (_, r))| *r == region).collect();
        for (part, chunk) in rows.chunks(rows.len().div_ceil(2).max(1)).enumerate() {
            let batch = RecordBatch::try_from_iter(vec![
                (
                    "id",
                    Arc::new(Int64Array::from_iter_values(chunk.iter().map(|(id, _)| **id))) as ArrayRef,
                ),
                (
                    "email",
                    Arc::new(StringArray::from_iter_values(
                        chunk.iter().map(|(id, _)| format!("user{id}@example.com")),
                    )) as ArrayRef,
                ),
                (
                    "plan",
                    Arc::new(StringArray::from_iter_values(chunk.iter().map(|(_, (p, _))| *p))) as ArrayRef,
                ),
                (
                    "lead_score",
                    Arc::new(Int32Array::from_iter_values(
                        chunk.iter().map(|(id, _)| (**id % 100) as i32),
                    )) as ArrayRef,
                ),
            ])
            .expect("batch");
            bucket
                .put(
                    &format!("data/users/region={region}/part-{part}.parquet"),
                    parquet_bytes(&batch),
                )
                .await;
        }
    }
}

fn config(bucket: &Bucket) -> String {
    let options = bucket.options_yaml();
    format!(
        r#"state_dir: .sluice
snapshot_store: {snapshots}
snapshot_store_options: {options}
sources:
  lake:
    type: files
    tables:
      users: {{ path: "{users}", format: parquet, partitions: [region] }}
      plans: "{plans}"
      flags: "{flags}"
    options: {options}
models:
  users:
    source: lake
    sql: >
      SELECT u.id, u.email, u.plan, u.region, u.lead_score, p.price, coalesce(f.beta, false) AS beta
      FROM users u JOIN plans p ON p.name = u.plan LEFT JOIN flags f ON f.id = u.id
    primary_key: id
    retain: {{ runs: 2, abandoned_after: 1s }}
destinations:
  bucket_files:
    type: file
    url: {exports}
    options: {options}
mappings:
  users_to_files:
    model: users
    destination: bucket_files
    send: [added, updated, deleted]
    fields: {{ email: email, plan: plan, region: region, price: price, beta: beta }}
"#,
        snapshots = bucket.url("state/snapshots"),
        users = bucket.url("data/users/"),
        plans = bucket.url("data/plans.csv"),
        flags = bucket.url("data/flags.json"),
        exports = bucket.url("exports"),
    )
}

/// The records of the newest export file of the mapping, as (op, id, plan).
async fn latest_export(bucket: &Bucket) -> Vec<(String, i64, String)> {
    let files = bucket.list("exports/users_to_files").await;
    let Some(newest) = files.last() else {
        return Vec::new();
    };
    let text = String::from_utf8(bucket.get(newest).await).expect("utf-8");
    let mut records: Vec<(String, i64, String)> = text
        .lines()
        .map(|line| {
            let record: Value = serde_json::from_str(line).expect("jsonl");
            (
                record["op"].as_str().unwrap_or_default().to_string(),
                record["key"]["id"].as_i64().unwrap_or(-1),
                record["data"]["plan"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    records.sort();
    records
}

async fn manifests(bucket: &Bucket) -> Vec<String> {
    bucket
        .list("state/snapshots/models/users/snapshots")
        .await
        .into_iter()
        .filter(|k| k.ends_with(".json"))
        .collect()
}

async fn whole_workflow(provider: Provider) {
    let Some(bucket) = Bucket::new(provider, "workflow").await else {
        return;
    };
    bucket
        .put(
            "data/plans.csv",
            b"name,price\nfree,0\npro,49\nteam,99\n".to_vec(),
        )
        .await;
    bucket
        .put(
            "data/flags.json",
            b"{\"id\": 2, \"beta\": true}\n{\"id\": 7, \"beta\": true}\n".to_vec(),
        )
        .await;
    let mut users: Users = (1..=40)
        .map(|id| (id, ("free", if id % 2 == 0 { "eu" } else { "us" })))
        .collect();
    write_users(&bucket, &users).await;
    let project = TestProject::new(&config(&bucket));

    // First sync: every row is added.
    let first = project.sluice(&["run"]).await;
    assert!(first.status.success(), "{}{}", stdout(&first), stderr(&first));
    let sent = latest_export(&bucket).await;
    assert_eq!(sent.len(), 40, "{sent:?}");
    assert!(sent.iter().all(|(op, _, _)| op == "added"));
    assert_eq!(manifests(&bucket).await.len(), 1);
    // Nothing of sluice's state is on local disk but the metadata store and spill space.
    assert!(!project.path().join(".sluice/snapshots").exists());

    // Second sync: two upgrades (one moves partition), a deletion, a sign-up.
    users.insert(2, ("pro", "eu"));
    users.insert(3, ("team", "eu"));
    users.remove(&4);
    users.insert(41, ("free", "us"));
    write_users(&bucket, &users).await;
    let second = project.sluice(&["run"]).await;
    assert!(second.status.success(), "{}{}", stdout(&second), stderr(&second));
    assert_eq!(
        latest_export(&bucket).await,
        vec![
            ("added".to_string(), 41, "free".to_string()),
            ("deleted".to_string(), 4, "free".to_string()),
            ("updated".to_string(), 2, "pro".to_string()),
            ("updated".to_string(), 3, "team".to_string()),
        ]
    );

    // History over both snapshots in the bucket.
    let history = project
        .sluice(&[
            "query",
            "SELECT plan, price FROM users_history WHERE id = 2 ORDER BY _extracted_at",
            "--format",
            "csv",
        ])
        .await;
    assert!(history.status.success(), "{}", stderr(&history));
    assert_eq!(stdout(&history).trim(), "plan,price\nfree,0\npro,49");

    // A third run with nothing new sends nothing and keeps two snapshots (`retain: {runs: 2}`),
    // once retired.
    let third = project.sluice(&["run"]).await;
    assert!(third.status.success(), "{}", stderr(&third));
    assert_eq!(manifests(&bucket).await.len(), 3);
    // What a writer killed mid-snapshot leaves: data no manifest commits, and (S3, GCS) a
    // multipart upload never completed.
    bucket
        .put(
            "state/snapshots/models/users/snapshots/01-dead/bucket-0000-of-0001.parquet",
            b"x".to_vec(),
        )
        .await;
    let store = bucket.store();
    let half = StorePath::from("state/snapshots/models/users/snapshots/02-dead/bucket-0000-of-0001.parquet");
    let mut upload = store.put_multipart(&half).await.expect("start upload");
    upload
        .put_part(vec![7u8; 5 * 1024 * 1024].into())
        .await
        .expect("part");
    drop(upload);
    let snapshots = sluice_snapshots::SnapshotStore::open(
        &bucket.url("state/snapshots"),
        std::path::Path::new("/"),
        bucket.options(),
    )
    .expect("open");
    let unfinished = snapshots
        .unfinished_uploads("models/users")
        .await
        .expect("list uploads");
    let has_multipart_listing = provider != Provider::Azure;
    assert_eq!(
        unfinished.len(),
        usize::from(has_multipart_listing),
        "{unfinished:?}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let retire = project.sluice(&["retire"]).await;
    assert!(retire.status.success(), "{}", stderr(&retire));
    let report = stdout(&retire);
    assert!(report.contains("1 retired"), "{report}");
    assert!(report.contains("1 orphaned file(s) removed"), "{report}");
    assert!(
        report.contains(&format!(
            "{} unfinished upload(s) aborted",
            usize::from(has_multipart_listing)
        )),
        "{report}"
    );
    assert_eq!(manifests(&bucket).await.len(), 2);
    assert!(
        bucket
            .list("state/snapshots/models/users/snapshots/01-dead")
            .await
            .is_empty()
    );
    assert!(
        snapshots
            .unfinished_uploads("models/users")
            .await
            .expect("list")
            .is_empty()
    );
    // History still answers over what is kept.
    let kept = project
        .sluice(&[
            "query",
            "SELECT count(DISTINCT _snapshot_id) AS n FROM users_history",
            "--format",
            "csv",
        ])
        .await;
    assert_eq!(stdout(&kept).trim(), "n\n2", "{}", stderr(&kept));

    // A filtered backfill: the pro and team users are sent again as added, nothing else.
    let backfill = project
        .sluice(&["run", "--full", "--filter", "plan <> 'free'"])
        .await;
    assert!(
        backfill.status.success(),
        "{}{}",
        stdout(&backfill),
        stderr(&backfill)
    );
    assert_eq!(
        latest_export(&bucket).await,
        vec![
            ("added".to_string(), 2, "pro".to_string()),
            ("added".to_string(), 3, "team".to_string()),
        ]
    );
}

#[tokio::test]
async fn everything_on_s3() {
    whole_workflow(Provider::S3).await;
}

#[tokio::test]
async fn everything_on_azure_blob_storage() {
    whole_workflow(Provider::Azure).await;
}

#[tokio::test]
async fn everything_on_gcs() {
    whole_workflow(Provider::Gcs).await;
}
