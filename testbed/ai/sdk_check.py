"""Drives a RhizOS gateway with the official OpenAI Python SDK, as any client would, and prints
one JSON object of what it saw for the Rust test to check against the ledger.

Usage: sdk_check.py BASE_URL KEY MODEL EMBED_MODEL QUOTA_KEY RATE_KEY TPM_KEY
  KEY          a key with credit
  EMBED_MODEL  a sentence-embedding model the network serves
  QUOTA_KEY    a key whose credit limit cannot cover one request (insufficient_quota, no retry)
  RATE_KEY     a key with rpm = 2 (the third request in a minute is refused)
  TPM_KEY      a key with tpm = 20 (one chat uses more: the next in that minute is refused)
"""
import json
import sys

import openai

base, key, model, embed_model, quota_key, rate_key, tpm_key = sys.argv[1:8]
out = {}
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=60)

# Models: what live nodes serve, with prices.
listed = client.models.list()
out["models"] = [m.id for m in listed.data]
out["model"] = client.models.retrieve(model).id

# Chat, whole.
chat = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Which city is the capital of France?"}],
    max_tokens=24,
    temperature=0,
    seed=1,
)
out["chat"] = {
    "id": chat.id,
    "content": chat.choices[0].message.content,
    "finish_reason": chat.choices[0].finish_reason,
    "usage": chat.usage.model_dump(),
}

# Chat, streamed with usage.
chunks = []
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Name three colours."}],
    max_tokens=16,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    chunks.append(chunk)
ids = {c.id for c in chunks}
usage_chunks = [c for c in chunks if c.usage is not None]
out["stream"] = {
    "id": chunks[0].id,
    "same_id": len(ids) == 1,
    "first_role": chunks[0].choices[0].delta.role,
    "content": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
    "content_chunks": sum(1 for c in chunks if c.choices and c.choices[0].delta.content),
    "finish_reason": [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason],
    "usage": usage_chunks[-1].usage.model_dump() if usage_chunks else None,
    "usage_chunk_has_no_choices": bool(usage_chunks) and usage_chunks[-1].choices == [],
}

# Embeddings: float, base64 (the SDK asks for base64 by default and decodes it), dimensions.
texts = ["The capital of France is Paris.", "Bananas are yellow.", "Paris is the capital city of France."]
as_float = client.embeddings.create(model=embed_model, input=texts, encoding_format="float")
as_b64 = client.embeddings.create(model=embed_model, input=texts)
cut = client.embeddings.create(model=embed_model, input=texts[0], dimensions=64, encoding_format="float")


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)


vectors = [d.embedding for d in as_float.data]
out["embeddings"] = {
    # A real sentence model: the paraphrase is near, the unrelated sentence far.
    "paraphrase_cosine": cosine(vectors[0], vectors[2]),
    "unrelated_cosine": cosine(vectors[0], vectors[1]),
    "id": getattr(as_float, "id", None),
    "count": len(as_float.data),
    "dims": len(as_float.data[0].embedding),
    "base64_matches_float": all(
        max(abs(a - b) for a, b in zip(f.embedding, g.embedding)) < 1e-6
        for f, g in zip(as_float.data, as_b64.data)),
    "dimensions_64": len(cut.data[0].embedding),
    "prompt_tokens": as_float.usage.prompt_tokens,
}

# Speech: a real WAV from espeak-ng on the node.
raw = client.audio.speech.with_raw_response.create(
    model="espeak", voice="alloy", input="Hello from the RhizOS network.", response_format="wav")
audio = raw.content
import io
import struct
import wave
with wave.open(io.BytesIO(audio)) as w:
    frames = w.readframes(w.getnframes())
    samples = struct.unpack("<%dh" % (len(frames) // 2), frames)
    out["speech"] = {
        "id": raw.headers.get("x-request-id"),
        "content_type": raw.headers.get("content-type"),
        "riff": audio[:4] == b"RIFF" and audio[8:12] == b"WAVE",
        "rate": w.getframerate(),
        "channels": w.getnchannels(),
        "seconds": w.getnframes() / w.getframerate(),
        "rms": (sum(x * x for x in samples) / max(1, len(samples))) ** 0.5,
        "chars": len("Hello from the RhizOS network."),
    }
pcm = client.audio.speech.create(model="espeak", voice="echo", input="Hi.", response_format="pcm").read()
out["speech"]["pcm_bytes"] = len(pcm)
out["speech"]["pcm_is_headerless"] = pcm[:4] != b"RIFF"


def error_of(call):
    try:
        call()
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        return {"status": e.status_code, "code": body.get("code"), "type": body.get("type"),
                "param": body.get("param"), "message": body.get("message"),
                "retry_after": e.response.headers.get("retry-after"),
                "should_retry": e.response.headers.get("x-should-retry")}
    return None


hello = [{"role": "user", "content": "Hi"}]
out["bad_key"] = error_of(lambda: openai.OpenAI(base_url=base, api_key="rhz_000000000000_" + "0" * 64,
                                                max_retries=0).chat.completions.create(model=model, messages=hello))
out["no_model"] = error_of(lambda: client.chat.completions.create(model="no-such-model", messages=hello))
out["bad_param"] = error_of(lambda: client.chat.completions.create(model=model, messages=hello, temperature=5))
# The SDK's own retries stay on (2): x-should-retry: false must stop them.
out["quota"] = error_of(lambda: openai.OpenAI(base_url=base, api_key=quota_key).chat.completions.create(
    model=model, messages=hello, max_tokens=8))
rate = openai.OpenAI(base_url=base, api_key=rate_key, max_retries=0)
rated = [error_of(lambda: rate.chat.completions.create(model=model, messages=hello, max_tokens=2)) for _ in range(3)]
out["rate"] = rated
tpm = openai.OpenAI(base_url=base, api_key=tpm_key, max_retries=0)
out["tpm"] = [error_of(lambda: tpm.chat.completions.create(model=model, messages=hello, max_tokens=8)) for _ in range(2)]
print(json.dumps(out))
