"""The benchmark harness: proves lorank's answers against exhaustive rank sweeps.

- `tasks`: the benchmark tasks (real text on this machine, deterministic from a seed) and
  their recipes; `task_inputs` builds one for `lorank sweep --task`.
- `baselines`: per-layer rank baselines (PEFT EVA, AdaLoRA, Fisher diagonal) trained in the
  same harness.
- `score`: every method scored on every task against the sweep's ground truth (regret, waste,
  cost), search baselines replayed, and the tables of benchmarks/BENCHMARKS.md.

The harness imports the library (api, sweep, estimators, scoring) and the library never
imports it; only the CLI, the top layer, does. This file imports nothing, so building a task
does not load the trainer.
"""
