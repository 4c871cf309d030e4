#!/usr/bin/env python3
"""Open table formats against the same syncs: Delta Lake (delta-rs) and Apache Iceberg
(pyiceberg) doing the jobs of sluice's snapshots (issue 20), beside DuckDB's reference jobs.

    python3 -m venv /root/.cache/table-formats-venv
    /root/.cache/table-formats-venv/bin/pip install deltalake==1.6.6 \\
        'pyiceberg[pyarrow,sql-sqlite]==0.12.0' pyarrow==26.0.1 duckdb==2.0.0
    /root/.cache/table-formats-venv/bin/python benches/table_formats.py \\
        --rows 100000 --rounds 1 --workdir /tmp/table-formats

Mind the scale before a large run: at 20K-200K rows Delta's second sync (MERGE with a
matched-update condition, change data feed on) took about 120 us and 8.5 KB of RSS per row, and
pyiceberg's `upsert` about 100 us per row, both growing linearly; at the default 10M rows that
would be tens of minutes and, for Delta, far more memory than 24 GiB. `--formats` picks the
formats to run; try 1M first.

The data is the one of `benches/sync_vs_duckdb.rs`: version 1 of the 11-column `users` model
with `rows` rows, and version 2 with 2% of rows updated (`id % 50 = 0`: plan `upgraded` and
`updated_at` a day later), 1% deleted (`id % 100 = 7`) and 1% added. The files that bench
caches (`target/bench-data/sync/<rows>/v1.parquet`, `v2.parquet`) are used when present
(`--data DIR` names another folder holding them); otherwise they are made here with the same
DuckDB SQL, under `<workdir>/data/<rows>/`.

Each round runs, each job as its own process (wall time, CPU time and peak RSS from `os.wait4`
of that process; "in-proc s" is the job's own work after its imports):

- `delta first`: `write_deltalake` of version 1 (streamed from a pyarrow dataset reader) into a
  new Delta table with the change data feed on;
- `delta second`: `MERGE` of version 2 on `id` (update when any other column is distinct, insert
  when not matched, delete when not matched by source), then `load_cdf` of that version written
  to one Parquet file with an `op` column (added/updated/deleted; deleted rows with their last
  values), the same job as sluice's second sync (`--delta-cdf off`: a table without the change
  data feed, whose second sync finds the changes by diffing the scans of the two versions);
- `delta lookup`: one (updated) id read from version 0 and from version 1 (time travel);
- `iceberg first` / `second` / `lookup`: the same with pyiceberg, a local SQLite catalog and a
  local warehouse. pyiceberg has no MERGE and no changelog scan: the second sync is a delete of
  the ids missing from version 2 plus `upsert` (in one transaction), and its changes are found
  by diffing the scans of the two snapshots (the full outer join DuckDB runs below);
- `duckdb copy` / `duckdb changes`: the reference jobs of `sync_vs_duckdb.rs` (copy version 1
  Parquet to Parquet; full outer join on `id` with a hash of the other columns, written to one
  Parquet file).

Every job's counts are checked against the changes made (the script exits non-zero when one
disagrees). For each second sync the table's own record says what the new version stored:
Delta's `_delta_log` add/remove/cdc actions, Iceberg's snapshot summaries.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

DUCKDB_VERSION = "2.0.0"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["id", "email", "first_name", "last_name", "plan", "country", "lifetime_value",
           "lead_score", "is_active", "created_at", "updated_at"]
OTHERS = COLUMNS[1:]
BATCH = 65_536


def duckdb_users(first, last):
    """The `users` columns in DuckDB's dialect over range(first, last + 1) (as sync_vs_duckdb.rs)."""
    return f"""SELECT
            g::BIGINT AS id,
            'user' || g || '@example.com' AS email,
            (['Ada','Grace','Linus','Ken','Barbara'])[1 + g % 5] AS first_name,
            'Last' || (g % 1000) AS last_name,
            (['free','starter','pro','enterprise'])[1 + g % 4] AS plan,
            (['US','DE','FR','GB','JP','BR'])[1 + g % 6] AS country,
            (g % 10000) / 7.0::DOUBLE AS lifetime_value,
            (g % 100)::INTEGER AS lead_score,
            g % 3 <> 0 AS is_active,
            TIMESTAMP '2020-01-01' + g * INTERVAL 1 SECOND AS created_at,
            TIMESTAMPTZ '2024-01-01 00:00:00+00' + g * INTERVAL 1 SECOND AS updated_at
         FROM range({first}, {last} + 1) t(g)"""


def expected_changes(rows):
    """Added, updated and deleted rows from version 1 to version 2."""
    return rows // 100, rows // 50, (rows + 93) // 100


def lookup_id(rows):
    """An id in the middle of the table that version 2 updated (id % 50 = 0)."""
    return max(50, (rows // 2) // 50 * 50)


# ---------------------------------------------------------------------------------------------
# Jobs: each runs in its own process (`--job NAME --params JSON`) and prints one JSON line.
# ---------------------------------------------------------------------------------------------

T0 = None


def start_clock():
    global T0
    T0 = time.perf_counter()


def dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def changes_sql(old, new, out):
    """sync_vs_duckdb.rs's change query, over relations `old` and `new`."""
    hash_ = f"hash({', '.join(OTHERS)})"
    values = ", ".join(f"CASE WHEN n.id IS NULL THEN o.{c} ELSE n.{c} END AS {c}" for c in COLUMNS)
    return f"""COPY (
            SELECT CASE WHEN o.id IS NULL THEN 'added' WHEN n.id IS NULL THEN 'deleted' ELSE 'updated' END AS op,
                   {values}
            FROM (SELECT *, {hash_} AS h FROM {new}) n
            FULL OUTER JOIN (SELECT *, {hash_} AS h FROM {old}) o ON n.id = o.id
            WHERE n.h IS DISTINCT FROM o.h
         ) TO '{out}' (FORMAT parquet)"""


def count_ops(con, out):
    row = con.execute(f"""SELECT count(*) FILTER (op = 'added'), count(*) FILTER (op = 'updated'),
        count(*) FILTER (op = 'deleted') FROM read_parquet('{out}')""").fetchone()
    return list(row)


def job_generate(p):
    import duckdb
    v1, v2, rows = p["v1"], p["v2"], p["rows"]
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    start_clock()
    con.execute(f"COPY ({duckdb_users(1, rows)}) TO '{v1}' (FORMAT parquet)")
    con.execute(f"""COPY (
            SELECT id, email, first_name, last_name,
                   CASE WHEN id % 50 = 0 THEN 'upgraded' ELSE plan END AS plan,
                   country, lifetime_value, lead_score, is_active, created_at,
                   CASE WHEN id % 50 = 0 THEN updated_at + INTERVAL 1 DAY ELSE updated_at END AS updated_at
            FROM read_parquet('{v1}') WHERE id % 100 <> 7
            UNION ALL {duckdb_users(rows + 1, rows + rows // 100)}
         ) TO '{v2}' (FORMAT parquet)""")
    return {}


def job_duckdb_copy(p):
    import duckdb
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    start_clock()
    con.execute(f"COPY (SELECT * FROM read_parquet('{p['v1']}')) TO '{p['out']}' (FORMAT parquet)")
    n = con.execute(f"SELECT count(*) FROM read_parquet('{p['out']}')").fetchone()[0]
    return {"counts": [n, 0, 0]}


def job_duckdb_changes(p):
    import duckdb
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    start_clock()
    con.execute(changes_sql(f"read_parquet('{p['v1']}')", f"read_parquet('{p['v2']}')", p["out"]))
    return {"counts": count_ops(con, p["out"])}


def source_reader(path):
    """A streaming reader over a Parquet file (never the whole file in memory)."""
    import pyarrow.dataset as ds
    return ds.dataset(path, format="parquet").scanner(batch_size=BATCH).to_reader()


def delta_log_version(table, version):
    """What one commit of a Delta table did, from its `_delta_log` JSON: its actions."""
    actions = {"add": [0, 0, 0], "remove": [0, 0], "cdc": [0, 0]}
    operation = None
    with open(os.path.join(table, "_delta_log", f"{version:020d}.json")) as f:
        for line in f:
            a = json.loads(line)
            if "add" in a:
                stats = json.loads(a["add"].get("stats") or "{}")
                actions["add"][0] += 1
                actions["add"][1] += a["add"]["size"]
                actions["add"][2] += stats.get("numRecords", 0)
            elif "remove" in a:
                actions["remove"][0] += 1
                actions["remove"][1] += a["remove"].get("size") or 0
            elif "cdc" in a:
                actions["cdc"][0] += 1
                actions["cdc"][1] += a["cdc"]["size"]
            elif "commitInfo" in a:
                operation = a["commitInfo"].get("operation")
            elif "protocol" in a:
                actions["protocol"] = a["protocol"]
    actions["operation"] = operation
    return actions


def job_delta_first(p):
    from deltalake import write_deltalake
    import deltalake
    start_clock()
    config = {"delta.enableChangeDataFeed": "true"} if p["cdf"] else None
    write_deltalake(p["table"], source_reader(p["v1"]), mode="error", configuration=config)
    log = delta_log_version(p["table"], 0)
    return {"counts": [log["add"][2], 0, 0], "version": deltalake.__version__,
            "detail": f"v0: {log['add'][0]} files, {log['add'][1]:,} B; "
                      f"protocol {log.get('protocol')}"}


def job_delta_second(p):
    from deltalake import DeltaTable
    start_clock()
    dt = DeltaTable(p["table"])
    # Parenthesised: delta-rs parses `a IS DISTINCT FROM b OR c` as `a IS DISTINCT FROM (b OR c)`.
    changed = " OR ".join(f"(s.{c} IS DISTINCT FROM t.{c})" for c in OTHERS)
    metrics = (
        dt.merge(source_reader(p["v2"]), "t.id = s.id", source_alias="s", target_alias="t")
        .when_matched_update_all(predicate=changed)
        .when_not_matched_insert_all()
        .when_not_matched_by_source_delete()
        .execute()
    )
    version = dt.version()
    merged = time.perf_counter() - T0
    if p["cdf"]:
        counts = delta_cdf_changes(dt, version, p)
    else:
        # Without the change data feed: the diff of the two versions' scans, as for Iceberg.
        import duckdb
        con = duckdb.connect()
        con.execute("SET enable_progress_bar = false")
        import pyarrow as pa
        con.register("old_scan", pa.RecordBatchReader.from_stream(
            DeltaTable(p["table"], version=version - 1).scan()))
        con.register("new_scan", pa.RecordBatchReader.from_stream(dt.scan()))
        con.execute(changes_sql("old_scan", "new_scan", p["out"]))
        counts = dict(zip(("added", "updated", "deleted"), count_ops(con, p["out"])))
    log = delta_log_version(p["table"], version)
    detail = (f"merge {merged:.2f} s + {'cdf' if p['cdf'] else 'diff of scans'} "
              f"{time.perf_counter() - T0 - merged:.2f} s; v{version} "
              f"({log['operation']}): add {log['add'][0]} files {log['add'][1]:,} B "
              f"({log['add'][2]:,} rows), remove {log['remove'][0]} files {log['remove'][1]:,} B, "
              f"cdc {log['cdc'][0]} files {log['cdc'][1]:,} B; merge metrics: "
              f"{ {k: v for k, v in metrics.items() if k.startswith('num_target')} }")
    return {"counts": [counts["added"], counts["updated"], counts["deleted"]], "detail": detail,
            "metrics": metrics, "log": log}


def delta_cdf_changes(dt, version, p):
    """The change data feed of `version` written to one Parquet file with an `op` column."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    cdf = pa.RecordBatchReader.from_stream(dt.load_cdf(starting_version=version, ending_version=version))
    ops = {"insert": "added", "update_postimage": "updated", "delete": "deleted"}
    counts = {"added": 0, "updated": 0, "deleted": 0}
    # The file is written with the source's types (the CDF has DataFusion's string views).
    source = pq.read_schema(p["v2"])
    schema = pa.schema([pa.field("op", pa.string())] + [source.field(c) for c in COLUMNS])
    with pq.ParquetWriter(p["out"], schema) as writer:
        for batch in cdf:
            # (pyarrow cannot filter string views: cast first.)
            kind = batch.column("_change_type").cast(pa.string())
            keep = pc.not_equal(kind, "update_preimage")
            kind = kind.filter(keep)
            if len(kind) == 0:
                continue
            op = pa.array([ops[k] for k in kind.to_pylist()], pa.string())
            for name, n in zip(*[v.to_pylist() for v in pc.value_counts(op).flatten()]):
                counts[name] += n
            writer.write_batch(pa.RecordBatch.from_arrays(
                [op] + [batch.column(c).cast(schema.field(c).type).filter(keep) for c in COLUMNS],
                schema=schema))
    return counts


def job_delta_lookup(p):
    import pyarrow as pa
    from deltalake import DeltaTable
    start_clock()
    out = []
    for version in (0, None):
        dt = DeltaTable(p["table"], version=version) if version is not None else DeltaTable(p["table"])
        rows = pa.RecordBatchReader.from_stream(dt.scan(predicate=f"id = {p['id']}")).read_all()
        out.append(rows.column("plan").to_pylist())
    return {"found": out}


def iceberg_catalog(warehouse):
    from pyiceberg.catalog.sql import SqlCatalog
    return SqlCatalog("bench", uri=f"sqlite:///{warehouse}/catalog.db", warehouse=f"file://{warehouse}")


def iceberg_summaries(table, after):
    """Summaries of the snapshots committed after snapshot `after` (oldest first)."""
    snaps = table.snapshots()
    ids = [s.snapshot_id for s in snaps]
    newer = snaps[ids.index(after) + 1:]
    out = []
    for s in newer:
        props = s.summary.additional_properties if s.summary else {}
        out.append({"operation": str(s.summary.operation.value) if s.summary else None, **props})
    return out


def job_iceberg_first(p):
    import pyiceberg
    os.makedirs(p["warehouse"], exist_ok=True)
    start_clock()
    catalog = iceberg_catalog(p["warehouse"])
    catalog.create_namespace("bench")
    reader = source_reader(p["v1"])
    table = catalog.create_table("bench.users", schema=reader.schema)
    table.append(reader)
    snap = table.current_snapshot()
    props = snap.summary.additional_properties
    return {"counts": [int(props["total-records"]), 0, 0], "version": pyiceberg.__version__,
            "snapshot": snap.snapshot_id,
            "detail": f"snapshot {snap.snapshot_id}: {props.get('added-data-files')} files, "
                      f"{int(props.get('added-files-size', 0)):,} B"}


def job_iceberg_second(p):
    import duckdb
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from pyiceberg.expressions import In
    start_clock()
    table = iceberg_catalog(p["warehouse"]).load_table("bench.users")
    base = table.current_snapshot().snapshot_id
    # upsert takes a whole pyarrow Table: version 2 is read into memory.
    new = pq.read_table(p["v2"])
    old_ids = table.scan(selected_fields=("id",)).to_arrow().column("id")
    gone = pc.filter(old_ids, pc.invert(pc.is_in(old_ids, value_set=new.column("id"))))
    with table.transaction() as tx:
        if len(gone):
            tx.delete(delete_filter=In("id", gone.to_pylist()))
        result = tx.upsert(new, join_cols=["id"])
    table = table.refresh()
    written = time.perf_counter() - T0
    # No changelog scan in pyiceberg: the changes are the diff of the two snapshots' scans.
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    old_scan = table.scan(snapshot_id=base).to_arrow_batch_reader()
    new_scan = table.scan().to_arrow_batch_reader()
    con.register("old_scan", old_scan)
    con.register("new_scan", new_scan)
    con.execute(changes_sql("old_scan", "new_scan", p["out"]))
    counts = count_ops(con, p["out"])
    sums = iceberg_summaries(table, base)
    agg = {k: sum(int(s.get(k, 0)) for s in sums) for k in
           ("added-data-files", "deleted-data-files", "added-files-size", "removed-files-size",
            "added-records", "deleted-records")}
    detail = (f"delete+upsert {written:.2f} s + diff of scans {time.perf_counter() - T0 - written:.2f} s; "
              f"{len(sums)} snapshots ({', '.join(s['operation'] for s in sums)}): "
              f"add {agg['added-data-files']} files {agg['added-files-size']:,} B "
              f"({agg['added-records']:,} rows), remove {agg['deleted-data-files']} files "
              f"{agg['removed-files-size']:,} B ({agg['deleted-records']:,} rows); upsert said "
              f"updated {result.rows_updated:,} inserted {result.rows_inserted:,}; "
              f"delete {len(gone):,} ids")
    return {"counts": counts, "detail": detail, "base": base,
            "snapshot": table.current_snapshot().snapshot_id, "summaries": sums}


def job_iceberg_lookup(p):
    from pyiceberg.expressions import EqualTo
    start_clock()
    table = iceberg_catalog(p["warehouse"]).load_table("bench.users")
    out = []
    for snap in (p["base"], None):
        scan = table.scan(row_filter=EqualTo("id", p["id"]), selected_fields=("id", "plan"),
                          snapshot_id=snap)
        out.append(scan.to_arrow().column("plan").to_pylist())
    return {"found": out}


JOBS = {
    "generate": job_generate,
    "duckdb copy": job_duckdb_copy,
    "duckdb changes": job_duckdb_changes,
    "delta first": job_delta_first,
    "delta second": job_delta_second,
    "delta lookup": job_delta_lookup,
    "iceberg first": job_iceberg_first,
    "iceberg second": job_iceberg_second,
    "iceberg lookup": job_iceberg_lookup,
}


def child(name, params):
    result = JOBS[name](json.loads(params)) or {}
    result["seconds"] = time.perf_counter() - T0
    print(json.dumps(result, default=str))


# ---------------------------------------------------------------------------------------------
# The parent: runs each job as a process and measures it.
# ---------------------------------------------------------------------------------------------

def measure(name, params):
    """Runs job `name` in a fresh process: its JSON result plus wall, CPU s and peak RSS."""
    argv = [sys.executable, os.path.abspath(__file__), "--job", name, "--params", json.dumps(params)]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"job `{name}` failed (status {status})")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(job=name, wall=wall, cpu=usage.ru_utime + usage.ru_stime,
                  rss_mib=usage.ru_maxrss / 1024)
    return result


def data_files(args, rows):
    """Version 1 and 2 as Parquet: sync_vs_duckdb.rs's cached files, else made here."""
    import pyarrow.parquet as pq
    for folder in (args.data, os.path.join(REPO, "target", "bench-data", "sync", str(rows))):
        if folder and all(os.path.exists(os.path.join(folder, f)) for f in ("v1.parquet", "v2.parquet")):
            v1, v2 = os.path.join(folder, "v1.parquet"), os.path.join(folder, "v2.parquet")
            if pq.ParquetFile(v1).metadata.num_rows == rows:
                print(f"using {v1} and {v2}", file=sys.stderr)
                return v1, v2
            print(f"{v1} has not {rows} rows; not used", file=sys.stderr)
    folder = os.path.join(args.workdir, "data", str(rows))
    v1, v2 = os.path.join(folder, "v1.parquet"), os.path.join(folder, "v2.parquet")
    if not os.path.exists(os.path.join(folder, "generated")):
        os.makedirs(folder, exist_ok=True)
        r = measure("generate", {"v1": v1, "v2": v2, "rows": rows})
        with open(os.path.join(folder, "generated"), "w") as f:
            f.write(str(rows))
        print(f"generated {v1} and {v2} in {r['wall']:.1f} s", file=sys.stderr)
    return v1, v2


def file_bytes(path):
    if path is None or not os.path.exists(path):
        return None
    return dir_bytes(path) if os.path.isdir(path) else os.path.getsize(path)


def run_round(rows, v1, v2, work, formats, expect, cdf):
    """One round: every format's first sync, second sync and lookup, from empty state."""
    out = []
    key = lookup_id(rows)
    for fmt in formats:
        state = os.path.join(work, fmt)
        shutil.rmtree(state, ignore_errors=True)
        os.makedirs(state)
        changes = os.path.join(work, f"{fmt}-changes.parquet")
        if fmt == "duckdb":
            copy = os.path.join(state, "copy.parquet")
            steps = [("duckdb copy", {"v1": v1, "out": copy}, copy, None, (rows, 0, 0)),
                     ("duckdb changes", {"v1": v1, "v2": v2, "out": changes}, None, changes, expect)]
        elif fmt == "delta":
            table = os.path.join(state, "users")
            steps = [("delta first", {"v1": v1, "table": table, "cdf": cdf}, table, None, (rows, 0, 0)),
                     ("delta second", {"v2": v2, "table": table, "out": changes, "cdf": cdf}, table,
                      changes, expect),
                     ("delta lookup", {"table": table, "id": key}, None, None, None)]
        else:
            steps = [("iceberg first", {"v1": v1, "warehouse": state}, state, None, (rows, 0, 0)),
                     ("iceberg second", {"v2": v2, "warehouse": state, "out": changes}, state, changes, expect),
                     ("iceberg lookup", {"warehouse": state, "id": key}, None, None, None)]
        base = None
        for name, params, state_path, out_path, want in steps:
            if name == "iceberg lookup":
                params["base"] = base
            r = measure(name, params)
            base = r.get("base", base)
            r["state_bytes"] = file_bytes(state_path)
            r["out_bytes"] = file_bytes(out_path)
            if want is not None:
                r["ok"] = tuple(r["counts"]) == tuple(want)
                r["want"] = list(want)
            else:
                # The looked-up id was updated: an old plan in version 0, `upgraded` after.
                found = r["found"]
                r["ok"] = (len(found[0]) == 1 and found[0][0] != "upgraded" and found[1] == ["upgraded"])
                r["counts"] = found
            out.append(r)
            print_row(rows, r)
            if out_path and os.path.exists(out_path):
                os.remove(out_path)
        shutil.rmtree(state, ignore_errors=True)
    return out


def fmt_bytes(b):
    return "" if b is None else f"{b / 2**20:,.1f} MiB"


def print_row(rows, r):
    flag = "ok" if r["ok"] else f"MISMATCH (want {r.get('want')})"
    print(f"| {rows:,} | {r['job']} | {r['wall']:.2f} | {r['seconds']:.2f} | {r['cpu']:.2f} | "
          f"{r['rss_mib']:.0f} | {fmt_bytes(r['state_bytes'])} | {fmt_bytes(r['out_bytes'])} | "
          f"{r['counts']} {flag} | {r.get('detail', '')} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=lambda s: int(s.replace("_", "")), default=10_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", default=os.path.join(REPO, "target", "bench-data", "table-formats"))
    parser.add_argument("--data", help="a folder with v1.parquet and v2.parquet for --rows "
                        "(default: sync_vs_duckdb.rs's target/bench-data/sync/<rows>/)")
    parser.add_argument("--formats", nargs="+", default=["delta", "iceberg", "duckdb"],
                        choices=["delta", "iceberg", "duckdb"])
    parser.add_argument("--delta-cdf", choices=["on", "off"], default="on",
                        help="off: a Delta table without the change data feed; its second sync "
                        "finds the changes by diffing the scans of the two versions")
    parser.add_argument("--json", help="write every measurement to this file")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        return child(args.job, args.params)

    import deltalake
    import duckdb
    import pyarrow
    import pyiceberg
    versions = {"deltalake": deltalake.__version__, "pyiceberg": pyiceberg.__version__,
                "pyarrow": pyarrow.__version__, "duckdb": duckdb.__version__,
                "python": sys.version.split()[0]}
    if duckdb.__version__ != DUCKDB_VERSION:
        print(f"note: duckdb {duckdb.__version__}, the Rust bench uses {DUCKDB_VERSION}", file=sys.stderr)
    args.workdir = os.path.abspath(args.workdir)
    work = os.path.join(args.workdir, str(args.rows))
    os.makedirs(work, exist_ok=True)
    v1, v2 = data_files(args, args.rows)
    expect = expected_changes(args.rows)
    print(f"{args.rows:,} rows; versions: {versions}; expected changes (added, updated, deleted): "
          f"{expect}; lookup id {lookup_id(args.rows)}\n")
    print("| rows | job | wall s | in-proc s | CPU s | peak RSS MiB | table on disk | changes file | "
          "counts | detail |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|---|")
    results = []
    for i in range(args.rounds):
        # Alternate the order so machine noise and page cache hit every format alike.
        formats = args.formats[i % len(args.formats):] + args.formats[:i % len(args.formats)]
        results += run_round(args.rows, v1, v2, work, formats, expect, args.delta_cdf == "on")
    if args.rounds > 1:
        print("\n| job | wall s (median) | in-proc s (median) | CPU s (median) | peak RSS MiB (max) |")
        print("|---|---:|---:|---:|---:|")
        for job in dict.fromkeys(r["job"] for r in results):
            rs = [r for r in results if r["job"] == job]
            print(f"| {job} | {statistics.median(r['wall'] for r in rs):.2f} | "
                  f"{statistics.median(r['seconds'] for r in rs):.2f} | "
                  f"{statistics.median(r['cpu'] for r in rs):.2f} | {max(r['rss_mib'] for r in rs):.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": args.rows, "versions": versions, "results": results}, f, indent=2,
                      default=str)
    bad = [r["job"] for r in results if not r["ok"]]
    if bad:
        raise SystemExit(f"counts disagree with the changes made: {bad}")


if __name__ == "__main__":
    main()
