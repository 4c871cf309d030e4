//! SSH tunnels to databases that are only reachable through a bastion host.
//!
//! ```yaml
//! sources:
//!   app_db:
//!     type: postgres
//!     host: db.internal          # as the bastion sees it
//!     ssh_tunnel:
//!       host: bastion.example.com
//!       port: 22
//!       user: sluice
//!       # host_key: "ssh-ed25519 AAAA..."   # pin the bastion's key; default: trust on first use
//! ```
//!
//! `sluice ssh-key generate SOURCE` makes an Ed25519 key pair: the private key goes to
//! `<state_dir>/ssh/SOURCE.key.new` (mode 0600) and the public key is printed for the bastion's
//! `authorized_keys`. A new key is *pending*: connections try it first and fall back to the
//! current key, and the first time it authenticates it replaces the current key. So rotating a
//! key never breaks a running schedule, and a key that was never installed is never relied on.
//!
//! Each database connection gets its own forwarder: a listener on 127.0.0.1 that accepts one
//! connection and relays it through a `direct-tcpip` channel to the database host.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client;
use russh::keys::ssh_key::{LineEnding, PublicKey};
use russh::keys::{Algorithm, PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use schemars::JsonSchema;
use serde::Deserialize;
use sluice_engine::ConfigString;
use sluice_engine::source::ConnectorEnv;
use tokio::net::TcpListener;

/// Shown with tunnel failures.
pub const HINT: &str = "check `ssh_tunnel` (host, port, user) and that the public key printed by `sluice ssh-key generate <source>` is in the bastion's authorized_keys";

const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SshTunnelConfig {
    /// Bastion (SSH jump host) name or IP.
    pub host: ConfigString,
    /// Bastion's SSH port (default 22).
    #[serde(default = "default_ssh_port")]
    pub port: u16,
    /// SSH user on the bastion; its authorized_keys must hold the key from `sluice ssh-key generate`.
    pub user: ConfigString,
    /// The bastion's public key (`ssh-ed25519 AAAA...`). Without it the first key seen is
    /// remembered in `<state_dir>/ssh/known_hosts` and every later connection must match it.
    #[serde(default)]
    pub host_key: Option<String>,
}

fn default_ssh_port() -> u16 {
    22
}

/// Where a source's key files live.
#[derive(Debug, Clone)]
pub struct KeyFiles {
    pub current: PathBuf,
    pub pending: PathBuf,
    pub known_hosts: PathBuf,
}

impl KeyFiles {
    pub fn for_source(state_dir: &Path, source: &str) -> Self {
        let dir = state_dir.join("ssh");
        Self {
            current: dir.join(format!("{source}.key")),
            pending: dir.join(format!("{source}.key.new")),
            known_hosts: dir.join("known_hosts"),
        }
    }
}

/// Generates a pending key pair for `source` and returns the public key line to install.
/// Generating again replaces a pending key that was never used.
pub fn generate_key(state_dir: &Path, source: &str) -> Result<String, String> {
    let files = KeyFiles::for_source(state_dir, source);
    let dir = files.pending.parent().unwrap_or(state_dir);
    create_private_dir(dir)?;
    let mut key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
        .map_err(|e| format!("generating a key: {e}"))?;
    key.set_comment(format!("sluice-{source}"));
    let private = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| format!("encoding the key: {e}"))?;
    write_private_file(&files.pending, private.as_bytes())?;
    key.public_key()
        .to_openssh()
        .map_err(|e| format!("encoding the public key: {e}"))
}

fn create_private_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("restricting {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Writes a file only its owner can read, replacing it atomically.
fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let temp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(&temp)
        .map_err(|e| format!("writing {}: {e}", temp.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("writing {}: {e}", temp.display()))?;
    std::fs::rename(&temp, path).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// A configured tunnel: the bastion, and the database host and port behind it.
#[derive(Debug, Clone)]
pub struct SshTunnel {
    source: String,
    bastion_host: String,
    bastion_port: u16,
    user: String,
    pinned: Option<PublicKey>,
    target_host: String,
    target_port: u16,
    files: KeyFiles,
}

impl SshTunnel {
    pub fn new(
        source: &str,
        config: SshTunnelConfig,
        target_host: String,
        target_port: u16,
        env: &ConnectorEnv,
    ) -> Result<Self, String> {
        let pinned = match &config.host_key {
            Some(line) => Some(
                PublicKey::from_openssh(line.trim())
                    .map_err(|e| format!("`ssh_tunnel.host_key` is not an OpenSSH public key: {e}"))?,
            ),
            None => None,
        };
        Ok(Self {
            source: source.to_string(),
            bastion_host: config.host.expose().to_string(),
            bastion_port: config.port,
            user: config.user.expose().to_string(),
            pinned,
            target_host,
            target_port,
            files: KeyFiles::for_source(&env.state_dir, source),
        })
    }

    pub fn key_files(&self) -> &KeyFiles {
        &self.files
    }

    /// Connects to the bastion and returns the local address of a one-connection forwarder to
    /// the database.
    pub async fn open(&self) -> Result<SocketAddr, String> {
        let session = self.authenticate().await?;
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| format!("opening the tunnel's local end: {e}"))?;
        let local = listener
            .local_addr()
            .map_err(|e| format!("opening the tunnel's local end: {e}"))?;
        let target_host = self.target_host.clone();
        let target_port = self.target_port;
        let source = self.source.clone();
        tokio::spawn(async move {
            let accepted = tokio::time::timeout(ACCEPT_TIMEOUT, listener.accept()).await;
            let (mut socket, peer) = match accepted {
                Ok(Ok(accepted)) => accepted,
                Ok(Err(e)) => {
                    tracing::warn!(source, error = %e, "ssh tunnel: accepting the local connection failed");
                    return;
                }
                Err(_) => return,
            };
            drop(listener);
            let channel = match session
                .channel_open_direct_tcpip(
                    target_host.clone(),
                    u32::from(target_port),
                    peer.ip().to_string(),
                    u32::from(peer.port()),
                )
                .await
            {
                Ok(channel) => channel,
                Err(e) => {
                    tracing::warn!(source, error = %e, target_host, target_port, "ssh tunnel: the bastion refused to forward");
                    return;
                }
            };
            let mut stream = channel.into_stream();
            if let Err(e) = tokio::io::copy_bidirectional(&mut socket, &mut stream).await {
                tracing::debug!(source, error = %e, "ssh tunnel closed");
            }
            session
                .disconnect(russh::Disconnect::ByApplication, "", "en")
                .await
                .ok();
        });
        Ok(local)
    }

    /// Authenticates with the pending key if there is one (promoting it on success), else with
    /// the current key.
    async fn authenticate(&self) -> Result<client::Handle<HostKeyCheck>, String> {
        let mut candidates = Vec::new();
        if self.files.pending.exists() {
            candidates.push((self.files.pending.clone(), true));
        }
        if self.files.current.exists() {
            candidates.push((self.files.current.clone(), false));
        }
        if candidates.is_empty() {
            return Err(format!(
                "source `{}` has no SSH key: run `sluice ssh-key generate {}` and add the public key it prints to the bastion's authorized_keys",
                self.source, self.source
            ));
        }
        let mut failures = Vec::new();
        for (path, pending) in candidates {
            let key = russh::keys::load_secret_key(&path, None)
                .map_err(|e| format!("reading SSH key {}: {e}", path.display()))?;
            let (mut session, rejection) = self.connect().await?;
            let hash = session
                .best_supported_rsa_hash()
                .await
                .map_err(|e| format!("SSH to {}: {e}", self.bastion()))?
                .flatten();
            let result = session
                .authenticate_publickey(self.user.clone(), PrivateKeyWithHashAlg::new(Arc::new(key), hash))
                .await;
            match result {
                Ok(auth) if auth.success() => {
                    if pending {
                        std::fs::rename(&self.files.pending, &self.files.current)
                            .map_err(|e| format!("promoting the new SSH key: {e}"))?;
                        tracing::info!(
                            source = self.source,
                            "the new SSH key works and is now the current key"
                        );
                    }
                    drop(rejection);
                    return Ok(session);
                }
                Ok(_) => failures.push(format!(
                    "the bastion rejected the {} key for user `{}`",
                    if pending { "new (pending)" } else { "current" },
                    self.user
                )),
                Err(e) => failures.push(format!("authentication failed: {e}")),
            }
        }
        Err(format!("SSH to {}: {}", self.bastion(), failures.join("; ")))
    }

    async fn connect(&self) -> Result<(client::Handle<HostKeyCheck>, Arc<Mutex<Option<String>>>), String> {
        let rejection = Arc::new(Mutex::new(None));
        let handler = HostKeyCheck {
            bastion: format!("[{}]:{}", self.bastion_host, self.bastion_port),
            pinned: self.pinned.clone(),
            known_hosts: self.files.known_hosts.clone(),
            rejection: rejection.clone(),
        };
        let config = Arc::new(client::Config {
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(30)),
            nodelay: true,
            ..Default::default()
        });
        let connecting = client::connect(config, (self.bastion_host.as_str(), self.bastion_port), handler);
        match tokio::time::timeout(Duration::from_secs(15), connecting).await {
            Ok(Ok(session)) => Ok((session, rejection)),
            Ok(Err(e)) => {
                let rejected = rejection.lock().ok().and_then(|r| r.clone());
                Err(rejected.unwrap_or_else(|| format!("SSH to {}: {e}", self.bastion())))
            }
            Err(_) => Err(format!(
                "SSH to {} timed out: the bastion may be unreachable or firewalled",
                self.bastion()
            )),
        }
    }

    fn bastion(&self) -> String {
        format!("{}:{}", self.bastion_host, self.bastion_port)
    }
}

/// Verifies the bastion's host key: the pinned key, or the one remembered on first use.
struct HostKeyCheck {
    bastion: String,
    pinned: Option<PublicKey>,
    known_hosts: PathBuf,
    rejection: Arc<Mutex<Option<String>>>,
}

impl HostKeyCheck {
    fn reject(&self, message: String) -> Result<bool, russh::Error> {
        if let Ok(mut slot) = self.rejection.lock() {
            *slot = Some(message);
        }
        Ok(false)
    }
}

impl client::Handler for HostKeyCheck {
    type Error = russh::Error;

    async fn check_server_key(&mut self, offered: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let server_key: PublicKey = match offered {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            PublicKeyOrCertificate::Certificate(certificate) => {
                PublicKey::from(certificate.public_key().clone())
            }
        };
        let server_key = &server_key;
        let offered_line = server_key
            .to_openssh()
            .map_err(|e| russh::Error::from(russh::keys::Error::from(e)))?;
        let fingerprint = server_key.fingerprint(Default::default());
        if let Some(pinned) = &self.pinned {
            if pinned.key_data() == server_key.key_data() {
                return Ok(true);
            }
            return self.reject(format!(
                "the bastion {} presented host key {fingerprint}, not the one pinned in `ssh_tunnel.host_key`",
                self.bastion
            ));
        }
        let known = std::fs::read_to_string(&self.known_hosts).unwrap_or_default();
        for line in known.lines() {
            let Some((host, key)) = line.split_once(' ') else {
                continue;
            };
            if host != self.bastion {
                continue;
            }
            let matches = PublicKey::from_openssh(key).is_ok_and(|k| k.key_data() == server_key.key_data());
            if matches {
                return Ok(true);
            }
            return self.reject(format!(
                "the bastion {} presented host key {fingerprint}, which differs from the one remembered in {}; if the bastion's key really changed, remove its line there",
                self.bastion,
                self.known_hosts.display()
            ));
        }
        // First contact: remember the key.
        if let Some(dir) = self.known_hosts.parent() {
            create_private_dir(dir).map_err(|e| russh::Error::IO(std::io::Error::other(e)))?;
        }
        let mut contents = known;
        if !contents.is_empty() && !contents.ends_with('\n') {
            contents.push('\n');
        }
        contents.push_str(&format!("{} {}\n", self.bastion, offered_line));
        write_private_file(&self.known_hosts, contents.as_bytes())
            .map_err(|e| russh::Error::IO(std::io::Error::other(e)))?;
        tracing::info!(bastion = self.bastion, %fingerprint, "remembered the bastion's host key");
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_private_and_pending() {
        let dir = tempfile::tempdir().unwrap();
        let public = generate_key(dir.path(), "app_db").unwrap();
        assert!(public.starts_with("ssh-ed25519 "), "{public}");
        assert!(public.ends_with("sluice-app_db"), "{public}");
        let files = KeyFiles::for_source(dir.path(), "app_db");
        assert!(files.pending.exists());
        assert!(!files.current.exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&files.pending).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Generating again replaces the pending key.
        let again = generate_key(dir.path(), "app_db").unwrap();
        assert_ne!(public, again);
        russh::keys::load_secret_key(&files.pending, None).unwrap();
    }
}
