"""python -m anita_core.eval: the same command as eval.py."""
import sys

from anita_core.eval.cli import main

sys.exit(main())
