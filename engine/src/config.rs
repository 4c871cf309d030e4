//! `sluice.yaml`: sources, models, destinations and mappings as code.
//!
//! Parsing is strict (unknown keys are errors, with the line where serde can give it) and every
//! cross-reference is checked before anything runs. Secrets are `${ENV_VAR}` references, resolved
//! when the file is loaded into [`ConfigString`]s, which never print the resolved value.

use std::fmt;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

pub use crate::destination::{SyncMode, ValueFormat};
use crate::error::ConfigError;
pub use crate::model::Limits;
pub use crate::schedule::Schedule;

/// A whole project file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    /// Where the metadata store and the default snapshot store live, relative to the file.
    #[serde(default = "default_state_dir")]
    pub state_dir: String,
    /// Snapshot store location: a local path or an object_store URL (`s3://bucket/prefix`, ...).
    /// Defaults to `<state_dir>/snapshots`.
    #[serde(default)]
    pub snapshot_store: Option<ConfigString>,
    /// Options for the snapshot store's object_store builder (region, endpoint, credentials).
    #[serde(default)]
    pub snapshot_store_options: IndexMap<String, ConfigString>,
    /// Metadata store: a `postgres://` URL for several machines sharing one state (with a
    /// shared `snapshot_store`). Defaults to SQLite at `<state_dir>/sluice.db`.
    #[serde(default)]
    pub metadata_store: Option<ConfigString>,
    /// How long a run's claim on its mapping (its lease) outlives the last renewal: when a
    /// machine running a mapping dies, another takes the mapping over after this. Renewed every
    /// third of it. Every process sharing a metadata store should use the same value.
    #[serde(default = "default_lease_ttl", deserialize_with = "lease_ttl")]
    pub lease_ttl: std::time::Duration,
    #[serde(default)]
    pub sources: IndexMap<String, ConnectorConfig>,
    #[serde(default)]
    pub models: IndexMap<String, ModelConfig>,
    #[serde(default)]
    pub destinations: IndexMap<String, ConnectorConfig>,
    #[serde(default)]
    pub mappings: IndexMap<String, MappingConfig>,
    /// Guards on models and records (see [`Limits`]).
    #[serde(default)]
    pub limits: Limits,
    /// The HTTP API of `sluice serve`: its tokens.
    #[serde(default)]
    pub api: crate::tokens::ApiConfig,
    /// Where the diff runs: in this process (default) or on a Ballista cluster.
    #[serde(default)]
    pub diff: DiffConfig,
    /// A dbt project whose models sluice models may name (`dbt_model:`) and `ref()`.
    #[serde(default)]
    pub dbt: Option<crate::dbt::DbtConfig>,
}

/// `diff:` — which engine executes the diff of each bucket.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiffConfig {
    #[serde(default)]
    pub engine: DiffEngineKind,
    /// A Ballista scheduler (`df://host:50050`); with `engine: ballista` and no scheduler, an
    /// in-process scheduler and executor (standalone mode).
    #[serde(default)]
    pub scheduler: Option<ConfigString>,
    /// Partitions a bucket's join is split into on the cluster (default: 2 per executor core of
    /// the standalone executor, or 16 on a remote cluster).
    #[serde(default)]
    pub partitions: Option<usize>,
}

/// The engine a diff runs on.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DiffEngineKind {
    /// DataFusion in this process: a streaming sort-merge join per bucket.
    #[default]
    Local,
    /// The same diff submitted to a Ballista scheduler, executed by its executors.
    Ballista,
}

fn default_state_dir() -> String {
    ".sluice".to_string()
}

/// A source or destination: its `type` and the type's own options, which the connector that
/// implements the type parses (strictly) when the project is opened.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectorConfig {
    pub kind: String,
    pub options: serde_json::Map<String, serde_json::Value>,
}

impl<'de> Deserialize<'de> for ConnectorConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut options = serde_json::Map::<String, serde_json::Value>::deserialize(deserializer)?;
        let kind = match options.remove("type") {
            Some(serde_json::Value::String(kind)) => kind,
            Some(other) => {
                return Err(de::Error::custom(format!("`type` must be a string, got {other}")));
            }
            None => return Err(de::Error::missing_field("type")),
        };
        Ok(Self { kind, options })
    }
}

/// A model: a query against a source, with a primary key.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub source: String,
    /// The query; or, with `dbt_model`, none (sluice selects from the model's relation).
    #[serde(default)]
    pub sql: String,
    /// A model of the project's dbt manifest (`name` or `package.name`) to read instead of
    /// `sql`: its relation, with its key from dbt when `primary_key` is not given.
    #[serde(default)]
    pub dbt_model: Option<String>,
    /// `snapshot` (default): rows diffed against what each mapping last sent; `events`: each
    /// row is one event, sent once.
    #[serde(default)]
    pub kind: ModelKind,
    /// Required for snapshot models; an events model defaults to its `message_id` column.
    #[serde(default)]
    pub primary_key: PrimaryKey,
    #[serde(default)]
    pub description: Option<String>,
    /// Overrides `limits.max_records_per_run` for this model.
    #[serde(default)]
    pub max_records_per_run: Option<u64>,
    /// When this model's mappings run, unless a mapping has its own `schedule`.
    #[serde(default)]
    pub schedule: Option<Schedule>,
    /// How many of this model's snapshots are kept (see [`Retention`]).
    #[serde(default)]
    pub retain: Retention,
}

/// Which snapshots of a model are kept: the latest `runs`, and any younger than `days`. A
/// snapshot some mapping still uses as its baseline, or that holds rows of records awaiting
/// retry, is kept regardless. Default: the latest 10.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Retention {
    #[serde(default, deserialize_with = "at_least_one")]
    pub runs: Option<u32>,
    #[serde(default)]
    pub days: Option<u32>,
    /// What a writer that died left behind (data of a snapshot no manifest commits, multipart
    /// uploads never completed) is removed once this old: longer than the model's longest
    /// extraction, since another process may be writing it. Default 2 days.
    #[serde(default = "default_abandoned_after", deserialize_with = "duration_text")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "2d"))]
    pub abandoned_after: std::time::Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            runs: Some(10),
            days: None,
            abandoned_after: default_abandoned_after(),
        }
    }
}

fn default_abandoned_after() -> std::time::Duration {
    std::time::Duration::from_secs(2 * 24 * 3600)
}

/// A duration written as text: `90s`, `30m`, `2d`.
fn duration_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<std::time::Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(text.trim()).map_err(|_| {
        de::Error::custom(format!(
            "`{text}` is not a duration (write it like 90s, 30m or 2d)"
        ))
    })
}

fn default_lease_ttl() -> std::time::Duration {
    crate::metadata::DEFAULT_LEASE_TTL
}

/// The shortest `lease_ttl`: a lease must survive a slow metadata-store round trip or two.
const MIN_LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(10);

fn lease_ttl<'de, D: Deserializer<'de>>(deserializer: D) -> Result<std::time::Duration, D::Error> {
    let ttl = duration_text(deserializer)?;
    if ttl < MIN_LEASE_TTL {
        return Err(de::Error::custom(format!(
            "lease_ttl must be at least {}s: a shorter lease could lapse while its holder is alive",
            MIN_LEASE_TTL.as_secs()
        )));
    }
    Ok(ttl)
}

fn at_least_one<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    let runs = Option::<u32>::deserialize(deserializer)?;
    if runs == Some(0) {
        return Err(de::Error::custom(
            "retain.runs must be at least 1 (the latest snapshot is always kept)",
        ));
    }
    Ok(runs)
}

/// What a model's rows are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// The current state of some entities: each run sends what changed since the last.
    #[default]
    Snapshot,
    /// Immutable events: each row is sent once, as `added`. The SQL selects a window with
    /// `{{last_sync_time}}`; rows a buffered window returns again are not sent again.
    Events,
}

/// The column an events model is keyed by when it names no primary key.
pub const EVENT_ID_COLUMN: &str = "message_id";

/// One column or a list of columns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrimaryKey(pub Vec<String>);

impl<'de> Deserialize<'de> for PrimaryKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        match OneOrMany::deserialize(deserializer)
            .map_err(|_| de::Error::custom("primary_key must be a column name or a list of column names"))?
        {
            OneOrMany::One(column) => Ok(Self(vec![column])),
            OneOrMany::Many(columns) => Ok(Self(columns)),
        }
    }
}

/// Which diff results a mapping sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Op {
    Added = 1,
    Updated = 2,
    Deleted = 3,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Added => "added",
            Op::Updated => "updated",
            Op::Deleted => "deleted",
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Op::Added),
            2 => Some(Op::Updated),
            3 => Some(Op::Deleted),
            _ => None,
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "added" => Some(Op::Added),
            "updated" => Some(Op::Updated),
            "deleted" => Some(Op::Deleted),
            _ => None,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A mapping: which records of a model go to which destination, with which fields.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    pub model: String,
    pub destination: String,
    /// What the destination writes (`identify`, `track`, `upsert`, ...), for destinations that
    /// offer several; each destination documents its actions and its default.
    #[serde(default)]
    pub action: Option<String>,
    /// How records the destination already has are treated: `upsert` (default), `update`,
    /// `insert` or `mirror`, where the destination's action supports it.
    #[serde(default)]
    pub mode: Option<SyncMode>,
    /// Which changes to send. Defaults: every kind for destinations that take sluice's envelope;
    /// otherwise by `mode` (`upsert`/`update`: added and updated; `insert`: added; `mirror`:
    /// all three); `added` for an events model.
    #[serde(default, rename = "send")]
    send_option: Option<Vec<Op>>,
    #[serde(skip)]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub send: Vec<Op>,
    /// Destination field <- model column (or `{column: c, as: json|string|unix_ms|unix_seconds|rfc3339|sha256…}`).
    /// Dotted destination names nest.
    #[serde(default)]
    pub fields: Option<IndexMap<String, FieldSpec>>,
    /// Which model columns are sent under their own names besides `fields`: `all` (the
    /// default when `fields` is not given), `{include: [..]}` or `{exclude: [..]}`.
    #[serde(default)]
    pub columns: Option<ColumnSelection>,
    /// Destination field <- constant value (any YAML scalar, list or map). Dotted names nest.
    #[serde(default)]
    pub constants: IndexMap<String, serde_json::Value>,
    /// Settings of this mapping that belong to its destination type (HubSpot's object type,
    /// a database table, ...), documented per destination.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub options: serde_json::Map<String, serde_json::Value>,
    /// When the mapping runs (default: its model's schedule, else manual).
    #[serde(default)]
    pub schedule: Option<Schedule>,
    /// A disabled mapping does not run; when enabled again, its next run sends everything that
    /// changed since its last successful run.
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// Where and when to notify about this mapping's runs.
    #[serde(default)]
    pub alerts: Option<crate::alerts::AlertConfig>,
}

fn enabled_by_default() -> bool {
    true
}

impl MappingConfig {
    /// Sets `send` from what the file said, or the default for destinations that take sluice's
    /// envelope. [`Self::resolve_send_for`] refines it once the destination's action is known.
    pub fn resolve_send(&mut self, events_model: bool) {
        self.send = match &self.send_option {
            Some(send) => send.clone(),
            None if events_model => vec![Op::Added],
            None => all_ops(),
        };
    }

    /// Sets `send` from what the file said, or the default for `mode` of an action.
    pub fn resolve_send_for(&mut self, events_model: bool, events_action: bool, mode: SyncMode) {
        self.send = match &self.send_option {
            Some(send) => send.clone(),
            None if events_model || events_action => vec![Op::Added],
            None => mode.default_send(),
        };
    }

    /// Whether `send:` was written in the file.
    pub fn send_given(&self) -> bool {
        self.send_option.is_some()
    }

    /// The columns sent under their own names, resolved against the default.
    pub fn column_selection(&self) -> ColumnSelection {
        match (&self.columns, &self.fields) {
            (Some(selection), _) => selection.clone(),
            (None, None) => ColumnSelection::All,
            (None, Some(_)) => ColumnSelection::Include(Vec::new()),
        }
    }
}

/// A mapped field's source: a model column, and how its value is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldSpec {
    pub column: String,
    pub format: Option<ValueFormat>,
}

impl FieldSpec {
    pub fn column(column: impl Into<String>) -> Self {
        Self {
            column: column.into(),
            format: None,
        }
    }
}

impl<'de> Deserialize<'de> for FieldSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            column: String,
            #[serde(rename = "as")]
            format: Option<ValueFormat>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Column(String),
            Full(Full),
        }
        match Either::deserialize(deserializer).map_err(|_| {
            de::Error::custom(
                "a field maps a model column: `field: column`, or `field: {column: c, as: json|string|unix_ms|unix_seconds|rfc3339|sha256…}`",
            )
        })? {
            Either::Column(column) => Ok(Self::column(column)),
            Either::Full(full) => Ok(Self {
                column: full.column,
                format: full.format,
            }),
        }
    }
}

/// Model columns a mapping sends under their own names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnSelection {
    All,
    Include(Vec<String>),
    Exclude(Vec<String>),
}

impl<'de> Deserialize<'de> for ColumnSelection {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "lowercase")]
        enum List {
            Include(Vec<String>),
            Exclude(Vec<String>),
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Word(String),
            List(List),
        }
        let message = "`columns` is `all`, `none`, `{include: [column, ...]}` or `{exclude: [column, ...]}`";
        match Either::deserialize(deserializer).map_err(|_| de::Error::custom(message))? {
            Either::Word(word) if word == "all" => Ok(Self::All),
            Either::Word(word) if word == "none" => Ok(Self::Include(Vec::new())),
            Either::Word(_) => Err(de::Error::custom(message)),
            Either::List(List::Include(columns)) => Ok(Self::Include(columns)),
            Either::List(List::Exclude(columns)) => Ok(Self::Exclude(columns)),
        }
    }
}

fn all_ops() -> Vec<Op> {
    vec![Op::Added, Op::Updated, Op::Deleted]
}

/// A string from the config file in which `${ENV_VAR}` references are replaced by the
/// environment's values when the file is loaded (`$${` writes a literal `${`). It shows (Debug,
/// Display, Serialize) only its template, so a secret never reaches a log line or an API answer.
#[derive(Clone, PartialEq, Eq)]
pub struct ConfigString {
    template: String,
    value: String,
}

impl ConfigString {
    /// Resolves `${VAR}` references in `template` from the process environment.
    pub fn resolve(template: &str) -> Result<Self, String> {
        Self::resolve_with(template, |name| std::env::var(name).ok())
    }

    pub fn resolve_with(template: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut value = String::with_capacity(template.len());
        let mut rest = template;
        while let Some(pos) = rest.find('$') {
            value.push_str(&rest[..pos]);
            let after = &rest[pos..];
            if let Some(stripped) = after.strip_prefix("$${") {
                value.push_str("${");
                rest = stripped;
            } else if let Some(stripped) = after.strip_prefix("${") {
                let end = stripped
                    .find('}')
                    .ok_or_else(|| format!("unclosed `${{` in `{template}`"))?;
                let name = &stripped[..end];
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!(
                        "`${{{name}}}` is not a valid environment variable reference"
                    ));
                }
                let resolved =
                    lookup(name).ok_or_else(|| format!("environment variable `{name}` is not set"))?;
                value.push_str(&resolved);
                rest = &stripped[end + 1..];
            } else {
                value.push('$');
                rest = &after[1..];
            }
        }
        value.push_str(rest);
        Ok(Self {
            template: template.to_string(),
            value,
        })
    }

    /// A literal, with no references.
    pub fn literal(value: impl Into<String>) -> Self {
        let value = value.into();
        Self {
            template: value.replace("${", "$${"),
            value,
        }
    }

    /// The resolved value: use it, never print it.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// The text as written in the file, with `${VAR}` references unexpanded.
    pub fn template(&self) -> &str {
        &self.template
    }

    pub fn has_references(&self) -> bool {
        self.template != self.value
    }
}

// Shown as written, `${VAR}` unexpanded; a URL written literally keeps its password and
// credential-looking query values out of what is shown.
impl fmt::Debug for ConfigString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match crate::secrets::hide_url_credentials(&self.template) {
            Some(hidden) => write!(f, "{hidden:?}"),
            None => write!(f, "{:?}", self.template),
        }
    }
}

impl fmt::Display for ConfigString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match crate::secrets::hide_url_credentials(&self.template) {
            Some(hidden) => f.write_str(&hidden),
            None => f.write_str(&self.template),
        }
    }
}

impl<'de> Deserialize<'de> for ConfigString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let template = String::deserialize(deserializer)?;
        Self::resolve(&template).map_err(de::Error::custom)
    }
}

impl schemars::JsonSchema for ConfigString {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ConfigString".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        // `${VAR}` references are resolved from the environment of the process that loads it.
        schemars::json_schema!({ "type": "string" })
    }
}

impl Serialize for ConfigString {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.template)
    }
}

/// A credential among a connector's options: a [`ConfigString`] declared secret by its type.
/// The catalog marks it `writeOnly` (and `x-sluice-secret`), the API seals it at rest and never
/// shows it, and Debug and Display print only the placeholder. Declaring an option with this
/// type is what makes it secret; no rule about option names has to be remembered.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(ConfigString);

/// The JSON Schema keyword that marks an option secret: `true` for a value shown as the
/// placeholder, `"url"` for a URL that is a credential as a whole (shown as its scheme and host).
pub const SECRET_KEYWORD: &str = "x-sluice-secret";

impl Secret {
    pub fn literal(value: impl Into<String>) -> Self {
        Self(ConfigString::literal(value))
    }

    /// The resolved value: use it, never print it.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    pub fn has_references(&self) -> bool {
        self.0.has_references()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({:?})", crate::secrets::REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(crate::secrets::REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // The template, as ConfigString: `${VAR}` references stay references.
        self.0.serialize(serializer)
    }
}

impl schemars::JsonSchema for Secret {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Secret".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "writeOnly": true, "x-sluice-secret": true })
    }
}

/// A URL that is a credential as a whole (an incoming-webhook address: whoever has it can
/// post). Like [`Secret`], but shown as its scheme and host followed by `…`, so a reader can
/// still tell where records go.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(ConfigString);

impl SecretUrl {
    pub fn literal(value: impl Into<String>) -> Self {
        Self(ConfigString::literal(value))
    }

    /// The resolved URL: use it, never print it.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// `scheme://host[:port]/…`: what may be shown.
    pub fn display(&self) -> String {
        crate::secrets::url_host_display(self.0.expose())
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({:?})", self.display())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl schemars::JsonSchema for SecretUrl {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SecretUrl".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "format": "uri", "writeOnly": true, "x-sluice-secret": "url" })
    }
}

/// A loaded, validated project file.
#[derive(Debug, Clone)]
pub struct Project {
    pub config: ProjectConfig,
    /// The file it came from.
    pub path: PathBuf,
    /// Directory relative paths in the file resolve against.
    pub base_dir: PathBuf,
    /// The file's text, kept to point at lines in later errors.
    text: String,
    /// The file as JSON, to show each definition as it was written.
    raw: std::sync::Arc<serde_json::Value>,
    /// Definitions that came from the API (section, name): their errors name no file line.
    api_defined: std::collections::HashSet<(String, String)>,
    /// The dbt manifest `dbt.manifest` points at, once read.
    pub(crate) dbt_manifest: Option<std::sync::Arc<crate::dbt::Manifest>>,
    /// The models that read a dbt model (by sluice model name), as the manifest describes it.
    pub dbt_models: IndexMap<String, crate::dbt::DbtModel>,
    /// The models whose SQL `ref()`s dbt models, and those models.
    pub dbt_refs: IndexMap<String, Vec<crate::dbt::DbtModel>>,
}

impl Project {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_path_buf(),
            line: None,
            message: format!("cannot read the config file: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates a project from `text`, as if read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::parse_with(text, path, None)
    }

    /// This project as its file says, with its dbt models read from `manifest` (written anew by
    /// dbt) instead of the manifest it was loaded with.
    pub fn with_manifest(&self, manifest: crate::dbt::Manifest) -> Result<Self, ConfigError> {
        Self::parse_with(&self.text, &self.path, Some(manifest))
    }

    /// [`Project::parse`]; a local manifest is read unless `manifest` is given.
    fn parse_with(
        text: &str,
        path: &Path,
        manifest: Option<crate::dbt::Manifest>,
    ) -> Result<Self, ConfigError> {
        let config: ProjectConfig = serde_norway::from_str(text).map_err(|e| ConfigError {
            path: path.to_path_buf(),
            line: e.location().map(|l| l.line()),
            message: strip_location(&e.to_string()),
        })?;
        let absolute = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|d| d.join(path))
                .unwrap_or_else(|_| path.to_path_buf())
        };
        let base_dir = absolute
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        // (Same text, parsed the same way; anything odd in it only costs the raw view.)
        let raw = serde_norway::from_str::<serde_json::Value>(text).unwrap_or(serde_json::Value::Null);
        let mut project = Self {
            config,
            path: path.to_path_buf(),
            base_dir,
            text: text.to_string(),
            raw: std::sync::Arc::new(raw),
            api_defined: Default::default(),
            dbt_manifest: None,
            dbt_models: IndexMap::new(),
            dbt_refs: IndexMap::new(),
        };
        project.resolve_defaults();
        // A manifest on disk is read now; one in object storage when the engine opens.
        if let Some(manifest) = manifest {
            project.take_in_manifest(manifest)?;
        } else if let Some(path) = project.dbt_manifest_path() {
            let bytes = std::fs::read(&path).map_err(|e| {
                project.error_at(
                    &["dbt", "manifest"],
                    format!(
                        "cannot read the dbt manifest {}: {e}; run `dbt build` (or `dbt parse`) in the dbt project to write it",
                        path.display()
                    ),
                )
            })?;
            project.take_in_dbt(&bytes)?;
        }
        project.validate()?;
        Ok(project)
    }

    /// The dbt manifest's local path, when `dbt.manifest` is one (not an object-store URL).
    pub fn dbt_manifest_path(&self) -> Option<PathBuf> {
        let location = self.config.dbt.as_ref()?.manifest_location()?;
        match location.split_once("://") {
            Some(("file", path)) => Some(PathBuf::from(path)),
            Some(_) => None,
            None => Some(self.base_dir.join(location)),
        }
    }

    /// Whether dbt models wait for a manifest in object storage ([`Project::take_in_dbt`]).
    pub fn dbt_pending(&self) -> bool {
        self.config.dbt.as_ref().is_some_and(|d| d.manifest.is_some()) && self.dbt_manifest.is_none()
    }

    /// The dbt models each of `model`'s rows come from: the one it reads, or those it `ref()`s.
    pub fn dbt_sources_of(&self, model: &str) -> Vec<crate::dbt::DbtModel> {
        match self.dbt_models.get(model) {
            Some(dbt) => vec![dbt.clone()],
            None => self.dbt_refs.get(model).cloned().unwrap_or_default(),
        }
    }

    /// When the dbt manifest in use was written (its `metadata.generated_at`).
    pub fn dbt_manifest_generated_at(&self) -> Option<&str> {
        Some(self.dbt_manifest.as_ref()?.metadata.generated_at.as_str())
    }

    /// The dbt manifest in use.
    pub fn dbt_manifest(&self) -> Option<&crate::dbt::Manifest> {
        self.dbt_manifest.as_deref()
    }

    /// For a mapping scheduled `after_dbt:`, the external events any of which starts it.
    pub fn after_dbt_events(&self, mapping: &str) -> Option<Vec<String>> {
        let Schedule::AfterDbt { jobs } = self.schedule_of(mapping) else {
            return None;
        };
        let model = &self.config.mappings.get(mapping)?.model;
        Some(crate::dbt::events_of(&jobs, &self.dbt_sources_of(model)))
    }

    /// The dbt project's name, as its manifest gives it.
    pub fn dbt_project_name(&self) -> Option<&str> {
        self.dbt_manifest.as_ref()?.metadata.project_name.as_deref()
    }

    /// Parses the dbt manifest and resolves the models that use it (then validates them).
    pub fn take_in_dbt(&mut self, bytes: &[u8]) -> Result<(), ConfigError> {
        let manifest =
            crate::dbt::Manifest::parse(bytes).map_err(|m| self.error_at(&["dbt", "manifest"], m))?;
        self.take_in_manifest(manifest)
    }

    /// [`Project::take_in_dbt`] with the manifest already parsed.
    fn take_in_manifest(&mut self, manifest: crate::dbt::Manifest) -> Result<(), ConfigError> {
        self.dbt_manifest = Some(std::sync::Arc::new(manifest));
        self.resolve_dbt()
    }

    /// Resolves every model that reads a dbt model or `ref()`s one and is not resolved yet:
    /// its SQL becomes a select from the relation, and its key, unless given, what the dbt
    /// project says identifies a row.
    pub(crate) fn resolve_dbt(&mut self) -> Result<(), ConfigError> {
        let names: Vec<String> = self.config.models.keys().cloned().collect();
        for name in names {
            self.resolve_dbt_model(&name)?;
        }
        Ok(())
    }

    /// [`Project::resolve_dbt`] for one model.
    pub(crate) fn resolve_dbt_model(&mut self, name: &str) -> Result<(), ConfigError> {
        let manifest = self.dbt_manifest.clone();
        let name = name.to_string();
        {
            if self.dbt_models.contains_key(&name) || self.dbt_refs.contains_key(&name) {
                return Ok(());
            }
            let Some(model) = self.config.models.get(&name) else {
                return Ok(());
            };
            let Some(reference) = model.dbt_model.clone() else {
                if crate::dbt::has_refs(&model.sql) {
                    let Some(manifest) = &manifest else {
                        return Err(self.error_at(
                            &["models", &name, "sql"],
                            format!("model `{name}` uses `ref()`, which needs a dbt manifest: add `dbt: {{manifest: path/to/target/manifest.json}}`"),
                        ));
                    };
                    let (rendered, used) = manifest.render_refs(&model.sql).map_err(|m| {
                        self.error_at(&["models", &name, "sql"], format!("model `{name}`: {m}"))
                    })?;
                    if let Some(model) = self.config.models.get_mut(&name) {
                        model.sql = rendered;
                    }
                    self.dbt_refs.insert(name, used);
                }
                return Ok(());
            };
            if !model.sql.trim().is_empty() {
                return Err(self.error_at(
                    &["models", &name, "dbt_model"],
                    format!("model `{name}` gives both `sql` and `dbt_model`; give one"),
                ));
            }
            let Some(manifest) = &manifest else {
                if self.dbt_pending() {
                    // In object storage: resolved when the engine opens.
                    return Ok(());
                }
                return Err(self.error_at(
                    &["models", &name, "dbt_model"],
                    format!("model `{name}` reads dbt model `{reference}`, and there is no dbt manifest: add `dbt: {{manifest: path/to/target/manifest.json}}`"),
                ));
            };
            let dbt = manifest.model(&reference).map_err(|m| {
                self.error_at(&["models", &name, "dbt_model"], format!("model `{name}`: {m}"))
            })?;
            let events = model.kind == ModelKind::Events;
            let key = if model.primary_key.0.is_empty() && !events {
                match &dbt.primary_key {
                    Some((key, _)) => Some(key.clone()),
                    None => {
                        return Err(self.error_at(
                            &["models", &name, "dbt_model"],
                            format!(
                                "model `{name}`: dbt model `{reference}` says nothing of its key; add a `unique` test on the key column (or `meta: {{primary_key: ...}}`) in dbt, or `primary_key:` here"
                            ),
                        ));
                    }
                }
            } else {
                None
            };
            if let Some(model) = self.config.models.get_mut(&name) {
                model.sql = format!("SELECT * FROM {}", dbt.relation);
                if let Some(key) = key {
                    model.primary_key = PrimaryKey(key);
                }
                if model.description.is_none() && !dbt.description.is_empty() {
                    model.description = Some(dbt.description.clone());
                }
            }
            self.dbt_models.insert(name, dbt);
        }
        Ok(())
    }

    /// An error pointing at the line of `section.name[.key]` in the file, when it can be found
    /// (a definition made through the API is named instead).
    pub fn error_at(&self, keys: &[&str], message: impl Into<String>) -> ConfigError {
        if let [section, name, ..] = keys
            && self
                .api_defined
                .contains(&(section.to_string(), name.to_string()))
        {
            return ConfigError {
                path: PathBuf::from(format!("api/{section}/{name}")),
                line: None,
                message: message.into(),
            };
        }
        ConfigError {
            path: self.path.clone(),
            line: locate(&self.text, keys),
            message: message.into(),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        let dir = Path::new(&self.config.state_dir);
        if dir.is_absolute() {
            dir.to_path_buf()
        } else {
            self.base_dir.join(dir)
        }
    }

    /// A definition as `sluice.yaml` writes it (secrets included: redact before showing).
    pub fn raw_definition(&self, section: &str, name: &str) -> Option<&serde_json::Value> {
        self.raw.get(section)?.get(name)
    }

    /// Marks `section.name` as made through the API (see [`Self::error_at`]).
    pub(crate) fn mark_api_defined(&mut self, section: &str, name: &str) {
        self.api_defined.insert((section.to_string(), name.to_string()));
    }

    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.config.models.get(name)
    }

    pub fn mapping(&self, name: &str) -> Option<&MappingConfig> {
        self.config.mappings.get(name)
    }

    /// A mapping's schedule: its own, else its model's, else manual.
    pub fn schedule_of(&self, mapping: &str) -> Schedule {
        let Some(config) = self.mapping(mapping) else {
            return Schedule::Manual;
        };
        config
            .schedule
            .clone()
            .or_else(|| self.model(&config.model).and_then(|m| m.schedule.clone()))
            .unwrap_or(Schedule::Manual)
    }

    /// Fills in defaults that depend on other parts of the file.
    pub(crate) fn resolve_defaults(&mut self) {
        for model in self.config.models.values_mut() {
            if model.kind == ModelKind::Events && model.primary_key.0.is_empty() {
                model.primary_key = PrimaryKey(vec![EVENT_ID_COLUMN.to_string()]);
            }
        }
        let models = &self.config.models;
        for mapping in self.config.mappings.values_mut() {
            let events = models
                .get(&mapping.model)
                .is_some_and(|m| m.kind == ModelKind::Events);
            mapping.resolve_send(events);
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let c = &self.config;
        for (section, names) in [
            ("sources", c.sources.keys().collect::<Vec<_>>()),
            ("models", c.models.keys().collect()),
            ("destinations", c.destinations.keys().collect()),
            ("mappings", c.mappings.keys().collect()),
        ] {
            for name in names {
                check_name(name).map_err(|m| self.error_at(&[section, name], m))?;
            }
        }
        for (name, model) in &c.models {
            self.validate_model(name, model)?;
        }
        for (name, mapping) in &c.mappings {
            self.validate_mapping(name, mapping)?;
        }
        for (i, token) in c.api.tokens.iter().enumerate() {
            if token.token.expose().len() < 16 {
                return Err(self.error_at(
                    &["api", "tokens"],
                    format!(
                        "api.tokens[{i}] (`{}`): a token must be at least 16 characters; `sluice token create` makes strong ones",
                        token.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks one model against the rest of the project.
    pub(crate) fn validate_model(&self, name: &str, model: &ModelConfig) -> Result<(), ConfigError> {
        let c = &self.config;
        check_name(name).map_err(|m| self.error_at(&["models", name], m))?;
        if !c.sources.contains_key(&model.source) {
            return Err(self.error_at(
                &["models", name, "source"],
                format!(
                    "model `{name}` uses source `{}`, which is not defined{}",
                    model.source,
                    defined(c.sources.keys())
                ),
            ));
        }
        if model.dbt_model.is_some() && !self.dbt_models.contains_key(name) && self.dbt_pending() {
            // Resolved once the manifest is read from object storage.
            return Ok(());
        }
        if model.sql.trim().is_empty() {
            return Err(self.error_at(
                &["models", name, "sql"],
                format!("model `{name}` has an empty `sql`"),
            ));
        }
        c.limits
            .check_query(&model.sql)
            .map_err(|m| self.error_at(&["models", name, "sql"], format!("model `{name}`: {m}")))?;
        let probe = crate::model::TemplateValues {
            last_sync_time: None,
            run_started_at: chrono::Utc::now(),
        };
        crate::model::render_sql(&model.sql, &probe)
            .map_err(|m| self.error_at(&["models", name, "sql"], format!("model `{name}`: {m}")))?;
        if model.primary_key.0.is_empty() {
            return Err(self.error_at(
                    &["models", name, "primary_key"],
                    format!("model `{name}` needs `primary_key`: a column, or a list of columns, that identifies a row"),
                ));
        }
        let mut seen = std::collections::HashSet::new();
        for key in &model.primary_key.0 {
            if key.trim().is_empty() || !seen.insert(key) {
                return Err(self.error_at(
                    &["models", name, "primary_key"],
                    format!("model `{name}`: primary key column `{key}` is empty or listed twice"),
                ));
            }
        }
        Ok(())
    }

    /// Checks one mapping against the rest of the project.
    /// A mapping scheduled `after:` others: they exist, and following `after:` from them never
    /// leads back to it (a cycle would never start).
    fn validate_sequence(&self, name: &str, mapping: &MappingConfig) -> Result<(), ConfigError> {
        let schedule = mapping
            .schedule
            .clone()
            .or_else(|| self.model(&mapping.model).and_then(|m| m.schedule.clone()));
        let at = if mapping.schedule.is_some() {
            vec!["mappings", name, "schedule"]
        } else {
            vec!["models", mapping.model.as_str(), "schedule"]
        };
        if let Some(Schedule::AfterDbt { jobs }) = &schedule
            && jobs.is_empty()
            && !self.dbt_pending()
            && self.dbt_sources_of(&mapping.model).is_empty()
        {
            return Err(self.error_at(
                &at,
                format!(
                    "mapping `{name}` runs `after_dbt`, and its model `{}` reads no dbt model, so no dbt build would start it: read the model with `dbt_model:` or `ref()`, or name the dbt Cloud jobs to wait for (`after_dbt: {{jobs: [job id or name]}}`)",
                    mapping.model
                ),
            ));
        }
        let Some(Schedule::After(first)) = schedule else {
            return Ok(());
        };
        for before in &first {
            if before == name {
                return Err(self.error_at(&at, format!("mapping `{name}` is scheduled after itself")));
            }
            if !self.config.mappings.contains_key(before) {
                return Err(self.error_at(
                    &at,
                    format!(
                        "mapping `{name}` is scheduled after `{before}`, which is not a mapping{}",
                        defined(self.config.mappings.keys())
                    ),
                ));
            }
        }
        // Walk what the prerequisites run after; meeting `name` is a cycle.
        let mut stack: Vec<(String, Vec<String>)> = first
            .iter()
            .map(|m| (m.clone(), vec![name.to_string(), m.clone()]))
            .collect();
        let mut seen = std::collections::HashSet::new();
        while let Some((current, trail)) = stack.pop() {
            if current == name {
                return Err(self.error_at(
                    &at,
                    format!(
                        "mappings scheduled after each other never start: {}",
                        trail.join(" after ")
                    ),
                ));
            }
            if !seen.insert(current.clone()) {
                continue;
            }
            if let Schedule::After(next) = self.schedule_of(&current) {
                for m in next {
                    let mut longer = trail.clone();
                    longer.push(m.clone());
                    stack.push((m, longer));
                }
            }
        }
        Ok(())
    }

    pub(crate) fn validate_mapping(&self, name: &str, mapping: &MappingConfig) -> Result<(), ConfigError> {
        let c = &self.config;
        check_name(name).map_err(|m| self.error_at(&["mappings", name], m))?;
        if !c.models.contains_key(&mapping.model) {
            return Err(self.error_at(
                &["mappings", name, "model"],
                format!(
                    "mapping `{name}` uses model `{}`, which is not defined{}",
                    mapping.model,
                    defined(c.models.keys())
                ),
            ));
        }
        if !c.destinations.contains_key(&mapping.destination) {
            return Err(self.error_at(
                &["mappings", name, "destination"],
                format!(
                    "mapping `{name}` uses destination `{}`, which is not defined{}",
                    mapping.destination,
                    defined(c.destinations.keys())
                ),
            ));
        }
        self.validate_sequence(name, mapping)?;
        let events = c
            .models
            .get(&mapping.model)
            .is_some_and(|m| m.kind == ModelKind::Events);
        if events && mapping.send != [Op::Added] {
            return Err(self.error_at(
                    &["mappings", name, "send"],
                    format!(
                        "mapping `{name}`: model `{}` is an events model, whose rows are each sent once as `added`; `send` can only be [added]",
                        mapping.model
                    ),
                ));
        }
        if mapping.send.is_empty() {
            return Err(self.error_at(
                &["mappings", name, "send"],
                format!("mapping `{name}`: `send` must list at least one of added, updated, deleted"),
            ));
        }
        crate::mapping::FieldTree::build(name, mapping)
            .map_err(|e| self.error_at(&["mappings", name], e.to_string()))?;
        Ok(())
    }
}

/// Names become paths in the snapshot store and identifiers in SQL, so keep them plain.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid name: use letters, digits, `_` and `-`, starting with a letter or `_` (at most 64 characters)"
        ))
    }
}

fn defined<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<_> = names.map(|n| format!("`{n}`")).collect();
    if names.is_empty() {
        " (none are defined)".to_string()
    } else {
        format!(" (defined: {})", names.join(", "))
    }
}

/// serde_norway appends "at line X column Y" to messages; the line is reported separately.
fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(pos) => message[..pos].to_string(),
        None => message.to_string(),
    }
}

/// Finds the 1-based line of a nested key in block-style YAML by following indentation, e.g.
/// `["mappings", "users_to_crm", "model"]`. Best effort: flow-style maps are matched by the
/// line of their parent key.
pub fn locate(text: &str, keys: &[&str]) -> Option<usize> {
    let mut min_indent: Option<usize> = None;
    let mut line_no = None;
    let mut start = 0usize;
    let lines: Vec<&str> = text.lines().collect();
    for key in keys {
        let mut found = None;
        for (i, line) in lines.iter().enumerate().skip(start) {
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let indent = line.len() - trimmed.len();
            if let Some(parent) = min_indent
                && indent <= parent
            {
                break; // left the parent's block
            }
            let bare = trimmed
                .strip_prefix('"')
                .and_then(|t| t.strip_prefix(*key))
                .and_then(|t| t.strip_prefix('"'))
                .or_else(|| trimmed.strip_prefix(*key));
            if bare.is_some_and(|rest| rest.trim_start().starts_with(':')) {
                found = Some((i, indent));
                break;
            }
        }
        match found {
            Some((i, indent)) => {
                line_no = Some(i + 1);
                min_indent = Some(indent);
                start = i + 1;
            }
            None => return line_no,
        }
    }
    line_no
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
state_dir: .sluice                      # metadata store (SQLite) and default snapshot store live here
# snapshot_store: s3://bucket/prefix    # optional: any object_store URL
sources:
  warehouse:
    type: files                         # DataFusion over files: Parquet, CSV, NDJSON by extension; local paths or object_store URLs
    tables:
      users: data/users.parquet
models:
  users:
    source: warehouse
    sql: SELECT id, email, plan, lead_score FROM users
    primary_key: id                     # or a list of columns for a composite key
destinations:
  crm:
    type: webhook
    url: http://127.0.0.1:9000/ingest
mappings:
  users_to_crm:
    model: users
    destination: crm
    send: [added, updated, deleted]     # any of added, updated, deleted
    fields: { email: email, "traits.plan": plan }   # destination field <- model column; dots nest
    constants: { "context.source": "sluice" }
"#;

    fn parse(text: &str) -> Result<Project, ConfigError> {
        Project::parse(text, Path::new("/srv/app/sluice.yaml"))
    }

    #[test]
    fn the_readme_example_parses() {
        let project = parse(EXAMPLE).unwrap();
        let c = &project.config;
        assert_eq!(c.sources["warehouse"].kind, "files");
        assert_eq!(c.models["users"].primary_key, PrimaryKey(vec!["id".into()]));
        let mapping = &c.mappings["users_to_crm"];
        assert_eq!(mapping.send, vec![Op::Added, Op::Updated, Op::Deleted]);
        let fields = mapping.fields.as_ref().unwrap();
        assert_eq!(fields.keys().collect::<Vec<_>>(), ["email", "traits.plan"]);
        assert_eq!(project.state_dir(), Path::new("/srv/app/.sluice"));
    }

    #[test]
    fn the_diff_engine_defaults_to_local_and_names_a_ballista_scheduler() {
        let project = parse(EXAMPLE).unwrap();
        assert_eq!(project.config.diff.engine, DiffEngineKind::Local);
        let text = format!(
            "{EXAMPLE}diff: {{ engine: ballista, scheduler: \"df://sched:50050\", partitions: 8 }}\n"
        );
        let diff = parse(&text).unwrap().config.diff;
        assert_eq!(diff.engine, DiffEngineKind::Ballista);
        assert_eq!(
            diff.scheduler.map(|s| s.expose().to_string()).as_deref(),
            Some("df://sched:50050")
        );
        assert_eq!(diff.partitions, Some(8));
        let err = parse(&format!("{EXAMPLE}diff: {{ engine: spark }}\n")).unwrap_err();
        assert!(err.to_string().contains("unknown variant `spark`"), "{err}");
    }

    #[test]
    fn unknown_keys_are_errors_with_a_line() {
        let text = EXAMPLE.replace("    primary_key: id", "    primary_kee: id");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.line, Some(13), "{err}");
        assert!(err.to_string().contains("unknown field `primary_kee`"), "{err}");
    }

    #[test]
    fn missing_references_name_what_is_missing_and_where() {
        let text = EXAMPLE.replace("    model: users", "    model: userz");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.line, Some(20), "{err}");
        assert!(
            err.message.contains(
                "mapping `users_to_crm` uses model `userz`, which is not defined (defined: `users`)"
            ),
            "{err}"
        );
        let text = EXAMPLE.replace("destination: crm", "destination: nope");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("/srv/app/sluice.yaml:21: "), "{err}");
        let text = EXAMPLE.replace("    source: warehouse", "    source: lake");
        assert!(parse(&text).unwrap_err().to_string().contains("source `lake`"));
    }

    #[test]
    fn bad_send_values_and_names_are_refused() {
        let text = EXAMPLE.replace("[added, updated, deleted]", "[added, upserted]");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("unknown variant `upserted`"), "{err}");
        let text = EXAMPLE.replace("  crm:", "  \"c r m\":");
        assert!(parse(&text).unwrap_err().to_string().contains("not a valid name"));
    }

    #[test]
    fn composite_keys_parse() {
        let text = EXAMPLE.replace("primary_key: id ", "primary_key: [id, email] ");
        let project = parse(&text).unwrap();
        assert_eq!(project.config.models["users"].primary_key.0, ["id", "email"]);
    }

    #[test]
    fn env_references_resolve_and_never_print() {
        let lookup = |name: &str| (name == "TOKEN").then(|| "s3cret".to_string());
        let s = ConfigString::resolve_with("Bearer ${TOKEN}", lookup).unwrap();
        assert_eq!(s.expose(), "Bearer s3cret");
        assert_eq!(format!("{s} {s:?}"), "Bearer ${TOKEN} \"Bearer ${TOKEN}\"");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"Bearer ${TOKEN}\"");
        let escaped = ConfigString::resolve_with("cost: $5 and $${literal}", lookup).unwrap();
        assert_eq!(escaped.expose(), "cost: $5 and ${literal}");
        let err = ConfigString::resolve_with("${MISSING}", lookup).unwrap_err();
        assert_eq!(err, "environment variable `MISSING` is not set");
        assert!(ConfigString::resolve_with("${OPEN", lookup).is_err());
    }

    #[test]
    fn locate_follows_indentation() {
        assert_eq!(
            locate(EXAMPLE, &["mappings", "users_to_crm", "destination"]),
            Some(21)
        );
        assert_eq!(locate(EXAMPLE, &["models", "users", "sql"]), Some(12));
        assert_eq!(locate(EXAMPLE, &["models", "nope"]), Some(9));
    }
}
