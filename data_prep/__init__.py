"""OLMoE-mix -> fixed-length token sequences -> MosaicML Streaming (MDS).

``titan-moe prep INPUT_ROOT OUTPUT_URL`` turns a corpus in the OLMoE-mix-0924
layout (``data/<source>/**/*.json.gz|*.json.zst``, one JSON document per line
with a ``text`` field) into one MDS stream per source.  The pipeline has two
phases, and everything about resumability and determinism follows from them:

1. **Tokenize** (``work.py``, one task per input file, run by ``--workers``
   processes): decode the file line by line, tokenize the accepted documents
   in batches, append EOS to each, and commit two files in a work directory
   (``OUTPUT/_work/<source>/<relpath>.tokens`` — raw little-endian ids — and
   ``.json`` — counts and rejects).  The ``.json`` is written last and is the
   done-marker: a re-run skips every input file whose marker matches the
   tokenizer and input size.

2. **Write** (``writer.py``, once per source): concatenate the per-file token
   files *in sorted path order*, cut them into ``seq_len`` sequences (the
   final partial one padded with PAD, its real length in ``num_valid``), write
   zstd MDS shards with sha1/xxh64 hashes, publish every shard, then
   ``index.json``, then ``<source>/manifest.json``.  The per-source manifest is
   the stream's completion marker; a stream directory never holds an
   ``index.json`` whose shards are missing.

Because phase 2 reads in sorted order, the output is byte-identical whatever
the worker count, and an interrupted run re-run produces exactly the streams of
an uninterrupted one.  The mixture manifest ``OUTPUT/manifest.json`` is written
last of all (format in ``manifest.py``).

Modules: ``config`` (flags as a dataclass), ``storage`` (local/fsspec output
with atomic, retried writes), ``sources`` (discovery, decompression, line
reading with bad-input accounting), ``tokenization`` (tokenizer loading),
``work`` (phase 1), ``writer`` (phase 2), ``mds`` (the MDS shard format),
``manifest`` (counts, rejection reasons, manifest formats), ``pipeline``
(orchestration, workers, progress), ``cli`` (``main(argv)``).
"""

from data_prep.config import PrepConfig

__all__ = ["PrepConfig"]
