//! The `tts` backend: text to speech with espeak-ng on the node, served as the `speech` service
//! and billed per character of input.
//!
//! Config (`[agent.plugins.tts]`, all optional):
//!
//! ```toml
//! program = "espeak-ng"          # the binary (default: espeak-ng on PATH)
//! model = "espeak"               # the network's model name
//! max_chars = 4096               # longest input (OpenAI's limit)
//! [agent.plugins.tts.voices]     # OpenAI's voice names → espeak-ng voices (these are the defaults)
//! alloy = "en-us"
//! echo = "en-gb"
//! ```
//!
//! A voice is one of the mapped names or any espeak-ng voice (`en-us`, `fr`, `de`…, checked
//! against `[a-z0-9-+]`). The text goes to espeak-ng on its stdin (never as an argument), the
//! audio is written to a private temporary file (so the WAV header carries real sizes) and
//! streamed back in chunks: `wav` as written (16-bit mono, 22,050 Hz), `pcm` its samples alone.
//! Without the binary the plugin loads and says how to install it.

use base64::Engine as _;
use rhizos_plugin_api::ai::{AiRequest, Chunk, Service, send_chunk};
use rhizos_plugin_api::sdk::{PluginBackend, ThreadExecution};
use rhizos_plugin_api::{EventSinkBox, ExecOutcome, ExecRequest, ExitKind, ModelInfo};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub program: String,
    pub model: String,
    pub max_chars: usize,
    pub voices: BTreeMap<String, String>,
}

impl Default for Config {
    fn default() -> Self {
        let voices = [
            ("alloy", "en-us"),
            ("ash", "en-us+m3"),
            ("ballad", "en-gb+m2"),
            ("coral", "en-us+f2"),
            ("echo", "en-gb"),
            ("fable", "en-gb-scotland"),
            ("nova", "en-us+f3"),
            ("onyx", "en-us+m7"),
            ("sage", "en-us+f4"),
            ("shimmer", "en-us+f5"),
            ("verse", "en-us+m2"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect();
        Self {
            program: "espeak-ng".into(),
            model: "espeak".into(),
            max_chars: 4096,
            voices,
        }
    }
}

/// Audio bytes per chunk (base64 in JSON: ~350 KB a message, well under the bus's limit).
const AUDIO_CHUNK_BYTES: usize = 256 * 1024;
/// espeak-ng's words per minute at speed 1.
const BASE_WPM: f64 = 175.0;

pub struct TtsBackend {
    config: Arc<Config>,
    /// Why nothing is offered (no binary), if so.
    missing: Option<String>,
}

impl TtsBackend {
    pub fn new(config: &str) -> Result<Self, String> {
        let config: Config =
            serde_json::from_str(config).map_err(|e| format!("tts backend: bad config ({e})"))?;
        if !rhizos_plugin_api::ai::is_model_name(&config.model) {
            return Err(format!(
                "tts backend: model name {:?} is not 1-64 of [a-z0-9._:-]",
                config.model
            ));
        }
        for voice in config.voices.values() {
            if !is_voice(voice) {
                return Err(format!(
                    "tts backend: voice {voice:?} is not an espeak-ng voice name"
                ));
            }
        }
        let missing = match Command::new(&config.program)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Ok(status) if status.success() => None,
            Ok(status) => Some(format!("{} --version failed ({status})", config.program)),
            Err(e) => Some(format!(
                "{} not found ({e}): install it (apt-get install espeak-ng) or set [agent.plugins.tts] program",
                config.program
            )),
        };
        Ok(Self {
            config: Arc::new(config),
            missing,
        })
    }
}

/// An espeak-ng voice name: `[a-z0-9-]` with an optional `+variant`.
fn is_voice(voice: &str) -> bool {
    (1..=48).contains(&voice.len())
        && !voice.starts_with('-')
        && voice
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'+'))
}

/// The samples of a WAV file: the `data` chunk's bytes (found by walking the chunks).
pub fn pcm_of(wav: &[u8]) -> Option<&[u8]> {
    if wav.len() < 12 || &wav[0..4] != b"RIFF" || &wav[8..12] != b"WAVE" {
        return None;
    }
    let mut at = 12;
    while at + 8 <= wav.len() {
        let id = &wav[at..at + 4];
        let size = u32::from_le_bytes(wav[at + 4..at + 8].try_into().ok()?) as usize;
        let body = at + 8;
        if id == b"data" {
            return wav.get(body..body + size.min(wav.len() - body));
        }
        at = body + size + (size & 1);
    }
    None
}

impl PluginBackend for TtsBackend {
    type Execution = ThreadExecution;

    fn start(&self, request: ExecRequest, sink: EventSinkBox) -> Result<ThreadExecution, String> {
        if let Some(missing) = &self.missing {
            return Err(missing.clone());
        }
        let ai: AiRequest = serde_json::from_slice(&request.workload)
            .map_err(|e| format!("not an AI request: {e}"))?;
        if ai.service != Service::Speech || ai.model != self.config.model {
            return Err(format!(
                "this node's tts backend serves {} for speech only",
                self.config.model
            ));
        }
        let config = self.config.clone();
        let deadline = Duration::from_millis(request.limits.wall_timeout_ms);
        ThreadExecution::spawn(format!("tts-{}", request.execution_id), move |cancelled| {
            let started = Instant::now();
            let outcome = speak(&config, &ai, &sink, cancelled, deadline);
            let elapsed = started.elapsed().as_millis() as u64;
            match outcome {
                Ok(chars) => ExecOutcome::exited(0, elapsed).with_usage(chars, 0),
                Err((kind, message)) => ExecOutcome::abnormal(kind, message, elapsed),
            }
        })
    }

    fn unavailable(&self) -> Option<String> {
        self.missing.clone()
    }

    fn models(&self) -> Vec<ModelInfo> {
        if self.missing.is_some() {
            return Vec::new();
        }
        vec![ModelInfo {
            service: Service::Speech.as_str().into(),
            name: self.config.model.as_str().into(),
            context_length: self.config.max_chars as u32,
            warm: true,
        }]
    }
}

/// Runs espeak-ng on the request's text; the characters spoken, or why not.
fn speak(
    config: &Config,
    ai: &AiRequest,
    sink: &EventSinkBox,
    cancelled: &AtomicBool,
    deadline: Duration,
) -> Result<u64, (ExitKind, String)> {
    let refused = |m: String| (ExitKind::Rejected, m);
    let text = ai.input.first().map(String::as_str).unwrap_or_default();
    let chars = text.chars().count();
    if chars == 0 || chars > config.max_chars {
        return Err(refused(format!(
            "the input must be 1 to {} characters, got {chars}",
            config.max_chars
        )));
    }
    let voice = match ai.voice.as_deref() {
        None => "en-us".to_owned(),
        Some(name) => match config.voices.get(name) {
            Some(mapped) => mapped.clone(),
            None if is_voice(name) => name.to_owned(),
            None => {
                return Err(refused(format!(
                    "voice {name:?} is not one this node knows"
                )));
            }
        },
    };
    let speed = ai.speed.unwrap_or(1.0);
    if !(0.25..=4.0).contains(&speed) {
        return Err(refused(format!("speed {speed} is not within 0.25 and 4.0")));
    }
    let pcm = match ai.format.as_deref().unwrap_or("wav") {
        "wav" => false,
        "pcm" => true,
        other => {
            return Err(refused(format!(
                "response format {other:?}: this node makes wav and pcm"
            )));
        }
    };
    let out = tempfile::Builder::new()
        .prefix("rhizos-tts-")
        .suffix(".wav")
        .tempfile()
        .map_err(|e| {
            (
                ExitKind::BackendFailed,
                format!("no temporary file for the audio: {e}"),
            )
        })?;
    let failed = |m: String| (ExitKind::BackendFailed, m);
    let mut child = Command::new(&config.program)
        .args([
            "-v",
            &voice,
            "-s",
            &format!("{}", (BASE_WPM * speed).round() as u32),
            "-w",
        ])
        .arg(out.path())
        .arg("--stdin")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("cannot run {}: {e}", config.program)))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| failed(format!("cannot hand the text to espeak-ng: {e}")))?;
    }
    let started = Instant::now();
    let status = loop {
        if cancelled.load(Ordering::Relaxed) {
            let _ = child.kill();
            let _ = child.wait();
            return Err((ExitKind::Cancelled, "cancelled".into()));
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err((
                ExitKind::TimedOut,
                "espeak-ng took longer than the request's deadline".into(),
            ));
        }
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(failed(format!("waiting for espeak-ng: {e}"))),
        }
    };
    if !status.success() {
        let mut stderr = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
        }
        return Err(refused(format!(
            "espeak-ng failed ({status}): {}",
            stderr.trim()
        )));
    }
    let wav = std::fs::read(out.path()).map_err(|e| failed(format!("reading the audio: {e}")))?;
    let audio = if pcm {
        pcm_of(&wav).ok_or_else(|| failed("espeak-ng wrote no WAV data chunk".into()))?
    } else {
        &wav[..]
    };
    for piece in audio.chunks(AUDIO_CHUNK_BYTES) {
        let chunk = Chunk {
            audio_b64: base64::engine::general_purpose::STANDARD.encode(piece),
            ..Chunk::default()
        };
        send_chunk(sink, &chunk);
    }
    Ok(chars as u64)
}

rhizos_plugin_api::export_backend_plugin! {
    name: "tts",
    backends: ["tts"],
    new: TtsBackend::new,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voices_and_configs_are_checked() {
        assert!(is_voice("en-us") && is_voice("en-us+f3"));
        for bad in ["", "-v", "en us", "EN", "a/b", "x;rm"] {
            assert!(!is_voice(bad), "{bad:?}");
        }
        assert!(TtsBackend::new(r#"{"voices": {"alloy": "--evil"}}"#).is_err());
        assert!(TtsBackend::new(r#"{"model": "Big"}"#).is_err());
        let missing = TtsBackend::new(r#"{"program": "/nonexistent/espeak"}"#).unwrap();
        assert!(
            missing
                .unavailable()
                .unwrap()
                .contains("apt-get install espeak-ng")
        );
        assert!(missing.models().is_empty());
    }

    #[test]
    fn the_samples_of_a_wav_are_found_past_any_chunk() {
        let mut wav = b"RIFF\0\0\0\0WAVE".to_vec();
        wav.extend_from_slice(b"LIST\x03\0\0\0abc\0");
        wav.extend_from_slice(b"data\x04\0\0\0\x01\x02\x03\x04");
        assert_eq!(pcm_of(&wav), Some(&[1u8, 2, 3, 4][..]));
        assert_eq!(pcm_of(b"not a wav"), None);
    }
}
