"""A Qwen-style 151,646-id byte-level BPE tokenizer, built offline for the tests.

Source: the real Qwen BPE ranks, `qwen.tiktoken` (151,643 lines of `base64(token_bytes) rank`), which the
PyPI wheel `dashscope==2.0.2` ships as `dashscope/resources/qwen.tiktoken` (install it with
`pip install --no-deps dashscope==2.0.2`; the package itself is never imported — its __init__ needs
dependencies we do not install). The ranks are converted into a Hugging Face fast tokenizer much as
transformers' `TikTokenConverter` does (it adds every valid split as a merge; this keeps one per token,
as Qwen2's own tokenizer.json, with the same ids on every text checked), without needing tiktoken:

* vocab: each token's bytes mapped through the GPT-2 byte->unicode table, id = rank;
* merges: for each token of >= 2 bytes, the split into two tokens that tiktoken's own BPE (limited to
  lower ranks) reaches last — the classic `bpe()` reconstruction, one merge per token as in Qwen2's
  tokenizer.json — ordered by the merged token's rank; `ignore_merges=True`, so a pre-token that is itself
  a token is emitted whole, as tiktoken does;
* pre-tokenizer: Split on Qwen's regex (isolated), then ByteLevel(add_prefix_space=False, use_regex=False),
  as Qwen2's tokenizer.json; ByteLevel decoder; no normalizer (tiktoken has none);
* specials appended after the ranks: <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645.

The converted tokenizer is cached under `$SGLANG_GW_CACHE/qwen151k-tokenizer/<sha256 of the file, 16 hex>-v<N>/`,
so only the first run pays for the conversion (~3-4 s on 2 cores); later runs load it in ~0.6-0.8 s.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
NUM_RANKS = 151_643
VOCAB_SIZE = NUM_RANKS + len(SPECIAL_TOKENS)  # 151,646
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CONVERTER_VERSION = "2"  # bump when the conversion changes, so cached copies are rebuilt
_RESOURCE = "dashscope/resources/qwen.tiktoken"


class QwenTiktokenMissing(RuntimeError):
    """qwen.tiktoken is not installed (the `dashscope` wheel is absent)."""


def find_qwen_tiktoken() -> Path:
    """The path of dashscope's qwen.tiktoken, found without importing dashscope (whose __init__ imports
    websocket, requests, ... that a --no-deps install leaves out)."""
    import importlib.metadata
    import importlib.util

    candidates = []
    try:
        candidates.append(Path(importlib.metadata.distribution("dashscope").locate_file(_RESOURCE)))
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        spec = importlib.util.find_spec("dashscope")  # locates the package; does not run its __init__
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(Path(loc) / "resources" / "qwen.tiktoken")
    for path in candidates:
        if path.is_file():
            return path
    raise QwenTiktokenMissing(
        "qwen.tiktoken not found: the Qwen 151k-vocabulary tests need the `dashscope` wheel, which ships it "
        "(pip install --no-deps dashscope==2.0.2)"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode table (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def load_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's byte-pair merge of `token`, using only ranks below max_rank."""
    parts = [token[i:i + 1] for i in range(len(token))]
    get = ranks.get
    while True:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rk = get(parts[i] + parts[i + 1])
            if rk is not None and rk < best_rank:
                best, best_rank = i, rk
        if best < 0:
            return parts
        parts[best:best + 2] = [parts[best] + parts[best + 1]]


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte-level vocab, and one merge per multi-byte token — the pair that tiktoken's BPE, limited to
    lower ranks, merges last — ordered by the merged token's rank (as Qwen2's tokenizer.json: 151,387 merges).
    Fast path: when only one split of the token has both halves of lower rank, that split is the merge
    (the restricted BPE must end on one of those splits); only the others (~45%) run the BPE."""
    table = _bytes_to_unicode()
    trans = {i: table[i] for i in range(256)}
    vocab = {tok.decode("latin-1").translate(trans): r for tok, r in ranks.items()}
    strs = {r: s for s, r in vocab.items()}
    get = ranks.get
    merges: list[tuple[int, int, int]] = []
    for tok, rank in ranks.items():
        found, many = None, False
        for i in range(1, len(tok)):
            lr = get(tok[:i])
            if lr is not None and lr < rank:
                rr = get(tok[i:])
                if rr is not None and rr < rank:
                    if found is not None:
                        many = True
                        break
                    found = (lr, rr)
        if many:
            parts = _bpe(ranks, tok, rank)
            if len(parts) != 2:
                raise ValueError(f"token {tok!r} (rank {rank}) does not reduce to one merge: {parts}")
            found = (ranks[parts[0]], ranks[parts[1]])
        if found is not None:
            merges.append((rank, *found))
        elif len(tok) > 1:
            raise ValueError(f"token {tok!r} (rank {rank}) has no split into two lower-ranked tokens")
    merges.sort()
    return vocab, [(strs[lr], strs[rr]) for _, lr, rr in merges]


def convert(path: Path):
    """qwen.tiktoken -> a transformers PreTrainedTokenizerFast (not cached)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
    )

    ranks = load_ranks(path)
    if len(ranks) != NUM_RANKS or sorted(ranks.values()) != list(range(NUM_RANKS)):
        raise ValueError(f"{path}: expected ranks 0..{NUM_RANKS - 1}, got {len(ranks)} entries")
    vocab, merges = vocab_and_merges(ranks)
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == NUM_RANKS + i, (t, tok.token_to_id(t))
    return _wrap(tokenizer_object=tok)


def _wrap(**source):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        **source, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=32768,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_qwen_tokenizer(cache_dir: Path | None = None):
    """The 151,646-id Qwen tokenizer as a PreTrainedTokenizerFast, converted once and cached under
    `<cache_dir>/qwen151k-tokenizer/<hash of qwen.tiktoken>-v<converter>/` (cache_dir defaults to
    $SGLANG_GW_CACHE). Raises QwenTiktokenMissing when dashscope is not installed."""
    src = find_qwen_tiktoken()
    if cache_dir is None:
        cache_dir = Path(os.environ["SGLANG_GW_CACHE"])
    target = Path(cache_dir) / "qwen151k-tokenizer" / f"{_file_sha256(src)[:16]}-v{_CONVERTER_VERSION}"
    if (target / "tokenizer.json").is_file():
        try:  # straight from tokenizer.json: from_pretrained would also parse the 11 MB JSON in Python
            return _wrap(tokenizer_file=str(target / "tokenizer.json"))
        except Exception:  # noqa: BLE001 — a damaged cache entry (tokenizers raises bare Exception): rebuild it
            shutil.rmtree(target, ignore_errors=True)
    fast = convert(src)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)
        fast.save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic; a concurrent builder may have won the race, which is fine
        except OSError:
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return fast
