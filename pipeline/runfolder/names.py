"""The files of a run folder by name: the contract's three and what a run writes
beside them. The one list: the settings, the commit, the read-back and the
report all take the names from here."""

AGGREGATES = 'aggregates.jsonl'
DEAD_LETTERS = 'dead_letter.jsonl'
ACCOUNTING = 'accounting.json'
DUPLICATES = 'duplicates.jsonl'
REFUSED = 'refused.jsonl'
MEMORY = 'memory.jsonl'
RECONCILIATION = 'reconciliation.json'
#: What a bulk replay delivered per source and how late its late events were.
ARRIVALS = 'arrivals.json'
SQLITE = 'aggregates.sqlite'
REPORT = 'report.html'
METRICS = 'metrics.prom'
#: The manifest of a run, in OUTPUT_DIR and in each staging folder.
MANIFEST = 'run.json'
#: A rollup's folder inside OUTPUT_DIR (the same file names inside).
ROLLUP_DIR = 'rollup-{size}s'

#: The folder of a run's restatements: one audit per restated range.
RESTATED_DIR = 'restated'
#: A restatement's audit inside RESTATED_DIR, named by its range.
RESTATEMENT = '{start}_{end}.json'
#: Every folder a run owns inside OUTPUT_DIR (a new run into it replaces them).
OWNED_FOLDERS = r'rollup-[0-9]+s|' + RESTATED_DIR

#: Every file a run may write into its folder (and each rollup's), run.json aside.
OUTPUT_FILES = (AGGREGATES, DEAD_LETTERS, ACCOUNTING, MEMORY, REFUSED, DUPLICATES,
                RECONCILIATION, ARRIVALS, SQLITE, REPORT, METRICS)
