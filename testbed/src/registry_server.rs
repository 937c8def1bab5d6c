//! A real HTTP/1.1 server (std `TcpListener`, one thread per connection) serving a module
//! registry for the `http` resolver's tests: `GET /modules/<id>[?version=<v>]` answered from a
//! route table, with ETags, scripted failures and delays, and a log of what was asked. Plain HTTP,
//! or HTTPS (rustls) with the test certificate in `testbed/fixtures/tls` (issued for 127.0.0.1 by
//! the test CA `ca.pem` there, valid until 2126 — test material, never for production).

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the server answers one path (with its query).
#[derive(Debug, Clone)]
pub enum Route {
    /// 200 with this JSON body and ETag; 304 when the request's If-None-Match matches it.
    Json { body: String, etag: String },
    /// This status, no body.
    Status(u16),
    /// 200 with this body, `text/plain`.
    Raw(String),
    /// Waits, then 200 with the body.
    Slow(Duration, String),
    /// `failures` times 503, then 200 with the body.
    FailThen(usize, String),
    /// 200 with these bytes, `application/octet-stream` (an artifact).
    Bytes(Vec<u8>),
    /// 302 to this location.
    Redirect(String),
}

/// One request the server saw: the path with its query, and its If-None-Match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub target: String,
    pub if_none_match: Option<String>,
}

pub struct RegistryServer {
    pub base_url: String,
    hits: Arc<Mutex<Vec<Hit>>>,
    _server: HttpServer,
}

impl RegistryServer {
    pub fn start(routes: HashMap<String, Route>) -> std::io::Result<Self> {
        Self::start_with(routes, None)
    }

    /// The same over HTTPS, with the testbed's test certificate.
    pub fn start_tls(routes: HashMap<String, Route>) -> anyhow::Result<Self> {
        use rustls::pki_types::pem::PemObject as _;
        let dir = crate::guests::workspace_root().join("testbed/fixtures/tls");
        let chain = rustls::pki_types::CertificateDer::pem_file_iter(dir.join("server.pem"))?
            .collect::<Result<Vec<_>, _>>()?;
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join("server.key"))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        Ok(Self::start_with(routes, Some(Arc::new(config)))?)
    }

    /// The CA file that makes a client trust [`Self::start_tls`] servers.
    pub fn test_ca_file() -> std::path::PathBuf {
        crate::guests::workspace_root().join("testbed/fixtures/tls/ca.pem")
    }

    fn start_with(
        routes: HashMap<String, Route>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<Self> {
        let hits = Arc::new(Mutex::new(Vec::new()));
        let routes = Mutex::new(routes);
        let seen = hits.clone();
        let server = HttpServer::start(
            tls,
            Arc::new(move |request: Request| answer(request, &routes, &seen)),
        )?;
        Ok(Self {
            base_url: server.url.clone(),
            hits,
            _server: server,
        })
    }

    /// Every request so far, in order.
    pub fn hits(&self) -> Vec<Hit> {
        self.hits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// One HTTP/1.1 request, as the testbed's servers see it.
pub(crate) struct Request {
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The answer: status, extra header lines (each ending in CRLF), body.
pub(crate) struct Response {
    pub status: u16,
    pub headers: String,
    pub body: Vec<u8>,
}

pub(crate) type Handler = Arc<dyn Fn(Request) -> Response + Send + Sync>;

/// A server on 127.0.0.1 (plain or TLS): one accepting thread, one thread per connection, one
/// request per connection (`Connection: close`). Dropping it stops the accept loop.
pub(crate) struct HttpServer {
    pub url: String,
    stop: Arc<AtomicBool>,
}

impl HttpServer {
    pub fn start(
        tls: Option<Arc<rustls::ServerConfig>>,
        handler: Handler,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", listener.local_addr()?);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            // Blocking accept; dropping the server wakes it with a connection of its own.
            for stream in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (handler, tls) = (handler.clone(), tls.clone());
                std::thread::spawn(move || match tls {
                    None => {
                        let _ = serve(stream, &handler);
                    }
                    Some(config) => {
                        if let Ok(connection) = rustls::ServerConnection::new(config) {
                            let _ = serve(rustls::StreamOwned::new(connection, stream), &handler);
                        }
                    }
                });
            }
        });
        Ok(Self { url, stop })
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let address = self
            .url
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let _ = TcpStream::connect(address);
    }
}

/// Reads one request, writes the handler's response.
fn serve<S: std::io::Read + std::io::Write>(stream: S, handler: &Handler) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let target = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_owned();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length.min(1 << 20)];
    reader.read_exact(&mut body)?;
    let response = handler(Request {
        target,
        headers,
        body,
    });
    let reason = match response.status {
        200 => "OK",
        304 => "Not Modified",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let stream = reader.get_mut();
    write!(
        stream,
        "HTTP/1.1 {} {reason}\r\n{}Content-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        response.headers,
        response.body.len(),
    )?;
    stream.write_all(&response.body)?;
    stream.flush()
}

/// The registry's answer to one request, from the route table.
fn answer(
    request: Request,
    routes: &Mutex<HashMap<String, Route>>,
    hits: &Mutex<Vec<Hit>>,
) -> Response {
    let target = request.target.clone();
    let if_none_match = request.header("if-none-match").map(str::to_owned);
    hits.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(Hit {
            target: target.clone(),
            if_none_match: if_none_match.clone(),
        });
    let route = {
        let mut routes = routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let route = routes.get(&target).cloned();
        if let Some(Route::FailThen(n, body)) = &route
            && *n > 0
        {
            routes.insert(target.clone(), Route::FailThen(n - 1, body.clone()));
        }
        route
    };
    let (status, headers, body) = match route {
        None => (404, String::new(), String::new()),
        Some(Route::Status(code)) => (code, String::new(), String::new()),
        Some(Route::Redirect(location)) => {
            (302, format!("Location: {location}\r\n"), String::new())
        }
        Some(Route::Raw(body)) => (200, "Content-Type: text/plain\r\n".to_owned(), body),
        Some(Route::Bytes(bytes)) => {
            return Response {
                status: 200,
                headers: "Content-Type: application/octet-stream\r\n".to_owned(),
                body: bytes,
            };
        }
        Some(Route::Slow(delay, body)) => {
            std::thread::sleep(delay);
            (200, "Content-Type: application/json\r\n".to_owned(), body)
        }
        Some(Route::FailThen(n, body)) => {
            if n > 0 {
                (503, String::new(), String::new())
            } else {
                (200, "Content-Type: application/json\r\n".to_owned(), body)
            }
        }
        Some(Route::Json { body, etag }) => {
            if if_none_match.as_deref() == Some(etag.as_str()) {
                (304, format!("ETag: {etag}\r\n"), String::new())
            } else {
                (
                    200,
                    format!("Content-Type: application/json\r\nETag: {etag}\r\n"),
                    body,
                )
            }
        }
    };
    Response {
        status,
        headers,
        body: body.into_bytes(),
    }
}
