"""In-pipeline memory sampling, in event time, for the soak benchmark."""

import json

from conftest import MINUTE, T0, data, mark, payload, run_replay
from transforms.flow.diagnostics import resident_mib

HOUR = 60 * MINUTE


def test_memory_is_sampled_at_each_event_time_hour_while_data_lasts(tmp_path):
  lines = []
  for hour in range(4):
    lines += [data('A', payload(f'e{hour}-{i}', T0 + hour * HOUR + i * MINUTE))
              for i in range(3)]
    lines.append(mark('A', T0 + (hour + 1) * HOUR))
  # a long quiet stretch, then the end of the stream: sampling stops with the data
  lines.append(mark('A', T0 + 100 * HOUR))
  run_replay(tmp_path, lines, sample_memory_s=3600)
  with open(tmp_path / 'out' / 'memory.jsonl') as f:

    samples = [json.loads(line) for line in f]
  assert [s['event_time'] for s in samples] == [T0 + h * HOUR for h in range(1, 5)]
  assert [s['events'] for s in samples] == [3, 6, 9, 12]
  assert all(0 < s['rss_mib'] < 100000 for s in samples)


def test_resident_memory_is_read_from_proc():
  assert resident_mib() > 10
