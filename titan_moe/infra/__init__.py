"""How titan-moe runs on many processes (torchtitan's ``infra/``): nothing here knows the model's maths.

- ``platform``: the CPU/gloo adapter; must be activated before torchtitan is imported.
- ``parallelize``: FSDP2/HSDP, activation checkpointing and compile for the titan_moe model.
- ``expert_parallel``: experts sharded over EP ranks, tokens exchanged with all-to-all.
- ``torchrun``: the one torchrun command line (train, bench and eval spawn through it).

Importing this package imports none of them (``platform`` must stay first).
"""
