//! Reaching object storage: one function that turns a URL and its options into an object store,
//! for the snapshot store, the `files` source and the `file` destination alike.
//!
//! What it adds to object_store's own `parse_url_opts`:
//! - credentials come from the usual chains: options first, then the provider's environment
//!   variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`), then (S3) a profile of the shared credentials
//!   file, then object_store's workload and instance identities;
//! - an option object_store does not know is an error naming it, not silently ignored;
//! - `max_retries` and `retry_timeout` bound how long a throttled or failing store is retried;
//! - on S3 and GCS, the multipart uploads a killed writer left unfinished can be found and
//!   aborted ([`UploadJanitor`]): they are invisible to listings but are stored, and billed,
//!   until aborted.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, AwsAuthorizer, AwsCredential};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::client::{HttpClient, HttpConnector, HttpRequest, ReqwestConnector};
use object_store::gcp::{GoogleCloudStorage, GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::path::Path;
use object_store::{
    ClientConfigKey, ClientOptions, ObjectStore, ObjectStoreScheme, RetryConfig, StaticCredentialProvider,
};
use serde::Deserialize;
use url::Url;

/// Options sluice reads itself rather than passing to object_store.
const MAX_RETRIES: &str = "max_retries";
const RETRY_TIMEOUT: &str = "retry_timeout";
/// S3: the profile of the shared credentials file to use (else `AWS_PROFILE`, else `default`).
const AWS_PROFILE: &str = "aws_profile";

/// An object store opened from a URL.
#[derive(Debug, Clone)]
pub struct OpenedStore {
    pub store: Arc<dyn ObjectStore>,
    /// The URL's path inside `store`.
    pub prefix: Path,
    /// Finds and aborts unfinished multipart uploads (S3 and GCS; Azure discards uncommitted
    /// blocks by itself after seven days, and local and in-memory stores have none).
    pub janitor: Option<UploadJanitor>,
}

/// Why a store could not be opened; never carries an option's value (it may be a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenError(pub String);

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Opens the object store `url` names, configured by `options` (object_store's keys for the
/// URL's provider, such as `aws_endpoint` or `google_service_account_key`, its client keys such
/// as `timeout` or `allow_http`, and sluice's `max_retries`, `retry_timeout`, `aws_profile`).
pub fn open_store(
    url: &Url,
    options: impl IntoIterator<Item = (String, String)>,
) -> Result<OpenedStore, OpenError> {
    let (scheme, prefix) = ObjectStoreScheme::parse(url)
        .map_err(|e| OpenError(format!("not an object store URL sluice can open: {e}")))?;
    let mut retry = RetryConfig::default();
    let mut profile = None;
    let mut rest = Vec::new();
    for (key, value) in options {
        match key.to_ascii_lowercase().as_str() {
            MAX_RETRIES => {
                retry.max_retries = value.trim().parse().map_err(|_| {
                    OpenError(format!(
                        "option `{MAX_RETRIES}` must be a whole number, such as 10"
                    ))
                })?
            }
            RETRY_TIMEOUT => {
                retry.retry_timeout = humantime::parse_duration(value.trim()).map_err(|_| {
                    OpenError(format!(
                        "option `{RETRY_TIMEOUT}` must be a duration, such as 3m or 30s"
                    ))
                })?
            }
            AWS_PROFILE => profile = Some(value),
            _ => rest.push((key, value)),
        }
    }
    let unknown = |key: &str, provider: &str, examples: &str| {
        OpenError(format!(
            "unknown option `{key}` for {provider} (options are object_store's keys, such as {examples}, its client keys such as `timeout` and `allow_http`, and sluice's `{MAX_RETRIES}` and `{RETRY_TIMEOUT}`)"
        ))
    };
    let build_error = |e: object_store::Error| OpenError(first_line(&e.to_string()));
    match scheme {
        ObjectStoreScheme::AmazonS3 => {
            let mut builder = AmazonS3Builder::from_env()
                .with_url(url.as_str())
                .with_retry(retry);
            let mut client = ClientOptions::new();
            for (key, value) in rest {
                let key_lower = key.to_ascii_lowercase();
                let parsed: AmazonS3ConfigKey = key_lower
                    .parse()
                    .map_err(|_| unknown(&key, "S3", "`aws_region`, `aws_endpoint`, `aws_access_key_id`"))?;
                if let AmazonS3ConfigKey::Client(client_key) = parsed {
                    client = client.with_config(client_key, value.clone());
                }
                builder = builder.with_config(parsed, value);
            }
            if builder
                .get_config_value(&AmazonS3ConfigKey::AccessKeyId)
                .is_none()
                && let Some(credential) = shared_credentials_profile(profile.as_deref())?
            {
                builder = builder.with_credentials(Arc::new(StaticCredentialProvider::new(credential.key)));
                if builder.get_config_value(&AmazonS3ConfigKey::Region).is_none()
                    && let Some(region) = credential.region
                {
                    builder = builder.with_config(AmazonS3ConfigKey::Region, region);
                }
            }
            let janitor = S3Janitor::new(url, &builder, client);
            let s3 = Arc::new(builder.build().map_err(build_error)?);
            let janitor = janitor.map(|j| UploadJanitor::S3 {
                store: s3.clone(),
                inner: Arc::new(j),
            });
            Ok(OpenedStore {
                store: s3,
                prefix,
                janitor,
            })
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            let mut builder = GoogleCloudStorageBuilder::from_env()
                .with_url(url.as_str())
                .with_retry(retry);
            let mut client = ClientOptions::new();
            for (key, value) in rest {
                let parsed: GoogleConfigKey = key.to_ascii_lowercase().parse().map_err(|_| {
                    unknown(
                        &key,
                        "GCS",
                        "`google_service_account_key`, `google_application_credentials`",
                    )
                })?;
                if let GoogleConfigKey::Client(client_key) = parsed {
                    client = client.with_config(client_key, value.clone());
                }
                builder = builder.with_config(parsed, value);
            }
            let base_url = builder.get_config_value(&GoogleConfigKey::BaseUrl);
            let gcs = Arc::new(builder.build().map_err(build_error)?);
            let janitor = url.host_str().map(|bucket| UploadJanitor::Gcs {
                store: gcs.clone(),
                inner: Arc::new(GcsJanitor {
                    base_url: base_url
                        .unwrap_or_else(|| "https://storage.googleapis.com".to_string())
                        .trim_end_matches('/')
                        .to_string(),
                    bucket: bucket.to_string(),
                    client,
                }),
            });
            Ok(OpenedStore {
                store: gcs,
                prefix,
                janitor,
            })
        }
        ObjectStoreScheme::MicrosoftAzure => {
            let mut builder = MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .with_retry(retry);
            for (key, value) in rest {
                let parsed: AzureConfigKey = key.to_ascii_lowercase().parse().map_err(|_| {
                    unknown(
                        &key,
                        "Azure Blob Storage",
                        "`azure_storage_account_name`, `azure_storage_access_key`, `azure_storage_endpoint`",
                    )
                })?;
                builder = builder.with_config(parsed, value);
            }
            Ok(OpenedStore {
                store: Arc::new(builder.build().map_err(build_error)?),
                prefix,
                janitor: None,
            })
        }
        ObjectStoreScheme::Local | ObjectStoreScheme::Memory | ObjectStoreScheme::Http => {
            // Only client options apply to these; reject anything else rather than ignore it.
            if let Some((key, _)) = rest
                .iter()
                .find(|(k, _)| k.to_ascii_lowercase().parse::<ClientConfigKey>().is_err())
            {
                if !matches!(scheme, ObjectStoreScheme::Http) {
                    return Err(OpenError(format!(
                        "option `{key}` does not apply to a {} location",
                        url.scheme()
                    )));
                }
                return Err(unknown(key, "HTTP", "`timeout`, `allow_http`"));
            }
            let (store, prefix) = object_store::parse_url_opts(url, rest).map_err(build_error)?;
            Ok(OpenedStore {
                store: Arc::from(store),
                prefix,
                janitor: None,
            })
        }
        _ => Err(OpenError(format!("sluice cannot open `{}` URLs", url.scheme()))),
    }
}

/// What to do about an object store's error, read from its text (object_store's errors carry
/// the provider's status and error code); `None` when the text names no cause sluice knows.
pub fn store_action(message: &str) -> Option<&'static str> {
    let has = |needles: &[&str]| needles.iter().any(|n| message.contains(n));
    let action = if has(&[
        "ExpiredToken",
        "TokenRefreshRequired",
        "RequestExpired",
        "token has expired",
    ]) {
        "the object store's credentials have expired: renew them (a session token's lifetime ended), or let them be refreshed from an instance, workload or web identity; nothing is lost, the next run goes on from the last commit point"
    } else if has(&["NoSuchUpload"]) {
        "the multipart upload was gone when sluice went to complete it: a completion that timed out may have finished on the server, or something aborted the upload; for files of many GiB raise the store's `timeout` option (default 30s), since completing them can take minutes; nothing is lost, the next run writes the file again"
    } else if has(&[
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "AuthorizationPermissionMismatch",
        "AuthorizationFailure",
        "AuthenticationFailed",
        "AuthenticationRequired",
        "403 Forbidden",
        "401 Unauthorized",
    ]) {
        "the object store refused the credentials: check the key and secret (the store's options, or AWS_*, GOOGLE_* and AZURE_* in sluice's environment) and that they may list, read, write and delete under the store's prefix"
    } else if has(&["NoSuchBucket", "ContainerNotFound", "bucket does not exist"]) {
        "the bucket or container does not exist: create it, or fix the URL"
    } else if has(&[
        "SlowDown",
        "503 Service Unavailable",
        "429 Too Many Requests",
        "ServerBusy",
    ]) {
        "the object store kept throttling after every retry: nothing is lost, the next run goes on from the last commit point; if this is routine, raise `retry_timeout` or `max_retries` in the store's options"
    } else if has(&[
        "error sending request",
        "Connection refused",
        "timed out",
        "dns error",
        "connection closed",
    ]) {
        "the object store did not answer: check its endpoint and the network path to it; nothing is lost, the next run goes on from the last commit point"
    } else {
        return None;
    };
    Some(action)
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_string()
}

/// A multipart upload that was started and neither completed nor aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnfinishedUpload {
    pub path: Path,
    pub upload_id: String,
    pub initiated: DateTime<Utc>,
}

/// Lists and aborts unfinished multipart uploads under a prefix, through the provider's own
/// API (object_store has no call for it), signed with the store's own credentials.
#[derive(Debug, Clone)]
pub enum UploadJanitor {
    S3 {
        store: Arc<AmazonS3>,
        inner: Arc<S3Janitor>,
    },
    Gcs {
        store: Arc<GoogleCloudStorage>,
        inner: Arc<GcsJanitor>,
    },
}

#[derive(Debug)]
pub struct S3Janitor {
    /// `https://bucket.s3.region.amazonaws.com` or `<endpoint>/<bucket>`, no trailing slash.
    bucket_url: String,
    region: String,
    client: ClientOptions,
}

#[derive(Debug)]
pub struct GcsJanitor {
    base_url: String,
    bucket: String,
    client: ClientOptions,
}

impl S3Janitor {
    fn new(url: &Url, builder: &AmazonS3Builder, client: ClientOptions) -> Option<Self> {
        // Only `s3://bucket/…` URLs name their bucket plainly; other S3 URL forms skip cleanup.
        if !matches!(url.scheme(), "s3" | "s3a") {
            return None;
        }
        let bucket = url.host_str()?.to_string();
        let region = builder
            .get_config_value(&AmazonS3ConfigKey::Region)
            .unwrap_or_else(|| "us-east-1".to_string());
        let virtual_hosted = builder
            .get_config_value(&AmazonS3ConfigKey::VirtualHostedStyleRequest)
            .is_some_and(|v| v == "true");
        let bucket_url = match builder.get_config_value(&AmazonS3ConfigKey::Endpoint) {
            Some(endpoint) if virtual_hosted => endpoint.trim_end_matches('/').to_string(),
            Some(endpoint) => format!("{}/{bucket}", endpoint.trim_end_matches('/')),
            None => format!("https://{bucket}.s3.{region}.amazonaws.com"),
        };
        Some(Self {
            bucket_url,
            region,
            client,
        })
    }
}

/// `ListMultipartUploadsResult`, as S3 and GCS's XML API answer it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListUploadsResult {
    #[serde(default)]
    upload: Vec<ListedUpload>,
    #[serde(default)]
    is_truncated: bool,
    #[serde(default)]
    next_key_marker: Option<String>,
    #[serde(default)]
    next_upload_id_marker: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListedUpload {
    key: String,
    upload_id: String,
    initiated: DateTime<Utc>,
}

impl UploadJanitor {
    /// Unfinished multipart uploads of objects under `prefix` (a directory: `a/b` does not
    /// match `a/bc`).
    pub async fn unfinished(&self, prefix: &Path) -> object_store::Result<Vec<UnfinishedUpload>> {
        let prefix = match prefix.as_ref() {
            "" => String::new(),
            p => format!("{p}/"),
        };
        let mut found = Vec::new();
        let mut markers: Option<(String, String)> = None;
        loop {
            let mut query = format!("uploads&prefix={}", encode(&prefix));
            if let Some((key, upload)) = &markers {
                query.push_str(&format!(
                    "&key-marker={}&upload-id-marker={}",
                    encode(key),
                    encode(upload)
                ));
            }
            let body = self.send(http::Method::GET, "", &query, Bytes::new()).await?;
            let page: ListUploadsResult = quick_xml::de::from_reader(body.as_ref())
                .map_err(|e| generic(format!("unreadable upload list: {e}")))?;
            for upload in page.upload {
                found.push(UnfinishedUpload {
                    path: Path::from(upload.key),
                    upload_id: upload.upload_id,
                    initiated: upload.initiated,
                });
            }
            match (
                page.is_truncated,
                page.next_key_marker,
                page.next_upload_id_marker,
            ) {
                (true, Some(key), Some(upload)) => markers = Some((key, upload)),
                _ => return Ok(found),
            }
        }
    }

    /// Aborts one unfinished upload; its parts are deleted. Aborting one already gone succeeds.
    pub async fn abort(&self, upload: &UnfinishedUpload) -> object_store::Result<()> {
        let query = format!("uploadId={}", encode(&upload.upload_id));
        match self
            .send(http::Method::DELETE, upload.path.as_ref(), &query, Bytes::new())
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn send(
        &self,
        method: http::Method,
        key: &str,
        query: &str,
        body: Bytes,
    ) -> object_store::Result<Bytes> {
        let (url, client) = match self {
            UploadJanitor::S3 { inner, .. } => (
                format!("{}/{}?{query}", inner.bucket_url, encode_path(key)),
                &inner.client,
            ),
            UploadJanitor::Gcs { inner, .. } => (
                format!("{}/{}/{}?{query}", inner.base_url, inner.bucket, encode_path(key)),
                &inner.client,
            ),
        };
        let mut request: HttpRequest = http::Request::builder()
            .method(method)
            .uri(&url)
            .body(body.into())
            .map_err(|e| generic(format!("bad request URL {url}: {e}")))?;
        match self {
            UploadJanitor::S3 { store, inner } => {
                let credential: Arc<AwsCredential> = store.credentials().get_credential().await?;
                AwsAuthorizer::new(&credential, "s3", &inner.region).authorize(&mut request, None);
            }
            UploadJanitor::Gcs { store, .. } => {
                let credential = store.credentials().get_credential().await?;
                if !credential.bearer.is_empty() {
                    let value = format!("Bearer {}", credential.bearer)
                        .parse()
                        .map_err(|_| generic("the GCS token is not a valid header value".into()))?;
                    request.headers_mut().insert(http::header::AUTHORIZATION, value);
                }
            }
        }
        let client: HttpClient = ReqwestConnector::default().connect(client)?;
        let response = tokio::time::timeout(Duration::from_secs(60), client.execute(request))
            .await
            .map_err(|_| generic(format!("{url}: no answer within 60 s")))?
            .map_err(|e| generic(format!("{url}: {e}")))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .bytes()
            .await
            .map_err(|e| generic(format!("{url}: {e}")))?;
        if status == http::StatusCode::NOT_FOUND {
            return Err(object_store::Error::NotFound {
                path: key.to_string(),
                source: String::from_utf8_lossy(&bytes).into_owned().into(),
            });
        }
        if !status.is_success() {
            return Err(generic(format!(
                "{url}: {status}: {}",
                String::from_utf8_lossy(&bytes)
                    .chars()
                    .take(500)
                    .collect::<String>()
            )));
        }
        Ok(bytes)
    }
}

fn generic(message: String) -> object_store::Error {
    object_store::Error::Generic {
        store: "multipart uploads",
        source: message.into(),
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
fn encode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// Percent-encodes each segment of an object key, keeping its slashes.
fn encode_path(key: &str) -> String {
    key.split('/').map(encode).collect::<Vec<_>>().join("/")
}

/// Static keys of one profile of the shared credentials file, with its region from the config
/// file. `None` when there is no such file or profile (the chain goes on to instance identity).
struct ProfileCredential {
    key: AwsCredential,
    region: Option<String>,
}

fn shared_credentials_profile(explicit: Option<&str>) -> Result<Option<ProfileCredential>, OpenError> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let named = explicit.map(str::to_string).or_else(|| env("AWS_PROFILE"));
    let home = env("HOME").map(std::path::PathBuf::from);
    let credentials_file = env("AWS_SHARED_CREDENTIALS_FILE")
        .map(std::path::PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".aws/credentials")));
    let config_file = env("AWS_CONFIG_FILE")
        .map(std::path::PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".aws/config")));
    let profile = named.clone().unwrap_or_else(|| "default".to_string());
    let read =
        |path: &Option<std::path::PathBuf>| path.as_ref().and_then(|p| std::fs::read_to_string(p).ok());
    let Some(text) = read(&credentials_file) else {
        return match named {
            Some(name) => Err(OpenError(format!(
                "AWS profile `{name}` was asked for, but there is no shared credentials file (AWS_SHARED_CREDENTIALS_FILE or ~/.aws/credentials)"
            ))),
            None => Ok(None),
        };
    };
    let section = ini_section(&text, &profile);
    let key_id = section
        .iter()
        .find(|(k, _)| k == "aws_access_key_id")
        .map(|(_, v)| v.clone());
    let secret = section
        .iter()
        .find(|(k, _)| k == "aws_secret_access_key")
        .map(|(_, v)| v.clone());
    let (Some(key_id), Some(secret_key)) = (key_id, secret) else {
        return match named {
            Some(name) => Err(OpenError(format!(
                "AWS profile `{name}` has no aws_access_key_id and aws_secret_access_key in the shared credentials file (sluice reads static keys from profiles; for roles and SSO, use environment credentials or an instance or workload identity)"
            ))),
            None => Ok(None),
        };
    };
    let token = section
        .iter()
        .find(|(k, _)| k == "aws_session_token")
        .map(|(_, v)| v.clone());
    let region = read(&config_file).and_then(|config| {
        let header = if profile == "default" {
            "default".to_string()
        } else {
            format!("profile {profile}")
        };
        ini_section(&config, &header)
            .into_iter()
            .find(|(k, _)| k == "region")
            .map(|(_, v)| v)
    });
    Ok(Some(ProfileCredential {
        key: AwsCredential {
            key_id,
            secret_key,
            token,
        },
        region,
    }))
}

/// The `key = value` lines of `[name]` in an INI text.
fn ini_section(text: &str, name: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut pairs = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = header.trim() == name;
            continue;
        }
        if inside && let Some((key, value)) = line.split_once('=') {
            pairs.push((key.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn unknown_options_are_refused_by_name_without_their_value() {
        let err = open_store(
            &url("s3://bucket/prefix"),
            [("aws_endpoit".to_string(), "s3cr3t-value".to_string())],
        )
        .unwrap_err();
        assert!(err.0.contains("`aws_endpoit`"), "{err}");
        assert!(!err.0.contains("s3cr3t"), "{err}");
        let err = open_store(&url("memory:///x"), [("aws_region".to_string(), "x".to_string())]).unwrap_err();
        assert!(err.0.contains("does not apply"), "{err}");
    }

    #[test]
    fn sluice_retry_options_are_read_and_checked() {
        let options = |k: &str, v: &str| [(k.to_string(), v.to_string())];
        let s3 = url("s3://bucket/p");
        assert!(open_store(&s3, options("max_retries", "3")).is_ok());
        assert!(open_store(&s3, options("retry_timeout", "20s")).is_ok());
        assert!(open_store(&s3, options("max_retries", "many")).is_err());
        assert!(open_store(&s3, options("retry_timeout", "soon")).is_err());
    }

    #[test]
    fn s3_janitor_addresses_the_bucket_path_style_at_an_endpoint() {
        let builder =
            AmazonS3Builder::new().with_config(AmazonS3ConfigKey::Endpoint, "http://127.0.0.1:9000/");
        let janitor = S3Janitor::new(&url("s3://snaps/a/b"), &builder, ClientOptions::new()).unwrap();
        assert_eq!(janitor.bucket_url, "http://127.0.0.1:9000/snaps");
        let janitor = S3Janitor::new(
            &url("s3://snaps/a"),
            &AmazonS3Builder::new().with_config(AmazonS3ConfigKey::Region, "eu-west-1"),
            ClientOptions::new(),
        )
        .unwrap();
        assert_eq!(janitor.bucket_url, "https://snaps.s3.eu-west-1.amazonaws.com");
    }

    #[test]
    fn upload_lists_parse_as_s3_answers_them() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>snaps</Bucket><KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker>
  <NextKeyMarker>models/m/b.parquet</NextKeyMarker><NextUploadIdMarker>u2</NextUploadIdMarker>
  <MaxUploads>1000</MaxUploads><IsTruncated>true</IsTruncated>
  <Upload><Key>models/m/a.parquet</Key><UploadId>u1</UploadId>
    <Initiator><ID>x</ID><DisplayName>x</DisplayName></Initiator>
    <StorageClass>STANDARD</StorageClass><Initiated>2026-12-01T10:00:00.000Z</Initiated></Upload>
  <Upload><Key>models/m/b.parquet</Key><UploadId>u2</UploadId><Initiated>2026-12-02T10:00:00Z</Initiated></Upload>
</ListMultipartUploadsResult>"#;
        let page: ListUploadsResult = quick_xml::de::from_str(xml).unwrap();
        assert_eq!(page.upload.len(), 2);
        assert_eq!(page.upload[1].upload_id, "u2");
        assert!(page.is_truncated);
        assert_eq!(page.next_upload_id_marker.as_deref(), Some("u2"));
        let empty: ListUploadsResult = quick_xml::de::from_str(
            "<ListMultipartUploadsResult><IsTruncated>false</IsTruncated></ListMultipartUploadsResult>",
        )
        .unwrap();
        assert!(empty.upload.is_empty());
    }

    #[test]
    fn profiles_are_read_from_the_shared_credentials_file() {
        let text = "[default]\naws_access_key_id = A\naws_secret_access_key = B\n\n[ci]\n# comment\naws_access_key_id=C\naws_secret_access_key=D\naws_session_token=E\n";
        let ci = ini_section(text, "ci");
        assert_eq!(
            ci,
            vec![
                ("aws_access_key_id".to_string(), "C".to_string()),
                ("aws_secret_access_key".to_string(), "D".to_string()),
                ("aws_session_token".to_string(), "E".to_string()),
            ]
        );
        assert!(ini_section(text, "missing").is_empty());
    }

    #[test]
    fn store_errors_get_an_action_by_their_code() {
        let expired = "Generic S3 error: ... 400 Bad Request: <Error><Code>ExpiredToken</Code></Error>";
        assert!(store_action(expired).unwrap().contains("expired"));
        assert!(
            store_action("<Code>SignatureDoesNotMatch</Code>")
                .unwrap()
                .contains("refused")
        );
        assert!(
            store_action("<Code>NoSuchBucket</Code>")
                .unwrap()
                .contains("does not exist")
        );
        assert!(
            store_action("<Code>SlowDown</Code>")
                .unwrap()
                .contains("throttling")
        );
        assert!(
            store_action("error sending request for url")
                .unwrap()
                .contains("did not answer")
        );
        assert!(
            store_action("Error performing DELETE …?uploadId=x - 404 Not Found: <Code>NoSuchUpload</Code>")
                .unwrap()
                .contains("timeout")
        );
        assert_eq!(store_action("disk full"), None);
    }

    #[test]
    fn keys_are_encoded_segment_by_segment() {
        assert_eq!(
            encode_path("models/a b/x+y.parquet"),
            "models/a%20b/x%2By.parquet"
        );
        assert_eq!(encode("u/1=="), "u%2F1%3D%3D");
    }
}
