"""The run report: what a run's outputs say, as a page and as metrics.

  python -m pipeline report OUTPUT_DIR [--out PATH] [--serve HOST:PORT]

Reads a run's folder (``run.json``, the accounting, the panes, the dead
letters, the duplicates and the reconciliation when the run wrote them, and a
replay input when it is still there) and writes two files into it:

* ``report.html``: one self-contained page (charts inline as SVG, no network):
  the slowest source's watermark lag; every kind of dead letter with its count
  and an example; the accounting as a picture, in total, per source and per
  customer; dead letters over event time; how late the late messages were, against
  the allowed lateness; each source's watermark over the replay; every
  window's panes by timing; and each rollup's reconciliation;
* ``metrics.prom``: the same figures in Prometheus' text format
  (``tidemark_events_total{outcome=...}`` and friends, see ``metrics``), for a
  textfile collector or any scrape; ``templates/monitoring/alerts.yml`` holds
  the alerting rules over them.

Every run writes both when it commits its outputs; this command writes them
again for any folder, and with ``--serve`` keeps serving the folder's metrics
at ``/metrics`` (read afresh from its files at every scrape) and the page at
``/``, for a Prometheus to scrape. The charts are drawn with matplotlib: static SVG that
any browser shows offline and that needs no JavaScript (``pipeline.readback.charts``).
"""

from __future__ import annotations

import argparse
import base64
import html
import os
import sys
import threading
from typing import Callable, Iterable, List, Optional, Tuple

from pipeline.readback.charts import Chart, charts
from pipeline.runfolder import names
from pipeline.readback.metrics import METRICS_NAME, run_metrics
from pipeline.readback.outputs import (
    NotARunFolder, RunOutputs, UnreadableOutput, dead_letter_kinds, load, slowest_source)
from transforms.rules.model import CATEGORIES

REPORT_NAME = names.REPORT


# --- the page --------------------------------------------------------------------

_STYLE = '''
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 62em; color: #222 }
h1 { font-size: 1.5em; margin-bottom: 0.2em } h2 { font-size: 1.15em; margin-top: 2em }
.status { padding: 0.6em 1em; border-radius: 4px; font-weight: 600 }
.ok { background: #e8f6ee; color: #1e7d45 } .bad { background: #fdecea; color: #a93226 }
table { border-collapse: collapse } td, th { padding: 0.2em 0.8em; text-align: right }
th { text-align: left; font-weight: 500; color: #555 } figure { margin: 1em 0 }
figure img { max-width: 100%; height: auto } figcaption { color: #555 }
.note { color: #777 } table.kinds { font-size: 0.92em } .kinds td.what { text-align: left }
code { font-size: 0.95em; word-break: break-all }
'''

# Marks the page once the browser has decoded every chart: a check (and a
# reader) can tell a page whose charts rendered from one whose did not.
_SCRIPT = '''
window.addEventListener('load', function () {
  var charts = document.querySelectorAll('figure img');
  var drawn = Array.prototype.filter.call(charts, function (i) {
    return i.complete && i.naturalWidth > 0; }).length;
  document.documentElement.setAttribute('data-charts', charts.length);
  document.documentElement.setAttribute('data-charts-rendered', drawn);
});
'''


def _table(rows: Iterable[Tuple[str, object]]) -> str:
  return '<table>' + ''.join(
      f'<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>'
      for k, v in rows) + '</table>'


#: The most kinds of dead letter the page lists (the rest are summed).
MAX_KINDS = 40
_EXAMPLE_CHARS = 120


def _dead_letter_table(outputs: RunOutputs) -> str:
  """Every kind of dead letter with its count and one payload, so an on-call
  engineer sees what went wrong without opening the file."""
  kinds = dead_letter_kinds(outputs)
  if not kinds:
    return ''
  rows = ''.join(
      f'<tr><td class="what">{html.escape(k.reason)}</td><td>{k.letters:,}</td>'
      f'<td class="what">{html.escape(k.what)}</td>'
      f'<td class="what"><code>{html.escape(_shown(k.example))}</code></td></tr>'
      for k in kinds[:MAX_KINDS])
  rest = kinds[MAX_KINDS:]
  more = (f'<p class="note">and {len(rest):,} more kinds ({sum(k.letters for k in rest):,} dead '
          'letters): see dead_letter.jsonl.</p>') if rest else ''
  return (f'<h2>Dead letters by reason ({len(kinds):,} kinds)</h2><table class="kinds">'
          '<tr><th>reason</th><th>count</th><th>what went wrong</th><th>example payload</th>'
          f'</tr>{rows}</table>{more}')


def _shown(payload: str) -> str:
  """A payload as one line of readable text: control characters escaped, cut short."""
  if not payload:
    return '(empty)'
  text = ''.join(c if c.isprintable() else c.encode('unicode_escape').decode('ascii')
                 for c in payload[:_EXAMPLE_CHARS])
  return text + ('\u2026' if len(payload) > _EXAMPLE_CHARS else '')


def _lag(outputs: RunOutputs) -> List[Tuple[str, str]]:
  lag = slowest_source(outputs)
  if lag is None:
    return []
  return [('slowest source', f'{lag.slowest}: its watermark ended {lag.seconds:,.0f} s behind '
                             f'source {lag.ahead}\'s')]


def render_html(outputs: RunOutputs, made: List[Chart]) -> str:
  manifest, accounting = outputs.manifest, outputs.accounting
  settings = manifest['settings']
  unaccounted = outputs.unaccounted
  good = outputs.status == 'complete' and manifest.get('reconciled', False) and not unaccounted
  verdict = (f'run {outputs.status}' +
             (', reconciled' if manifest.get('reconciled') else ', NOT reconciled') +
             (f': {manifest["detail"]}' if manifest.get('detail') else ''))
  figures = ''.join(
      f'<h2>{html.escape(c.title)}</h2><figure><img alt="{html.escape(c.title)}" '
      f'src="data:image/svg+xml;base64,{base64.b64encode(c.svg.encode()).decode()}">'
      f'<figcaption>{html.escape(c.caption)}</figcaption></figure>' for c in made)
  missing = ''
  heading = 'Where every message went'
  if not outputs.finished:
    heading = 'What the run wrote before it stopped'
    missing = ('<p class="note">This run did not finish: its accounting was never computed. '
               'The figures count what it wrote before it stopped (dead letters, duplicates '
               'where recorded, events in panes); "received" is their sum, not what it read. '
               'Lateness and watermarks per source are not drawn for it.</p>')
  elif outputs.replay_received is None:
    missing = ('<p class="note">Lateness and watermark per source are drawn for replays: '
               'a live source\'s arrival watermarks are not in the outputs.</p>')
  rows = [(k, f'{accounting.get(k, 0):,}') for k in CATEGORIES] + [
      ('unaccounted', f'{unaccounted:,}')]
  about = [('run', manifest.get('run_id', '')), ('runner', manifest.get('runner', '')),
           ('source', settings.get('source', '')),
           ('window', f'{settings["window_size_s"]} s, allowed lateness '
                      f'{settings["allowed_lateness_s"]} s, early firing '
                      f'{settings.get("early_firing_s")} s'),
           ('started', manifest.get('started_at', '')), ('ended', manifest.get('ended_at', '')),
           ('seconds', manifest.get('seconds', ''))] + _lag(outputs) + [
               ('restated', f'[{a.get("from")}, {a.get("to")}) at {a.get("restated_at")}: '
                            f'{a.get("windows_changed", 0):,} windows corrected, '
                            f'{a.get("too_late_recovered", 0):,} too-late events now counted')
               for a in outputs.restatements]
  if outputs.restatements:
    heading += ' (after its restatements)'
  return (
      '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
      f'<title>Tidemark run {html.escape(str(manifest.get("run_id", "")))}</title>'
      f'<style>{_STYLE}</style></head><body>'
      f'<h1>Tidemark run report</h1>'
      f'<p class="status {"ok" if good else "bad"}">{html.escape(verdict)}</p>'
      f'{_table(about)}<h2>{heading}</h2>{_table(rows)}{_dead_letter_table(outputs)}'
      f'{figures}{missing}<script>{_SCRIPT}</script></body></html>')




def _write_atomically(path: str, text: str) -> None:
  temporary = f'{path}.tmp{os.getpid()}'
  with open(temporary, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(temporary, path)


def write(output_dir: str, out: Optional[str] = None) -> Tuple[str, str]:
  """Writes ``report.html`` and ``metrics.prom`` for a run's folder, into it,
  or with ``out`` the page there and the metrics beside it (the run's folder
  is then only read); returns their paths."""
  import prometheus_client
  prometheus_client.disable_created_metrics()  # a run's figures, not live series
  outputs = load(output_dir)
  page = out or os.path.join(output_dir, REPORT_NAME)
  _write_atomically(page, render_html(outputs, charts(outputs)))
  textfile = os.path.join(os.path.dirname(os.path.abspath(page)), METRICS_NAME)
  _write_atomically(textfile, prometheus_client.generate_latest(run_metrics(outputs)).decode('utf-8'))
  return page, textfile


def start_server(folder: Callable[[], str], address: str):
  """Serves ``folder()``'s metrics at ``/metrics`` and its report at ``/``,
  each read from its files as they are at the request, from a daemon thread;
  returns the server (``shutdown()`` stops it)."""
  import http.server
  import prometheus_client
  host, _, port = address.rpartition(':')

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):  # noqa: N802 (the http.server name)
      self.do_GET(head=True)

    def do_GET(self, head: bool = False):  # noqa: N802 (the http.server name)
      try:
        outputs = load(folder())
        if self.path.split('?')[0] == '/metrics':
          body = prometheus_client.generate_latest(run_metrics(outputs))
          kind = prometheus_client.CONTENT_TYPE_LATEST
        elif self.path == '/':
          body, kind = render_html(outputs, charts(outputs)).encode(), 'text/html; charset=utf-8'
        else:
          self.send_error(404)
          return
      except (NotARunFolder, OSError, ValueError) as e:
        self.send_error(503, explain=str(e))
        return
      self.send_response(200)
      self.send_header('Content-Type', kind)
      self.send_header('Content-Length', str(len(body)))
      self.end_headers()
      if not head:
        self.wfile.write(body)

    def log_message(self, *args):  # scrapes are not news
      pass

  server = http.server.ThreadingHTTPServer((host or '127.0.0.1', int(port)), Handler)
  server.daemon_threads = True
  threading.Thread(target=server.serve_forever, name='tidemark-metrics', daemon=True).start()
  return server


def serve(output_dir: str, address: str, server=None) -> None:
  """Serves the folder's metrics and report (``start_server``, or the one
  given, already listening) until interrupted."""
  server = server or start_server(lambda: output_dir, address)
  host, _, port = address.rpartition(':')
  print(f'serving {output_dir}: http://{host or "127.0.0.1"}:{port}/metrics and /', flush=True)
  try:
    threading.Event().wait()
  except KeyboardInterrupt:
    pass
  finally:
    server.shutdown()
    server.server_close()


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m pipeline report', description=__doc__.split('\n\n')[0])
  parser.add_argument('output_dir', metavar='OUTPUT_DIR', help="a run's --output-dir")
  parser.add_argument('--out', metavar='PATH', help=f'the page (default OUTPUT_DIR/{REPORT_NAME})')
  parser.add_argument('--serve', metavar='HOST:PORT',
                      help='then serve the metrics at /metrics and the page at / until stopped')
  args = parser.parse_args(argv)
  if args.serve is not None:
    host, sep, port = args.serve.rpartition(':')
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
      parser.error(f'--serve: HOST:PORT expected, got {args.serve!r}')
  server = None
  if args.serve is not None:  # listening first: a taken port stops it before it writes
    try:
      server = start_server(lambda: args.output_dir, args.serve)
    except OSError as e:
      print(f'tidemark: error: --serve: cannot listen on {args.serve}: {e.strerror or e}',
            file=sys.stderr)
      return 2
  try:
    page, textfile = write(args.output_dir, args.out)
  except (NotARunFolder, UnreadableOutput, OSError) as e:
    if isinstance(e, OSError):
      print(f'tidemark: error: cannot write the report: {e.filename or ""}: {e.strerror or e}'
            + ('' if args.out else ' (--out PATH writes it elsewhere)'), file=sys.stderr)
    else:
      print(f'tidemark: error: {e}', file=sys.stderr)
    if server is not None:
      server.shutdown()
      server.server_close()
    return 2
  print(f'report: {page}\nmetrics: {textfile}', flush=True)
  if server is not None:
    serve(args.output_dir, args.serve, server)
  return 0
