"""The command lines' parser and its ``type=`` functions: each flag's value is
checked while the command line is parsed, so a bad value is reported as
``train_sft.py: error: argument --x: ...`` (exit code 2) before any model or
data is loaded."""
from __future__ import annotations

import argparse
import math
import re
import sys
from typing import Callable, List, Optional, Sequence


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the usage examples' line breaks and shows every default that is a value;
    a flag whose default is None says in its own help what happens without it (so
    "(default: runs/<script>-<preset>)" is not followed by "(default: None)")."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


class FlagParser(argparse.ArgumentParser):
    """argparse, with two differences every anita command shares:

    - a bad flag is two lines, the error naming the flag and a pointer to --help (exit
      code 2), not the whole usage block (33 lines for the trainers) before the one
      line that matters;
    - a negative number in any notation is a flag's value: argparse takes ``-1`` and
      ``-0.5`` as values but ``-1e-4``, ``-.5e3`` or ``-inf`` as unknown flags ("expected
      one argument"). Such a value is joined to its flag (``--x=-1e-4``) before parsing,
      when the flag takes one value, so the flag's own check says what is wrong with it;
      and ``--x=--`` is refused (argparse would store an empty list, unchecked)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n({self.prog} --help lists every flag "
                     "and its default)\n")

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._negative_values_joined(args), namespace)

    def _negative_values_joined(self, args: List[str]) -> List[str]:
        # the flags that take exactly one value (nargs None: store and append actions)
        single = [s for action in self._actions if action.nargs is None
                  for s in action.option_strings if s.startswith("--")]
        out: List[str] = []
        i = 0
        while i < len(args):
            token = args[i]
            if token == "--":           # everything after it is positional
                return out + args[i:]
            flag, _, value = token.partition("=")
            if flag.startswith("--") and value == "--":
                # argparse 3.11 drops a "--" value and stores an empty list, unchecked
                self.error(f"argument {flag}: expected one argument, got '--'")
            flag = self._single_value_flag(token, single)
            if flag is not None and i + 1 < len(args) and _is_negative_number(args[i + 1]):
                out.append(f"{token}={args[i + 1]}")
                i += 2
                continue
            out.append(token)
            i += 1
        return out

    def _single_value_flag(self, token: str, single: List[str]) -> Optional[str]:
        """``token`` as one of ``single`` (or an abbreviation argparse would accept)."""
        if not token.startswith("--") or "=" in token:
            return None
        if token in single:
            return token
        if not self.allow_abbrev:
            return None
        every = [s for action in self._actions for s in action.option_strings]
        matches = [s for s in every if s.startswith(token)]
        return matches[0] if len(matches) == 1 and matches[0] in single else None


def printable(text: str) -> str:
    """``text`` with the bytes of an argument that was not UTF-8 (Python's surrogate
    escapes) written as \\xNN and any other surrogate as \\uNNNN, so printing cannot fail."""
    def shown(match) -> str:
        code = ord(match.group())
        return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"
    return _SURROGATE.sub(shown, text)


def one_line(text: str) -> str:
    """``text`` printable on one line: surrogates as printable() writes them, and a
    line break or other control character in a value the user gave as its escape."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in printable(text))


def _is_negative_number(text: str) -> bool:
    if not text.startswith("-") or text.startswith("--"):
        return False
    try:
        float(text)
    except ValueError:
        return False
    return True


def _shown(value) -> str:
    """A value for a one-line message: a 5,000-digit number is not read out."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else f"{text[:24]}...{text[-8:]} ({len(text):,} characters)"


def _number(text: str, kind):
    try:
        value = kind(text)
    except ValueError:      # not a number, or an integer past Python's 4,300 digits
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {_shown(text)}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {_shown(text)}")
    if kind is int and abs(value) >= 2**63:      # no count anita takes is larger; torch's ints end here
        raise argparse.ArgumentTypeError(f"expected an integer below 2**63, got {_shown(text)}")
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def utf8_text(text: str) -> str:
    """Text a tokenizer can take: a command-line argument holding bytes that are not
    UTF-8 reaches Python as surrogate escapes, which no tokenizer encodes."""
    bad = _SURROGATE.search(text)
    if bad:
        code = ord(bad.group())
        what = (f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}")
        raise argparse.ArgumentTypeError(f"not UTF-8 text ({what} at character {bad.start() + 1})")
    return text


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _number(text, int)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {_shown(value)}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _number(text, int)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {_shown(value)}")
        return value
    parse.__name__ = f"integer in [{low}, {high}]"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def steps_or_off(text: str) -> int:
    """A step count >= 1, or -1 for 'off' (what --max-steps takes)."""
    value = _number(text, int)
    if value != -1 and value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, or -1 for no limit; got {_shown(value)}")
    return value


def seed_int(text: str) -> int:
    value = _number(text, int)
    if not 0 <= value < 2 ** 32:            # numpy's seeding range
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {_shown(value)}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {_shown(value)}")
    return value


def learning_rate(text: str) -> float:
    """In (0, 1]: above 1, Adam's bias-corrected step (up to 10x the rate) makes
    torch fail with an overflow instead of training."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {_shown(value)}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {_shown(value)}")
    return value


def probability_0_1(text: str) -> float:
    """A probability or fraction in [0, 1)."""
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {_shown(value)}")
    return value


def count_or_fraction(text: str) -> float:
    """An integer count >= 1, or a fraction in [0, 1) (what --eval-split takes)."""
    value = _number(text, float)
    if 0 <= value < 1 or (value >= 1 and value.is_integer()):
        return value
    raise argparse.ArgumentTypeError(
        f"must be a whole count >= 1 or a fraction in [0, 1), got {_shown(value)}")


def comma_subset(choices: Sequence[str]) -> Callable[[str], str]:
    """A comma-separated, non-empty subset of ``choices`` (returned as given)."""
    def parse(text: str) -> str:
        items = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in items if t not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"{', '.join(map(repr, unknown)) or 'nothing'} given; expected a comma-separated "
                f"subset of {','.join(choices)}")
        return text
    return parse


def check_token_rows(parser, flag: str, rows: int, length: int) -> None:
    """The one bound the kernels still put on a micro-batch: its token rows (B x S) are
    counted in 32 bits (offsets are 64-bit). ``flag`` is the length's flag (SFT rows are
    --max-seq-length long, DPO pairs two rows of --max-length), ``rows`` the micro-batch's."""
    from csrc_triton.attention import MAX_TOKENS
    tokens = rows * length
    if tokens > MAX_TOKENS:
        parser.error(f"argument {flag}: {rows} rows x {length} "
                     f"= {tokens:,} tokens per micro-batch, more than the {MAX_TOKENS:,} token "
                     "rows the kernels index")
