//! A SQL Server stand-in for the tests: a TDS 7.4 server on loopback whose SQL runs on the local
//! PostgreSQL. No SQL Server, emulator or TDS server exists in the package registries, so this
//! plays the parts of SQL Server that sluice meets, from MS-TDS:
//!
//! - PRELOGIN, with encryption negotiated as SQL Server does: none, TLS inside PRELOGIN packets
//!   (TDS 7.x), or TDS 8.0 `strict` (TLS before the first byte of TDS, ALPN `tds/8.0`);
//! - LOGIN7 with SQL authentication (the password's nibble-swap-and-XOR obfuscation undone and
//!   checked), LOGINACK, ENVCHANGE, and Msg 18456 / 4060 for a wrong password or database;
//! - SQL batches (ALL_HEADERS, UTF-16 text) answered with COLMETADATA, ROW and DONE tokens in
//!   SQL Server's type encodings (INTN, BITN, FLTN, DECIMALN, MONEYN, NVARCHAR and its PLP form
//!   for `max`, BIGVARBINARY, DATEN, TIMEN, DATETIME2N, DATETIMEOFFSETN in UTC with an offset,
//!   DATETIMN, GUID), and ERROR tokens with SQL Server's message numbers;
//! - `sp_describe_first_result_set`, answered from the query's PostgreSQL types (PostgreSQL
//!   domains named `tinyint`, `datetime`, `smalldatetime` and `geography` stand for SQL Server
//!   types PostgreSQL lacks);
//! - `SET TRANSACTION ISOLATION LEVEL SNAPSHOT` refused with Msg 3952 unless allowed, and
//!   `TOP (n)` rewritten to `LIMIT n` for PostgreSQL.
//!
//! Every batch a client sends is recorded, so tests check the T-SQL sluice emits.

use std::sync::{Arc, Mutex};

use bytes::{BufMut, BytesMut};
use futures::TryStreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

const PACKET_SIZE: usize = 4096;
const PRELOGIN: u8 = 0x12;
const LOGIN7: u8 = 0x10;
const SQL_BATCH: u8 = 0x01;
const TABULAR_RESULT: u8 = 0x04;
const ATTENTION: u8 = 0x06;

/// How the server encrypts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TdsTls {
    /// No certificate: PRELOGIN answers ENCRYPT_NOT_SUP.
    None,
    /// TLS negotiated in PRELOGIN (ENCRYPT_ON), its handshake carried in PRELOGIN packets.
    Prelogin,
    /// TDS 8.0: TLS first.
    Strict,
}

#[derive(Clone)]
pub struct TdsOptions {
    /// The PostgreSQL the SQL runs on.
    pub postgres_url: String,
    pub user: String,
    pub password: String,
    /// The one database there is: a PostgreSQL schema of this name.
    pub database: String,
    pub tls: TdsTls,
    pub allow_snapshot: bool,
}

pub struct TdsServer {
    pub port: u16,
    batches: Arc<Mutex<Vec<String>>>,
}

impl TdsServer {
    pub async fn start(
        options: TdsOptions,
        certificate: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let batches: Arc<Mutex<Vec<String>>> = Arc::default();
        let acceptor = certificate.map(|(cert, key)| tls_acceptor(cert, key, options.tls == TdsTls::Strict));
        let seen = batches.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let session = Session {
                    options: options.clone(),
                    batches: seen.clone(),
                    pg: None,
                    in_transaction: false,
                    snapshot_refused: false,
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Err(e) = session.serve(socket, acceptor).await {
                        eprintln!("tds stand-in: connection ended: {e}");
                    }
                });
            }
        });
        Self { port, batches }
    }

    /// The SQL batches clients sent, in order.
    pub fn batches(&self) -> Vec<String> {
        self.batches.lock().unwrap().clone()
    }
}

fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path, strict: bool) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .expect("read certificate")
        .collect::<Result<_, _>>()
        .expect("parse certificate");
    let key = PrivateKeyDer::from_pem_file(key).expect("read key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate");
    // After a TDS 7.x handshake the client reads raw TLS records; a ticket written after the
    // handshake but framed as PRELOGIN would desynchronise it. SQL Server sends none either.
    config.send_tls13_tickets = 0;
    if strict {
        config.alpn_protocols = vec![b"tds/8.0".to_vec()];
    }
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

struct Session {
    options: TdsOptions,
    batches: Arc<Mutex<Vec<String>>>,
    pg: Option<tokio_postgres::Client>,
    /// A client transaction is open on PostgreSQL.
    in_transaction: bool,
    /// `SET TRANSACTION ISOLATION LEVEL SNAPSHOT` in a database that does not allow it: SQL
    /// Server refuses at the first read, not at the SET.
    snapshot_refused: bool,
}

type Outcome<T> = std::result::Result<T, String>;

impl Session {
    async fn serve(
        mut self,
        socket: tokio::net::TcpStream,
        acceptor: Option<tokio_rustls::TlsAcceptor>,
    ) -> Outcome<()> {
        socket.set_nodelay(true).ok();
        let mut stream: Box<dyn Stream> = match (self.options.tls, &acceptor) {
            (TdsTls::Strict, Some(acceptor)) => Box::new(
                acceptor
                    .accept(socket)
                    .await
                    .map_err(|e| format!("strict TLS: {e}"))?,
            ),
            _ => Box::new(socket),
        };
        let (kind, prelogin) = read_message(&mut stream).await?.ok_or("closed before PRELOGIN")?;
        if kind != PRELOGIN {
            return Err(format!("expected PRELOGIN, got packet type {kind:#x}"));
        }
        let client_encryption = prelogin_option(&prelogin, 0x01)
            .and_then(|v| v.first().copied())
            .unwrap_or(2);
        // ENCRYPT_OFF 0, ON 1, NOT_SUP 2, REQ 3.
        let answer = match self.options.tls {
            TdsTls::None => 2,
            TdsTls::Prelogin if client_encryption == 2 => 2,
            TdsTls::Prelogin => 1,
            TdsTls::Strict => 1,
        };
        write_message(&mut stream, &prelogin_response(answer)).await?;
        if self.options.tls == TdsTls::Prelogin && answer == 1 {
            let acceptor = acceptor.ok_or("TLS without a certificate")?;
            let wrapped = PreloginFramed::new(stream);
            let mut tls = acceptor
                .accept(wrapped)
                .await
                .map_err(|e| format!("TLS in PRELOGIN: {e}"))?;
            tls.get_mut().0.framing = false;
            stream = Box::new(tls);
        }
        let (kind, login) = read_message(&mut stream).await?.ok_or("closed before LOGIN7")?;
        if kind != LOGIN7 {
            return Err(format!("expected LOGIN7, got packet type {kind:#x}"));
        }
        let login = Login7::parse(&login)?;
        if login.user != self.options.user || login.password != self.options.password {
            let mut out = BytesMut::new();
            error_token(
                &mut out,
                18456,
                1,
                14,
                &format!("Login failed for user '{}'.", login.user),
            );
            done(&mut out, 0x0002, 0, 0);
            write_message(&mut stream, &out).await?;
            return Ok(());
        }
        if !login.database.is_empty() && login.database != self.options.database {
            let mut out = BytesMut::new();
            error_token(
                &mut out,
                4060,
                1,
                11,
                &format!(
                    "Cannot open database \"{}\" requested by the login. The login failed.",
                    login.database
                ),
            );
            error_token(
                &mut out,
                18456,
                1,
                14,
                &format!("Login failed for user '{}'.", login.user),
            );
            done(&mut out, 0x0002, 0, 0);
            write_message(&mut stream, &out).await?;
            return Ok(());
        }
        let (pg, connection) = tokio_postgres::connect(&self.options.postgres_url, tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        pg.batch_execute(&format!("SET search_path = {}, public", self.options.database))
            .await
            .map_err(|e| e.to_string())?;
        self.pg = Some(pg);
        write_message(&mut stream, &login_ack(&self.options.database)).await?;

        while let Some((kind, message)) = read_message(&mut stream).await? {
            match kind {
                SQL_BATCH => {
                    let sql = batch_text(&message)?;
                    self.batches.lock().unwrap().push(sql.clone());
                    self.batch(&mut stream, &sql).await?;
                }
                ATTENTION => {
                    let mut out = BytesMut::new();
                    done(&mut out, 0x0020, 0, 0);
                    write_message(&mut stream, &out).await?;
                }
                other => return Err(format!("packet type {other:#x} is not played here")),
            }
        }
        Ok(())
    }

    fn pg(&self) -> &tokio_postgres::Client {
        self.pg.as_ref().expect("logged in")
    }

    async fn batch(&mut self, stream: &mut Box<dyn Stream>, sql: &str) -> Outcome<()> {
        let mut out = Writer::new(stream);
        let trimmed = sql.trim();
        let upper = trimmed.to_ascii_uppercase();
        if let Some(rest) = trimmed.strip_prefix("EXEC sp_describe_first_result_set @tsql = N'") {
            let inner = rest
                .strip_suffix('\'')
                .ok_or("the @tsql literal is not closed")?
                .replace("''", "'");
            match self.describe(&inner).await {
                Ok(columns) => write_describe(&mut out, &columns).await?,
                Err(e) => {
                    self.pg_error(&mut out.buf, &e);
                    done(&mut out.buf, 0x0002, 0, 0);
                }
            }
            return out.finish().await;
        }
        if upper.starts_with("SET TRANSACTION ISOLATION LEVEL") {
            let snapshot = upper.contains("LEVEL SNAPSHOT");
            self.snapshot_refused = snapshot && !self.options.allow_snapshot;
            let level = if snapshot {
                "REPEATABLE READ"
            } else {
                "READ COMMITTED"
            };
            if upper.contains("BEGIN TRANSACTION") {
                self.pg()
                    .batch_execute(&format!("BEGIN ISOLATION LEVEL {level}"))
                    .await
                    .map_err(|e| e.to_string())?;
                self.in_transaction = true;
            }
            done(&mut out.buf, 0x0001, 0, 0);
            done(&mut out.buf, 0x0000, 0, 0);
            return out.finish().await;
        }
        if upper.contains("ROLLBACK") {
            self.pg().batch_execute("ROLLBACK").await.ok();
            self.in_transaction = false;
            done(&mut out.buf, 0x0000, 0, 0);
            return out.finish().await;
        }
        if std::mem::take(&mut self.snapshot_refused) {
            error_token(
                &mut out.buf,
                3952,
                1,
                16,
                &format!(
                    "Snapshot isolation transaction failed accessing database '{}' because snapshot isolation is not allowed in this database. Use ALTER DATABASE to allow snapshot isolation.",
                    self.options.database
                ),
            );
            done(&mut out.buf, 0x0002, 0, 0);
            return out.finish().await;
        }
        let query = to_postgres(trimmed);
        let columns = match self.describe(&query).await {
            Ok(columns) => columns,
            Err(e) => {
                self.pg_error(&mut out.buf, &e);
                done(&mut out.buf, 0x0002, 0, 0);
                return out.finish().await;
            }
        };
        if columns.is_empty() {
            self.pg().batch_execute(&query).await.map_err(|e| e.to_string())?;
            done(&mut out.buf, 0x0000, 0, 0);
            return out.finish().await;
        }
        col_metadata(&mut out.buf, &columns);
        let rows = self.pg().simple_query_raw(&query).await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                self.pg_error(&mut out.buf, &e);
                done(&mut out.buf, 0x0002, 0, 0);
                return out.finish().await;
            }
        };
        let mut rows = std::pin::pin!(rows);
        let mut count = 0u64;
        loop {
            match rows.try_next().await {
                Ok(Some(tokio_postgres::SimpleQueryMessage::Row(row))) => {
                    out.buf.put_u8(0xD1);
                    for (i, column) in columns.iter().enumerate() {
                        let text = row.try_get(i).map_err(|e| e.to_string())?;
                        column.ty.encode_value(&mut out.buf, text)?;
                    }
                    count += 1;
                    out.flush_full().await?;
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    self.pg_error(&mut out.buf, &e);
                    done(&mut out.buf, 0x0002 | 0x0010, 0xC1, count);
                    return out.finish().await;
                }
            }
        }
        done(&mut out.buf, 0x0010, 0xC1, count);
        out.finish().await
    }

    /// The query's columns with their SQL Server types, from a temporary view's PostgreSQL types.
    async fn describe(&self, query: &str) -> std::result::Result<Vec<MsColumn>, tokio_postgres::Error> {
        let query = to_postgres(query);
        let upper = query.trim_start().to_ascii_uppercase();
        if !(upper.starts_with("SELECT") || upper.starts_with("WITH") || upper.starts_with("VALUES")) {
            return Ok(Vec::new());
        }
        let pg = self.pg();
        // The temporary view is made and dropped inside the client's transaction (a savepoint)
        // or a transaction of its own, so a failure leaves the session as it was.
        let (open, undo) = if self.in_transaction {
            (
                "SAVEPOINT sluice_tds_describe",
                "ROLLBACK TO SAVEPOINT sluice_tds_describe",
            )
        } else {
            ("BEGIN", "ROLLBACK")
        };
        pg.batch_execute(open).await?;
        let described = async {
            pg.batch_execute(&format!("CREATE TEMP VIEW sluice_tds_describe AS {query}"))
                .await?;
            pg.query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), NOT a.attnotnull
                 FROM pg_attribute a
                 WHERE a.attrelid = 'sluice_tds_describe'::regclass AND a.attnum > 0 AND NOT a.attisdropped
                 ORDER BY a.attnum",
                &[],
            )
            .await
        }
        .await;
        pg.batch_execute(undo).await.ok();
        let rows = described?;
        Ok(rows
            .iter()
            .map(|row| {
                let type_name: String = row.get(1);
                MsColumn {
                    name: row.get(0),
                    ty: MsType::from_postgres(&type_name),
                }
            })
            .collect())
    }

    /// A PostgreSQL error as the SQL Server error a client would get for the same mistake.
    fn pg_error(&self, out: &mut BytesMut, error: &tokio_postgres::Error) {
        let message = error
            .as_db_error()
            .map_or_else(|| error.to_string(), |e| e.message().to_string());
        let quoted = message.split('"').nth(1).unwrap_or("").to_string();
        let (number, text) = match error.code().map(|c| c.code()) {
            Some("42P01") => (208, format!("Invalid object name '{quoted}'.")),
            Some("42703") => (207, format!("Invalid column name '{quoted}'.")),
            Some("42601") => (102, format!("Incorrect syntax near '{quoted}'.")),
            Some("42501") => (
                229,
                format!(
                    "The SELECT permission was denied on the object '{quoted}', database '{}', schema 'dbo'.",
                    self.options.database
                ),
            ),
            _ => (50000, message),
        };
        error_token(out, number, 1, 16, &text);
    }
}

/// `TOP (n)` as PostgreSQL's `LIMIT n`, `N'...'` as `'...'`: enough T-SQL for the tests' models.
fn to_postgres(sql: &str) -> String {
    let mut sql = sql.replace(" N'", " '").replace("(N'", "('");
    if let Some(rest) = sql.strip_prefix("SELECT TOP (") {
        let (limit, rest) = rest.split_once(')').unwrap_or(("0", rest));
        sql = format!("SELECT{rest} LIMIT {limit}");
    }
    sql
}

struct MsColumn {
    name: String,
    ty: MsType,
}

#[derive(Debug, Clone, PartialEq)]
enum MsType {
    Bit,
    TinyInt,
    SmallInt,
    Int,
    BigInt,
    Real,
    Float,
    Decimal(u8, u8),
    Money,
    /// nvarchar(n); `None` is nvarchar(max), sent in PLP chunks.
    NVarChar(Option<u16>),
    VarBinaryMax,
    Date,
    Time(u8),
    DateTime2(u8),
    DateTimeOffset(u8),
    DateTime,
    SmallDateTime,
    Guid,
    /// A type the client is expected to refuse after describing it (never encoded).
    Other(String),
}

impl MsType {
    fn from_postgres(type_name: &str) -> Self {
        let name = type_name
            .rsplit('.')
            .next()
            .unwrap_or(type_name)
            .trim_matches('"');
        let scale_of = |name: &str| -> Option<u8> {
            name.split_once('(')
                .and_then(|(_, rest)| rest.split(')').next())
                .and_then(|n| n.parse().ok())
        };
        match name {
            "boolean" => MsType::Bit,
            "tinyint" => MsType::TinyInt,
            "smallint" => MsType::SmallInt,
            "integer" => MsType::Int,
            "bigint" => MsType::BigInt,
            "real" => MsType::Real,
            "double precision" => MsType::Float,
            "money" => MsType::Money,
            "text" | "json" | "jsonb" => MsType::NVarChar(None),
            "bytea" => MsType::VarBinaryMax,
            "date" => MsType::Date,
            "uuid" => MsType::Guid,
            "datetime" => MsType::DateTime,
            "smalldatetime" => MsType::SmallDateTime,
            n if n.starts_with("numeric(") => {
                let args = &n["numeric(".len()..n.len() - 1];
                let (p, s) = args.split_once(',').unwrap_or((args, "0"));
                MsType::Decimal(p.trim().parse().unwrap_or(38), s.trim().parse().unwrap_or(0))
            }
            "numeric" => MsType::Decimal(38, 10),
            n if n.starts_with("character varying(") || n.starts_with("character(") => {
                // A length above 4000 is nvarchar(max) in SQL Server.
                let length: Option<u16> = n
                    .split_once('(')
                    .and_then(|(_, r)| r.trim_end_matches(')').parse().ok());
                MsType::NVarChar(length.filter(|&l| l <= 4000))
            }
            "character varying" => MsType::NVarChar(None),
            n if n.starts_with("time") && n.ends_with("without time zone") && !n.starts_with("timestamp") => {
                MsType::Time(scale_of(n).unwrap_or(6))
            }
            n if n.starts_with("timestamp") && n.ends_with("without time zone") => {
                MsType::DateTime2(scale_of(n).unwrap_or(6))
            }
            n if n.starts_with("timestamp") && n.ends_with("with time zone") => {
                MsType::DateTimeOffset(scale_of(n).unwrap_or(6))
            }
            other => MsType::Other(other.to_string()),
        }
    }

    /// `system_type_name`, precision and scale as `sp_describe_first_result_set` reports them.
    fn describe(&self) -> (String, u8, u8, i16) {
        match self {
            MsType::Bit => ("bit".into(), 1, 0, 1),
            MsType::TinyInt => ("tinyint".into(), 3, 0, 1),
            MsType::SmallInt => ("smallint".into(), 5, 0, 2),
            MsType::Int => ("int".into(), 10, 0, 4),
            MsType::BigInt => ("bigint".into(), 19, 0, 8),
            MsType::Real => ("real".into(), 24, 0, 4),
            MsType::Float => ("float".into(), 53, 0, 8),
            MsType::Decimal(p, s) => (format!("decimal({p},{s})"), *p, *s, decimal_len(*p) as i16 - 1),
            MsType::Money => ("money".into(), 19, 4, 8),
            MsType::NVarChar(Some(n)) => (format!("nvarchar({n})"), 0, 0, (*n as i16) * 2),
            MsType::NVarChar(None) => ("nvarchar(max)".into(), 0, 0, -1),
            MsType::VarBinaryMax => ("varbinary(max)".into(), 0, 0, -1),
            MsType::Date => ("date".into(), 10, 0, 3),
            MsType::Time(s) => (format!("time({s})"), 8 + *s + u8::from(*s > 0), *s, 5),
            MsType::DateTime2(s) => (format!("datetime2({s})"), 19 + *s + u8::from(*s > 0), *s, 8),
            MsType::DateTimeOffset(s) => (format!("datetimeoffset({s})"), 26 + *s + u8::from(*s > 0), *s, 10),
            MsType::DateTime => ("datetime".into(), 23, 3, 8),
            MsType::SmallDateTime => ("smalldatetime".into(), 16, 0, 4),
            MsType::Guid => ("uniqueidentifier".into(), 0, 0, 16),
            MsType::Other(name) => (name.clone(), 0, 0, -1),
        }
    }

    fn type_info(&self, out: &mut BytesMut) {
        match self {
            MsType::Bit => out.put_slice(&[0x68, 1]),
            MsType::TinyInt => out.put_slice(&[0x26, 1]),
            MsType::SmallInt => out.put_slice(&[0x26, 2]),
            MsType::Int => out.put_slice(&[0x26, 4]),
            MsType::BigInt => out.put_slice(&[0x26, 8]),
            MsType::Real => out.put_slice(&[0x6D, 4]),
            MsType::Float => out.put_slice(&[0x6D, 8]),
            MsType::Decimal(p, s) => out.put_slice(&[0x6A, decimal_len(*p), *p, *s]),
            MsType::Money => out.put_slice(&[0x6E, 8]),
            MsType::NVarChar(_) | MsType::Other(_) => {
                let max = match self {
                    MsType::NVarChar(Some(n)) => n * 2,
                    _ => 0xFFFF,
                };
                out.put_u8(0xE7);
                out.put_u16_le(max);
                // SQL_Latin1_General_CP1_CI_AS.
                out.put_slice(&[0x09, 0x04, 0xD0, 0x00, 0x34]);
            }
            MsType::VarBinaryMax => {
                out.put_u8(0xA5);
                out.put_u16_le(0xFFFF);
            }
            MsType::Date => out.put_u8(0x28),
            MsType::Time(s) => out.put_slice(&[0x29, *s]),
            MsType::DateTime2(s) => out.put_slice(&[0x2A, *s]),
            MsType::DateTimeOffset(s) => out.put_slice(&[0x2B, *s]),
            MsType::DateTime => out.put_slice(&[0x6F, 8]),
            MsType::SmallDateTime => out.put_slice(&[0x6F, 4]),
            MsType::Guid => out.put_slice(&[0x24, 16]),
        }
    }

    /// One value of this type in a ROW token, from PostgreSQL's text form.
    fn encode_value(&self, out: &mut BytesMut, text: Option<&str>) -> Outcome<()> {
        let Some(text) = text else {
            match self {
                MsType::NVarChar(Some(_)) => out.put_u16_le(0xFFFF),
                MsType::NVarChar(None) | MsType::VarBinaryMax | MsType::Other(_) => out.put_u64_le(u64::MAX),
                _ => out.put_u8(0),
            }
            return Ok(());
        };
        let bad = |what: &str| format!("`{text}` is not a {what}");
        match self {
            MsType::Bit => out.put_slice(&[1, u8::from(text == "t")]),
            MsType::TinyInt => out.put_slice(&[1, text.parse::<u8>().map_err(|_| bad("tinyint"))?]),
            MsType::SmallInt => {
                out.put_u8(2);
                out.put_i16_le(text.parse().map_err(|_| bad("smallint"))?);
            }
            MsType::Int => {
                out.put_u8(4);
                out.put_i32_le(text.parse().map_err(|_| bad("int"))?);
            }
            MsType::BigInt => {
                out.put_u8(8);
                out.put_i64_le(text.parse().map_err(|_| bad("bigint"))?);
            }
            MsType::Real => {
                out.put_u8(4);
                out.put_f32_le(text.parse().map_err(|_| bad("real"))?);
            }
            MsType::Float => {
                out.put_u8(8);
                out.put_f64_le(text.parse().map_err(|_| bad("float"))?);
            }
            MsType::Decimal(p, s) => {
                let value = scaled(text, *s).ok_or_else(|| bad("decimal"))?;
                let len = decimal_len(*p);
                out.put_u8(len);
                out.put_u8(u8::from(value >= 0));
                let magnitude = value.unsigned_abs().to_le_bytes();
                out.put_slice(&magnitude[..usize::from(len) - 1]);
            }
            MsType::Money => {
                let cleaned: String = text.chars().filter(|c| !matches!(c, '$' | ',')).collect();
                let value = scaled(&cleaned, 4).ok_or_else(|| bad("money"))? as i64;
                out.put_u8(8);
                out.put_i32_le((value >> 32) as i32);
                out.put_u32_le(value as u32);
            }
            MsType::NVarChar(Some(_)) => {
                let utf16: Vec<u16> = text.encode_utf16().collect();
                out.put_u16_le((utf16.len() * 2) as u16);
                utf16.iter().for_each(|unit| out.put_u16_le(*unit));
            }
            MsType::NVarChar(None) | MsType::Other(_) => {
                let utf16: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
                plp(out, &utf16);
            }
            MsType::VarBinaryMax => {
                let hex = text.strip_prefix("\\x").ok_or_else(|| bad("bytea"))?;
                let bytes: Vec<u8> = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|_| bad("bytea"))?;
                plp(out, &bytes);
            }
            MsType::Date => {
                out.put_u8(3);
                put_days(out, days_from_year_one(text).ok_or_else(|| bad("date"))?);
            }
            MsType::Time(s) => {
                let (len, increments) = time_increments(text, *s).ok_or_else(|| bad("time"))?;
                out.put_u8(len);
                out.put_slice(&increments.to_le_bytes()[..usize::from(len)]);
            }
            MsType::DateTime2(s) => {
                let (date, time) = text.split_once(' ').ok_or_else(|| bad("timestamp"))?;
                let (len, increments) = time_increments(time, *s).ok_or_else(|| bad("time"))?;
                out.put_u8(len + 3);
                out.put_slice(&increments.to_le_bytes()[..usize::from(len)]);
                put_days(out, days_from_year_one(date).ok_or_else(|| bad("date"))?);
            }
            MsType::DateTimeOffset(s) => {
                // PostgreSQL prints timestamptz in the session's zone (UTC here): `... +00`.
                let text = text.trim_end_matches("+00");
                let (date, time) = text.split_once(' ').ok_or_else(|| bad("timestamptz"))?;
                let (len, increments) = time_increments(time, *s).ok_or_else(|| bad("time"))?;
                out.put_u8(len + 5);
                out.put_slice(&increments.to_le_bytes()[..usize::from(len)]);
                put_days(out, days_from_year_one(date).ok_or_else(|| bad("date"))?);
                // UTC on the wire; the offset is where the value was written (+02:00 here).
                out.put_i16_le(120);
            }
            MsType::DateTime => {
                let (date, time) = text.split_once(' ').ok_or_else(|| bad("datetime"))?;
                let days = days_from_year_one(date).ok_or_else(|| bad("date"))? as i64 - 693_595;
                let (_, micros) = time_increments(time, 6).ok_or_else(|| bad("time"))?;
                out.put_u8(8);
                out.put_i32_le(days as i32);
                out.put_u32_le(((micros as u128 * 300 + 500_000) / 1_000_000) as u32);
            }
            MsType::SmallDateTime => {
                let (date, time) = text.split_once(' ').ok_or_else(|| bad("smalldatetime"))?;
                let days = days_from_year_one(date).ok_or_else(|| bad("date"))? as i64 - 693_595;
                let (_, micros) = time_increments(time, 6).ok_or_else(|| bad("time"))?;
                out.put_u8(4);
                out.put_u16_le(days as u16);
                out.put_u16_le((micros / 60_000_000) as u16);
            }
            MsType::Guid => {
                let uuid = uuid::Uuid::parse_str(text).map_err(|_| bad("uuid"))?;
                let b = uuid.as_bytes();
                out.put_u8(16);
                // The first three groups little-endian, as SQL Server stores them.
                out.put_slice(&[b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6]]);
                out.put_slice(&b[8..]);
            }
        }
        Ok(())
    }
}

fn decimal_len(precision: u8) -> u8 {
    match precision {
        0..=9 => 5,
        10..=19 => 9,
        20..=28 => 13,
        _ => 17,
    }
}

/// `-123.45` at `scale` as an unscaled integer.
fn scaled(text: &str, scale: u8) -> Option<i128> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (integer, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let mut value: i128 = if integer.is_empty() {
        0
    } else {
        integer.parse().ok()?
    };
    for i in 0..usize::from(scale) {
        let digit = fraction.as_bytes().get(i).map_or(0, |b| i128::from(b - b'0'));
        value = value * 10 + digit;
    }
    Some(if negative { -value } else { value })
}

fn days_from_year_one(date: &str) -> Option<u32> {
    let date = chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()?;
    let year_one = chrono::NaiveDate::from_ymd_opt(1, 1, 1)?;
    u32::try_from((date - year_one).num_days()).ok()
}

fn put_days(out: &mut BytesMut, days: u32) {
    out.put_slice(&days.to_le_bytes()[..3]);
}

/// `HH:MM:SS[.ffffff]` as (byte length, increments of 10^-scale seconds).
fn time_increments(time: &str, scale: u8) -> Option<(u8, u64)> {
    let time = chrono::NaiveTime::parse_from_str(time, "%H:%M:%S%.f").ok()?;
    use chrono::Timelike;
    let nanos = u64::from(time.num_seconds_from_midnight()) * 1_000_000_000 + u64::from(time.nanosecond());
    let increments = nanos / 10u64.pow(9 - u32::from(scale));
    let len = match scale {
        0..=2 => 3,
        3..=4 => 4,
        _ => 5,
    };
    Some((len, increments))
}

/// A PLP value sent in chunks of at most 8000 bytes, as SQL Server sends `max` types.
fn plp(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u64_le(bytes.len() as u64);
    for chunk in bytes.chunks(8000) {
        out.put_u32_le(chunk.len() as u32);
        out.put_slice(chunk);
    }
    out.put_u32_le(0);
}

fn put_b_varchar(out: &mut BytesMut, text: &str) {
    let utf16: Vec<u16> = text.encode_utf16().collect();
    out.put_u8(utf16.len() as u8);
    utf16.iter().for_each(|unit| out.put_u16_le(*unit));
}

fn put_us_varchar(out: &mut BytesMut, text: &str) {
    let utf16: Vec<u16> = text.encode_utf16().collect();
    out.put_u16_le(utf16.len() as u16);
    utf16.iter().for_each(|unit| out.put_u16_le(*unit));
}

fn col_metadata(out: &mut BytesMut, columns: &[MsColumn]) {
    out.put_u8(0x81);
    out.put_u16_le(columns.len() as u16);
    for column in columns {
        out.put_u32_le(0); // UserType
        out.put_u16_le(0x0001 | 0x0008); // nullable, updateable unknown
        column.ty.type_info(out);
        put_b_varchar(
            out,
            if column.name == "?column?" {
                ""
            } else {
                &column.name
            },
        );
    }
}

/// `sp_describe_first_result_set`'s first nine columns, in its order and types.
async fn write_describe(out: &mut Writer<'_>, columns: &[MsColumn]) -> Outcome<()> {
    let meta = [
        ("is_hidden", MsType::Bit),
        ("column_ordinal", MsType::Int),
        ("name", MsType::NVarChar(Some(128))),
        ("is_nullable", MsType::Bit),
        ("system_type_id", MsType::Int),
        ("system_type_name", MsType::NVarChar(Some(256))),
        ("max_length", MsType::SmallInt),
        ("precision", MsType::TinyInt),
        ("scale", MsType::TinyInt),
    ]
    .map(|(name, ty)| MsColumn {
        name: name.into(),
        ty,
    });
    col_metadata(&mut out.buf, &meta);
    for (i, column) in columns.iter().enumerate() {
        let (type_name, precision, scale, max_length) = column.ty.describe();
        out.buf.put_u8(0xD1);
        let values = [
            "f".to_string(),
            (i + 1).to_string(),
            column.name.clone(),
            "t".to_string(),
            "0".to_string(),
            type_name,
            max_length.to_string(),
            precision.to_string(),
            scale.to_string(),
        ];
        for (j, (value, meta)) in values.iter().zip(&meta).enumerate() {
            // An expression without an alias has no name in SQL Server (PostgreSQL says `?column?`).
            let unnamed = j == 2 && value == "?column?";
            meta.ty
                .encode_value(&mut out.buf, (!unnamed).then_some(value.as_str()))?;
        }
    }
    done(&mut out.buf, 0x0010, 0xC1, columns.len() as u64);
    Ok(())
}

fn error_token(out: &mut BytesMut, number: i32, state: u8, class: u8, message: &str) {
    let mut body = BytesMut::new();
    body.put_i32_le(number);
    body.put_u8(state);
    body.put_u8(class);
    put_us_varchar(&mut body, message);
    put_b_varchar(&mut body, "sluice-tds-standin");
    put_b_varchar(&mut body, "");
    body.put_i32_le(1);
    out.put_u8(0xAA);
    out.put_u16_le(body.len() as u16);
    out.put_slice(&body);
}

fn done(out: &mut BytesMut, status: u16, command: u16, rows: u64) {
    out.put_u8(0xFD);
    out.put_u16_le(status);
    out.put_u16_le(command);
    out.put_u64_le(rows);
}

fn env_change(out: &mut BytesMut, kind: u8, new: &str, old: &str) {
    let mut body = BytesMut::new();
    body.put_u8(kind);
    put_b_varchar(&mut body, new);
    put_b_varchar(&mut body, old);
    out.put_u8(0xE3);
    out.put_u16_le(body.len() as u16);
    out.put_slice(&body);
}

fn login_ack(database: &str) -> BytesMut {
    let mut out = BytesMut::new();
    env_change(&mut out, 1, database, "master");
    env_change(&mut out, 4, &PACKET_SIZE.to_string(), "4096");
    let mut body = BytesMut::new();
    body.put_u8(1); // SQL_TSQL
    body.put_u32(0x7400_0004); // TDS 7.4, big-endian
    put_b_varchar(&mut body, "Microsoft SQL Server");
    body.put_slice(&[16, 0, 0x11, 0x94]); // 16.0.4500
    out.put_u8(0xAD);
    out.put_u16_le(body.len() as u16);
    out.put_slice(&body);
    done(&mut out, 0x0000, 0, 0);
    out
}

fn prelogin_response(encryption: u8) -> BytesMut {
    // VERSION (6), ENCRYPTION (1), INSTOPT (1), THREADID (4), MARS (1), then the terminator.
    let options: [(u8, Vec<u8>); 5] = [
        (0x00, vec![16, 0, 0x11, 0x94, 0, 0]),
        (0x01, vec![encryption]),
        (0x02, vec![0]),
        (0x03, vec![0, 0, 0, 0]),
        (0x04, vec![0]),
    ];
    let mut out = BytesMut::new();
    let mut offset = (options.len() * 5 + 1) as u16;
    for (token, data) in &options {
        out.put_u8(*token);
        out.put_u16(offset);
        out.put_u16(data.len() as u16);
        offset += data.len() as u16;
    }
    out.put_u8(0xFF);
    for (_, data) in &options {
        out.put_slice(data);
    }
    out
}

fn prelogin_option(message: &[u8], wanted: u8) -> Option<&[u8]> {
    let mut i = 0;
    while let Some(&token) = message.get(i) {
        if token == 0xFF {
            return None;
        }
        let offset = u16::from_be_bytes([*message.get(i + 1)?, *message.get(i + 2)?]) as usize;
        let length = u16::from_be_bytes([*message.get(i + 3)?, *message.get(i + 4)?]) as usize;
        if token == wanted {
            return message.get(offset..offset + length);
        }
        i += 5;
    }
    None
}

struct Login7 {
    user: String,
    password: String,
    database: String,
}

impl Login7 {
    fn parse(message: &[u8]) -> Outcome<Self> {
        let field = |index: usize| -> Outcome<&[u8]> {
            // Offset/length pairs start after the 36-byte fixed part; lengths count characters.
            let at = 36 + index * 4;
            let offset = u16::from_le_bytes([message[at], message[at + 1]]) as usize;
            let chars = u16::from_le_bytes([message[at + 2], message[at + 3]]) as usize;
            message
                .get(offset..offset + chars * 2)
                .ok_or_else(|| "a LOGIN7 field is out of bounds".to_string())
        };
        let text = |bytes: &[u8]| {
            let units: Vec<u16> = bytes
                .chunks(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16_lossy(&units)
        };
        // Each password byte was nibble-swapped, then XORed with 0xA5.
        let password: Vec<u8> = field(2)?.iter().map(|b| (b ^ 0xA5).rotate_left(4)).collect();
        Ok(Self {
            user: text(field(1)?),
            password: text(&password),
            // HostName, UserName, Password, AppName, ServerName, Extension, CltIntName, Language, Database.
            database: text(field(8)?),
        })
    }
}

fn batch_text(message: &[u8]) -> Outcome<String> {
    let headers =
        u32::from_le_bytes(message.get(..4).ok_or("a short SQL batch")?.try_into().unwrap()) as usize;
    let text = message
        .get(headers..)
        .ok_or("ALL_HEADERS longer than the batch")?;
    let units: Vec<u16> = text.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    Ok(String::from_utf16_lossy(&units))
}

/// One message (its packets' payloads joined), or `None` when the client has gone.
async fn read_message(stream: &mut Box<dyn Stream>) -> Outcome<Option<(u8, Vec<u8>)>> {
    let mut message = Vec::new();
    loop {
        let mut header = [0u8; 8];
        match stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && message.is_empty() => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
            Err(e) => return Err(e.to_string()),
        }
        let length = u16::from_be_bytes([header[2], header[3]]) as usize;
        let mut payload = vec![0u8; length.saturating_sub(8)];
        stream.read_exact(&mut payload).await.map_err(|e| e.to_string())?;
        message.extend_from_slice(&payload);
        if header[1] & 0x01 != 0 {
            return Ok(Some((header[0], message)));
        }
    }
}

/// One TDS packet: the 8-byte header (type, status with end-of-message, length, SPID 0,
/// packet id, window 0), then `payload`.
fn packet(kind: u8, last: bool, packet_id: u8, payload: &[u8]) -> BytesMut {
    let mut packet = BytesMut::with_capacity(payload.len() + 8);
    packet.put_u8(kind);
    packet.put_u8(u8::from(last));
    packet.put_u16((payload.len() + 8) as u16);
    packet.put_u16(0);
    packet.put_u8(packet_id);
    packet.put_u8(0);
    packet.put_slice(payload);
    packet
}

/// A whole response message, in as many packets as it takes.
async fn write_message(stream: &mut Box<dyn Stream>, payload: &[u8]) -> Outcome<()> {
    let mut writer = Writer::new(stream);
    writer.buf.extend_from_slice(payload);
    writer.finish().await
}

/// A response written in full packets as rows are encoded, the last marked end-of-message.
struct Writer<'a> {
    stream: &'a mut Box<dyn Stream>,
    buf: BytesMut,
    packet_id: u8,
}

impl<'a> Writer<'a> {
    fn new(stream: &'a mut Box<dyn Stream>) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
            packet_id: 1,
        }
    }

    async fn packet(&mut self, payload: &[u8], last: bool) -> Outcome<()> {
        let packet = packet(TABULAR_RESULT, last, self.packet_id, payload);
        self.packet_id = self.packet_id.wrapping_add(1);
        self.stream.write_all(&packet).await.map_err(|e| e.to_string())
    }

    /// Sends every full packet buffered so far.
    async fn flush_full(&mut self) -> Outcome<()> {
        while self.buf.len() > PACKET_SIZE - 8 {
            let chunk = self.buf.split_to(PACKET_SIZE - 8);
            self.packet(&chunk, false).await?;
        }
        Ok(())
    }

    async fn finish(mut self) -> Outcome<()> {
        self.flush_full().await?;
        let rest = std::mem::take(&mut self.buf);
        self.packet(&rest, true).await?;
        self.stream.flush().await.map_err(|e| e.to_string())
    }
}

/// The server's side of TDS 7.x TLS: while `framing`, TLS records travel as PRELOGIN packet
/// payloads (8-byte headers stripped on read, added on write); after the handshake, raw.
struct PreloginFramed {
    inner: Box<dyn Stream>,
    framing: bool,
    /// Bytes of the current incoming packet's payload still to hand out.
    remaining: usize,
    header: [u8; 8],
    header_read: usize,
    pending: Vec<u8>,
    written: usize,
    /// Bytes read as a header that turned out to be the raw stream's.
    replay: Vec<u8>,
}

impl PreloginFramed {
    fn new(inner: Box<dyn Stream>) -> Self {
        Self {
            inner,
            framing: true,
            remaining: 0,
            header: [0; 8],
            header_read: 0,
            pending: Vec::new(),
            written: 0,
            replay: Vec::new(),
        }
    }
}

impl AsyncRead for PreloginFramed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..n]);
            this.replay.drain(..n);
            return Poll::Ready(Ok(()));
        }
        if !this.framing {
            return std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        while this.remaining == 0 {
            let mut header = tokio::io::ReadBuf::new(&mut this.header[this.header_read..]);
            match std::pin::Pin::new(&mut this.inner).poll_read(cx, &mut header) {
                Poll::Ready(Ok(())) => {
                    let n = header.filled().len();
                    if n == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    if this.header_read == 0 && this.header[0] != PRELOGIN {
                        // rustls reads on past the client's Finished, and the client already
                        // writes raw TLS records (content types 20..=23, never 0x12): the
                        // handshake is over, so these bytes are the stream's.
                        this.framing = false;
                        this.replay = this.header[..n].to_vec();
                        break;
                    }
                    this.header_read += n;
                    if this.header_read == 8 {
                        this.header_read = 0;
                        this.remaining = u16::from_be_bytes([this.header[2], this.header[3]]) as usize - 8;
                    }
                }
                other => return other,
            }
        }
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..n]);
            this.replay.drain(..n);
            return Poll::Ready(Ok(()));
        }
        let want = this.remaining.min(buf.remaining());
        let mut limited = tokio::io::ReadBuf::new(buf.initialize_unfilled_to(want));
        match std::pin::Pin::new(&mut this.inner).poll_read(cx, &mut limited) {
            Poll::Ready(Ok(())) => {
                let n = limited.filled().len();
                this.remaining -= n;
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for PreloginFramed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if !this.framing {
            return std::pin::Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.pending.extend_from_slice(data);
        std::task::Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        if this.framing && !this.pending.is_empty() {
            if this.written == 0 {
                this.pending = packet(PRELOGIN, true, 1, &this.pending).to_vec();
            }
            while this.written < this.pending.len() {
                match std::pin::Pin::new(&mut this.inner).poll_write(cx, &this.pending[this.written..]) {
                    Poll::Ready(Ok(n)) => this.written += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            this.pending.clear();
            this.written = 0;
        }
        std::pin::Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A certificate authority and a server certificate it signed for `localhost`, made with the
/// `openssl` command: `(ca.pem, cert.pem, key.pem)`.
pub fn localhost_certificate(
    dir: &std::path::Path,
) -> Result<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf), String> {
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .map_err(|e| e.to_string())?;
    let steps: [Vec<String>; 3] = [
        [
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=sluice test CA",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            "-keyout".into(),
            path("ca-key.pem"),
            "-out".into(),
            path("ca.pem"),
        ])
        .collect(),
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost"]
            .iter()
            .map(|s| s.to_string())
            .chain(["-keyout".into(), path("key.pem"), "-out".into(), path("leaf.csr")])
            .collect(),
        vec![
            "x509".into(),
            "-req".into(),
            "-days".into(),
            "2".into(),
            "-in".into(),
            path("leaf.csr"),
            "-CA".into(),
            path("ca.pem"),
            "-CAkey".into(),
            path("ca-key.pem"),
            "-CAcreateserial".into(),
            "-extfile".into(),
            path("leaf.ext"),
            "-out".into(),
            path("cert.pem"),
        ],
    ];
    for args in steps {
        let output = std::process::Command::new("openssl")
            .args(&args)
            .output()
            .map_err(|e| format!("running openssl: {e}"))?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
    }
    Ok((dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem")))
}
