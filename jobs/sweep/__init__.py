"""Design-space sweeps: plan run configs from a spec, launch them, collect results, plot.

    titan-moe sweep plan SPEC.yaml --out DIR     # one run TOML per point + index.{csv,json}
    titan-moe sweep launch DIR --local | --k8s   # run / render every point (resumable)
    titan-moe sweep collect DIR                  # results.{csv,md}
    titan-moe sweep plot DIR                     # the paper's figures (PNG + SVG + JSON series)
    titan-moe sweep cost SPEC...                 # GPU-hours per study and scale

Modules: ``spec`` (the typed spec), ``spec_check`` / ``spec_values`` / ``spec_axes`` (its
validation), ``spec_file`` (YAML, ``extends``, ``--set``, study parts), ``fields`` (the
run-config schema: axes, index columns, the one labelling function), ``designs`` (the
top-k / expert-count rules that turn axes into expert sets), ``naming`` (point names),
``plan`` (budgets, run configs, the index, each rung's ``max_sparsity`` and ``limits``),
``equal_resources`` (that mode's budget and data arms), ``study`` (parts in tiers),
``cost`` (GPU-hours per study and tier), ``tomlw`` (a small TOML writer), ``launch``,
``collect``, ``plot`` (figures for one or every metric), ``plot_data`` (metrics, column
classes, reduction to one value per design), ``plot_figures`` (captions, series),
``plot_families`` / ``plot_scales`` (the figure families per scale / across scales),
``plot_draw`` (rendering), ``cli``.
"""
