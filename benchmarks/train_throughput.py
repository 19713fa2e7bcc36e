"""Training throughput and MFU of titan_moe vs torchtitan's own MoE (qwen3), measured in one run.

    python -m benchmarks.train_throughput [CONFIG] [--nproc N] [--steps S] [--repeats R]

Same as ``titan-moe bench`` (``titan_moe/bench.py``, which holds the code so the
installed command works outside a checkout).  On CPU the default config is a
small shape (``titan_moe/configs/bench_cpu_small.toml``); on a GPU an
OLMoE-1B-7B-like one (``titan_moe/configs/bench_olmoe_1b7b.toml``).
"""

import sys

from titan_moe.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
