//! Models from dbt, against a real dbt project: dbt-core with dbt-postgres (PyPI, installed by
//! `.ci/test-tools`) builds models in the local PostgreSQL; sluice reads one by name, `ref()`s
//! it in its own SQL, syncs both, and `sluice check` catches a dbt change that dropped a
//! column the dbt project still documents and a mapping still sends.

use std::path::PathBuf;
use std::time::Duration;

use crate::buckets::tools_dir;
use crate::common::TestProject;
use crate::faults::AckReceiver;
use crate::services::{PG_URL, postgres, unavailable};

/// A dbt project in a temporary directory, building into schema `schema` of the local
/// PostgreSQL.
struct DbtProject {
    dir: tempfile::TempDir,
    binary: PathBuf,
}

impl DbtProject {
    fn new(schema: &str) -> Option<Self> {
        let binary = tools_dir().join("dbt/bin/dbt");
        if !binary.exists() {
            unavailable(
                "dbt-core with dbt-postgres",
                format!("{} is not installed (run .ci/test-tools)", binary.display()),
            );
            return None;
        }
        let project = Self {
            dir: tempfile::tempdir().expect("dir"),
            binary,
        };
        project.write(
            "dbt_project.yml",
            "name: shop\nversion: \"1.0.0\"\nprofile: shop\nmodels:\n  shop:\n    +materialized: table\n",
        );
        project.write(
            "profiles.yml",
            &format!(
                "shop:\n  target: dev\n  outputs:\n    dev:\n      type: postgres\n      host: 127.0.0.1\n      port: 5432\n      user: postgres\n      password: \"\"\n      dbname: test\n      schema: {schema}\n      threads: 1\n"
            ),
        );
        Some(project)
    }

    /// The shop project: staged users, and `customers` on them, documented and tested.
    fn shop(schema: &str) -> Option<Self> {
        let project = Self::new(schema)?;
        project.write("models/stg_users.sql", STAGED_USERS);
        project.write(
            "models/customers.sql",
            "select id, email, plan from {{ ref('stg_users') }}\n",
        );
        project.write("models/schema.yml", CUSTOMERS_DOCS);
        Some(project)
    }

    fn write(&self, path: &str, text: &str) {
        let path = self.dir.path().join(path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }

    fn manifest(&self) -> PathBuf {
        self.dir.path().join("target/manifest.json")
    }

    /// `dbt build`: runs the models and their tests, and writes the manifest.
    async fn build(&self) {
        let output = tokio::process::Command::new(&self.binary)
            .args([
                "build",
                "--profiles-dir",
                ".",
                "--project-dir",
                ".",
                "--no-version-check",
            ])
            .current_dir(self.dir.path())
            .env("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
            .output()
            .await
            .expect("run dbt");
        assert!(
            output.status.success(),
            "dbt build failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

const STAGED_USERS: &str = "select 1 as id, 'a@example.com' as email, 'pro' as plan\n\
union all select 2, 'b@example.com', 'free'\n\
union all select 3, 'c@example.com', 'pro'\n";

const CUSTOMERS_DOCS: &str = "version: 2\nmodels:\n  - name: customers\n    description: One row per customer\n    columns:\n      - name: id\n        description: The customer's id\n        data_tests: [unique, not_null]\n      - name: email\n      - name: plan\n";

fn sluice_config(manifest: &std::path::Path, receiver: &str, dbt_model: &str) -> String {
    format!(
        r#"state_dir: .sluice
dbt:
  manifest: {manifest}
sources:
  warehouse:
    type: postgres
    url: {PG_URL}
    sslmode: disable
models:
  customers:
    source: warehouse
    dbt_model: {dbt_model}
  pro_customers:
    source: warehouse
    sql: SELECT id, email FROM {{{{ ref('customers') }}}} WHERE plan = 'pro'
    primary_key: id
destinations:
  crm:
    type: webhook
    url: {receiver}
    batch_size: 10
mappings:
  customers_to_crm:
    model: customers
    destination: crm
    fields: {{ email: email, "traits.plan": plan }}
  pro_to_crm:
    model: pro_customers
    destination: crm
    fields: {{ email: email }}
"#,
        manifest = manifest.display()
    )
}

/// `dbt build`, then a sync of the dbt model by name (its key from its `unique` test) and of a
/// model that `ref()`s it; then a dbt change that drops a column, caught by `sluice check`.
#[tokio::test]
async fn a_dbt_model_syncs_by_name_and_a_dropped_column_is_caught_by_check() {
    let Some(_pg) = postgres("dbt_shop").await else {
        return;
    };
    let Some(dbt) = DbtProject::shop("dbt_shop") else {
        return;
    };
    dbt.build().await;

    let receiver = AckReceiver::start(Duration::ZERO).await;
    let project = TestProject::new(&sluice_config(&dbt.manifest(), &receiver.url, "customers"));
    let output = project.sluice(&["check"]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("ok      model customers"), "{stdout}");

    let output = project.sluice(&["run"]).await;
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let mut sent: Vec<(i64, String)> = receiver
        .acks()
        .iter()
        .map(|a| (a.id, a.data.to_string()))
        .collect();
    sent.sort();
    assert_eq!(sent.len(), 5, "three customers and two pro customers: {sent:?}");
    assert!(
        sent.iter()
            .any(|(id, data)| *id == 1 && data.contains("a@example.com") && data.contains("pro")),
        "{sent:?}"
    );
    // The key came from dbt's `unique` test: a second run sends nothing.
    let output = project.sluice(&["run"]).await;
    assert!(output.status.success());
    assert_eq!(receiver.acks().len(), 5, "nothing changed, nothing sent");

    // The mappings as dbt exposures: real dbt takes the file in, and its lineage has each
    // mapping depending on the model it reads (also through `ref()`).
    let exposures = dbt.dir.path().join("models/sluice_exposures.yml");
    let output = project
        .sluice(&["dbt", "exposures", "--output", &exposures.display().to_string()])
        .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    dbt.build().await;
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dbt.manifest()).expect("manifest")).expect("json");
    for mapping in ["customers_to_crm", "pro_to_crm"] {
        let exposure = &manifest["exposures"][format!("exposure.shop.sluice_{mapping}")];
        assert_eq!(
            exposure["depends_on"]["nodes"],
            serde_json::json!(["model.shop.customers"]),
            "{mapping}: {exposure}"
        );
        assert_eq!(exposure["meta"]["sluice_destination"], "crm", "{exposure}");
    }

    // dbt drops `plan` (its docs still name it): check says so, for the model and for what
    // reads the column.
    dbt.write(
        "models/customers.sql",
        "select id, email from {{ ref('stg_users') }}\n",
    );
    dbt.build().await;
    let output = project.sluice(&["check"]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    let line = |prefix: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_default()
            .to_string()
    };
    let model = line("FAILED  model customers");
    assert!(
        model.contains("changed its columns") && model.contains("plan"),
        "{stdout}"
    );
    assert!(line("FAILED  model pro_customers").contains("plan"), "{stdout}");
    assert!(
        line("FAILED  mapping customers_to_crm").contains("plan"),
        "{stdout}"
    );
}

/// A dbt model that is not in the manifest, or is ephemeral, stops `sluice check` with the
/// reason and the models there are.
#[tokio::test]
async fn a_missing_or_ephemeral_dbt_model_is_reported_with_what_there_is() {
    let Some(_pg) = postgres("dbt_missing").await else {
        return;
    };
    let Some(dbt) = DbtProject::shop("dbt_missing") else {
        return;
    };
    dbt.write(
        "models/recent.sql",
        "{{ config(materialized='ephemeral') }}\nselect * from {{ ref('customers') }}\n",
    );
    dbt.build().await;
    let receiver = AckReceiver::start(Duration::ZERO).await;

    let project = TestProject::new(&sluice_config(&dbt.manifest(), &receiver.url, "custmers"));
    let output = project.sluice(&["check"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("dbt model `custmers` is not in the manifest")
            && stderr.contains("customers, stg_users"),
        "{stderr}"
    );

    let project = TestProject::new(&sluice_config(&dbt.manifest(), &receiver.url, "recent"));
    let output = project.sluice(&["check"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("ephemeral"), "{stderr}");
}

/// The hex HMAC-SHA256 of `body` under `secret`, computed by Python's `hmac` as dbt Cloud's
/// documentation verifies its webhooks (independent of sluice's own code).
fn dbt_cloud_signature(secret: &str, body: &str) -> String {
    let output = std::process::Command::new("python3")
        .args([
            "-c",
            "import hashlib, hmac, sys; print(hmac.new(sys.argv[1].encode(), sys.stdin.buffer.read(), hashlib.sha256).hexdigest())",
            secret,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().expect("stdin").write_all(body.as_bytes())?;
            child.wait_with_output()
        })
        .expect("python3");
    assert!(output.status.success());
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// A dbt Cloud `job.run.completed` body, as docs.getdbt.com/docs/deploy/webhooks shows it.
fn dbt_cloud_event(event_id: &str, job_id: &str, status: &str, code: u32) -> String {
    serde_json::json!({
        "accountId": 1, "webhooksID": "wsu_12345abcde", "eventId": event_id,
        "timestamp": chrono::Utc::now().to_rfc3339(), "eventType": "job.run.completed",
        "webhookName": "sluice",
        "data": {
            "jobId": job_id, "jobName": "Nightly build", "runId": "12345", "environmentId": "1234",
            "environmentName": "Production", "dbtVersion": "1.11.16", "projectName": "shop",
            "projectId": "167194", "runStatus": status, "runStatusCode": code,
            "runStatusMessage": "None", "runReason": "Kicked off by the scheduler",
            "runStartedAt": chrono::Utc::now().to_rfc3339(),
            "runFinishedAt": chrono::Utc::now().to_rfc3339()
        }
    })
    .to_string()
}

/// `sluice serve` on a free loopback port over `project`, once it answers; and its address.
async fn start_serve(project: &TestProject) -> (tokio::process::Child, String) {
    let port = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let serve = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--config"])
        .arg(project.config_path())
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    for _ in 0..100 {
        if http.get(format!("{base}/healthz")).send().await.is_ok() {
            return (serve, base);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("serve did not start");
}

/// Waits (up to 40 s) until `receiver` has `count` records.
async fn wait_for_acks(receiver: &AckReceiver, count: usize) {
    for _ in 0..400 {
        if receiver.acks().len() >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{count} records expected, {} arrived", receiver.acks().len());
}

/// Where there is no run_results.json (a job that uploads only its manifest once it has
/// built), a manifest with a new `generated_at` starts the `after_dbt` mappings.
#[tokio::test]
async fn without_run_results_a_new_manifest_starts_the_mappings_scheduled_after_dbt() {
    let Some(_pg) = postgres("dbt_manifest_only").await else {
        return;
    };
    let Some(dbt) = DbtProject::shop("dbt_manifest_only") else {
        return;
    };
    dbt.build().await;
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let config = sluice_config(&dbt.manifest(), &receiver.url, "customers")
        .replace("dbt:\n", "dbt:\n  run_results: not/written/run_results.json\n")
        .replace(
            "    fields: { email: email, \"traits.plan\": plan }\n",
            "    fields: { email: email, \"traits.plan\": plan }\n    schedule: { after_dbt: true }\n",
        );
    assert!(
        config.contains("after_dbt") && config.contains("not/written"),
        "{config}"
    );
    let project = TestProject::new(&config);
    let (serve, _) = start_serve(&project).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        receiver.acks().is_empty(),
        "the manifest serve started with is old news"
    );
    dbt.write(
        "models/stg_users.sql",
        &format!("{STAGED_USERS}union all select 4, 'd@example.com', 'free'\n"),
    );
    dbt.build().await;
    wait_for_acks(&receiver, 4).await;
    crate::faults::terminate(&serve);
    let output = serve.wait_with_output().await.expect("serve");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `sluice serve` with mappings scheduled `after_dbt`: a `dbt build` that rebuilds the model
/// starts its mapping (seen in `run_results.json`), with the manifest taken in anew when dbt
/// moved the model to another relation; a signed dbt Cloud webhook for a job starts the mapping
/// that waits for that job, once, however often dbt Cloud delivers it; a bad signature, a
/// failed job and an API token are refused or start nothing.
#[tokio::test]
async fn dbt_builds_and_dbt_cloud_webhooks_start_the_mappings_scheduled_after_dbt() {
    let Some(_pg) = postgres("dbt_after").await else {
        return;
    };
    let Some(dbt) = DbtProject::shop("dbt_after") else {
        return;
    };
    dbt.build().await;
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let secret = "whsec-sluice-test-0123456789";
    let config = sluice_config(&dbt.manifest(), &receiver.url, "customers")
        .replace("dbt:\n", &format!("dbt:\n  webhook_secret: {secret}\n"))
        .replace(
            "    fields: { email: email, \"traits.plan\": plan }\n",
            "    fields: { email: email, \"traits.plan\": plan }\n    schedule: { after_dbt: true }\n",
        )
        .replace(
            "    fields: { email: email }\n",
            "    fields: { email: email }\n    schedule: { after_dbt: { jobs: [70403] } }\n",
        );
    assert_eq!(config.matches("after_dbt").count(), 2, "{config}");
    let project = TestProject::new(&config);
    let created = project
        .sluice(&["token", "create", "ops", "--scope", "admin"])
        .await;
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let token = String::from_utf8_lossy(&created.stdout).trim().to_string();
    let (serve, base) = start_serve(&project).await;
    let http = reqwest::Client::new();
    let runs_of = |mapping: &'static str| {
        let http = http.clone();
        let base = base.clone();
        let token = token.clone();
        async move {
            let page = http
                .get(format!("{base}/api/v1/runs?mapping={mapping}"))
                .bearer_auth(&token)
                .send()
                .await
                .expect("runs")
                .text()
                .await
                .expect("text");
            let page: serde_json::Value = serde_json::from_str(&page).expect("json");
            page["runs"].as_array().cloned().unwrap_or_default()
        }
    };

    // The build before `serve` started is old news: nothing runs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(runs_of("customers_to_crm").await.is_empty());

    // dbt rebuilds `customers`, into another relation, with a fourth user: the manifest is
    // taken in and the mapping reads the new relation (the old table keeps three rows).
    dbt.write(
        "models/stg_users.sql",
        &format!("{STAGED_USERS}union all select 4, 'd@example.com', 'free'\n"),
    );
    dbt.write(
        "models/customers.sql",
        "{{ config(alias='customers_v2') }}\nselect id, email, plan from {{ ref('stg_users') }}\n",
    );
    dbt.build().await;
    wait_for_acks(&receiver, 4).await;
    let emails: Vec<String> = receiver.acks().iter().map(|a| a.data.to_string()).collect();
    assert!(emails.iter().any(|e| e.contains("d@example.com")), "{emails:?}");
    let runs = runs_of("customers_to_crm").await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0]["trigger"], "schedule", "{runs:?}");
    assert!(
        runs_of("pro_to_crm").await.is_empty(),
        "it waits for dbt Cloud job 70403"
    );

    // dbt Cloud: a bad signature, an API token, a failed run and another event start nothing.
    let webhook = |body: String, authorization: Option<String>| {
        let http = http.clone();
        let base = base.clone();
        async move {
            let mut request = http
                .post(format!("{base}/api/v1/triggers/dbt"))
                .header("content-type", "application/json")
                .body(body);
            if let Some(authorization) = authorization {
                request = request.header("authorization", authorization);
            }
            let response = request.send().await.expect("webhook");
            let status = response.status().as_u16();
            let text = response.text().await.expect("text");
            (
                status,
                serde_json::from_str::<serde_json::Value>(&text).expect("json"),
            )
        }
    };
    let success = dbt_cloud_event("wev_2L6ZDoilyiWzKkSA59Gmc2d7FDD", "70403", "Success", 10);
    let (status, answer) = webhook(success.clone(), None).await;
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = webhook(
        success.clone(),
        Some(dbt_cloud_signature("not-the-secret", &success)),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (401, Some("invalid_signature")),
        "{answer}"
    );
    let (status, answer) = webhook(success.clone(), Some(format!("Bearer {token}"))).await;
    assert_eq!(status, 401, "an API token is no signature: {answer}");
    let failed = dbt_cloud_event("wev_failed", "70403", "Errored", 20);
    let (status, answer) = webhook(failed.clone(), Some(dbt_cloud_signature(secret, &failed))).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"], false, "{answer}");
    assert!(
        answer["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("did not succeed"),
        "{answer}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(runs_of("pro_to_crm").await.is_empty());

    // The job succeeds: both mappings are due (`after_dbt: true` takes any dbt Cloud job), and
    // dbt Cloud delivering the event again starts nothing more.
    let signature = dbt_cloud_signature(secret, &success);
    let (status, answer) = webhook(success.clone(), Some(signature.clone())).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"], true, "{answer}");
    assert_eq!(
        answer["mappings"],
        serde_json::json!(["customers_to_crm", "pro_to_crm"]),
        "{answer}"
    );
    // Two pro customers (the view through `ref()` reads the new relation too).
    wait_for_acks(&receiver, 6).await;
    let (status, _) = webhook(success.clone(), Some(signature)).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(runs_of("pro_to_crm").await.len(), 1, "one run for one event");
    assert_eq!(runs_of("customers_to_crm").await.len(), 2);
    assert_eq!(
        receiver.acks().len(),
        6,
        "the second run of customers_to_crm had nothing new"
    );

    crate::faults::terminate(&serve);
    let output = serve.wait_with_output().await.expect("serve");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(log.contains("the dbt manifest changed"), "{log}");
    assert!(!log.contains(secret), "the webhook secret is never logged");
}
