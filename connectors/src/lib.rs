//! sluice's connectors: sources and destinations, adapters over the engine's traits.
//!
//! Each connector parses its own options strictly (unknown keys are errors) and maps its
//! system's errors to the engine's, with a hint where one helps.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use sluice_engine::ConnectorConfig;
use sluice_engine::destination::Destination;
use sluice_engine::source::{ConnectorEnv, ConnectorFactory, Source};

mod alerts;
pub mod catalog;
pub mod destinations;
mod duration;
pub mod google_auth;
mod parquet_writer;
pub mod sources;
pub mod tunnel;

pub use duration::HumanDuration;

/// Every connector this build of sluice has.
#[derive(Debug, Default, Clone, Copy)]
pub struct Connectors;

/// Source types, as written in `type:`.
pub const SOURCE_TYPES: &[&str] = &[
    "files",
    "sqlite",
    "postgres",
    "redshift",
    "mysql",
    "snowflake",
    "bigquery",
    "databricks",
    "sqlserver",
];
/// Destination types, as written in `type:`.
pub const DESTINATION_TYPES: &[&str] = &[
    "webhook",
    "file",
    "segment",
    "mixpanel",
    "hubspot",
    "braze",
    "iterable",
    "customerio",
    "klaviyo",
    "salesforce",
    "google_sheets",
    "postgres",
    "meta",
    "tiktok",
    "snapchat",
    "google_ads",
    "salesforce_marketing_cloud",
    "linkedin",
];

impl ConnectorFactory for Connectors {
    fn catalog(&self) -> sluice_engine::connector_types::ConnectorCatalog {
        catalog::catalog()
    }

    fn alert_sender(&self) -> Option<Arc<dyn sluice_engine::alerts::AlertSender>> {
        alerts::HttpAlerts::new().map(|a| Arc::new(a) as Arc<dyn sluice_engine::alerts::AlertSender>)
    }

    fn source(
        &self,
        name: &str,
        config: &ConnectorConfig,
        env: &ConnectorEnv,
    ) -> Result<Arc<dyn Source>, String> {
        install_crypto_provider();
        match config.kind.as_str() {
            "files" => Ok(Arc::new(sources::files::FilesSource::new(
                name,
                parse(config)?,
                env,
            )?)),
            "sqlite" => Ok(Arc::new(sources::sqlite::SqliteSource::new(
                name,
                parse(config)?,
                env,
            ))),
            "postgres" => Ok(Arc::new(sources::postgres::PostgresSource::new(
                name,
                parse(config)?,
                env,
            )?)),
            "mysql" | "mariadb" => Ok(Arc::new(sources::mysql::MysqlSource::new(
                name,
                parse(config)?,
                env,
            )?)),
            "redshift" => Ok(Arc::new(sources::postgres::PostgresSource::redshift(
                name,
                parse(config)?,
                env,
            )?)),
            "bigquery" => Ok(Arc::new(sources::bigquery::BigQuerySource::new(
                name,
                parse(config)?,
                env,
            )?)),
            "databricks" => Ok(Arc::new(sources::databricks::DatabricksSource::new(
                name,
                parse(config)?,
                env,
            )?)),
            "snowflake" => Ok(Arc::new(sources::snowflake::SnowflakeSource::new(
                name,
                parse(config)?,
                env,
            )?)),
            "sqlserver" | "mssql" => Ok(Arc::new(sources::sqlserver::SqlServerSource::new(
                name,
                parse(config)?,
                env,
            )?)),
            other => Err(unknown_type("source", other, SOURCE_TYPES)),
        }
    }

    fn destination(
        &self,
        name: &str,
        config: &ConnectorConfig,
        env: &ConnectorEnv,
    ) -> Result<Arc<dyn Destination>, String> {
        install_crypto_provider();
        match config.kind.as_str() {
            "webhook" => Ok(Arc::new(destinations::webhook::WebhookDestination::new(
                name,
                parse(config)?,
            )?)),
            "file" => Ok(Arc::new(destinations::file::FileDestination::new(
                name,
                parse(config)?,
                env,
            )?)),
            "segment" => Ok(Arc::new(destinations::segment::SegmentDestination::new(
                name,
                parse(config)?,
            )?)),
            "hubspot" => Ok(Arc::new(destinations::hubspot::HubspotDestination::new(
                name,
                parse(config)?,
            )?)),
            "mixpanel" => Ok(Arc::new(destinations::mixpanel::MixpanelDestination::new(
                name,
                parse(config)?,
            )?)),
            "postgres" => Ok(Arc::new(destinations::postgres::PostgresDestination::new(
                name,
                parse(config)?,
                env,
            )?)),
            "braze" => Ok(Arc::new(destinations::braze::BrazeDestination::new(
                name,
                parse(config)?,
            )?)),
            "meta" => Ok(Arc::new(destinations::meta::MetaDestination::new(
                name,
                parse(config)?,
            )?)),
            "tiktok" => Ok(Arc::new(destinations::tiktok::TiktokDestination::new(
                name,
                parse(config)?,
            )?)),
            "snapchat" => Ok(Arc::new(destinations::snapchat::SnapchatDestination::new(
                name,
                parse(config)?,
            )?)),
            "iterable" => Ok(Arc::new(destinations::iterable::IterableDestination::new(
                name,
                parse(config)?,
            )?)),
            "customerio" => Ok(Arc::new(destinations::customerio::CustomerioDestination::new(
                name,
                parse(config)?,
            )?)),
            "klaviyo" => Ok(Arc::new(destinations::klaviyo::KlaviyoDestination::new(
                name,
                parse(config)?,
            )?)),
            "salesforce" => Ok(Arc::new(destinations::salesforce::SalesforceDestination::new(
                name,
                parse(config)?,
            )?)),
            "google_sheets" => Ok(Arc::new(destinations::google_sheets::SheetsDestination::new(
                name,
                parse(config)?,
                env,
            )?)),
            "linkedin" => Ok(Arc::new(destinations::linkedin::LinkedinDestination::new(
                name,
                parse(config)?,
            )?)),
            "salesforce_marketing_cloud" => Ok(Arc::new(destinations::sfmc::SfmcDestination::new(
                name,
                parse(config)?,
            )?)),
            "google_ads" => Ok(Arc::new(destinations::google_ads::GoogleAdsDestination::new(
                name,
                parse(config)?,
                env,
            )?)),
            other => Err(unknown_type("destination", other, DESTINATION_TYPES)),
        }
    }
}

/// Makes ring the process's rustls crypto provider. tiberius (SQL Server) compiles aws-lc-rs
/// into rustls beside ring, and with two providers compiled in rustls cannot choose one for
/// `ClientConfig::builder()`, which mysql_async and tiberius call. Idempotent.
pub fn install_crypto_provider() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // Err means another provider was installed first, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn unknown_type(kind: &str, name: &str, known: &[&str]) -> String {
    format!(
        "unknown {kind} type `{name}` (this build supports: {})",
        known.join(", ")
    )
}

/// Parses a connector's options into its typed config.
fn parse<T: DeserializeOwned>(config: &ConnectorConfig) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::Object(config.options.clone()))
        .map_err(|e| without_quoted_value(&e.to_string()))
}

/// A parse error without the value it quotes (`invalid type: string "…", expected …`): the
/// value may be a credential given to the wrong option, or of the wrong type.
fn without_quoted_value(message: &str) -> String {
    const QUOTED: &str = "string \"";
    let Some(start) = message.find(QUOTED) else {
        return message.to_string();
    };
    let rest = &message[start + QUOTED.len()..];
    match rest.rfind("\", expected") {
        Some(end) => format!("{}a string{}", &message[..start], &rest[end + 1..]),
        None => format!("{}a string", &message[..start]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_do_not_quote_the_value() {
        assert_eq!(
            without_quoted_value("invalid type: string \"hunter2\", expected u32"),
            "invalid type: a string, expected u32"
        );
        assert_eq!(
            without_quoted_value("invalid value: string \"a\", expected x\", expected y"),
            "invalid value: a string, expected y"
        );
        assert_eq!(without_quoted_value("missing field `url`"), "missing field `url`");
    }
}
