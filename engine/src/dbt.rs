//! Models from dbt: a project's `dbt: {manifest: ...}` points at the `target/manifest.json`
//! that `dbt build` (or `dbt compile`, `dbt parse`) writes, and a model may say
//! `dbt_model: customers` instead of `sql:`. sluice then selects from the relation dbt
//! materialised (`relation_name` in the manifest: database, schema and alias, quoted as the
//! adapter quotes them), and takes the primary key from what the dbt project says of the model.
//! `{{ ref('customers') }}` inside a model's own SQL resolves the same way.
//!
//! Only the manifest's documented shape is read (schema v12, dbt 1.8 and later; older ones
//! carry the same fields); what sluice does not need is skipped.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

/// The `dbt:` section of `sluice.yaml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbtConfig {
    /// `target/manifest.json` of the dbt project: a path (relative to `sluice.yaml`) or an
    /// object-store URL (`s3://`, `gs://`, `az://`, ...). Needed to read dbt models; a project
    /// that only takes dbt Cloud's webhooks may leave it out.
    #[serde(default)]
    pub manifest: Option<crate::config::ConfigString>,
    /// Options for an object-store manifest's store (region, endpoint, credentials), as
    /// `snapshot_store_options` takes them.
    #[serde(default)]
    pub options: indexmap::IndexMap<String, crate::config::ConfigString>,
    /// `run_results.json` of the same dbt invocations (default: beside the manifest): when it
    /// moves, `after_dbt:` mappings whose dbt models were built run.
    #[serde(default)]
    pub run_results: Option<crate::config::ConfigString>,
    /// The secret token dbt Cloud gives a webhook subscription: `POST /api/v1/triggers/dbt`
    /// takes job-completion events signed with it.
    #[serde(default)]
    pub webhook_secret: Option<crate::config::ConfigString>,
}

impl DbtConfig {
    /// The manifest's location, when one is given.
    pub fn manifest_location(&self) -> Option<&str> {
        self.manifest.as_ref().map(|m| m.expose())
    }

    /// Where `run_results.json` is: `run_results:`, or the manifest's sibling; `None` with
    /// neither.
    pub fn run_results_location(&self) -> Option<String> {
        if let Some(location) = &self.run_results {
            return Some(location.expose().to_string());
        }
        let manifest = self.manifest_location()?;
        Some(match manifest.rfind('/') {
            Some(slash) => format!("{}run_results.json", &manifest[..=slash]),
            None => "run_results.json".to_string(),
        })
    }
}

/// The parts of a dbt manifest sluice reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub metadata: ManifestMetadata,
    #[serde(default)]
    nodes: HashMap<String, Node>,
    /// Disabled nodes, by unique id (each a list of versions).
    #[serde(default)]
    disabled: HashMap<String, Vec<Node>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ManifestMetadata {
    /// When dbt wrote the manifest (RFC 3339).
    #[serde(default)]
    pub generated_at: String,
    #[serde(default)]
    pub project_name: Option<String>,
    #[serde(default)]
    pub adapter_type: Option<String>,
    #[serde(default)]
    pub dbt_version: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct Node {
    unique_id: String,
    name: String,
    resource_type: String,
    #[serde(default)]
    package_name: String,
    #[serde(default)]
    relation_name: Option<String>,
    #[serde(default)]
    config: NodeConfig,
    #[serde(default)]
    meta: serde_json::Map<String, Value>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    columns: indexmap::IndexMap<String, Column>,
    #[serde(default)]
    constraints: Vec<Constraint>,
    /// A versioned model's version, and the version `ref()` picks.
    #[serde(default)]
    version: Option<Value>,
    #[serde(default)]
    latest_version: Option<Value>,
    /// Tests: the node they test, the column, and which test.
    #[serde(default)]
    attached_node: Option<String>,
    #[serde(default)]
    column_name: Option<String>,
    #[serde(default)]
    test_metadata: Option<TestMetadata>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct NodeConfig {
    #[serde(default)]
    materialized: Option<String>,
    #[serde(default)]
    meta: serde_json::Map<String, Value>,
    #[serde(default)]
    unique_key: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
struct Column {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    data_type: Option<String>,
    #[serde(default)]
    constraints: Vec<Constraint>,
}

#[derive(Debug, Clone, Deserialize)]
struct Constraint {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    columns: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct TestMetadata {
    name: String,
    #[serde(default)]
    kwargs: serde_json::Map<String, Value>,
}

/// A dbt model as sluice uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct DbtModel {
    /// `model.<package>.<name>`.
    pub unique_id: String,
    pub name: String,
    /// The relation to select from, quoted as the adapter quotes it.
    pub relation: String,
    /// The key sluice diffs on, and where it was found (for messages).
    pub primary_key: Option<(Vec<String>, String)>,
    pub description: String,
    /// The columns the dbt project documents (possibly none, possibly not all).
    pub columns: Vec<DbtColumn>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DbtColumn {
    pub name: String,
    pub description: String,
    pub data_type: Option<String>,
}

/// Resource types that materialise a relation a sync can read.
const RELATIONS: &[&str] = &["model", "seed", "snapshot"];

impl Manifest {
    /// Parses a manifest; the error says what is wrong with it.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes)
            .map_err(|e| format!("not a dbt manifest (target/manifest.json) sluice can read: {e}"))
    }

    /// A model (or seed, or snapshot) by `name`, or `package.name`: the root project's when
    /// several packages have one of that name, and a versioned model's latest version.
    pub fn model(&self, reference: &str) -> Result<DbtModel, String> {
        let (package, name) = match reference.split_once('.') {
            Some((package, name)) => (Some(package), name),
            None => (None, reference),
        };
        let matches = |node: &&Node| {
            RELATIONS.contains(&node.resource_type.as_str())
                && node.name == name
                && package.is_none_or(|p| node.package_name == p)
        };
        let mut found: Vec<&Node> = self.nodes.values().filter(matches).collect();
        if found.is_empty() {
            if self.disabled.values().flatten().any(|n| matches(&n)) {
                return Err(format!(
                    "dbt model `{reference}` is disabled in the dbt project (`enabled: false`), so dbt builds no relation for it"
                ));
            }
            let mut known: Vec<&str> = self
                .nodes
                .values()
                .filter(|n| {
                    n.resource_type == "model" && n.config.materialized.as_deref() != Some("ephemeral")
                })
                .map(|n| n.name.as_str())
                .collect();
            known.sort_unstable();
            known.dedup();
            let more = known.len().saturating_sub(20);
            known.truncate(20);
            return Err(format!(
                "dbt model `{reference}` is not in the manifest{}{}",
                if known.is_empty() {
                    String::new()
                } else {
                    format!("; the models it can read are: {}", known.join(", "))
                },
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ));
        }
        if found.len() > 1 {
            // The root project's, then the latest version of a versioned model.
            let root = self.metadata.project_name.as_deref();
            if found.iter().any(|n| Some(n.package_name.as_str()) == root) {
                found.retain(|n| Some(n.package_name.as_str()) == root);
            }
            if found.len() > 1 {
                found.retain(|n| n.version.is_none() || n.version == n.latest_version);
            }
        }
        let [node] = found.as_slice() else {
            let mut ids: Vec<&str> = found.iter().map(|n| n.unique_id.as_str()).collect();
            ids.sort_unstable();
            return Err(format!(
                "dbt model `{reference}` is ambiguous ({}); write it as `package.name`",
                ids.join(", ")
            ));
        };
        self.describe(node)
    }

    fn describe(&self, node: &Node) -> Result<DbtModel, String> {
        if node.config.materialized.as_deref() == Some("ephemeral") {
            return Err(format!(
                "dbt model `{}` is ephemeral: dbt builds no table or view for it, so there is nothing to read; materialise it as a view or table (`{{{{ config(materialized='view') }}}}`)",
                node.name
            ));
        }
        let relation = node.relation_name.clone().filter(|r| !r.trim().is_empty()).ok_or_else(|| {
            format!(
                "dbt model `{}` has no relation in the manifest (materialized: {}); run `dbt build` or `dbt compile` to write a full manifest",
                node.name,
                node.config.materialized.as_deref().unwrap_or("unknown")
            )
        })?;
        Ok(node.as_model(relation, self.primary_key(node)?))
    }

    /// What the dbt project says identifies a row of `node`, in order: `meta.primary_key` (of
    /// the model or its config), a `primary_key` constraint, a `unique` test (the one also
    /// tested `not_null` when there are several), `unique_combination_of_columns`, and an
    /// incremental model's `unique_key`. `None` when it says nothing; an error when it is
    /// ambiguous.
    fn primary_key(&self, node: &Node) -> Result<Option<(Vec<String>, String)>, String> {
        for (meta, origin) in [
            (&node.meta, "meta.primary_key"),
            (&node.config.meta, "config.meta.primary_key"),
        ] {
            if let Some(key) = meta.get("primary_key").and_then(columns_of) {
                return Ok(Some((key, origin.to_string())));
            }
        }
        if let Some(constraint) = node.constraints.iter().find(|c| c.kind == "primary_key")
            && !constraint.columns.is_empty()
        {
            return Ok(Some((
                constraint.columns.clone(),
                "a primary_key constraint".into(),
            )));
        }
        let column_keys: Vec<String> = node
            .columns
            .values()
            .filter(|c| c.constraints.iter().any(|k| k.kind == "primary_key"))
            .map(|c| c.name.clone())
            .collect();
        if !column_keys.is_empty() {
            return Ok(Some((column_keys, "a primary_key constraint".into())));
        }
        let tests: Vec<&Node> = self
            .nodes
            .values()
            .filter(|t| t.resource_type == "test" && t.attached_node.as_deref() == Some(&node.unique_id))
            .collect();
        let tested = |name: &str| -> Vec<String> {
            let mut columns: Vec<String> = tests
                .iter()
                .filter(|t| t.test_metadata.as_ref().is_some_and(|m| m.name == name))
                .filter_map(|t| t.column_name.clone())
                .collect();
            columns.sort();
            columns.dedup();
            columns
        };
        let unique = tested("unique");
        match unique.as_slice() {
            [] => {}
            [one] => return Ok(Some((vec![one.clone()], format!("its `unique` test on `{one}`")))),
            several => {
                let not_null = tested("not_null");
                let both: Vec<&String> = several.iter().filter(|c| not_null.contains(c)).collect();
                if let [one] = both.as_slice() {
                    return Ok(Some((
                        vec![(*one).clone()],
                        format!("its `unique` and `not_null` tests on `{one}`"),
                    )));
                }
                return Err(format!(
                    "dbt model `{}` has `unique` tests on several columns ({}); say which identifies a row with `primary_key:` on the sluice model, or `meta: {{primary_key: ...}}` in dbt",
                    node.name,
                    several.join(", ")
                ));
            }
        }
        let combination = tests.iter().find_map(|t| {
            let meta = t.test_metadata.as_ref()?;
            (meta.name == "unique_combination_of_columns")
                .then(|| meta.kwargs.get("combination_of_columns").and_then(columns_of))
                .flatten()
        });
        if let Some(key) = combination {
            return Ok(Some((key, "its `unique_combination_of_columns` test".into())));
        }
        if let Some(key) = node.config.unique_key.as_ref().and_then(columns_of) {
            return Ok(Some((key, "its incremental `unique_key`".into())));
        }
        Ok(None)
    }

    /// Every model (and seed, and snapshot) a sluice model can read, by package and name:
    /// each with its relation, documented columns and key (`primary_key` is `None`, and the
    /// second item says why, when the dbt project names none or several). Ephemeral models,
    /// which build no relation, are left out.
    pub fn models(&self) -> Vec<(DbtModel, Option<String>)> {
        let mut listed: Vec<(DbtModel, Option<String>)> = self
            .nodes
            .values()
            .filter(|n| RELATIONS.contains(&n.resource_type.as_str()))
            .filter(|n| n.config.materialized.as_deref() != Some("ephemeral"))
            .filter(|n| n.version.is_none() || n.version == n.latest_version)
            .filter_map(|node| {
                let key = self.primary_key(node);
                let problem = match &key {
                    Ok(None) => Some(format!(
                        "dbt says nothing of `{}`'s key: pick it, or add a `unique` test in dbt",
                        node.name
                    )),
                    Ok(Some(_)) => None,
                    Err(message) => Some(message.clone()),
                };
                let relation = node.relation_name.clone().filter(|r| !r.trim().is_empty())?;
                Some((node.as_model(relation, key.ok().flatten()), problem))
            })
            .collect();
        listed.sort_by(|(a, _), (b, _)| (a.package(), &a.name).cmp(&(b.package(), &b.name)));
        listed
    }

    /// `sql` with every `{{ ref('name') }}` (or `{{ ref('package', 'name') }}`) replaced by the
    /// relation dbt built for it; other `{{ ... }}` are left for sluice's own variables.
    pub fn render_refs(&self, sql: &str) -> Result<(String, Vec<DbtModel>), String> {
        let used = std::cell::RefCell::new(Vec::new());
        let rendered = render_refs(sql, |reference| {
            let model = self.model(reference)?;
            let relation = model.relation.clone();
            used.borrow_mut().push(model);
            Ok(relation)
        })?;
        Ok((rendered, used.into_inner()))
    }
}

impl Node {
    /// This node as sluice uses it, reading `relation` with `primary_key`.
    fn as_model(&self, relation: String, primary_key: Option<(Vec<String>, String)>) -> DbtModel {
        DbtModel {
            unique_id: self.unique_id.clone(),
            name: self.name.clone(),
            relation,
            primary_key,
            description: self.description.clone(),
            columns: self
                .columns
                .values()
                .map(|c| DbtColumn {
                    name: c.name.clone(),
                    description: c.description.clone(),
                    data_type: c.data_type.clone(),
                })
                .collect(),
        }
    }
}

/// A key written as a column or a list of columns.
fn columns_of(value: &Value) -> Option<Vec<String>> {
    match value {
        Value::String(column) if !column.trim().is_empty() => Some(vec![column.trim().to_string()]),
        Value::Array(items) => {
            let columns: Vec<String> = items
                .iter()
                .filter_map(Value::as_str)
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect();
            (!columns.is_empty() && columns.len() == items.len()).then_some(columns)
        }
        _ => None,
    }
}

/// Reads a manifest from object storage.
pub async fn read_manifest(config: &DbtConfig) -> Result<bytes::Bytes, String> {
    let location = config.manifest_location().unwrap_or_default();
    read_artifact(config, location, std::path::Path::new("."))
        .await?
        .ok_or_else(|| format!("`{}` does not exist", crate::secrets::shown_location(location)))
}

/// Whether `location` is an object-store URL (not a local path).
fn is_url(location: &str) -> bool {
    location.contains("://") && !location.starts_with("file://")
}

/// Where a dbt artifact is: a local file, or an object in a store.
enum Artifact {
    Local(std::path::PathBuf),
    Remote(sluice_snapshots::OpenedStore),
}

/// `location`: a path (relative to `base_dir`) or an object-store URL opened with the `dbt:`
/// section's options.
fn locate(config: &DbtConfig, location: &str, base_dir: &std::path::Path) -> Result<Artifact, String> {
    if !is_url(location) {
        return Ok(Artifact::Local(
            base_dir.join(location.strip_prefix("file://").unwrap_or(location)),
        ));
    }
    let shown = crate::secrets::shown_location(location);
    let url = url::Url::parse(location).map_err(|e| format!("`{shown}` is not a URL: {e}"))?;
    let options = config
        .options
        .iter()
        .map(|(k, v)| (k.clone(), v.expose().to_string()));
    sluice_snapshots::open_store(&url, options)
        .map(Artifact::Remote)
        .map_err(|e| format!("`{shown}`: {e}"))
}

/// A dbt artifact's bytes (see [`locate`]); `None` when it does not exist.
pub async fn read_artifact(
    config: &DbtConfig,
    location: &str,
    base_dir: &std::path::Path,
) -> Result<Option<bytes::Bytes>, String> {
    use object_store::ObjectStoreExt;
    let shown = crate::secrets::shown_location(location);
    match locate(config, location, base_dir)? {
        Artifact::Local(path) => match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(Some(bytes.into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        },
        Artifact::Remote(opened) => match opened.store.get(&opened.prefix).await {
            Ok(got) => got
                .bytes()
                .await
                .map(Some)
                .map_err(|e| format!("cannot read `{shown}`: {e}")),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(format!("cannot read `{shown}`: {e}")),
        },
    }
}

/// What changes when a dbt artifact is written again (a local file's modification time and
/// size, an object's ETag, modification time and size): looked at before reading it. `None`
/// when it does not exist.
pub async fn artifact_stamp(
    config: &DbtConfig,
    location: &str,
    base_dir: &std::path::Path,
) -> Result<Option<String>, String> {
    use object_store::ObjectStoreExt;
    let shown = crate::secrets::shown_location(location);
    match locate(config, location, base_dir)? {
        Artifact::Local(path) => match tokio::fs::metadata(&path).await {
            Ok(meta) => {
                let modified = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_nanos())
                    .unwrap_or_default();
                Ok(Some(format!("{modified}:{}", meta.len())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        },
        Artifact::Remote(opened) => match opened.store.head(&opened.prefix).await {
            Ok(meta) => Ok(Some(format!(
                "{}:{}:{}",
                meta.e_tag.unwrap_or_default(),
                meta.last_modified.to_rfc3339(),
                meta.size
            ))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(format!("cannot read `{shown}`: {e}")),
        },
    }
}

/// The name of the event a successful run of dbt Cloud job `job` (its id or its name) records,
/// for `after_dbt: {jobs: [...]}`.
pub fn job_event(job: &str) -> String {
    format!("dbt_job:{job}")
}

/// The event any successful dbt Cloud job run records.
pub const ANY_JOB_EVENT: &str = "dbt_job:*";

/// The event a dbt invocation records for a node it built, and whose tests it ran passed.
pub fn node_event(unique_id: &str) -> String {
    format!("dbt_node:{unique_id}")
}

/// The events an `after_dbt:` schedule waits for: any of them newer than the mapping's last
/// start makes it due. With `jobs`, those dbt Cloud jobs' successes; without, any dbt Cloud
/// job's success, and a build of any dbt model the mapping's model reads (`reads`).
pub fn events_of(jobs: &[String], reads: &[DbtModel]) -> Vec<String> {
    if !jobs.is_empty() {
        return jobs.iter().map(|job| job_event(job)).collect();
    }
    let mut events = vec![ANY_JOB_EVENT.to_string()];
    events.extend(reads.iter().map(|model| node_event(&model.unique_id)));
    events.sort();
    events.dedup();
    events
}

/// The parts of a dbt `run_results.json` sluice reads.
#[derive(Debug, Clone, Deserialize)]
pub struct RunResults {
    pub metadata: RunResultsMetadata,
    #[serde(default)]
    pub results: Vec<NodeResult>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RunResultsMetadata {
    /// When the invocation wrote the file, at its end (RFC 3339).
    pub generated_at: String,
    #[serde(default)]
    pub invocation_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NodeResult {
    pub unique_id: String,
    /// `success`, `error` or `skipped` for models, seeds and snapshots; `pass`, `fail`,
    /// `warn`, `error` or `skipped` for tests.
    pub status: String,
}

impl RunResults {
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("not a dbt run_results.json sluice can read: {e}"))
    }

    /// When the invocation finished.
    pub fn finished_at(&self) -> Result<chrono::DateTime<chrono::Utc>, String> {
        chrono::DateTime::parse_from_rfc3339(&self.metadata.generated_at)
            .map(|t| t.with_timezone(&chrono::Utc))
            .map_err(|e| {
                format!(
                    "run_results.json: `generated_at` {:?} is not a time: {e}",
                    self.metadata.generated_at
                )
            })
    }

    /// The relations this invocation built and whose tests in it did not fail (a table whose
    /// `unique` test failed is not one to sync): `success` models, seeds and snapshots with no
    /// `fail` or `error` among the tests `manifest` attaches to them.
    pub fn built(&self, manifest: &Manifest) -> Vec<String> {
        let failed_tests: std::collections::HashSet<&str> = self
            .results
            .iter()
            .filter(|r| r.unique_id.starts_with("test.") && matches!(r.status.as_str(), "fail" | "error"))
            .filter_map(|r| manifest.nodes.get(&r.unique_id)?.attached_node.as_deref())
            .collect();
        let mut built: Vec<String> = self
            .results
            .iter()
            .filter(|r| r.status == "success")
            .filter(|r| {
                RELATIONS
                    .iter()
                    .any(|kind| r.unique_id.starts_with(&format!("{kind}.")))
            })
            .filter(|r| !failed_tests.contains(r.unique_id.as_str()))
            .map(|r| r.unique_id.clone())
            .collect();
        built.sort();
        built.dedup();
        built
    }
}

/// A dbt Cloud webhook event (`job.run.started`, `job.run.completed`, `job.run.errored`), as
/// docs.getdbt.com/docs/deploy/webhooks gives its shape.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudEvent {
    pub event_id: String,
    pub event_type: String,
    /// When dbt Cloud sent it (RFC 3339).
    #[serde(default)]
    pub timestamp: Option<String>,
    pub data: CloudRun,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudRun {
    pub job_id: Value,
    #[serde(default)]
    pub job_name: Option<String>,
    #[serde(default)]
    pub run_id: Option<Value>,
    /// `Success`, `Errored`, `Cancelled` (or `Running` when started).
    #[serde(default)]
    pub run_status: Option<String>,
    /// 10 success, 20 error, 30 cancelled.
    #[serde(default)]
    pub run_status_code: Option<i64>,
    #[serde(default)]
    pub run_finished_at: Option<String>,
}

/// The `runStatusCode` of a successful dbt Cloud run.
const CLOUD_SUCCESS: i64 = 10;

impl CloudEvent {
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes)
            .map_err(|e| format!("not a dbt Cloud job webhook event (eventId, eventType, data.jobId): {e}"))
    }

    /// The job's id as text (dbt Cloud sends it as a string; a number is taken too).
    pub fn job_id(&self) -> String {
        match &self.data.job_id {
            Value::String(id) => id.clone(),
            other => other.to_string(),
        }
    }

    /// Whether this says a job run completed successfully (`job.run.completed` with status
    /// `Success`); `Err` says why not.
    pub fn succeeded(&self) -> Result<(), String> {
        if self.event_type != "job.run.completed" {
            return Err(format!(
                "`{}` events start nothing; subscribe the webhook to job.run.completed",
                self.event_type
            ));
        }
        let success = self.data.run_status_code == Some(CLOUD_SUCCESS)
            || self
                .data
                .run_status
                .as_deref()
                .is_some_and(|s| s.eq_ignore_ascii_case("success"));
        if !success {
            return Err(format!(
                "dbt Cloud run {} of job {} did not succeed ({}); nothing starts",
                self.data
                    .run_id
                    .as_ref()
                    .map(|r| r.as_str().map(str::to_string).unwrap_or_else(|| r.to_string()))
                    .unwrap_or_else(|| "?".into()),
                self.job_id(),
                self.data.run_status.as_deref().unwrap_or("no status")
            ));
        }
        Ok(())
    }

    /// When the run finished (its `runFinishedAt`, else the event's `timestamp`), never later
    /// than `now` (a clock ahead of ours would keep the mapping due).
    pub fn finished_at(&self, now: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
        [&self.data.run_finished_at, &self.timestamp]
            .into_iter()
            .flatten()
            .find_map(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&chrono::Utc).min(now))
            .unwrap_or(now)
    }

    /// The events this success records: the job's id, its name, and any job.
    pub fn events(&self) -> Vec<String> {
        let mut events = vec![job_event(&self.job_id()), ANY_JOB_EVENT.to_string()];
        if let Some(name) = self.data.job_name.as_deref().filter(|n| !n.trim().is_empty()) {
            events.push(job_event(name.trim()));
        }
        events
    }
}

/// Whether `authorization` (the webhook's `Authorization` header) is the hex HMAC-SHA256 of
/// `body` under `secret`, as dbt Cloud signs its webhooks. Compared in constant time.
pub fn signature_is_valid(secret: &str, body: &[u8], authorization: &str) -> bool {
    let Some(signature) = decode_hex(authorization.trim()) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    ring::hmac::verify(&key, body, &signature).is_ok()
}

/// The hex HMAC-SHA256 of `body` under `secret` (what dbt Cloud sends; for tests and tools).
pub fn sign(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    crate::secrets::hex(ring::hmac::sign(&key, body).as_ref())
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

impl DbtModel {
    /// The model's package (from its unique id `<type>.<package>.<name>`).
    pub fn package(&self) -> &str {
        self.unique_id.split('.').nth(1).unwrap_or_default()
    }
}

/// A dbt `exposures:` document (YAML) declaring each mapping as an exposure that depends on the
/// dbt models it reads, so dbt's lineage shows where each model goes. `mappings` holds, for
/// each mapping, its name, its destination and what it describes, and the dbt models it reads.
pub fn exposures_yaml(
    root_project: Option<&str>,
    mappings: &[(String, String, String, Vec<DbtModel>)],
) -> String {
    let quote = |text: &str| serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into());
    let mut out = String::from(
        "# Written by `sluice dbt exposures`: each sluice mapping that reads a dbt model, so dbt's\n# lineage shows where the model goes. Written again by the command; edit sluice.yaml instead.\nversion: 2\nexposures:\n",
    );
    for (mapping, destination, description, models) in mappings {
        // Exposure names are letters, digits and underscores.
        let name: String = format!("sluice_{mapping}")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        out.push_str(&format!("  - name: {name}\n"));
        out.push_str(&format!("    label: {}\n", quote(&format!("sluice: {mapping}"))));
        out.push_str("    type: application\n");
        out.push_str("    owner:\n      name: sluice\n");
        out.push_str(&format!("    description: {}\n", quote(description)));
        out.push_str("    depends_on:\n");
        let mut seen = std::collections::BTreeSet::new();
        for model in models {
            let reference = if Some(model.package()) == root_project || model.package().is_empty() {
                format!("ref('{}')", model.name)
            } else {
                format!("ref('{}', '{}')", model.package(), model.name)
            };
            if seen.insert(reference.clone()) {
                out.push_str(&format!("      - {reference}\n"));
            }
        }
        out.push_str(&format!(
            "    meta:\n      sluice_mapping: {}\n      sluice_destination: {}\n",
            quote(mapping),
            quote(destination)
        ));
    }
    out
}

/// Whether `sql` holds a `{{ ref(...) }}`.
pub fn has_refs(sql: &str) -> bool {
    render_refs(sql, |_| Ok(String::new())).is_ok_and(|rendered| rendered != sql)
}

/// Replaces `{{ ref(...) }}` in `sql` with what `relation` gives for each reference.
fn render_refs(sql: &str, relation: impl Fn(&str) -> Result<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(open) = rest.find("{{") {
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            break;
        };
        let inside = after[..close].trim();
        let Some(arguments) = inside
            .strip_prefix("ref")
            .map(str::trim_start)
            .and_then(|a| a.strip_prefix('('))
            .and_then(|a| a.trim_end().strip_suffix(')'))
        else {
            // Not a ref: sluice's own variables are rendered later.
            out.push_str(&rest[..open + 2 + close + 2]);
            rest = &after[close + 2..];
            continue;
        };
        let names: Vec<&str> = arguments
            .split(',')
            .map(|a| a.trim().trim_matches(|c| c == '\'' || c == '"'))
            .collect();
        let reference = match names.as_slice() {
            [name] if !name.is_empty() => name.to_string(),
            [package, name] if !package.is_empty() && !name.is_empty() => format!("{package}.{name}"),
            _ => {
                return Err(format!(
                    "`{{{{ {inside} }}}}`: write `ref('model')` or `ref('package', 'model')`"
                ));
            }
        };
        out.push_str(&rest[..open]);
        out.push_str(&relation(&reference)?);
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A manifest in the shape dbt 1.11 writes (trimmed to what sluice reads, plus some of
    /// what it skips).
    fn manifest(extra_nodes: Value) -> Manifest {
        let mut nodes = json!({
            "model.shop.customers": {
                "unique_id": "model.shop.customers", "name": "customers", "resource_type": "model",
                "package_name": "shop", "relation_name": "\"test\".\"analytics\".\"customers\"",
                "database": "test", "schema": "analytics", "alias": "customers",
                "raw_code": "select ...", "config": {"materialized": "table", "meta": {}},
                "description": "One row per customer", "meta": {},
                "columns": {"id": {"name": "id", "description": "The key", "data_type": null, "constraints": []},
                            "email": {"name": "email", "description": "", "constraints": []}},
                "constraints": []
            },
            "model.shop.eph": {
                "unique_id": "model.shop.eph", "name": "eph", "resource_type": "model",
                "package_name": "shop", "relation_name": null, "config": {"materialized": "ephemeral"}
            },
            "test.shop.unique_customers_id.70f3d3fd20": {
                "unique_id": "test.shop.unique_customers_id.70f3d3fd20", "name": "unique_customers_id",
                "resource_type": "test", "package_name": "shop", "attached_node": "model.shop.customers",
                "column_name": "id", "test_metadata": {"name": "unique", "kwargs": {"column_name": "id"}},
                "config": {"materialized": "test"}
            }
        });
        if let (Some(nodes), Value::Object(extra)) = (nodes.as_object_mut(), extra_nodes) {
            nodes.extend(extra);
        }
        let document = json!({
            "metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json",
                         "dbt_version": "1.11.16", "generated_at": "2026-12-06T07:47:22.087786Z",
                         "project_name": "shop", "adapter_type": "postgres"},
            "nodes": nodes,
            "sources": {}, "macros": {}, "exposures": {},
            "disabled": {"model.shop.old": [{"unique_id": "model.shop.old", "name": "old",
                          "resource_type": "model", "package_name": "shop", "config": {"materialized": "table"}}]}
        });
        Manifest::parse(document.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn a_model_is_its_relation_with_the_key_of_its_unique_test() {
        let model = manifest(json!({})).model("customers").unwrap();
        assert_eq!(model.relation, "\"test\".\"analytics\".\"customers\"");
        assert_eq!(
            model.primary_key,
            Some((vec!["id".to_string()], "its `unique` test on `id`".to_string()))
        );
        assert_eq!(model.description, "One row per customer");
        assert_eq!(
            model.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["id", "email"]
        );
        assert_eq!(manifest(json!({})).model("shop.customers").unwrap(), model);
    }

    #[test]
    fn missing_ephemeral_and_disabled_models_are_explained() {
        let m = manifest(json!({}));
        let missing = m.model("custmers").unwrap_err();
        assert!(
            missing.contains("not in the manifest") && missing.contains("customers"),
            "{missing}"
        );
        let ephemeral = m.model("eph").unwrap_err();
        assert!(
            ephemeral.contains("ephemeral") && ephemeral.contains("materialized='view'"),
            "{ephemeral}"
        );
        let disabled = m.model("old").unwrap_err();
        assert!(disabled.contains("disabled"), "{disabled}");
    }

    #[test]
    fn the_key_comes_from_meta_constraints_tests_or_unique_key_in_that_order() {
        let node = |id: &str, extra: Value| {
            let mut node = json!({
                "unique_id": format!("model.shop.{id}"), "name": id, "resource_type": "model",
                "package_name": "shop", "relation_name": format!("\"test\".\"a\".\"{id}\""),
                "config": {"materialized": "table"}
            });
            if let (Some(node), Value::Object(extra)) = (node.as_object_mut(), extra) {
                node.extend(extra);
            }
            node
        };
        let key = |m: &Manifest, name: &str| m.model(name).unwrap().primary_key.map(|(k, _)| k);
        let m = manifest(json!({
            "model.shop.by_meta": node("by_meta", json!({"meta": {"primary_key": ["a", "b"]}})),
            "model.shop.by_constraint": node("by_constraint", json!({"constraints": [{"type": "primary_key", "columns": ["k"]}]})),
            "model.shop.by_column": node("by_column", json!({"columns": {"c": {"name": "c", "constraints": [{"type": "primary_key"}]}}})),
            "model.shop.incremental": node("incremental", json!({"config": {"materialized": "incremental", "unique_key": "order_id"}})),
            "model.shop.nothing": node("nothing", json!({})),
        }));
        assert_eq!(key(&m, "by_meta"), Some(vec!["a".into(), "b".into()]));
        assert_eq!(key(&m, "by_constraint"), Some(vec!["k".into()]));
        assert_eq!(key(&m, "by_column"), Some(vec!["c".into()]));
        assert_eq!(key(&m, "incremental"), Some(vec!["order_id".into()]));
        assert_eq!(key(&m, "nothing"), None);
    }

    #[test]
    fn several_unique_tests_need_not_null_to_decide() {
        let test = |column: &str, which: &str| {
            json!({
                "unique_id": format!("test.shop.{which}_customers_{column}"), "name": format!("{which}_{column}"),
                "resource_type": "test", "package_name": "shop", "attached_node": "model.shop.customers",
                "column_name": column, "test_metadata": {"name": which, "kwargs": {}}
            })
        };
        let m = manifest(json!({"test.shop.unique_customers_email": test("email", "unique")}));
        let ambiguous = m.model("customers").unwrap_err();
        assert!(ambiguous.contains("email, id"), "{ambiguous}");
        let m = manifest(json!({
            "test.shop.unique_customers_email": test("email", "unique"),
            "test.shop.not_null_customers_id": test("id", "not_null"),
        }));
        assert_eq!(
            m.model("customers").unwrap().primary_key.map(|(k, _)| k),
            Some(vec!["id".into()])
        );
    }

    #[test]
    fn refs_in_sql_become_relations_and_other_variables_stay() {
        let m = manifest(json!({}));
        assert_eq!(
            m.render_refs("select * from {{ ref('customers') }} c join {{ref(\"shop\", \"customers\")}} d on true where t > {{ last_sync_time }}")
                .unwrap()
                .0,
            "select * from \"test\".\"analytics\".\"customers\" c join \"test\".\"analytics\".\"customers\" d on true where t > {{ last_sync_time }}"
        );
        assert!(
            m.render_refs("select * from {{ ref('nope') }}")
                .unwrap_err()
                .contains("not in the manifest")
        );
        assert!(has_refs("select {{ ref('x') }}"));
        assert!(!has_refs("select {{ last_sync_time }}"));
    }

    /// dbt Cloud's example `job.run.completed` body (docs.getdbt.com/docs/deploy/webhooks).
    const COMPLETED: &str = r#"{
      "accountId": 1, "webhooksID": "wsu_12345abcde", "eventId": "wev_2L6ZDoilyiWzKkSA59Gmc2d7FDD",
      "timestamp": "2023-01-31T19:29:35.789265936Z", "eventType": "job.run.completed", "webhookName": "test",
      "data": {"jobId": "123", "jobName": "Daily Job (dbt build)", "runId": "12345", "environmentId": "1234",
               "environmentName": "Production", "dbtVersion": "1.0.0", "projectName": "Snowflake Github Demo",
               "projectId": "167194", "runStatus": "Success", "runStatusCode": 10, "runStatusMessage": "None",
               "runReason": "Kicked off from UI by test@test.com", "runStartedAt": "2023-01-31T19:28:07Z",
               "runFinishedAt": "2023-01-31T19:29:32Z"}
    }"#;

    #[test]
    fn webhook_signatures_are_hmac_sha256_in_hex() {
        // RFC 4231, test case 2.
        assert_eq!(
            sign("Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let body = COMPLETED.as_bytes();
        let signature = sign("whsec-for-tests", body);
        assert!(signature_is_valid("whsec-for-tests", body, &signature));
        assert!(signature_is_valid(
            "whsec-for-tests",
            body,
            &signature.to_uppercase()
        ));
        assert!(!signature_is_valid("another-secret", body, &signature));
        assert!(!signature_is_valid("whsec-for-tests", b"{}", &signature));
        assert!(!signature_is_valid("whsec-for-tests", body, "not hex"));
        assert!(!signature_is_valid("whsec-for-tests", body, ""));
        assert!(!signature_is_valid(
            "whsec-for-tests",
            body,
            &format!("Bearer {signature}")
        ));
    }

    #[test]
    fn cloud_events_say_which_jobs_succeeded() {
        let event = CloudEvent::parse(COMPLETED.as_bytes()).unwrap();
        assert!(event.succeeded().is_ok());
        assert_eq!(event.job_id(), "123");
        assert_eq!(
            event.events(),
            ["dbt_job:123", "dbt_job:*", "dbt_job:Daily Job (dbt build)"]
        );
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(event.finished_at(now).to_rfc3339(), "2023-01-31T19:29:32+00:00");
        // A clock ahead of ours is taken as now.
        let past = chrono::DateTime::parse_from_rfc3339("2020-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(event.finished_at(past), past);

        let errored = COMPLETED
            .replace("\"Success\"", "\"Errored\"")
            .replace("\"runStatusCode\": 10", "\"runStatusCode\": 20");
        let errored = CloudEvent::parse(errored.as_bytes()).unwrap();
        assert!(
            errored
                .succeeded()
                .unwrap_err()
                .contains("did not succeed (Errored)")
        );
        let started = COMPLETED.replace("job.run.completed", "job.run.started");
        let started = CloudEvent::parse(started.as_bytes()).unwrap();
        assert!(started.succeeded().unwrap_err().contains("job.run.completed"));
        assert!(
            CloudEvent::parse(b"{\"hello\": 1}")
                .unwrap_err()
                .contains("eventId")
        );
    }

    #[test]
    fn run_results_name_the_relations_built_with_passing_tests() {
        let manifest = manifest(json!({
            "model.shop.orders": {
                "unique_id": "model.shop.orders", "name": "orders", "resource_type": "model",
                "package_name": "shop", "relation_name": "\"test\".\"analytics\".\"orders\"",
                "config": {"materialized": "table"}
            },
            "test.shop.unique_orders_id.1": {
                "unique_id": "test.shop.unique_orders_id.1", "name": "unique_orders_id",
                "resource_type": "test", "package_name": "shop", "attached_node": "model.shop.orders",
                "column_name": "id", "test_metadata": {"name": "unique", "kwargs": {}}
            }
        }));
        let results = RunResults::parse(
            json!({
                "metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/run-results/v6.json",
                             "dbt_version": "1.11.16", "generated_at": "2026-12-06T10:00:01.5Z",
                             "invocation_id": "8c2f"},
                "results": [
                    {"unique_id": "model.shop.customers", "status": "success", "timing": [], "thread_id": "Thread-1"},
                    {"unique_id": "test.shop.unique_customers_id.70f3d3fd20", "status": "pass"},
                    {"unique_id": "model.shop.orders", "status": "success"},
                    {"unique_id": "test.shop.unique_orders_id.1", "status": "fail"},
                    {"unique_id": "seed.shop.plans", "status": "success"},
                    {"unique_id": "model.shop.late", "status": "skipped"}
                ],
                "elapsed_time": 1.2, "args": {"which": "build"}
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            results.finished_at().unwrap().to_rfc3339(),
            "2026-12-06T10:00:01.500+00:00"
        );
        assert_eq!(
            results.built(&manifest),
            ["model.shop.customers", "seed.shop.plans"]
        );
    }

    #[test]
    fn the_models_a_sluice_model_can_read_are_listed_with_their_keys() {
        let listed = manifest(json!({})).models();
        let names: Vec<&str> = listed.iter().map(|(m, _)| m.name.as_str()).collect();
        assert_eq!(
            names,
            ["customers"],
            "the ephemeral model and the test are left out"
        );
        let (customers, problem) = &listed[0];
        assert_eq!(
            customers.primary_key.as_ref().map(|k| k.0.clone()),
            Some(vec!["id".to_string()])
        );
        assert_eq!(problem, &None);
        assert_eq!(customers.columns.len(), 2);
    }

    #[test]
    fn after_dbt_waits_for_the_jobs_named_or_the_models_read() {
        let customers = manifest(json!({})).model("customers").unwrap();
        assert_eq!(
            events_of(&[], std::slice::from_ref(&customers)),
            ["dbt_job:*", "dbt_node:model.shop.customers"]
        );
        assert_eq!(events_of(&["7".into()], &[customers]), ["dbt_job:7"]);
        let config = DbtConfig {
            manifest: Some(crate::config::ConfigString::literal("dbt/target/manifest.json")),
            options: Default::default(),
            run_results: None,
            webhook_secret: None,
        };
        assert_eq!(
            config.run_results_location().as_deref(),
            Some("dbt/target/run_results.json")
        );
    }
}
