//! Alerts posted as JSON over HTTP (Slack incoming webhooks and any webhook receiver).

use async_trait::async_trait;
use sluice_engine::alerts::AlertSender;

pub struct HttpAlerts {
    client: reqwest::Client,
}

impl HttpAlerts {
    pub fn new() -> Option<Self> {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")))
            .build()
            .ok()?;
        Some(Self { client })
    }
}

#[async_trait]
impl AlertSender for HttpAlerts {
    async fn post(&self, url: &str, body: &serde_json::Value) -> Result<(), String> {
        let response = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            // The URL is the credential (a Slack hook's path): reqwest's error would print it.
            .map_err(|e| format!("posting to the alert URL failed: {}", e.without_url()))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            let text = response.text().await.unwrap_or_default();
            Err(format!(
                "the alert URL answered HTTP {status}: {}",
                text.chars().take(200).collect::<String>()
            ))
        }
    }
}
