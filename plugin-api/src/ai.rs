//! The JSON a model-serving backend speaks with the host: the request it is handed as its
//! workload ([`AiRequest`]) and the pieces of the response it streams back through
//! [`crate::EventSink::chunk`] ([`Chunk`]). The gateway writes the first and reads the second;
//! backends map them to and from their server's API (OpenAI's, Ollama's, espeak-ng…). Plain
//! serde types: they cross the boundary as bytes, so they can grow without an ABI change.

use serde::{Deserialize, Serialize};

/// What a model serves.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Service {
    #[default]
    Chat,
    Embeddings,
    Speech,
    Scrape,
}

impl Service {
    pub const ALL: [Self; 4] = [Self::Chat, Self::Embeddings, Self::Speech, Self::Scrape];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Embeddings => "embeddings",
            Self::Speech => "speech",
            Self::Scrape => "scrape",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// What its units are, for prices and bills.
    pub fn units(self) -> (&'static str, &'static str) {
        match self {
            Self::Chat => ("input tokens", "output tokens"),
            Self::Embeddings => ("input tokens", "output units"),
            Self::Speech => ("characters", "output units"),
            Self::Scrape => ("requests", "pages"),
        }
    }
}

/// Whether `name` may name a model: 1–64 characters of `[a-z0-9._:-]`, starting with a letter
/// or digit (names go into listings and logs, never into subjects).
pub fn is_model_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b':' | b'-')
        })
}

/// One chat message, as the gateway validated it (text content only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// `system`, `user`, `assistant` or `developer` (sent on as `system`).
    pub role: String,
    pub content: String,
}

/// A validated request, handed to a backend as its workload (JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AiRequest {
    pub service: Service,
    /// The network's model name (the backend maps it to its server's own).
    pub model: String,
    /// Chat: the conversation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<Message>,
    /// Embeddings: the texts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub input: Vec<String>,
    /// Chat: most tokens to generate (always set: the hold was made for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Chat: answer with a JSON object (`response_format: {"type": "json_object"}`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub json: bool,
    /// Embeddings: output dimensions, where the model allows fewer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u32>,
    /// Speech: the voice (OpenAI's names — alloy, echo, … — or the backend's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voice: Option<String>,
    /// Speech: 0.25–4.0, 1 is normal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed: Option<f64>,
    /// Speech: `wav` or `pcm` (16-bit little-endian mono at the backend's rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

/// One piece of a response, in order. A chat answer is many content chunks and a last one with
/// `finish_reason`; embeddings come as one chunk of vectors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    /// Generated text since the previous chunk.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub content: String,
    /// `stop` or `length`, on the last chunk of a chat answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// Embedding vectors, one per input, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub embeddings: Vec<Vec<f32>>,
    /// Speech: the next piece of the audio file, base64.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub audio_b64: String,
}

/// Sends `chunk` to the host (JSON through [`crate::EventSink::chunk`]).
pub fn send_chunk(sink: &crate::EventSinkBox, chunk: &Chunk) {
    if let Ok(bytes) = serde_json::to_vec(chunk) {
        sink.chunk(bytes.as_slice().into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_are_checked() {
        assert!(is_model_name("smollm2-135m"));
        assert!(is_model_name("llama3.2:1b"));
        for bad in ["", "Big", "-x", "a b", "a/b", &"x".repeat(65)] {
            assert!(!is_model_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn services_round_trip() {
        for s in Service::ALL {
            assert_eq!(Service::parse(s.as_str()), Some(s));
        }
        assert_eq!(Service::parse("images"), None);
    }
}
