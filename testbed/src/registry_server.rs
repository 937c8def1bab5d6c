//! A real HTTP/1.1 server (std `TcpListener`, one thread per connection) serving a module
//! registry for the `http` resolver's tests: `GET /modules/<id>[?version=<v>]` answered from a
//! route table, with ETags, scripted failures and delays, and a log of what was asked.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write as _};
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
    stop: Arc<AtomicBool>,
}

impl RegistryServer {
    pub fn start(routes: HashMap<String, Route>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let base_url = format!("http://{}", listener.local_addr()?);
        let hits = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let routes = Arc::new(Mutex::new(routes));
        let (seen, stopped) = (hits.clone(), stop.clone());
        std::thread::spawn(move || {
            // Blocking accept; dropping the server wakes it with a connection of its own.
            for stream in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (routes, seen) = (routes.clone(), seen.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &routes, &seen);
                });
            }
        });
        Ok(Self {
            base_url,
            hits,
            stop,
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

impl Drop for RegistryServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.base_url.trim_start_matches("http://"));
    }
}

fn serve(
    stream: TcpStream,
    routes: &Mutex<HashMap<String, Route>>,
    hits: &Mutex<Vec<Hit>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let target = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_owned();
    let mut if_none_match = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("if-none-match")
        {
            if_none_match = Some(value.trim().to_owned());
        }
    }
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
    let mut stream = stream;
    let (status, headers, body) = match route {
        None => (404, String::new(), String::new()),
        Some(Route::Status(code)) => (code, String::new(), String::new()),
        Some(Route::Raw(body)) => (200, "Content-Type: text/plain\r\n".to_owned(), body),
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
    let reason = match status {
        200 => "OK",
        304 => "Not Modified",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Status",
    };
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}
