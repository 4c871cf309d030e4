use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A duration written as `30s`, `500ms`, `2m` or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seconds(f64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Seconds(s) if s.is_finite() && s >= 0.0 => Ok(Self(Duration::from_secs_f64(s))),
            Raw::Seconds(s) => Err(serde::de::Error::custom(format!("`{s}` is not a duration"))),
            Raw::Text(text) => humantime::parse_duration(&text).map(Self).map_err(|e| {
                serde::de::Error::custom(format!(
                    "`{text}` is not a duration ({e}); write e.g. 30s or 500ms"
                ))
            }),
        }
    }
}

impl schemars::JsonSchema for HumanDuration {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": ["string", "number"],
            "examples": ["30s", "500ms", "2m"],
            "format": "duration",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        let d: HumanDuration = serde_json::from_str("\"500ms\"").unwrap();
        assert_eq!(d.0, Duration::from_millis(500));
        let d: HumanDuration = serde_json::from_str("2").unwrap();
        assert_eq!(d.0, Duration::from_secs(2));
        assert!(serde_json::from_str::<HumanDuration>("\"soon\"").is_err());
    }
}
