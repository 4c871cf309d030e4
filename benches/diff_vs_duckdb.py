#!/usr/bin/env python3
"""Side-by-side diff benchmark: sluice's DataFusion diff against DuckDB on the same files.

    python3 benches/diff_vs_duckdb.py --rows 1000000 10000000 --repeat 3

Generates (once, cached under target/bench-data) an old and a new snapshot of the 11-column
`users` model with sluice's own snapshot writer: the new one has 2% of rows updated, 1% deleted
and 1% added, shuffled. Then, alternating in one run so machine noise hits both alike, it times:

- sluice: `benches/diff.rs diff`, from the two committed snapshots to the classified change rows
  (keys, op, hashes) held in memory, with counts;
- DuckDB, over the very same Parquet files, in three formulations of the same full outer join:
  `hash_counts` (compare the stored row hashes, count only), `hash_changes` (compare hashes,
  materialise the classified change rows into a table, then count) and `columns` (compare every
  non-key column, materialised).

Each engine runs in its own process; wall seconds are measured around the diff inside the
process, CPU seconds and peak RSS for the whole process (os.wait4). DuckDB is installed from PyPI
when missing.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

DUCKDB_VERSION = "2.0.0"

DUCKDB_SCRIPT = r"""
import json, sys, time, duckdb
new_glob, old_glob, formulation, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
con = duckdb.connect()
con.execute(f"SET threads = {threads}")
cols = ["email", "first_name", "last_name", "plan", "country", "lifetime_value", "lead_score",
        "is_active", "created_at", "updated_at"]
started = time.perf_counter()
if formulation == "hash_counts":
    row = con.execute(f'''
        SELECT count(*) FILTER (WHERE o.id IS NULL),
               count(*) FILTER (WHERE n.id IS NOT NULL AND o.id IS NOT NULL),
               count(*) FILTER (WHERE n.id IS NULL)
        FROM read_parquet('{new_glob}') n FULL OUTER JOIN read_parquet('{old_glob}') o ON n.id = o.id
        WHERE n.__sluice_row_hash IS DISTINCT FROM o.__sluice_row_hash''').fetchone()
else:
    if formulation == "hash_changes":
        changed = "n.__sluice_row_hash IS DISTINCT FROM o.__sluice_row_hash"
        extra = ", n.__sluice_row_hash AS new_hash, o.__sluice_row_hash AS base_hash"
    else:
        changed = " OR ".join(f"n.{c} IS DISTINCT FROM o.{c}" for c in cols) + " OR n.id IS NULL OR o.id IS NULL"
        extra = ""
    con.execute(f'''
        CREATE TEMP TABLE changes AS
        SELECT coalesce(n.id, o.id) AS id,
               CASE WHEN o.id IS NULL THEN 1 WHEN n.id IS NULL THEN 3 ELSE 2 END AS op {extra}
        FROM read_parquet('{new_glob}') n FULL OUTER JOIN read_parquet('{old_glob}') o ON n.id = o.id
        WHERE {changed}''')
    counts = dict(con.execute("SELECT op, count(*) FROM changes GROUP BY op").fetchall())
    row = (counts.get(1, 0), counts.get(2, 0), counts.get(3, 0))
seconds = time.perf_counter() - started
print(json.dumps({"engine": "duckdb-" + formulation, "added": row[0], "updated": row[1],
                  "deleted": row[2], "seconds": seconds, "version": duckdb.__version__}))
"""


def ensure_duckdb():
    try:
        import duckdb  # noqa: F401
    except ImportError:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", f"duckdb=={DUCKDB_VERSION}"])


def bench_binary():
    out = subprocess.check_output(
        ["cargo", "bench", "--bench", "diff", "--no-run", "--message-format=json"], text=True
    )
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "diff" and msg.get("executable"):
            return msg["executable"]
    raise SystemExit("could not find the diff bench executable")


def measure(argv):
    """Runs argv; returns its JSON output plus CPU seconds and peak RSS of the process."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"{argv[0]} failed with status {status}")
    result = json.loads(out.strip().splitlines()[-1])
    result["process_wall"] = wall
    result["cpu"] = usage.ru_utime + usage.ru_stime
    result["rss_mib"] = usage.ru_maxrss / 1024
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--data", default="target/bench-data")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--formulations", nargs="+", default=["hash_counts", "hash_changes", "columns"])
    args = parser.parse_args()

    ensure_duckdb()
    binary = bench_binary()
    report = []
    for rows in args.rows:
        subprocess.check_call([binary, "generate", "--rows", str(rows), "--dir", args.data])
        data = os.path.join(args.data, str(rows))
        pair = json.load(open(os.path.join(data, "pair.json")))
        new_glob = f"{data}/models/new/snapshots/{pair['new']}/*.parquet"
        old_glob = f"{data}/models/old/snapshots/{pair['old']}/*.parquet"
        runs = {}
        for _ in range(args.repeat):
            candidates = [("sluice", [binary, "diff", "--dir", data])]
            candidates += [
                (f"duckdb-{f}", [sys.executable, "-c", DUCKDB_SCRIPT, new_glob, old_glob, f, str(args.threads)])
                for f in args.formulations
            ]
            for name, argv in candidates:
                runs.setdefault(name, []).append(measure(argv))
        counts = {name: (r[0]["added"], r[0]["updated"], r[0]["deleted"]) for name, r in runs.items()}
        if len(set(counts.values())) != 1:
            raise SystemExit(f"engines disagree on the classified counts: {counts}")
        sluice_s = statistics.median(r["seconds"] for r in runs["sluice"])
        fastest_duck = min(
            (statistics.median(r["seconds"] for r in v), k) for k, v in runs.items() if k.startswith("duckdb")
        )
        print(f"\n## {rows:,} rows: added {counts['sluice'][0]:,}, updated {counts['sluice'][1]:,}, deleted {counts['sluice'][2]:,}")
        print("| engine | wall s (median) | CPU s | peak RSS MiB | rows/s | vs sluice |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, results in runs.items():
            wall = statistics.median(r["seconds"] for r in results)
            cpu = statistics.median(r["cpu"] for r in results)
            rss = max(r["rss_mib"] for r in results)
            total_rows = 2 * rows  # both snapshots are read
            print(f"| {name} | {wall:.3f} | {cpu:.2f} | {rss:.0f} | {total_rows / wall / 1e6:.1f} M | {wall / sluice_s:.2f}x |")
        print(f"\nsluice vs DuckDB's fastest ({fastest_duck[1]}): {fastest_duck[0] / sluice_s:.2f}x faster")
        report.append({"rows": rows, "runs": runs})
    json.dump(report, open(os.path.join(args.data, "diff-report.json"), "w"), indent=2)


if __name__ == "__main__":
    main()
