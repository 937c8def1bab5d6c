//! A fast OpenAI-compatible mock server for the gateway benchmark (a double of a model server,
//! never used where a real model must answer): `GET /v1/models` and `POST /v1/chat/completions`
//! streaming a fixed answer of `tokens` SSE chunks at once, with `usage`, as llama.cpp's server
//! does. One thread per connection, `TCP_NODELAY`, a response per request, then close.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

pub struct MockOpenAi {
    pub port: u16,
}

impl MockOpenAi {
    /// Serves on a free loopback port until the process exits; each answer has `tokens` chunks.
    pub fn start(tokens: usize) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        std::thread::Builder::new()
            .name("mock-openai".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let _ = stream.set_nodelay(true);
                    std::thread::spawn(move || {
                        let _ = serve(stream, tokens);
                    });
                }
            })?;
        Ok(Self { port })
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn serve(stream: TcpStream, tokens: usize) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut length = 0usize;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length.min(8 << 20)];
    reader.read_exact(&mut body)?;
    if path.ends_with("/v1/models") {
        let json = r#"{"object":"list","data":[{"id":"mock","object":"model"}]}"#;
        write!(
            writer,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
            json.len()
        )?;
        return writer.flush();
    }
    let mut out = String::from(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
    );
    let id = "chatcmpl-mock";
    out.push_str(&format!(
        "data: {{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"finish_reason\":null}}]}}\n\n"
    ));
    writer.write_all(out.as_bytes())?;
    writer.flush()?;
    for i in 0..tokens {
        let finish = if i + 1 == tokens { "\"stop\"" } else { "null" };
        let chunk = format!(
            "data: {{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}},\"finish_reason\":{finish}}}]}}\n\n"
        );
        writer.write_all(chunk.as_bytes())?;
        writer.flush()?;
    }
    let usage = format!(
        "data: {{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{{\"prompt_tokens\":8,\"completion_tokens\":{tokens},\"total_tokens\":{}}}}}\n\ndata: [DONE]\n\n",
        tokens + 8
    );
    writer.write_all(usage.as_bytes())?;
    writer.flush()
}
