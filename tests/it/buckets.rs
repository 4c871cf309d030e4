//! Object storage on loopback for the tests: moto's S3 server (PyPI `moto[server]`), Azurite
//! (npm `azurite`, Azure Blob Storage), both installed by `.ci/test-tools` and started here once
//! per test binary, and a GCS stand-in served by the test itself (`gcs.rs`: no emulator in the
//! registries speaks the XML API object_store uses). Each test gets a bucket of its own.
//!
//! A server that is not installed skips its tests with a message, or fails them when
//! `SLUICE_REQUIRE_SERVICES=1` (as in CI).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::gcs::GcsServer;
use crate::services::unavailable;

/// Azurite's well-known development account (documented, not a secret).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// The credentials the S3 tests sign with (moto accepts any; the fault proxy checks them).
pub const S3_KEY_ID: &str = "AKIASLUICETEST000001";
pub const S3_SECRET: &str = "sluice-test-secret-key-not-real";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    S3,
    Azure,
    Gcs,
}

pub fn tools_dir() -> PathBuf {
    std::env::var_os("SLUICE_TEST_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/sluice-test-tools")
        })
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Starts `program` on a thread that lives as long as the test binary, with the kernel told to
/// kill the server when that thread (so the binary) is gone; waits until `port` accepts.
pub fn start_server(name: &str, program: PathBuf, args: Vec<String>, port: u16) -> Result<u16, String> {
    if !program.exists() {
        return Err(format!(
            "{} is not installed (run .ci/test-tools, or set SLUICE_TEST_TOOLS)",
            program.display()
        ));
    }
    let (sender, receiver) = std::sync::mpsc::channel();
    let exited = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let log = std::env::temp_dir().join(format!("sluice-test-{}-{port}.log", name.replace(' ', "-")));
    let log_file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let exited_flag = exited.clone();
    std::thread::spawn(move || {
        let mut command = std::process::Command::new(&program);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file));
        // SAFETY: prctl is async-signal-safe; it only asks for SIGKILL when this thread exits.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        match command.spawn() {
            Ok(mut child) => {
                let _ = sender.send(Ok(()));
                let _ = child.wait();
                exited_flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            Err(e) => {
                let _ = sender.send(Err(format!("cannot start {}: {e}", program.display())));
            }
        }
    });
    receiver
        .recv()
        .map_err(|e| format!("{name} starter thread: {e}"))??;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if exited.load(std::sync::atomic::Ordering::SeqCst) {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!("{name} exited at start: {}", said.trim()));
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("{name} did not listen on 127.0.0.1:{port} within 60 s"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(port)
}

fn moto_port() -> Result<u16, String> {
    static MOTO: OnceLock<Result<u16, String>> = OnceLock::new();
    MOTO.get_or_init(|| {
        let port = free_port();
        start_server(
            "moto S3 server",
            tools_dir().join("venv/bin/moto_server"),
            vec!["-H".into(), "127.0.0.1".into(), "-p".into(), port.to_string()],
            port,
        )
    })
    .clone()
}

fn azurite_port() -> Result<u16, String> {
    static AZURITE: OnceLock<Result<u16, String>> = OnceLock::new();
    AZURITE
        .get_or_init(|| {
            let port = free_port();
            start_server(
                "Azurite",
                tools_dir().join("azurite/node_modules/.bin/azurite-blob"),
                vec![
                    "--blobHost".into(),
                    "127.0.0.1".into(),
                    "--blobPort".into(),
                    port.to_string(),
                    "--inMemoryPersistence".into(),
                    "--silent".into(),
                    "--skipApiVersionCheck".into(),
                ],
                port,
            )
        })
        .clone()
}

/// A bucket (S3, GCS) or container (Azure) of one test, on a local server.
pub struct Bucket {
    pub provider: Provider,
    pub name: String,
    /// `http://127.0.0.1:port` of the server (for S3, where the fault proxy forwards to).
    pub endpoint: String,
    _gcs: Option<GcsServer>,
}

/// A name no other test uses: lower case, digits and dashes, as every provider accepts.
fn unique_name(hint: &str) -> String {
    let hint: String = hint
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(30)
        .collect();
    format!("{hint}-{:08x}", rand::random::<u32>())
}

impl Bucket {
    /// A fresh bucket on `provider`'s server, or `None` (after saying why) when the server is
    /// not installed.
    pub async fn new(provider: Provider, hint: &str) -> Option<Self> {
        let name = unique_name(hint);
        let (endpoint, gcs) = match provider {
            Provider::S3 => match tokio::task::spawn_blocking(moto_port).await.expect("join") {
                Ok(port) => (format!("http://127.0.0.1:{port}"), None),
                Err(e) => {
                    unavailable("moto S3 server (PyPI moto[server])", e);
                    return None;
                }
            },
            Provider::Azure => match tokio::task::spawn_blocking(azurite_port).await.expect("join") {
                Ok(port) => (format!("http://127.0.0.1:{port}"), None),
                Err(e) => {
                    unavailable("Azurite (npm azurite)", e);
                    return None;
                }
            },
            Provider::Gcs => {
                let server = GcsServer::start().await;
                (server.endpoint.clone(), Some(server))
            }
        };
        let bucket = Self {
            provider,
            name,
            endpoint,
            _gcs: gcs,
        };
        bucket.create().await;
        Some(bucket)
    }

    async fn create(&self) {
        let client = reqwest::Client::new();
        let response = match self.provider {
            // moto takes an unsigned CreateBucket.
            Provider::S3 => {
                client
                    .put(format!("{}/{}", self.endpoint, self.name))
                    .send()
                    .await
            }
            Provider::Azure => {
                let path = format!("/{AZURITE_ACCOUNT}/{}", self.name);
                let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
                let version = "2021-08-06";
                let canonical = format!(
                    "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{AZURITE_ACCOUNT}{path}\nrestype:container"
                );
                client
                    .put(format!("{}{path}?restype=container", self.endpoint))
                    .header("x-ms-date", &date)
                    .header("x-ms-version", version)
                    .header("content-length", "0")
                    .header(
                        "authorization",
                        format!("SharedKey {AZURITE_ACCOUNT}:{}", shared_key(&canonical)),
                    )
                    .send()
                    .await
            }
            Provider::Gcs => return,
        };
        let response = response.expect("create bucket");
        assert!(
            response.status().is_success(),
            "creating bucket {}: {} {}",
            self.name,
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }

    /// The URL of `prefix` in this bucket (`s3://bucket/prefix`, `az://container/prefix`, ...).
    pub fn url(&self, prefix: &str) -> String {
        let scheme = match self.provider {
            Provider::S3 => "s3",
            Provider::Azure => "az",
            Provider::Gcs => "gs",
        };
        format!("{scheme}://{}/{}", self.name, prefix.trim_start_matches('/'))
    }

    /// The object_store options that reach this bucket, as a user writes them in sluice.yaml.
    pub fn options(&self) -> Vec<(String, String)> {
        self.options_at(&self.endpoint)
    }

    /// The options with the server reached at `endpoint` instead (a proxy in front of it).
    pub fn options_at(&self, endpoint: &str) -> Vec<(String, String)> {
        let pairs: Vec<(&str, String)> = match self.provider {
            Provider::S3 => vec![
                ("aws_endpoint", endpoint.to_string()),
                ("aws_region", "us-east-1".into()),
                ("aws_access_key_id", S3_KEY_ID.into()),
                ("aws_secret_access_key", S3_SECRET.into()),
                ("allow_http", "true".into()),
            ],
            Provider::Azure => vec![
                ("azure_storage_account_name", AZURITE_ACCOUNT.into()),
                ("azure_storage_access_key", AZURITE_KEY.into()),
                ("azure_storage_endpoint", format!("{endpoint}/{AZURITE_ACCOUNT}")),
                ("allow_http", "true".into()),
            ],
            Provider::Gcs => vec![
                ("google_base_url", endpoint.to_string()),
                (
                    "google_service_account_key",
                    crate::gcs::service_account_key(endpoint),
                ),
                ("allow_http", "true".into()),
            ],
        };
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    /// The options as a YAML flow mapping, for sluice.yaml.
    pub fn options_yaml(&self) -> String {
        yaml_map(&self.options())
    }

    /// This bucket through object_store, for the test to look at what sluice wrote.
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        let url = url::Url::parse(&self.url("")).expect("url");
        sluice_snapshots::open_store(&url, self.options())
            .expect("open bucket")
            .store
    }

    pub async fn put(&self, key: &str, bytes: Vec<u8>) {
        self.store()
            .put(&StorePath::from(key), PutPayload::from(bytes))
            .await
            .expect("put");
    }

    pub async fn get(&self, key: &str) -> Vec<u8> {
        self.store()
            .get(&StorePath::from(key))
            .await
            .expect("get")
            .bytes()
            .await
            .expect("bytes")
            .to_vec()
    }

    /// Keys of every object under `prefix`, sorted.
    pub async fn list(&self, prefix: &str) -> Vec<String> {
        use futures::TryStreamExt;
        let prefix = StorePath::from(prefix);
        let mut keys: Vec<String> = self
            .store()
            .list(Some(&prefix))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .expect("list");
        keys.sort();
        keys
    }
}

/// `{k: "v", ...}` with values quoted for YAML.
pub fn yaml_map(pairs: &[(String, String)]) -> String {
    let items: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}: {}", serde_json::Value::String(v.clone())))
        .collect();
    format!("{{ {} }}", items.join(", "))
}

/// Azure SharedKey signature of a canonical request with Azurite's account key.
fn shared_key(canonical: &str) -> String {
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD
        .decode(AZURITE_KEY)
        .expect("key");
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
        canonical.as_bytes(),
    );
    base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
}
