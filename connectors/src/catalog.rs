//! The connector types of this build, as the engine's [`ConnectorCatalog`] describes them: the
//! JSON Schema of each type's options is generated (schemars) from the struct its options are
//! parsed into, so the schema cannot drift from what the parser accepts.

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::Value;
use sluice_engine::connector_types::{ActionType, ConnectorCatalog, ConnectorType};

use crate::destinations::{
    braze, customerio, file, google_ads, google_sheets, hubspot, iterable, klaviyo, linkedin, meta, mixpanel,
    postgres as pg_destination, salesforce, segment, sfmc, snapchat, tiktok, webhook,
};
use crate::sources::{bigquery, databricks, files, mysql, postgres, snowflake, sqlite, sqlserver};

/// A schema with every subschema inline: a form walks it without resolving references, and
/// each secret is marked where it is used.
fn schema_of<T: JsonSchema>() -> Value {
    let generator: SchemaGenerator = SchemaSettings::draft2020_12()
        .with(|s| s.inline_subschemas = true)
        .into_generator();
    let mut schema = generator.into_root_schema_for::<T>().to_value();
    if let Value::Object(map) = &mut schema {
        // The struct's own name and doc title are noise in a form.
        map.remove("title");
        map.remove("$schema");
    }
    schema
}

/// `schema` without one of its properties (an option another type of the same struct owns).
fn without_property(mut schema: Value, property: &str) -> Value {
    if let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        properties.remove(property);
    }
    schema
}

fn connector(kind: &str, title: &str, summary: &str, options: Value) -> ConnectorType {
    ConnectorType {
        kind: kind.into(),
        title: title.into(),
        summary: summary.into(),
        options,
        actions: Vec::new(),
        mapping_options: None,
    }
}

fn with_actions(
    mut connector: ConnectorType,
    default: Option<&str>,
    actions: &[(&str, &str)],
) -> ConnectorType {
    connector.actions = actions
        .iter()
        .map(|(name, summary)| ActionType {
            name: (*name).into(),
            summary: (*summary).into(),
            default: default == Some(*name),
        })
        .collect();
    connector
}

fn with_mapping_options<T: JsonSchema>(mut connector: ConnectorType) -> ConnectorType {
    connector.mapping_options = Some(schema_of::<T>());
    connector
}

/// Every source and destination type, in the order a picker shows them.
pub fn catalog() -> ConnectorCatalog {
    let sources = vec![
        connector(
            "postgres",
            "PostgreSQL",
            "PostgreSQL, read with binary COPY; optionally through an SSH tunnel.",
            without_property(schema_of::<postgres::PostgresConfig>(), "unload"),
        ),
        connector(
            "redshift",
            "Amazon Redshift",
            "Amazon Redshift, read through a cursor over the Postgres wire protocol, or unloaded to S3 as Parquet; optionally through an SSH tunnel.",
            schema_of::<postgres::PostgresConfig>(),
        ),
        connector(
            "mysql",
            "MySQL / MariaDB",
            "MySQL and MariaDB, read with a streaming query; optionally through an SSH tunnel.",
            schema_of::<mysql::MysqlConfig>(),
        ),
        connector(
            "sqlserver",
            "Microsoft SQL Server",
            "SQL Server and Azure SQL over TDS with TLS; SQL authentication; optionally through an SSH tunnel.",
            schema_of::<sqlserver::SqlServerConfig>(),
        ),
        connector(
            "snowflake",
            "Snowflake",
            "Snowflake, over its drivers' protocol with results in Arrow; key-pair, OAuth or password authentication.",
            schema_of::<snowflake::SnowflakeConfig>(),
        ),
        connector(
            "bigquery",
            "Google BigQuery",
            "BigQuery: a dry run first, then the job's result through the Storage Read API (Arrow) or its pages, or exported to Cloud Storage; service account keys, workload identity federation or the metadata server.",
            schema_of::<bigquery::BigQueryConfig>(),
        ),
        connector(
            "databricks",
            "Databricks SQL",
            "A Databricks SQL warehouse, through the Statement Execution API with Arrow results; personal access token or OAuth M2M.",
            schema_of::<databricks::DatabricksConfig>(),
        ),
        connector(
            "sqlite",
            "SQLite",
            "A SQLite database file; the model's SQL runs in SQLite.",
            schema_of::<sqlite::SqliteConfig>(),
        ),
        connector(
            "files",
            "Files (Parquet, CSV, JSON)",
            "Parquet, CSV and NDJSON files, local or on S3, GCS or Azure, queried with DataFusion SQL.",
            schema_of::<files::FilesConfig>(),
        ),
    ];
    let destinations = vec![
        connector(
            "webhook",
            "Webhook",
            "HTTP POST of JSON batches of sluice's record envelope to any endpoint.",
            schema_of::<webhook::WebhookConfig>(),
        ),
        with_mapping_options::<hubspot::HubspotMappingOptions>(with_actions(
            connector(
                "hubspot",
                "HubSpot",
                "HubSpot CRM objects (contacts, companies, deals, tickets, custom objects) through the batch endpoints.",
                schema_of::<hubspot::HubspotConfig>(),
            ),
            Some("objects"),
            &[(
                "objects",
                "Upserts, updates or archives CRM objects of `options.object`",
            )],
        )),
        with_mapping_options::<salesforce::SalesforceOptions>(with_actions(
            connector(
                "salesforce",
                "Salesforce",
                "Salesforce sObject records through sObject collections or Bulk API 2.0, with an OAuth 2.0 client-credentials or JWT bearer token.",
                schema_of::<salesforce::SalesforceConfig>(),
            ),
            Some("objects"),
            &[(
                "objects",
                "Upserts, updates or deletes records of the sObject `options.object`",
            )],
        )),
        with_actions(
            connector(
                "segment",
                "Segment-compatible collector",
                "The Segment-spec HTTP tracking API (POST /v1/batch): Segment, RudderStack and other compatible collectors.",
                schema_of::<segment::SegmentConfig>(),
            ),
            None,
            &[
                ("identify", "A user's traits"),
                ("track", "An event a user did"),
                ("group", "A user's group (account) and its traits"),
                ("page", "A page view"),
                ("screen", "A mobile screen view"),
            ],
        ),
        with_mapping_options::<mixpanel::MixpanelOptions>(with_actions(
            connector(
                "mixpanel",
                "Mixpanel",
                "Mixpanel events through /import and user and group profiles through /engage and /groups.",
                schema_of::<mixpanel::MixpanelConfig>(),
            ),
            None,
            &[
                ("track", "Events, imported with their time"),
                ("profile", "Sets user profile properties"),
                ("profile_unset", "Removes user profile properties"),
                ("group", "Sets group profile properties (`options.group_key`)"),
            ],
        )),
        with_mapping_options::<google_ads::MappingOptions>(with_actions(
            connector(
                "google_ads",
                "Google Ads",
                "Offline conversions and Customer Match lists in Google Ads, through Google's Data Manager API, with customer information hashed as Google asks.",
                schema_of::<google_ads::GoogleAdsConfig>(),
            ),
            None,
            &[
                (
                    "conversions",
                    "Offline conversions (options.conversion_action_id)",
                ),
                (
                    "customer_match",
                    "Customer Match list members (options.user_list_name or user_list_id)",
                ),
            ],
        )),
        with_actions(
            connector(
                "tiktok",
                "TikTok",
                "TikTok Events API events (web, app, offline or CRM), with customer information hashed as TikTok asks.",
                schema_of::<tiktok::TiktokConfig>(),
            ),
            Some("events"),
            &[("events", "Events (Events API 2.0)")],
        ),
        with_actions(
            connector(
                "snapchat",
                "Snapchat",
                "Snap Conversions API v3 events, with customer information hashed as Snap asks.",
                schema_of::<snapchat::SnapchatConfig>(),
            ),
            Some("conversions"),
            &[("conversions", "Conversion events (Conversions API v3)")],
        ),
        with_actions(
            connector(
                "meta",
                "Meta",
                "Meta Conversions API events and Custom Audience members, with customer information hashed as Meta asks.",
                schema_of::<meta::MetaConfig>(),
            ),
            None,
            &[
                ("conversions", "Conversion events (Conversions API)"),
                (
                    "audience",
                    "Custom Audience members (options.audience_name or audience_id)",
                ),
            ],
        ),
        with_actions(
            connector(
                "braze",
                "Braze",
                "Braze user attributes, custom events and purchases through /users/track, and user deletion.",
                schema_of::<braze::BrazeConfig>(),
            ),
            None,
            &[
                ("attributes", "User attributes"),
                ("events", "Custom events"),
                ("purchases", "Purchases"),
            ],
        ),
        with_actions(
            connector(
                "iterable",
                "Iterable",
                "Iterable users through /api/users/bulkUpdate, events through /api/events/trackBulk, and user deletion.",
                schema_of::<iterable::IterableConfig>(),
            ),
            None,
            &[("users", "User profile fields"), ("events", "Custom events")],
        ),
        with_mapping_options::<customerio::CustomerioOptions>(with_actions(
            connector(
                "customerio",
                "Customer.io",
                "Customer.io people, their events, and objects through the Track API v2 batch endpoint.",
                schema_of::<customerio::CustomerioConfig>(),
            ),
            None,
            &[
                ("person", "People and their attributes"),
                ("event", "Events a person did"),
                (
                    "object",
                    "Objects (companies, accounts, ...) of `options.object_type_id`",
                ),
            ],
        )),
        with_mapping_options::<klaviyo::KlaviyoOptions>(with_actions(
            connector(
                "klaviyo",
                "Klaviyo",
                "Klaviyo profiles and events through bulk jobs, and list subscriptions.",
                schema_of::<klaviyo::KlaviyoConfig>(),
            ),
            None,
            &[
                ("profiles", "Profiles and their properties"),
                ("events", "Events of a metric"),
                ("subscribe", "Subscribes profiles to a list (`options.list_id`)"),
            ],
        )),
        with_mapping_options::<linkedin::ConversionOptions>(with_actions(
            connector(
                "linkedin",
                "LinkedIn",
                "LinkedIn Conversions API events, matched by hashed email, LinkedIn's click id or the member's name and company.",
                schema_of::<linkedin::LinkedinConfig>(),
            ),
            Some("conversions"),
            &[(
                "conversions",
                "Conversion events of a conversion rule (options.conversion_id)",
            )],
        )),
        with_mapping_options::<sfmc::DataExtensionOptions>(with_actions(
            connector(
                "salesforce_marketing_cloud",
                "Salesforce Marketing Cloud",
                "Data extension rows upserted through the REST API and deleted through SOAP, with the installed package's client credentials.",
                schema_of::<sfmc::SfmcConfig>(),
            ),
            Some("data_extension"),
            &[(
                "data_extension",
                "Rows of a data extension (options.external_key and keys)",
            )],
        )),
        with_mapping_options::<google_sheets::SheetOptions>(with_actions(
            connector(
                "google_sheets",
                "Google Sheets",
                "A sheet kept equal to the model, through the Sheets API v4 with a service account.",
                schema_of::<google_sheets::SheetsConfig>(),
            ),
            Some("rows"),
            &[("rows", "Keeps the sheet's rows equal to the model's")],
        )),
        with_mapping_options::<pg_destination::TableOptions>(with_actions(
            connector(
                "postgres",
                "PostgreSQL",
                "Rows written into a PostgreSQL table (upsert, update, insert or mirror).",
                schema_of::<postgres::PostgresConfig>(),
            ),
            Some("table"),
            &[("table", "Writes rows into `options.table`")],
        )),
        connector(
            "file",
            "File (JSONL, CSV, Parquet)",
            "Each run's records as one JSONL, CSV or Parquet file, in a local directory or on object storage.",
            schema_of::<file::FileConfig>(),
        ),
    ];
    ConnectorCatalog {
        sources,
        destinations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DESTINATION_TYPES, SOURCE_TYPES};
    use serde_json::json;

    #[test]
    fn every_type_is_described_once() {
        let catalog = catalog();
        let mut sources: Vec<&str> = catalog.sources.iter().map(|c| c.kind.as_str()).collect();
        let mut destinations: Vec<&str> = catalog.destinations.iter().map(|c| c.kind.as_str()).collect();
        sources.sort_unstable();
        destinations.sort_unstable();
        let mut known_sources = SOURCE_TYPES.to_vec();
        let mut known_destinations = DESTINATION_TYPES.to_vec();
        known_sources.sort_unstable();
        known_destinations.sort_unstable();
        assert_eq!(sources, known_sources);
        assert_eq!(destinations, known_destinations);
    }

    #[test]
    fn actions_are_the_ones_the_destinations_take() {
        let catalog = catalog();
        let names = |kind: &str| -> Vec<String> {
            let found = catalog
                .destination(kind)
                .map(|c| c.actions.iter().map(|a| a.name.clone()).collect());
            found.unwrap_or_default()
        };
        for (kind, actions) in [
            ("segment", segment::ACTIONS),
            ("mixpanel", mixpanel::ACTIONS),
            ("braze", braze::ACTIONS),
            ("meta", meta::ACTIONS),
            ("tiktok", tiktok::ACTIONS),
            ("google_ads", google_ads::ACTIONS),
            ("linkedin", linkedin::ACTIONS),
            ("snapchat", snapchat::ACTIONS),
            ("iterable", iterable::ACTIONS),
            ("customerio", customerio::ACTIONS),
            ("klaviyo", klaviyo::ACTIONS),
        ] {
            assert_eq!(names(kind), actions.to_vec(), "{kind}");
        }
    }

    /// Every option whose name looks like a credential is declared secret by its type
    /// (`Secret`/`SecretUrl`, the `x-sluice-secret` keyword), so redaction and sealing do not
    /// depend on a name rule a new connector's author would have to know.
    #[test]
    fn credential_looking_options_are_declared_secret() {
        fn declared(schema: &Value) -> bool {
            schema.get(sluice_engine::SECRET_KEYWORD).is_some()
                || ["anyOf", "oneOf", "allOf"].iter().any(|k| {
                    schema[*k]
                        .as_array()
                        .is_some_and(|branches| branches.iter().any(declared))
                })
        }
        fn walk(connector: &str, schema: &Value, path: &str, missing: &mut Vec<String>) {
            let mut nodes = vec![schema];
            for k in ["anyOf", "oneOf", "allOf"] {
                if let Some(branches) = schema[k].as_array() {
                    nodes.extend(branches);
                }
            }
            for node in nodes {
                if let Some(properties) = node["properties"].as_object() {
                    for (key, property) in properties {
                        let here = format!("{path}.{key}");
                        // Free-form object_store option maps are judged key by key at run time.
                        let free_form = key == "options";
                        let string_like = property["type"] == "string"
                            || property["anyOf"]
                                .as_array()
                                .is_some_and(|b| b.iter().any(|b| b["type"] == "string"))
                            || property["additionalProperties"]["type"] == "string";
                        if sluice_engine::secrets::is_secret_key(key)
                            && !free_form
                            && string_like
                            && !declared(property)
                            && !declared(&property["additionalProperties"])
                        {
                            missing.push(format!("{connector}{here}"));
                        }
                        walk(connector, property, &here, missing);
                    }
                }
            }
        }
        let catalog = catalog();
        let mut missing = Vec::new();
        for connector in catalog.sources.iter().chain(&catalog.destinations) {
            walk(&connector.kind, &connector.options, "", &mut missing);
        }
        assert!(missing.is_empty(), "declare these options `Secret`: {missing:?}");
        // And the webhook's address is a credential as a whole.
        let webhook = catalog
            .destination("webhook")
            .map(|c| c.options["properties"]["url"].clone());
        assert_eq!(
            webhook.map(|u| u[sluice_engine::SECRET_KEYWORD].clone()),
            Some(json!("url"))
        );
    }

    /// The options a user types secrets into are write-only in the served catalog.
    #[test]
    fn secret_options_are_write_only() {
        let catalog = catalog().with_secrets_marked();
        let option = |connector: Option<&ConnectorType>, path: &[&str]| -> Value {
            let mut schema = connector.map(|c| c.options.clone()).unwrap_or(Value::Null);
            for key in path {
                schema = schema["properties"][*key].clone();
                // An optional nested object is `anyOf [object, null]`.
                if let Some(object) = schema["anyOf"]
                    .as_array()
                    .and_then(|b| b.iter().find(|b| b["type"] == "object"))
                {
                    schema = object.clone();
                }
            }
            schema
        };
        for (kind, path) in [
            ("postgres", &["password"][..]),
            ("mysql", &["password"]),
            ("sqlserver", &["password"]),
        ] {
            assert_eq!(
                option(catalog.source(kind), path)["writeOnly"],
                true,
                "{kind} {path:?}"
            );
        }
        for (kind, path) in [
            ("hubspot", &["token"][..]),
            ("segment", &["write_key"]),
            ("braze", &["api_key"]),
            ("meta", &["access_token"]),
            ("tiktok", &["access_token"]),
            ("google_ads", &["service_account"]),
            ("linkedin", &["access_token"]),
            ("salesforce_marketing_cloud", &["client_secret"]),
            ("snapchat", &["access_token"]),
            ("iterable", &["api_key"]),
            ("klaviyo", &["api_key"]),
            ("salesforce", &["client_secret"]),
            ("salesforce", &["private_key"]),
            ("mixpanel", &["api_secret"]),
            ("mixpanel", &["service_account", "secret"]),
            ("mixpanel", &["service_account", "username"]),
            ("postgres", &["password"]),
        ] {
            assert_eq!(
                option(catalog.destination(kind), path)["writeOnly"],
                true,
                "{kind} {path:?}"
            );
        }
        let headers = option(catalog.destination("webhook"), &["headers"]);
        assert_eq!(headers["additionalProperties"]["writeOnly"], true);
        // Not secrets: where to connect, and as whom.
        assert!(
            option(catalog.source("postgres"), &["host"])
                .get("writeOnly")
                .is_none()
        );
        assert!(
            option(catalog.source("postgres"), &["user"])
                .get("writeOnly")
                .is_none()
        );
        let tunnel = option(catalog.source("postgres"), &["ssh_tunnel", "host_key"]);
        assert!(
            tunnel.is_object() && tunnel.get("writeOnly").is_none(),
            "{tunnel}"
        );
    }
}
