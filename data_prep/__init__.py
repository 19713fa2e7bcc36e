"""OLMoE-mix -> fixed-length token sequences -> MosaicML Streaming (MDS).

``titan-moe prep INPUT_ROOT OUTPUT_URL`` turns a corpus in the OLMoE-mix-0924
layout (``data/<source>/**/*.json.gz|*.json.zst``, one JSON document per line
with a ``text`` field) into one MDS stream per source, on one machine or on N
(``--shard I/N``).  Everything about resumability, bounded disk and
determinism follows from one unit, the **file group** (``groups.py``): a
source's sorted files cut into groups of at least ``--group-size`` bytes.

1. **Tokenize** (``work.py``, one task per input file, ``--workers``
   processes): decode, tokenize, append EOS, commit ``<relpath>.tokens`` and
   its ``.json`` done-marker on local disk.
2. **Write a group** (``writer.write_group``) as soon as its files are
   tokenized: its full ``seq_len`` sequences become shards published into
   the output; its leftover tokens go into the group's record in the shared
   work store; its token files are deleted.
3. **Finalize** (``finalize.py``) once every group has a record: the
   leftovers become the tail shards, then ``index.json``, the stream's
   manifest, and the mixture manifest over every complete stream.

The stream is a function of the input and ``--group-size`` only, so the
output is byte-identical for any ``--shard I/N`` and any ``--workers``.

Modules: ``config`` (flags as a dataclass), ``sources`` (discovery,
decompression, line reading with bad-input accounting), ``tokenization``
(tokenizer loading), ``groups`` (file groups, shard assignment), ``work``
(tokenizing a file), ``writer`` (groups and tails to MDS shards), ``mds`` (the
MDS shard format), ``finalize`` (streams, indexes, manifests), ``progress``,
``pipeline`` (one process's run), ``cli`` (``main(argv)``).  The manifest
schema and the storage layer are shared with training:
``titan_moe.common.contract`` and ``titan_moe.common.storage``.
"""

from data_prep.config import PrepConfig

__all__ = ["PrepConfig"]
