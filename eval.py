#!/usr/bin/env python
"""Evaluate a model (and an optional LoRA adapter) on lm-evaluation-harness tasks.

    python eval.py --model DIR --adapter runs/dpo-dpo/adapter --preset anita
    python eval.py --model DIR --tasks my_task --include-path my_tasks/

See anita_core/eval/cli.py (or --help) for every option."""
from __future__ import annotations

import sys

if __name__ == "__main__":
    import script_entry
    from anita_core.eval.cli import main
    sys.exit(script_entry.run(main, "eval.py"))
