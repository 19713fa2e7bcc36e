"""Progress bars for prep: one per source, input bytes read, docs/s and tokens/s."""

from __future__ import annotations

import time

from tqdm import tqdm

from data_prep.sources import InputFile


class Progress:
    """One bar per source: input bytes read, with docs/s and tokens/s.

    Rates are averages since the source's first file started; once the
    source is tokenized they freeze and a status (writing, done) follows them.
    """

    def __init__(self, files: dict[str, list[InputFile]], enabled: bool):
        width = max(len(s) for s in files) if files else 0
        self.bars = {
            source: tqdm(total=sum(f.size for f in flist), unit="B", unit_scale=True, position=i,
                         desc=source.ljust(width), disable=not enabled, dynamic_ncols=True, leave=True)
            for i, (source, flist) in enumerate(files.items())
        }
        self.start: dict[str, float] = {}
        self.docs: dict[str, int] = dict.fromkeys(files, 0)
        self.tokens: dict[str, int] = dict.fromkeys(files, 0)
        self.rates: dict[str, str] = dict.fromkeys(files, "")
        self.state: dict[str, str] = dict.fromkeys(files, "")

    def _show(self, source: str, refresh: bool) -> None:
        text = "; ".join(part for part in (self.rates[source], self.state[source]) if part)
        self.bars[source].set_postfix_str(text, refresh=refresh)

    def update(self, source: str, nbytes: int, docs: int, tokens: int) -> None:
        now = time.perf_counter()
        start = self.start.setdefault(source, now)
        self.docs[source] += docs
        self.tokens[source] += tokens
        elapsed = max(now - start, 1e-6)
        self.rates[source] = f"{self.docs[source] / elapsed:,.0f} docs/s, {self.tokens[source] / elapsed:,.0f} tok/s"
        self._show(source, refresh=False)
        self.bars[source].update(nbytes)

    def status(self, source: str, text: str) -> None:
        self.state[source] = text
        self._show(source, refresh=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
