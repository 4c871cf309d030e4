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
