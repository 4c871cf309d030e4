//! Mappings: from a model's rows to a destination's records.
//!
//! A mapping's `fields` (destination field <- model column) and `constants` form a tree by their
//! dotted names (`traits.address.city`). The tree is compiled once per run against the model's
//! schema into a template: literal JSON text (keys, braces, constants) interleaved with column
//! slots. Encoding a batch renders each used column once ([`crate::json`]) and then copies
//! fragments into the template, record after record.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, new_null_array};
use arrow::datatypes::{DataType, Field, Schema, UInt64Type};
use datafusion::scalar::ScalarValue;
use indexmap::IndexMap;

use crate::config::{MappingConfig, Op};
use crate::destination::{MessageId, OutgoingBatch};
use crate::error::MappingError;
use crate::json::{JsonColumn, encode_column, null_column, write_json_string};

/// Where a destination field's value comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldSource {
    Column(String),
    Constant(serde_json::Value),
}

/// The nested shape of a mapping's output.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldTree {
    Leaf(FieldSource),
    Object(IndexMap<String, FieldTree>),
}

impl FieldTree {
    /// Builds the tree of a mapping's explicit fields and constants. With no `fields`, the
    /// columns are added at compile time (every model column under its own name).
    pub fn build(mapping: &str, config: &MappingConfig) -> Result<Self, MappingError> {
        let mut root = FieldTree::Object(IndexMap::new());
        if let Some(fields) = &config.fields {
            for (destination, column) in fields {
                root.insert(mapping, destination, FieldSource::Column(column.clone()))?;
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

    fn columns(&self, out: &mut Vec<String>) {
        match self {
            FieldTree::Leaf(FieldSource::Column(c)) => {
                if !out.contains(c) {
                    out.push(c.clone());
                }
            }
            FieldTree::Leaf(FieldSource::Constant(_)) => {}
            FieldTree::Object(children) => children.values().for_each(|c| c.columns(out)),
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
    /// Index into the plan's columns.
    Column(usize),
}

/// A sequence of segments that renders one JSON object per row.
#[derive(Debug, Clone)]
struct Template(Vec<Segment>);

impl Template {
    fn render(&self, columns: &[JsonColumn], rows: usize) -> JsonColumn {
        let estimate: usize = self
            .0
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => l.len() * rows,
                Segment::Column(c) => columns[*c].total_bytes(),
            })
            .sum();
        let mut out = JsonColumn::with_capacity(rows, estimate);
        for row in 0..rows {
            let buf = out.buffer();
            for segment in &self.0 {
                match segment {
                    Segment::Literal(bytes) => buf.extend_from_slice(bytes),
                    Segment::Column(c) => buf.extend_from_slice(columns[*c].get(row)),
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

    fn column(&mut self, index: usize) {
        if !self.literal.is_empty() {
            self.segments
                .push(Segment::Literal(std::mem::take(&mut self.literal)));
        }
        self.segments.push(Segment::Column(index));
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
    /// Model columns the payload uses, in first-use order.
    columns: Vec<String>,
    key_columns: Vec<String>,
    body: Template,
    key: Template,
    /// Destination fields in order, flattened (`traits.plan`), with their source.
    flat_fields: Vec<(String, FieldSource)>,
    send: Vec<Op>,
}

impl MappingPlan {
    /// Compiles `config` for a model whose rows have `schema` and primary key `key_columns`.
    pub fn compile(
        mapping: &str,
        config: &MappingConfig,
        model: &str,
        schema: &Schema,
        key_columns: &[String],
    ) -> Result<Self, MappingError> {
        let err = |message: String| MappingError {
            mapping: mapping.to_string(),
            message,
        };
        let mut tree = FieldTree::build(mapping, config)?;
        let model_columns: Vec<&String> = schema
            .fields()
            .iter()
            .map(|f| f.name())
            .filter(|n| !n.starts_with(sluice_snapshots::RESERVED_PREFIX))
            .collect();
        if config.fields.is_none() {
            // Every model column under its own name, before the constants.
            let FieldTree::Object(constants) = tree else {
                return Err(err("internal: mapping tree is not an object".into()));
            };
            let mut root = FieldTree::Object(IndexMap::new());
            for column in &model_columns {
                root.insert(mapping, column, FieldSource::Column((*column).clone()))
                    .map_err(|e| {
                        err(format!(
                            "{} (model column names are used as field names when `fields` is not given)",
                            e.message
                        ))
                    })?;
            }
            let mut flat = Vec::new();
            FieldTree::Object(constants).flatten("", &mut flat);
            for (path, source) in flat {
                root.insert(mapping, &path, source)?;
            }
            tree = root;
        }
        let mut columns = Vec::new();
        tree.columns(&mut columns);
        for column in &columns {
            if schema.field_with_name(column).is_err() {
                let available: Vec<&str> = model_columns.iter().map(|s| s.as_str()).collect();
                return Err(err(format!(
                    "maps column `{column}`, which model `{model}` does not return (its columns: {})",
                    available.join(", ")
                )));
            }
        }
        let mut all_columns = columns.clone();
        for key in key_columns {
            if !all_columns.contains(key) {
                all_columns.push(key.clone());
            }
        }
        let index: HashMap<&str, usize> = all_columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i))
            .collect();

        let mut body = TemplateBuilder::new();
        render_tree(&tree, &index, &mut body).map_err(err)?;

        let mut key = TemplateBuilder::new();
        key.literal(b"{");
        for (i, column) in key_columns.iter().enumerate() {
            if i > 0 {
                key.literal(b",");
            }
            write_json_string(&mut key.literal, column);
            key.literal(b":");
            key.column(index[column.as_str()]);
        }
        key.literal(b"}");

        let mut flat_fields = Vec::new();
        tree.flatten("", &mut flat_fields);
        Ok(Self {
            mapping: mapping.to_string(),
            columns: all_columns,
            key_columns: key_columns.to_vec(),
            body: body.finish(),
            key: key.finish(),
            flat_fields,
            send: config.send.clone(),
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

    /// Model columns the payload reads (mapped columns, then key columns).
    pub fn used_columns(&self) -> &[String] {
        &self.columns
    }

    /// Encodes the rows of `batch` as outgoing records. `ops[i]` and `row_hashes[i]` describe
    /// row `i`. A mapped column missing from `batch` (a deleted row from an older snapshot whose
    /// columns differed) is sent as null.
    pub fn encode(
        &self,
        batch: &RecordBatch,
        ops: Vec<Op>,
        row_hashes: &[u64],
    ) -> Result<OutgoingBatch, MappingError> {
        let rows = batch.num_rows();
        let err = |message: String| MappingError {
            mapping: self.mapping.clone(),
            message,
        };
        let mut rendered = Vec::with_capacity(self.columns.len());
        for column in &self.columns {
            match batch.column_by_name(column) {
                Some(array) => rendered.push(
                    encode_column(array)
                        .map_err(|e| err(format!("cannot encode column `{column}` as JSON: {e}")))?,
                ),
                None => rendered.push(null_column(rows)),
            }
        }
        let bodies = self.body.render(&rendered, rows);
        let keys = self.key.render(&rendered, rows);
        let message_ids = (0..rows)
            .map(|i| MessageId::new(&self.mapping, keys.get(i), row_hashes[i], ops[i]))
            .collect();
        let fields = self.field_columns(batch)?;
        Ok(OutgoingBatch {
            ops,
            message_ids,
            keys,
            bodies,
            fields,
        })
    }

    /// The mapped fields as Arrow columns named by destination field.
    fn field_columns(&self, batch: &RecordBatch) -> Result<RecordBatch, MappingError> {
        let rows = batch.num_rows();
        let mut fields = Vec::with_capacity(self.flat_fields.len());
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.flat_fields.len());
        for (name, source) in &self.flat_fields {
            let array = match source {
                FieldSource::Column(column) => match batch.column_by_name(column) {
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
    index: &HashMap<&str, usize>,
    out: &mut TemplateBuilder,
) -> Result<(), String> {
    match tree {
        FieldTree::Leaf(FieldSource::Column(column)) => {
            let i = index
                .get(column.as_str())
                .ok_or_else(|| format!("internal: column `{column}` has no slot"))?;
            out.column(*i);
        }
        FieldTree::Leaf(FieldSource::Constant(value)) => {
            let text = serde_json::to_vec(value).map_err(|e| e.to_string())?;
            out.literal(&text);
        }
        FieldTree::Object(children) => {
            out.literal(b"{");
            for (i, (name, child)) in children.iter().enumerate() {
                if i > 0 {
                    out.literal(b",");
                }
                write_json_string(&mut out.literal, name);
                out.literal(b":");
                render_tree(child, index, out)?;
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
            .unwrap();
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
        let plan = MappingPlan::compile("m", &c, "users", &batch.schema(), &["id".into()]).unwrap();
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
        let plan = MappingPlan::compile("m", &c, "users", &batch.schema(), &["id".into()]).unwrap();
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
        let plan = MappingPlan::compile("m", &c, "users", &batch.schema(), &["id".into()]).unwrap();
        let out = plan.encode(&batch, vec![Op::Added; 2], &[1, 2]).unwrap();
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
        let err = MappingPlan::compile("m", &c, "users", &users().schema(), &["id".into()])
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
        let plan = MappingPlan::compile("m", &c, "users", &users().schema(), &["id".into()]).unwrap();
        let old = RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(vec![9])) as ArrayRef),
            ("email", Arc::new(StringArray::from(vec!["o@x.io"])) as ArrayRef),
        ])
        .unwrap();
        let (bodies, _) = bodies(&plan, &old);
        assert_eq!(bodies[0], r#"{"email":"o@x.io","plan":null}"#);
    }
}
