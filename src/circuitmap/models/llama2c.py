"""Load a llama2.c checkpoint and its tokenizer as a Hugging Face Llama model and fast tokenizer.

llama2.c (Karpathy) stores tiny Llamas such as ``stories260K`` in a flat "legacy" binary file and its
tokenizer in its own ``.bin`` format (or as the SentencePiece ``.model`` it was exported from). Converting
both to standard ``transformers`` objects lets the rest of circuitmap treat them like any other Llama.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from circuitmap.errors import ModelLoadError

_HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
_HEADER_BYTES = 4 * len(_HEADER_FIELDS)
# Newer llama2.c exports (version >= 1) start with this magic ("ak42" as a little-endian uint32).
_VERSIONED_MAGIC = 0x616B3432
# Upper bounds far beyond any real Llama; a header outside them is garbage, not a model.
_MAX_WIDTH = 1 << 17
_MAX_LAYERS = 1 << 10
_MAX_VOCAB = 1 << 21
_MAX_SEQ_LEN = 1 << 21

_SPECIAL_PIECES = ("<unk>", "<s>", "</s>")
# llama2.c's tokenizer export writes BOS/EOS wrapped in newlines; map them back to their SentencePiece names.
_BIN_SPECIALS = {"\n<s>\n": "<s>", "\n</s>\n": "</s>"}
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
_SPACE = "\u2581"  # SentencePiece's visible space '▁'


@dataclass(frozen=True)
class Llama2cHeader:
    """The seven int32 fields at the start of a legacy llama2.c checkpoint."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads

    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the fp32 arrays that follow the header, in file order."""
        n, v, d, h = self.n_layers, self.vocab_size, self.dim, self.hidden_dim
        arrays = [
            ("token_embedding", (v, d)),
            ("rms_att", (n, d)),
            ("wq", (n, d, d)),
            ("wk", (n, self.kv_dim, d)),
            ("wv", (n, self.kv_dim, d)),
            ("wo", (n, d, d)),
            ("rms_ffn", (n, d)),
            ("w1", (n, h, d)),
            ("w2", (n, d, h)),
            ("w3", (n, h, d)),
            ("rms_final", (d,)),
            ("freq_cis_real", (self.seq_len, self.head_dim // 2)),
            ("freq_cis_imag", (self.seq_len, self.head_dim // 2)),
        ]
        if not self.shared_classifier:
            arrays.append(("wcls", (v, d)))
        return arrays

    def file_size(self) -> int:
        """Bytes a checkpoint with this header must have."""
        return _HEADER_BYTES + 4 * sum(int(np.prod(shape)) for _, shape in self.layout())


def load_llama2c(
    checkpoint: str | Path,
    tokenizer: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load a legacy llama2.c checkpoint as a ``LlamaForCausalLM`` in eval mode, plus its tokenizer.

    ``tokenizer`` is a llama2.c ``.bin`` or SentencePiece ``.model`` file; when omitted, one with the
    model's vocabulary size is looked for beside the checkpoint. Raises ``ModelLoadError`` for bad input.
    """
    path = Path(checkpoint)
    header, arrays = read_llama2c_checkpoint(path)
    tok_path = Path(tokenizer) if tokenizer is not None else _find_tokenizer(path, header.vocab_size)
    tok = load_llama2c_tokenizer(tok_path, vocab_size=header.vocab_size)
    tok.model_max_length = header.seq_len
    return _build_model(header, arrays, dtype), tok


def read_llama2c_checkpoint(path: str | Path) -> tuple[Llama2cHeader, dict[str, np.ndarray]]:
    """Validate a legacy llama2.c checkpoint and return its header and read-only fp32 array views."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: llama2.c checkpoint not found")
    header = _read_header(path)
    expected, actual = header.file_size(), path.stat().st_size
    if actual != expected:
        problem = "truncated" if actual < expected else "has trailing data"
        raise ModelLoadError(
            f"{path}: llama2.c checkpoint {problem}: its header implies {expected} bytes, "
            f"the file has {actual}"
        )
    flat = np.memmap(path, dtype="<f4", mode="r", offset=_HEADER_BYTES)
    arrays, start = {}, 0
    for name, shape in header.layout():
        size = int(np.prod(shape))
        arrays[name] = flat[start : start + size].reshape(shape)
        start += size
    return header, arrays


def _read_header(path: Path) -> Llama2cHeader:
    """Parse and sanity-check the header, so garbage fails here with a clear message."""
    with path.open("rb") as f:
        raw = f.read(_HEADER_BYTES)
    if len(raw) < _HEADER_BYTES:
        raise ModelLoadError(
            f"{path}: not a llama2.c checkpoint: {len(raw)} bytes, "
            f"shorter than the {_HEADER_BYTES}-byte header"
        )
    if struct.unpack_from("<I", raw)[0] == _VERSIONED_MAGIC:
        raise ModelLoadError(
            f"{path}: versioned llama2.c export (magic 'ak42') is not supported; "
            "export with --version 0 (legacy)"
        )
    values = dict(zip(_HEADER_FIELDS, struct.unpack("<7i", raw), strict=True))
    shared = values["vocab_size"] > 0
    values["vocab_size"] = abs(values["vocab_size"])
    limits = {
        "dim": _MAX_WIDTH,
        "hidden_dim": _MAX_WIDTH,
        "n_layers": _MAX_LAYERS,
        "n_heads": _MAX_WIDTH,
        "n_kv_heads": _MAX_WIDTH,
        "vocab_size": _MAX_VOCAB,
        "seq_len": _MAX_SEQ_LEN,
    }
    for name, limit in limits.items():
        if not 0 < values[name] <= limit:
            raise ModelLoadError(
                f"{path}: not a valid llama2.c checkpoint: header {name}={values[name]} is outside 1..{limit}"
            )
    dim, n_heads, n_kv_heads = values["dim"], values["n_heads"], values["n_kv_heads"]
    if dim % n_heads or (dim // n_heads) % 2 or n_heads % n_kv_heads:
        raise ModelLoadError(
            f"{path}: not a valid llama2.c checkpoint: dim={dim}, n_heads={n_heads}, n_kv_heads={n_kv_heads} "
            "do not fit (dim must split into n_heads heads of even size; n_heads must be a multiple of "
            "n_kv_heads)"
        )
    return Llama2cHeader(**values, shared_classifier=shared)


def _interleaved_to_half_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows per head from llama2.c's rotary pairs (2i, 2i+1) to HF's pairs (i, i + head_dim/2)."""
    out_dim, in_dim = weight.shape
    head_dim = out_dim // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _build_model(
    header: Llama2cHeader, arrays: dict[str, np.ndarray], dtype: torch.dtype
) -> LlamaForCausalLM:
    """Create the HF Llama described by the header and copy the llama2.c weights into it."""
    config = LlamaConfig(
        vocab_size=header.vocab_size,
        hidden_size=header.dim,
        intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers,
        num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads,
        head_dim=header.head_dim,
        hidden_act="silu",
        max_position_embeddings=header.seq_len,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=header.shared_classifier,
        attention_bias=False,
        mlp_bias=False,
    )

    def tensor(name: str) -> torch.Tensor:
        return torch.tensor(arrays[name])  # copies out of the read-only memmap

    embedding = tensor("token_embedding")
    wq, wk, wv, wo = tensor("wq"), tensor("wk"), tensor("wv"), tensor("wo")
    w1, w2, w3 = tensor("w1"), tensor("w2"), tensor("w3")
    rms_att, rms_ffn = tensor("rms_att"), tensor("rms_ffn")
    state = {
        "model.embed_tokens.weight": embedding,
        "model.norm.weight": tensor("rms_final"),
        "lm_head.weight": embedding if header.shared_classifier else tensor("wcls"),
    }
    for i in range(header.n_layers):
        prefix = f"model.layers.{i}."
        state[prefix + "input_layernorm.weight"] = rms_att[i]
        state[prefix + "self_attn.q_proj.weight"] = _interleaved_to_half_rotary(wq[i], header.n_heads)
        state[prefix + "self_attn.k_proj.weight"] = _interleaved_to_half_rotary(wk[i], header.n_kv_heads)
        state[prefix + "self_attn.v_proj.weight"] = wv[i]
        state[prefix + "self_attn.o_proj.weight"] = wo[i]
        state[prefix + "post_attention_layernorm.weight"] = rms_ffn[i]
        state[prefix + "mlp.gate_proj.weight"] = w1[i]
        state[prefix + "mlp.up_proj.weight"] = w3[i]
        state[prefix + "mlp.down_proj.weight"] = w2[i]

    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def _find_tokenizer(checkpoint: Path, vocab_size: int) -> Path:
    """Pick the tokenizer beside the checkpoint: a ``tok*.bin`` of the right size, else a ``tok*.model``."""
    folder = checkpoint.parent
    candidates = [p for p in sorted(folder.glob("tok*.bin")) if p.resolve() != checkpoint.resolve()]
    candidates += sorted(folder.glob("tok*.model"), key=lambda p: (p.name != "tokenizer.model", p.name))
    if not candidates:
        raise ModelLoadError(
            f"{checkpoint}: no tokenizer found beside it (looked for tok*.bin, tokenizer.model and "
            f"tok*.model in {folder}); pass tokenizer=<path to a llama2.c .bin or SentencePiece .model>"
        )
    sizes = {}
    for candidate in candidates:
        try:
            sizes[candidate.name] = len(read_tokenizer_vocab(candidate)[0])
        except ModelLoadError:
            continue
        if sizes[candidate.name] == vocab_size:
            return candidate
    found = ", ".join(f"{name} ({size} tokens)" for name, size in sizes.items()) or "none readable"
    raise ModelLoadError(
        f"{checkpoint}: no tokenizer beside it has the model's vocabulary of {vocab_size} tokens "
        f"(found: {found}); pass tokenizer=<path>"
    )


def read_tokenizer_vocab(path: str | Path) -> tuple[list[str], list[float]]:
    """Read a llama2.c ``.bin`` or SentencePiece ``.model`` tokenizer as (pieces, scores), ids in order.

    Pieces use SentencePiece's conventions: '▁' for a space, "<s>"/"</s>"/"<unk>" for the specials.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: tokenizer file not found")
    if path.suffix == ".bin":
        pieces, scores = _read_bin_vocab(path)
    elif path.suffix == ".model":
        pieces, scores = _read_sentencepiece_vocab(path)
    else:
        raise ModelLoadError(
            f"{path}: unknown tokenizer format (expected a llama2.c .bin or SentencePiece .model)"
        )
    if tuple(pieces[:3]) != _SPECIAL_PIECES:
        raise ModelLoadError(
            f"{path}: tokenizer ids 0, 1, 2 are {pieces[:3]!r}, expected <unk>, <s>, </s> as llama2.c assumes"
        )
    if len(set(pieces)) != len(pieces):
        raise ModelLoadError(f"{path}: tokenizer has duplicate pieces")
    return pieces, scores


def _read_bin_vocab(path: Path) -> tuple[list[str], list[float]]:
    """Parse llama2.c's format: int32 max_token_length, then per token float32 score, int32 length, bytes."""
    data = path.read_bytes()
    if len(data) < 4 or struct.unpack_from("<i", data)[0] <= 0:
        raise ModelLoadError(f"{path}: not a llama2.c tokenizer: bad max_token_length header")
    pieces, scores, offset = [], [], 4
    while offset < len(data):
        if offset + 8 > len(data):
            raise ModelLoadError(f"{path}: llama2.c tokenizer truncated in the record of token {len(pieces)}")
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if length < 0 or offset + length > len(data):
            raise ModelLoadError(
                f"{path}: llama2.c tokenizer has a bad length {length} for token {len(pieces)}"
            )
        try:
            text = data[offset : offset + length].decode("utf-8")
        except UnicodeDecodeError:
            raise ModelLoadError(
                f"{path}: llama2.c tokenizer token {len(pieces)} is not valid UTF-8"
            ) from None
        offset += length
        pieces.append(_BIN_SPECIALS.get(text, text.replace(" ", _SPACE)))
        scores.append(score)
    return pieces, scores


def _read_sentencepiece_vocab(path: Path) -> tuple[list[str], list[float]]:
    """Read pieces and scores with the sentencepiece library (no protobuf needed)."""
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: not a SentencePiece model: {str(exc).splitlines()[0]}") from None
    ids = range(sp.get_piece_size())
    return [sp.id_to_piece(i) for i in ids], [sp.get_score(i) for i in ids]


def load_llama2c_tokenizer(path: str | Path, vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """Build a fast tokenizer that encodes exactly like llama2.c's ``encode`` and prepends BOS.

    ``vocab_size``, when given, must match the tokenizer's (the model's vocabulary size).
    """
    path = Path(path)
    pieces, scores = read_tokenizer_vocab(path)
    if vocab_size is not None and len(pieces) != vocab_size:
        raise ModelLoadError(
            f"{path}: tokenizer has {len(pieces)} tokens but the model's vocabulary has {vocab_size}"
        )
    backend = Tokenizer(
        BPE(
            vocab={piece: i for i, piece in enumerate(pieces)},
            merges=_merges_from_scores(pieces, scores),
            unk_token="<unk>",
            byte_fallback=True,
        )
    )
    # llama2.c prepends a dummy-prefix space and uses '▁' for spaces; no other normalisation, no pre-split.
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)])
    backend.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,  # like llama2.c, a literal "<s>" in the text is just text
    )


def _merges_from_scores(pieces: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to llama2.c's rule "merge the adjacent pair whose concatenation scores highest".

    Every split of a piece into two vocabulary pieces is a merge, ranked by the merged piece's score
    (descending), then its id. Specials and byte tokens never take part, as in llama2.c, where their
    strings ("<0x0A>", "<s>") never form a concatenation that is in the vocabulary.
    """
    mergeable = {piece for piece in pieces[len(_SPECIAL_PIECES) :] if not _BYTE_PIECE.fullmatch(piece)}
    ranked = []
    for token_id, piece in enumerate(pieces):
        if piece not in mergeable:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[token_id], token_id, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]
