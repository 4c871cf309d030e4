//! A Google Cloud Storage stand-in on 127.0.0.1: the XML API as object_store calls it (objects,
//! ranged reads, `list-type=2` listings, conditional puts on `x-goog-if-generation-match`,
//! multipart uploads and their listing), answering with GCS's headers (`x-goog-generation`,
//! ETag, Last-Modified) and XML bodies, in memory. The registries offer no GCS emulator that
//! speaks this API (PyPI's `gcp-storage-emulator` answers 501 to listings and multipart
//! uploads), so the tests serve it themselves.
//!
//! Every request must carry `Authorization: Bearer <JWT>` self-signed by the test service
//! account (RS256, `kid` its key id, `iss`/`sub` its email, not expired), which is how a service
//! account key authenticates to GCS; the signature is verified with the account's public key.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use chrono::{DateTime, Utc};

pub const SERVICE_ACCOUNT_EMAIL: &str = "sluice-tests@sluice-ci.iam.gserviceaccount.com";
const KEY_ID: &str = "sluice-test-key-1";

fn private_key_pem() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/test_rsa_key.pem"
    ))
    .expect("test key")
}

/// The service account key JSON a user would paste into `google_service_account_key`.
pub fn service_account_key(_endpoint: &str) -> String {
    serde_json::json!({
        "type": "service_account",
        "project_id": "sluice-ci",
        "private_key_id": KEY_ID,
        "private_key": private_key_pem(),
        "client_email": SERVICE_ACCOUNT_EMAIL,
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    })
    .to_string()
}

struct Object {
    data: Bytes,
    generation: i64,
    updated: DateTime<Utc>,
}

impl Object {
    fn etag(&self) -> String {
        format!("\"{:x}-{}\"", self.generation, self.data.len())
    }
}

struct Upload {
    key: String,
    parts: BTreeMap<u32, Bytes>,
    initiated: DateTime<Utc>,
}

#[derive(Default)]
struct Bucketed {
    objects: BTreeMap<(String, String), Object>,
    uploads: HashMap<String, Upload>,
    next_generation: i64,
}

#[derive(Clone)]
struct GcsState {
    data: Arc<Mutex<Bucketed>>,
    public_key: Arc<Vec<u8>>,
}

pub struct GcsServer {
    pub endpoint: String,
    _server: tokio::task::JoinHandle<()>,
}

impl GcsServer {
    pub async fn start() -> Self {
        let pem = private_key_pem();
        let der = base64::engine::general_purpose::STANDARD
            .decode(
                pem.lines()
                    .filter(|l| !l.starts_with("-----"))
                    .collect::<String>(),
            )
            .expect("pem");
        let pair = ring::signature::RsaKeyPair::from_pkcs8(&der).expect("pkcs8 key");
        use ring::signature::KeyPair;
        let state = GcsState {
            data: Default::default(),
            public_key: Arc::new(pair.public_key().as_ref().to_vec()),
        };
        let app = Router::new()
            .fallback(handle)
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            endpoint,
            _server: server,
        }
    }
}

fn xml_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [("content-type", "application/xml; charset=UTF-8")],
        format!("<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"),
    )
        .into_response()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Checks the bearer JWT as GCS checks a service account's self-signed one.
fn authorized(state: &GcsState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let denied = |why: &str| {
        Box::new(xml_error(
            StatusCode::UNAUTHORIZED,
            "AuthenticationRequired",
            &format!("Authentication required: {why}"),
        ))
    };
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| denied("no bearer token"))?;
    let parts: Vec<&str> = token.split('.').collect();
    let [header, claims, signature] = parts[..] else {
        return Err(denied("the token is not a JWT"));
    };
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let decode_json = |part: &str| {
        b64.decode(part)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
    };
    let header_json = decode_json(header).ok_or_else(|| denied("unreadable JWT header"))?;
    let claims_json = decode_json(claims).ok_or_else(|| denied("unreadable JWT claims"))?;
    if header_json["alg"] != "RS256" || header_json["kid"] != KEY_ID {
        return Err(denied("wrong algorithm or key id"));
    }
    if claims_json["iss"] != SERVICE_ACCOUNT_EMAIL || claims_json["sub"] != SERVICE_ACCOUNT_EMAIL {
        return Err(denied("wrong issuer"));
    }
    if claims_json["exp"].as_i64().unwrap_or(0) < Utc::now().timestamp() {
        return Err(denied("the token has expired"));
    }
    let signature = b64
        .decode(signature)
        .map_err(|_| denied("unreadable signature"))?;
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        state.public_key.as_slice(),
    )
    .verify(format!("{header}.{claims}").as_bytes(), &signature)
    .map_err(|_| denied("bad signature"))
}

fn query_pairs(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .map(|q| url::form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

async fn handle(
    State(state): State<GcsState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(denied) = authorized(&state, &headers) {
        return *denied;
    }
    let path = uri.path().trim_start_matches('/');
    let (bucket, key) = match path.split_once('/') {
        Some((bucket, key)) => (percent_decode(bucket), percent_decode(key)),
        None => (percent_decode(path), String::new()),
    };
    let query = query_pairs(&uri);
    let mut data = state.data.lock().expect("lock");
    match (method.clone(), key.is_empty()) {
        (Method::GET, true) if query.contains_key("uploads") => list_uploads(&data, &bucket, &query),
        (Method::GET, true) => list(&data, &bucket, &query),
        (Method::POST, false) if query.contains_key("uploads") => {
            let id = format!("upload-{:016x}", rand::random::<u64>());
            data.uploads.insert(
                id.clone(),
                Upload {
                    key: key.clone(),
                    parts: BTreeMap::new(),
                    initiated: Utc::now(),
                },
            );
            xml_ok(format!(
                "<InitiateMultipartUploadResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Bucket>{bucket}</Bucket><Key>{}</Key><UploadId>{id}</UploadId></InitiateMultipartUploadResult>",
                escape(&key)
            ))
        }
        (Method::PUT, false) if query.contains_key("uploadId") => {
            let (Some(id), Some(Ok(number))) = (
                query.get("uploadId"),
                query.get("partNumber").map(|n| n.parse::<u32>()),
            ) else {
                return xml_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidArgument",
                    "partNumber and uploadId are required",
                );
            };
            let Some(upload) = data.uploads.get_mut(id) else {
                return xml_error(
                    StatusCode::NOT_FOUND,
                    "NoSuchUpload",
                    "The requested upload was not found.",
                );
            };
            let etag = format!("\"part-{number}-{}\"", body.len());
            upload.parts.insert(number, body);
            (StatusCode::OK, [("etag", etag)]).into_response()
        }
        (Method::POST, false) if query.contains_key("uploadId") => {
            let id = &query["uploadId"];
            let Some(upload) = data.uploads.remove(id) else {
                return xml_error(
                    StatusCode::NOT_FOUND,
                    "NoSuchUpload",
                    "The requested upload was not found.",
                );
            };
            let text = String::from_utf8_lossy(&body);
            let numbers: Vec<u32> = text
                .split("<PartNumber>")
                .skip(1)
                .filter_map(|s| s.split('<').next()?.trim().parse().ok())
                .collect();
            if numbers.is_empty() || numbers.iter().any(|n| !upload.parts.contains_key(n)) {
                return xml_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidPart",
                    "One or more of the specified parts could not be found.",
                );
            }
            let mut joined = Vec::new();
            for n in &numbers {
                joined.extend_from_slice(&upload.parts[n]);
            }
            let generation = put_object(&mut data, &bucket, &upload.key, Bytes::from(joined));
            let etag = data.objects[&(bucket.clone(), upload.key.clone())].etag();
            (
                StatusCode::OK,
                [("x-goog-generation", generation.to_string()), ("content-type", "application/xml".into())],
                format!(
                    "<CompleteMultipartUploadResult><Location>{}/{bucket}/{}</Location><Bucket>{bucket}</Bucket><Key>{}</Key><ETag>{etag}</ETag></CompleteMultipartUploadResult>",
                    "http://storage.googleapis.com",
                    escape(&upload.key),
                    escape(&upload.key)
                ),
            )
                .into_response()
        }
        (Method::DELETE, false) if query.contains_key("uploadId") => {
            match data.uploads.remove(&query["uploadId"]) {
                Some(_) => StatusCode::NO_CONTENT.into_response(),
                None => xml_error(
                    StatusCode::NOT_FOUND,
                    "NoSuchUpload",
                    "The requested upload was not found.",
                ),
            }
        }
        (Method::PUT, false) => {
            let exists = data
                .objects
                .get(&(bucket.clone(), key.clone()))
                .map(|o| o.generation);
            if let Some(expected) = headers
                .get("x-goog-if-generation-match")
                .and_then(|v| v.to_str().ok())
            {
                let matches = match expected.parse::<i64>() {
                    Ok(0) => exists.is_none(),
                    Ok(g) => exists == Some(g),
                    Err(_) => false,
                };
                if !matches {
                    return xml_error(
                        StatusCode::PRECONDITION_FAILED,
                        "PreconditionFailed",
                        "At least one of the pre-conditions you specified did not hold.",
                    );
                }
            }
            let body = match headers.get("x-goog-copy-source").and_then(|v| v.to_str().ok()) {
                Some(source) => {
                    let (from_bucket, from_key) = source.split_once('/').unwrap_or((source, ""));
                    match data
                        .objects
                        .get(&(from_bucket.to_string(), percent_decode(from_key)))
                    {
                        Some(object) => object.data.clone(),
                        None => {
                            return xml_error(
                                StatusCode::NOT_FOUND,
                                "NoSuchKey",
                                "The specified key does not exist.",
                            );
                        }
                    }
                }
                None => body,
            };
            let generation = put_object(&mut data, &bucket, &key, body);
            let etag = data.objects[&(bucket.clone(), key.clone())].etag();
            (
                StatusCode::OK,
                [("x-goog-generation", generation.to_string()), ("etag", etag)],
            )
                .into_response()
        }
        (Method::GET | Method::HEAD, false) => {
            let Some(object) = data.objects.get(&(bucket.clone(), key.clone())) else {
                return xml_error(
                    StatusCode::NOT_FOUND,
                    "NoSuchKey",
                    "The specified key does not exist.",
                );
            };
            let len = object.data.len();
            let range = headers
                .get("range")
                .and_then(|v| v.to_str().ok())
                .and_then(|r| parse_range(r, len));
            let (status, slice) = match &range {
                Some((start, end)) => (StatusCode::PARTIAL_CONTENT, object.data.slice(*start..*end)),
                None => (StatusCode::OK, object.data.clone()),
            };
            let mut response_headers = vec![
                ("etag", object.etag()),
                (
                    "last-modified",
                    object.updated.format("%a, %d %b %Y %H:%M:%S GMT").to_string(),
                ),
                ("x-goog-generation", object.generation.to_string()),
                ("x-goog-stored-content-length", len.to_string()),
                ("content-length", slice.len().to_string()),
                ("content-type", "application/octet-stream".into()),
            ];
            if let Some((start, end)) = range {
                response_headers.push(("content-range", format!("bytes {start}-{}/{len}", end - 1)));
            }
            let mut response = (status, slice).into_response();
            for (name, value) in response_headers {
                response
                    .headers_mut()
                    .insert(name, value.parse().expect("header value"));
            }
            response
        }
        (Method::DELETE, false) => match data.objects.remove(&(bucket, key)) {
            Some(_) => StatusCode::NO_CONTENT.into_response(),
            None => xml_error(
                StatusCode::NOT_FOUND,
                "NoSuchKey",
                "The specified key does not exist.",
            ),
        },
        _ => xml_error(
            StatusCode::NOT_IMPLEMENTED,
            "NotImplemented",
            "not served by the stand-in",
        ),
    }
}

fn xml_ok(body: String) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/xml; charset=UTF-8")],
        body,
    )
        .into_response()
}

fn put_object(data: &mut Bucketed, bucket: &str, key: &str, body: Bytes) -> i64 {
    data.next_generation += 1;
    // Generations are microsecond timestamps on GCS; increasing is what matters.
    let generation = 1_700_000_000_000_000 + data.next_generation;
    data.objects.insert(
        (bucket.to_string(), key.to_string()),
        Object {
            data: body,
            generation,
            updated: Utc::now(),
        },
    );
    generation
}

/// `bytes=a-b`, `bytes=a-`, `bytes=-n` as a half-open range within `len`.
fn parse_range(header: &str, len: usize) -> Option<(usize, usize)> {
    let spec = header.strip_prefix("bytes=")?;
    let (start, end) = spec.split_once('-')?;
    match (start.parse::<usize>().ok(), end.parse::<usize>().ok()) {
        (Some(s), Some(e)) => Some((s.min(len), (e + 1).min(len))),
        (Some(s), None) => Some((s.min(len), len)),
        (None, Some(n)) => Some((len.saturating_sub(n), len)),
        _ => None,
    }
}

fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("k={}", text.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

const PAGE: usize = 1000;

fn list(data: &Bucketed, bucket: &str, query: &HashMap<String, String>) -> Response {
    if query.get("list-type").map(String::as_str) != Some("2") {
        return xml_error(StatusCode::BAD_REQUEST, "InvalidArgument", "list-type=2 expected");
    }
    let prefix = query.get("prefix").cloned().unwrap_or_default();
    let delimiter = query.get("delimiter").cloned();
    let after = query
        .get("continuation-token")
        .or_else(|| query.get("start-after"))
        .cloned()
        .unwrap_or_default();
    let mut contents = String::new();
    let mut prefixes = std::collections::BTreeSet::new();
    let mut count = 0;
    let mut next = None;
    for ((b, key), object) in &data.objects {
        if b != bucket || !key.starts_with(&prefix) || key.as_str() <= after.as_str() {
            continue;
        }
        if count == PAGE {
            next = Some(key.clone());
            break;
        }
        if let Some(d) = &delimiter
            && let Some(i) = key[prefix.len()..].find(d.as_str())
        {
            prefixes.insert(key[..prefix.len() + i + d.len()].to_string());
            continue;
        }
        count += 1;
        contents.push_str(&format!(
            "<Contents><Key>{}</Key><Generation>{}</Generation><LastModified>{}</LastModified><ETag>{}</ETag><Size>{}</Size></Contents>",
            escape(key),
            object.generation,
            object.updated.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            object.etag(),
            object.data.len()
        ));
    }
    let common: String = prefixes
        .iter()
        .map(|p| format!("<CommonPrefixes><Prefix>{}</Prefix></CommonPrefixes>", escape(p)))
        .collect();
    let token = next
        .map(|k| {
            // The token resumes after the last key served.
            let last = data
                .objects
                .range(..(bucket.to_string(), k))
                .next_back()
                .map(|((_, key), _)| key.clone())
                .unwrap_or_default();
            format!("<NextContinuationToken>{}</NextContinuationToken>", escape(&last))
        })
        .unwrap_or_default();
    xml_ok(format!(
        "<?xml version='1.0' encoding='UTF-8'?><ListBucketResult xmlns=\"http://doc.s3.amazonaws.com/2006-03-01\"><Name>{bucket}</Name><Prefix>{}</Prefix><KeyCount>{count}</KeyCount><MaxKeys>{PAGE}</MaxKeys><IsTruncated>{}</IsTruncated>{contents}{common}{token}</ListBucketResult>",
        escape(&prefix),
        !token.is_empty()
    ))
}

fn list_uploads(data: &Bucketed, bucket: &str, query: &HashMap<String, String>) -> Response {
    let prefix = query.get("prefix").cloned().unwrap_or_default();
    let mut uploads: Vec<(&String, &Upload)> = data
        .uploads
        .iter()
        .filter(|(_, u)| u.key.starts_with(&prefix))
        .collect();
    uploads.sort_by(|a, b| (&a.1.key, a.0).cmp(&(&b.1.key, b.0)));
    let body: String = uploads
        .iter()
        .map(|(id, u)| {
            format!(
                "<Upload><Key>{}</Key><UploadId>{id}</UploadId><StorageClass>STANDARD</StorageClass><Initiated>{}</Initiated></Upload>",
                escape(&u.key),
                u.initiated.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            )
        })
        .collect();
    xml_ok(format!(
        "<?xml version='1.0' encoding='UTF-8'?><ListMultipartUploadsResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Bucket>{bucket}</Bucket><Prefix>{}</Prefix><IsTruncated>false</IsTruncated>{body}</ListMultipartUploadsResult>",
        escape(&prefix)
    ))
}
