//! The real AI serving parts the gateway tests use: llama.cpp's own HTTP server with a real
//! small model (PyPI xllamacpp and SmolLM2-135M-Instruct, installed by `testbed/ai/setup.sh`),
//! and the official OpenAI Python SDK from the same venv.

use anyhow::Context as _;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// The repository root (this crate is `testbed/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}

/// The Python of the AI venv (`RHIZOS_AI_PYTHON`, else `.rhizos/tools/ai/venv/bin/python`).
pub fn python() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("RHIZOS_AI_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".rhizos/tools/ai/venv/bin/python"));
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: install the AI test parts with `source testbed/ai/setup.sh` (testbed/run-tests.sh does)",
        path.display()
    );
    Ok(path)
}

/// The chat model (`RHIZOS_CHAT_MODEL`, else the one `testbed/ai/setup.sh` fetches).
pub fn chat_model() -> anyhow::Result<PathBuf> {
    model_file("RHIZOS_CHAT_MODEL", "SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The sentence-embedding model, all-MiniLM-L6-v2 as GGUF (`RHIZOS_EMBED_MODEL`, else the one
/// `testbed/ai/setup.sh` converts).
pub fn embed_model() -> anyhow::Result<PathBuf> {
    model_file("RHIZOS_EMBED_MODEL", "all-MiniLM-L6-v2.F16.gguf")
}

/// A model file named by `variable`, else `file` where `testbed/ai/setup.sh` puts models.
fn model_file(variable: &str, file: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os(variable)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".rhizos/tools/ai/models").join(file));
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: `source testbed/ai/setup.sh` installs it",
        path.display()
    );
    Ok(path)
}

/// A free TCP port on loopback (bound and released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// llama.cpp's server on a model, killed on drop.
pub struct LlamaServer {
    child: Child,
    pub port: u16,
}

impl LlamaServer {
    /// Starts `testbed/ai/serve.py` on `model` and waits until it answers.
    pub fn start(model: &std::path::Path, alias: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let port = free_port()?;
        let mut child = Command::new(python()?)
            .arg(repo_root().join("testbed/ai/serve.py"))
            .arg(model)
            .arg(port.to_string())
            .arg(alias)
            .arg("--watch-stdin")
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting testbed/ai/serve.py")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if !line.starts_with("ready") {
            let _ = child.kill();
            anyhow::bail!("the llama.cpp server did not start (said {line:?})");
        }
        Ok(Self { child, port })
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills it now (a node's model server dying).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The Ollama API double (`testbed/ai/ollama_double.py`) in front of a llama.cpp server; killed
/// on drop. Models in `present` are there from the start; others appear when pulled.
pub struct OllamaDouble {
    child: Child,
    pub port: u16,
}

impl OllamaDouble {
    pub fn start(chat: &LlamaServer, present: &[&str]) -> anyhow::Result<Self> {
        let port = free_port()?;
        let mut command = Command::new(python()?);
        command
            .arg(repo_root().join("testbed/ai/ollama_double.py"))
            .arg(port.to_string())
            .arg(chat.base_url());
        if !present.is_empty() {
            command.arg("--present").args(present);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting testbed/ai/ollama_double.py")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if !line.starts_with("ready") {
            let _ = child.kill();
            anyhow::bail!("the Ollama double did not start (said {line:?})");
        }
        Ok(Self { child, port })
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for OllamaDouble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
