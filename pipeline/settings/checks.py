"""The checks of single setting values, shared by the CLI, the templates and
customer files: text, durations, rollups. (No Beam import: customer files are
checked before Beam loads.)

Each raises ConfigError (or RollupError) naming the field and the reason.

The limits of numeric settings (MAX_SECONDS, MAX_SHARDS, MAX_RECORDS) are
defined here only: the run's checks apply them, customer.schema.json's maxima
are generated from them (``python -m tools.template_metadata``) and the Flex
Template's regexes bound their count of digits (pipeline/settings/options.py).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Dict, Optional, Sequence, Tuple

from transforms.rules.model import MAX_EVENT_TIME, MIN_EVENT_TIME


class ConfigError(ValueError):
  """A setting is wrong; ``field`` names it."""

  def __init__(self, field: str, reason: str):
    super().__init__(f'{field}: {reason}')
    self.field = field
    self.reason = reason


#: The most seconds a duration setting may give (window and rollup sizes,
#: lateness, early firing, skew, run time, memory samples): 100 years, the span
#: of valid event times (2000-01-01 to 2100-01-01, contract section 1).
MAX_SECONDS = (MAX_EVENT_TIME - MIN_EVENT_TIME) // 1000
_TOO_LONG = 'at most {max} seconds (100 years, the span of valid event times), got {value}'
#: Keys of the gate (--shards, a customer file's ``shards``): at most this many.
MAX_SHARDS = 1024
#: A count of records (--kafka-max-records, --pubsub-max-messages) as the Java
#: reads (a Java long) take it.
MAX_RECORDS = 2**63 - 1
#: The longest checkpoint interval (--checkpointing_interval, a customer file's
#: ``checkpoint_interval_s``): a day; outputs wait for the next checkpoint.
MAX_CHECKPOINT_INTERVAL_S = 24 * 3600
_ROLLUP = re.compile(r' *([+-]?[0-9]+) *: *([+-]?[0-9]+) *\Z')
#: Unicode categories refused in any text setting: control characters (a
#: newline would split a launch command), invisible format characters, line
#: and paragraph separators.
_HIDDEN_CATEGORIES = ('Cc', 'Cf', 'Zl', 'Zp')


def check_text(field: str, value: str) -> str:
  """A text setting without control or invisible characters."""
  for i, char in enumerate(value):
    if unicodedata.category(char) in _HIDDEN_CATEGORIES:
      raise ConfigError(
          field, f'contains a control character (U+{ord(char):04X}) at position {i + 1}; '
          'settings are one line of visible text')
  return value


def check_count(field: str, value: Optional[int]) -> Optional[int]:
  """A count of records, 1 to MAX_RECORDS (None: unbounded)."""
  if value is not None and not 0 < value <= MAX_RECORDS:
    raise ConfigError(field, f'must be 1 to {MAX_RECORDS}, got {value}')
  return value


def check_seconds(field: str, value: int, positive: bool = False) -> int:
  """A whole number of seconds, at least 0 (or 1 if ``positive``) and at most
  MAX_SECONDS."""
  if isinstance(value, bool) or not isinstance(value, int):
    raise ConfigError(field, f'must be a whole number of seconds, got {value!r}')
  if value < int(positive):
    what = 'a positive number' if positive else 'zero or a positive number'
    raise ConfigError(field, f'must be {what} of seconds, got {value}')
  if value > MAX_SECONDS:
    raise ConfigError(field, 'must be ' + _TOO_LONG.format(max=MAX_SECONDS, value=value))
  return value


class RollupError(ValueError):
  """Rollup ``index`` (0-based) is wrong in ``field`` (``size_s`` or
  ``allowed_lateness_s``); the CLI and customer files name it their own way."""

  def __init__(self, index: int, field: str, reason: str):
    super().__init__(reason)
    self.index = index
    self.field = field
    self.reason = reason


def check_rollups(
    window_size_s: int, rollups: Sequence[Tuple[int, int]]) -> Tuple[Tuple[int, int], ...]:
  """Checks ``(size s, allowed lateness s)`` rollups of a run whose primary
  window is ``window_size_s``; returns them sorted by size.

  Each size must be a multiple of the primary size larger than it: windows
  are aligned to the epoch, so a rollup window is then exactly a run of whole
  primary windows, and the primary figures inside it can be summed and
  reconciled against it. Lateness is any whole number of seconds >= 0 (each
  rollup decides its own too-late events). Sizes may not repeat; sizes and
  lateness are at most MAX_SECONDS.
  """
  seen: Dict[int, int] = {}
  for index, (size, lateness) in enumerate(rollups):
    if size <= 0:
      raise RollupError(index, 'size_s', f'size must be a positive number of seconds, got {size}')
    if size > MAX_SECONDS:
      raise RollupError(
          index, 'size_s', 'size must be ' + _TOO_LONG.format(max=MAX_SECONDS, value=size))
    if size <= window_size_s or size % window_size_s:
      raise RollupError(
          index, 'size_s', f'size {size} s must be a multiple of the window size '
          f'({window_size_s} s) larger than it, so that whole windows nest in each rollup '
          'window and the two reconcile')
    if lateness < 0:
      raise RollupError(
          index, 'allowed_lateness_s',
          f'allowed lateness must be zero or a positive number of seconds, got {lateness}')
    if lateness > MAX_SECONDS:
      raise RollupError(index, 'allowed_lateness_s', 'allowed lateness must be ' +
                        _TOO_LONG.format(max=MAX_SECONDS, value=lateness))
    if size in seen:
      raise RollupError(
          index, 'size_s', f'size {size} s is given twice (rollups {seen[size] + 1} and '
          f'{index + 1})')
    seen[size] = index
  return tuple(sorted((int(size), int(lateness)) for size, lateness in rollups))


def parse_rollups(specs: Sequence[str], window_size_s: int,
                  field: str = '--rollup') -> Tuple[Tuple[int, int], ...]:
  """``--rollup SIZE:LATENESS`` values (the flag may repeat, and a value may
  list several, comma-separated, as one Flex Template parameter must) to
  checked ``(size s, lateness s)`` pairs; ConfigError naming ``field``."""
  items = [item for spec in specs for item in spec.split(',')]
  rollups = []
  for item in items:
    match = _ROLLUP.fullmatch(item)
    if not match:
      raise ConfigError(
          field, f'{item!r} is not SIZE:LATENESS (whole seconds, e.g. 3600:900)')
    rollups.append((int(match.group(1)), int(match.group(2))))
  try:
    return check_rollups(window_size_s, rollups)
  except RollupError as e:
    size, lateness = rollups[e.index]
    raise ConfigError(field, f'{size}:{lateness}: {e.reason}') from None
