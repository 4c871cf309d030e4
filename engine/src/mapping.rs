//! Mappings: from a model's rows to a destination's records.
//!
//! A mapping's `fields` (destination field <- model column), its pass-through `columns`, its
//! `constants` and what its destination's action fixes (`type: identify`, the message id) form a
//! tree by their dotted names (`traits.address.city`). Names are placed by the action's
//! [`PayloadShape`]: reserved names stay at the top level, every other field goes into the
//! action's container (`traits`, `properties`). The tree is compiled once per run against the
//! model's schema into a template: literal JSON text (keys, braces, constants) interleaved with
//! column slots. Encoding a batch renders each used column once ([`crate::json`]) and then copies
//! fragments into the template, record after record.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray, new_null_array};
use arrow::datatypes::{DataType, Field, Schema, UInt64Type};
use datafusion::scalar::ScalarValue;
use indexmap::IndexMap;

use crate::config::{ColumnSelection, FieldSpec, MappingConfig, Op};
use crate::destination::{
    ActionSpec, MessageId, OutgoingBatch, Payload, RecordAction, RecordFailure, SyncMode, UPDATE_FLAG_COLUMN,
    ValueFormat,
};
use crate::error::MappingError;
use crate::json::{JsonColumn, encode_formatted, null_column, write_json_string};

/// Where a destination field's value comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldSource {
    Column(FieldSpec),
    Constant(serde_json::Value),
    /// The record's deterministic message id.
    MessageId,
}

/// The nested shape of a mapping's output.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldTree {
    Leaf(FieldSource),
    Object(IndexMap<String, FieldTree>),
}

impl FieldTree {
    /// Builds the tree of a mapping's explicit fields and constants, as written (no action
    /// placement, no pass-through columns): the checks `sluice.yaml` gets when it is loaded.
    pub fn build(mapping: &str, config: &MappingConfig) -> Result<Self, MappingError> {
        let mut root = FieldTree::Object(IndexMap::new());
        if let Some(fields) = &config.fields {
            for (destination, spec) in fields {
                root.insert(mapping, destination, FieldSource::Column(spec.clone()))?;
            }
        }
        for (destination, value) in &config.constants {
            root.insert(mapping, destination, FieldSource::Constant(value.clone()))?;
        }
        Ok(root)
    }

    fn insert(&mut self, mapping: &str, path: &str, source: FieldSource) -> Result<(), MappingError> {
        let err = |message: String| MappingError {
            mapping: mapping.to_string(),
            message,
        };
        let parts: Vec<&str> = path.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(err(format!(
                "destination field `{path}` has an empty part; write names like `traits.plan`"
            )));
        }
        let mut node = self;
        for (depth, part) in parts.iter().enumerate() {
            let last = depth == parts.len() - 1;
            let FieldTree::Object(children) = node else {
                let parent = parts[..depth].join(".");
                return Err(err(format!(
                    "destination field `{parent}` is given a value and is also the parent of `{path}`"
                )));
            };
            if last {
                if children.contains_key(*part) {
                    return Err(err(format!("destination field `{path}` is given twice")));
                }
                children.insert(part.to_string(), FieldTree::Leaf(source));
                return Ok(());
            }
            node = children
                .entry(part.to_string())
                .or_insert_with(|| FieldTree::Object(IndexMap::new()));
        }
        Ok(())
    }

    /// The node at a dotted path.
    fn get(&self, path: &str) -> Option<&FieldTree> {
        let mut node = self;
        for part in path.split('.') {
            let FieldTree::Object(children) = node else {
                return None;
            };
            node = children.get(part)?;
        }
        Some(node)
    }

    fn get_mut(&mut self, path: &str) -> Option<&mut FieldTree> {
        let mut node = self;
        for part in path.split('.') {
            let FieldTree::Object(children) = node else {
                return None;
            };
            node = children.get_mut(part)?;
        }
        Some(node)
    }

    fn slots(&self, out: &mut Vec<FieldSpec>) {
        match self {
            FieldTree::Leaf(FieldSource::Column(spec)) => {
                if !out.contains(spec) {
                    out.push(spec.clone());
                }
            }
            FieldTree::Leaf(_) => {}
            FieldTree::Object(children) => children.values().for_each(|c| c.slots(out)),
        }
    }

    fn flatten(&self, prefix: &str, out: &mut Vec<(String, FieldSource)>) {
        match self {
            FieldTree::Leaf(source) => out.push((prefix.to_string(), source.clone())),
            FieldTree::Object(children) => {
                for (name, child) in children {
                    let path = if prefix.is_empty() {
                        name.clone()
                    } else {
                        format!("{prefix}.{name}")
                    };
                    child.flatten(&path, out);
                }
            }
        }
    }
}

/// A piece of a record's JSON text.
#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(Vec<u8>),
    /// Index into the plan's slots.
    Column(usize),
    MessageId,
}

/// A sequence of segments that renders one JSON object per row.
#[derive(Debug, Clone)]
struct Template(Vec<Segment>);

impl Template {
    fn render(&self, columns: &[JsonColumn], message_ids: &[MessageId], rows: usize) -> JsonColumn {
        let estimate: usize = self
            .0
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => l.len() * rows,
                Segment::Column(c) => columns[*c].total_bytes(),
                Segment::MessageId => 38 * rows,
            })
            .sum();
        let mut out = JsonColumn::with_capacity(rows, estimate);
        for row in 0..rows {
            let buf = out.buffer();
            for segment in &self.0 {
                match segment {
                    Segment::Literal(bytes) => buf.extend_from_slice(bytes),
                    Segment::Column(c) => buf.extend_from_slice(columns[*c].get(row)),
                    Segment::MessageId => match message_ids.get(row) {
                        Some(id) => {
                            buf.push(b'"');
                            buf.extend_from_slice(id.as_str().as_bytes());
                            buf.push(b'"');
                        }
                        None => buf.extend_from_slice(b"null"),
                    },
                }
            }
            out.end_row();
        }
        out
    }
}

struct TemplateBuilder {
    segments: Vec<Segment>,
    literal: Vec<u8>,
}

impl TemplateBuilder {
    fn new() -> Self {
        Self {
            segments: Vec::new(),
            literal: Vec::new(),
        }
    }

    fn literal(&mut self, bytes: &[u8]) {
        self.literal.extend_from_slice(bytes);
    }

    fn segment(&mut self, segment: Segment) {
        if !self.literal.is_empty() {
            self.segments
                .push(Segment::Literal(std::mem::take(&mut self.literal)));
        }
        self.segments.push(segment);
    }

    fn finish(mut self) -> Template {
        if !self.literal.is_empty() {
            self.segments.push(Segment::Literal(self.literal));
        }
        Template(self.segments)
    }
}

/// A mapping compiled against a model's schema.
#[derive(Debug, Clone)]
pub struct MappingPlan {
    mapping: String,
    /// Model columns and how they are written, in first-use order: mapped fields, then the
    /// key columns.
    slots: Vec<FieldSpec>,
    key_columns: Vec<String>,
    body: Template,
    key: Template,
    ids: Template,
    /// Slots of the identity fields when every record needs one of them, with the action's
    /// name for the error (`None`: no such requirement, or a constant fills it).
    identity: Option<(Vec<usize>, String)>,
    /// Destination fields in order, flattened (`traits.plan`), with their source.
    flat_fields: Vec<(String, FieldSource)>,
    send: Vec<Op>,
    mode: SyncMode,
    /// Whether the model's `_update` column turns rows into updates.
    update_flag: bool,
}

/// Records of one batch, ready to send, and those that cannot be sent (with why).
#[derive(Debug, Clone)]
pub struct EncodedBatch {
    pub records: OutgoingBatch,
    /// Records the mapping cannot turn into a valid payload (no identifier, a JSON column that
    /// does not parse), by index, ascending; they are failed records, never sent.
    pub unsendable: Vec<RecordFailure>,
}

impl MappingPlan {
    /// Compiles `config` for a model whose rows have `schema` and primary key `key_columns`,
    /// laid out for `action` (none for destinations that take sluice's envelope).
    pub fn compile(
        mapping: &str,
        config: &MappingConfig,
        model: &str,
        schema: &Schema,
        key_columns: &[String],
        action: Option<&ActionSpec>,
    ) -> Result<Self, MappingError> {
        let err = |message: String| MappingError {
            mapping: mapping.to_string(),
            message,
        };
        let model_columns: Vec<&String> = schema
            .fields()
            .iter()
            .map(|f| f.name())
            .filter(|n| !n.starts_with(sluice_snapshots::RESERVED_PREFIX))
            .collect();
        let update_flag = action.is_some() && model_columns.iter().any(|c| *c == UPDATE_FLAG_COLUMN);
        if update_flag {
            let field = schema
                .field_with_name(UPDATE_FLAG_COLUMN)
                .map_err(|e| err(e.to_string()))?;
            if !matches!(field.data_type(), DataType::Boolean | DataType::Null) {
                return Err(err(format!(
                    "model `{model}`'s column `{UPDATE_FLAG_COLUMN}` is {}, but it must be boolean: true makes the row an update only",
                    field.data_type()
                )));
            }
        }
        let shape = action.map(|a| &a.shape);
        let place = |path: &str| -> String {
            let Some(shape) = shape else {
                return path.to_string();
            };
            let first = path.split('.').next().unwrap_or(path);
            match &shape.container {
                Some(container) if first != container && !shape.top_level.iter().any(|t| t == first) => {
                    format!("{container}.{path}")
                }
                _ => path.to_string(),
            }
        };

        let mut entries: Vec<(String, FieldSource)> = Vec::new();
        if let Some(shape) = shape {
            for (path, value) in &shape.fixed {
                entries.push((path.clone(), FieldSource::Constant(value.clone())));
            }
        }
        let mut explicit: Vec<&str> = Vec::new();
        if let Some(fields) = &config.fields {
            for (path, spec) in fields {
                explicit.push(&spec.column);
                // A field written under an alias's name (`distinct_id`) is the field it stands
                // for (`$distinct_id`), unless that one is mapped too.
                let alias = shape.and_then(|s| {
                    s.aliases
                        .iter()
                        .find(|(from, to)| from == path && !fields.contains_key(to))
                        .map(|(_, to)| to.clone())
                });
                entries.push((
                    alias.unwrap_or_else(|| place(path)),
                    FieldSource::Column(spec.clone()),
                ));
            }
        }
        let selection = config.column_selection();
        if let ColumnSelection::Include(columns) | ColumnSelection::Exclude(columns) = &selection {
            for column in columns {
                if !model_columns.contains(&column) {
                    return Err(err(format!(
                        "`columns` names `{column}`, which model `{model}` does not return (its columns: {})",
                        join(&model_columns)
                    )));
                }
            }
        }
        let passed: Vec<&String> = model_columns
            .iter()
            .copied()
            .filter(|c| match &selection {
                ColumnSelection::All => true,
                ColumnSelection::Include(list) => list.contains(c),
                ColumnSelection::Exclude(list) => !list.contains(c),
            })
            .filter(|c| !explicit.contains(&c.as_str()))
            .filter(|c| !(update_flag && *c == UPDATE_FLAG_COLUMN))
            .collect();
        let mut taken: Vec<String> = entries.iter().map(|(p, _)| p.clone()).collect();
        for column in passed {
            let alias = shape.and_then(|s| {
                s.aliases
                    .iter()
                    .find(|(from, to)| from == column && !taken.iter().any(|t| t == to))
                    .map(|(_, to)| to.clone())
            });
            let path = alias.unwrap_or_else(|| place(column));
            taken.push(path.clone());
            entries.push((path, FieldSource::Column(FieldSpec::column(column.clone()))));
        }
        for (path, value) in &config.constants {
            let alias = shape.and_then(|s| {
                s.aliases
                    .iter()
                    .find(|(from, to)| from == path && !taken.iter().any(|t| t == to))
                    .map(|(_, to)| to.clone())
            });
            entries.push((
                alias.unwrap_or_else(|| place(path)),
                FieldSource::Constant(value.clone()),
            ));
        }

        let mut tree = FieldTree::Object(IndexMap::new());
        for (path, source) in entries {
            tree.insert(mapping, &path, source).map_err(|e| {
                if config.fields.is_none() {
                    err(format!(
                        "{} (model columns are sent under their own names unless `fields` or `columns` say otherwise)",
                        e.message
                    ))
                } else {
                    e
                }
            })?;
        }
        if let Some(shape) = shape {
            if let Some(path) = &shape.message_id
                && tree.get(path).is_none()
            {
                tree.insert(mapping, path, FieldSource::MessageId)?;
            }
            for (path, format) in &shape.formats {
                if let Some(FieldTree::Leaf(FieldSource::Column(spec))) = tree.get_mut(path)
                    && spec.format.is_none()
                {
                    spec.format = Some(*format);
                }
            }
        }
        let action_name = action.map(|a| a.name.as_str()).unwrap_or_default();
        if let Some(shape) = shape {
            for required in &shape.required {
                if tree.get(required).is_none() {
                    return Err(err(format!(
                        "action `{action_name}` needs `{required}`: map a column to it (`fields: {{{required}: column}}`) or give it a constant"
                    )));
                }
            }
        }

        let mut slots = Vec::new();
        tree.slots(&mut slots);
        for spec in &slots {
            if schema.field_with_name(&spec.column).is_err() {
                return Err(err(format!(
                    "maps column `{}`, which model `{model}` does not return (its columns: {})",
                    spec.column,
                    join(&model_columns)
                )));
            }
        }
        for key in key_columns {
            let spec = FieldSpec::column(key.clone());
            if !slots.contains(&spec) {
                slots.push(spec);
            }
        }
        let slot_of = |spec: &FieldSpec| slots.iter().position(|s| s == spec);

        let mut body = TemplateBuilder::new();
        render_tree(&tree, &slot_of, &mut body).map_err(err)?;

        let mut key = TemplateBuilder::new();
        key.literal(b"{");
        for (i, column) in key_columns.iter().enumerate() {
            if i > 0 {
                key.literal(b",");
            }
            write_json_string(&mut key.literal, column);
            key.literal(b":");
            let slot = slot_of(&FieldSpec::column(column.clone()))
                .ok_or_else(|| err(format!("internal: key column `{column}` has no slot")))?;
            key.segment(Segment::Column(slot));
        }
        key.literal(b"}");

        // The identity fields: rendered on their own for deletes, and checked per record.
        let mut id_tree = FieldTree::Object(IndexMap::new());
        let mut identity = None;
        if let Some(shape) = shape {
            let mut id_slots = Vec::new();
            let mut constant = false;
            for path in &shape.identity {
                match tree.get(path) {
                    Some(FieldTree::Leaf(source)) => {
                        match source {
                            FieldSource::Column(spec) => id_slots.extend(slot_of(spec)),
                            _ => constant = true,
                        }
                        id_tree.insert(mapping, path, source.clone())?;
                    }
                    Some(FieldTree::Object(_)) => {
                        return Err(err(format!(
                            "`{path}` identifies the record and must be a single value, not an object"
                        )));
                    }
                    None => {}
                }
            }
            if !shape.identity.is_empty() && id_slots.is_empty() && !constant {
                let names: Vec<String> = shape.identity.iter().map(|p| format!("`{p}`")).collect();
                let aliases: Vec<String> = shape
                    .aliases
                    .iter()
                    .filter(|(_, to)| shape.identity.contains(to))
                    .map(|(from, _)| format!("`{from}`"))
                    .collect();
                let hint = if aliases.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", or have the model return a column named {}",
                        aliases.join(" or ")
                    )
                };
                return Err(err(format!(
                    "action `{action_name}` identifies records by {}: map a column to one of them (`fields: {{{}: column}}`){hint}",
                    names.join(" or "),
                    shape.identity[0]
                )));
            }
            if !constant && !id_slots.is_empty() {
                identity = Some((id_slots, shape.identity.join(" or ")));
            }
        }
        let mut ids = TemplateBuilder::new();
        render_tree(&id_tree, &slot_of, &mut ids).map_err(err)?;

        let mut flat_fields = Vec::new();
        tree.flatten("", &mut flat_fields);
        Ok(Self {
            mapping: mapping.to_string(),
            slots,
            key_columns: key_columns.to_vec(),
            body: body.finish(),
            key: key.finish(),
            ids: ids.finish(),
            identity,
            flat_fields,
            send: config.send.clone(),
            mode: config.mode.unwrap_or_default(),
            update_flag,
        })
    }

    pub fn mapping(&self) -> &str {
        &self.mapping
    }

    pub fn sends(&self, op: Op) -> bool {
        self.send.contains(&op)
    }

    pub fn key_columns(&self) -> &[String] {
        &self.key_columns
    }

    /// Model columns the payload reads (mapped columns, then key columns), once each.
    pub fn used_columns(&self) -> Vec<String> {
        let mut columns: Vec<String> = Vec::new();
        for slot in &self.slots {
            if !columns.contains(&slot.column) {
                columns.push(slot.column.clone());
            }
        }
        if self.update_flag {
            columns.push(UPDATE_FLAG_COLUMN.to_string());
        }
        columns
    }

    /// Destination fields in order, flattened (`traits.plan`), with their source.
    pub fn fields(&self) -> &[(String, FieldSource)] {
        &self.flat_fields
    }

    /// Encodes the rows of `batch` as outgoing records. `ops[i]` and `row_hashes[i]` describe
    /// row `i`. A mapped column missing from `batch` (a deleted row from an older snapshot whose
    /// columns differed) is sent as null.
    pub fn encode(
        &self,
        batch: &RecordBatch,
        ops: Vec<Op>,
        row_hashes: &[u64],
    ) -> Result<EncodedBatch, MappingError> {
        self.encode_for(batch, ops, row_hashes, Payload::Json)
    }

    /// [`Self::encode`] for a session that reads `payload`: with [`Payload::Columns`] the JSON
    /// bodies and identities are not rendered (every record's is empty), nor the columns only
    /// they need; keys, message ids, fields and the checks of mapped formats are the same.
    pub fn encode_for(
        &self,
        batch: &RecordBatch,
        ops: Vec<Op>,
        row_hashes: &[u64],
        payload: Payload,
    ) -> Result<EncodedBatch, MappingError> {
        let rows = batch.num_rows();
        let bodies_needed = payload == Payload::Json;
        let err = |message: String| MappingError {
            mapping: self.mapping.clone(),
            message,
        };
        let mut problems: Vec<RecordFailure> = Vec::new();
        let mut rendered = Vec::with_capacity(self.slots.len());
        for (slot, spec) in self.slots.iter().enumerate() {
            if !bodies_needed && !self.needed_without_bodies(slot, spec) {
                // Never read: the key, the identity check and the formats' checks use others.
                rendered.push(JsonColumn::default());
                continue;
            }
            match batch.column_by_name(&spec.column) {
                Some(array) => {
                    let (column, bad) = encode_formatted(array, spec.format)
                        .map_err(|e| err(format!("cannot encode column `{}` as JSON: {e}", spec.column)))?;
                    problems.extend(bad.into_iter().map(|(index, reason)| RecordFailure {
                        index,
                        error: format!(
                            "column `{}` {reason}; it is mapped `as: {}`",
                            spec.column,
                            format_name(spec.format)
                        ),
                    }));
                    rendered.push(column);
                }
                None => rendered.push(null_column(rows)),
            }
        }
        let keys = self.key.render(&rendered, &[], rows);
        let message_ids: Vec<MessageId> = (0..rows)
            .map(|i| MessageId::new(&self.mapping, keys.get(i), row_hashes[i], ops[i]))
            .collect();
        let (bodies, ids) = if bodies_needed {
            (
                self.body.render(&rendered, &message_ids, rows),
                self.ids.render(&rendered, &message_ids, rows),
            )
        } else {
            (JsonColumn::empty_rows(rows), JsonColumn::empty_rows(rows))
        };
        if let Some((slots, names)) = &self.identity {
            for row in 0..rows {
                let present = slots.iter().any(|&s| {
                    let value = rendered[s].get(row);
                    value != b"null" && value != b"\"\""
                });
                if !present {
                    problems.push(RecordFailure {
                        index: row,
                        error: format!(
                            "the record has no value for {names}, which the destination needs to identify it"
                        ),
                    });
                }
            }
        }
        let update_flags = if self.update_flag {
            batch
                .column_by_name(UPDATE_FLAG_COLUMN)
                .and_then(|a| a.as_boolean_opt().cloned())
        } else {
            None
        };
        let actions = ops
            .iter()
            .enumerate()
            .map(|(row, &op)| {
                let action = self.mode.action_for(op);
                let flagged = update_flags
                    .as_ref()
                    .is_some_and(|flags| flags.is_valid(row) && flags.value(row));
                if flagged && action != RecordAction::Delete {
                    RecordAction::Update
                } else {
                    action
                }
            })
            .collect();
        let fields = self.field_columns(batch, &message_ids)?;
        problems.sort_by_key(|p| p.index);
        problems.dedup_by_key(|p| p.index);
        Ok(EncodedBatch {
            records: OutgoingBatch {
                ops,
                actions,
                message_ids,
                keys,
                bodies,
                ids,
                fields,
            },
            unsendable: problems,
        })
    }

    /// Whether slot `slot` is rendered when bodies are not: it is in the key, identifies
    /// records, or has a format whose values can fail a record.
    fn needed_without_bodies(&self, slot: usize, spec: &FieldSpec) -> bool {
        spec.format.is_some()
            || self.key.0.contains(&Segment::Column(slot))
            || self
                .identity
                .as_ref()
                .is_some_and(|(slots, _)| slots.contains(&slot))
    }

    /// The mapped fields as Arrow columns named by destination field.
    fn field_columns(
        &self,
        batch: &RecordBatch,
        message_ids: &[MessageId],
    ) -> Result<RecordBatch, MappingError> {
        let rows = batch.num_rows();
        let mut fields = Vec::with_capacity(self.flat_fields.len());
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.flat_fields.len());
        for (name, source) in &self.flat_fields {
            let array = match source {
                FieldSource::Column(spec) => match batch.column_by_name(&spec.column) {
                    Some(array) => array.clone(),
                    None => new_null_array(&DataType::Null, rows),
                },
                FieldSource::Constant(value) => {
                    constant_scalar(value)
                        .to_array_of_size(rows)
                        .map_err(|e| MappingError {
                            mapping: self.mapping.clone(),
                            message: format!("constant `{name}`: {e}"),
                        })?
                }
                FieldSource::MessageId => Arc::new(StringArray::from_iter_values(
                    message_ids.iter().map(|id| id.as_str()),
                )),
            };
            fields.push(Field::new(name, array.data_type().clone(), true));
            arrays.push(array);
        }
        RecordBatch::try_new_with_options(
            Arc::new(Schema::new(fields)),
            arrays,
            &arrow::array::RecordBatchOptions::new().with_row_count(Some(rows)),
        )
        .map_err(|e| MappingError {
            mapping: self.mapping.clone(),
            message: e.to_string(),
        })
    }
}

fn format_name(format: Option<ValueFormat>) -> &'static str {
    match format {
        None => "is",
        Some(ValueFormat::Json) => "json",
        Some(ValueFormat::String) => "string",
        Some(ValueFormat::UnixMs) => "unix_ms",
        Some(ValueFormat::UnixSeconds) => "unix_seconds",
        Some(ValueFormat::Rfc3339) => "rfc3339",
        Some(ValueFormat::Sha256) => "sha256",
        Some(ValueFormat::Sha256Email) => "sha256_email",
        Some(ValueFormat::Sha256EmailGoogle) => "sha256_email_google",
        Some(ValueFormat::Sha256Phone) => "sha256_phone",
        Some(ValueFormat::Sha256PhoneDigits) => "sha256_phone_digits",
        Some(ValueFormat::Sha256Name) => "sha256_name",
        Some(ValueFormat::Sha256City) => "sha256_city",
        Some(ValueFormat::Sha256State) => "sha256_state",
        Some(ValueFormat::Sha256Zip) => "sha256_zip",
        Some(ValueFormat::Sha256Country) => "sha256_country",
        Some(ValueFormat::Sha256Gender) => "sha256_gender",
        Some(ValueFormat::Sha256DateOfBirth) => "sha256_date_of_birth",
    }
}

fn join(names: &[&String]) -> String {
    names.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
}

/// A constant as an Arrow scalar: strings, booleans and numbers keep their type; lists and
/// maps are carried as their JSON text.
fn constant_scalar(value: &serde_json::Value) -> ScalarValue {
    match value {
        serde_json::Value::Null => ScalarValue::Null,
        serde_json::Value::Bool(b) => ScalarValue::Boolean(Some(*b)),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => ScalarValue::Int64(Some(i)),
            None => ScalarValue::Float64(n.as_f64()),
        },
        serde_json::Value::String(s) => ScalarValue::Utf8(Some(s.clone())),
        other => ScalarValue::Utf8(Some(other.to_string())),
    }
}

fn render_tree(
    tree: &FieldTree,
    slot_of: &dyn Fn(&FieldSpec) -> Option<usize>,
    out: &mut TemplateBuilder,
) -> Result<(), String> {
    match tree {
        FieldTree::Leaf(FieldSource::Column(spec)) => {
            let i = slot_of(spec).ok_or_else(|| format!("internal: column `{}` has no slot", spec.column))?;
            out.segment(Segment::Column(i));
        }
        FieldTree::Leaf(FieldSource::Constant(value)) => {
            let text = serde_json::to_vec(value).map_err(|e| e.to_string())?;
            out.literal(&text);
        }
        FieldTree::Leaf(FieldSource::MessageId) => out.segment(Segment::MessageId),
        FieldTree::Object(children) => {
            out.literal(b"{");
            for (i, (name, child)) in children.iter().enumerate() {
                if i > 0 {
                    out.literal(b",");
                }
                write_json_string(&mut out.literal, name);
                out.literal(b":");
                render_tree(child, slot_of, out)?;
            }
            out.literal(b"}");
        }
    }
    Ok(())
}

/// The row hash column of a materialised batch, as a slice.
pub fn hashes_of(array: &ArrayRef) -> Option<&[u64]> {
    array
        .as_primitive_opt::<UInt64Type>()
        .filter(|a| a.null_count() == 0)
        .map(|a| a.values().as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int64Array, StringArray};

    fn config(yaml: &str) -> MappingConfig {
        let mut config: MappingConfig = serde_norway::from_str(yaml).unwrap();
        config.resolve_send(false);
        config
    }

    fn users() -> RecordBatch {
        RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef),
            (
                "email",
                Arc::new(StringArray::from(vec![Some("a@x.io"), None])) as ArrayRef,
            ),
            (
                "plan",
                Arc::new(StringArray::from(vec!["pro", "free"])) as ArrayRef,
            ),
            ("score", Arc::new(Float64Array::from(vec![0.5, 2.0])) as ArrayRef),
        ])
        .unwrap()
    }

    fn bodies(plan: &MappingPlan, batch: &RecordBatch) -> (Vec<String>, Vec<String>) {
        let out = plan
            .encode(
                batch,
                vec![Op::Added; batch.num_rows()],
                &vec![7; batch.num_rows()],
            )
            .unwrap()
            .records;
        let text = |c: &JsonColumn| {
            (0..c.len())
                .map(|i| String::from_utf8(c.get(i).to_vec()).unwrap())
                .collect::<Vec<_>>()
        };
        (text(&out.bodies), text(&out.keys))
    }

    #[test]
    fn fields_nest_by_dotted_names_and_constants_are_literals() {
        let c = config(
            r#"{model: users, destination: crm, fields: {email: email, "traits.plan": plan, "traits.score": score}, constants: {"context.source": sluice, "context.version": 2}}"#,
        );
        let batch = users();
        let plan = MappingPlan::compile("m", &c, "users", &batch.schema(), &["id".into()], None).unwrap();
        let (bodies, keys) = bodies(&plan, &batch);
        assert_eq!(
            bodies[0],
            r#"{"email":"a@x.io","traits":{"plan":"pro","score":0.5},"context":{"source":"sluice","version":2}}"#
        );
        assert_eq!(
            bodies[1],
            r#"{"email":null,"traits":{"plan":"free","score":2.0},"context":{"source":"sluice","version":2}}"#
        );
        assert_eq!(keys, [r#"{"id":1}"#, r#"{"id":2}"#]);
        for body in bodies {
            serde_json::from_str::<serde_json::Value>(&body).unwrap();
        }
    }

    #[test]
    fn without_fields_every_column_is_sent() {
        let c = config("{model: users, destination: crm, constants: {source: sluice}}");
        let batch = users();
        let plan = MappingPlan::compile("m", &c, "users", &batch.schema(), &["id".into()], None).unwrap();
        let (bodies, _) = bodies(&plan, &batch);
        assert_eq!(
            bodies[0],
            r#"{"id":1,"email":"a@x.io","plan":"pro","score":0.5,"source":"sluice"}"#
        );
    }

    #[test]
    fn field_columns_carry_destination_names() {
        let c =
            config(r#"{model: users, destination: crm, fields: {"traits.plan": plan}, constants: {n: 1}}"#);
        let batch = users();
        let plan = MappingPlan::compile("m", &c, "users", &batch.schema(), &["id".into()], None).unwrap();
        let out = plan.encode(&batch, vec![Op::Added; 2], &[1, 2]).unwrap().records;
        let names: Vec<_> = out
            .fields
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(names, ["traits.plan", "n"]);
        assert_eq!(out.fields.num_rows(), 2);
    }

    #[test]
    fn unknown_columns_and_conflicts_are_reported() {
        let c = config("{model: users, destination: crm, fields: {email: emial}}");
        let err = MappingPlan::compile("m", &c, "users", &users().schema(), &["id".into()], None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "mapping `m`: maps column `emial`, which model `users` does not return (its columns: id, email, plan, score)"
        );
        let c = config(r#"{model: users, destination: crm, fields: {traits: plan, "traits.plan": plan}}"#);
        let err = FieldTree::build("m", &c).unwrap_err().to_string();
        assert!(
            err.contains("`traits` is given a value and is also the parent of `traits.plan`"),
            "{err}"
        );
        let c = config(r#"{model: users, destination: crm, fields: {"a..b": plan}}"#);
        assert!(FieldTree::build("m", &c).is_err());
    }

    #[test]
    fn missing_columns_in_old_rows_are_null() {
        let c = config("{model: users, destination: crm, fields: {email: email, plan: plan}}");
        let plan = MappingPlan::compile("m", &c, "users", &users().schema(), &["id".into()], None).unwrap();
        let old = RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(vec![9])) as ArrayRef),
            ("email", Arc::new(StringArray::from(vec!["o@x.io"])) as ArrayRef),
        ])
        .unwrap();
        let (bodies, _) = bodies(&plan, &old);
        assert_eq!(bodies[0], r#"{"email":"o@x.io","plan":null}"#);
    }

    fn identify() -> ActionSpec {
        use crate::destination::PayloadShape;
        ActionSpec::new(
            "identify",
            PayloadShape::default()
                .top_level(&["type", "userId", "anonymousId", "messageId", "context", "traits"])
                .container("traits")
                .fixed("type", serde_json::json!("identify"))
                .message_id("messageId")
                .identity(&["userId", "anonymousId"])
                .alias("user_id", "userId")
                .alias("message_id", "messageId"),
        )
    }

    fn encode_with(
        yaml: &str,
        batch: &RecordBatch,
        action: Option<&ActionSpec>,
    ) -> Result<EncodedBatch, MappingError> {
        let c = config(yaml);
        let plan = MappingPlan::compile("m", &c, "users", &batch.schema(), &["id".into()], action)?;
        plan.encode(
            batch,
            vec![Op::Added; batch.num_rows()],
            &vec![7; batch.num_rows()],
        )
    }

    fn body(encoded: &EncodedBatch, row: usize) -> serde_json::Value {
        serde_json::from_slice(encoded.records.bodies.get(row)).unwrap()
    }

    #[test]
    fn reserved_fields_stay_on_top_and_the_rest_goes_into_the_container() {
        let batch = RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef),
            (
                "user_id",
                Arc::new(StringArray::from(vec!["u1", "u2"])) as ArrayRef,
            ),
            (
                "plan",
                Arc::new(StringArray::from(vec!["pro", "free"])) as ArrayRef,
            ),
            (
                "ip",
                Arc::new(StringArray::from(vec!["10.0.0.1", "10.0.0.2"])) as ArrayRef,
            ),
        ])
        .unwrap();
        let encoded = encode_with(
            r#"{model: users, destination: s, fields: {"context.ip": ip}, columns: all, constants: {"address.city": Paris}}"#,
            &batch,
            Some(&identify()),
        )
        .unwrap();
        assert!(encoded.unsendable.is_empty());
        let first = body(&encoded, 0);
        let message_id = encoded.records.message_ids[0].to_string();
        assert_eq!(
            first,
            serde_json::json!({
                "type": "identify",
                "context": {"ip": "10.0.0.1"},
                "traits": {"id": 1, "plan": "pro", "address": {"city": "Paris"}},
                "userId": "u1",
                "messageId": message_id,
            })
        );
        // Key order: fixed fields first.
        assert!(
            std::str::from_utf8(encoded.records.bodies.get(0))
                .unwrap()
                .starts_with(r#"{"type":"identify","#)
        );
        assert_eq!(encoded.records.ids.get(1), br#"{"userId":"u2"}"#);
    }

    #[test]
    fn a_model_supplied_message_id_is_sent_verbatim() {
        let batch = RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(vec![1])) as ArrayRef),
            ("user_id", Arc::new(StringArray::from(vec!["u1"])) as ArrayRef),
            (
                "message_id",
                Arc::new(StringArray::from(vec!["evt-42"])) as ArrayRef,
            ),
        ])
        .unwrap();
        let encoded = encode_with("{model: users, destination: s}", &batch, Some(&identify())).unwrap();
        assert_eq!(body(&encoded, 0)["messageId"], "evt-42");
        assert!(body(&encoded, 0)["traits"].get("message_id").is_none());
    }

    #[test]
    fn records_without_an_identifier_fail_alone_and_mappings_without_one_do_not_compile() {
        let batch = RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(vec![1, 2, 3])) as ArrayRef),
            (
                "user_id",
                Arc::new(StringArray::from(vec![Some("u1"), None, Some("")])) as ArrayRef,
            ),
        ])
        .unwrap();
        let encoded = encode_with("{model: users, destination: s}", &batch, Some(&identify())).unwrap();
        let failed: Vec<usize> = encoded.unsendable.iter().map(|f| f.index).collect();
        assert_eq!(failed, [1, 2]);
        assert!(
            encoded.unsendable[0].error.contains("userId or anonymousId"),
            "{:?}",
            encoded.unsendable
        );

        let err = encode_with(
            "{model: users, destination: s, fields: {email: user_id}}",
            &batch,
            Some(&identify()),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("identifies records by `userId` or `anonymousId`"),
            "{err}"
        );
        assert!(err.contains("`user_id`"), "{err}");
    }

    #[test]
    fn a_columns_payload_skips_bodies_but_keeps_keys_ids_fields_and_checks() {
        let batch = RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(vec![1, 2, 3])) as ArrayRef),
            (
                "address",
                Arc::new(StringArray::from(vec![
                    Some(r#"{"city": "Paris"}"#),
                    Some("{not json"),
                    None,
                ])) as ArrayRef,
            ),
            (
                "plan",
                Arc::new(StringArray::from(vec!["pro", "free", "pro"])) as ArrayRef,
            ),
        ])
        .unwrap();
        let c = config(
            "{model: users, destination: s, fields: {address: {column: address, as: json}, tier: plan}}",
        );
        let plan = MappingPlan::compile("m", &c, "users", &batch.schema(), &["id".into()], None).unwrap();
        let ops = vec![Op::Added, Op::Updated, Op::Deleted];
        let json = plan
            .encode_for(&batch, ops.clone(), &[1, 2, 3], Payload::Json)
            .unwrap();
        let columns = plan
            .encode_for(&batch, ops, &[1, 2, 3], Payload::Columns)
            .unwrap();
        assert_eq!(columns.records.keys, json.records.keys);
        assert_eq!(columns.records.message_ids, json.records.message_ids);
        assert_eq!(columns.records.actions, json.records.actions);
        assert_eq!(columns.records.fields, json.records.fields);
        // The format's check still fails the record that cannot be sent as asked.
        assert_eq!(columns.unsendable, json.unsendable);
        assert_eq!(columns.unsendable.len(), 1);
        assert_eq!(columns.records.bodies.len(), 3);
        assert_eq!(columns.records.bodies.total_bytes(), 0);
        assert_eq!(columns.records.ids.total_bytes(), 0);
        // What a person reads of a failed record: the fields, as the body would have had them.
        let readable: serde_json::Value =
            serde_json::from_slice(&columns.records.readable_record(0)).unwrap();
        assert_eq!(readable["tier"], "pro");
        assert!(json.records.bodies.get(0).starts_with(b"{"));
        assert_eq!(&*json.records.readable_record(0), json.records.bodies.get(0));
    }

    #[test]
    fn a_columns_payload_still_finds_records_without_an_identity() {
        let batch = RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef),
            (
                "user",
                Arc::new(StringArray::from(vec![Some("u1"), None])) as ArrayRef,
            ),
        ])
        .unwrap();
        let c = config("{model: users, destination: s, fields: {user_id: user}}");
        let action = identify();
        let plan =
            MappingPlan::compile("m", &c, "users", &batch.schema(), &["id".into()], Some(&action)).unwrap();
        let json = plan
            .encode_for(&batch, vec![Op::Added; 2], &[1, 2], Payload::Json)
            .unwrap();
        let columns = plan
            .encode_for(&batch, vec![Op::Added; 2], &[1, 2], Payload::Columns)
            .unwrap();
        assert_eq!(columns.unsendable, json.unsendable);
        assert_eq!(
            columns.unsendable.iter().map(|f| f.index).collect::<Vec<_>>(),
            [1]
        );
    }

    #[test]
    fn json_columns_become_objects_and_invalid_json_fails_the_record() {
        let batch = RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(vec![1, 2, 3])) as ArrayRef),
            (
                "address",
                Arc::new(StringArray::from(vec![
                    Some(r#" {"city": "Paris", "zip": ["75001"]} "#),
                    Some("{not json"),
                    None,
                ])) as ArrayRef,
            ),
        ])
        .unwrap();
        let encoded = encode_with(
            "{model: users, destination: s, fields: {address: {column: address, as: json}, raw: address}}",
            &batch,
            None,
        )
        .unwrap();
        assert_eq!(
            body(&encoded, 0)["address"],
            serde_json::json!({"city": "Paris", "zip": ["75001"]})
        );
        assert!(body(&encoded, 0)["raw"].is_string());
        assert_eq!(encoded.unsendable.len(), 1);
        assert_eq!(encoded.unsendable[0].index, 1);
        assert!(
            encoded.unsendable[0]
                .error
                .contains("column `address` is not valid JSON"),
            "{}",
            encoded.unsendable[0].error
        );
        assert_eq!(body(&encoded, 2)["address"], serde_json::Value::Null);
    }

    #[test]
    fn values_can_be_written_as_strings_and_unix_times() {
        use arrow::array::TimestampMicrosecondArray;
        let batch = RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef),
            (
                "at",
                Arc::new(TimestampMicrosecondArray::from(vec![1_700_000_000_123_456, 0]).with_timezone("UTC"))
                    as ArrayRef,
            ),
            (
                "when",
                Arc::new(StringArray::from(vec!["2024-01-02T03:04:05Z", "yesterday"])) as ArrayRef,
            ),
        ])
        .unwrap();
        let encoded = encode_with(
            "{model: users, destination: s, fields: {uid: {column: id, as: string}, ms: {column: at, as: unix_ms}, s: {column: at, as: unix_seconds}, w: {column: when, as: unix_ms}}}",
            &batch,
            None,
        )
        .unwrap();
        let first = body(&encoded, 0);
        assert_eq!(first["uid"], "1");
        assert_eq!(first["ms"], 1_700_000_000_123i64);
        assert_eq!(first["s"], 1_700_000_000i64);
        assert_eq!(first["w"], 1_704_164_645_000i64);
        assert_eq!(encoded.unsendable.len(), 1);
        assert!(encoded.unsendable[0].error.contains("not a date or timestamp"));

        // RFC 3339 in UTC: from a timestamp, from ISO text with an offset, from Unix seconds.
        let encoded = encode_with(
            "{model: users, destination: s, fields: {a: {column: at, as: rfc3339}, w: {column: when, as: rfc3339}, i: {column: id, as: rfc3339}}}",
            &batch,
            None,
        )
        .unwrap();
        let first = body(&encoded, 0);
        assert_eq!(first["a"], "2023-11-14T22:13:20.123Z");
        assert_eq!(first["w"], "2024-01-02T03:04:05Z");
        assert_eq!(first["i"], "1970-01-01T00:00:01Z");
        assert_eq!(encoded.unsendable.len(), 1, "`yesterday` is no time");
    }

    #[test]
    fn the_update_column_turns_rows_into_updates_and_is_not_sent() {
        use arrow::array::BooleanArray;
        let batch = RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(vec![1, 2, 3])) as ArrayRef),
            (
                "user_id",
                Arc::new(StringArray::from(vec!["a", "b", "c"])) as ArrayRef,
            ),
            (
                "_update",
                Arc::new(BooleanArray::from(vec![Some(true), Some(false), None])) as ArrayRef,
            ),
        ])
        .unwrap();
        let c = config("{model: users, destination: s}");
        let plan = MappingPlan::compile(
            "m",
            &c,
            "users",
            &batch.schema(),
            &["id".into()],
            Some(&identify()),
        )
        .unwrap();
        let encoded = plan
            .encode(&batch, vec![Op::Added, Op::Updated, Op::Deleted], &[1, 2, 3])
            .unwrap();
        assert_eq!(
            encoded.records.actions,
            [RecordAction::Update, RecordAction::Upsert, RecordAction::Delete]
        );
        assert!(body(&encoded, 0)["traits"].get("_update").is_none());

        let bad = RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(vec![1])) as ArrayRef),
            ("user_id", Arc::new(StringArray::from(vec!["a"])) as ArrayRef),
            ("_update", Arc::new(StringArray::from(vec!["yes"])) as ArrayRef),
        ])
        .unwrap();
        let err = MappingPlan::compile("m", &c, "users", &bad.schema(), &["id".into()], Some(&identify()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be boolean"), "{err}");
    }

    #[test]
    fn columns_can_be_included_or_excluded() {
        let batch = users();
        let encoded = encode_with(
            "{model: users, destination: s, columns: {exclude: [score, email]}}",
            &batch,
            None,
        )
        .unwrap();
        assert_eq!(body(&encoded, 0), serde_json::json!({"id": 1, "plan": "pro"}));
        let encoded = encode_with(
            "{model: users, destination: s, fields: {e: email}, columns: {include: [plan]}}",
            &batch,
            None,
        )
        .unwrap();
        assert_eq!(
            body(&encoded, 0),
            serde_json::json!({"e": "a@x.io", "plan": "pro"})
        );
        let err = encode_with(
            "{model: users, destination: s, columns: {include: [nope]}}",
            &batch,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`columns` names `nope`"), "{err}");
    }

    #[test]
    fn required_fields_are_checked_when_compiling() {
        use crate::destination::PayloadShape;
        let track = ActionSpec::new(
            "track",
            PayloadShape::default()
                .top_level(&["event", "userId"])
                .container("properties")
                .required(&["event"])
                .identity(&["userId"]),
        );
        let batch = users();
        let err = encode_with(
            "{model: users, destination: s, fields: {userId: email}}",
            &batch,
            Some(&track),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("action `track` needs `event`"), "{err}");
        let encoded = encode_with(
            "{model: users, destination: s, fields: {userId: email}, constants: {event: Signed Up}}",
            &batch,
            Some(&track),
        )
        .unwrap();
        assert_eq!(body(&encoded, 0)["event"], "Signed Up");
        assert_eq!(encoded.unsendable.len(), 1, "row 2 has no email");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Rendering never panics, whatever the values and whatever `as:` asks, and every
        /// rendered record is valid JSON.
        #[test]
        fn rendering_never_panics_on_any_value(
            ints in proptest::collection::vec(proptest::option::of(proptest::num::i64::ANY), 1..20),
            floats in proptest::collection::vec(proptest::option::of(proptest::num::f64::ANY), 1..20),
            texts in proptest::collection::vec(proptest::option::of(".{0,12}"), 1..20),
            micros in proptest::collection::vec(proptest::option::of(-10_000_000_000_000_000i64..10_000_000_000_000_000), 1..20),
        ) {
            use arrow::array::{Date32Array, TimestampMicrosecondArray};
            let rows = ints.len().min(floats.len()).min(texts.len()).min(micros.len());
            let batch = RecordBatch::try_from_iter(vec![
                ("id", Arc::new(Int64Array::from_iter_values(0..rows as i64)) as ArrayRef),
                ("i", Arc::new(Int64Array::from(ints[..rows].to_vec())) as ArrayRef),
                ("f", Arc::new(Float64Array::from(floats[..rows].to_vec())) as ArrayRef),
                ("t", Arc::new(StringArray::from(texts[..rows].to_vec())) as ArrayRef),
                ("ts", Arc::new(TimestampMicrosecondArray::from(micros[..rows].to_vec()).with_timezone("UTC")) as ArrayRef),
                ("d", Arc::new(Date32Array::from(micros[..rows].iter().map(|m| m.map(|m| (m / 86_400_000_000) as i32)).collect::<Vec<_>>())) as ArrayRef),
            ]).unwrap();
            for format in ["json", "string", "unix_ms", "unix_seconds", "rfc3339"] {
                let yaml = format!(
                    "{{model: users, destination: s, columns: all, fields: {{a: {{column: t, as: {format}}}, b: {{column: ts, as: {format}}}, c: {{column: d, as: {format}}}, e: {{column: f, as: {}}}}}}}",
                    if format.starts_with("unix") || format == "rfc3339" { "string" } else { format }
                );
                let encoded = encode_with(&yaml, &batch, None).unwrap();
                for row in 0..rows {
                    let text = encoded.records.bodies.get(row);
                    proptest::prop_assert!(serde_json::from_slice::<serde_json::Value>(text).is_ok(), "{}", String::from_utf8_lossy(text));
                }
            }
        }
    }
}
