"""Tidemark: exact event-time stream aggregation on Apache Beam."""

import setuptools

setuptools.setup(
    name='tidemark',
    version='0.1.0',
    description='Windowed event-time aggregation where every event is accounted for.',
    packages=setuptools.find_packages(include=['pipeline', 'pipeline.*', 'transforms',
                                               'transforms.*']),
    package_data={'pipeline': ['data/*.jsonl'], 'pipeline.deployment': ['customer.schema.json']},
    python_requires='>=3.10',
    install_requires=[
        # Pinned to the version whose Java jars (Kafka expansion service, Flink
        # job server) are staged by scripts/; see README "Versions".
        'apache-beam[gcp]==2.62.0',
        'google-cloud-pubsub>=2.18,<3',
        'jsonschema>=4.18,<5',
        'confluent-kafka>=2.3,<3',  # the simulator's Kafka producer
        'msgspec>=0.18,<1',
        # PostgreSQL sink; the binary wheel brings its own libpq.
        'psycopg[binary]>=3.1,<4',
        'PyYAML>=6,<7',
        'rich>=13,<15',
        # The run report's charts (static SVG) and its Prometheus metrics.
        'matplotlib>=3.7,<4',
        'prometheus-client>=0.17,<1',
    ],
    extras_require={
        'test': ['pytest>=8', 'hypothesis>=6.100', 'confluent-kafka>=2.3,<3', 'ruff>=0.6,<1',
                 'mypy>=1.10,<3',
                 # what an operator loads dead letters with: DuckDB and jq (libjq)
                 'duckdb>=1.1,<3', 'jq>=1.6,<2'],
        # `python -m tools bench stream --py-spy PATH` profiles the SDK worker.
        'bench': ['py-spy>=0.3.14'],
    },
    entry_points={'console_scripts': ['tidemark=pipeline.__main__:main']},
)
