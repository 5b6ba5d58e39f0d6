"""The bulk replay's elements: a chunk's events column by column (``Rows``),
its parsed form (``ParsedChunk``), and the coder every chunk travels with.

An element is a whole chunk (thousands of messages, one shard's or one
window's rows), so per-element costs are paid once per chunk.
"""

from __future__ import annotations

import itertools
import operator
import pickle
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.coders import coder_impl

from transforms.rules.model import DeadLetter
from transforms.rules.replay_index import ChunkColumns


class Rows:
  """Events column by column, in arrival order: the ``i``-th arrived at
  ``step[i]``, its ``(customer_id, key)`` is ``pairs[pair[i]]``. ``first``
  orders Rows of different chunks: a chunk's first message number, plus the
  place of a part's first row. Numbers are NumPy arrays:
  a part of a chunk pickles in a few pieces. ``event_id`` and ``event_time``
  travel as far as the dedup shards."""
  __slots__ = ('first', 'step', 'pair', 'pairs', 'value', 'event_time', 'event_id')

  def __init__(self, first: int, step: np.ndarray, pair: np.ndarray,
               pairs: List[Tuple[str, str]], value: np.ndarray,
               event_time: Optional[np.ndarray] = None, event_id: Optional[List[str]] = None):
    self.first, self.step, self.pair, self.pairs = first, step, pair, pairs
    self.value, self.event_time, self.event_id = value, event_time, event_id

  def __len__(self) -> int:
    return len(self.step)

  def take(self, positions: np.ndarray, events: bool = True) -> 'Rows':
    """The rows at ``positions`` (ascending); without ``event_id`` and
    ``event_time`` unless ``events``."""
    first = self.first + int(positions[0]) if len(positions) else self.first
    if not events:
      return Rows(first, self.step[positions], self.pair[positions], self.pairs,
                  self.value[positions])
    assert self.event_id is not None and self.event_time is not None
    return Rows(first, self.step[positions], self.pair[positions], self.pairs,
                self.value[positions], self.event_time[positions],
                _pick(self.event_id, positions))

  @staticmethod
  def concatenate(parts: Sequence['Rows']) -> 'Rows':
    """Parts one after the other, their pairs in one table."""
    pairs: Dict[Tuple[str, str], int] = {}
    codes = []
    for part in parts:
      local = np.array([pairs.setdefault(p, len(pairs)) for p in part.pairs], dtype=np.int32)
      codes.append(local[part.pair])
    events = all(part.event_id is not None for part in parts)
    return Rows(
        parts[0].first if parts else 0,
        np.concatenate([part.step for part in parts]), np.concatenate(codes), list(pairs),
        np.concatenate([part.value for part in parts]),
        np.concatenate([part.event_time for part in parts]) if events else None,
        list(itertools.chain.from_iterable(part.event_id or () for part in parts))
        if events else None)

  def split_by(self, keys: np.ndarray, events: bool = True) -> Iterable[Tuple[int, 'Rows']]:
    """``(key, rows)`` for each distinct key of the rows' ``keys``, in order."""
    order = np.argsort(keys, kind='stable')
    cuts = np.flatnonzero(np.diff(keys[order])) + 1
    for positions in np.split(order, cuts):
      if len(positions):
        yield int(keys[positions[0]]), self.take(positions, events)


def _pick(items: List[str], positions: np.ndarray) -> List[str]:
  """``items`` at ``positions``, in one call."""
  if len(positions) == 0:
    return []
  if len(positions) == 1:
    return [items[int(positions[0])]]
  return list(operator.itemgetter(*positions.tolist())(items))


class ParsedChunk(NamedTuple):
  """A chunk's events (``rows``) with the place of each among the chunk's
  messages, whose sources and payloads an event's dead letter quotes should it
  be too late, and the chunk's invalid payloads' dead letters."""
  rows: Rows
  #: each event's place in the chunk's messages
  position: List[int]
  #: the source and payload of each of the chunk's messages
  source: List[str]
  data: List[str]
  invalid: List[DeadLetter]

  @property
  def messages(self) -> int:
    """How many messages the chunk holds."""
    return len(self.data)


class Chunk(list):
  """A list of messages, rows or dead letters that travels as one element."""


class ChunkCoder(beam.coders.Coder):
  """Pickle: fast for large nested lists and NumPy arrays, and it keeps the
  lone surrogates an invalid payload may hold. Its size estimate is a guess
  from the length, as the runner estimates sizes of sampled elements on every
  step and encoding a whole chunk to measure it costs as much as shipping it."""

  def _create_impl(self):
    return coder_impl.CallbackCoderImpl(
        lambda chunk: pickle.dumps(chunk, pickle.HIGHEST_PROTOCOL), pickle.loads,
        lambda chunk: _ROW_SIZE_GUESS * (
            chunk.messages if isinstance(chunk, ParsedChunk) else len(chunk)))

  def is_deterministic(self) -> bool:
    return False

  def to_type_hint(self):
    return Chunk

  def __eq__(self, other):
    return type(self) is type(other)

  def __hash__(self):
    return hash(type(self))


_ROW_SIZE_GUESS = 64

for _chunk_type in (Chunk, ChunkColumns, Rows, ParsedChunk):
  beam.coders.registry.register_coder(_chunk_type, ChunkCoder)
