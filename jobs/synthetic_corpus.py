"""A small synthetic pretraining corpus in the OLMoE-mix-0924 layout, and a tokenizer for it.

For the offline demo and end-to-end tests: ``data/<source>/*.json.gz`` (and
``*.json.zst`` for dclm, as in the real mixture), one JSON document per line
with ``id`` and ``text``.  Documents come from per-source templates with
random fillers, so there is structure a tiny model can learn within a few
hundred steps, and sources differ enough for per-source losses to differ.
A few malformed lines are mixed in on purpose (``PLANTED_REJECTS`` per
source): ``prep`` must count and skip them, and the demo shows that it does.

``write_heldout_paloma`` writes fresh documents from the same templates in
Paloma's Hugging Face text layout, so ``titan-moe eval --tasks paloma:...``
scores them.  eval only knows Paloma's own subset names, so each synthetic
source is filed under the name of the Paloma subset closest to it
(``PALOMA_STANDINS``); the text is synthetic, and the folder says so.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import zstandard

NAMES = ["Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "John", "Radia", "Ken"]
CITIES = ["Paris", "Lagos", "Lima", "Osaka", "Oslo", "Cairo", "Quito", "Perth", "Dakar", "Hanoi"]
THINGS = ["river", "garden", "library", "market", "bridge", "harbor", "museum", "forest", "station", "tower"]
FIELDS = ["graph theory", "protein folding", "ocean currents", "sparse models", "soil chemistry", "star formation"]
VERBS = ["improves", "reduces", "explains", "predicts", "stabilizes", "accelerates"]


def _web(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 7)):
        name, city, thing = rng.choice(NAMES), rng.choice(CITIES), rng.choice(THINGS)
        sentences.append(rng.choice([
            f"{name} visited the {thing} in {city} last year.",
            f"The {thing} in {city} opens at {rng.randint(6, 11)} in the morning.",
            f"People in {city} say the {thing} is the best place to meet {name}.",
            f"{name} wrote a short story about a {thing} near {city}.",
        ]))
    return " ".join(sentences)


def _code(rng: random.Random) -> str:
    fn = rng.choice(["add", "scale", "clip", "shift", "mix"])
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    body = {
        "add": f"    return x + {a}",
        "scale": f"    return x * {a}",
        "clip": f"    return min(max(x, {a}), {a + b})",
        "shift": f"    return x - {b}",
        "mix": f"    return {a} * x + {b}",
    }[fn]
    return f"def {fn}_{a}{b}(x):\n{body}\n\n\nprint({fn}_{a}{b}({rng.randint(0, 20)}))\n"


def _science(rng: random.Random) -> str:
    field, verb = rng.choice(FIELDS), rng.choice(VERBS)
    n = rng.randint(10, 500)
    return (
        f"Abstract. We study {field}. Our method {verb} the error by {rng.randint(2, 60)} percent "
        f"on {n} samples. Results on {field} suggest that the approach {verb} learning in practice."
    )


def _wiki(rng: random.Random) -> str:
    city = rng.choice(CITIES)
    return (
        f"{city} is a city with {rng.randint(1, 20)} million people. "
        f"It is known for its {rng.choice(THINGS)} and its {rng.choice(THINGS)}. "
        f"The mayor of {city} is {rng.choice(NAMES)}."
    )


SOURCES = {"dclm": (_web, 6), "starcoder": (_code, 2), "pes2o": (_science, 1), "wiki": (_wiki, 1)}
# Malformed lines write_corpus plants in every source, by prep's rejection reason.
PLANTED_REJECTS = {"invalid_json": 1, "empty_text": 1}
# Synthetic source -> the Paloma subset name its held-out documents are filed under.
PALOMA_STANDINS = {"dclm": "c4_en", "starcoder": "dolma_stack", "pes2o": "dolma_pes2o", "wiki": "dolma_wiki"}
HELDOUT_FILE = "synthetic-heldout.jsonl.gz"


def write_corpus(root: Path, docs_per_weight: int = 300, seed: int = 0) -> Path:
    """Write ``root/data/<source>/...``; returns ``root``.  Source sizes follow SOURCES weights."""
    rng = random.Random(seed)
    for source, (make, weight) in SOURCES.items():
        folder = root / "data" / source
        folder.mkdir(parents=True, exist_ok=True)
        n_docs = docs_per_weight * weight
        for part in range(2):
            lines = [
                json.dumps({"id": f"{source}-{part}-{i}", "text": make(rng), "added": "2024-09-01"})
                for i in range(n_docs // 2)
            ]
            if part == 1:  # what real crawls contain: a broken line and an empty document (PLANTED_REJECTS)
                lines.insert(3, '{"id": "broken", "text": "unterminated')
                lines.insert(7, json.dumps({"id": "empty", "text": ""}))
            payload = ("\n".join(lines) + "\n").encode()
            if source == "dclm":
                (folder / f"part-{part:04d}.json.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
            else:
                (folder / f"part-{part:04d}.json.gz").write_bytes(gzip.compress(payload))
    return root


def heldout_documents(n: int, seed: int = 1) -> dict[str, list[str]]:
    """Fresh documents per source (not in the training corpus) for perplexity evaluation."""
    rng = random.Random(seed)
    return {source: [make(rng) for _ in range(n)] for source, (make, _) in SOURCES.items()}


def write_heldout_paloma(root: Path, n: int = 50, seed: int = 1) -> dict[str, int]:
    """``n`` held-out documents per source as ``root/<HF config>/val/HELDOUT_FILE``.

    The layout is Paloma's Hugging Face text release (``dolma-v1_5`` subsets
    carry a ``subdomain`` field), under the subset names of PALOMA_STANDINS.
    Returns {subset name: documents}.  Rewriting gives identical files.
    """
    from eval.tasks.paloma import SUBSETS  # the (config, subdomain) each subset name is read from

    by_file: dict[Path, list[str]] = {}
    counts = {}
    for source, docs in heldout_documents(n, seed).items():
        subset = PALOMA_STANDINS[source]
        config, subdomain = SUBSETS[subset]
        extra = {} if subdomain is None else {"subdomain": subdomain}
        lines = by_file.setdefault(root / config / "val" / HELDOUT_FILE, [])
        lines += [json.dumps({"id": f"synthetic-{source}-{i}", "text": text, **extra}) for i, text in enumerate(docs)]
        counts[subset] = len(docs)
    for path, lines in by_file.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        # mtime=0: the same documents give the same bytes on every run.
        path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))
    (root / "README.txt").write_text(
        "SYNTHETIC held-out documents written by jobs/synthetic_corpus.py -- NOT Paloma.\n"
        "They use Paloma's file layout and subset names only so that `titan-moe eval --tasks paloma:...`\n"
        "can score them: " + ", ".join(f"{s} = synthetic {src}" for src, s in PALOMA_STANDINS.items()) + ".\n"
    )
    return counts


def corpus_texts(corpus_root: Path):
    """The ``text`` of every well-formed document of the corpus (``.json.gz`` and ``.json.zst``)."""
    for path in sorted((corpus_root / "data").rglob("*.json.*")):
        raw = path.read_bytes()
        if path.name.endswith(".zst"):
            raw = zstandard.ZstdDecompressor().decompress(raw)  # write_corpus records the frame size
        elif path.name.endswith(".gz"):
            raw = gzip.decompress(raw)
        else:
            continue
        for line in raw.decode().splitlines():
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                continue  # the planted malformed lines
            if text:
                yield text


def train_tokenizer(corpus_root: Path, out_file: Path, vocab_size: int = 1024) -> Path:
    """A byte-level BPE tokenizer with the OLMoE special-token layout: EOS = 0, PAD = 1.

    Trained on every source (the zstd-compressed dclm files too, which hold
    most of the text).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_texts(corpus_root), trainer=trainer)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_file))
    return out_file
