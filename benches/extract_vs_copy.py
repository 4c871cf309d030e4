#!/usr/bin/env python3
"""Extraction benchmark: a database table into a committed sluice snapshot, against the floor for
reading the same rows out of the same server.

- PostgreSQL: `sluice extract users` vs `psql -c "\\copy (SELECT ...) TO '/dev/null' (FORMAT binary)"`
- MariaDB:    `sluice extract users` vs `mariadb --quick -e 'SELECT ...' > /dev/null`

The table is the 11-column `users` model of the diff benchmark (int64 id; email, first and last
name, plan, country; float64 lifetime value; int32 lead score; bool; two timestamps), generated
once in the server (schema/database `sluice_bench`). The commands alternate, `--repeat` times;
the report gives medians of wall seconds, CPU seconds (user + system of the client process) and
the client's peak RSS, measured per process with wait4().

    python3 benches/extract_vs_copy.py --rows 10000000 --repeat 5 [--only postgres|mysql]

It builds the release binary with `cargo build --release` (CARGO_TARGET_DIR is honoured).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = (
    "id, email, first_name, last_name, plan, country, lifetime_value, lead_score, is_active, "
    "created_at, updated_at"
)


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def psql(sql, capture=False):
    return sh(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql],
        capture_output=capture,
        text=True,
    )


def mariadb(sql, capture=False):
    return sh(["mariadb", "-h", "127.0.0.1", "-u", "root", "-N", "-e", sql], capture_output=capture, text=True)


def ensure_postgres_table(rows):
    psql("CREATE SCHEMA IF NOT EXISTS sluice_bench")
    exists = psql(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'sluice_bench' AND tablename = 'users'", capture=True
    ).stdout.strip()
    if exists == "1":
        have = psql("SELECT count(*) FROM sluice_bench.users", capture=True).stdout.strip()
        if int(have) == rows:
            return
        psql("DROP TABLE sluice_bench.users")
    print(f"generating {rows} rows in PostgreSQL ...", file=sys.stderr)
    psql(
        f"""CREATE TABLE sluice_bench.users AS SELECT
            g::int8 AS id,
            'user' || g || '@example.com' AS email,
            (ARRAY['Ada','Grace','Linus','Ken','Barbara'])[1 + g % 5] AS first_name,
            'Last' || (g % 1000) AS last_name,
            (ARRAY['free','starter','pro','enterprise'])[1 + g % 4] AS plan,
            (ARRAY['US','DE','FR','GB','JP','BR'])[1 + g % 6] AS country,
            (g % 10000) / 7.0::float8 AS lifetime_value,
            (g % 100)::int4 AS lead_score,
            g % 3 <> 0 AS is_active,
            timestamp '2020-01-01' + g * interval '1 second' AS created_at,
            timestamptz '2024-01-01' + g * interval '1 second' AS updated_at
        FROM generate_series(1, {rows}) g"""
    )
    psql("ALTER TABLE sluice_bench.users ADD PRIMARY KEY (id)")
    psql("VACUUM ANALYZE sluice_bench.users")


def ensure_mysql_table(rows):
    mariadb("CREATE DATABASE IF NOT EXISTS sluice_bench")
    have = mariadb(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema='sluice_bench' AND table_name='users'",
        capture=True,
    ).stdout.strip()
    if have == "1":
        count = mariadb("SELECT COUNT(*) FROM sluice_bench.users", capture=True).stdout.strip()
        if int(count) == rows:
            return
        mariadb("DROP TABLE sluice_bench.users")
    print(f"generating {rows} rows in MariaDB ...", file=sys.stderr)
    mariadb(
        """CREATE TABLE sluice_bench.users (
            id BIGINT PRIMARY KEY, email VARCHAR(64), first_name VARCHAR(32), last_name VARCHAR(32),
            plan VARCHAR(16), country CHAR(2), lifetime_value DOUBLE, lead_score INT, is_active BOOLEAN,
            created_at DATETIME(6), updated_at TIMESTAMP(6) NULL
        ) ENGINE=InnoDB"""
    )
    mariadb(
        f"""INSERT INTO sluice_bench.users SELECT
            seq, CONCAT('user', seq, '@example.com'),
            ELT(1 + seq % 5, 'Ada','Grace','Linus','Ken','Barbara'),
            CONCAT('Last', seq % 1000),
            ELT(1 + seq % 4, 'free','starter','pro','enterprise'),
            ELT(1 + seq % 6, 'US','DE','FR','GB','JP','BR'),
            (seq % 10000) / 7.0, seq % 100, seq % 3 <> 0,
            TIMESTAMPADD(SECOND, seq, '2020-01-01'), TIMESTAMPADD(SECOND, seq % 100000000, '2001-01-01')
        FROM sluice_bench.seq_1_to_{rows}"""
    )


def measure(cmd, stdout=subprocess.DEVNULL, env=None):
    """Runs cmd; returns (wall s, cpu s, peak RSS MiB)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0]} failed: {err}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def sluice_project(kind):
    d = tempfile.mkdtemp(prefix=f"sluice-bench-{kind}-")
    if kind == "postgres":
        source = "type: postgres\n    url: postgres://postgres@127.0.0.1:5432/test\n    sslmode: disable"
        table = "sluice_bench.users"
    else:
        source = "type: mysql\n    url: mysql://root@127.0.0.1:3306/sluice_bench\n    ssl_mode: disabled"
        table = "users"
    with open(os.path.join(d, "sluice.yaml"), "w") as f:
        f.write(
            f"""state_dir: .sluice
sources:
  db:
    {source}
models:
  users:
    source: db
    sql: SELECT {COLUMNS} FROM {table}
    primary_key: id
"""
        )
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", choices=["postgres", "mysql"])
    ap.add_argument("--json", help="write raw figures here")
    args = ap.parse_args()

    sh(["cargo", "build", "--release", "--quiet", "--bin", "sluice"], cwd=ROOT)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    sluice = os.path.join(target, "release", "sluice")

    kinds = [args.only] if args.only else ["postgres", "mysql"]
    results = {}
    for kind in kinds:
        if kind == "postgres":
            ensure_postgres_table(args.rows)
            floor_name = "psql \\copy binary"
            floor = [
                "psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-c",
                f"\\copy (SELECT {COLUMNS} FROM sluice_bench.users) TO '/dev/null' (FORMAT binary)",
            ]
        else:
            ensure_mysql_table(args.rows)
            floor_name = "mariadb --quick"
            floor = [
                "mariadb", "-h", "127.0.0.1", "-u", "root", "--quick", "-e",
                f"SELECT {COLUMNS} FROM sluice_bench.users",
            ]
        project = sluice_project(kind)
        cmd = [sluice, "extract", "users", "--config", os.path.join(project, "sluice.yaml")]
        env = dict(os.environ, RUST_LOG="warn")
        runs = {"sluice": [], floor_name: []}
        for i in range(args.repeat):
            # Alternate which goes first so neither always meets a warm or cold cache.
            order = [("sluice", cmd), (floor_name, floor)]
            if i % 2:
                order.reverse()
            for name, c in order:
                runs[name].append(measure(c, env=env))
                shutil.rmtree(os.path.join(project, ".sluice"), ignore_errors=True)
        shutil.rmtree(project, ignore_errors=True)
        results[kind] = runs

    print(f"\n{args.rows:,} rows, medians of {args.repeat}\n")
    print("| source | reader | wall s | CPU s | peak RSS MiB | rows/s | sluice / floor |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for kind, runs in results.items():
        names = list(runs)
        floor_wall = statistics.median(r[0] for r in runs[names[1]])
        for name in names:
            wall = statistics.median(r[0] for r in runs[name])
            cpu = statistics.median(r[1] for r in runs[name])
            rss = statistics.median(r[2] for r in runs[name])
            ratio = f"{wall / floor_wall:.2f}x" if name == "sluice" else ""
            print(f"| {kind} | {name} | {wall:.2f} | {cpu:.2f} | {rss:.0f} | {args.rows / wall / 1e6:.2f} M | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
