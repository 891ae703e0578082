"""Evaluation with lm-evaluation-harness (the `eval` extra): anita's own model as an
lm-eval LM (lm.py), the task names, preset and datasets checked up front (tasks.py),
and the command (cli.py: eval.py, python -m anita_core.eval).

Layer: above anita_core.hf (it loads models and adapters), beside anita_core.train
(whose flag helpers the command reuses)."""
