//! OpenAPI schemas of the definitions' types whose YAML forms serde's derive does not describe
//! (a column or a list of them, the schedule shapes, ...), so the API's document is generated
//! from the same types `sluice.yaml` is parsed into.

use std::borrow::Cow;

use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type,
};
use utoipa::openapi::{RefOr, schema::SchemaType};
use utoipa::{PartialSchema, ToSchema};

use crate::config::{ColumnSelection, FieldSpec, PrimaryKey, Schedule, ValueFormat};

fn string() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

fn strings() -> ArrayBuilder {
    ArrayBuilder::new().items(string())
}

impl PartialSchema for PrimaryKey {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(string().min_length(Some(1)))
            .item(strings().min_items(Some(1)))
            .description(Some("A column, or a list of columns, that identifies a row"))
            .into()
    }
}

impl ToSchema for PrimaryKey {
    fn name() -> Cow<'static, str> {
        "PrimaryKey".into()
    }
}

impl PartialSchema for Schedule {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(
                string()
                    .enum_values(Some(["manual"]))
                    .description(Some("Only on demand")),
            )
            .item(
                ObjectBuilder::new()
                    .property(
                        "every",
                        string().description(Some("An interval of at least 1m: 15m, 2h, 1d, 1h30m")),
                    )
                    .required("every")
                    .additional_properties(Some(AdditionalProperties::FreeForm(false)))
                    .description(Some("An interval after the previous run started")),
            )
            .item(
                ObjectBuilder::new()
                    .property(
                        "days",
                        ArrayBuilder::new().items(
                            string().enum_values(Some(["mon", "tue", "wed", "thu", "fri", "sat", "sun"])),
                        ),
                    )
                    .property("at", string().description(Some("HH:MM, local time")))
                    .property(
                        "timezone",
                        string().description(Some("An IANA time zone (default UTC)")),
                    )
                    .required("at")
                    .additional_properties(Some(AdditionalProperties::FreeForm(false)))
                    .description(Some("Weekdays (all when left out) at a local time")),
            )
            .item(
                ObjectBuilder::new()
                    .property(
                        "cron",
                        string().description(Some("5 fields, or 6 with seconds; @hourly and the like")),
                    )
                    .property("timezone", string())
                    .required("cron")
                    .additional_properties(Some(AdditionalProperties::FreeForm(false)))
                    .description(Some("A cron expression evaluated in a time zone")),
            )
            .item(
                ObjectBuilder::new()
                    .property("after", ArrayBuilder::new().items(string()).min_items(Some(1)))
                    .required("after")
                    .additional_properties(Some(AdditionalProperties::FreeForm(false)))
                    .description(Some(
                        "After other mappings: once each has finished a successful run since this one last started",
                    )),
            )
            .item(
                ObjectBuilder::new()
                    .property(
                        "after_dbt",
                        OneOfBuilder::new()
                            .item(
                                ObjectBuilder::new()
                                    .schema_type(Type::Boolean)
                                    .enum_values(Some([true]))
                                    .description(Some("After dbt builds the dbt models the mapping's model reads, or any dbt Cloud job succeeds")),
                            )
                            .item(
                                ObjectBuilder::new()
                                    .property(
                                        "jobs",
                                        ArrayBuilder::new().items(
                                            OneOfBuilder::new()
                                                .item(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0)))
                                                .item(string().min_length(Some(1))),
                                        ),
                                    )
                                    .additional_properties(Some(AdditionalProperties::FreeForm(false)))
                                    .description(Some("dbt Cloud jobs (ids or names) whose successful runs start the mapping; none: as `true`")),
                            ),
                    )
                    .required("after_dbt")
                    .additional_properties(Some(AdditionalProperties::FreeForm(false)))
                    .description(Some(
                        "After dbt: when a dbt Cloud job's completion webhook (POST /api/v1/triggers/dbt) or a new run_results.json says dbt built what the mapping reads",
                    )),
            )
            .description(Some("When the mapping runs"))
            .into()
    }
}

impl ToSchema for Schedule {
    fn name() -> Cow<'static, str> {
        "Schedule".into()
    }
}

impl PartialSchema for FieldSpec {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(string().description(Some("A model column")))
            .item(
                ObjectBuilder::new()
                    .property("column", string())
                    .property("as", ValueFormat::schema())
                    .required("column")
                    .additional_properties(Some(AdditionalProperties::FreeForm(false))),
            )
            .description(Some("The model column a destination field takes its value from"))
            .into()
    }
}

impl ToSchema for FieldSpec {
    fn name() -> Cow<'static, str> {
        "FieldSpec".into()
    }
}

impl PartialSchema for ColumnSelection {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(string().enum_values(Some(["all", "none"])))
            .item(
                ObjectBuilder::new()
                    .property("include", strings())
                    .required("include")
                    .additional_properties(Some(AdditionalProperties::FreeForm(false))),
            )
            .item(
                ObjectBuilder::new()
                    .property("exclude", strings())
                    .required("exclude")
                    .additional_properties(Some(AdditionalProperties::FreeForm(false))),
            )
            .description(Some("Model columns also sent under their own names"))
            .into()
    }
}

impl ToSchema for ColumnSelection {
    fn name() -> Cow<'static, str> {
        "ColumnSelection".into()
    }
}

/// A source's or destination's definition: its `type` and that type's own options.
pub fn connector_schema(what: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::Object))
        .property("type", string().description(Some(format!("The {what} type (see the README)"))))
        .required("type")
        .additional_properties(Some(AdditionalProperties::FreeForm(true)))
        .description(Some(format!(
            "A {what} as sluice.yaml writes it: `type` and the type's options. Secrets are write-only: shown as \"********\", kept when sent back so."
        )))
        .into()
}
