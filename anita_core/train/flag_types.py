"""Moved to anita_core.cli.flag_types (the command-line helpers train, eval and chat
share); these names stay importable for memory_budget.py and bench/, whose owners
point them there."""
from anita_core.cli.flag_types import (FlagParser, HelpFormatter, comma_subset,  # noqa: F401
                                       count_or_fraction, int_at_least, int_between, learning_rate,
                                       non_negative_float, non_negative_int, one_line, positive_float,
                                       positive_int, printable, probability_0_1, seed_int,
                                       steps_or_off, utf8_text)
