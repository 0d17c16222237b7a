"""A preprocessing pipeline on Apache Beam: the exact mean and variance of
every feature over the whole data set (normserve's exact statistics), then
every row normalized with them. `tests/beam` runs `normalize_features` on
the DirectRunner with several worker processes.

    pip install 'normserve[beam]'       # or: scripts/beam-env.sh --python
    python examples/beam/normalize_features.py --address 127.0.0.1:50051 \\
        --session features-v1 --input rows.csv --output normalized \\
        --direct_num_workers 4 --direct_running_mode multi_processing

rows.csv: one row of numbers per line (comma-separated). Writes
`normalized-*` (each input line, then its normalized values) and prints
the statistics. Any Beam pipeline option (--runner, ...) is passed on.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

try:
    from normserve import beam as nsbeam
except ImportError:  # run from a checkout without installing the client
    CLIENT_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "clients", "python"))
    sys.path.insert(0, CLIENT_DIR)
    # Local worker processes (the DirectRunner's multi_processing mode) too.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [CLIENT_DIR, os.environ.get("PYTHONPATH")]))
    from normserve import beam as nsbeam


def normalize_features(keyed_rows: Any, session: str, server: nsbeam.Server, *, num_features: int,
                       dtype: str = "float64", eps: float = 1e-5, batch_size: int = 1024) -> tuple[Any, Any]:
    """The train pass over a PCollection of (key, row) pairs into the exact
    session `session` (created if needed), then the eval pass: returns the
    PCollection of its one `Statistics` and the (key, normalized row) pairs."""
    rows = keyed_rows | "Values" >> beam.Values()
    statistics = rows | "ComputeStatistics" >> nsbeam.ComputeStatistics(
        session, server, num_features=num_features, dtype=dtype, eps=eps, batch_size=batch_size)
    normalized = keyed_rows | "Normalize" >> nsbeam.Normalize(
        session, server, statistics=statistics, keyed=True, batch_size=batch_size)
    return statistics, normalized


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True, help="the normserve server, host:port")
    parser.add_argument("--session", required=True, help="the exact session to create or add to")
    parser.add_argument("--input", required=True, help="CSV file, one row of numbers per line")
    parser.add_argument("--output", required=True, help="prefix of the output files")
    parser.add_argument("--num-features", type=int, required=True)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    args, beam_args = parser.parse_known_args(argv)
    server = nsbeam.Server(args.address)
    with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
        lines = p | "Read" >> beam.io.ReadFromText(args.input)
        keyed = lines | "Parse" >> beam.Map(lambda line: (line, np.array(line.split(","), dtype=np.float64)))
        statistics, normalized = normalize_features(keyed, args.session, server,
                                                    num_features=args.num_features, dtype=args.dtype)
        _ = statistics | "Print" >> beam.Map(
            lambda s: print(f"{s.session_id}: n = {s.n_samples_seen}\n  mean = {s.running_mean.tolist()}\n"
                            f"  var (unbiased) = {s.running_var.tolist()}"))
        _ = (normalized
             | "Format" >> beam.MapTuple(lambda line, y: f"{line} -> {','.join(repr(float(v)) for v in y)}")
             | "Write" >> beam.io.WriteToText(args.output))


if __name__ == "__main__":
    main()
