//! Real database servers for the source tests: PostgreSQL on 127.0.0.1:5432 and MariaDB on
//! 127.0.0.1:3306. A test whose server is absent says so and skips, unless
//! `SLUICE_REQUIRE_SERVICES=1` (set by `.ci/run`), which makes it fail.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use mysql_async::prelude::Queryable;

pub const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
pub const MYSQL_URL: &str = "mysql://root@127.0.0.1:3306/test";

fn required() -> bool {
    std::env::var("SLUICE_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// Skips (or, when services are required, fails) a test whose service is missing.
pub fn unavailable(service: &str, error: impl std::fmt::Display) {
    if required() {
        panic!("{service} is required (SLUICE_REQUIRE_SERVICES=1) but unavailable: {error}");
    }
    eprintln!("SKIPPED: {service} is unavailable ({error}); set SLUICE_REQUIRE_SERVICES=1 to fail instead");
}

/// A connection to the local PostgreSQL with a fresh schema named `schema`.
pub async fn postgres(schema: &str) -> Option<tokio_postgres::Client> {
    let connected = tokio_postgres::connect(PG_URL, tokio_postgres::NoTls).await;
    let (client, connection) = match connected {
        Ok(pair) => pair,
        Err(e) => {
            unavailable("PostgreSQL on 127.0.0.1:5432", e);
            return None;
        }
    };
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};"
        ))
        .await
        .expect("create schema");
    Some(client)
}

/// A fresh, empty database named `name`; its URL.
pub async fn fresh_database(name: &str) -> Option<String> {
    let (client, connection) = match tokio_postgres::connect(PG_URL, tokio_postgres::NoTls).await {
        Ok(pair) => pair,
        Err(e) => {
            unavailable("PostgreSQL on 127.0.0.1:5432", e);
            return None;
        }
    };
    tokio::spawn(connection);
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .expect("drop database");
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    Some(PG_URL.replace("/test", &format!("/{name}")))
}

/// A connection to the local MariaDB/MySQL with a fresh database named `database`.
pub async fn mysql(database: &str) -> Option<mysql_async::Conn> {
    let opts = match mysql_async::Opts::from_url(MYSQL_URL) {
        Ok(opts) => opts,
        Err(e) => panic!("bad test URL: {e}"),
    };
    let mut conn = match mysql_async::Conn::new(opts).await {
        Ok(conn) => conn,
        Err(e) => {
            unavailable("MariaDB on 127.0.0.1:3306", e);
            return None;
        }
    };
    conn.query_drop(format!("DROP DATABASE IF EXISTS {database}"))
        .await
        .expect("drop database");
    conn.query_drop(format!("CREATE DATABASE {database} CHARACTER SET utf8mb4"))
        .await
        .expect("create database");
    conn.query_drop(format!("USE {database}"))
        .await
        .expect("use database");
    Some(conn)
}

/// An OpenSSH server on a free loopback port, for the tunnel tests; killed on drop.
pub struct Sshd {
    pub port: u16,
    pub authorized_keys: PathBuf,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Sshd {
    pub fn start() -> Option<Self> {
        let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists());
        let Some(sshd) = sshd else {
            unavailable(
                "OpenSSH server (sshd; Debian package openssh-server)",
                "not installed",
            );
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let host_key = dir.path().join("host_ed25519");
        let keygen = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&host_key)
            .status()
            .expect("ssh-keygen");
        assert!(keygen.success());
        let authorized_keys = dir.path().join("authorized_keys");
        std::fs::write(&authorized_keys, "").expect("authorized_keys");
        std::fs::create_dir_all("/run/sshd").ok();
        let port = free_port();
        let config = dir.path().join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
                 PermitRootLogin prohibit-password\nAllowTcpForwarding yes\nLogLevel ERROR\n",
                host_key.display(),
                authorized_keys.display(),
                dir.path().join("sshd.pid").display()
            ),
        )
        .expect("sshd_config");
        let child = std::process::Command::new(sshd)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start sshd");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "sshd did not start on port {port}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Some(Self {
            port,
            authorized_keys,
            child,
            _dir: dir,
        })
    }

    pub fn authorize(&self, public_key: &str) {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.authorized_keys)
            .expect("authorized_keys");
        writeln!(file, "{}", public_key.trim()).expect("authorize");
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The export files the `file` destination wrote for `mapping`, oldest first (their names
/// start with the run's UTC start time).
fn export_files(project_dir: &Path, mapping: &str) -> Vec<PathBuf> {
    let dir = project_dir.join("exports").join(mapping);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

fn records_of(file: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(file)
        .expect("read export")
        .lines()
        .map(|l| serde_json::from_str(l).expect("jsonl"))
        .collect()
}

/// Every record the `file` destination wrote for `mapping`, in file order.
pub fn exported_records(project_dir: &Path, mapping: &str) -> Vec<serde_json::Value> {
    export_files(project_dir, mapping)
        .iter()
        .flat_map(|f| records_of(f))
        .collect()
}

/// Only the records of the newest export file of `mapping`.
pub fn latest_export(project_dir: &Path, mapping: &str) -> Vec<serde_json::Value> {
    export_files(project_dir, mapping)
        .last()
        .map(|f| records_of(f))
        .unwrap_or_default()
}

/// The raw text of every export file of `mapping` (to check digits JSON parsing would round).
pub fn raw_exports(project_dir: &Path, mapping: &str) -> String {
    export_files(project_dir, mapping)
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("read export"))
        .collect()
}

/// A Google API's published discovery document (`bigquery.v2.json`, `datamanager.v1.json`),
/// from PyPI's `google-api-python-client`, which `.ci/test-tools` installs; `None` (skipped,
/// or a failure under `SLUICE_REQUIRE_SERVICES=1`) when it is not there.
pub fn google_discovery(document: &str, api: &str) -> Option<serde_json::Value> {
    let path = crate::buckets::tools_dir().join(format!(
        "warehouses/lib/python3.11/site-packages/googleapiclient/discovery_cache/documents/{document}"
    ));
    match std::fs::read_to_string(&path) {
        Ok(text) => Some(serde_json::from_str(&text).expect("discovery document")),
        Err(e) => {
            unavailable(
                &format!("{api}'s discovery document (PyPI google-api-python-client, from .ci/test-tools)"),
                format!("{}: {e}", path.display()),
            );
            None
        }
    }
}

/// `value` is an instance of the discovery document's schema `name`: every key is one of its
/// properties, of its type, inside lists too, and a value from its `enum` where it has one.
pub fn discovery_conforms(
    discovery: &serde_json::Value,
    name: &str,
    value: &serde_json::Value,
    at: &str,
) -> Result<(), String> {
    let schema = &discovery["schemas"][name];
    let properties = schema["properties"]
        .as_object()
        .ok_or_else(|| format!("no schema {name}"))?;
    for (key, inner) in value
        .as_object()
        .ok_or_else(|| format!("{at} is not an object"))?
    {
        let property = properties
            .get(key)
            .ok_or_else(|| format!("{at}.{key} is not a field of {name}"))?;
        conforms_to_property(discovery, property, inner, &format!("{at}.{key}"))?;
    }
    Ok(())
}

fn conforms_to_property(
    discovery: &serde_json::Value,
    property: &serde_json::Value,
    value: &serde_json::Value,
    at: &str,
) -> Result<(), String> {
    if let Some(reference) = property["$ref"].as_str() {
        return discovery_conforms(discovery, reference, value, at);
    }
    let expected = property["type"].as_str().unwrap_or("any");
    let ok = match expected {
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_u64() || value.is_i64(),
        "number" => value.is_number(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        _ => true,
    };
    if !ok {
        return Err(format!("{at} should be {expected} ({})", property["format"]));
    }
    if let (Some(allowed), Some(text)) = (property["enum"].as_array(), value.as_str())
        && !allowed.iter().any(|a| a == text)
    {
        return Err(format!("{at} is `{text}`, not one of {allowed:?}"));
    }
    if let (Some(items), Some(elements)) = (property.get("items"), value.as_array()) {
        for (i, element) in elements.iter().enumerate() {
            conforms_to_property(discovery, items, element, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}
